"""The encoder's projection kernels alone: TensorFlow's against PyTorch's.

    python benchmarks/bench_projections.py
    python benchmarks/bench_projections.py --tokens 128,1024 --dtypes bf16

Times the products that are ~90% of a BERT-base forward, without a model
around them: 12 feed-forward blocks (768 -> 3072 with bias and GELU, 3072 ->
768 with bias) and 12 x 4 attention projections (768 -> 768 with bias),
chained so each product waits for the one before, on `tokens` rows (batch x
sequence length: 128 is batch 1 at sequence 128, 1024 batch 8). TensorFlow
runs them in one `tf.function` with bert4keras' GELU (oneDNN's fused
MatMul + BiasAdd + GELU kernel, what FastDense layers compile to), PyTorch as `F.linear` and
`F.gelu` under `torch.inference_mode()`. bf16 is bf16 weights and inputs
(no casts inside the timed call). Each framework runs in its own process;
each figure is the best of 3 rounds of the median of `--calls` calls.

When the encoders differ by the same ratio as these kernels, the difference
is in the kernels, not in the code around them.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HIDDEN, INTERMEDIATE, LAYERS = 768, 3072, 12


def best_median(fn, calls, rounds=3):
    fn()
    fn()
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        medians.append(float(np.median(times)))
    return min(medians)


def shapes():
    """(in, out, gelu) of every product of the chain, in order."""
    block = [(HIDDEN, HIDDEN, False)] * 4 + [(HIDDEN, INTERMEDIATE, True), (INTERMEDIATE, HIDDEN, False)]
    return block * LAYERS


def run_tensorflow(tokens, dtype, calls):
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    from bert4keras.backend import gelu_erf

    dt = {"fp32": tf.float32, "bf16": tf.bfloat16}[dtype]
    rng = np.random.default_rng(0)
    weights = [(tf.Variable(tf.cast(rng.normal(0, 0.03, (i, o)), dt)), tf.Variable(tf.zeros([o], dt)), gelu)
               for i, o, gelu in shapes()]
    x = tf.cast(rng.normal(0, 0.1, (tokens, HIDDEN)), dt)

    @tf.function
    def chain(y):
        for kernel, bias, gelu in weights:
            y = tf.nn.bias_add(tf.matmul(y, kernel), bias)
            if gelu:
                y = gelu_erf(y)
        return y

    return best_median(lambda: chain(x).numpy(), calls)


def run_torch(tokens, dtype, calls):
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    gen = torch.Generator().manual_seed(0)
    weights = [((torch.randn(o, i, generator=gen) * 0.03).to(dt), torch.zeros(o, dtype=dt), gelu)
               for i, o, gelu in shapes()]
    x = (torch.randn(tokens, HIDDEN, generator=gen) * 0.1).to(dt)

    def chain(y):
        for kernel, bias, gelu in weights:
            y = torch.nn.functional.linear(y, kernel, bias)
            if gelu:
                y = torch.nn.functional.gelu(y)
        return y

    with torch.inference_mode():
        return best_median(lambda: chain(x), calls)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="128,1024", help="rows of each product (batch x sequence length)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = [(int(t), d) for d in args.dtypes.split(",") for t in args.tokens.split(",")]
    if args.worker:
        run = {"tensorflow": run_tensorflow, "torch": run_torch}[args.worker]
        print(json.dumps([run(tokens, dtype, args.calls) for tokens, dtype in configs]))
        return
    results = {}
    for framework in ("tensorflow", "torch"):
        command = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--tokens", args.tokens,
                   "--dtypes", args.dtypes, "--calls", str(args.calls)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        results[framework] = json.loads(out.strip().splitlines()[-1])
    flops = 2 * sum(i * o for i, o, _ in shapes())
    print(f"# bench_projections — {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs\n")
    print("| tokens | dtype | TensorFlow ms | PyTorch ms | TF / PyTorch time | TF GFLOP/s | PyTorch GFLOP/s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n, (tokens, dtype) in enumerate(configs):
        tf_s, torch_s = results["tensorflow"][n], results["torch"][n]
        print(f"| {tokens} | {dtype} | {tf_s * 1e3:.1f} | {torch_s * 1e3:.1f} | {tf_s / torch_s:.2f} | "
              f"{tokens * flops / tf_s / 1e9:.1f} | {tokens * flops / torch_s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
