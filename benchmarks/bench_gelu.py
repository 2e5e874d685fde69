"""The exact (erf) GELU on TensorFlow's CPU kernels: ways to write it, timed.

    python benchmarks/bench_gelu.py

One BERT-base feed-forward activation of a batch of 8 x 128 tokens over 12
layers (12,288 x 3072 values), float32 and bfloat16, forward alone and forward
plus gradient, each inside a `tf.function`:

  tf.nn.gelu      TensorFlow's (and Keras') exact GELU, written with erfc
  bert4keras      bert4keras.backend.gelu_erf: x (1 + erf(x / sqrt 2)) / 2
                  in float32
  erfc, erf       the special functions alone
  tf.nn.gelu tanh the tanh approximation, for scale

Prints milliseconds per call (median of --calls) and each GELU's largest
difference from a float64 numpy reference on the same inputs.
"""
import argparse
import math
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8 * 128 * 12)
    parser.add_argument("--calls", type=int, default=7)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from bert4keras.backend import gelu_erf

    values = np.random.default_rng(0).normal(size=(args.rows, 3072)).astype("float32")
    erf = np.vectorize(math.erf)
    sample = values[:64].astype("float64")
    reference = 0.5 * sample * (1 + erf(sample / math.sqrt(2)))

    def timed(fn, x):
        fn = tf.function(fn)
        fn(x)
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3

    def with_gradient(fn):
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            # Both returned, as training needs both (else TF prunes the forward).
            return y, tape.gradient(y, x, output_gradients=tf.ones_like(y))
        return step

    candidates = {
        "tf.nn.gelu (erfc)": lambda x: tf.nn.gelu(x, approximate=False),
        "bert4keras gelu_erf": gelu_erf,
        "tf.nn.gelu tanh": lambda x: tf.nn.gelu(x, approximate=True),
        "erfc alone": tf.math.erfc,
        "erf alone": tf.math.erf,
    }
    print(f"{args.rows} x 3072 values; ms per call, median of {args.calls}\n")
    print("| function | fp32 forward | fp32 fwd+grad | bf16 forward | bf16 fwd+grad | max error fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, fn in candidates.items():
        row = []
        for dtype in (tf.float32, tf.bfloat16):
            x = tf.cast(tf.constant(values), dtype)
            row += [timed(fn, x), timed(with_gradient(fn), x)]
        if "gelu" in name:
            error = np.abs(fn(tf.constant(values[:64])).numpy() - reference).max()
            if "tanh" in name:
                error = f"{error:.1e} (approximation)"
            else:
                error = f"{error:.1e}"
        else:
            error = "-"
        print(f"| {name} | " + " | ".join(f"{ms:.1f}" for ms in row) + f" | {error} |")


if __name__ == "__main__":
    main()
