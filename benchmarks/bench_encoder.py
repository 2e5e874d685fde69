"""Encoder speed against KerasHub and HF transformers, in one run.

    python benchmarks/bench_encoder.py                 # everything (~20 min on 2 cores)
    python benchmarks/bench_encoder.py --quick         # a small subset (~5 min)
    python benchmarks/bench_encoder.py --tasks infer --seqs 128 --batches 8 \
        --dtypes fp32,bf16 --candidates bert4keras/tensorflow,hf/torch

Measures, for a BERT-base-size encoder with random weights (hidden 768, 12
layers, 12 heads, intermediate 3072, vocabulary 30522):

  gemm   the machine's attainable matmul rate: large GEMMs (square, and the
         feed-forward's 4096 x 768 x 3072) in every framework taking part,
         fp32 and bf16; the best rate of each dtype is "the limit";
  infer  encoder inference throughput (sequences/s) per sequence length,
         batch size and dtype: last hidden states of full-length inputs;
  train  one fine-tuning step: forward + backward + AdamW on a 2-class head
         over the pooled [CLS] output, dropout 0.1, as each library trains
         (bert4keras.optimizers.AdamW, keras.optimizers.AdamW for KerasHub,
         torch.optim.AdamW; lr 2e-5, weight decay 0.01 on every weight).

Candidates are library/backend pairs: bert4keras/{tensorflow,jax},
keras_hub/{tensorflow,jax} and hf/torch. Each runs in its own worker process
(a Keras backend is fixed per process); the driver measures one
configuration on every candidate in turn and repeats that round, so load
from other jobs falls on all candidates alike. A figure is the median over
all timed calls of all rounds. `--sequential` runs the candidates one after
the other instead (one worker alive at a time), for sizes where several
models do not fit in memory together. Keras models run as users run them
(`predict_on_batch`, `train_on_batch` after `compile`), HF models under
`torch.inference_mode()` or with `loss.backward()` and `torch.optim.AdamW`;
bf16 is Keras's `mixed_bfloat16` policy and `torch.autocast('cpu',
torch.bfloat16)`.

FLOPs per sequence of length L (forward): layers * L * (24 h^2 + 4 L h), the
matmuls of the projections, the feed-forward and the attention; a training
step counts three times that. "of limit" is achieved FLOP/s over the measured
GEMM rate of the same dtype.

Prints markdown tables; `--json PATH` also saves the raw numbers.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HIDDEN, HEADS, INTERMEDIATE, VOCAB, MAX_POSITION = 768, 12, 3072, 30522, 512
ALL_CANDIDATES = ["bert4keras/tensorflow", "bert4keras/jax", "keras_hub/tensorflow", "keras_hub/jax", "hf/torch"]
OURS = "bert4keras"


# ---------------------------------------------------------------------------
# Worker side: one library on one backend, driven by JSON lines on stdin.
# ---------------------------------------------------------------------------


class Worker:
    """Builds models lazily (one per task and dtype) and times calls."""

    def __init__(self, library, backend, layers, dropout, threads):
        self.library, self.backend, self.layers, self.dropout = library, backend, layers, dropout
        self.models = {}
        if threads:  # before any framework starts its thread pools
            os.environ["OMP_NUM_THREADS"] = str(threads)
            if backend == "jax" and threads == 1:
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                           " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        if library == "hf":
            import torch

            if threads:
                torch.set_num_threads(threads)
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            return
        os.environ["KERAS_BACKEND"] = backend
        import keras  # noqa: F401  (fixes the backend now)

        if backend == "tensorflow" and threads:
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)

    # -- models ---------------------------------------------------------

    def model(self, task, dtype):
        key = (task, dtype)
        if key not in self.models:
            self.models.clear()  # one model at a time keeps memory bounded
            self.models[key] = self._build_hf(task, dtype) if self.library == "hf" else self._build_keras(task, dtype)
        return self.models[key]

    def _build_keras(self, task, dtype):
        import keras

        keras.config.set_dtype_policy({"bf16": "mixed_bfloat16", "bf16w": "bfloat16"}.get(dtype, "float32"))
        keras.utils.set_random_seed(0)
        train = task == "train"
        if self.library == OURS:
            from bert4keras import build_transformer_model

            encoder = build_transformer_model(
                vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=self.layers,
                num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, max_position=MAX_POSITION,
                dropout_rate=self.dropout if train else 0.0,
                attention_dropout_rate=self.dropout if train else 0.0, with_pool=train,
            )
            if train:  # the usual bert4keras classifier: Dropout + Dense on the pooled [CLS]
                x = keras.layers.Dropout(self.dropout)(encoder.output)
                logits = keras.layers.Dense(2, dtype="float32")(x)
                model = keras.Model(encoder.inputs, logits)
            else:
                model = encoder
        else:
            import keras_hub

            backbone = keras_hub.models.BertBackbone(
                vocabulary_size=VOCAB, num_layers=self.layers, num_heads=HEADS, hidden_dim=HIDDEN,
                intermediate_dim=INTERMEDIATE, max_sequence_length=MAX_POSITION,
                dropout=self.dropout if train else 0.0,
            )
            if train:
                model = keras_hub.models.BertTextClassifier(
                    backbone, num_classes=2, preprocessor=None, dropout=self.dropout
                )
            else:
                model = backbone
        if train:
            if self.library == OURS:  # each library's own AdamW, same hyperparameters
                from bert4keras.optimizers import AdamW

                optimizer = AdamW(2e-5, weight_decay_rate=0.01)
            else:
                optimizer = keras.optimizers.AdamW(2e-5, weight_decay=0.01)
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        keras.config.set_dtype_policy("float32")
        return model

    def _build_hf(self, task, dtype):
        import torch
        import transformers

        torch.manual_seed(0)
        p = self.dropout if task == "train" else 0.0
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=self.layers, num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POSITION,
            hidden_dropout_prob=p, attention_probs_dropout_prob=p, num_labels=2,
        )
        if task == "train":
            model = transformers.BertForSequenceClassification(config).to(self.device).train()
            model.optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
        else:
            model = transformers.BertModel(config).to(self.device).eval()
            if dtype == "bf16w":
                model = model.to(torch.bfloat16)
        return model

    def synchronize(self):
        """Waits for PyTorch's queued GPU work (CUDA calls return before it is done)."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    # -- inputs ---------------------------------------------------------

    def inputs(self, batch, seq, seed=0):
        import numpy as np

        rng = np.random.default_rng(seed)
        token_ids = rng.integers(1, VOCAB, size=(batch, seq)).astype("int32")
        segment_ids = np.zeros_like(token_ids)
        labels = rng.integers(0, 2, size=(batch,)).astype("int32")
        if self.library == OURS:
            return [token_ids, segment_ids], labels
        if self.library == "keras_hub":
            return {"token_ids": token_ids, "segment_ids": segment_ids,
                    "padding_mask": np.ones_like(token_ids)}, labels
        import torch

        return {
            "input_ids": torch.from_numpy(token_ids.astype("int64")).to(self.device),
            "token_type_ids": torch.from_numpy(segment_ids.astype("int64")).to(self.device),
            "attention_mask": torch.ones(batch, seq, dtype=torch.int64, device=self.device),
        }, torch.from_numpy(labels.astype("int64")).to(self.device)

    # -- timed calls ----------------------------------------------------

    def step_fn(self, task, batch, seq, dtype):
        model = self.model(task, dtype)
        x, y = self.inputs(batch, seq)
        if self.library != "hf":
            if task == "infer":
                return lambda: model.predict_on_batch(x)
            return lambda: model.train_on_batch(x, y)
        import torch

        autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=dtype == "bf16")
        if task == "infer":
            def run():
                with torch.inference_mode(), autocast:
                    out = model(**x).last_hidden_state
                self.synchronize()  # Keras calls return host arrays: time the work to the end
                return out
            return run

        def train():
            model.optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(**x, labels=y).loss
            loss.backward()
            model.optimizer.step()
            return loss.item()
        return train

    def time_calls(self, fn, warmup, min_time, max_calls):
        for _ in range(warmup):
            fn()
        times, cpu, start = [], [], time.perf_counter()
        while len(times) < max_calls and (not times or time.perf_counter() - start < min_time):
            t, c = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return {"times": times, "cpu": cpu}

    def gemm(self, shape, dtype, calls):
        """Timings of one (m, k) x (k, n) matmul (fp32, or bf16 in and out)."""
        m, k, n = shape
        if self.library == "hf":
            import torch

            t = torch.bfloat16 if dtype == "bf16" else torch.float32
            a, b = torch.randn(m, k).to(self.device, t), torch.randn(k, n).to(self.device, t)

            def product():
                out = torch.matmul(a, b)
                self.synchronize()
                return out
            return self.time_calls(product, 1, 0.0, calls)
        import numpy as np

        a, b = np.random.rand(m, k).astype("float32"), np.random.rand(k, n).astype("float32")
        if self.backend == "jax":
            import jax
            import jax.numpy as jnp

            t = jnp.bfloat16 if dtype == "bf16" else jnp.float32
            a, b = jnp.asarray(a, t), jnp.asarray(b, t)
            # bf16 with float32 accumulation: XLA:CPU's fast bf16 kernels (plain bf16 is 2.7x slower)
            f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(t))
            return self.time_calls(lambda: f(a, b).block_until_ready(), 1, 0.0, calls)
        import tensorflow as tf

        t = tf.bfloat16 if dtype == "bf16" else tf.float32
        a, b = tf.cast(a, t), tf.cast(b, t)
        f = tf.function(tf.matmul)
        return self.time_calls(lambda: f(a, b).numpy(), 1, 0.0, calls)

    def bf16_error(self, batch, seq, dtype="bf16"):
        """Max and mean |`dtype` - fp32| of the last hidden states, same weights."""
        import numpy as np

        fp32, x = self.model("infer", "fp32"), self.inputs(batch, seq, seed=1)[0]
        weights = fp32.get_weights()
        reference = np.asarray(fp32.predict_on_batch(x), "float32")
        bf16 = self.model("infer", dtype)
        bf16.set_weights(weights)
        out = np.asarray(bf16.predict_on_batch(x), "float32")
        diff = np.abs(out - reference)
        return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                "ref_mean_abs": float(np.abs(reference).mean())}

    def handle(self, request):
        op = request["op"]
        if op == "gemm":
            return self.gemm(request["shape"], request["dtype"], request["calls"])
        if op == "bf16_error":
            return self.bf16_error(request["batch"], request["seq"], request.get("dtype", "bf16"))
        if op == "versions":
            return versions(self.library, self.backend)
        fn = self.step_fn(op, request["batch"], request["seq"], request["dtype"])
        return self.time_calls(fn, request["warmup"], request["min_time"], request["max_calls"])


def versions(library, backend):
    import importlib.metadata as md

    names = {"hf": ["torch", "transformers"], "keras_hub": ["keras", "keras-hub"], OURS: ["keras"]}[library]
    if backend == "tensorflow":
        names.append("tensorflow")
    if backend == "jax":
        names += ["jax", "jaxlib"]
    return {name: md.version(name) for name in names}


def worker_main(candidate, layers, dropout, threads):
    # Protocol on a private copy of stdout; anything libraries print goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    library, backend = candidate.split("/")
    worker = Worker(library, backend, layers, dropout, threads)
    channel.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = worker.handle(request)
        except Exception as error:  # report, keep serving the other configurations
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(error).__name__}: {error}"[:300]}
        channel.write(json.dumps(reply) + "\n")


# ---------------------------------------------------------------------------
# Driver side.
# ---------------------------------------------------------------------------


class WorkerProcess:
    def __init__(self, candidate, args):
        self.candidate = candidate
        self.log = tempfile.NamedTemporaryFile("w+", prefix=candidate.replace("/", "_") + "_", suffix=".log",
                                               delete=False)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        command = [sys.executable, os.path.abspath(__file__), "--worker", candidate,
                   "--layers", str(args.layers), "--dropout", str(args.dropout), "--threads", str(args.threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, env=env)
        self.dead = False
        self.read()  # wait until the framework is imported

    def read(self):
        line = self.process.stdout.readline()
        if not line:
            self.dead = True
            self.log.flush()
            with open(self.log.name) as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"worker {self.candidate} died; log {self.log.name}:\n{tail}")
        return json.loads(line)

    def ask(self, **request):
        if self.dead:
            return {"error": "worker died earlier"}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        try:
            return self.read()
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return {"error": "worker died (out of memory?)"}

    def close(self):
        if not self.dead:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def forward_flops(layers, seq):
    """Matmul FLOPs of one sequence through the encoder (forward)."""
    return layers * seq * (24 * HIDDEN**2 + 4 * seq * HIDDEN)


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def gpu_names():
    """', '-joined GPU names from nvidia-smi, or '' where there is none."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    return ", ".join(line.split(":", 1)[1].split("(")[0].strip() for line in listed.splitlines() if ":" in line)


def cpu_name():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_rounds(workers, request, repeats, results, key):
    """`repeats` rounds over all workers; all timed calls are kept per candidate."""
    loads = []
    for _ in range(repeats):
        for worker in workers:
            loads.append(load_average())
            reply = worker.ask(**request)
            entry = results.setdefault(key + (worker.candidate,), {"times": [], "cpu": []})
            if "error" in reply:
                entry["error"] = reply["error"]
            else:
                entry["times"] += reply["times"]
                entry["cpu"] += reply["cpu"]
            time.sleep(0.2)  # let the previous worker's spinning threads settle
    return statistics.median(loads)


CLOCK = "times"  # or "cpu": process CPU seconds, robust to other jobs' load with --threads 1


def summarize(entry):
    if not entry.get(CLOCK):
        return None
    return statistics.median(entry[CLOCK])


def fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def best_of(results, key, candidates, library):
    """(seconds, candidate) of the fastest backend of `library` for `key`."""
    options = [(summarize(results.get(key + (c,), {})), c) for c in candidates if c.startswith(library + "/")]
    options = [(t, c) for t, c in options if t is not None]
    return min(options) if options else (None, None)


def print_gemm(results, candidates, shapes):
    print("\n### Matmul limit (GFLOP/s, median; m x k x n)\n")
    columns = [(shape, dtype) for dtype in ("fp32", "bf16") for shape in shapes]
    print("| candidate | " + " | ".join(f"{'x'.join(map(str, s))} {d}" for s, d in columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    limits, best = {}, {}
    for c in candidates:
        row = []
        for shape, dtype in columns:
            t = summarize(results.get(("gemm", dtype, tuple(shape), c), {}))
            rate = None if t is None else 2 * np.prod(shape, dtype=float) / t / 1e9
            if rate is not None and rate > limits.get(dtype, 0.0):
                limits[dtype], best[dtype] = rate, c
            row.append(fmt(rate))
        print(f"| {c} | {' | '.join(row)} |")
    print("\nLimit (best of all): " + ", ".join(f"{d} {fmt(v)} GFLOP/s ({best[d]})" for d, v in limits.items()))
    return limits


def print_task(task, results, candidates, configs, limits, layers, loads):
    title = {"infer": "Inference throughput (sequences/s, median)",
             "train": "Training step (sequences/s, median; forward + backward + AdamW)"}[task]
    libraries = [lib for lib in (OURS, "keras_hub", "hf") if any(c.startswith(lib + "/") for c in candidates)]
    print(f"\n### {title}\n")
    header = ["seq", "batch", "dtype"] + candidates
    if OURS in libraries and len(libraries) > 1:
        header += ["ours / best other", f"{OURS} TFLOP/s", "of limit"]
    header.append("load")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * 3 + " ---: |" * (len(header) - 3))
    factor = 1 if task == "infer" else 3
    for seq, batch, dtype in configs:
        key = (task, seq, batch, dtype)
        row = [str(seq), str(batch), dtype]
        for c in candidates:
            entry = results.get(key + (c,), {})
            t = summarize(entry)
            row.append("error" if t is None and "error" in entry else fmt(None if t is None else batch / t))
        if OURS in libraries and len(libraries) > 1:
            ours, _ = best_of(results, key, candidates, OURS)
            others = [best_of(results, key, candidates, lib)[0] for lib in libraries if lib != OURS]
            others = [t for t in others if t is not None]
            ratio = None if ours is None or not others else min(others) / ours
            tflops = None if ours is None else factor * batch * forward_flops(layers, seq) / ours / 1e12
            limit = limits.get("bf16" if dtype == "bf16w" else dtype)
            row += [fmt(ratio, 2) + ("x" if ratio else ""), fmt(tflops, 3),
                    "-" if tflops is None or not limit else f"{100 * tflops * 1e3 / limit:.0f}%"]
        row.append(fmt(loads.get(key), 1))
        print("| " + " | ".join(row) + " |")


def task_configs(task, dtypes, seqs, batches, args):
    configs = []
    for dtype in dtypes:  # dtype outermost: each worker rebuilds its model rarely
        for seq in seqs:
            for batch in batches:
                if task == "train" and dtype == "bf16w":
                    continue  # bf16 weights are an inference setting
                if task == "train" and batch * seq > args.max_train_tokens:
                    print(f"(skipping train {batch} x {seq}: over --max-train-tokens)", flush=True)
                    continue
                configs.append((seq, batch, dtype))
    return configs


def measure(workers, args, tasks, dtypes, shapes, configs, results, loads, bf16_errors):
    """Time every requested configuration on `workers`, into `results` and `loads`."""
    if "gemm" in tasks:
        for dtype in ("fp32", "bf16"):
            for shape in shapes:
                key = ("gemm", dtype, shape)
                load = measure_rounds(workers, {"op": "gemm", "shape": shape, "dtype": dtype, "calls": 3},
                                      args.repeats, results, key)
                loads[key] = max(load, loads.get(key, 0.0))  # the worst over --sequential's groups
    for task, task_list in configs.items():
        for seq, batch, dtype in task_list:
            key = (task, seq, batch, dtype)
            request = {"op": task, "seq": seq, "batch": batch, "dtype": dtype, "warmup": args.warmup,
                       "min_time": args.min_time, "max_calls": args.max_calls}
            load = measure_rounds(workers, request, args.repeats, results, key)
            loads[key] = max(load, loads.get(key, 0.0))
            times = {w.candidate: summarize(results.get(key + (w.candidate,), {})) for w in workers}
            print(f"  {task} seq {seq} batch {batch} {dtype}: "
                  + ", ".join(f"{c} {fmt(None if t is None else batch / t)}/s" for c, t in times.items()),
                  flush=True)
    if args.bf16_check:
        for w in [w for w in workers if w.candidate.startswith(OURS + "/")]:
            for dtype in [d for d in dtypes if d != "fp32"] or ["bf16"]:
                e = w.ask(op="bf16_error", batch=8, seq=128, dtype=dtype)
                if "error" in e:
                    bf16_errors.append(f"- {w.candidate} {dtype}: error {e['error']}")
                else:
                    bf16_errors.append(f"- {w.candidate} {dtype}: max |diff| {e['max_abs']:.4f}, mean |diff| "
                                       f"{e['mean_abs']:.5f} (mean |fp32| {e['ref_mean_abs']:.3f})")


def parse_list(text, cast=str):
    return [cast(x) for x in text.split(",") if x]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default=",".join(ALL_CANDIDATES),
                        help="library/backend pairs, comma separated (default: all five)")
    parser.add_argument("--tasks", default="gemm,infer,train")
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtypes", default="fp32,bf16",
                        help="fp32; bf16 = mixed precision (Keras mixed_bfloat16, torch.autocast); bf16w = "
                             "inference with the weights stored in bf16 (Keras 'bfloat16' policy, "
                             "model.to(torch.bfloat16)), which saves casting every weight on every call")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dropout", type=float, default=0.1, help="training dropout (hidden and attention)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all candidates per configuration")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per round")
    parser.add_argument("--max-calls", type=int, default=5, help="timed calls per round at most")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls per round (the first round's compiles)")
    parser.add_argument("--max-train-tokens", type=int, default=4096,
                        help="skip training configs with more tokens per batch (memory: activations of "
                             "BERT-base at 32 x 512 need ~20 GB in fp32)")
    parser.add_argument("--gemm-sizes", default="2048,4096",
                        help="square GEMM sizes; a 4096 x 768 x 3072 product is always added")
    parser.add_argument("--bf16-check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare bf16 and fp32 last hidden states of bert4keras (8 x 128)")
    parser.add_argument("--quick", action="store_true",
                        help="seq 128, batch 1 and 8, repeats 2: a few minutes")
    parser.add_argument("--json", help="also write the raw timings here")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per framework (0: the framework's default, all cores)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="tabulate wall-clock seconds, or process CPU seconds (with --threads 1 this "
                             "is nearly independent of other jobs on the machine)")
    parser.add_argument("--sequential", action="store_true",
                        help="run the candidates one after the other, each worker closed before the next "
                             "starts, instead of in turn per configuration: less memory (one model at a "
                             "time), but load from other jobs no longer falls on all alike")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.layers, args.dropout, args.threads)
        return
    global CLOCK
    CLOCK = "times" if args.clock == "wall" else "cpu"
    if args.quick:
        args.seqs, args.batches, args.repeats, args.gemm_sizes = "128", "1,8", 2, "2048"
    candidates = parse_list(args.candidates)
    unknown = [c for c in candidates if c not in ALL_CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {unknown}; valid: {', '.join(ALL_CANDIDATES)}")
    tasks, dtypes = parse_list(args.tasks), parse_list(args.dtypes)
    seqs, batches = parse_list(args.seqs, int), parse_list(args.batches, int)

    started = time.time()
    gpus = gpu_names()
    print(f"# bench_encoder — {datetime.datetime.now():%Y-%m-%d %H:%M}, {cpu_name()}, "
          + (f"GPU {gpus}, " if gpus else "") +
          f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
          f"load average at start {load_average():.1f}; threads {args.threads or 'default'}, clock {args.clock}", flush=True)
    configs = {task: task_configs(task, dtypes, seqs, batches, args) for task in ("infer", "train") if task in tasks}
    shapes = [(n, n, n) for n in parse_list(args.gemm_sizes, int)]
    shapes.append((4096, HIDDEN, INTERMEDIATE))  # the feed-forward's first product at 32 x 128 tokens
    # Together, every configuration is timed on all candidates in turn; with
    # --sequential each candidate runs alone, its worker closed before the
    # next starts (memory: one model and allocator pool at a time).
    groups = [[c] for c in candidates] if args.sequential else [candidates]
    results, loads, all_versions, bf16_errors, measured = {}, {}, {}, [], []
    for group in groups:
        workers = []
        for c in group:
            try:
                workers.append(WorkerProcess(c, args))
            except RuntimeError as error:
                print(f"skipping {c}: {error}", file=sys.stderr)
        for w in workers:
            all_versions.update(w.ask(op="versions"))
        measure(workers, args, tasks, dtypes, shapes, configs, results, loads, bf16_errors)
        measured += [w.candidate for w in workers]
        for w in workers:
            w.close()
    candidates = [c for c in candidates if c in measured]
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(all_versions.items())), flush=True)
    limits = print_gemm(results, candidates, shapes) if "gemm" in tasks else {}
    for task, task_list in configs.items():
        print_task(task, results, candidates, task_list, limits, args.layers, loads)
    if bf16_errors:
        print("\n### bf16 vs fp32 last hidden states (bert4keras, 8 x 128, same weights)\n")
        print("\n".join(bf16_errors))
    print(f"\nTotal {time.time() - started:.0f} s; load average at end {load_average():.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": all_versions, "limits": limits, "args": vars(args),
                       "results": [{"key": list(k), **v} for k, v in results.items()],
                       "loads": [{"key": list(k), "load": v} for k, v in loads.items()]}, f, indent=1)


if __name__ == "__main__":
    main()
