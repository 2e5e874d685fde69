"""Cached vs uncached generation speed (run by hand, not in CI).

    python benchmarks/bench_generation.py [--new 16 64 256] [--batch 1 16]

A MiniLM-sized LM (6 layers, hidden 384, 12 heads, vocab 30522, random
weights) generates N new tokens greedily after a 64-token prompt, with the
key/value cache (`CachedDecoder`) and by re-running the whole prefix at every
step (the bert4keras way). No end token, so every run produces exactly N
tokens. Each figure is the best of --repeat timed runs (after a warm-up run
that compiles every shape), which filters out a shared machine's noise.
Prints a markdown table: seconds, ms per new token, and the ratio.

    python benchmarks/bench_generation.py --step-only [--batch 1 16]

times the decoding step alone (`IncrementalModel.step`, one token per row,
a 128-slot cache after the prompt): best of 7 runs of 20 steps.
"""
import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bert4keras import build_transformer_model  # noqa: E402
from bert4keras.generation import CachedDecoder, compiled_inference  # noqa: E402
from bert4keras.snippets import AutoRegressiveDecoder  # noqa: E402


class FullPrefixDecoder(AutoRegressiveDecoder):
    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.run = compiled_inference(model)  # the same compiled call the cached path uses

    @AutoRegressiveDecoder.wraps(default_rtype="probas")
    def predict(self, inputs, output_ids, states):
        token_ids = np.concatenate([inputs[0], output_ids], axis=1).astype("int32")
        probas = self.run([token_ids, np.zeros_like(token_ids)])
        return keras.ops.convert_to_numpy(probas)[:, -1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is kept")
    parser.add_argument("--step-only", action="store_true", help="time the cached step alone")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model = build_transformer_model(
        model="bert", application="lm", with_mlm=True, vocab_size=30522, hidden_size=384,
        num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, max_position=512,
    )
    rng = np.random.default_rng(0)
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    if args.step_only:
        return time_steps(model, args.batch, args.prompt, rng)
    print("| batch | new tokens | cached s | uncached s | cached ms/token | uncached ms/token | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batch:
        prompts = rng.integers(100, 30000, size=(batch, args.prompt))
        for new in args.new:
            cached = CachedDecoder(model, start_id=None, end_id=None, maxlen=new)
            full = FullPrefixDecoder(model, start_id=None, end_id=None, maxlen=new)
            batch_inputs = [[p] for p in prompts]
            timings = []
            for decoder in (cached, full):
                decoder.beam_search_batch(batch_inputs, topk=1)  # warm-up: compile every shape
                runs = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    decoder.beam_search_batch(batch_inputs, topk=1)
                    runs.append(time.perf_counter() - start)
                timings.append(min(runs))
            c, u = timings
            print(f"| {batch} | {new} | {c:.2f} | {u:.2f} | {1000 * c / new:.1f} | "
                  f"{1000 * u / new:.1f} | {u / c:.1f}x |", flush=True)


def time_steps(model, batches, prompt, rng, slots=128, steps=20, runs=7):
    incremental = CachedDecoder(model, start_id=None, end_id=None, maxlen=slots - prompt).incremental
    print(f"| batch | step ms (best of {runs} x {steps}) | median |")
    print("| --- | --- | --- |")
    for batch in batches:
        prompts = [p.astype("int32") for p in rng.integers(100, 30000, size=(batch, prompt))]
        tokens = np.ones(batch, "int32")
        timings = []
        for _ in range(runs):
            _, state = incremental.prefill(prompts, None, slots)
            _, state = incremental.step(tokens, state)  # compiles on the first run
            start = time.perf_counter()
            for _ in range(steps):
                _, state = incremental.step(tokens, state)
            timings.append(1000 * (time.perf_counter() - start) / steps)
        print(f"| {batch} | {min(timings):.1f} | {sorted(timings)[runs // 2]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
