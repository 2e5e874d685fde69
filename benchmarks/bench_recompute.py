"""Recompute (gradient checkpointing): activation memory and step time.

    KERAS_BACKEND=jax python benchmarks/bench_recompute.py [--layers 12] [--length 512] [--batch 4] \
        [--modes off,full,attention]

Modes: off; full (`recompute=True`: every attention and feed-forward layer
keeps only its inputs); attention (`recompute='attention'`: only the
attention core, scores to weighted sum, is recomputed).

A BERT-base-size encoder (hidden 768, 12 heads, intermediate 3072, vocab
21128), dropout 0.1, one training step (forward + backward of an MLM-style
loss, no optimizer). On JAX the compiled step's memory analysis gives the
temporary buffer size deterministically (that is the activation memory: the
weights and gradients are arguments and outputs, not temporaries); step time
is the median of a few runs. Each setting also runs in its own process and
reports that process's peak RSS growth over the step (TF and JAX), since XLA
on CPU has been seen to report the same temp size with and without remat.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bert4keras import build_transformer_model  # noqa: E402


MODES = {"off": False, "full": True, "attention": "attention"}


def build(recompute, args):
    keras.utils.set_random_seed(0)
    return build_transformer_model(
        vocab_size=21128, hidden_size=768, num_hidden_layers=args.layers, num_attention_heads=12,
        intermediate_size=3072, max_position=512, dropout_rate=0.1, attention_dropout_rate=0.1,
        with_mlm="linear", recompute=recompute,
    )


def jax_step(model, token_ids):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_fn(tv, ntv, ids):
        logits, ntv = model.stateless_call(tv, ntv, [ids, jnp.zeros_like(ids)], training=True)
        logp = jax.nn.log_softmax(logits.astype("float32"))
        return -jnp.take_along_axis(logp, ids[..., None], axis=-1).mean(), ntv

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    compiled = step.lower(trainable, non_trainable, token_ids).compile()
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None)

    def run():
        (loss, _), grads = compiled(trainable, non_trainable, token_ids)
        jax.block_until_ready(grads)

    return run, temp


def tf_step(model, token_ids):
    import tensorflow as tf

    @tf.function
    def step(ids):
        with tf.GradientTape() as tape:
            logits = model([ids, tf.zeros_like(ids)], training=True)
            loss = tf.reduce_mean(
                tf.keras.losses.sparse_categorical_crossentropy(ids, logits, from_logits=True)
            )
        return tape.gradient(loss, model.trainable_variables)

    return (lambda: step(token_ids)), None


def measure(recompute, args):
    """One setting in this process: (temp bytes or None, median seconds, peak RSS growth MiB)."""
    token_ids = np.random.default_rng(0).integers(1, 21128, size=(args.batch, args.length)).astype("int32")
    model = build(recompute, args)
    make = jax_step if keras.backend.backend() == "jax" else tf_step
    run, temp = make(model, token_ids)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()  # warm-up (and compilation)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return temp, statistics.median(times), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="off,full,attention",
                        help="comma separated: off, full (recompute=True), attention (recompute='attention')")
    parser.add_argument("--one", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(MODES[args.one], args)))
        return
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} cores, layers {args.layers}, "
          f"batch {args.batch}, length {args.length}")
    results = {}
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--one", mode, "--layers", str(args.layers),
                   "--length", str(args.length), "--batch", str(args.batch), "--repeats", str(args.repeats)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    print("| recompute | XLA temp buffers | peak RSS growth | step time | vs off |")
    print("| --- | --- | --- | --- | --- |")
    base = results.get("off")
    for mode, (temp, seconds, peak) in results.items():
        memory = f"{temp / 2**20:.0f} MiB" if temp is not None else "n/a"
        versus = f"{base[2] / max(peak, 1):.2f}x less memory, {100 * (seconds / base[1] - 1):+.0f}% time" if base else ""
        print(f"| {mode} | {memory} | {peak:.0f} MiB | {seconds:.2f} s | {versus} |")

if __name__ == "__main__":
    main()
