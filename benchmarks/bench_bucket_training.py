"""Training on length-bucketed batches with TensorFlow: three ways, timed in one run.

    python benchmarks/bench_bucket_training.py            # about 10 minutes on 2 cores
    python benchmarks/bench_bucket_training.py --quick    # 2 layers, fewer rounds
    python benchmarks/bench_bucket_training.py --xla      # also jit_compile=True (slow to compile)

The batches: `--batch` sequences padded to each of the `--lengths` bucket
bounds (random token ids; the time of a step depends on the shape only), one
"epoch" going through every shape `--steps` times. The ways to train:

  fit/tf.data      `model.fit(generator.to_dataset())`: the dataset's sequence
                   axis has no fixed length, so Keras traces one shape-generic
                   graph that serves every bucket;
  fit_generator    `bert4keras.snippets.fit_generator`: one `train_on_batch` per
                   batch, which traces one graph per bucket shape;
  fit_generator+xla  the same with `jit_compile=True` (XLA), one compilation
                   per shape (only with --xla).

Each way has its own copy of the model (same initial weights) and is warmed
up by one epoch (tracing, compilation; timed and reported apart); then the
timed epochs go round-robin over the ways, `--rounds` times, so load from
other jobs falls on all alike. Reported: the best and the median epoch time,
seconds per step, and the ratio to fit/tf.data.

The model: a BERT encoder (MiniLM-L6 size by default: 6 layers, hidden 384,
12 heads, intermediate 1536, vocabulary 21128), mean pooling and a 2-class
head, Adam, dropout 0.1 as in fine-tuning.
"""
import argparse
import datetime
import os
import platform
import statistics
import time

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bert4keras import build_transformer_model  # noqa: E402
from bert4keras.heads import GlobalAveragePooling1D  # noqa: E402
from bert4keras.snippets import DataGenerator, fit_generator  # noqa: E402


class ShapeBatches(DataGenerator):
    """Yields the prepared batches in order; `data` is a list of (token_ids, labels) batches."""

    def __iter__(self, random=False):
        for token_ids, labels in self.data:
            yield (token_ids, np.zeros_like(token_ids)), labels

    def __len__(self):
        return len(self.data)


def build_model(args, jit_compile):
    keras.utils.set_random_seed(0)  # the same initial weights for every way
    bert = build_transformer_model(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
        dropout_rate=0.1, attention_dropout_rate=0.1,
    )
    x = GlobalAveragePooling1D()([bert.output, bert.inputs[0]])
    model = keras.Model(bert.inputs, keras.layers.Dense(2, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy", jit_compile=jit_compile)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32,64,128", help="bucket bounds (padded lengths)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="steps per shape in one epoch")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per way")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=21128)
    parser.add_argument("--xla", action="store_true", help="also time jit_compile=True")
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.rounds = 2, 2

    rng = np.random.default_rng(0)
    lengths = [int(n) for n in args.lengths.split(",")]
    batches = []
    for _ in range(args.steps):
        for length in lengths:
            token_ids = rng.integers(1, args.vocab, (args.batch, length)).astype("int32")
            batches.append((token_ids, rng.integers(0, 2, args.batch)))
    generator = ShapeBatches(batches, batch_size=args.batch)

    ways = {
        "fit/tf.data": lambda model: model.fit(
            generator.to_dataset(random=False), steps_per_epoch=len(generator), epochs=1, verbose=0),
        "fit_generator": lambda model: fit_generator(model, generator, verbose=0),
    }
    models = {"fit/tf.data": build_model(args, False), "fit_generator": build_model(args, False)}
    if args.xla:
        ways["fit_generator+xla"] = ways["fit_generator"]
        models["fit_generator+xla"] = build_model(args, True)

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, keras {keras.__version__}, tensorflow {__import__('tensorflow').__version__}")
    print(f"BERT {args.layers} layers, hidden {args.hidden}; batch {args.batch}, lengths {lengths}, "
          f"{len(generator)} steps per epoch")
    warmup, times = {}, {name: [] for name in ways}
    for name, run in ways.items():
        start = time.perf_counter()
        run(models[name])
        warmup[name] = time.perf_counter() - start
        print(f"  warm-up epoch {name}: {warmup[name]:.1f} s", flush=True)
    for round_ in range(args.rounds):
        for name, run in ways.items():
            start = time.perf_counter()
            run(models[name])
            times[name].append(time.perf_counter() - start)
        print(f"  round {round_ + 1}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()), flush=True)

    reference = min(times["fit/tf.data"])
    print()
    print("| way | warm-up epoch s | best epoch s | median epoch s | best s/step | best vs fit/tf.data |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, values in times.items():
        best = min(values)
        print(f"| {name} | {warmup[name]:.1f} | {best:.1f} | {statistics.median(values):.1f} | "
              f"{best / len(generator):.2f} | {reference / best:.2f}x |")


if __name__ == "__main__":
    main()
