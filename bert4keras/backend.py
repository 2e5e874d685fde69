"""Backend helpers shared by every module: masks, rotary positions, activations.

Everything here is written with `keras.ops`, so it runs on TensorFlow, JAX and
PyTorch. Attention masks are built in this module and nowhere else.
"""
import math

import keras
import numpy as np
from keras import ops

# Additive bias used where a boolean mask becomes a float bias. Large enough to
# zero a softmax entry, small enough not to overflow float16/bfloat16.
NEG_INF = -1e4 if keras.config.floatx() == "float16" else -1e9


def backend_name():
    return keras.backend.backend()


@keras.saving.register_keras_serializable(package="bert4keras")
def gelu_erf(x):
    """GELU with the exact erf form (BERT, RoBERTa): x * (1 + erf(x / sqrt 2)) / 2.

    Written out rather than `keras.activations.gelu`, for speed
    (benchmarks/bench_gelu.py):

    * TensorFlow: `tf.nn.gelu` goes through erfc, which the CPU kernels
      evaluate 3-5x slower than erf in float32 and 8-9x slower in bfloat16;
      in training (where nothing fuses it) the whole GELU with its gradient
      was 1.4x slower in float32 and 1.9x in bfloat16. The operands are in the
      order of TensorFlow's MatMul + BiasAdd + GELU fusion pattern, so in
      inference the GELU still runs inside the matmul kernel (in float32).
      Unfused, bfloat16 inputs are computed in bfloat16: where 1 + erf
      cancels (x < -1) that costs up to |x| * 2**-9 absolute (0.004 at
      x = -2), the size of bfloat16's own rounding of x.
    * JAX: computed in float32 (XLA fuses the casts); Keras' GELU computes
      bfloat16 inputs in bfloat16 and was 1.8x slower with its gradient.
    * PyTorch: its own fused GELU, which computes in float32.
    """
    if backend_name() == "torch":
        return keras.activations.gelu(x, approximate=False)
    if backend_name() == "jax":
        dtype = x.dtype
        x = ops.cast(x, "float32")
        return ops.cast((ops.erf(x * _SQRT_HALF) + 1.0) * (x * 0.5), dtype)
    return (ops.erf(x * _SQRT_HALF) + 1.0) * (x * 0.5)


_SQRT_HALF = 0.7071067811865476


@keras.saving.register_keras_serializable(package="bert4keras")
def gelu_tanh(x):
    """GELU with the tanh approximation (GPT-2's `gelu_new`)."""
    return keras.activations.gelu(x, approximate=True)


_ACTIVATIONS = {
    "gelu": gelu_erf,
    "gelu_erf": gelu_erf,
    "gelu_new": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": keras.activations.relu,
    "swish": keras.activations.silu,
    "silu": keras.activations.silu,
    "tanh": keras.activations.tanh,
    "linear": keras.activations.linear,
    None: keras.activations.linear,
}


def get_activation(name):
    """Activation by the names that BERT/HF configs use ('gelu' is the erf form)."""
    if callable(name):
        return name
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    return keras.activations.get(name)


def activation_name(activation):
    """Inverse of `get_activation` for `get_config`."""
    if isinstance(activation, str) or activation is None:
        return activation
    for key, value in _ACTIVATIONS.items():
        if value is activation and key is not None:
            return key
    return keras.activations.serialize(activation)


# ---------------------------------------------------------------------------
# Masks. Convention: a boolean tensor of shape (batch, 1, q_len, k_len) where
# True means "may attend". Broadcasting over heads is left to the attention.
# ---------------------------------------------------------------------------


def padding_mask(token_ids, pad_id=0):
    """(batch, 1, 1, k_len) boolean: True on real tokens, False on padding."""
    mask = ops.not_equal(token_ids, pad_id)
    return mask[:, None, None, :]


def causal_mask(q_len, k_len=None, offset=0):
    """(1, 1, q_len, k_len) boolean lower-triangular mask.

    Query i (at absolute position i + offset) sees keys 0..i + offset, which is
    what cached decoding needs when the queries are the last q_len positions.
    """
    k_len = q_len if k_len is None else k_len
    q_idx = ops.arange(q_len)[:, None] + offset
    k_idx = ops.arange(k_len)[None, :]
    return ops.greater_equal(q_idx, k_idx)[None, None]


def unilm_mask(segment_ids):
    """(batch, 1, len, len) boolean UniLM seq2seq mask from segment ids.

    Segment 0 (the source) is attended bidirectionally; a segment-1 token (the
    target) sees the whole source and the target up to itself. Position j is
    visible from i when cumsum(segment_ids)[j] <= cumsum(segment_ids)[i].
    """
    idx = ops.cumsum(ops.cast(segment_ids, "int32"), axis=1)
    mask = ops.less_equal(idx[:, None, :], idx[:, :, None])
    return mask[:, None]


def attention_mask(token_ids, segment_ids=None, application="encoder", pad_id=0):
    """The attention mask of an encoder, a left-to-right LM or a UniLM model.

    The three applications differ only here: padding is always masked; 'lm'
    adds the causal mask; 'unilm' adds the segment-id mask.
    """
    mask = padding_mask(token_ids, pad_id)
    if application == "encoder":
        return mask
    if application == "lm":
        length = ops.shape(token_ids)[1]
        return ops.logical_and(mask, causal_mask(length))
    if application == "unilm":
        if segment_ids is None:
            raise ValueError("application='unilm' needs segment ids.")
        return ops.logical_and(mask, unilm_mask(segment_ids))
    raise ValueError(
        f"Unknown application {application!r}; valid: 'encoder', 'lm', 'unilm'."
    )


def prefill_mask(valid, segment_ids, application, max_length):
    """Mask of the first pass of cached decoding, keys padded to `max_length`.

    valid: (batch, length) boolean, False at (left) padding. The prompt's own
    mask is the application's ('lm' causal, 'unilm' by segments); cache slots
    past the prompt are never attended.
    """
    mask = valid[:, None, None, :]
    length = ops.shape(valid)[1]
    if application == "lm":
        mask = ops.logical_and(mask, causal_mask(length))
    elif application == "unilm":
        mask = ops.logical_and(mask, unilm_mask(segment_ids))
    else:
        raise ValueError(f"Cached decoding needs application 'lm' or 'unilm', got {application!r}.")
    mask = ops.broadcast_to(mask, (ops.shape(valid)[0], 1, length, length))
    return ops.pad(mask, [[0, 0], [0, 0], [0, 0], [0, max_length - length]], constant_values=False)


def step_mask(valid_keys, index):
    """Mask of one cached decoding step whose token sits in cache slot `index`.

    valid_keys: (batch, max_length) boolean, False at padding. The new token
    sees every valid slot up to and including its own.
    """
    if isinstance(valid_keys, np.ndarray):  # on the host, as the decoding loop holds it: no dispatch
        upto = np.arange(valid_keys.shape[1]) <= index
        return np.logical_and(valid_keys, upto)[:, None, None, :]
    max_length = ops.shape(valid_keys)[1]
    upto = ops.less_equal(ops.arange(max_length), index)[None, :]
    return ops.logical_and(valid_keys, upto)[:, None, None, :]


def mask_to_bias(mask, dtype="float32"):
    """Boolean mask -> additive bias (0 where allowed, a large negative where not)."""
    negative = -1e4 if keras.backend.standardize_dtype(dtype) == "float16" else NEG_INF
    return ops.where(mask, ops.zeros((), dtype), ops.full((), negative, dtype))


# ---------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------


def sinusoidal_embeddings(positions, dim, base=10000.0, interleave=False):
    """Sinusoidal embeddings of (float or int) `positions`, last axis `dim`.

    Frequencies are base^(-2i/dim). With interleave=False the result is
    [sin..., cos...]; with interleave=True it is [sin0, cos0, sin1, cos1, ...].
    """
    positions = ops.cast(positions, "float32")
    freqs = ops.power(base, -ops.arange(0, dim // 2, dtype="float32") * 2.0 / dim)
    angles = ops.einsum("...n,d->...nd", positions, freqs)
    sin, cos = ops.sin(angles), ops.cos(angles)
    if interleave:
        stacked = ops.stack([sin, cos], axis=-1)
        return ops.reshape(stacked, tuple(ops.shape(sin)[:-1]) + (dim,))
    return ops.concatenate([sin, cos], axis=-1)


def apply_rotary(x, positions, base=10000.0):
    """Rotary position embedding with adjacent-pair rotation (RoFormer).

    x: (..., seq, dim) with `positions` broadcastable to (..., seq). Each pair
    (x[2i], x[2i+1]) is rotated by angle position * base^(-2i/dim).
    """
    dim = x.shape[-1]
    freqs = ops.power(base, -ops.arange(0, dim // 2, dtype="float32") * 2.0 / dim)
    angles = ops.cast(positions, "float32")[..., None] * freqs  # (..., seq, dim/2)
    cos = ops.repeat(ops.cos(angles), 2, axis=-1)
    sin = ops.repeat(ops.sin(angles), 2, axis=-1)
    cos = ops.cast(cos, x.dtype)
    sin = ops.cast(sin, x.dtype)
    x_pairs = ops.reshape(x, tuple(ops.shape(x)[:-1]) + (dim // 2, 2))
    rotated = ops.stack([-x_pairs[..., 1], x_pairs[..., 0]], axis=-1)
    rotated = ops.reshape(rotated, ops.shape(x))
    return x * cos + rotated * sin


def t5_relative_position_buckets(
    relative_position, bidirectional=True, num_buckets=32, max_distance=128
):
    """T5's log-spaced relative position buckets (key position - query position)."""
    relative_position = ops.cast(relative_position, "int32")
    buckets = ops.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + ops.cast(ops.less(n, 0), "int32") * num_buckets
        n = ops.abs(n)
    else:
        n = ops.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = ops.less(n, max_exact)
    n_float = ops.maximum(ops.cast(n, "float32"), 1.0)
    large = max_exact + ops.cast(
        ops.log(n_float / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact),
        "int32",
    )
    large = ops.minimum(large, num_buckets - 1)
    return buckets + ops.where(is_small, n, large)


def sequence_lengths_to_numpy(token_ids, pad_id=0):
    """Number of non-padding tokens per row, as numpy (host-side helper)."""
    return np.sum(np.asarray(token_ids) != pad_id, axis=1)


# ---------------------------------------------------------------------------
# Recompute (gradient checkpointing)
# ---------------------------------------------------------------------------


class _FixedSeed(keras.random.SeedGenerator):
    """A seed generator that always returns one pre-drawn seed (no state)."""

    def __init__(self, seed):  # deliberately no super().__init__: no state variable
        self._fixed = seed

    def next(self, ordered=True):
        return self._fixed


def normalize_recompute(value):
    """A recompute setting as False, True or 'attention' (see MultiHeadAttention)."""
    if isinstance(value, str):
        if value != "attention":
            raise ValueError(f"recompute must be False, True or 'attention'; got {value!r}.")
        return value
    return bool(value)


def recompute(function, dropout_layers=()):
    """Wraps `function(*tensors)` so its activations are recomputed in backward.

    Only the inputs are kept for the backward pass; the intermediate
    activations are computed again there (`jax.checkpoint` on JAX,
    `tf.recompute_grad` on TensorFlow; PyTorch runs the function plainly).
    The seeds of `dropout_layers` are drawn once, outside, and fed to both
    passes, so dropout masks are identical in the forward pass and in the
    recomputation. Arguments that are None stay None.
    """
    name = backend_name()
    if name not in ("jax", "tensorflow"):
        return function

    def wrapped(*args):
        # Only floating tensors are differentiated through; masks, ids and the
        # dropout seeds (drawn here, outside) are closed over.
        floating = [
            i for i, a in enumerate(args) if a is not None and "float" in str(getattr(a, "dtype", ""))
        ]
        seeds = [layer.seed_generator.next() for layer in dropout_layers]

        def inner(*tensors):
            call_args = list(args)
            for i, tensor in zip(floating, tensors):
                call_args[i] = tensor
            saved = [layer.seed_generator for layer in dropout_layers]
            for layer, seed in zip(dropout_layers, seeds):
                object.__setattr__(layer, "seed_generator", _FixedSeed(seed))
            try:
                return function(*call_args)
            finally:
                for layer, generator in zip(dropout_layers, saved):
                    object.__setattr__(layer, "seed_generator", generator)

        tensors = [args[i] for i in floating]
        if name == "jax":
            import jax

            return jax.checkpoint(inner)(*tensors)
        import tensorflow as tf

        return tf.recompute_grad(inner)(*tensors)

    return wrapped
