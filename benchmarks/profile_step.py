"""Where the time of one encoder call goes, per op type, next to the peers.

    python benchmarks/profile_step.py --task infer --batch 1 --dtype bf16
    python benchmarks/profile_step.py --task train --batch 8 --dtype fp32 --libraries bert4keras,keras_hub

The same BERT-base-size models and calls as bench_encoder.py (random weights,
`predict_on_batch` / `train_on_batch` for the Keras libraries on TensorFlow,
`torch.inference_mode()` or backward + AdamW for HF transformers), profiled
over `--calls` calls after `--warmup` untimed ones: TensorFlow through its
profiler (op self-times read from the trace with the `xprof` package, `pip
install xprof --no-deps`), PyTorch through `torch.profiler` (self CPU time
per aten op). Each library runs in its own process, one after the other.

Prints, per library, milliseconds per call by op type (largest first) and
the share of the profiled time spent in matrix products. The op names are
each framework's own (TensorFlow `_FusedMatMul`, `BatchMatMulV2`, `Cast`;
PyTorch `aten::addmm`, `aten::bmm`, `aten::_to_copy`), so compare the
categories, not the names.
"""
import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def is_matmul(op_type):
    """TensorFlow (_Fused)MatMul, BatchMatMulV2, Einsum; PyTorch aten::mm, addmm, bmm, matmul, linear."""
    name = op_type.lower().split("::")[-1]
    return name == "mm" or any(word in name for word in ("matmul", "addmm", "bmm", "einsum", "linear"))


def profile_tensorflow(fn, calls, by_name=False):
    """Self time (us) per TensorFlow op type (or type and name) over `calls` calls of `fn`."""
    import tensorflow as tf
    from xprof.convert import raw_to_tool_data

    logdir = tempfile.mkdtemp(prefix="profile_step_")
    tf.profiler.experimental.start(logdir)
    for _ in range(calls):
        fn()
    tf.profiler.experimental.stop()
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"the TensorFlow profiler wrote no .xplane.pb under {logdir}")
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "framework_op_stats", {})
    tables = json.loads(data)
    table = tables[0] if isinstance(tables, list) else tables
    columns = [c["label"] for c in table["cols"]]
    type_col, self_col = columns.index("Operation Type"), columns.index("Total self-time (us)")
    name_col = columns.index("Operation Name")
    host_col = columns.index("Host/device") if "Host/device" in columns else None
    times = collections.Counter()
    for row in table["rows"]:
        cells = [c["v"] if c is not None else None for c in row["c"]]
        if (host_col is not None and cells[host_col] != "Host") or cells[type_col] == "IDLE":
            continue
        # by name, layer numbers folded: one row per kind of product across the layers
        key = f"{cells[type_col]} {re.sub(r'[0-9]+', 'N', cells[name_col])}" if by_name else cells[type_col]
        times[key] += float(cells[self_col])
    return times


def profile_torch(fn, calls, by_name=False):
    """Self CPU time (us) per aten op over `calls` calls of `fn`."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    times = collections.Counter()
    for event in prof.key_averages():
        times[event.key] += event.self_cpu_time_total
    return times


def worker(args):
    from bench_encoder import Worker

    backend = "torch" if args.library == "hf" else "tensorflow"
    w = Worker(args.library, backend, args.layers, args.dropout, 0)
    fn = w.step_fn(args.task, args.batch, args.seq, args.dtype)
    for _ in range(args.warmup):
        fn()
    start = time.perf_counter()
    for _ in range(args.calls):
        fn()
    wall = (time.perf_counter() - start) / args.calls
    profile = profile_torch if args.library == "hf" else profile_tensorflow
    times = profile(fn, args.calls, by_name=args.by_name)
    print(json.dumps({"wall_ms": wall * 1e3, "op_ms": {k: v / 1e3 / args.calls for k, v in times.items()}}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--libraries", default="bert4keras,keras_hub,hf",
                        help="of bert4keras, keras_hub (both on TensorFlow) and hf (PyTorch)")
    parser.add_argument("--task", choices=["infer", "train"], default="infer")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "bf16w"], default="fp32")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="op types listed per library")
    parser.add_argument("--by-name", action="store_true",
                        help="TensorFlow: one row per op type and name (layer numbers folded to N), "
                             "to compare, say, each layer's products")
    parser.add_argument("--library", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.library:
        worker(args)
        return
    print(f"# profile_step: {args.task}, batch {args.batch}, seq {args.seq}, {args.dtype}, "
          f"{args.layers} layers, {args.calls} profiled calls\n")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    for library in args.libraries.split(","):
        if library not in ("bert4keras", "keras_hub", "hf"):
            parser.error(f"unknown library {library!r}; valid: bert4keras, keras_hub, hf")
        command = [sys.executable, os.path.abspath(__file__), "--library", library] + [
            f"--{k}={getattr(args, k)}" for k in ("task", "batch", "seq", "dtype", "layers", "dropout", "warmup", "calls")
        ] + (["--by-name"] if args.by_name else [])
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"{library}: failed (exit {done.returncode})\n{done.stderr[-2000:]}")
            continue
        result = json.loads(lines[-1])
        op_ms = collections.Counter(result["op_ms"])
        total = sum(op_ms.values())
        matmul = sum(v for k, v in op_ms.items() if is_matmul(k))
        print(f"## {library}: {result['wall_ms']:.1f} ms per call unprofiled; profiled op self-time "
              f"{total:.1f} ms per call, {matmul / total:.0%} of it in matrix products\n")
        label = "op type and name" if args.by_name else "op type"
        print(f"| {label} | ms per call | share |\n| --- | ---: | ---: |")
        for name, ms in op_ms.most_common(args.top):
            print(f"| {name} | {ms:.2f} | {ms / total:.1%} |")
        rest = total - sum(ms for _, ms in op_ms.most_common(args.top))
        print(f"| (other {max(len(op_ms) - args.top, 0)} rows) | {rest:.2f} | {rest / total:.1%} |\n")


if __name__ == "__main__":
    main()
