"""Step-time overhead of gradient accumulation in `model.fit`.

Trains a small Transformer encoder (token embedding, 2 blocks, MLM-style
softmax head) for a fixed number of batches and reports the median time per
batch (a micro-batch when accumulating) over interleaved repeats, both wall
time and process CPU time (all threads); on a shared machine the CPU time is
the steadier of the two:

    KERAS_BACKEND=tensorflow python benchmarks/bench_accumulation.py
    KERAS_BACKEND=jax python benchmarks/bench_accumulation.py --repeats 7

The goal is an overhead under 5% for `AdamGA(grad_accum_steps=4)` against the
plain optimizer on the same micro-batch size.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bert4keras import optimizers as bo  # noqa: E402


def build_model(vocab, hidden, heads, length, blocks):
    ids = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocab, hidden, name="Embedding-Token")(ids)
    for i in range(blocks):
        attention = keras.layers.MultiHeadAttention(heads, hidden // heads)(x, x)
        x = keras.layers.LayerNormalization(name=f"Transformer-{i}-Norm")(x + attention)
        ffn = keras.layers.Dense(4 * hidden, activation="gelu")(x)
        ffn = keras.layers.Dense(hidden)(ffn)
        x = keras.layers.LayerNormalization(name=f"Transformer-{i}-FFN-Norm")(x + ffn)
    logits = keras.layers.Dense(vocab)(x)
    return keras.Model(ids, logits)


def time_per_batch(make_optimizer, data, args):
    keras.utils.set_random_seed(0)
    model = build_model(args.vocab, args.hidden, args.heads, args.length, args.blocks)
    model.compile(make_optimizer(), "sparse_categorical_crossentropy")
    x, y = data
    warm = args.batch * args.accum * 2
    model.fit(x[:warm], y[:warm], batch_size=args.batch, epochs=1, verbose=0)
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
    batches = len(x) // args.batch
    return (
        (time.perf_counter() - wall) / batches,
        (time.process_time() - cpu) / batches,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n = args.batch * args.batches
    data = (
        rng.integers(1, args.vocab, (n, args.length)).astype("int32"),
        rng.integers(1, args.vocab, (n, args.length)).astype("int32"),
    )
    lr = 1e-4
    variants = {
        "keras Adam": lambda: keras.optimizers.Adam(lr),
        "bert4keras Adam": lambda: bo.Adam(lr),
        f"AdamGA k={args.accum}": lambda: bo.AdamGA(
            learning_rate=lr, grad_accum_steps=args.accum
        ),
        f"keras Adam gradient_accumulation_steps={args.accum}": lambda: keras.optimizers.Adam(
            lr, gradient_accumulation_steps=args.accum
        ),
    }
    times = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so load changes hit all alike
        for name, make in variants.items():
            times[name].append(time_per_batch(make, data, args))

    print(
        f"backend={keras.backend.backend()} batch={args.batch} length={args.length} "
        f"hidden={args.hidden} blocks={args.blocks} vocab={args.vocab} "
        f"repeats={args.repeats}: median ms per batch, change vs keras Adam"
    )
    base = np.median(times["keras Adam"], axis=0)
    for name, values in times.items():
        wall, cpu = np.median(values, axis=0)
        print(
            f"  {name:<46} wall {1e3 * wall:7.2f} ({100 * (wall / base[0] - 1):+5.1f}%)"
            f"  cpu {1e3 * cpu:7.2f} ({100 * (cpu / base[1] - 1):+5.1f}%)"
        )


if __name__ == "__main__":
    main()
