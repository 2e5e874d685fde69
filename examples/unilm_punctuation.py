"""UniLM seq2seq: restore the punctuation removed from People's Daily sentences.

Source: a 1998 People's Daily sentence with every punctuation mark taken
out; target: the original sentence. One BERT model does both sides
(`application='unilm'`: the source attends to itself, the target to the
source and its own past) and generates the target with key/value-cached beam
search (`CachedDecoder`). The metric is punctuation F1: a mark counts when it
is generated after the right number of source characters. The script also
prints how often the source text was copied back exactly, and the F1 of the
trivial answer "one 。 at the end".

    python examples/unilm_punctuation.py            # default run, < 15 min on 2 CPU cores
    python examples/unilm_punctuation.py --smoke    # tiny end-to-end run (CI)
    python examples/unilm_punctuation.py --text "新华社北京一月五日电国务院总理李鹏今天会见了外宾"

Decoding is constrained (`PunctuationRestorer`): the output is the source
with marks inserted, and the model decides where; a sentence ends with one
of 。！？ and has none of them inside. A default run (12,000 sentences, one
epoch) on 2026-12-04, 2 idle cores, 518 s: punctuation F1 57.96%
(precision 87.75%, recall 43.27%) against 56.10% for the trivial answer;
the marks it places are mostly right, but it finds under half of them. See
examples/README.md.
"""
import argparse
import os
import time
import unicodedata

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out

import keras  # noqa: E402
import numpy as np  # noqa: E402

import chinese_model  # noqa: E402
import datasets  # noqa: E402
from bert4keras import build_transformer_model  # noqa: E402
from bert4keras.generation import CachedDecoder  # noqa: E402
from bert4keras.layers import Loss  # noqa: E402
from bert4keras.losses import masked_sequence_crossentropy  # noqa: E402
from bert4keras.optimizers import Adam, extend_with_parameter_wise_lr  # noqa: E402
from bert4keras.snippets import AutoRegressiveDecoder, DataGenerator, fit_generator, sequence_padding  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chinese_model.add_model_arguments(parser)
    parser.add_argument("--maxlen", type=int, default=40, help="characters per sentence (the corpus is cut to this)")
    parser.add_argument("--train-size", type=int, default=12000, help="training sentences (0: all 14,990)")
    parser.add_argument("--test-size", type=int, default=200, help="test sentences (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--embedding-lr", type=float, default=20.0, help="learning-rate multiplier of the token embeddings")
    parser.add_argument("--seed", type=int, default=2024, help="seeds shuffling, dropout and new weights")
    parser.add_argument("--beam", type=int, default=3, help="beam size")
    parser.add_argument("--mark-bias", type=float, default=0.0,
                        help="added to the log-odds of a mark at each position (> 0: more marks)")
    parser.add_argument("--free-end", action="store_true",
                        help="let the model end without a sentence-final mark (the test sentences all have one)")
    parser.add_argument("--decode-batch", type=int, default=32, help="sentences decoded together")
    parser.add_argument("--layers", type=int, default=None, help="use only the first N transformer layers")
    parser.add_argument("--text", nargs="*", default=[], help="unpunctuated sentences to punctuate after training")
    parser.add_argument("--buckets", type=int, default=6, help="length buckets (batches are padded to their bucket's bound)")
    parser.add_argument("--smoke", action="store_true", help="tiny run: 128 sentences, 2 layers")
    args = parser.parse_args()
    if args.smoke:
        args.train_size, args.test_size, args.layers, args.maxlen = 128, 16, 2, 24
        args.buckets = 2
    return args


def is_punctuation(char):
    return unicodedata.category(char).startswith("P")


def strip_punctuation(text):
    return "".join(c for c in text if not is_punctuation(c))


def punctuation_marks(text):
    """{(number of non-punctuation characters before it, mark, repeat)} for each mark of `text`."""
    marks, before, seen = set(), 0, {}
    for char in "".join(text.split()):
        if is_punctuation(char):
            key = (before, char)
            seen[key] = seen.get(key, 0) + 1
            marks.add((before, char, seen[key]))
        else:
            before += 1
    return marks


def whole_sentences(split, maxlen):
    """Sentences of at most `maxlen` characters that end with 。！？ (no fragments)."""
    sentences = datasets.load_people_daily_sentences(split, maxlen=10**6)
    return [s for s in sentences if len(s) <= maxlen and s[-1] in "。！？" and not is_punctuation(s[0])]


class PairGenerator(DataGenerator):
    """Batches ((token_ids, segment_ids),): [CLS] source [SEP] target [SEP], target in segment 1."""

    def __iter__(self, random=False):
        batch_token_ids, batch_segment_ids = [], []
        for is_end, (token_ids, segment_ids) in self.sample(random):
            batch_token_ids.append(token_ids)
            batch_segment_ids.append(segment_ids)
            if len(batch_token_ids) == self.batch_size or is_end:
                token_ids = sequence_padding(batch_token_ids, length=self.pad_length)
                segment_ids = sequence_padding(batch_segment_ids, length=self.pad_length)
                yield ((token_ids, segment_ids),)  # no labels: the loss is inside the model
                batch_token_ids, batch_segment_ids = [], []


class TargetCrossEntropy(Loss):
    """Cross-entropy of the target tokens only (segment 1), added as the model's loss."""

    def compute_loss(self, inputs):
        token_ids, segment_ids, probabilities = inputs
        return masked_sequence_crossentropy(token_ids, probabilities, segment_ids)


class PunctuationRestorer(CachedDecoder):
    """Cached beam search that copies the source and lets the model place the marks.

    At each step a row may emit the next source token, a punctuation mark
    (not before the first source token, at most two in a row, none of
    `final_marks`), or, once the whole source is copied, one of
    `final_marks` and then the end token (`final_marks=""`: any mark
    anywhere, and the end right after the source). The output is always the source
    with marks inserted, and the model's scores decide where the marks go
    and which (a mark against the probability of any non-mark token).
    """

    def __init__(self, model, tokenizer, mark_bias=0.0, final_marks="。！？", **kwargs):
        super().__init__(model, end_id=tokenizer.token_end_id, **kwargs)
        tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
        self.is_mark = np.array([len(token) == 1 and is_punctuation(token) for token in tokens])
        self.is_final = np.isin(tokens, list(final_marks or ""))
        self.final_ids = np.flatnonzero(self.is_final)
        self.inner_ids = np.flatnonzero(self.is_mark & ~self.is_final)  # the marks allowed inside a sentence
        self.mark_bias = mark_bias

    @AutoRegressiveDecoder.wraps(default_rtype="logits", use_states=True)
    def predict(self, inputs, output_ids, states):
        log_probs, states = super().predict(inputs, output_ids, states, rtype="logits")
        return self.constrain(log_probs, inputs[0], output_ids), states

    def constrain(self, log_probs, source_ids, output_ids):
        """Scores (-inf: not allowed) of the next token of each row, from the model's log-probabilities."""
        # The next token is known unless it is a mark: "no mark here" gets all
        # the probability the model gives to other tokens, not just to the right
        # one (a sentence-final mark, not allowed inside, counts as no mark).
        no_mark = np.log1p(-np.minimum(np.exp(log_probs[:, self.inner_ids]).sum(axis=1), 1 - 1e-7))
        scores = np.full(log_probs.shape, -np.inf)
        for row, (source, output) in enumerate(zip(source_ids, output_ids)):
            source = source[1 : list(source).index(self.end_id)]  # between [CLS] and [SEP]
            is_mark = self.is_mark[output]
            copied = int(np.sum(~is_mark))
            if copied == len(source) and self.final_ids.size:  # a whole sentence: its final mark, then the end
                if self.is_final[output[-1]]:
                    scores[row, self.end_id] = 0.0
                else:
                    scores[row, self.final_ids] = log_probs[row, self.final_ids]
                continue
            scores[row, source[copied] if copied < len(source) else self.end_id] = no_mark[row]
            if copied > 0 and not is_mark[-2:].all():  # at most two marks in a row
                # mark_bias shifts the log-odds of "a mark here" (> 0: more marks)
                scores[row, self.inner_ids] = log_probs[row, self.inner_ids] + self.mark_bias
        return scores


def train_model(args, train, config, checkpoint, tokenizer):
    """The UniLM model, fine-tuned on (sentence without marks, sentence) pairs."""
    pairs = [tokenizer.encode(strip_punctuation(text), text) for text in train]
    generator = PairGenerator(pairs, args.batch_size, bucket_boundaries=args.buckets, length_fn=lambda item: len(item[0]))
    # The MLM head (dense + norm + output bias) is new when the checkpoint has none.
    transformer = build_transformer_model(
        config, checkpoint, application="unilm", with_mlm=True, ignore_invalid_weights=True,
        return_keras_model=False, **({} if args.layers is None else {"num_hidden_layers": args.layers}),
    )
    model = transformer.model
    token_ids, segment_ids = model.inputs
    output = TargetCrossEntropy(output_axis=2)([token_ids, segment_ids, model.output])
    train_model = keras.Model(model.inputs, output)
    optimizer = extend_with_parameter_wise_lr(Adam)(
        learning_rate=args.lr, paramwise_lr_schedule={"Embedding-Token": args.embedding_lr}
    )
    train_model.compile(optimizer)
    fit_generator(train_model, generator, epochs=args.epochs)
    return model


def punctuate(decoder, tokenizer, texts, beam, batch_size):
    """Punctuated `texts`, decoded in chunks: all beam rows at once would make one huge cache."""
    progress = keras.utils.Progbar(len(texts), unit_name="sentence")
    outputs = []
    for first in range(0, len(texts), batch_size):
        inputs = [list(tokenizer.encode(text)) for text in texts[first : first + batch_size]]
        outputs += decoder.beam_search_batch(inputs, topk=beam)
        progress.update(len(outputs))
    return [tokenizer.decode(ids) for ids in outputs]


def punctuation_scores(texts, predictions):
    """Punctuation F1/precision/recall, exact copies of the source, and the F1 of "one 。 at the end"."""
    found = gold = right = exact_copies = baseline_right = 0
    for text, prediction in zip(texts, predictions):
        truth, predicted = punctuation_marks(text.lower()), punctuation_marks(prediction)
        found, gold, right = found + len(predicted), gold + len(truth), right + len(predicted & truth)
        source = "".join(strip_punctuation(text).lower().split())
        exact_copies += strip_punctuation("".join(prediction.split())) == source
        baseline_right += (len(source), "。", 1) in truth
    return {
        "f1": 2 * right / max(found + gold, 1),
        "precision": right / max(found, 1),
        "recall": right / max(gold, 1),
        "exact": exact_copies / len(texts),
        "baseline_f1": 2 * baseline_right / max(len(texts) + gold, 1),
    }


def main():
    args = parse_args()
    keras.utils.set_random_seed(args.seed)
    start = time.time()
    train = datasets.subset(whole_sentences("train", args.maxlen), args.train_size)
    test = datasets.subset(whole_sentences("test", args.maxlen), args.test_size)
    config, checkpoint, tokenizer = chinese_model.resolve(args)
    print(f"{len(train)} training / {len(test)} test sentences, e.g. {strip_punctuation(train[0])} -> {train[0]}")
    model = train_model(args, train, config, checkpoint, tokenizer)

    decoder = PunctuationRestorer(
        model, tokenizer, mark_bias=args.mark_bias, final_marks="" if args.free_end else "。！？",
        start_id=None, maxlen=2 * args.maxlen,
    )
    sources = [strip_punctuation(text).lower() for text in test]
    predictions = punctuate(decoder, tokenizer, sources, args.beam, args.decode_batch)
    scores = punctuation_scores(test, predictions)
    for text, prediction in list(zip(test, predictions))[:5]:
        print(f"  {strip_punctuation(text)}\n    -> {prediction}\n    gold {text}")
    typed = punctuate(decoder, tokenizer, args.text, args.beam, args.decode_batch) if args.text else []
    for text, prediction in zip(args.text, typed):
        print(f"{text} -> {prediction}")
    print(f"time: {time.time() - start:.0f} s")
    print(f"source copied exactly: {scores['exact']:.1%}")
    print(f"punctuation F1: {scores['f1']:.2%}  (precision {scores['precision']:.2%}, recall {scores['recall']:.2%}; "
          f"'。 at the end' alone: {scores['baseline_f1']:.2%})")


if __name__ == "__main__":
    main()
