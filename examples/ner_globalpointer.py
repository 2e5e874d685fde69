"""Named-entity recognition with BERT + GlobalPointer on the People's Daily 1998 corpus.

The same task, data and metric as `ner_crf.py` (PER / LOC / ORG, entity-level
F1 on character offsets), with a GlobalPointer head instead of a CRF: it
scores every span (start, end) of the sentence for each entity type, so
nested or adjacent entities need no tagging scheme. Spans scoring above 0 are
entities; `decode_spans` maps them to characters through `rematch`.

    python examples/ner_globalpointer.py            # default run, < 15 min on 2 CPU cores
    python examples/ner_globalpointer.py --smoke    # tiny end-to-end run (CI)
    python examples/ner_globalpointer.py --text "国家主席江泽民在北京会见了联合国秘书长安南。"

A full run (defaults) result: see examples/README.md.
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
from bert4keras.heads import GlobalPointer, decode_spans  # noqa: E402
from bert4keras.losses import GlobalPointerF1, global_pointer_crossentropy  # noqa: E402
from bert4keras.optimizers import Adam, extend_with_parameter_wise_lr  # noqa: E402
from bert4keras.snippets import DataGenerator, fit_generator, sequence_padding  # noqa: E402

TYPES = datasets.ENTITY_TYPES


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
    parser.add_argument("--head-size", type=int, default=64)
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
    """token ids, (type, first token, last token) spans, the character mapping, gold entities."""
    tokens = tokenizer.tokenize(text, maxlen=maxlen + 2)
    mapping = tokenizer.rematch(text, tokens)
    starts = {chars[0]: i for i, chars in enumerate(mapping) if chars}
    ends = {chars[-1]: i for i, chars in enumerate(mapping) if chars}
    spans = [
        (TYPES.index(kind), starts[start], ends[end - 1])
        for start, end, kind in entities
        if start in starts and end - 1 in ends  # entities cut by maxlen are dropped
    ]
    return tokenizer.tokens_to_ids(tokens), spans, mapping, entities


class SentenceGenerator(DataGenerator):
    """Batches ((token_ids, segment_ids), labels); labels[b, type, start, end] = 1 for each entity."""

    def __iter__(self, random=False):
        batch_token_ids, batch_spans = [], []
        for is_end, (token_ids, spans, _, _) in self.sample(random):
            batch_token_ids.append(token_ids)
            batch_spans.append(spans)
            if len(batch_token_ids) == self.batch_size or is_end:
                token_ids = sequence_padding(batch_token_ids, length=self.pad_length)
                labels = np.zeros((len(token_ids), len(TYPES), token_ids.shape[1], token_ids.shape[1]), "float32")
                for b, spans in enumerate(batch_spans):
                    for kind, first, last in spans:
                        labels[b, kind, first, last] = 1
                yield (token_ids, np.zeros_like(token_ids)), labels
                batch_token_ids, batch_spans = [], []


def evaluate(model, items, boundaries, batch_size):
    """Entity-level (precision, recall, F1) on character offsets."""
    found = gold = right = 0
    items = sorted(items, key=lambda item: len(item[0]))  # similar lengths together, padded to a bucket bound
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        length = next((b for b in boundaries if b >= len(batch[-1][0])), None)
        token_ids = sequence_padding([item[0] for item in batch], length=length)
        scores = model.predict_on_batch((token_ids, np.zeros_like(token_ids)))
        for spans, (_, _, _, entities) in zip(decode_spans(scores, mapping=[item[2] for item in batch], categories=TYPES), batch):
            predicted = {(start, end + 1, kind) for kind, start, end in spans}
            found, gold, right = found + len(predicted), gold + len(entities), right + len(predicted & set(entities))
    return right / max(found, 1), right / max(gold, 1), 2 * right / max(found + gold, 1)


def main():
    args = parse_args()
    start = time.time()
    train = datasets.subset(datasets.load_people_daily_entities("train", maxlen=args.maxlen), args.train_size)
    test = datasets.subset(datasets.load_people_daily_entities("test", maxlen=args.maxlen), args.test_size)
    config, checkpoint, tokenizer = chinese_model.resolve(args)
    train_items = [encode(tokenizer, text, entities, args.maxlen) for text, entities in train]
    test_items = [encode(tokenizer, text, entities, args.maxlen) for text, entities in test]
    train_generator = SentenceGenerator(train_items, args.batch_size, bucket_boundaries=args.buckets, length_fn=lambda item: len(item[0]))
    print(f"{len(train)} training / {len(test)} test sentences; types {TYPES}")

    bert = build_transformer_model(config, checkpoint, **({} if args.layers is None else {"num_hidden_layers": args.layers}))
    scores = GlobalPointer(len(TYPES), args.head_size, name="GlobalPointer")([bert.output, bert.inputs[0]])
    model = keras.Model(bert.inputs, scores)
    optimizer = extend_with_parameter_wise_lr(Adam)(
        learning_rate=args.lr, paramwise_lr_schedule={"Embedding-Token": args.embedding_lr}
    )
    model.compile(optimizer, loss=global_pointer_crossentropy, metrics=[GlobalPointerF1()])
    fit_generator(model, train_generator, epochs=args.epochs)

    precision, recall, f1 = evaluate(model, test_items, train_generator.bucket_boundaries, args.batch_size)
    for text in args.text:
        token_ids, _, mapping, _ = encode(tokenizer, text, [], args.maxlen)
        scores = model.predict_on_batch((np.array([token_ids]), np.zeros((1, len(token_ids)), "int32")))[0]
        print(text, [(text[s : e + 1], kind) for kind, s, e in decode_spans(scores, mapping=mapping, categories=TYPES)])
    print(f"time: {time.time() - start:.0f} s")
    print(f"entity F1: {f1:.2%}  (precision {precision:.2%}, recall {recall:.2%})")


if __name__ == "__main__":
    main()
