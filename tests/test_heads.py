"""Task heads: CRF, MEMM, GlobalPointer, EfficientGlobalPointer, masked pooling.

References are independent numpy code in this file: enumeration of every tag
path (CRF likelihood, its gradient and Viterbi), an explicit per-position
formula (MEMM), an explicit double loop with 2x2 rotations (GlobalPointer).
Tolerances: 1e-4 relative on float32 losses/scores unless stated.
"""
import itertools
import math

import keras
import numpy as np
import pytest
from keras import ops

from bert4keras import losses
from bert4keras.heads import (
    PADDING_THRESHOLD,
    ConditionalRandomField,
    EfficientGlobalPointer,
    GlobalAveragePooling1D,
    GlobalMaxPooling1D,
    GlobalPointer,
    MaximumEntropyMarkovModel,
    TaggerFunction,
    check_tag_labels,
    crf_negative_log_likelihood,
    crf_viterbi_decode,
    decode_spans,
)

RTOL = 1e-4
MASKS = {
    "none": np.ones((4, 5), "int32"),
    "right": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]),
    "left": np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]]),
    "holes": np.array([[1, 0, 1, 0, 1], [0, 1, 1, 0, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]),
}


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def value_and_grads(fn, *args):
    """fn(*args) -> scalar; returns (value, [d value / d arg]) on any backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xs = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = fn(*xs)
        return np_(y), [np_(g) for g in tape.gradient(y, xs)]
    if backend == "jax":
        import jax

        y, grads = jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)
        return np_(y), [np_(g) for g in grads]
    import torch

    xs = [torch.tensor(a, requires_grad=True) for a in args]
    y = fn(*xs)
    y.backward()
    return np_(y.detach()), [x.grad.numpy() for x in xs]


def make_crf(trans, lr_multiplier=1):
    crf = ConditionalRandomField(lr_multiplier=lr_multiplier)
    crf.build((None, None, trans.shape[0]))
    crf._trans.assign(trans / lr_multiplier)
    return crf


# ------------------------------- brute force ------------------------------


def path_scores(emissions, trans, real):
    """{path over the real positions: unnormalised score} for one sequence."""
    positions = np.flatnonzero(real)
    scores = {}
    for path in itertools.product(range(trans.shape[0]), repeat=len(positions)):
        s = sum(emissions[p, t] for p, t in zip(positions, path))
        s += sum(trans[a, b] for a, b in zip(path[:-1], path[1:]))
        scores[path] = s
    return positions, scores


def brute_nll(emissions, trans, tags, real):
    positions, scores = path_scores(emissions, trans, real)
    if not len(positions):
        return 0.0
    values = np.array(list(scores.values()))
    log_z = values.max() + np.log(np.exp(values - values.max()).sum())
    return log_z - scores[tuple(tags[positions])]


def brute_trans_grad(emissions, trans, tags, real):
    """d nll / d trans = expected transition counts - gold transition counts."""
    positions, scores = path_scores(emissions, trans, real)
    grad = np.zeros_like(trans)
    if len(positions) < 2:
        return grad
    values = np.array(list(scores.values()))
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    for prob, path in zip(probs, scores):
        for a, b in zip(path[:-1], path[1:]):
            grad[a, b] += prob
    gold = tags[positions]
    for a, b in zip(gold[:-1], gold[1:]):
        grad[a, b] -= 1
    return grad


def brute_best_path(emissions, trans, real):
    positions, scores = path_scores(emissions, trans, real)
    out = np.full(len(real), -1)
    if len(positions):
        out[positions] = max(scores, key=scores.get)
    return out


def random_case(seed, batch=4, length=5, num_tags=3):
    rng = np.random.default_rng(seed)
    emissions = rng.normal(size=(batch, length, num_tags)).astype("float32")
    trans = rng.normal(size=(num_tags, num_tags)).astype("float32")
    tags = rng.integers(0, num_tags, size=(batch, length))
    return emissions, trans, tags


# ----------------------------------- CRF ----------------------------------


@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_crf_nll_equals_brute_force(mask_kind):
    mask = MASKS[mask_kind]
    emissions, trans, tags = random_case(0)
    crf = make_crf(trans, lr_multiplier=3)
    scores = crf([emissions, mask])
    got = np_(crf.sparse_loss(tags, scores))
    want = [brute_nll(emissions[b], trans, tags[b], mask[b]) for b in range(len(tags))]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)
    dense = np_(crf.dense_loss(np.eye(3)[tags], scores))
    np.testing.assert_allclose(dense, got, rtol=1e-6)


def test_crf_padding_labels_are_ignored():
    mask = MASKS["right"]
    emissions, trans, tags = random_case(1)
    crf = make_crf(trans)
    scores = crf([emissions, mask])
    other = np.where(mask == 1, tags, 99)  # junk labels on padding only
    np.testing.assert_array_equal(
        np_(crf.sparse_loss(tags, scores)), np_(crf.sparse_loss(other, scores))
    )
    assert np.all(np_(scores)[mask == 0] <= PADDING_THRESHOLD)
    np.testing.assert_array_equal(np_(scores)[mask == 1], emissions[mask == 1])


@pytest.mark.parametrize("mask_kind", ["right", "holes"])
def test_crf_gradients_finite_and_match_expected_counts(mask_kind):
    mask = MASKS[mask_kind]
    emissions, trans, tags = random_case(2)
    onehot = np.eye(3, dtype="float32")[tags]
    bool_mask = mask.astype(bool)

    def total_nll(e, t):
        return ops.sum(crf_negative_log_likelihood(e, onehot, t, bool_mask))

    _, (g_emissions, g_trans) = value_and_grads(total_nll, emissions, trans)
    assert np.isfinite(g_emissions).all() and np.isfinite(g_trans).all()
    assert np.all(g_emissions[~bool_mask] == 0)  # padding gets no gradient
    want = sum(brute_trans_grad(emissions[b], trans, tags[b], mask[b]) for b in range(4))
    np.testing.assert_allclose(g_trans, want, atol=1e-4)


@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_crf_viterbi_equals_brute_force_argmax(mask_kind):
    mask = MASKS[mask_kind]
    for seed in range(2):
        emissions, trans, _ = random_case(10 + seed, num_tags=4)
        crf = make_crf(trans)
        decoded = crf.decode(crf([emissions, mask]))  # host-side numpy
        trans_np = np_(crf.trans)  # what snippets.ViterbiDecoder receives
        want = np.stack([brute_best_path(emissions[b], trans_np, mask[b]) for b in range(4)])
        np.testing.assert_array_equal(decoded, want)
        np.testing.assert_array_equal(crf.decode(emissions, mask=mask), want)
        in_graph = crf_viterbi_decode(emissions, crf.trans, mask)  # keras.ops version
        np.testing.assert_array_equal(np_(in_graph), want)


def test_crf_lr_multiplier_scales_the_transition_step():
    """SGD step on the stored (trans / m) variable moves trans by -lr * m**2 * grad."""
    m, lr = 4.0, 0.01
    emissions, trans, tags = random_case(3)
    mask = MASKS["right"]
    crf = make_crf(trans, lr_multiplier=m)
    np.testing.assert_allclose(np_(crf._trans), trans / m, rtol=1e-6)
    np.testing.assert_allclose(np_(crf.trans), trans, rtol=1e-6)

    e_in = keras.Input((5, 3))
    m_in = keras.Input((5,), dtype="int32")
    model = keras.Model([e_in, m_in], crf([e_in, m_in]))
    model.compile(keras.optimizers.SGD(lr), loss=crf.sparse_loss)
    onehot = np.eye(3, dtype="float32")[tags]
    _, (g_trans,) = value_and_grads(
        lambda t: ops.mean(
            crf_negative_log_likelihood(emissions, onehot, t, mask.astype(bool))
        ),
        trans,
    )
    model.fit([emissions, mask], tags, batch_size=4, epochs=1, verbose=0)
    np.testing.assert_allclose(np_(crf.trans) - trans, -lr * m**2 * g_trans, atol=1e-5)


def test_crf_accuracy_counts_real_tokens_only():
    emissions = np.full((1, 4, 3), -1.0, "float32")
    emissions[0, [0, 1, 2, 3], [0, 1, 1, 2]] = 1.0  # argmax tags 0, 1, 1, 2
    crf = make_crf(np.zeros((3, 3), "float32"))
    scores = crf([emissions, np.array([[1, 1, 1, 0]])])
    acc = crf.sparse_accuracy(np.array([[0, 1, 2, 0]]), scores)  # 2 of 3 right
    np.testing.assert_allclose(np_(acc), 2 / 3, rtol=1e-6)
    dense = crf.dense_accuracy(np.eye(3)[[[0, 1, 2, 0]]], scores)
    np.testing.assert_allclose(np_(dense), 2 / 3, rtol=1e-6)


def test_crf_keras_mask_equals_explicit_mask():
    ids = np.array([[3, 4, 5, 0, 0], [6, 7, 0, 0, 0]])
    tags = np.array([[1, 2, 0, 0, 0], [2, 2, 0, 0, 0]])
    inp = keras.Input((5,), dtype="int32")
    emb = keras.layers.Embedding(10, 3, mask_zero=True)
    crf_a, crf_b = ConditionalRandomField(), ConditionalRandomField()
    x = emb(inp)
    model = keras.Model(inp, [crf_a(x), crf_b([x, inp])])
    crf_b._trans.assign(np_(crf_a._trans))
    out_a, out_b = model.predict(ids, verbose=0)
    np.testing.assert_array_equal(out_a, out_b)
    assert np.all(out_a[ids == 0] <= PADDING_THRESHOLD)
    np.testing.assert_allclose(
        np_(crf_a.sparse_loss(tags, out_a)), np_(crf_b.sparse_loss(tags, out_b)), rtol=1e-6
    )


# ----------------------------------- MEMM ---------------------------------


def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def memm_reference(emissions, trans, tags, real, bidirectional):
    """Mean token cross-entropy: softmax((e_t + trans[prev gold]) / 2), first
    real position softmax(e_t); backward uses trans.T and the next gold tag."""
    positions = np.flatnonzero(real)
    if not len(positions):
        return 0.0

    def direction(order, matrix):
        total, prev = 0.0, None
        for p in order:
            logits = emissions[p] if prev is None else (emissions[p] + matrix[prev]) / 2
            total -= log_softmax(logits)[tags[p]]
            prev = tags[p]
        return total / len(order)

    forward = direction(positions, trans)
    if not bidirectional:
        return forward
    return (forward + direction(positions[::-1], trans.T)) / 2


@pytest.mark.parametrize(
    "hidden_dim, bidirectional, mask_kind",
    [(None, True, "right"), (2, True, "left"), (None, False, "left"), (2, False, "right")],
)
def test_memm_loss_equals_formula(hidden_dim, bidirectional, mask_kind):
    mask = MASKS[mask_kind]
    emissions, _, tags = random_case(4)
    memm = MaximumEntropyMarkovModel(
        lr_multiplier=2, hidden_dim=hidden_dim, bidirectional=bidirectional
    )
    scores = memm([emissions, mask])
    trans = np_(memm.trans)
    if hidden_dim is not None:
        np.testing.assert_allclose(
            trans, 4 * np_(memm._l_trans) @ np_(memm._r_trans).T, rtol=1e-5
        )
    got = np_(memm.sparse_loss(tags, scores))
    want = [
        memm_reference(emissions[b], trans, tags[b], mask[b], bidirectional) for b in range(4)
    ]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(np_(memm.dense_loss(np.eye(3)[tags], scores)), got, rtol=1e-6)


def test_memm_decode_equals_brute_force():
    emissions, _, _ = random_case(5, num_tags=3)
    mask = MASKS["right"]
    memm = MaximumEntropyMarkovModel()
    decoded = memm.decode(memm([emissions, mask]))
    trans = np_(memm.trans)
    for b in range(4):
        positions = np.flatnonzero(mask[b])
        best, best_path = -np.inf, None
        for path in itertools.product(range(3), repeat=len(positions)):
            s = log_softmax(emissions[b, positions[0]])[path[0]]
            for i in range(1, len(path)):
                logits = (emissions[b, positions[i]] + trans[path[i - 1]]) / 2
                s += log_softmax(logits)[path[i]]
            if s > best:
                best, best_path = s, path
        np.testing.assert_array_equal(decoded[b][positions], best_path)
        assert np.all(decoded[b][mask[b] == 0] == -1)


# ------------------------------- GlobalPointer -----------------------------


def rotate(vec, position):
    """Adjacent-pair rotation, pair i by position * 10000**(-2i/d), as 2x2 matrices."""
    out = np.empty_like(vec)
    d = len(vec)
    for i in range(d // 2):
        angle = position * 10000.0 ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[2 * i] = c * vec[2 * i] - s * vec[2 * i + 1]
        out[2 * i + 1] = s * vec[2 * i] + c * vec[2 * i + 1]
    return out


def dense_np(layer, x):
    kernel = np_(layer.kernel).astype("float64")
    y = x.astype("float64") @ kernel
    return y + np_(layer.bias) if layer.use_bias else y


def check_span_scores(got, want, mask, tril):
    batch, heads, n, _ = got.shape
    for b, h, i, j in itertools.product(range(batch), range(heads), range(n), range(n)):
        masked = not (mask[b, i] and mask[b, j]) or (tril and j < i)
        if masked:
            assert got[b, h, i, j] <= PADDING_THRESHOLD
        else:
            expected = want[b, h, i, j]
            assert abs(got[b, h, i, j] - expected) <= 1e-4 * (1 + abs(expected))


GP_CASES = [
    dict(RoPE=True, use_bias=True, tril_mask=True),
    dict(RoPE=False, use_bias=False, tril_mask=True),
    dict(RoPE=True, use_bias=True, tril_mask=False),
]


@pytest.mark.parametrize("options", GP_CASES)
def test_global_pointer_equals_double_loop(options):
    heads, d = 2, 4
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 5, 6)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    gp = GlobalPointer(heads, d, **options)
    got = np_(gp([x, mask]))
    proj = dense_np(gp.dense, x).reshape(2, 5, heads, 2 * d)
    want = np.zeros((2, heads, 5, 5))
    for b, h, i, j in itertools.product(range(2), range(heads), range(5), range(5)):
        q, k = proj[b, i, h, :d], proj[b, j, h, d:]
        if options["RoPE"]:
            q, k = rotate(q, i), rotate(k, j)
        want[b, h, i, j] = q @ k / math.sqrt(d)
    check_span_scores(got, want, mask, options["tril_mask"])


@pytest.mark.parametrize("options", GP_CASES)
def test_efficient_global_pointer_equals_double_loop(options):
    heads, d = 3, 4
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 5, 6)).astype("float32")
    mask = np.array([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    gp = EfficientGlobalPointer(heads, d, **options)
    got = np_(gp([x, mask]))
    p = dense_np(gp.p_dense, x)  # (b, n, 2d): q = even features, k = odd
    bias = dense_np(gp.q_dense, p)  # (b, n, 2 * heads)
    want = np.zeros((2, heads, 5, 5))
    for b, h, i, j in itertools.product(range(2), range(heads), range(5), range(5)):
        q, k = p[b, i, 0::2], p[b, j, 1::2]
        if options["RoPE"]:
            q, k = rotate(q, i), rotate(k, j)
        start_bias, end_bias = bias[b, i, 2 * h + 1], bias[b, j, 2 * h]
        want[b, h, i, j] = q @ k / math.sqrt(d) + (start_bias + end_bias) / 2
    check_span_scores(got, want, mask, options["tril_mask"])


@pytest.mark.parametrize("layer_cls", [GlobalPointer, EfficientGlobalPointer])
def test_masked_positions_never_produce_spans(layer_cls):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 6, 8)).astype("float32") * 10
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    for tril in (True, False):
        scores = np_(layer_cls(2, 4, tril_mask=tril)([x, mask]))
        for threshold in (0.0, -1e3):  # -1e3: every real span passes
            spans = decode_spans(scores, threshold=threshold)
            assert sum(map(len, spans)) > 0
            for b, found in enumerate(spans):
                for _, start, end in found:
                    assert mask[b, start] and mask[b, end] and start <= end
        real = decode_spans(scores, threshold=-1e3)
        n_real = [int(m.sum()) for m in mask]
        assert [len(s) for s in real] == [2 * n * (n + 1) // 2 for n in n_real]


def test_decode_spans_token_and_char_offsets():
    # "[CLS] 北京 欢迎 你 [SEP]": tokens 1..3 cover chars 0-1, 2-3, 4.
    mapping = [[], [0, 1], [2, 3], [4], []]
    scores = np.full((2, 5, 5), -5.0)
    scores[0, 1, 1] = 3.0  # LOC "北京"
    scores[1, 2, 3] = 1.0  # PER-ish span "欢迎你"
    scores[1, 0, 1] = 9.0  # starts on [CLS]: dropped with a mapping
    scores[0, 3, 2] = 9.0  # end < start: never a span
    assert decode_spans(scores) == [(1, 0, 1), (0, 1, 1), (1, 2, 3)]
    assert decode_spans(scores, threshold=2.0) == [(1, 0, 1), (0, 1, 1)]
    assert decode_spans(scores, mapping=mapping, categories=["LOC", "PER"]) == [
        ("LOC", 0, 1),
        ("PER", 2, 4),
    ]
    batch = decode_spans(np.stack([scores, scores]), mapping=[mapping, mapping])
    assert batch == [[(0, 0, 1), (1, 2, 4)]] * 2
    with pytest.raises(ValueError, match="mapping covers 7 tokens but the scores only 5"):
        decode_spans(scores, mapping=mapping + [[5], [6]])
    with pytest.raises(ValueError, match=r"\(heads, seq, seq\)"):
        decode_spans(np.zeros((5, 5)))


# ---------------------------------- Pooling --------------------------------


def test_pooling_ignores_padding_exactly():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]])
    x[mask == 0] = np.array([np.inf, -np.inf, np.nan, 1e30], "float32")  # must not leak
    avg = np_(GlobalAveragePooling1D()([x, mask]))
    mx = np_(GlobalMaxPooling1D()([x, mask]))
    for b in range(3):
        real = x[b][mask[b] == 1].astype("float64")
        np.testing.assert_allclose(avg[b], real.mean(0), rtol=1e-6)
        np.testing.assert_array_equal(mx[b], real.max(0).astype("float32"))
    empty = np_(GlobalMaxPooling1D(keepdims=True)([x[:1], np.zeros((1, 5))]))
    assert empty.shape == (1, 1, 4) and np.all(empty == 0)
    assert np.all(np_(GlobalAveragePooling1D()([x[:1], np.zeros((1, 5))])) == 0)


def test_pooling_uses_keras_mask():
    ids = np.array([[4, 2, 0, 0], [1, 1, 1, 3]])
    inp = keras.Input((4,), dtype="int32")
    emb = keras.layers.Embedding(6, 3, mask_zero=True)
    x = emb(inp)
    model = keras.Model(inp, [GlobalAveragePooling1D()(x), GlobalMaxPooling1D()(x)])
    avg, mx = model.predict(ids, verbose=0)
    table = np_(emb.embeddings)
    for b in range(2):
        real = table[ids[b][ids[b] != 0]]
        np.testing.assert_allclose(avg[b], real.mean(0), rtol=1e-6)
        np.testing.assert_array_equal(mx[b], real.max(0))


# ------------------------------ Serialization ------------------------------

LAYERS = [
    ConditionalRandomField(lr_multiplier=7),
    MaximumEntropyMarkovModel(lr_multiplier=3, hidden_dim=5, bidirectional=False),
    GlobalPointer(3, 8, RoPE=False, use_bias=False, tril_mask=False),
    EfficientGlobalPointer(2, 6, kernel_initializer="glorot_uniform"),
    GlobalAveragePooling1D(keepdims=True),
    GlobalMaxPooling1D(),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: type(layer).__name__)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer) and revived.get_config() == config


def test_compiled_model_with_heads_saves_and_reloads(tmp_path):
    ids = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(20, 8)(ids)
    crf = ConditionalRandomField(lr_multiplier=5)
    tags = crf([keras.layers.Dense(3)(x), ids])
    spans = EfficientGlobalPointer(2, 4)([x, ids])
    pooled = GlobalMaxPooling1D()([x, ids])
    model = keras.Model(ids, [tags, spans, pooled])
    model.compile(
        "adam",
        loss=[crf.sparse_loss, losses.sparse_global_pointer_crossentropy, None],
        metrics=[[crf.sparse_accuracy], [losses.GlobalPointerF1(sparse=True)], None],
    )
    data = np.array([[3, 4, 5, 0], [7, 8, 9, 10]])
    y = [np.array([[0, 1, 2, 0], [2, 2, 1, 0]]), np.array([[[[1, 2]], [[0, 0]]]] * 2), None]
    model.fit(data, y[:2], epochs=1, verbose=0)  # so the optimizer state is saved too
    before = model.predict(data, verbose=0)
    path = str(tmp_path / "heads.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    after = reloaded.predict(data, verbose=0)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    crf2 = [layer for layer in reloaded.layers if isinstance(layer, ConditionalRandomField)][0]
    np.testing.assert_allclose(np_(crf2.trans), np_(crf.trans), rtol=1e-6)
    np.testing.assert_array_equal(crf2.decode(after[0]), crf.decode(before[0]))
    # The restored loss/metrics work and use the restored layer's weights.
    results = reloaded.evaluate(data, y[:2], verbose=0)
    np.testing.assert_allclose(results, model.evaluate(data, y[:2], verbose=0), rtol=1e-5)
    crf2._trans.assign(np_(crf2._trans) + np.arange(9.0).reshape(3, 3))  # not a constant shift
    assert reloaded.evaluate(data, y[:2], verbose=0)[0] != pytest.approx(results[0])


# ---------------------------------- fit -----------------------------------


def tagging_data(n=64, length=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 20, size=(n, length))
    lengths = rng.integers(3, length + 1, size=n)
    ids[np.arange(length)[None] >= lengths[:, None]] = 0
    tags = np.where(ids > 0, ids % 3, 0)
    return ids, tags


def span_labels(ids):
    """Dense (batch, 2, seq, seq) labels: one-token spans of ids < 7 (type 0)
    and two-token spans starting on an id >= 15 (type 1)."""
    y = np.zeros((len(ids), 2, ids.shape[1], ids.shape[1]), "float32")
    for b, row in enumerate(ids):
        for i, t in enumerate(row):
            if 0 < t < 7:
                y[b, 0, i, i] = 1
            if t >= 15 and i + 1 < len(row) and row[i + 1] > 0:
                y[b, 1, i, i + 1] = 1
    return y


def dense_to_sparse_spans(y, max_spans=8):
    out = np.zeros(y.shape[:2] + (max_spans, 2), "int32")
    for b, h in itertools.product(range(y.shape[0]), range(y.shape[1])):
        found = np.argwhere(y[b, h] > 0)[:max_spans]
        out[b, h, : len(found)] = found
    return out


def build_head_model(head):
    ids = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(20, 16)(ids)
    if head in ("crf", "memm"):
        if head == "crf":
            layer = ConditionalRandomField(lr_multiplier=10)
        else:
            layer = MaximumEntropyMarkovModel()
        out = layer([keras.layers.Dense(3)(x), ids])
        return keras.Model(ids, out), layer.sparse_loss, [layer.sparse_accuracy]
    if head in ("gp", "egp", "gp_sparse"):
        cls = EfficientGlobalPointer if head == "egp" else GlobalPointer
        out = cls(2, 8)([x, ids])
        if head == "gp_sparse":
            return keras.Model(ids, out), losses.sparse_global_pointer_crossentropy, [
                losses.GlobalPointerF1(sparse=True)
            ]
        return keras.Model(ids, out), losses.global_pointer_crossentropy, [
            losses.global_pointer_f1_score,
            losses.GlobalPointerF1(),
        ]
    pooling = GlobalAveragePooling1D() if head == "avg" else GlobalMaxPooling1D()
    pooled = pooling([x, ids])
    model = keras.Model(ids, keras.layers.Dense(2)(pooled))
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), []


@pytest.mark.parametrize("head", ["crf", "memm", "gp", "egp", "gp_sparse", "avg", "max"])
def test_fit_makes_loss_fall(head):
    keras.utils.set_random_seed(0)
    ids, tags = tagging_data()
    if head in ("crf", "memm"):
        y = tags
    elif head.startswith("gp") or head == "egp":
        y = span_labels(ids)
        y = dense_to_sparse_spans(y) if head == "gp_sparse" else y
    else:
        y = np.any(ids == 3, axis=1).astype("int32")
    model, loss, metrics = build_head_model(head)
    model.compile(keras.optimizers.Adam(0.02), loss=loss, metrics=metrics)
    history = model.fit(ids, y, batch_size=16, epochs=6, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert history["loss"][-1] < 0.7 * history["loss"][0], history["loss"]
    if head == "gp":
        assert history["global_pointer_f1"][-1] > history["global_pointer_f1"][0]


# -------------------------------- bad input --------------------------------


def test_out_of_range_labels_raise_eagerly():
    emissions, trans, tags = random_case(11)
    crf = make_crf(trans)
    scores = crf([emissions, MASKS["right"]])
    bad = tags.copy()
    bad[1, 2] = 7
    with pytest.raises(ValueError, match=r"Tag label 7 at \(sample 1, position 2\).*\[0, 3\)"):
        crf.sparse_loss(bad, scores)
    bad[1, 2], bad[1, 4] = 0, 7  # on padding: ignored
    assert np.isfinite(np_(crf.sparse_loss(bad, scores))).all()
    memm = MaximumEntropyMarkovModel()
    with pytest.raises(ValueError, match="outside the tag set"):
        memm.sparse_loss(np.full((4, 5), -1), memm(emissions))


def test_label_length_mismatch_raises():
    emissions, trans, tags = random_case(12)
    crf = make_crf(trans)
    scores = crf(emissions)
    longer = np.concatenate([tags, tags[:, :1]], axis=1)
    with pytest.raises(ValueError, match="length 6 but the inputs have 5 positions"):
        crf.sparse_loss(longer, scores)
    with pytest.raises(ValueError, match="number of tags 4 but the scores have 3"):
        crf.dense_loss(np.zeros((4, 5, 4)), scores)
    with pytest.raises(ValueError, match="length 6 but the inputs have 5 positions"):
        check_tag_labels(longer, 3, mask=np.ones((4, 5)))
    with pytest.raises(ValueError, match="covers 4 positions but the inputs have 5"):
        crf([emissions, np.ones((4, 4))])
    model, loss, _ = build_head_model("crf")  # input length None: checked in fit's trace
    model.compile("adam", loss=loss)
    with pytest.raises(ValueError, match="length 6 but the inputs have 5 positions"):
        model.fit(np.ones((4, 5), "int32"), np.zeros((4, 6), "int32"), verbose=0)


def test_bad_labels_inside_fit_give_nan_loss():
    """Traced steps cannot raise on values: the bad sample's loss is NaN."""
    ids, tags = tagging_data(n=16)
    model, loss, _ = build_head_model("crf")
    model.compile("adam", loss=loss)
    tags[3, 0] = 5
    result = model.evaluate(ids, tags, batch_size=16, verbose=0)
    assert np.isnan(result)
    crf = next(layer for layer in model.layers if isinstance(layer, ConditionalRandomField))
    with pytest.raises(ValueError, match=r"Tag label 5 at \(sample 3, position 0\)"):
        crf.check_labels(tags, mask=ids)


def test_restored_function_without_its_layer_says_how_to_fix():
    orphan = TaggerFunction("no_such_crf", "sparse_loss")
    with pytest.raises(ValueError, match=r"No live layer named 'no_such_crf'.*crf.sparse_loss"):
        orphan(np.zeros((1, 2)), np.zeros((1, 2, 3)))


def test_constructor_errors():
    with pytest.raises(ValueError, match="head_size=5 must be even"):
        GlobalPointer(2, 5)
    with pytest.raises(ValueError, match=r"`x` or `\[x, mask\]`"):
        GlobalAveragePooling1D()([np.zeros((1, 2, 3)), np.ones((1, 2)), np.ones((1, 2))])
