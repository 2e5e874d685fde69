"""One AdamW update over BERT-base's weights: bert4keras, Keras, PyTorch.

    python benchmarks/bench_optimizer.py
    python benchmarks/bench_optimizer.py --layers 2 --calls 5

The optimizer alone, without the model's forward and backward: the weights of
a BERT-base-size encoder (110M parameters, the shapes bert4keras builds),
random dense gradients, and one `apply` per timed call (TensorFlow inside a
`tf.function`, as `fit` and `train_on_batch` run it; PyTorch's
`optimizer.step()`). Candidates:

  bert4keras AdamW   bert4keras.optimizers.AdamW (TF's fused Adam kernel)
  bert4keras Adam    the same without weight decay
  Keras AdamW        keras.optimizers.AdamW (op-by-op step)
  torch AdamW        torch.optim.AdamW as constructed by default, and with
                     foreach=True and fused=True

All with lr 2e-5 and weight decay 0.01 on every weight. Prints a markdown
table of milliseconds per update (median) and the memory traffic rate that
implies for a one-pass update (read weight, gradient and two moments, write
weight and moments: 28 bytes per fp32 weight).
"""
import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def bert_base_shapes(layers):
    import keras

    from bert4keras import build_transformer_model

    keras.utils.set_random_seed(0)
    model = build_transformer_model(
        vocab_size=30522, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
        intermediate_size=3072, max_position=512,
    )
    return [tuple(v.shape) for v in model.trainable_variables]


def time_calls(fn, warmup, calls):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def keras_step(optimizer, shapes):
    import keras
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(0, 0.02, s).astype("float32")) for s in shapes]
    grads = [tf.constant(rng.normal(0, 1e-3, s).astype("float32")) for s in shapes]
    optimizer.build(variables)
    # A tf.function call on the CPU returns once its ops have run.
    return tf.function(lambda: optimizer.apply(grads, variables))


def torch_step(shapes, **kwargs):
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    params = [torch.nn.Parameter(torch.from_numpy(rng.normal(0, 0.02, s).astype("float32")))
              for s in shapes]
    for p in params:
        p.grad = torch.from_numpy(rng.normal(0, 1e-3, p.shape).astype("float32"))
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01, **kwargs)
    return optimizer.step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all candidates")
    args = parser.parse_args()

    import keras
    import numpy as np

    from bert4keras import optimizers as bo

    shapes = bert_base_shapes(args.layers)
    params = sum(int(np.prod(s)) for s in shapes)
    candidates = {
        "bert4keras AdamW (TF)": lambda: keras_step(bo.AdamW(2e-5, weight_decay_rate=0.01), shapes),
        "bert4keras Adam, no decay (TF)": lambda: keras_step(bo.Adam(2e-5), shapes),
        "Keras AdamW (TF)": lambda: keras_step(keras.optimizers.AdamW(2e-5, weight_decay=0.01), shapes),
        "torch AdamW (default)": lambda: torch_step(shapes),
        "torch AdamW foreach=True": lambda: torch_step(shapes, foreach=True),
        "torch AdamW fused=True": lambda: torch_step(shapes, fused=True),
    }
    results = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, build in candidates.items():
            step = build()
            results[name].append(time_calls(step, args.warmup, args.calls))
            del step
    print(f"{args.layers} layers, {params / 1e6:.1f}M weights; median of {args.rounds} rounds "
          f"x {args.calls} calls\n")
    print("| optimizer | ms per update | GB/s at 28 bytes per weight | vs Keras AdamW |")
    print("| --- | ---: | ---: | ---: |")
    keras_ms = sorted(results["Keras AdamW (TF)"])[args.rounds // 2] * 1e3
    for name, times in results.items():
        ms = sorted(times)[args.rounds // 2] * 1e3
        print(f"| {name} | {ms:.1f} | {28 * params / ms / 1e6:.1f} | {keras_ms / ms:.2f}x |")


if __name__ == "__main__":
    main()
