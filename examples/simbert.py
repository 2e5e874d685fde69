"""SimBERT-style sentence similarity training on the People's Daily corpus.

SimBERT trains one UniLM model on pairs of related sentences with two losses
at once: generate one side of the pair from the other (seq2seq, `unilm`
mask), and pick each sentence's partner among all the sentences of the batch
from their sentence vectors (cosine similarity x 30, softmax over the batch).
The vector is the mean of the sentence's token states by default (as
all-MiniLM-L6-v2, the body of the default Chinese model, was trained), or
SimBERT's linear [CLS] pooler with `--pooling cls`.
With no paraphrase corpus at hand, the pairs here are adjacent sentences of
the same People's Daily paragraph (topically related sentences).

Metric: for each sentence of held-out paragraphs, find an adjacent sentence
of its paragraph among all the held-out sentences (hit@1, hit@10, mean
reciprocal rank), before and after training, next to TF-IDF over character
bigrams. Typed queries (--text) get their nearest neighbours and a generated
related sentence.

    python examples/simbert.py            # default run, < 15 min on 2 CPU cores
    python examples/simbert.py --smoke    # tiny end-to-end run (CI)
    python examples/simbert.py --text "国务院总理李鹏今天会见了日本客人。"

A full run (defaults: 3,000 pairs, mean pooling, seed 2024), 2026-12-04,
2 idle cores, 359 s: hit@10 30.8% after training (17.3% before), still below
TF-IDF over character bigrams (38.5%); see examples/README.md.
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import chinese_model  # noqa: E402
import datasets  # noqa: E402
from bert4keras import build_transformer_model  # noqa: E402
from bert4keras.heads import GlobalAveragePooling1D  # noqa: E402
from bert4keras.layers import Loss  # noqa: E402
from bert4keras.losses import masked_sequence_crossentropy  # noqa: E402
from bert4keras.optimizers import Adam, extend_with_parameter_wise_lr  # noqa: E402
from bert4keras.snippets import AutoRegressiveDecoder, DataGenerator, fit_generator, sequence_padding  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chinese_model.add_model_arguments(parser)
    parser.add_argument("--maxlen", type=int, default=40, help="characters per sentence (the corpus is cut to this)")
    parser.add_argument("--train-size", type=int, default=3000, help="training pairs")
    parser.add_argument("--test-paragraphs", type=int, default=300, help="held-out paragraphs searched")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per batch (each pair is used both ways)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--embedding-lr", type=float, default=20.0, help="learning-rate multiplier of the token embeddings")
    parser.add_argument("--layers", type=int, default=None, help="use only the first N transformer layers")
    parser.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                        help="sentence vector: mean of the tokens (as all-MiniLM-L6-v2 was trained) or a linear [CLS] pooler")
    parser.add_argument("--seed", type=int, default=2024, help="seeds shuffling, dropout and new weights")
    parser.add_argument("--text", nargs="*", default=[], help="query sentences shown after training")
    parser.add_argument("--smoke", action="store_true", help="tiny run: 64 pairs, 2 layers")
    args = parser.parse_args()
    if args.smoke:
        args.train_size, args.test_paragraphs, args.layers, args.maxlen = 64, 20, 2, 24
    return args


def adjacent_pairs(paragraphs):
    return [(p[i], p[i + 1]) for p in paragraphs for i in range(len(p) - 1)]


class PairGenerator(DataGenerator):
    """Each pair (a, b) gives two rows, [CLS] a [SEP] b [SEP] and [CLS] b [SEP] a [SEP], side by side."""

    def __init__(self, data, batch_size, tokenizer, maxlen):
        super().__init__(data, batch_size)
        self.tokenizer, self.maxlen = tokenizer, maxlen

    def __iter__(self, random=False):
        batch_token_ids, batch_segment_ids = [], []
        for is_end, (a, b) in self.sample(random):
            for first, second in ((a, b), (b, a)):
                token_ids, segment_ids = self.tokenizer.encode(first, second, maxlen=2 * self.maxlen + 3)
                batch_token_ids.append(token_ids)
                batch_segment_ids.append(segment_ids)
            if len(batch_token_ids) == 2 * self.batch_size or is_end:
                yield ((sequence_padding(batch_token_ids), sequence_padding(batch_segment_ids)),)
                batch_token_ids, batch_segment_ids = [], []


class SimBERTLoss(Loss):
    """Seq2seq cross-entropy on the second sentence + in-batch similarity of the sentence vectors."""

    def compute_loss(self, inputs):
        token_ids, segment_ids, pooled, probabilities = inputs
        seq2seq = masked_sequence_crossentropy(token_ids, probabilities, segment_ids)
        vectors = pooled / ops.norm(pooled, axis=1, keepdims=True)
        similarities = ops.matmul(vectors, ops.transpose(vectors)) * 30  # cosine, sharpened
        rows = ops.arange(ops.shape(vectors)[0])
        similarities = similarities - ops.cast(ops.eye(ops.shape(vectors)[0]), "float32") * 1e12  # not itself
        partners = rows + 1 - 2 * (rows % 2)  # rows 0<->1, 2<->3, ...
        similarity = keras.losses.sparse_categorical_crossentropy(partners, similarities, from_logits=True)
        return seq2seq + ops.mean(similarity)


def embed(encoder, tokenizer, sentences, maxlen, batch_size=64):
    ids = [tokenizer.encode(s, maxlen=maxlen + 2)[0] for s in sentences]
    vectors = []
    for start in range(0, len(ids), batch_size):
        token_ids = sequence_padding(ids[start : start + batch_size], length=maxlen + 2)
        vectors.append(encoder.predict_on_batch((token_ids, np.zeros_like(token_ids))))
    vectors = np.concatenate(vectors)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def neighbour_retrieval(similarity, paragraph_of, position_of):
    """hit@1, hit@10, MRR of finding a sentence adjacent to the query in its paragraph."""
    np.fill_diagonal(similarity, -np.inf)
    ranks = []
    for i, row in enumerate(similarity):
        order = np.argsort(-row)
        adjacent = (paragraph_of[order] == paragraph_of[i]) & (np.abs(position_of[order] - position_of[i]) == 1)
        if adjacent.any():
            ranks.append(int(np.flatnonzero(adjacent)[0]) + 1)
    ranks = np.array(ranks)
    return (ranks <= 1).mean(), (ranks <= 10).mean(), (1 / ranks).mean()


def tfidf_similarity(sentences):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectors = TfidfVectorizer(analyzer="char", ngram_range=(2, 2)).fit_transform(sentences)
    return (vectors @ vectors.T).toarray()


def main():
    args = parse_args()
    keras.utils.set_random_seed(args.seed)
    start = time.time()
    train = datasets.subset(adjacent_pairs(datasets.load_people_daily_paragraphs("train", args.maxlen)), args.train_size)
    test = [p for p in datasets.load_people_daily_paragraphs("test", args.maxlen) if len(p) > 1]
    test = datasets.subset(test, args.test_paragraphs)
    sentences = [s for p in test for s in p]
    paragraph_of = np.array([i for i, p in enumerate(test) for _ in p])
    position_of = np.array([j for p in test for j in range(len(p))])
    config, checkpoint, tokenizer = chinese_model.resolve(args)
    print(f"{len(train)} training pairs; {len(sentences)} held-out sentences in {len(test)} paragraphs")

    transformer = build_transformer_model(
        config, checkpoint, application="unilm", with_pool="linear" if args.pooling == "cls" else False, with_mlm=True,
        ignore_invalid_weights=True,  # the MLM head is new when the checkpoint has none
        return_keras_model=False, **({} if args.layers is None else {"num_hidden_layers": args.layers}),
    )
    model = transformer.model
    if args.pooling == "cls":
        pooled, probabilities = model.outputs
    else:  # over the first sentence's real tokens (the unilm mask keeps it blind to the second)
        probabilities, (token_ids, segment_ids) = model.output, model.inputs
        hidden = model.get_layer(f"Transformer-{transformer.num_hidden_layers - 1}-FeedForward-Norm").output
        first_sentence = ops.logical_and(ops.not_equal(token_ids, 0), ops.equal(segment_ids, 0))
        pooled = GlobalAveragePooling1D(name="Mean-Pooling")([hidden, first_sentence])
    encoder = keras.Model(model.inputs, pooled)
    vectors = embed(encoder, tokenizer, sentences, args.maxlen)
    before = neighbour_retrieval(vectors @ vectors.T, paragraph_of, position_of)

    token_ids, segment_ids = model.inputs
    output = SimBERTLoss(output_axis=3)([token_ids, segment_ids, pooled, probabilities])
    train_model = keras.Model(model.inputs, output)
    optimizer = extend_with_parameter_wise_lr(Adam)(
        learning_rate=args.lr, paramwise_lr_schedule={"Embedding-Token": args.embedding_lr}
    )
    train_model.compile(optimizer)
    generator = PairGenerator(train, args.batch_size, tokenizer, args.maxlen)
    fit_generator(train_model, generator, epochs=args.epochs)

    vectors = embed(encoder, tokenizer, sentences, args.maxlen)
    after = neighbour_retrieval(vectors @ vectors.T, paragraph_of, position_of)
    tfidf = neighbour_retrieval(tfidf_similarity(sentences), paragraph_of, position_of)

    if args.text:
        generate = RelatedSentence(keras.Model(model.inputs, probabilities), tokenizer, args.maxlen)
        for query, row in zip(args.text, embed(encoder, tokenizer, args.text, args.maxlen) @ vectors.T):
            print(f"\n{query}\n  generated: {generate(query)}")
            for j in np.argsort(-row)[:3]:
                print(f"  {row[j]:.3f}  {sentences[j]}")
    print(f"time: {time.time() - start:.0f} s")
    for name, (hit1, hit10, mrr) in (("before training", before), ("TF-IDF bigrams", tfidf), ("after training", after)):
        print(f"adjacent-sentence retrieval, {name}: hit@1 {hit1:.1%}, hit@10 {hit10:.1%}, MRR {mrr:.3f}")


class RelatedSentence(AutoRegressiveDecoder):
    """Random sampling of a related sentence (full recomputation: a short demo)."""

    def __init__(self, model, tokenizer, maxlen):
        super().__init__(start_id=None, end_id=tokenizer._token_end_id, maxlen=maxlen)
        self.model, self.tokenizer = self.last_token(model), tokenizer

    @AutoRegressiveDecoder.wraps(default_rtype="probas")
    def predict(self, inputs, output_ids, states):
        token_ids, segment_ids = inputs
        token_ids = np.concatenate([token_ids, output_ids], 1)
        segment_ids = np.concatenate([segment_ids, np.ones_like(output_ids)], 1)
        return keras.ops.convert_to_numpy(self.model.predict_on_batch((token_ids, segment_ids)))

    def __call__(self, text):
        token_ids, segment_ids = self.tokenizer.encode(text)
        output_ids = self.random_sample([token_ids, segment_ids], n=1, topk=5, seed=0)[0]
        return self.tokenizer.decode(output_ids)


if __name__ == "__main__":
    main()
