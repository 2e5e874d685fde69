"""Pretrain a bert4keras model on records written by `pretraining.data_utils`.

    python -m pretraining.pretraining --config pretraining/configs/tiny_chinese.json \\
        --data data/mlm --output runs/tiny --batch-size 32 --steps 2000 \\
        --learning-rate 1e-3 --warmup-steps 200

The task (masked LM, causal LM or UniLM) is the one the records were written
for (`meta.json`). Training is `model.fit` under the existing engines:
`tf.distribute` (`--strategy mirrored` for the GPUs of one host, `--strategy
tpu --tpu ADDRESS`) on TensorFlow, `keras.distribution` (`--strategy data`,
`--strategy model`, several hosts through `--coordinator-address`) on JAX.

Outputs, under `--output`:

* `checkpoints/step-XXXXXXXX/`: weights, optimizer state (with the update
  count) and dropout RNG state every `--save-every` updates; each is written
  to a temporary folder and renamed when complete, so a kill at any moment
  leaves the previous one intact. Running the same command again resumes
  from the newest: the data stream restarts at exactly the next batch.
* `metrics.jsonl` (one line per `--log-every` updates: step, mean loss,
  learning rate) and TensorBoard logs in `logs/`.
* `final/`: `bert_model.ckpt.*`, `bert_config.json` and `vocab.txt`, ready
  for `build_transformer_model("final/bert_config.json", "final/bert_model.ckpt")`.

Run `python -m pretraining.pretraining --help` for every flag.
"""
import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
import time

STRATEGIES = {
    "single": "one device (any backend)",
    "mirrored": "tf.distribute.MirroredStrategy over the GPUs of this host (else its CPU devices); TensorFlow",
    "tpu": "tf.distribute.TPUStrategy on the TPU given by --tpu; TensorFlow",
    "data": "keras.distribution.DataParallel over all devices; JAX",
    "model": "keras.distribution.ModelParallel: weights split over --model-parallel devices; JAX",
}
#: Arguments a resumed run must share with the run it continues.
RESUME_KEYS = ("config", "model", "data", "batch_size", "grad_accum_steps", "steps", "learning_rate",
               "warmup_steps", "min_lr_ratio", "optimizer", "weight_decay", "clip_norm", "seed",
               "log_every", "shuffle_buffer", "mask_rate", "init_checkpoint", "mixed_precision")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m pretraining.pretraining", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--config", required=True,
        help="bert_config.json of the model to train (vocab_size may be left out: the records' vocab decides)")
    add("--model", default="roberta", help="model family (bert4keras model= name)")
    add("--init-checkpoint", help="start from these weights (Google checkpoint prefix or HF folder)")
    add("--data", required=True, help="folder written by `python -m pretraining.data_utils make-tfrecords`")
    add("--output", required=True, help="folder for checkpoints, logs and the final model")
    add("--batch-size", type=int, default=32, help="global batch of one forward pass (all devices)")
    add("--grad-accum-steps", type=int, default=1, help="batches per update (effective batch = batch x this)")
    add("--steps", type=int, required=True, help="optimizer updates in total")
    add("--learning-rate", type=float, default=1e-4, help="peak learning rate")
    add("--warmup-steps", type=int, default=0, help="linear warmup from 0, then linear decay")
    add("--min-lr-ratio", type=float, default=0.0, help="learning rate at the last step, relative to the peak")
    add("--optimizer", choices=("adamw", "lamb"), default="adamw")
    add("--weight-decay", type=float, default=0.01, help="decoupled decay (not on Norm and bias weights)")
    add("--clip-norm", type=float, default=1.0, help="global gradient-norm clipping (0: none)")
    add("--mixed-precision", choices=("none", "bfloat16", "float16"), default="none")
    add("--recompute", nargs="?", const="full", choices=("full", "attention"),
        help="recompute activations in the backward pass (saves memory): full, or attention (the "
             "attention core only); default: the RECOMPUTE environment variable")
    add("--strategy", choices=tuple(STRATEGIES), default="single",
        help="; ".join(f"{k}: {v}" for k, v in STRATEGIES.items()))
    add("--tpu", help="TPU name or grpc:// address for --strategy tpu")
    add("--model-parallel", type=int, default=0,
        help="--strategy model: devices one copy of the model is split over (0: all)")
    add("--coordinator-address", help="JAX multi-host: host:port of process 0 (with --num-processes, --process-id)")
    add("--num-processes", type=int)
    add("--process-id", type=int)
    add("--save-every", type=int, default=100, help="checkpoint every this many updates")
    add("--keep-checkpoints", type=int, default=3)
    add("--log-every", type=int, default=10, help="metrics every this many updates (divides --save-every)")
    add("--seed", type=int, default=0, help="seeds the weights, data order, masks and dropout")
    add("--deterministic", action="store_true", help="deterministic kernels (tf op determinism); slower")
    add("--shuffle-buffer", type=int, default=10000)
    add("--mask-rate", type=float, default=0.15, help="mlm: fraction of words masked")
    add("--jit-compile", choices=("auto", "true", "false"), default="auto",
        help="XLA-compile the train step (auto: Keras decides; off under --deterministic on TF)")
    add("--steps-per-execution", type=int, default=1,
        help="batches per compiled call (speeds up TPUs and small models; divides log-every x grad-accum-steps)")
    add("--cpu-devices", type=int, default=0, help="split the CPU into this many logical devices (for testing)")
    add("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    positive = ("batch_size", "grad_accum_steps", "steps", "save_every", "log_every", "keep_checkpoints",
                "shuffle_buffer")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.save_every % args.log_every or args.steps % args.log_every:
        parser.error(f"--log-every ({args.log_every}) must divide --save-every ({args.save_every}) "
                     f"and --steps ({args.steps}): metrics and checkpoints are written at the end of "
                     "a logging interval")
    if args.steps_per_execution < 1 or (args.log_every * args.grad_accum_steps) % args.steps_per_execution:
        parser.error(f"--steps-per-execution ({args.steps_per_execution}) must divide --log-every x "
                     f"--grad-accum-steps ({args.log_every * args.grad_accum_steps} batches)")
    if args.strategy == "tpu" and not args.tpu:
        parser.error("--strategy tpu needs --tpu NAME_OR_ADDRESS (e.g. grpc://10.0.0.2:8470)")
    if not 0 < args.mask_rate < 1:
        parser.error(f"--mask-rate must be in (0, 1), got {args.mask_rate}")
    for path in (args.config, args.data):
        if not os.path.exists(path):
            parser.error(f"{path} does not exist")
    args.config = os.path.abspath(args.config)
    args.data = os.path.abspath(args.data)


# ---------------------------------------------------------------------------
# Devices and distribution
# ---------------------------------------------------------------------------


def configure_before_import(args):
    """Settings that must precede backend initialisation (XLA flags)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if args.cpu_devices:
        flags += f" --xla_force_host_platform_device_count={args.cpu_devices}"
    if args.deterministic:
        flags += " --xla_gpu_deterministic_ops=true"
    os.environ["XLA_FLAGS"] = flags.strip()


def configure_tensorflow(args):
    import tensorflow as tf

    if args.cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.cpu_devices)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()


def make_distribution(args, backend):
    """(scope, number of data-parallel replicas, is_chief) for --strategy."""
    tf_only, jax_only = ("mirrored", "tpu"), ("data", "model")
    if args.strategy in tf_only and backend != "tensorflow":
        raise SystemExit(f"--strategy {args.strategy} is a tf.distribute strategy: run with KERAS_BACKEND=tensorflow "
                         "(on JAX use --strategy data or model).")
    if args.strategy in jax_only and backend != "jax":
        raise SystemExit(f"--strategy {args.strategy} uses keras.distribution, which runs on JAX: set "
                         "KERAS_BACKEND=jax (on TensorFlow use --strategy mirrored or tpu).")
    if args.strategy == "single":
        return contextlib.nullcontext(), 1, True
    if backend == "tensorflow":
        import tensorflow as tf

        if args.strategy == "mirrored":
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
            # NCCL all-reduce needs GPUs; CPU replicas reduce through one device.
            cross = None if gpus else tf.distribute.ReductionToOneDevice()
            strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=cross)
        else:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=args.tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            strategy = tf.distribute.TPUStrategy(resolver)
        return strategy.scope(), strategy.num_replicas_in_sync, True

    import jax
    import keras

    if args.coordinator_address:
        keras.distribution.initialize(args.coordinator_address, args.num_processes, args.process_id)
    devices = keras.distribution.list_devices()
    if args.strategy == "data":
        distribution = keras.distribution.DataParallel(devices=devices)
        replicas = len(devices)
    else:
        model_size = args.model_parallel or len(devices)
        if len(devices) % model_size:
            raise SystemExit(f"--model-parallel {model_size} does not divide the {len(devices)} devices.")
        replicas = len(devices) // model_size
        mesh = keras.distribution.DeviceMesh((replicas, model_size), ("batch", "model"), devices)
        distribution = keras.distribution.ModelParallel(layout_map=transformer_layout_map(mesh),
                                                        batch_dim_name="batch")
    keras.distribution.set_distribution(distribution)
    return contextlib.nullcontext(), replicas, jax.process_index() == 0


def transformer_layout_map(mesh):
    """Megatron-style split of the bert4keras block weights over the 'model' axis.

    Query/key/value and the first feed-forward projection are split by output
    columns, the output projections by input rows, so each block needs one
    all-reduce after attention and one after the feed-forward layer. The token
    embedding (also the tied MLM output matrix) is split along the hidden
    size. Everything else is replicated.
    """
    import keras

    layout_map = keras.distribution.LayoutMap(mesh)  # keys are regular expressions over whole paths
    layout_map[r".*/[qkv]_dense/kernel"] = (None, "model")
    layout_map[r".*/[qkv]_dense/bias"] = ("model",)
    layout_map[r".*/i\d*_dense/kernel"] = (None, "model")
    layout_map[r".*/i\d*_dense/bias"] = ("model",)
    layout_map[r".*/o_dense/kernel"] = ("model", None)
    layout_map[r"Embedding-Token/embeddings"] = (None, "model")
    return layout_map


# ---------------------------------------------------------------------------
# Model and optimizer
# ---------------------------------------------------------------------------

_APPLICATIONS = {"mlm": "encoder", "lm": "lm", "unilm": "unilm"}


def build_model(args, meta):
    """The Transformer (not only its keras.Model: the final export needs its names)."""
    from bert4keras.models import MODELS, accepted_arguments, build_transformer_model, load_config

    if args.model not in MODELS:
        raise SystemExit(f"--model {args.model!r} is unknown; valid: {', '.join(MODELS)}.")
    module, attribute = MODELS[args.model][0].split(":")
    family = getattr(importlib.import_module(module), attribute)
    accepted = accepted_arguments(family)
    head = "with_lm" if "with_lm" in accepted else "with_mlm" if "with_mlm" in accepted else None
    if head is None or args.model.startswith(("t5", "mt5")):
        raise SystemExit(f"--model {args.model} cannot be pretrained here: it needs an encoder- or decoder-only "
                         "family with a token head (bert, roberta, albert, nezha, roformer, electra, gpt, gpt2).")
    config = load_config(args.config)
    if config.get("vocab_size", meta["vocab_size"]) != meta["vocab_size"]:
        raise SystemExit(f"{args.config} has vocab_size {config['vocab_size']} but the records in {args.data} "
                         f"use a vocab of {meta['vocab_size']} tokens; set vocab_size to {meta['vocab_size']} "
                         "(or leave it out: it is then taken from the records).")
    if config.get("max_position_embeddings", 512) < meta["seq_length"]:
        raise SystemExit(f"{args.config}: max_position_embeddings {config['max_position_embeddings']} is shorter "
                         f"than the records' seq_length {meta['seq_length']}.")
    kwargs = {head: "linear", "return_keras_model": False, "vocab_size": meta["vocab_size"]}
    if "recompute" in accepted:
        kwargs["recompute"] = {"full": True, "attention": "attention"}.get(args.recompute)  # None: RECOMPUTE
    return build_transformer_model(args.config, args.init_checkpoint, model=args.model,
                                   application=_APPLICATIONS[meta["mode"]], **kwargs)


_OPTIMIZER_CLASSES = {}


def optimizer_class(name):
    """AdamW or LAMB + piecewise-linear learning rate + gradient accumulation.

    Accumulation is kept even for one batch per update: its step sums the
    gradients over replicas before clipping, so clipping sees the global norm
    under every strategy.
    """
    from bert4keras import optimizers

    if name not in _OPTIMIZER_CLASSES:
        base = {"adamw": optimizers.AdamW, "lamb": optimizers.LAMB}[name]
        scheduled = optimizers.extend_with_piecewise_linear_lr(base, name=f"Pretraining{base.__name__}LR")
        _OPTIMIZER_CLASSES[name] = optimizers.extend_with_gradient_accumulation(
            scheduled, name=f"Pretraining{base.__name__}LRGA")
    return _OPTIMIZER_CLASSES[name]


def lr_schedule(steps, warmup_steps, min_lr_ratio):
    """{update: multiplier}: 0 -> 1 over the warmup, then linear to min_lr_ratio.

    >>> lr_schedule(1000, 100, 0.0)
    {100: 1.0, 1000: 0.0}
    """
    if warmup_steps >= steps:
        return {max(warmup_steps, 1): 1.0}
    return {warmup_steps: 1.0, steps: min_lr_ratio} if warmup_steps else {0: 1.0, steps: min_lr_ratio}


def make_optimizer(args):
    excluded = ["Norm", "bias"]
    kwargs = dict(learning_rate=args.learning_rate, epsilon=1e-6, weight_decay_rate=args.weight_decay,
                  exclude_from_weight_decay=excluded,
                  lr_schedule=lr_schedule(args.steps, args.warmup_steps, args.min_lr_ratio),
                  grad_accum_steps=args.grad_accum_steps)
    if args.optimizer == "lamb":
        kwargs["exclude_from_layer_adaptation"] = excluded
    if args.clip_norm:
        kwargs["global_clipnorm"] = args.clip_norm
    return optimizer_class(args.optimizer)(**kwargs)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def _rng_variables(model):
    """The model's dropout seed-generator states (variables that are not weights)."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


class CheckpointManager:
    """`directory/step-XXXXXXXX/` folders: model.weights.h5 (weights and optimizer
    variables, including its update counter), rng.npz, state.json.

    A checkpoint is written under a temporary name and renamed when complete;
    folders without the final name are ignored (and removed) on restart.

    >>> manager = CheckpointManager("runs/tiny/checkpoints", keep=3)  # doctest: +SKIP
    >>> manager.save(model, {"step": 200, "batches": 200})  # doctest: +SKIP
    >>> manager.restore(fresh_model, manager.steps()[-1])  # doctest: +SKIP
    {'step': 200, 'batches': 200}
    """

    PREFIX = "step-"

    def __init__(self, directory, keep=3, is_chief=True):
        self.directory = directory
        self.keep = keep
        self.is_chief = is_chief
        os.makedirs(directory, exist_ok=True)

    def steps(self):
        found = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.startswith(self.PREFIX) and name[len(self.PREFIX):].isdigit() \
                    and os.path.isfile(os.path.join(path, "state.json")):
                found.append(int(name[len(self.PREFIX):]))
        return sorted(found)

    def path(self, step):
        return os.path.join(self.directory, f"{self.PREFIX}{step:08d}")

    def remove_partial(self):
        for name in os.listdir(self.directory):
            if name.startswith(".partial-"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def save(self, model, state):
        import keras
        import numpy as np

        step = state["step"]
        rng = {f"rng_{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(_rng_variables(model))}
        if not self.is_chief:
            return None
        temporary = os.path.join(self.directory, f".partial-{step:08d}-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        model.save_weights(os.path.join(temporary, "model.weights.h5"))
        np.savez(os.path.join(temporary, "rng.npz"), **rng)
        with open(os.path.join(temporary, "state.json"), "w") as f:
            json.dump(state, f, indent=2)
        final = self.path(step)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def restore(self, model, step):
        import numpy as np

        path = self.path(step)
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(path, "model.weights.h5"))
        with np.load(os.path.join(path, "rng.npz")) as rng:
            variables = _rng_variables(model)
            if len(rng.files) != len(variables):
                raise SystemExit(f"{path} holds {len(rng.files)} RNG states but the model has {len(variables)}; "
                                 "was it written for another config?")
            for i, variable in enumerate(variables):
                variable.assign(rng[f"rng_{i}"])
        with open(os.path.join(path, "state.json")) as f:
            return json.load(f)


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------


def _read_metrics(path, up_to_step):
    """Lines of metrics.jsonl up to a step (later ones belong to lost work)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [line for line in lines if line["step"] <= up_to_step]


def make_monitor(args, start_step, checkpoints, learning_rate_at, is_chief):
    import keras
    import tensorflow as tf
    from tqdm import tqdm

    from tensorflow.core.framework import summary_pb2

    # TensorBoard's scalar tag, written with the core op so that the
    # tensorboard package need not be installed to write the logs.
    scalar_metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")).SerializeToString()

    class TrainingMonitor(keras.callbacks.Callback):
        """Progress bar, metrics.jsonl, TensorBoard scalars and checkpoints.

        Keras runs one "epoch" per logging interval, so the epoch logs hold the
        mean loss of that interval and every backend has synchronised its
        variables when `on_epoch_end` runs.
        """

        def on_train_begin(self, logs=None):
            self.metrics_path = os.path.join(args.output, "metrics.jsonl")
            if is_chief:
                kept = _read_metrics(self.metrics_path, start_step)
                with open(self.metrics_path, "w") as f:
                    f.writelines(json.dumps(line) + "\n" for line in kept)
            logdir = os.path.join(args.output, "logs")
            self.writer = tf.summary.create_file_writer(logdir) if is_chief else tf.summary.create_noop_writer()
            self.bar = tqdm(total=args.steps, initial=start_step, unit="step",
                            disable=args.no_progress or not is_chief, dynamic_ncols=True)
            self.started = time.time()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = epoch * args.log_every * args.grad_accum_steps  # batches before this epoch

        def on_train_batch_end(self, batch, logs=None):
            # `batch` is the index of the last batch run (several per call with steps_per_execution).
            updates = (self.epoch_start + batch + 1) // args.grad_accum_steps
            self.bar.update(updates - self.bar.n)

        def on_epoch_end(self, epoch, logs=None):
            step = (epoch + 1) * args.log_every
            updates = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            if updates != step:
                raise RuntimeError(f"Internal error: the optimizer made {updates} updates, expected {step}.")
            loss = float(logs["loss"])
            lr = learning_rate_at(step - 1)
            record = {"step": step, "loss": loss, "learning_rate": lr,
                      "seconds": round(time.time() - self.started, 3)}
            if is_chief:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            with self.writer.as_default(step=step):
                for tag, value in (("loss", loss), ("learning_rate", lr)):
                    tf.summary.write(tag, tf.constant(value, tf.float32), metadata=scalar_metadata)
            self.writer.flush()
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step % args.save_every == 0 or step == args.steps:
                checkpoints.save(self.model, {"step": step, "batches": step * args.grad_accum_steps})

        def on_train_end(self, logs=None):
            self.bar.close()
            self.writer.close()

    return TrainingMonitor()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def check_resume(args, path):
    """Write run.json on the first start; refuse to resume with other settings."""
    settings = {key: getattr(args, key) for key in RESUME_KEYS}
    with open(args.config) as f:
        settings["config_contents"] = json.load(f)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = [k for k in settings if previous.get(k) != settings[k]]
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise SystemExit(f"{args.output} holds a run with other settings ({details}). Resume with the same "
                             "command, or pass a new --output.")
    else:
        with open(path, "w") as f:
            json.dump(settings, f, indent=2)


def lock_output(folder):
    """An exclusive lock on `folder/.lock`, held while the returned file is open.

    Two processes training into one folder would overwrite each other's
    checkpoints. The operating system drops the lock when its process dies,
    even by SIGKILL, so a killed run never blocks its own resumption.
    """
    try:
        import fcntl
    except ImportError:  # not on POSIX: no protection
        return None
    handle = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise SystemExit(f"{folder} is in use by a running training ({owner}); wait for it to end or stop it "
                         "first, or pass another --output.") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def export_final(args, transformer, meta):
    """Google-format checkpoint + bert_config.json + vocab.txt in output/final."""
    folder = os.path.join(args.output, "final")
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "bert_model.ckpt")
    transformer.save_weights_as_checkpoint(prefix)
    config_path = os.path.join(folder, "bert_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["bert4keras_model"] = args.model  # build_transformer_model picks the family from it
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    shutil.copyfile(os.path.join(args.data, meta["vocab"]), os.path.join(folder, "vocab.txt"))
    return prefix


def main(argv=None):
    args = parse_args(argv)
    configure_before_import(args)
    import keras

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise SystemExit(f"Pretraining runs on TensorFlow or JAX (tf.data input); KERAS_BACKEND={backend}.")
    configure_tensorflow(args)  # TF reads the data on every backend
    from pretraining.data_utils import load_dataset, read_meta

    meta = read_meta(args.data)
    os.makedirs(args.output, exist_ok=True)
    scope, replicas, is_chief = make_distribution(args, backend)
    lock = lock_output(args.output) if is_chief else None  # noqa: F841 (held until the process ends)
    if is_chief:
        check_resume(args, os.path.join(args.output, "run.json"))
    print(f"Backend {backend}, strategy {args.strategy}: {replicas} data-parallel replica(s).", file=sys.stderr)
    if args.batch_size % replicas:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {replicas} data-parallel replicas.")
    keras.utils.set_random_seed(args.seed)
    if args.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(f"mixed_{args.mixed_precision}")

    checkpoints = CheckpointManager(os.path.join(args.output, "checkpoints"), args.keep_checkpoints, is_chief)
    checkpoints.remove_partial()
    with scope:
        transformer = build_model(args, meta)
        model = transformer.model
        if args.strategy == "model":
            split = sum(not v.value.sharding.is_fully_replicated for v in model.weights)
            print(f"ModelParallel: {split} of {len(model.weights)} weights split over the 'model' axis.",
                  file=sys.stderr)
        optimizer = make_optimizer(args)
        jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
        model.compile(optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit, steps_per_execution=args.steps_per_execution)
        done = checkpoints.steps()
        start_step = done[-1] if done else 0
        if start_step:
            state = checkpoints.restore(model, start_step)
            updates = int(keras.ops.convert_to_numpy(optimizer.iterations))
            if updates != state["step"]:
                raise SystemExit(f"Checkpoint {checkpoints.path(start_step)} is inconsistent: step {state['step']} "
                                 f"but the optimizer made {updates} updates.")
            print(f"Resuming from {checkpoints.path(start_step)} (update {start_step} of {args.steps}).",
                  file=sys.stderr)

    if start_step < args.steps:
        dataset = load_dataset(args.data, args.batch_size, seed=args.seed,
                               start_batch=start_step * args.grad_accum_steps,
                               shuffle_buffer=args.shuffle_buffer, mask_rate=args.mask_rate)
        if len(model.inputs) == 1:  # no segment input (segment_vocab_size=0, GPT-2)
            dataset = dataset.map(lambda x, y, w: (x[0], y, w))
        schedule = optimizer._learning_rate  # the piecewise-linear schedule of the update count

        def learning_rate_at(update):
            return float(keras.ops.convert_to_numpy(schedule(update)))

        monitor = make_monitor(args, start_step, checkpoints, learning_rate_at, is_chief)
        model.fit(dataset, epochs=args.steps // args.log_every, initial_epoch=start_step // args.log_every,
                  steps_per_epoch=args.log_every * args.grad_accum_steps, callbacks=[monitor], verbose=0,
                  shuffle=False)
    if is_chief:
        prefix = export_final(args, transformer, meta)
        print(f"Final checkpoint: {prefix} (config and vocab next to it).", file=sys.stderr)


if __name__ == "__main__":
    main()
