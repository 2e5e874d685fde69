"""The layers transformer models are made of, in `keras.ops`.

Every layer serializes through `get_config` and is registered under the
`bert4keras` package, so `keras.models.load_model` needs only
`import bert4keras`.
"""
import keras
from keras import ops

from bert4keras import backend

register = keras.saving.register_keras_serializable(package="bert4keras")


@register
class Embedding(keras.layers.Layer):
    """Token embedding whose table doubles as the tied output projection.

    `mode='embedding'` looks ids up; `mode='dense'` multiplies hidden states by
    the transposed table, which is how the MLM / LM head reuses it.

    >>> emb = Embedding(100, 8)
    >>> h = emb(ops.array([[1, 2, 3]]))           # (1, 3, 8)
    >>> logits = emb(h, mode="dense")              # (1, 3, 100)
    """

    def __init__(self, input_dim, output_dim, embeddings_initializer="uniform", **kwargs):
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape=None):
        # No autocast: under mixed precision a lookup casts the rows it took,
        # not the whole table (30522 x 768 for BERT-base) on every call.
        self.embeddings = self.add_weight(
            shape=(self.input_dim, self.output_dim),
            initializer=self.embeddings_initializer,
            name="embeddings",
            autocast=False,
        )

    def call(self, inputs, mode="embedding"):
        if mode == "embedding":
            if "int" not in str(inputs.dtype):
                inputs = ops.cast(inputs, "int32")
            return ops.cast(ops.take(self.embeddings, inputs, axis=0), self.compute_dtype)
        if mode == "dense":
            kernel = ops.cast(self.embeddings, self.compute_dtype)
            return ops.matmul(inputs, ops.transpose(kernel))
        raise ValueError(f"Unknown mode {mode!r}; valid: 'embedding', 'dense'.")

    def compute_output_spec(self, inputs, mode="embedding"):
        if mode == "dense":
            shape = tuple(inputs.shape[:-1]) + (self.input_dim,)
        else:
            shape = tuple(inputs.shape) + (self.output_dim,)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
        )
        return config


def _fresh(initializer):
    """A new instance of `initializer`: unseeded Keras initializers draw one
    seed per instance, so sub-layers sharing one would start identical."""
    return keras.initializers.get(keras.initializers.serialize(initializer))


def _check_positions_fit(seq_len, max_positions, what):
    """Raise a clear error when a sequence is longer than a position table."""
    message = (
        f"{what}: the sequence has more positions than the model's "
        f"max_position ({max_positions}). Truncate the input (for example "
        f"tokenizer.encode(text, maxlen={max_positions})) or build the model "
        "with hierarchical_position=True."
    )
    if isinstance(seq_len, int):
        if seq_len > max_positions:
            raise ValueError(message + f" Got length {seq_len}.")
        return None
    if backend.backend_name() == "tensorflow":
        import tensorflow as tf

        return tf.debugging.assert_less_equal(seq_len, max_positions, message=message)
    return None


@register
class PositionEmbedding(keras.layers.Layer):
    """Learned absolute position embedding.

    merge_mode: 'add' (x + P), 'mul' (x * (P + 1)), 'zero' (P alone, broadcast
    over the batch) or 'concat'. `hierarchical` (True or a float alpha) extends
    a table of n positions to n*n positions by decomposing position i into
    (i // n, i % n); `custom_position_ids=True` takes [x, position_ids].

    >>> pe = PositionEmbedding(512, 8)
    >>> pe(ops.zeros((2, 10, 8))).shape
    (2, 10, 8)
    """

    def __init__(
        self,
        input_dim,
        output_dim,
        merge_mode="add",
        hierarchical=None,
        embeddings_initializer="zeros",
        custom_position_ids=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if merge_mode not in ("add", "mul", "zero", "concat"):
            raise ValueError(
                f"Unknown merge_mode {merge_mode!r}; valid: 'add', 'mul', 'zero', 'concat'."
            )
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.merge_mode = merge_mode
        self.hierarchical = hierarchical
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.custom_position_ids = custom_position_ids

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(  # no autocast, as in Embedding
            shape=(self.input_dim, self.output_dim),
            initializer=self.embeddings_initializer,
            name="embeddings",
            autocast=False,
        )

    def call(self, inputs, position_ids=None):
        # `position_ids` as a call argument serves incremental decoding, where
        # the positions of the new tokens start after the cached ones.
        if self.custom_position_ids:
            inputs, position_ids = inputs
            position_ids = ops.cast(position_ids, "int32")
        elif position_ids is not None:
            position_ids = ops.cast(position_ids, "int32")
        else:
            seq_len = inputs.shape[1]
            if seq_len is None:
                seq_len = ops.shape(inputs)[1]
            check = None if self.hierarchical else _check_positions_fit(seq_len, self.input_dim, self.name)
            position_ids = ops.arange(seq_len, dtype="int32")[None]
            if check is not None:  # TF graph with an unknown length: the lookup waits for the check
                import tensorflow as tf

                with tf.control_dependencies([check]):
                    position_ids = tf.identity(position_ids)
        table = self.embeddings
        if self.hierarchical:
            alpha = 0.4 if self.hierarchical is True else self.hierarchical
            table = (table - alpha * table[:1]) / (1 - alpha)
            high = ops.take(table, position_ids // self.input_dim, axis=0)
            low = ops.take(table, position_ids % self.input_dim, axis=0)
            embeddings = alpha * high + (1 - alpha) * low
        else:
            embeddings = ops.take(table, position_ids, axis=0)
        embeddings = ops.cast(embeddings, self.compute_dtype)
        if self.merge_mode == "add":
            return inputs + embeddings
        if self.merge_mode == "mul":
            return inputs * (embeddings + 1.0)
        if self.merge_mode == "zero":
            return ops.broadcast_to(embeddings, ops.shape(inputs)[:2] + (self.output_dim,))
        embeddings = ops.broadcast_to(embeddings, ops.shape(inputs)[:2] + (self.output_dim,))
        return ops.concatenate([inputs, embeddings], axis=-1)

    def compute_output_shape(self, input_shape):
        if self.custom_position_ids:
            input_shape = input_shape[0]
        if self.merge_mode == "concat":
            return tuple(input_shape[:2]) + (input_shape[2] + self.output_dim,)
        if self.merge_mode == "zero":
            return tuple(input_shape[:2]) + (self.output_dim,)
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            merge_mode=self.merge_mode,
            hierarchical=self.hierarchical,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
            custom_position_ids=self.custom_position_ids,
        )
        return config


@register
class LayerNormalization(keras.layers.Layer):
    """Layer normalization, optionally conditional, optionally RMS-style.

    center=False drops the mean subtraction and the offset (the RMS norm of
    T5 and RoFormer-v2); scale=False drops the gain as well. With
    conditional=True the layer takes [x, condition] and adds a learned
    (zero-initialised) projection of the condition to gain and offset.
    Statistics are computed in float32 whatever the compute dtype.

    >>> ln = LayerNormalization()
    >>> ln(ops.ones((2, 3, 4))).shape
    (2, 3, 4)
    """

    def __init__(
        self,
        center=True,
        scale=True,
        epsilon=None,
        conditional=False,
        hidden_units=None,
        hidden_activation="linear",
        hidden_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.center = center
        self.scale = scale
        self.epsilon = epsilon or 1e-12
        self.conditional = conditional
        self.hidden_units = hidden_units
        self.hidden_activation = hidden_activation
        self.hidden_initializer = keras.initializers.get(hidden_initializer)

    def build(self, input_shape):
        if self.conditional:
            input_shape, condition_shape = input_shape
        dim = input_shape[-1]
        if self.center:
            self.beta = self.add_weight(shape=(dim,), initializer="zeros", name="beta")
        if self.scale:
            self.gamma = self.add_weight(shape=(dim,), initializer="ones", name="gamma")
        if self.conditional:
            if self.hidden_units is not None:
                self.hidden_dense = keras.layers.Dense(
                    self.hidden_units,
                    activation=backend.get_activation(self.hidden_activation),
                    use_bias=False,
                    kernel_initializer=_fresh(self.hidden_initializer),
                    name="hidden_dense",
                )
                self.hidden_dense.build(condition_shape)
                condition_shape = tuple(condition_shape[:-1]) + (self.hidden_units,)
            if self.center:
                self.beta_dense = keras.layers.Dense(
                    dim, use_bias=False, kernel_initializer="zeros", name="beta_dense"
                )
                self.beta_dense.build(condition_shape)
            if self.scale:
                self.gamma_dense = keras.layers.Dense(
                    dim, use_bias=False, kernel_initializer="zeros", name="gamma_dense"
                )
                self.gamma_dense.build(condition_shape)

    def call(self, inputs):
        if self.conditional:
            inputs, condition = inputs
            if self.hidden_units is not None:
                condition = self.hidden_dense(condition)
            # Broadcast a (batch, dim) condition over the sequence axis.
            for _ in range(len(inputs.shape) - len(condition.shape)):
                condition = ops.expand_dims(condition, 1)
        dtype = inputs.dtype
        x = ops.cast(inputs, "float32")
        if self.center:
            x = x - ops.mean(x, axis=-1, keepdims=True)
        variance = ops.mean(ops.square(x), axis=-1, keepdims=True)
        x = x * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            gamma = ops.cast(self.gamma, "float32")
            if self.conditional:
                gamma = gamma + ops.cast(self.gamma_dense(condition), "float32")
            x = x * gamma
        if self.center:
            beta = ops.cast(self.beta, "float32")
            if self.conditional:
                beta = beta + ops.cast(self.beta_dense(condition), "float32")
            x = x + beta
        return ops.cast(x, dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0] if self.conditional else input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            center=self.center,
            scale=self.scale,
            epsilon=self.epsilon,
            conditional=self.conditional,
            hidden_units=self.hidden_units,
            hidden_activation=self.hidden_activation,
            hidden_initializer=keras.initializers.serialize(self.hidden_initializer),
        )
        return config


def _jax_on_cpu():
    import jax

    return jax.default_backend() == "cpu"


def _matmul(a, b, dtype=None, transpose_b=False):
    """`a @ b` (or `a @ b^T` over the last two axes) in a's dtype (or `dtype`).

    Fast for half precision on JAX on CPU: XLA:CPU converts both operands of
    a bf16 x bf16 -> bf16 product to float32 first; asked for a float32
    result it runs its native bf16 kernels (2.7x faster on an AVX-512 BF16
    CPU). Either way the sum is accumulated in float32, so the values are
    those of `ops.matmul`. Not on GPUs: there the gradient of that form
    multiplies a float32 cotangent by a bf16 operand, which XLA runs as a
    float32 product (on an H200 the bf16 training step at 32 x 128 rose
    from 0.41x to 0.60x of KerasHub's on JAX without it; benchmarks/README.md).
    transpose_b reads b transposed without materialising the transpose on
    TensorFlow (XLA folds it into the product by itself).
    """
    name = backend.backend_name()
    if name == "jax" and keras.backend.standardize_dtype(a.dtype) in ("bfloat16", "float16") and _jax_on_cpu():
        import jax.numpy as jnp

        product = jnp.matmul(a, jnp.swapaxes(b, -1, -2) if transpose_b else b, preferred_element_type="float32")
        return product.astype(dtype or a.dtype)
    if name == "tensorflow" and transpose_b:
        import tensorflow as tf

        product = tf.linalg.matmul(a, b, transpose_b=True)
    else:
        product = ops.matmul(a, ops.swapaxes(b, -1, -2) if transpose_b else b)
    return product if dtype is None else ops.cast(product, dtype)


def _explicit_attention_is_faster():
    """True where `_attend`'s explicit matmuls beat `ops.dot_product_attention`.

    That is TensorFlow and JAX on CPU (measured: 1.2-5x on the attention of a
    BERT-base block); on GPUs the fused op (cuDNN / flash attention) stays,
    and so it does on PyTorch, whose CPU kernel is fused too.
    """
    global _EXPLICIT_ATTENTION
    if _EXPLICIT_ATTENTION is None:
        name = backend.backend_name()
        if name == "jax":
            _EXPLICIT_ATTENTION = _jax_on_cpu()
        elif name == "tensorflow":
            import tensorflow as tf

            _EXPLICIT_ATTENTION = not tf.config.list_logical_devices("GPU")
        else:
            _EXPLICIT_ATTENTION = False
    return _EXPLICIT_ATTENTION


_EXPLICIT_ATTENTION = None


def _write_slots(cache, new, index):
    """`cache` (batch, heads, slots, size) with `new` (batch, heads, t, size) at slots index...

    A dynamic-update-slice (in place under XLA when the cache is donated).
    TensorFlow runs that op through an XLA kernel compiled on demand; there a
    scatter of the new rows writes it (one copy of the cache, no XLA launch).
    """
    new = ops.cast(new, cache.dtype)
    if backend.backend_name() != "tensorflow":
        return ops.slice_update(cache, (0, 0, index, 0), new)
    batch, heads, count, size = ops.shape(new)
    grid = ops.meshgrid(ops.arange(batch), ops.arange(heads), ops.arange(count) + index, indexing="ij")
    indices = ops.reshape(ops.stack(grid, axis=-1), (-1, 3))
    return ops.scatter_update(cache, indices, ops.reshape(new, (-1, size)))


def _apply_mask(scores, mask):
    """Scores with a boolean mask (False -> NEG_INF) or an additive bias applied."""
    if mask is None:
        return scores
    if "bool" in str(mask.dtype):
        return ops.where(mask, scores, ops.cast(backend.NEG_INF, scores.dtype))
    return scores + ops.cast(mask, scores.dtype)


@register
class FastDense(keras.layers.Dense):
    """`keras.layers.Dense` with a faster CPU path; same weights, same result.

    TensorFlow: the input is flattened to 2-D and the bias added with
    `tf.nn.bias_add`, the form TensorFlow's oneDNN graph rewriter fuses into
    one MatMul + BiasAdd (+ GELU/ReLU) kernel; Dense's own N-D `tensordot` +
    broadcast add is not fused (the block's feed-forward in bf16 runs 1.4x
    faster this way). JAX: half precision goes through `_matmul`. Quantized
    layers keep Keras's own path (Keras dispatches them to `quantized_call`);
    LoRA is included by `self.kernel`.

    >>> dense = FastDense(4, activation="relu")
    >>> dense(ops.ones((2, 3, 8))).shape
    (2, 3, 4)
    """

    def call(self, inputs, training=None):
        kernel = ops.cast(self.kernel, self.compute_dtype)
        bias = None if self.bias is None else ops.cast(self.bias, self.compute_dtype)
        if backend.backend_name() == "tensorflow" and len(inputs.shape) > 2:
            import tensorflow as tf

            x = tf.matmul(tf.reshape(inputs, [-1, inputs.shape[-1]]), kernel)
            if bias is not None:
                x = tf.nn.bias_add(x, bias)
            if self.activation is not None:
                x = self.activation(x)  # on the 2-D product, where the rewriter fuses it
            return tf.reshape(x, tf.concat([tf.shape(inputs)[:-1], [self.units]], axis=0))
        x = _matmul(inputs, kernel)
        if bias is not None:
            x = x + bias
        if self.activation is not None:
            x = self.activation(x)
        return x


@register
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention with an optional mask/bias and key/value cache.

    Inputs are `[q, k, v]`. Keyword inputs:
      attention_mask: boolean (True = may attend) or an additive float bias,
        broadcastable to (batch, heads, q_len, k_len). Masks come from
        `bert4keras.backend.attention_mask`.
      cache / cache_index: for incremental decoding, a pair (keys, values)
        of past keys and values, each (batch, heads, k_max, key_size), and
        the slot where the current keys go; the mask then spans the k_max
        slots. The layer returns (output, keys, values), the pair updated.
        Keeping each layer's keys and values in their own heads-first
        arrays lets XLA update them in place (when the caller donates them)
        and multiply them without copies.

    key_size (per-head size of q and k) may differ from head_size (per-head
    size of v). position_encoding='rotary' rotates q and k by their absolute
    positions (adjacent pairs, as RoFormer). The fused
    `keras.ops.dot_product_attention` (flash attention where Keras has it) is
    used unless scores are returned or attention dropout is active; on CPU
    (TensorFlow, JAX) explicit batched matmuls with the same float32 logits
    are faster and used instead.

    recompute (training only): True keeps only the inputs for the backward
    pass and recomputes the whole layer there; 'attention' keeps the q/k/v
    projections and recomputes only the attention core (scores, softmax,
    dropout, weighted sum), the part whose memory grows with length squared.

    >>> mha = MultiHeadAttention(heads=2, head_size=4)
    >>> x = ops.ones((1, 3, 8))
    >>> mha([x, x, x]).shape
    (1, 3, 8)
    """

    def __init__(
        self,
        heads,
        head_size,
        out_dim=None,
        key_size=None,
        use_bias=True,
        attention_scale=True,
        attention_dropout=0.0,
        return_attention_scores=False,
        position_encoding=None,
        kernel_initializer="glorot_uniform",
        recompute=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.recompute = backend.normalize_recompute(recompute)
        if position_encoding not in (None, "rotary"):
            raise ValueError(
                f"Unknown position_encoding {position_encoding!r}; valid: None, 'rotary'."
            )
        self.heads = heads
        self.head_size = head_size
        self.out_dim = out_dim
        self.key_size = key_size or head_size
        if position_encoding == "rotary" and self.key_size % 2:
            raise ValueError(
                "position_encoding='rotary' rotates pairs of features and needs an even "
                f"key_size; got key_size={self.key_size}."
            )
        self.use_bias = use_bias
        self.attention_scale = attention_scale
        self.attention_dropout = attention_dropout
        self.return_attention_scores = return_attention_scores
        self.position_encoding = position_encoding
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def _dense(self, units, name):
        return FastDense(
            units,
            use_bias=self.use_bias,
            kernel_initializer=_fresh(self.kernel_initializer),
            name=name,
        )

    def build(self, input_shape):
        q_shape, k_shape, v_shape = input_shape[:3]
        out_dim = self.out_dim or q_shape[-1]
        self.q_dense = self._dense(self.heads * self.key_size, "q_dense")
        self.k_dense = self._dense(self.heads * self.key_size, "k_dense")
        self.v_dense = self._dense(self.heads * self.head_size, "v_dense")
        self.o_dense = self._dense(out_dim, "o_dense")
        self.q_dense.build(q_shape)
        self.k_dense.build(k_shape)
        self.v_dense.build(v_shape)
        self.o_dense.build(tuple(q_shape[:-1]) + (self.heads * self.head_size,))
        self.dropout = keras.layers.Dropout(self.attention_dropout)

    def _split_heads(self, x, size):
        return ops.reshape(x, ops.shape(x)[:2] + (self.heads, size))

    def call(
        self,
        inputs,
        attention_mask=None,
        cache=None,
        cache_index=None,
        training=None,
    ):
        if self.recompute is True and training and cache is None:
            # Keep only the inputs for backward; q/k/v, scores and probabilities
            # (the bulk of the activation memory) are recomputed there.
            dropouts = [self.dropout] if self.attention_dropout > 0 else []
            run = backend.recompute(
                lambda q, k, v, mask: self._forward([q, k, v], mask, None, None, training), dropouts
            )
            return run(inputs[0], inputs[1], inputs[2], attention_mask)
        return self._forward(inputs, attention_mask, cache, cache_index, training)

    def _forward(self, inputs, attention_mask, cache, cache_index, training):
        q, k, v = inputs[:3]
        qw = self._split_heads(self.q_dense(q), self.key_size)
        kw = self._split_heads(self.k_dense(k), self.key_size)
        vw = self._split_heads(self.v_dense(v), self.head_size)
        offset = 0 if cache_index is None else cache_index
        if self.position_encoding == "rotary":
            # (batch, seq, heads, dim): rotate along seq, broadcast over heads.
            q_pos = ops.arange(ops.shape(qw)[1]) + offset
            k_pos = ops.arange(ops.shape(kw)[1]) + offset
            qw = ops.transpose(
                backend.apply_rotary(ops.transpose(qw, (0, 2, 1, 3)), q_pos), (0, 2, 1, 3)
            )
            kw = ops.transpose(
                backend.apply_rotary(ops.transpose(kw, (0, 2, 1, 3)), k_pos), (0, 2, 1, 3)
            )
        if cache is not None:
            if self.key_size != self.head_size:
                raise ValueError("A key/value cache needs key_size == head_size.")
            if self.return_attention_scores:
                raise ValueError(f"{self.name}: cached decoding cannot return attention scores.")
            heads_first = (0, 2, 1, 3)
            keys = _write_slots(cache[0], ops.transpose(kw, heads_first), cache_index)
            values = _write_slots(cache[1], ops.transpose(vw, heads_first), cache_index)
            outputs = self._attend_cached(qw, keys, values, attention_mask, training)
            outputs = ops.reshape(outputs, ops.shape(outputs)[:2] + (self.heads * self.head_size,))
            return self.o_dense(outputs), keys, values
        if self.recompute == "attention" and training and cache is None and not self.return_attention_scores:
            # Selective recompute: the (heads, q, k) scores, probabilities and
            # dropout mask, most of a block's activations at long lengths, are
            # recomputed in backward; that costs ~4 L^2 h FLOPs per block, a
            # few percent of the step, where recomputing everything costs a forward.
            dropouts = [self.dropout] if self.attention_dropout > 0 else []
            run = backend.recompute(lambda q, k, v, mask: self._attend(q, k, v, mask, training)[0], dropouts)
            outputs, scores = run(qw, kw, vw, attention_mask), None
        else:
            outputs, scores = self._attend(qw, kw, vw, attention_mask, training)
        outputs = ops.reshape(outputs, ops.shape(outputs)[:2] + (self.heads * self.head_size,))
        outputs = self.o_dense(outputs)
        if self.return_attention_scores:
            return outputs, scores
        return outputs

    def _attend(self, qw, kw, vw, attention_mask, training):
        scale = self.key_size**-0.5 if self.attention_scale else 1.0
        is_bool = attention_mask is not None and "bool" in str(attention_mask.dtype)
        dropout_active = self.attention_dropout > 0 and training
        fused = (
            not self.return_attention_scores
            and not dropout_active
            and self.key_size == self.head_size
        )
        if fused and not _explicit_attention_is_faster():
            outputs = ops.dot_product_attention(
                qw,
                kw,
                vw,
                bias=None if is_bool or attention_mask is None else ops.cast(attention_mask, qw.dtype),
                mask=attention_mask if is_bool else None,
                scale=scale,
            )
            return outputs, None
        # Heads first, so both products are plain batched matmuls. Where the
        # fused op would run, the logits are float32 as in that op; otherwise
        # they are in the compute dtype, as returned to the caller.
        logits_dtype = "float32" if fused else qw.dtype
        qh = ops.transpose(self._scale_queries(qw), (0, 2, 1, 3))  # (batch, heads, q_len, key_size)
        kh = ops.transpose(kw, (0, 2, 3, 1))  # (batch, heads, key_size, k_len)
        vh = ops.transpose(vw, (0, 2, 1, 3))  # (batch, heads, k_len, head_size)
        scores = _apply_mask(_matmul(qh, kh, logits_dtype), attention_mask)
        probs = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1), qw.dtype)
        probs = self.dropout(probs, training=training)
        outputs = ops.transpose(_matmul(probs, vh), (0, 2, 1, 3))
        return outputs, None if fused else scores

    def _scale_queries(self, qw):
        """qw / sqrt(key_size) where the layer scales, for the explicit products.

        On the queries (q_len x hidden values per sequence), not on the scores
        (heads x q_len x k_len): one pass over the scores less (BERT-base,
        8 x 512, bf16: Mul op time 67 -> 39 ms per forward). Exact where the
        scale is a power of two (head size 64); else one more rounding of q
        (MiniLM's bf16-vs-fp32 error unchanged).
        """
        return qw * ops.cast(self.key_size**-0.5, qw.dtype) if self.attention_scale else qw

    def _attend_cached(self, qw, keys, values, attention_mask, training):
        """`_attend` over a heads-first cache: (batch, heads, k_max, size)."""
        keys, values = ops.cast(keys, qw.dtype), ops.cast(values, qw.dtype)
        if not _explicit_attention_is_faster():
            return self._attend_seq_first(qw, keys, values, attention_mask, training)
        qh = ops.transpose(self._scale_queries(qw), (0, 2, 1, 3))  # (batch, heads, q_len, key_size)
        scores = _matmul(qh, keys, "float32", transpose_b=True)
        probs = ops.cast(ops.softmax(_apply_mask(scores, attention_mask), axis=-1), qw.dtype)
        probs = self.dropout(probs, training=training)
        return ops.transpose(_matmul(probs, values), (0, 2, 1, 3))

    def _attend_seq_first(self, qw, keys, values, attention_mask, training):
        """`_attend` on heads-first keys/values, transposed to its (batch, k_len, heads, size)."""
        seq_first = (0, 2, 1, 3)
        return self._attend(qw, ops.transpose(keys, seq_first), ops.transpose(values, seq_first), attention_mask, training)[0]

    def compute_output_spec(self, inputs, attention_mask=None, cache=None, cache_index=None, training=None):
        q = inputs[0]
        out_dim = self.out_dim or q.shape[-1]
        result = [keras.KerasTensor(tuple(q.shape[:-1]) + (out_dim,), dtype=self.compute_dtype)]
        if self.return_attention_scores:
            k = inputs[1]
            result.append(
                keras.KerasTensor((q.shape[0], self.heads, q.shape[1], k.shape[1]), dtype=self.compute_dtype)
            )
        if cache is not None:
            result += [keras.KerasTensor(c.shape, dtype=c.dtype) for c in cache]
        return result[0] if len(result) == 1 else tuple(result)

    def get_config(self):
        config = super().get_config()
        config.update(
            heads=self.heads,
            head_size=self.head_size,
            out_dim=self.out_dim,
            key_size=self.key_size,
            use_bias=self.use_bias,
            attention_scale=self.attention_scale,
            attention_dropout=self.attention_dropout,
            return_attention_scores=self.return_attention_scores,
            position_encoding=self.position_encoding,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recompute=self.recompute,
        )
        return config


@register
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward block: Dense(units) -> activation -> Dense(dim).

    A list of two activations makes it gated (T5.1.1): act0(x W0) * act1(x W1).

    >>> ff = FeedForward(16, activation="gelu")
    >>> ff(ops.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def __init__(
        self, units, activation="relu", use_bias=True, kernel_initializer="glorot_uniform", recompute=False, **kwargs
    ):
        super().__init__(**kwargs)
        self.recompute = backend.normalize_recompute(recompute)
        self.units = units
        self.activation = activation if isinstance(activation, (list, tuple)) else [activation]
        self.activation = [backend.activation_name(a) for a in self.activation]
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        self.input_denses = []
        for i, activation in enumerate(self.activation):
            dense = FastDense(
                self.units,
                activation=backend.get_activation(activation),
                use_bias=self.use_bias,
                kernel_initializer=_fresh(self.kernel_initializer),
                name=f"i{i}_dense",
            )
            dense.build(input_shape)
            self.input_denses.append(dense)
        self.o_dense = FastDense(
            input_shape[-1],
            use_bias=self.use_bias,
            kernel_initializer=_fresh(self.kernel_initializer),
            name="o_dense",
        )
        self.o_dense.build(tuple(input_shape[:-1]) + (self.units,))

    def call(self, inputs, training=None):
        if self.recompute is True and training:  # 'attention' concerns attention layers only
            return backend.recompute(self._forward)(inputs)
        return self._forward(inputs)

    def _forward(self, inputs):
        x = self.input_denses[0](inputs)
        for dense in self.input_denses[1:]:
            x = x * dense(inputs)
        return self.o_dense(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        activation = self.activation if len(self.activation) > 1 else self.activation[0]
        config.update(
            units=self.units,
            activation=activation,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recompute=self.recompute,
        )
        return config


@register
class BiasAdd(keras.layers.Layer):
    """Adds a learned bias vector (the MLM output bias)."""

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")

    def call(self, inputs):
        return inputs + ops.cast(self.bias, inputs.dtype)


@register
class TakeToken(keras.layers.Layer):
    """Hidden state of one position (by default the first, [CLS])."""

    def __init__(self, index=0, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def call(self, inputs):
        return inputs[:, self.index]

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + tuple(input_shape[2:])

    def get_config(self):
        return {**super().get_config(), "index": self.index}


@register
class AttentionMask(keras.layers.Layer):
    """Builds the attention mask of an application from token/segment ids.

    One encoder becomes a left-to-right LM or a UniLM seq2seq model by
    changing only this layer's `application`; the masks themselves live in
    `bert4keras.backend`.
    """

    def __init__(self, application="encoder", pad_id=0, **kwargs):
        super().__init__(**kwargs)
        self.application = application
        self.pad_id = pad_id

    def call(self, token_ids, segment_ids=None):
        return backend.attention_mask(token_ids, segment_ids, self.application, self.pad_id)

    def compute_output_spec(self, token_ids, segment_ids=None):
        k = token_ids.shape[1]
        q = 1 if self.application == "encoder" else k
        return keras.KerasTensor((token_ids.shape[0], 1, q, k), dtype="bool")

    def get_config(self):
        return {**super().get_config(), "application": self.application, "pad_id": self.pad_id}


@register
class Loss(keras.layers.Layer):
    """A layer that adds a loss computed from its inputs (bert4keras style).

    Subclass it and implement `compute_loss(inputs)`; the layer returns
    `inputs[output_axis]` (all inputs when output_axis is None) and registers
    the loss with `add_loss`, so `model.compile(optimizer)` needs no `loss=`.
    """

    def __init__(self, output_axis=None, **kwargs):
        super().__init__(**kwargs)
        self.output_axis = output_axis

    def call(self, inputs):
        self.add_loss(self.compute_loss(inputs))
        if self.output_axis is None:
            return inputs
        if isinstance(self.output_axis, (list, tuple)):
            return [inputs[i] for i in self.output_axis]
        return inputs[self.output_axis]

    def compute_loss(self, inputs):
        raise NotImplementedError("Subclasses of Loss implement compute_loss(inputs).")

    def get_config(self):
        return {**super().get_config(), "output_axis": self.output_axis}


# --- zoo: layers of ALBERT / NEZHA / RoFormer / ELECTRA (below this line) ---


def relative_position_table(q_positions, k_positions, depth, max_relative_position):
    """NEZHA's fixed table of clipped relative positions, (q_len, k_len, depth).

    Entry [i, j] is the interleaved sinusoid [sin(r w0), cos(r w0), sin(r w1),
    ...] with w_m = 10000^(-2m/depth) and r = clip(k_j - q_i, -M, M) + M, the
    row of a (2M + 1)-row table; M = max_relative_position. Not trained.

    >>> tuple(relative_position_table(ops.arange(3), ops.arange(3), 4, 1).shape)
    (3, 3, 4)
    """
    if depth % 2:
        raise ValueError(f"Relative position embeddings need an even size per head, got {depth}.")
    relative = k_positions[None, :] - q_positions[:, None]
    rows = ops.clip(relative, -max_relative_position, max_relative_position) + max_relative_position
    return backend.sinusoidal_embeddings(rows, depth, interleave=True)


@register
class RelativePositionAttention(MultiHeadAttention):
    """Multi-head attention with NEZHA's clipped relative positions.

    With a_ij the fixed sinusoid of the clipped distance j - i (see
    `relative_position_table`), shared by all heads:
      score_ij = q_i . (k_j + a_ij) / sqrt(d),  out_i = sum_j p_ij (v_j + a_ij).
    There are no position weights, so checkpoints are BERT's minus the
    absolute position table.

    >>> att = RelativePositionAttention(heads=2, head_size=4, max_relative_position=64)
    >>> x = ops.ones((1, 5, 8))
    >>> tuple(att([x, x, x]).shape)
    (1, 5, 8)
    """

    def __init__(self, heads, head_size, max_relative_position=64, **kwargs):
        super().__init__(heads, head_size, **kwargs)
        if kwargs.get("position_encoding") is not None:
            raise ValueError("RelativePositionAttention does not take position_encoding.")
        self.max_relative_position = max_relative_position
        self._query_offset = 0

    def call(self, inputs, attention_mask=None, cache=None, cache_index=None, training=None):
        # With a cache the queries start at cache_index; `_attend` needs that offset.
        self._query_offset = 0 if cache_index is None else cache_index
        try:
            return super().call(
                inputs, attention_mask=attention_mask, cache=cache, cache_index=cache_index, training=training
            )
        finally:
            self._query_offset = 0

    def _attend(self, qw, kw, vw, attention_mask, training):
        q_pos = ops.arange(ops.shape(qw)[1]) + self._query_offset
        k_pos = ops.arange(ops.shape(kw)[1])
        key_table = relative_position_table(q_pos, k_pos, self.key_size, self.max_relative_position)
        if self.head_size == self.key_size:
            value_table = key_table
        else:
            value_table = relative_position_table(q_pos, k_pos, self.head_size, self.max_relative_position)
        key_table = ops.cast(key_table, qw.dtype)
        value_table = ops.cast(value_table, vw.dtype)
        qs = self._scale_queries(qw)  # both terms are linear in the queries
        scores = ops.einsum("bqhd,bkhd->bhqk", qs, kw) + ops.einsum("bqhd,qkd->bhqk", qs, key_table)
        scores = _apply_mask(scores, attention_mask)
        probs = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1), vw.dtype)
        probs = self.dropout(probs, training=training)
        outputs = ops.einsum("bhqk,bkhd->bqhd", probs, vw) + ops.einsum("bhqk,qkd->bqhd", probs, value_table)
        return outputs, scores

    def _attend_cached(self, qw, keys, values, attention_mask, training):
        # The relative-position terms live in `_attend`: always go through it.
        return self._attend_seq_first(qw, keys, values, attention_mask, training)

    def get_config(self):
        return {**super().get_config(), "max_relative_position": self.max_relative_position}


# --- zoo: layers of GPT / GPT-2 / T5 (below this line) ---


@register
class RelativePositionBias(keras.layers.Layer):
    """T5's learned relative position bias, returned as an additive attention bias.

    Takes `[q, k]` (any tensors whose axis 1 is the sequence) and returns a
    (1, heads, q_len, k_len) bias: one learned scalar per head and bucket of
    the distance key position - query position, bucketed by
    `backend.t5_relative_position_buckets` (bidirectional in an encoder,
    unidirectional in a decoder). Given `attention_mask=` (boolean, True =
    may attend), masked entries get NEG_INF added, so the result is the whole
    bias of a T5 self-attention. The table is (num_buckets, heads).

    >>> bias = RelativePositionBias(heads=2, num_buckets=8, max_distance=16)
    >>> x = ops.zeros((1, 5, 4))
    >>> tuple(bias([x, x]).shape)
    (1, 2, 5, 5)
    """

    def __init__(
        self,
        heads,
        num_buckets=32,
        max_distance=128,
        bidirectional=True,
        embeddings_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.heads = heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            shape=(self.num_buckets, self.heads),
            initializer=self.embeddings_initializer,
            name="embeddings",
        )

    def call(self, inputs, attention_mask=None, query_offset=None, key_length=None):
        # Cached decoding: the queries sit at slots query_offset.. of a cache
        # of key_length slots (see bert4keras.generation).
        q, k = inputs
        q_len = ops.shape(q)[1]
        k_len = ops.shape(k)[1] if key_length is None else key_length
        query_slots = ops.arange(q_len) if query_offset is None else ops.arange(q_len) + query_offset
        relative = ops.arange(k_len)[None, :] - query_slots[:, None]
        buckets = backend.t5_relative_position_buckets(
            relative, self.bidirectional, self.num_buckets, self.max_distance
        )
        values = ops.take(ops.cast(self.embeddings, self.compute_dtype), buckets, axis=0)
        bias = ops.transpose(values, (2, 0, 1))[None]  # (1, heads, q_len, k_len)
        if attention_mask is not None:
            bias = bias + backend.mask_to_bias(attention_mask, bias.dtype)
        return bias

    def compute_output_spec(self, inputs, attention_mask=None, query_offset=None, key_length=None):
        batch = 1 if attention_mask is None else attention_mask.shape[0]
        k_len = inputs[1].shape[1] if key_length is None else key_length
        shape = (batch, self.heads, inputs[0].shape[1], k_len)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            heads=self.heads,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
            bidirectional=self.bidirectional,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
        )
        return config


@register
class ZeroPaddedPositions(keras.layers.Layer):
    """Sets the hidden states of padding tokens to zero: `[x, token_ids] -> x`.

    The T5 encoder ends with it, so a decoder given only the encoder output
    can still tell the padding apart (see `ContextMask`).

    >>> x = ops.ones((1, 3, 2))
    >>> y = ZeroPaddedPositions()([x, ops.array([[5, 7, 0]])])
    >>> ops.convert_to_numpy(y)[0, :, 0].tolist()
    [1.0, 1.0, 0.0]
    """

    def __init__(self, pad_id=0, **kwargs):
        super().__init__(**kwargs)
        self.pad_id = pad_id

    def call(self, inputs):
        x, token_ids = inputs
        keep = backend.padding_mask(token_ids, self.pad_id)[:, 0, 0, :, None]
        return x * ops.cast(keep, x.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}


@register
class ContextMask(keras.layers.Layer):
    """Attention mask over an encoder output: padding rows are all zero.

    Returns a (batch, 1, 1, k_len) boolean mask, True where the context row
    has a non-zero entry. It pairs with `ZeroPaddedPositions` at the end of
    the encoder, so that `decoder([encoder(tokens), ...])` masks the source
    padding in cross-attention without a separate mask input.

    >>> context = ops.array([[[1.0, 2.0], [0.0, 0.0]]])
    >>> ops.convert_to_numpy(ContextMask()(context))[0, 0, 0].tolist()
    [True, False]
    """

    def call(self, context):
        # padding_mask compares to pad_id; a row's max |value| is 0 only for padding.
        return backend.padding_mask(ops.max(ops.abs(context), axis=-1), 0)

    def compute_output_spec(self, context):
        return keras.KerasTensor((context.shape[0], 1, 1, context.shape[1]), dtype="bool")


# Task heads live in heads.py; they are layers too, so they are importable here.
from bert4keras.heads import (  # noqa: E402, F401
    ConditionalRandomField,
    EfficientGlobalPointer,
    GlobalAveragePooling1D,
    GlobalMaxPooling1D,
    GlobalPointer,
    MaximumEntropyMarkovModel,
)


@register
class RecomputedBlock(keras.Model):
    """A functional sub-model recomputed as one unit in the backward pass.

    `build_transformer_model(..., recompute=True)` wraps each transformer
    block (attention, feed-forward, residual sums, norms, dropout) in one:
    training keeps only the block's inputs (its hidden states, the attention
    mask and any position bias) for the backward pass, and runs the block
    again there. The dropout masks are drawn once and reused by the
    recomputation. Inference runs it as a plain functional model.

    >>> x = keras.Input((None, 8))
    >>> block = RecomputedBlock(x, keras.layers.Dense(8)(x))
    >>> block(ops.ones((2, 3, 8)), training=True).shape
    (2, 3, 8)
    """

    def call(self, inputs, training=None, mask=None):
        forward = super().call
        if not training:
            return forward(inputs, training=training, mask=mask)
        dropouts = [
            layer
            for layer in self._flatten_layers(include_self=False)
            if isinstance(getattr(layer, "seed_generator", None), keras.random.SeedGenerator)
            and getattr(layer, "rate", 1) > 0
        ]
        # Every input tensor, however nested, is an argument of the recomputed
        # function: its floating ones get gradients.
        run = backend.recompute(
            lambda *tensors: forward(keras.tree.pack_sequence_as(inputs, list(tensors)), training=True, mask=mask),
            dropouts,
        )
        return run(*keras.tree.flatten(inputs))
