"""Recompute (gradient checkpointing): activation memory and step time.

    KERAS_BACKEND=tensorflow python benchmarks/bench_recompute.py [--layers 12] [--length 512] \
        [--batch 4] [--modes off,full,attention]

Modes: off; full (`recompute=True`: each transformer block is one
`RecomputedBlock` that keeps only its inputs for the backward pass);
attention (`recompute='attention'`: only the attention core, scores to
weighted sum, is recomputed).

A BERT-base-size encoder (hidden 768, 12 heads, intermediate 3072, vocab
21128), dropout 0.1, one training step (forward + backward of an MLM-style
loss, no optimizer); each mode in its own process. Memory:

- TensorFlow: the allocator's exact peak of bytes in use during the step,
  above what was held before it (weights); minus the gradients (one float32
  per trainable weight, held in every mode) that leaves the activations and
  temporaries, which is what recompute shrinks.
- JAX: the compiled step's memory analysis (temporary buffers; the weights
  and gradients are arguments and outputs, not temporaries).
- Both: the process's peak RSS growth over the step, a coarser figure.

Step time is the median of --repeats runs.
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

    def run():
        step(token_ids)

    def peak_bytes():
        # bert4keras turns TensorFlow's BFC allocator on (bert4keras/__init__.py),
        # which counts the bytes in use exactly: the step's peak above what was
        # held before it (the weights), not the process RSS.
        held = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        run()
        return tf.config.experimental.get_memory_info("CPU:0")["peak"] - held

    return run, peak_bytes  # measured after the RSS figure (it runs the step again)


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
    if callable(temp):
        temp = temp()
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
    # The gradients (one float32 per trainable weight) are held in every mode:
    # what recompute can shrink is the rest, the activations.
    model = build(False, args)
    gradient_bytes = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
    source = "XLA temp buffers" if keras.backend.backend() == "jax" else "allocator peak over the step"
    print(f"gradients: {gradient_bytes / 2**20:.0f} MiB")
    print(f"| recompute | {source} | of which not gradients | peak RSS growth | step time | vs off |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = results.get("off")
    for mode, (temp, seconds, peak) in results.items():
        memory = f"{temp / 2**20:.0f} MiB" if temp is not None else "n/a"
        activations = None
        if temp is not None:
            # XLA's temp buffers exclude the gradients (outputs); the allocator peak includes them.
            activations = temp if keras.backend.backend() == "jax" else temp - gradient_bytes
        versus = ""
        if base and mode != "off":
            base_activations = base[0] if keras.backend.backend() == "jax" else base[0] - gradient_bytes
            if activations:
                versus = f"{base_activations / activations:.2f}x less activation memory, "
            versus += f"{100 * (seconds / base[1] - 1):+.0f}% time"
        shown = f"{activations / 2**20:.0f} MiB" if activations is not None else "n/a"
        print(f"| {mode} | {memory} | {shown} | {peak:.0f} MiB | {seconds:.2f} s | {versus} |")

if __name__ == "__main__":
    main()
