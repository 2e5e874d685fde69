"""Tests of the core layers in bert4keras.layers (above the zoo markers).

Each layer gets a get_config -> from_config round trip (same config, same
outputs once the weights are copied) and a numerical check against an
explicit numpy reference. float32 unless a test says otherwise; tolerances
are stated where they are used.
"""
import math

import keras
import numpy as np
import pytest
from keras import ops

from bert4keras import backend, layers

ATOL = 1e-5  # float32 results against float64 numpy references
ON_TF = keras.backend.backend() == "tensorflow"


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def randomize(layer, seed=0, scale=0.5):
    """Give every weight (biases included) random values, so none is a no-op."""
    rng = np.random.default_rng(seed)
    shapes = [w.shape for w in layer.get_weights()]
    layer.set_weights([rng.normal(scale=scale, size=shape).astype("float32") for shape in shapes])


def check_round_trip(layer, call, atol=ATOL):
    """get_config -> from_config gives the same config and, with the weights
    copied over, the same outputs; keras' registry finds the class by name."""
    outputs = call(layer)
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    call(clone)  # builds the clone
    clone.set_weights(layer.get_weights())
    for got, expected in zip(keras.tree.flatten(call(clone)), keras.tree.flatten(outputs)):
        np.testing.assert_allclose(to_numpy(got), to_numpy(expected), atol=atol)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == config


def erf_gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


# ---------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------


def test_embedding_lookup_and_dense_mode():
    emb = layers.Embedding(11, 6)
    ids = np.array([[1, 2, 10], [0, 5, 5]], dtype="int32")
    out = to_numpy(emb(ids))
    table = to_numpy(emb.embeddings)
    assert out.shape == (2, 3, 6)
    np.testing.assert_array_equal(out, table[ids])
    # Float ids (as some pipelines feed them) are looked up the same way.
    np.testing.assert_array_equal(to_numpy(emb(ids.astype("float32"))), table[ids])
    # Tied output projection: h @ E^T.
    h = np.random.default_rng(0).normal(size=(2, 3, 6)).astype("float32")
    np.testing.assert_allclose(to_numpy(emb(h, mode="dense")), h @ table.T, atol=ATOL)


def test_embedding_unknown_mode():
    emb = layers.Embedding(5, 4)
    with pytest.raises(ValueError, match="Unknown mode 'lookup'"):
        emb(np.array([[1]]), mode="lookup")


def test_embedding_in_a_functional_model():
    ids = keras.Input((None,), dtype="int32")
    emb = layers.Embedding(7, 4)
    logits = emb(emb(ids), mode="dense")
    model = keras.Model(ids, logits)
    assert tuple(model.output.shape) == (None, None, 7)
    x = np.array([[1, 6, 3]], dtype="int32")
    table = to_numpy(emb.embeddings)
    np.testing.assert_allclose(model.predict(x, verbose=0), table[x] @ table.T, atol=ATOL)


def test_embedding_round_trip():
    ids = np.array([[1, 2, 3]], dtype="int32")
    layer = layers.Embedding(9, 4, embeddings_initializer="normal", name="tok")
    check_round_trip(layer, lambda l: l(ids))


def test_mixed_precision_lookups_cast_the_rows_not_the_table():
    """Under mixed_bfloat16 the tables stay float32 and only the looked-up rows
    are cast: casting BERT-base's whole token table (30522 x 768 values) on
    every call cost 4.8 ms per call on the 2-core CPU, a third of a 1-layer
    model's op time (benchmarks/README.md)."""
    ids = np.array([[1, 2, 10], [0, 5, 5]], dtype="int32")
    emb = layers.Embedding(11, 6, embeddings_initializer="normal", dtype="mixed_bfloat16")
    pos = layers.PositionEmbedding(11, 6, embeddings_initializer="normal", dtype="mixed_bfloat16")
    h = emb(ids)
    out = pos(h)
    assert emb.embeddings.dtype == "float32" and pos.embeddings.dtype == "float32"
    assert "bfloat16" in str(h.dtype) and "bfloat16" in str(out.dtype)
    bf16 = lambda x: to_numpy(ops.cast(ops.cast(x, "bfloat16"), "float32"))
    rows = bf16(to_numpy(emb.embeddings)[ids])
    np.testing.assert_array_equal(to_numpy(ops.cast(h, "float32")), rows)
    want = bf16(rows + bf16(to_numpy(pos.embeddings)[:3]))
    np.testing.assert_array_equal(to_numpy(ops.cast(out, "float32")), want)
    if ON_TF:
        import tensorflow as tf

        graph = tf.function(lambda x: pos(emb(x))).get_concrete_function(tf.constant(ids)).graph
        cast_shapes = [tuple(op.inputs[0].shape) for op in graph.get_operations() if op.type == "Cast"]
        assert (11, 6) not in cast_shapes, cast_shapes


# ---------------------------------------------------------------------------
# PositionEmbedding
# ---------------------------------------------------------------------------


def position_layer(**kwargs):
    layer = layers.PositionEmbedding(**{"input_dim": 6, "output_dim": 4, **kwargs})
    layer.build()
    randomize(layer, seed=1)
    return layer


X_POS = np.random.default_rng(2).normal(size=(2, 5, 4)).astype("float32")


def test_position_embedding_merge_modes():
    for mode in ["add", "mul", "zero", "concat"]:
        layer = position_layer(merge_mode=mode)
        table = to_numpy(layer.embeddings)[:5]
        out = to_numpy(layer(X_POS))
        if mode == "add":
            expected = X_POS + table
        elif mode == "mul":
            expected = X_POS * (table + 1.0)
        elif mode == "zero":
            expected = np.broadcast_to(table, (2, 5, 4))
        else:
            expected = np.concatenate([X_POS, np.broadcast_to(table, (2, 5, 4))], axis=-1)
        assert out.shape == expected.shape, mode
        np.testing.assert_allclose(out, expected, atol=ATOL, err_msg=mode)


@pytest.mark.parametrize("mode, width", [("add", 4), ("zero", 4), ("concat", 7)])
def test_position_embedding_output_shape_in_a_model(mode, width):
    x_in = keras.Input((None, 3 if mode == "concat" else 4))
    out = layers.PositionEmbedding(6, 4, merge_mode=mode)(x_in)
    assert tuple(out.shape) == (None, None, width)


def test_position_embedding_custom_position_ids():
    layer = position_layer(custom_position_ids=True)
    pos = np.array([[5, 0, 3, 3, 1], [0, 1, 2, 3, 4]], dtype="int32")
    out = to_numpy(layer([X_POS, pos]))
    np.testing.assert_allclose(out, X_POS + to_numpy(layer.embeddings)[pos], atol=ATOL)


def test_position_embedding_position_ids_argument():
    # Cached decoding passes the absolute positions of the new tokens.
    layer = position_layer()
    pos = np.array([[3, 4]], dtype="int32")
    out = to_numpy(layer(X_POS[:1, :2], position_ids=pos))
    np.testing.assert_allclose(out, X_POS[:1, :2] + to_numpy(layer.embeddings)[pos], atol=ATOL)


def hierarchical_reference(table, length, alpha):
    u = (table - alpha * table[0]) / (1 - alpha)
    n = table.shape[0]
    return np.stack([alpha * u[i // n] + (1 - alpha) * u[i % n] for i in range(length)])


@pytest.mark.parametrize("hierarchical, alpha", [(True, 0.4), (0.25, 0.25)])
def test_position_embedding_hierarchical(hierarchical, alpha):
    layer = position_layer(hierarchical=hierarchical, merge_mode="zero")
    table = to_numpy(layer.embeddings).astype(np.float64)
    length = 30  # up to 6 * 6 = 36 positions from a table of 6
    out = to_numpy(layer(np.zeros((1, length, 4), "float32")))[0]
    np.testing.assert_allclose(out, hierarchical_reference(table, length, alpha), atol=ATOL)
    # The first n positions are the table itself, so short inputs are unchanged.
    np.testing.assert_allclose(out[:6], table, atol=ATOL)


def test_position_embedding_too_long_eager():
    layer = position_layer()
    with pytest.raises(ValueError, match=r"max_position \(6\).*Got length 7"):
        layer(np.zeros((1, 7, 4), "float32"))
    layer(np.zeros((1, 6, 4), "float32"))  # exactly max_position is fine


def test_position_embedding_too_long_in_predict():
    x_in = keras.Input((None, 4))
    model = keras.Model(x_in, layers.PositionEmbedding(6, 4)(x_in))
    # The first trace sees the static length, so the check is a python raise.
    with pytest.raises(ValueError, match=r"max_position \(6\).*Got length 9"):
        model.predict(np.zeros((2, 9, 4), "float32"), verbose=0)
    if ON_TF:
        # The model stays usable. (Keras' JAX trainer leaves the variables of
        # a model whose predict raised unset, so this is TF-only.)
        assert model.predict(np.zeros((2, 6, 4), "float32"), verbose=0).shape == (2, 6, 4)


def graph_ancestors(op):
    """Every op that `op` waits for, through data and control inputs."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def test_position_embedding_too_long_inside_a_compiled_function():
    layer = position_layer()
    if ON_TF:
        import tensorflow as tf

        # An unknown length at trace time: the check has to run in the graph.
        @tf.function(input_signature=[tf.TensorSpec((None, None, 4), tf.float32)])
        def embed(x):
            return layer(x)

        # The lookup must wait for the length check; otherwise which error
        # comes out is a race (measured: the gather's ~20% of the time).
        graph = embed.get_concrete_function().graph
        gathers = [op for op in graph.get_operations() if "Gather" in op.type]
        assert gathers
        for gather in gathers:
            assert any(op.type == "Assert" for op in graph_ancestors(gather)), gather.name

        for _ in range(20):
            with pytest.raises(tf.errors.InvalidArgumentError, match=r"max_position \(6\)"):
                embed(tf.zeros((1, 7, 4)))
        # Model.predict relaxes the length to None after a few lengths.
        x_in = keras.Input((None, 4))
        model = keras.Model(x_in, layer(x_in))
        for length in (2, 3, 4):
            model.predict(np.zeros((1, length, 4), "float32"), verbose=0)
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"max_position \(6\)"):
            model.predict(np.zeros((1, 7, 4), "float32"), verbose=0)
    else:
        import jax

        # jax.jit always traces with the static length.
        with pytest.raises(ValueError, match=r"max_position \(6\)"):
            jax.jit(layer)(np.zeros((1, 7, 4), "float32"))


def test_position_embedding_bad_merge_mode():
    with pytest.raises(ValueError, match="Unknown merge_mode 'sum'"):
        layers.PositionEmbedding(6, 4, merge_mode="sum")


@pytest.mark.parametrize(
    "kwargs", [{"merge_mode": "concat"}, {"hierarchical": 0.3}, {"custom_position_ids": True}]
)
def test_position_embedding_round_trip(kwargs):
    layer = layers.PositionEmbedding(6, 4, name="pos", **kwargs)
    if kwargs.get("custom_position_ids"):
        pos = np.array([[1, 0, 2, 2, 5], [0, 1, 2, 3, 4]], dtype="int32")
        check_round_trip(layer, lambda l: l([X_POS, pos]))
    else:
        layer.build()
        randomize(layer)
        check_round_trip(layer, lambda l: l(X_POS))


# ---------------------------------------------------------------------------
# LayerNormalization
# ---------------------------------------------------------------------------

X_LN = np.random.default_rng(3).normal(loc=0.7, scale=2.0, size=(2, 3, 8)).astype("float32")
C_LN = np.random.default_rng(4).normal(size=(2, 5)).astype("float32")


def layer_norm_reference(x, gamma=None, beta=None, center=True, epsilon=1e-12):
    x = x.astype(np.float64)
    if center:
        x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + epsilon)
    if gamma is not None:
        x = x * gamma
    if beta is not None:
        x = x + beta
    return x


def test_layer_norm_standard():
    ln = layers.LayerNormalization(epsilon=1e-5)
    ln.build(X_LN.shape)
    randomize(ln)
    gamma, beta = to_numpy(ln.gamma), to_numpy(ln.beta)
    expected = layer_norm_reference(X_LN, gamma, beta, epsilon=1e-5)
    np.testing.assert_allclose(to_numpy(ln(X_LN)), expected, atol=ATOL)


def test_layer_norm_rms():
    ln = layers.LayerNormalization(center=False, epsilon=1e-6)
    ln.build(X_LN.shape)
    assert [w.name for w in ln.weights] == ["gamma"]  # no offset
    randomize(ln)
    expected = layer_norm_reference(X_LN, to_numpy(ln.gamma), center=False, epsilon=1e-6)
    np.testing.assert_allclose(to_numpy(ln(X_LN)), expected, atol=ATOL)


def test_layer_norm_without_scale():
    ln = layers.LayerNormalization(center=False, scale=False)
    assert ln.get_config()["epsilon"] == 1e-12
    np.testing.assert_allclose(
        to_numpy(ln(X_LN)), layer_norm_reference(X_LN, center=False), atol=ATOL
    )


@pytest.mark.parametrize("hidden_units", [None, 3])
def test_layer_norm_conditional(hidden_units):
    plain = layers.LayerNormalization()
    plain.build(X_LN.shape)
    randomize(plain, seed=5)
    cond = layers.LayerNormalization(conditional=True, hidden_units=hidden_units)
    cond.build([X_LN.shape, C_LN.shape])
    cond.gamma.assign(plain.gamma)
    cond.beta.assign(plain.beta)
    # The condition denses start at zero: at init it is the plain layer norm.
    np.testing.assert_allclose(to_numpy(cond([X_LN, C_LN])), to_numpy(plain(X_LN)), atol=ATOL)

    randomize(cond, seed=6)
    c = C_LN.astype(np.float64)
    if hidden_units is not None:
        c = c @ to_numpy(cond.hidden_dense.kernel)  # linear activation, no bias
    gamma = to_numpy(cond.gamma) + c @ to_numpy(cond.gamma_dense.kernel)
    beta = to_numpy(cond.beta) + c @ to_numpy(cond.beta_dense.kernel)
    # (batch, dim) gain/offset broadcast over the sequence axis.
    expected = layer_norm_reference(X_LN, gamma[:, None], beta[:, None])
    got = to_numpy(cond([X_LN, C_LN]))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(got - to_numpy(plain(X_LN))).max() > 0.1  # the condition matters


def test_layer_norm_conditional_in_a_model():
    x_in, c_in = keras.Input((None, 8)), keras.Input((5,))
    out = layers.LayerNormalization(conditional=True, hidden_units=4)([x_in, c_in])
    assert tuple(out.shape) == (None, None, 8)


def test_layer_norm_float32_statistics_under_bfloat16():
    # Inputs with a large mean: the sum over 256 features is ~25,000, where
    # bfloat16 has a resolution of 128, so bf16 statistics would be far off.
    rng = np.random.default_rng(7)
    x = (100.0 + rng.normal(size=(2, 4, 256))).astype("float32")
    x_bf16 = to_numpy(ops.cast(ops.cast(x, "bfloat16"), "float32"))  # what the layer sees
    ln = layers.LayerNormalization(dtype="mixed_bfloat16")
    out = ln(x)
    assert "bfloat16" in str(out.dtype)
    assert ln.gamma.dtype == "float32"
    expected = layer_norm_reference(x_bf16)
    # Tolerance: rounding the output (|y| < 4) to bfloat16, 2^-7 relative.
    tol = 2e-2
    np.testing.assert_allclose(to_numpy(ops.cast(out, "float32")), expected, atol=tol)
    # Sanity check of the test: the same steps in bfloat16 miss that tolerance.
    xb = ops.cast(x, "bfloat16")
    centered = xb - ops.mean(xb, axis=-1, keepdims=True)
    naive = centered * ops.rsqrt(ops.mean(ops.square(centered), axis=-1, keepdims=True) + 1e-12)
    assert np.abs(to_numpy(ops.cast(naive, "float32")) - expected).max() > tol


def test_layer_norm_round_trip():
    ln = layers.LayerNormalization(center=False, epsilon=1e-6, name="ln")
    ln.build(X_LN.shape)
    randomize(ln)
    check_round_trip(ln, lambda l: l(X_LN))
    cond = layers.LayerNormalization(conditional=True, hidden_units=3, hidden_activation="relu")
    cond.build([X_LN.shape, C_LN.shape])
    randomize(cond)
    check_round_trip(cond, lambda l: l([X_LN, C_LN]), atol=1e-4)


# ---------------------------------------------------------------------------
# MultiHeadAttention
# ---------------------------------------------------------------------------

BATCH, Q_LEN, K_LEN, DIM = 2, 4, 5, 8


def mha_layer(seed=0, **kwargs):
    kwargs = {"heads": 2, "head_size": 4, **kwargs}
    layer = layers.MultiHeadAttention(**kwargs)
    layer.build([(None, None, DIM)] * 3)
    randomize(layer, seed=seed, scale=0.4)
    return layer


def dense_np(dense, x):
    y = x.astype(np.float64) @ to_numpy(dense.kernel)
    return y + to_numpy(dense.bias) if dense.use_bias else y


def rotate_np(x, positions, base=10000.0):
    """x: (batch, seq, heads, dim); rotate pair (2i, 2i+1) by pos * base^(-2i/dim)."""
    out = x.copy()
    dim = x.shape[-1]
    for s, pos in enumerate(positions):
        for i in range(dim // 2):
            theta = pos * base ** (-2 * i / dim)
            a, b = x[:, s, :, 2 * i], x[:, s, :, 2 * i + 1]
            out[:, s, :, 2 * i] = a * math.cos(theta) - b * math.sin(theta)
            out[:, s, :, 2 * i + 1] = a * math.sin(theta) + b * math.cos(theta)
    return out


def mha_reference(layer, q, k, v, mask=None, bias=None):
    """Explicit attention: softmax(Q K^T * scale + mask) V, then the output dense.

    Rotary layers rotate q and k by their positions 0, 1, ... Returns
    (output, pre-softmax scores with the bias added, masked entries -inf).
    """
    heads, ks, hs = layer.heads, layer.key_size, layer.head_size
    qw = dense_np(layer.q_dense, q).reshape(q.shape[0], q.shape[1], heads, ks)
    kw = dense_np(layer.k_dense, k).reshape(k.shape[0], k.shape[1], heads, ks)
    vw = dense_np(layer.v_dense, v).reshape(v.shape[0], v.shape[1], heads, hs)
    if layer.position_encoding == "rotary":
        qw = rotate_np(qw, range(q.shape[1]))
        kw = rotate_np(kw, range(k.shape[1]))
    scale = 1 / math.sqrt(ks) if layer.attention_scale else 1.0
    scores = np.einsum("bqhd,bkhd->bhqk", qw, kw) * scale
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, vw).reshape(q.shape[0], q.shape[1], heads * hs)
    return dense_np(layer.o_dense, out), scores


RNG = np.random.default_rng(10)
Q = RNG.normal(size=(BATCH, Q_LEN, DIM)).astype("float32")
KV = RNG.normal(size=(BATCH, K_LEN, DIM)).astype("float32")
# (batch, 1, q, k): query i sees keys 0..i+1, and row 1's last key is padding.
KEY_IDS = np.array([[3, 4, 5, 6, 7], [3, 4, 5, 6, 0]], dtype="int32")
BOOL_MASK = (KEY_IDS != 0)[:, None, None, :] & (
    np.arange(K_LEN)[None, :] <= np.arange(Q_LEN)[:, None] + 1
)[None, None]
FLOAT_BIAS = RNG.normal(size=(BATCH, 2, Q_LEN, K_LEN)).astype("float32")


def test_mha_no_mask():
    layer = mha_layer()
    expected, _ = mha_reference(layer, Q, KV, KV)
    np.testing.assert_allclose(to_numpy(layer([Q, KV, KV])), expected, atol=ATOL)


def test_mha_boolean_mask():
    layer = mha_layer()
    expected, _ = mha_reference(layer, Q, KV, KV, mask=BOOL_MASK)
    got = to_numpy(layer([Q, KV, KV], attention_mask=BOOL_MASK))
    np.testing.assert_allclose(got, expected, atol=ATOL)
    # The mask matters: without it the output is different.
    assert np.abs(got - to_numpy(layer([Q, KV, KV]))).max() > 1e-2


def test_mha_additive_float_bias():
    layer = mha_layer()
    expected, _ = mha_reference(layer, Q, KV, KV, bias=FLOAT_BIAS)
    got = to_numpy(layer([Q, KV, KV], attention_mask=FLOAT_BIAS))
    np.testing.assert_allclose(got, expected, atol=ATOL)


def test_mha_mask_from_bias_equals_boolean_mask():
    layer = mha_layer()
    from_bool = to_numpy(layer([Q, KV, KV], attention_mask=BOOL_MASK))
    from_bias = to_numpy(layer([Q, KV, KV], attention_mask=backend.mask_to_bias(BOOL_MASK)))
    np.testing.assert_allclose(from_bias, from_bool, atol=ATOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key_size": 6},
        {"out_dim": 5},
        {"use_bias": False},
        {"attention_scale": False},
        {"heads": 4, "head_size": 3, "key_size": 2, "out_dim": 6, "use_bias": False},
    ],
)
def test_mha_variants(kwargs):
    layer = mha_layer(**kwargs)
    if not layer.use_bias:
        assert all("bias" not in w.name for w in layer.weights)
    expected, _ = mha_reference(layer, Q, KV, KV, mask=BOOL_MASK)
    got = to_numpy(layer([Q, KV, KV], attention_mask=BOOL_MASK))
    assert got.shape == (BATCH, Q_LEN, kwargs.get("out_dim", DIM))
    np.testing.assert_allclose(got, expected, atol=ATOL)


@pytest.mark.parametrize("mask", ["bool", "bias"])
def test_mha_return_attention_scores_and_fused_path(mask):
    fused = mha_layer()
    explicit = mha_layer(return_attention_scores=True)
    explicit.set_weights(fused.get_weights())
    attention_mask = BOOL_MASK if mask == "bool" else FLOAT_BIAS
    out, scores = explicit([Q, KV, KV], attention_mask=attention_mask)
    fused_out = fused([Q, KV, KV], attention_mask=attention_mask)
    np.testing.assert_allclose(to_numpy(fused_out), to_numpy(out), atol=ATOL)
    expected_out, expected_scores = mha_reference(
        fused, Q, KV, KV, mask=BOOL_MASK if mask == "bool" else None,
        bias=FLOAT_BIAS if mask == "bias" else None,
    )
    np.testing.assert_allclose(to_numpy(out), expected_out, atol=ATOL)
    scores = to_numpy(scores)
    assert scores.shape == (BATCH, 2, Q_LEN, K_LEN)
    visible = np.broadcast_to(BOOL_MASK if mask == "bool" else True, scores.shape)
    # Scores are pre-softmax logits (scaled, bias added); masked ones are NEG_INF.
    np.testing.assert_allclose(scores[visible], expected_scores[visible], atol=ATOL)
    assert np.all(scores[~visible] <= -1e8)


def test_mha_scores_in_a_functional_model():
    x_in = keras.Input((None, DIM))
    out, scores = layers.MultiHeadAttention(2, 4, return_attention_scores=True)([x_in, x_in, x_in])
    assert tuple(out.shape) == (None, None, DIM)
    assert tuple(scores.shape) == (None, 2, None, None)


def test_mha_attention_dropout_only_in_training():
    layer = mha_layer(attention_dropout=0.5)
    expected, _ = mha_reference(layer, Q, KV, KV, mask=BOOL_MASK)
    inference = to_numpy(layer([Q, KV, KV], attention_mask=BOOL_MASK, training=False))
    np.testing.assert_allclose(inference, expected, atol=ATOL)
    default = to_numpy(layer([Q, KV, KV], attention_mask=BOOL_MASK))  # training unset
    np.testing.assert_allclose(default, expected, atol=ATOL)
    train = to_numpy(layer([Q, KV, KV], attention_mask=BOOL_MASK, training=True))
    assert np.abs(train - expected).max() > 1e-2


# apply_rotary fails on TensorFlow (and under jax.jit); see test_backend.py.


def test_mha_rotary():
    layer = mha_layer(position_encoding="rotary")
    expected, _ = mha_reference(layer, Q, KV, KV, mask=BOOL_MASK)
    got = to_numpy(layer([Q, KV, KV], attention_mask=BOOL_MASK))
    np.testing.assert_allclose(got, expected, atol=ATOL)
    # Rotary is not a no-op.
    plain = mha_layer()
    plain.set_weights(layer.get_weights())
    assert np.abs(got - to_numpy(plain([Q, KV, KV], attention_mask=BOOL_MASK))).max() > 1e-3


def test_mha_rotary_needs_an_even_key_size():
    with pytest.raises(ValueError, match="even"):
        layer = layers.MultiHeadAttention(2, 4, key_size=3, position_encoding="rotary")
        layer([Q, Q, Q])


def test_mha_bad_position_encoding():
    with pytest.raises(ValueError, match="Unknown position_encoding 'alibi'"):
        layers.MultiHeadAttention(2, 4, position_encoding="alibi")


@pytest.mark.parametrize(
    "position_encoding", [None, "rotary"]
)
def test_mha_cache_matches_full_causal_attention(position_encoding):
    layer = mha_layer(seed=3, position_encoding=position_encoding)
    steps = 5
    x = np.random.default_rng(11).normal(size=(BATCH, steps, DIM)).astype("float32")
    full = to_numpy(layer([x, x, x], attention_mask=backend.causal_mask(steps)))
    causal = np.tril(np.ones((steps, steps), bool))[None, None]
    expected, _ = mha_reference(layer, x, x, x, mask=causal)
    np.testing.assert_allclose(full, expected, atol=ATOL)

    # Prefill the first two positions at once, then one position per call;
    # each call writes its keys and values into the (keys, values) pair.
    cache = (ops.zeros((BATCH, 2, steps, 4)), ops.zeros((BATCH, 2, steps, 4)))
    chunks = [(0, 2)] + [(t, t + 1) for t in range(2, steps)]
    for start, end in chunks:
        xt = x[:, start:end]
        mask = backend.causal_mask(end - start, steps, offset=start)
        out, *cache = layer([xt, xt, xt], attention_mask=mask, cache=cache, cache_index=start)
        assert [tuple(c.shape) for c in cache] == [(BATCH, 2, steps, 4)] * 2
        np.testing.assert_allclose(
            to_numpy(out), full[:, start:end], atol=ATOL, err_msg=f"step {start}"
        )
    # The cache holds the (rotated) keys and the values of every position, heads first.
    kw = dense_np(layer.k_dense, x).reshape(BATCH, steps, 2, 4)
    if position_encoding == "rotary":
        kw = rotate_np(kw, range(steps))
    np.testing.assert_allclose(to_numpy(cache[0]), kw.transpose(0, 2, 1, 3), atol=ATOL)
    vw = dense_np(layer.v_dense, x).reshape(BATCH, steps, 2, 4)
    np.testing.assert_allclose(to_numpy(cache[1]), vw.transpose(0, 2, 1, 3), atol=ATOL)


def test_mha_cache_needs_equal_key_and_head_size():
    layer = mha_layer(key_size=6)
    with pytest.raises(ValueError, match="key_size == head_size"):
        layer([Q, Q, Q], cache=(ops.zeros((BATCH, 2, Q_LEN, 4)),) * 2, cache_index=0)


@pytest.mark.parametrize(
    "position_encoding", [None, "rotary"]
)
def test_mha_round_trip(position_encoding):
    layer = layers.MultiHeadAttention(
        heads=2, head_size=4, key_size=6, out_dim=6, use_bias=False, attention_scale=False,
        attention_dropout=0.1, return_attention_scores=True,
        position_encoding=position_encoding, name="att",
    )
    layer.build([(None, None, DIM)] * 3)
    randomize(layer, scale=0.4)
    check_round_trip(layer, lambda l: l([Q, KV, KV], attention_mask=BOOL_MASK))


def test_mha_rotary_inside_a_compiled_model():
    x_in = keras.Input((None, DIM))
    layer = layers.MultiHeadAttention(2, 4, position_encoding="rotary")
    model = keras.Model(x_in, layer([x_in, x_in, x_in]))
    randomize(layer, scale=0.4)
    expected, _ = mha_reference(layer, KV, KV, KV)
    np.testing.assert_allclose(model.predict(KV, verbose=0), expected, atol=ATOL)


# ---------------------------------------------------------------------------
# FeedForward
# ---------------------------------------------------------------------------

X_FF = np.random.default_rng(12).normal(size=(2, 3, 8)).astype("float32")


def test_feed_forward_plain():
    ff = layers.FeedForward(16, activation="gelu")
    ff.build(X_FF.shape)
    randomize(ff)
    (i0,), o = ff.input_denses, ff.o_dense
    expected = dense_np(o, erf_gelu(dense_np(i0, X_FF)))
    np.testing.assert_allclose(to_numpy(ff(X_FF)), expected, atol=ATOL)


def test_feed_forward_gated():
    ff = layers.FeedForward(16, activation=["gelu_new", "linear"], use_bias=False)
    ff.build(X_FF.shape)
    assert all("bias" not in w.name for w in ff.weights)
    randomize(ff)
    i0, i1 = ff.input_denses
    h0 = dense_np(i0, X_FF)
    tanh_gelu = 0.5 * h0 * (1 + np.tanh(math.sqrt(2 / math.pi) * (h0 + 0.044715 * h0**3)))
    expected = dense_np(ff.o_dense, tanh_gelu * dense_np(i1, X_FF))
    np.testing.assert_allclose(to_numpy(ff(X_FF)), expected, atol=ATOL)


def test_feed_forward_round_trip():
    ff = layers.FeedForward(16, activation=["relu", "linear"], name="ffn")
    ff.build(X_FF.shape)
    randomize(ff)
    assert ff.get_config()["activation"] == ["relu", "linear"]
    check_round_trip(ff, lambda l: l(X_FF))
    plain = layers.FeedForward(8, activation="gelu")
    assert plain.get_config()["activation"] == "gelu"
    check_round_trip(plain, lambda l: l(X_FF))


# ---------------------------------------------------------------------------
# BiasAdd, TakeToken, AttentionMask
# ---------------------------------------------------------------------------


def test_bias_add():
    layer = layers.BiasAdd()
    layer.build(X_FF.shape)
    randomize(layer)
    np.testing.assert_allclose(to_numpy(layer(X_FF)), X_FF + to_numpy(layer.bias), atol=ATOL)
    check_round_trip(layer, lambda l: l(X_FF))


@pytest.mark.parametrize("index", [0, 2, -1])
def test_take_token(index):
    layer = layers.TakeToken(index)
    np.testing.assert_array_equal(to_numpy(layer(X_FF)), X_FF[:, index])
    check_round_trip(layer, lambda l: l(X_FF))
    x_in = keras.Input((None, 8))
    assert tuple(layers.TakeToken(index)(x_in).shape) == (None, 8)


TOKEN_IDS = np.array([[5, 6, 7, 8, 9], [5, 6, 7, 8, 0]], dtype="int32")
SEGMENT_IDS = np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]], dtype="int32")


@pytest.mark.parametrize("application", ["encoder", "lm", "unilm"])
def test_attention_mask_layer(application):
    layer = layers.AttentionMask(application)
    got = to_numpy(layer(TOKEN_IDS, SEGMENT_IDS))
    expected = to_numpy(backend.attention_mask(TOKEN_IDS, SEGMENT_IDS, application))
    np.testing.assert_array_equal(got, expected)
    check_round_trip(layer, lambda l: l(TOKEN_IDS, SEGMENT_IDS))
    # Symbolic shape, as a Functional model sees it.
    ids, seg = keras.Input((None,), dtype="int32"), keras.Input((None,), dtype="int32")
    out = layers.AttentionMask(application)(ids, seg)
    q_len = 1 if application == "encoder" else None
    assert tuple(out.shape) == (None, 1, q_len, None)


def test_attention_mask_layer_pad_id():
    layer = layers.AttentionMask(pad_id=5)
    np.testing.assert_array_equal(to_numpy(layer(TOKEN_IDS))[:, 0, 0], TOKEN_IDS != 5)


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="bert4keras_test_layers")
class SquaredError(layers.Loss):
    def compute_loss(self, inputs):
        y_true, y_pred = inputs
        return ops.mean(ops.square(y_true - y_pred))


def test_loss_layer_trains_without_a_compiled_loss():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    x_in, y_in = keras.Input((4,)), keras.Input((1,))
    dense = keras.layers.Dense(1)
    out = SquaredError(output_axis=1)([y_in, dense(x_in)])
    model = keras.Model([x_in, y_in], out)
    model.compile(optimizer="sgd")  # no loss=: the Loss layer provides it
    # The layer returns inputs[output_axis], i.e. the prediction.
    np.testing.assert_allclose(model.predict([x, y], verbose=0), to_numpy(dense(x)), atol=ATOL)
    history = model.fit([x, y], epochs=3, batch_size=4, verbose=0).history["loss"]
    assert history[-1] < 0.5 * history[0], history


def test_loss_layer_outputs_and_round_trip():
    a, b = np.ones((2, 3), "float32"), np.zeros((2, 3), "float32")
    both = SquaredError()([a, b])
    assert len(both) == 2
    picked = SquaredError(output_axis=[1, 0])([a, b])
    np.testing.assert_array_equal(to_numpy(picked[0]), b)
    np.testing.assert_array_equal(to_numpy(picked[1]), a)
    check_round_trip(SquaredError(output_axis=0, name="mse"), lambda l: l([a, b]))


def test_loss_base_class_needs_compute_loss():
    with pytest.raises(NotImplementedError, match="compute_loss"):
        layers.Loss()([np.ones((1, 1), "float32")])
