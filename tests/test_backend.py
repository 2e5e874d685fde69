"""Tests of bert4keras.backend: masks, rotary, sinusoids, T5 buckets, GELU.

Every check compares with an independent reference: a hand-written boolean
matrix, an explicit python/numpy loop, or the closed-form formula. Float
tolerances are stated per test (float32 throughout).
"""
import math

import keras
import numpy as np
import pytest
from keras import ops

from bert4keras import backend

# A small padded batch: row 0 is full, row 1 has one padding token at the end.
TOKEN_IDS = np.array([[5, 6, 7, 8, 9], [5, 6, 7, 8, 0]], dtype="int32")
# Row 1: source [0, 0], target [1, 1], then padding (segment 0).
SEGMENT_IDS = np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]], dtype="int32")


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def bool_matrix(rows):
    return np.array(rows, dtype=bool)


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


def test_padding_mask_hand_written():
    mask = to_numpy(backend.padding_mask(TOKEN_IDS))
    assert mask.shape == (2, 1, 1, 5) and mask.dtype == bool
    expected = bool_matrix([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(mask[:, 0, 0], expected)


def test_padding_mask_custom_pad_id():
    ids = np.array([[1, 2, 9, 9]], dtype="int32")
    mask = to_numpy(backend.padding_mask(ids, pad_id=9))
    np.testing.assert_array_equal(mask[0, 0, 0], [True, True, False, False])


def test_causal_mask_square():
    mask = to_numpy(backend.causal_mask(4))
    assert mask.shape == (1, 1, 4, 4)
    expected = bool_matrix(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    )
    np.testing.assert_array_equal(mask[0, 0], expected)


def test_causal_mask_rectangular_without_offset():
    # Query i sees keys 0..i, whatever the number of keys.
    mask = to_numpy(backend.causal_mask(2, 5))
    assert mask.shape == (1, 1, 2, 5)
    expected = bool_matrix([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(mask[0, 0], expected)


def test_causal_mask_with_offset_is_the_last_rows_of_the_square_mask():
    # Two queries at absolute positions 3 and 4 over 5 keys (cached decoding).
    mask = to_numpy(backend.causal_mask(2, 5, offset=3))
    expected = bool_matrix([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(mask[0, 0], expected)
    square = to_numpy(backend.causal_mask(5))[0, 0]
    np.testing.assert_array_equal(mask[0, 0], square[3:])


def test_causal_mask_single_step_over_a_longer_cache():
    # One query at position 2 over a cache of 6 slots: slots 3..5 are unwritten.
    mask = to_numpy(backend.causal_mask(1, 6, offset=2))
    np.testing.assert_array_equal(mask[0, 0], bool_matrix([[1, 1, 1, 0, 0, 0]]))


def test_unilm_mask_hand_written():
    mask = to_numpy(backend.unilm_mask(SEGMENT_IDS))
    assert mask.shape == (2, 1, 5, 5)
    # Row 0: source = positions 0..2, target = 3..4.
    expected0 = bool_matrix(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ]
    )
    # Row 1: segment ids [0, 0, 1, 1, 0]; the trailing 0 (padding) has the
    # same cumulative id as position 3, so unilm_mask alone lets 3 and 4 see
    # it (padding is removed by the padding mask, tested below).
    expected1 = bool_matrix(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
        ]
    )
    np.testing.assert_array_equal(mask[0, 0], expected0)
    np.testing.assert_array_equal(mask[1, 0], expected1)


def test_attention_mask_encoder():
    mask = to_numpy(backend.attention_mask(TOKEN_IDS, application="encoder"))
    assert mask.shape == (2, 1, 1, 5)
    full = np.broadcast_to(mask, (2, 1, 5, 5))
    np.testing.assert_array_equal(full[0, 0], np.ones((5, 5), bool))
    expected1 = bool_matrix([[1, 1, 1, 1, 0]] * 5)
    np.testing.assert_array_equal(full[1, 0], expected1)


def test_attention_mask_lm():
    mask = to_numpy(backend.attention_mask(TOKEN_IDS, application="lm"))
    assert mask.shape == (2, 1, 5, 5)
    expected0 = bool_matrix(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ]
    )
    expected1 = bool_matrix(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],  # the padding key 4 is hidden even from itself
        ]
    )
    np.testing.assert_array_equal(mask[0, 0], expected0)
    np.testing.assert_array_equal(mask[1, 0], expected1)


def test_attention_mask_unilm():
    mask = to_numpy(
        backend.attention_mask(TOKEN_IDS, SEGMENT_IDS, application="unilm")
    )
    assert mask.shape == (2, 1, 5, 5)
    expected0 = bool_matrix(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ]
    )
    expected1 = bool_matrix(
        [
            [1, 1, 0, 0, 0],  # source sees the source only
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],  # target sees the source and itself
            [1, 1, 1, 1, 0],  # ... and earlier target tokens, never padding
            [1, 1, 1, 1, 0],
        ]
    )
    np.testing.assert_array_equal(mask[0, 0], expected0)
    np.testing.assert_array_equal(mask[1, 0], expected1)


def test_attention_mask_unilm_needs_segment_ids():
    with pytest.raises(ValueError, match="segment ids"):
        backend.attention_mask(TOKEN_IDS, application="unilm")


def test_attention_mask_unknown_application():
    with pytest.raises(ValueError, match="Unknown application 'decoder'.*'encoder'"):
        backend.attention_mask(TOKEN_IDS, application="decoder")


def test_mask_to_bias():
    mask = np.array([[True, False], [False, True]])
    bias = to_numpy(backend.mask_to_bias(mask))
    assert bias.dtype == np.float32
    np.testing.assert_array_equal(bias, [[0.0, backend.NEG_INF], [backend.NEG_INF, 0.0]])
    assert backend.NEG_INF <= -1e4
    # After a softmax the masked entries vanish (float32, exact to 1e-7).
    logits = np.array([[1.0, 2.0], [3.0, -1.0]], dtype="float32")
    probs = to_numpy(ops.softmax(logits + bias, axis=-1))
    np.testing.assert_allclose(probs, [[1.0, 0.0], [0.0, 1.0]], atol=1e-7)


def test_mask_to_bias_float16_is_finite():
    bias = to_numpy(backend.mask_to_bias(np.array([True, False]), dtype="float16"))
    assert bias.dtype == np.float16
    assert bias[0] == 0.0
    # Finite and still large enough to zero a softmax entry.
    assert np.isfinite(bias[1]) and bias[1] <= -1e4


# ---------------------------------------------------------------------------
# Rotary and sinusoidal positions
# ---------------------------------------------------------------------------




def rotary_reference(x, positions, base=10000.0):
    """Rotate each adjacent pair (x[2i], x[2i+1]) by pos * base^(-2i/dim), one by one."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    dim = x.shape[-1]
    for idx in np.ndindex(*x.shape[:-1]):
        pos = positions[idx[-1]]
        for i in range(dim // 2):
            theta = pos * base ** (-2.0 * i / dim)
            a, b = x[idx + (2 * i,)], x[idx + (2 * i + 1,)]
            out[idx + (2 * i,)] = a * math.cos(theta) - b * math.sin(theta)
            out[idx + (2 * i + 1,)] = a * math.sin(theta) + b * math.cos(theta)
    return out


def test_apply_rotary_matches_pairwise_rotation_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 6, 8)).astype("float32")  # (batch, heads, seq, dim)
    positions = np.array([0, 1, 2, 7, 30, 100])
    got = to_numpy(backend.apply_rotary(x, positions))
    # float32 angles of up to 100 rad: 1e-4 absolute covers the rounding.
    np.testing.assert_allclose(got, rotary_reference(x, positions), atol=1e-4)


def test_apply_rotary_base():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 4)).astype("float32")
    positions = np.arange(4)
    got = to_numpy(backend.apply_rotary(x, positions, base=100.0))
    np.testing.assert_allclose(got, rotary_reference(x, positions, base=100.0), atol=1e-5)


def test_apply_rotary_position_zero_is_identity_and_norm_is_kept():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 5, 8)).astype("float32")
    got = to_numpy(backend.apply_rotary(x, np.array([0, 3, 9, 27, 81])))
    np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-6)
    # A rotation keeps the length of every pair (hence of the vector).
    np.testing.assert_allclose(
        np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )


def test_apply_rotary_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(16,)).astype("float32")
    k = rng.normal(size=(16,)).astype("float32")

    def score(m, n):
        rq = to_numpy(backend.apply_rotary(q[None, None], np.array([m])))[0, 0]
        rk = to_numpy(backend.apply_rotary(k[None, None], np.array([n])))[0, 0]
        return float(rq @ rk)

    for m, n, c in [(0, 3, 5), (7, 2, 11), (4, 4, 20)]:
        # float32 rotations: equal to 1e-4 relative to |q||k| ~ 16.
        assert abs(score(m, n) - score(m + c, n + c)) < 1e-3
    # ... and it does depend on the relative position.
    assert abs(score(0, 1) - score(0, 5)) > 1e-2


def test_sinusoidal_embeddings_formula():
    positions = np.array([0.0, 1.0, 5.0, 63.0])
    dim, base = 8, 10000.0
    got = to_numpy(backend.sinusoidal_embeddings(positions, dim))
    assert got.shape == (4, 8)
    expected = np.zeros((4, 8))
    for p_i, p in enumerate(positions):
        for i in range(dim // 2):
            angle = p / base ** (2.0 * i / dim)
            expected[p_i, i] = math.sin(angle)
            expected[p_i, dim // 2 + i] = math.cos(angle)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sinusoidal_embeddings_interleaved_and_batched():
    positions = np.array([[0, 2, 4], [1, 3, 5]])
    dim = 6
    got = to_numpy(backend.sinusoidal_embeddings(positions, dim, base=100.0, interleave=True))
    assert got.shape == (2, 3, 6)
    for idx in np.ndindex(2, 3):
        p = positions[idx]
        for i in range(dim // 2):
            angle = p / 100.0 ** (2.0 * i / dim)
            np.testing.assert_allclose(got[idx][2 * i], math.sin(angle), atol=1e-6)
            np.testing.assert_allclose(got[idx][2 * i + 1], math.cos(angle), atol=1e-6)


class _PositionsLayer(keras.layers.Layer):
    """Applies the position helpers inside a compiled predict step."""

    def call(self, x):
        positions = ops.arange(ops.shape(x)[1])
        rotated = backend.apply_rotary(x, positions)
        sinusoids = backend.sinusoidal_embeddings(positions, 8, interleave=True)
        return rotated, sinusoids


def test_position_helpers_inside_a_compiled_model():
    # Model.predict compiles (tf.function / jax.jit) with a dynamic length.
    x_in = keras.Input((None, 8))
    model = keras.Model(x_in, _PositionsLayer()(x_in))
    x = np.random.default_rng(4).normal(size=(2, 5, 8)).astype("float32")
    rotated, sinusoids = model.predict(x, verbose=0)
    np.testing.assert_allclose(rotated, rotary_reference(x, np.arange(5)), atol=1e-5)
    assert sinusoids.shape == (5, 8)
    np.testing.assert_allclose(sinusoids[3, :2], [math.sin(3.0), math.cos(3.0)], atol=1e-6)


# ---------------------------------------------------------------------------
# T5 relative position buckets
# ---------------------------------------------------------------------------


def t5_bucket_reference(relative_position, bidirectional, num_buckets, max_distance):
    """The T5 bucket formula for one relative position (key - query), in python."""
    bucket = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            bucket += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    scaled = math.log(n / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + int(scaled * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_relative_position_buckets(bidirectional):
    relative = np.arange(-200, 201, dtype="int32")
    got = to_numpy(
        backend.t5_relative_position_buckets(
            relative, bidirectional=bidirectional, num_buckets=32, max_distance=128
        )
    )
    expected = np.array(
        [t5_bucket_reference(int(r), bidirectional, 32, 128) for r in relative]
    )
    np.testing.assert_array_equal(got, expected)


def test_t5_relative_position_buckets_known_values():
    # Hand-checked anchors of the bidirectional 32-bucket scheme: exact buckets
    # 0..7 for keys to the left, 16..23 for keys to the right, then log-spaced
    # buckets saturating at 15 / 31 beyond max_distance.
    relative = np.array([0, -1, -7, -8, -200, 1, 7, 8, 200], dtype="int32")
    got = to_numpy(backend.t5_relative_position_buckets(relative))
    np.testing.assert_array_equal(got, [0, 1, 7, 8, 15, 17, 23, 24, 31])
    # Unidirectional: keys to the right (future) share bucket 0.
    got = to_numpy(backend.t5_relative_position_buckets(relative, bidirectional=False))
    np.testing.assert_array_equal(got[[5, 6, 7, 8]], [0, 0, 0, 0])
    assert got[4] == 31 and got[2] == 7


def test_t5_relative_position_buckets_matrix_shape():
    q_pos = np.arange(4)[:, None]
    k_pos = np.arange(6)[None, :]
    got = to_numpy(backend.t5_relative_position_buckets(k_pos - q_pos))
    assert got.shape == (4, 6)
    assert np.all(np.diag(got) == 0)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------

X_ACT = np.linspace(-5.0, 5.0, 101).astype("float32")


def test_gelu_is_the_erf_form():
    expected = np.array([0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))) for x in X_ACT.tolist()])
    got = to_numpy(backend.get_activation("gelu")(X_ACT))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # The tanh approximation differs by ~1e-4 somewhere in [-5, 5]; make sure
    # the tolerance above can tell the two apart.
    tanh_form = 0.5 * X_ACT * (1 + np.tanh(math.sqrt(2 / math.pi) * (X_ACT + 0.044715 * X_ACT**3)))
    assert np.max(np.abs(tanh_form - expected)) > 1e-5


def test_gelu_keeps_bfloat16_within_its_rounding():
    """Mixed precision hands GELU bfloat16. JAX and PyTorch compute it in
    float32 and round once: the float64 value within bfloat16's relative
    2**-8. TensorFlow computes unfused bfloat16 in bfloat16 (its inference
    fuses GELU into the matmul): rounding 1 + erf adds up to |x| * 2**-9."""
    x = ops.cast(ops.convert_to_tensor(np.linspace(-5.0, 5.0, 1001)), "bfloat16")
    got = backend.get_activation("gelu")(x)
    assert keras.backend.standardize_dtype(got.dtype) == "bfloat16"
    x64 = to_numpy(ops.cast(x, "float32")).astype("float64")
    expected = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x64.tolist()])
    error = np.abs(to_numpy(ops.cast(got, "float32")).astype("float64") - expected)
    bound = np.abs(expected) * 2.0**-8 + 1e-6  # 1e-6: float32 1 + erf in the far tail
    if keras.backend.backend() == "tensorflow":
        bound += np.abs(x64) * 2.0**-9
    assert np.all(error <= bound), float(np.max(error / bound))


@pytest.mark.parametrize("name", ["gelu_new", "gelu_tanh", "gelu_pytorch_tanh"])
def test_gelu_new_is_the_tanh_form(name):
    x = X_ACT.astype(float)
    expected = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    got = to_numpy(backend.get_activation(name)(X_ACT))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_get_activation_names():
    x = np.array([-2.0, 0.5], dtype="float32")
    np.testing.assert_allclose(to_numpy(backend.get_activation("relu")(x)), [0.0, 0.5])
    np.testing.assert_allclose(
        to_numpy(backend.get_activation("swish")(x)), x / (1 + np.exp(-x)), atol=1e-6
    )
    np.testing.assert_allclose(to_numpy(backend.get_activation(None)(x)), x)
    assert backend.get_activation(np.tanh) is np.tanh
    # Names round-trip through activation_name (what get_config stores).
    for name in ["gelu", "gelu_new", "relu", "swish", "tanh", "linear"]:
        fn = backend.get_activation(name)
        assert backend.get_activation(backend.activation_name(fn)) is fn
