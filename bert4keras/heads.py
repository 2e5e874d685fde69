"""Task heads: CRF, MEMM, GlobalPointer, EfficientGlobalPointer, masked pooling.

How padding reaches the heads
-----------------------------
Every head takes either a tensor `x` or a pair `[x, mask]`, where `mask` is
(batch, seq) and nonzero on real tokens: booleans, 0/1, or simply the token
ids (id 0 is padding). A Keras mask arriving with `x` (Embedding with
mask_zero=True, Masking) is honoured too; both are combined when given.

Keras 3 does not hand masks to loss functions reliably, so the sequence heads
(CRF, MEMM) carry the padding *in their output*: real positions are returned
unchanged and padded positions are overwritten with a large negative score
(below `PADDING_THRESHOLD`). The losses, metrics and decoders read the padding
back from `y_pred`, which is why `model.compile(loss=crf.sparse_loss)` works
in plain `model.fit` on every backend. GlobalPointer writes the same large
negative score into every span that starts or ends on padding (or ends before
it starts), so such spans score ~0 in the losses and are never decoded.

Bad labels
----------
Label sequences whose length differs from the inputs', or one-hot labels with
the wrong number of tags, raise a ValueError naming both sizes; the check is
on static shapes, which `fit` knows on TensorFlow and JAX. Tag values outside
[0, num_tags) on real tokens raise a ValueError naming the sample, the
position and the tag set when the loss runs eagerly; inside a compiled `fit`
step values cannot raise, so the bad sample's loss becomes NaN instead of
being trained on silently. Run `check_tag_labels(labels, num_tags,
mask=token_ids)` (or `crf.check_labels`) on the numpy data before `fit` for
the readable message.

Example (sequence labelling with a CRF):

>>> import keras, numpy as np
>>> token_ids = keras.Input((None,), dtype="int32")
>>> x = keras.layers.Embedding(100, 16)(token_ids)
>>> emissions = keras.layers.Dense(5)(x)
>>> crf = ConditionalRandomField(lr_multiplier=10)
>>> scores = crf([emissions, token_ids])
>>> model = keras.Model(token_ids, scores)
>>> model.compile("adam", loss=crf.sparse_loss, metrics=[crf.sparse_accuracy])
>>> ids = np.array([[3, 4, 5, 0]]); tags = np.array([[1, 2, 2, 0]])
>>> _ = model.fit(ids, tags, epochs=1, verbose=0)
>>> best = crf.decode(model.predict(ids, verbose=0))  # numpy, -1 on padding
>>> best.shape, int(best[0, 3])
((1, 4), -1)
"""
import math
import weakref

import keras
import numpy as np
from keras import ops

from bert4keras.backend import apply_rotary
from bert4keras.losses import _float32, concrete_value

# Scores at or below this are padding. Real emission/span scores from a Dense
# layer never come near it; padded ones are set far below it (see below).
PADDING_THRESHOLD = -3e4


def _padding_score(dtype):
    """The score written at padded positions: far below PADDING_THRESHOLD and
    still finite in `dtype` (float16 tops out at 65504, so -1e9 would be -inf)."""
    return -6e4 if keras.backend.standardize_dtype(dtype) == "float16" else -1e9


def _first_shape(input_shape):
    """The shape of `x` when the layer was called on `x` or `[x, mask]`."""
    if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(
        input_shape[0], (list, tuple)
    ):
        return tuple(input_shape[0])
    return tuple(input_shape)


def _inputs_and_mask(inputs, keras_mask=None):
    """Split `x` / `[x, mask]` and merge in a Keras mask: (x, bool mask or None)."""
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != 2:
            raise ValueError(
                f"Expected `x` or `[x, mask]`, got a list of {len(inputs)} tensors."
            )
        x, explicit = inputs
        if isinstance(keras_mask, (list, tuple)):
            keras_mask = keras_mask[0]
    else:
        x, explicit = inputs, None
    masks = []
    for m in (explicit, keras_mask):
        if m is None:
            continue
        m = ops.convert_to_tensor(m)
        if len(m.shape) != 2:
            raise ValueError(
                f"The padding mask must be (batch, seq); got shape {tuple(m.shape)}."
            )
        a, b = m.shape[1], x.shape[1]
        if isinstance(a, int) and isinstance(b, int) and a != b:
            raise ValueError(
                f"The padding mask covers {a} positions but the inputs have {b}."
            )
        if keras.backend.standardize_dtype(m.dtype) != "bool":
            m = ops.not_equal(m, 0)
        masks.append(m)
    if not masks:
        return x, None
    mask = masks[0] if len(masks) == 1 else ops.logical_and(masks[0], masks[1])
    return x, mask


def _fill_padding(scores, mask):
    """Overwrite padded positions (mask False) of (batch, seq, ...) scores."""
    if mask is None:
        return scores
    while len(mask.shape) < len(scores.shape):
        mask = ops.expand_dims(mask, -1)
    return ops.where(mask, scores, ops.cast(_padding_score(scores.dtype), scores.dtype))


def padding_from_scores(y_pred):
    """(batch, seq) bool: True where a sequence head's output is a real token."""
    return ops.any(ops.greater(y_pred, PADDING_THRESHOLD), axis=-1)


# ---------------------------------------------------------------------------
# Linear-chain recursions shared by CRF and MEMM (any mask, not only suffixes:
# the chain runs over the real positions and skips padded ones).
# ---------------------------------------------------------------------------


def _time_major(x):
    return ops.moveaxis(x, 1, 0)


def _has_real_before(mask):
    """(batch, seq) bool: some real position exists strictly before t."""
    m = ops.cast(mask, "int32")
    return ops.greater(ops.cumsum(m, axis=1) - m, 0)


def _has_real_after(mask):
    m = ops.cast(mask, "int32")
    return ops.greater(ops.sum(m, axis=1, keepdims=True) - ops.cumsum(m, axis=1), 0)


def _scan_over_time(step, init, sequences, reverse=False):
    """ops.scan of step(carry, (x_t, y_t, ...)) over axis 1 of (batch, seq, ...) tensors.

    Scans over the time index and gathers inside the step: Keras' TF `scan`
    fails when given several sequences whose length is unknown (None), as in
    `fit` on length-bucketed batches.
    """
    time_major = [_time_major(s) for s in sequences]

    def indexed_step(carry, t):
        return step(carry, tuple(ops.take(s, t, axis=0) for s in time_major))

    return ops.scan(indexed_step, init, ops.arange(ops.shape(sequences[0])[1]), reverse=reverse)


def _last_real_value(values, mask, reverse=False):
    """values (batch, seq, k) -> at each t, the value at the nearest real
    position before t (after t with reverse=True); zeros if there is none."""

    def step(carry, inputs):
        value, real = inputs
        return ops.where(real[:, None], value, carry), carry

    _, previous = _scan_over_time(step, ops.zeros_like(values[:, 0]), (values, mask), reverse=reverse)
    return _time_major(previous)


def _chain_forward(emissions, mask, start_fn, pair_fn, reduce_fn):
    """alpha[:, t, j]: best (max) or total (logsumexp) score of the paths over
    the real positions <= t that end in tag j. Carried over padded positions.

    start_fn(e_t) scores the first real position, pair_fn(e_t) -> (batch, i, j)
    scores moving from tag i to tag j at position t.
    """
    started = _has_real_before(mask)

    def step(alpha, inputs):
        e, real, has_prev = inputs
        moved = reduce_fn(alpha[:, :, None] + pair_fn(e), axis=1)
        new = ops.where(has_prev[:, None], moved, start_fn(e))
        alpha = ops.where(real[:, None], new, alpha)
        return alpha, alpha

    _, alphas = _scan_over_time(step, ops.zeros_like(emissions[:, 0]), (emissions, mask, started))
    return _time_major(alphas)


def _chain_decode(emissions, mask, start_fn, pair_fn):
    """Viterbi: (batch, seq) int32 best tags, -1 on padded positions."""
    alphas = _chain_forward(emissions, mask, start_fn, pair_fn, ops.max)
    started = _has_real_before(mask)
    previous_alpha = ops.concatenate([ops.zeros_like(alphas[:, :1]), alphas[:, :-1]], 1)

    def step(tag, inputs):
        alpha_prev, e, real, has_prev = inputs
        # Best predecessor of `tag` at this position.
        column = ops.take_along_axis(pair_fn(e), tag[:, None, None], axis=2)[..., 0]
        best_prev = ops.cast(ops.argmax(alpha_prev + column, axis=-1), "int32")
        new_tag = ops.where(ops.logical_and(real, has_prev), best_prev, tag)
        return new_tag, tag

    last_tag = ops.cast(ops.argmax(alphas[:, -1], axis=-1), "int32")
    _, tags = _scan_over_time(step, last_tag, (previous_alpha, emissions, mask, started), reverse=True)
    return ops.where(mask, _time_major(tags), -1)


def _bool_mask(mask, emissions):
    if mask is None:
        return ops.ones(ops.shape(emissions)[:2], "bool")
    return ops.cast(mask, "bool")


def crf_negative_log_likelihood(emissions, tags, trans, mask=None):
    """-log p(tags | emissions) of a linear-chain CRF, one value per sequence.

    emissions: (batch, seq, num_tags); tags: one-hot (batch, seq, num_tags);
    trans: (num_tags, num_tags), trans[i, j] scores tag i followed by tag j;
    mask: (batch, seq), nonzero on real positions; the chain runs over them
    only (padding may be anywhere). A sequence without real positions has
    loss 0.
    """
    emissions, tags, trans = _float32(emissions), _float32(tags), _float32(trans)
    mask = _bool_mask(mask, emissions)
    real = mask[:, :, None]
    point_score = ops.sum(ops.where(real, tags * emissions, 0.0), axis=(1, 2))
    previous = _last_real_value(tags, mask)
    pair_scores = ops.einsum("bti,ij,btj->bt", previous, trans, tags)
    trans_score = ops.sum(ops.where(mask, pair_scores, 0.0), axis=1)

    alphas = _chain_forward(
        emissions, mask, lambda e: e, lambda e: trans[None] + e[:, None, :], ops.logsumexp
    )
    log_norm = ops.logsumexp(alphas[:, -1], axis=-1)
    nll = log_norm - point_score - trans_score
    return ops.where(ops.any(mask, axis=1), nll, 0.0)


def crf_viterbi_decode(emissions, trans, mask=None):
    """Best tag paths of a linear-chain CRF: (batch, seq) int32, -1 on padding."""
    emissions, trans = _float32(emissions), _float32(trans)
    mask = _bool_mask(mask, emissions)
    return _chain_decode(
        emissions, mask, lambda e: e, lambda e: trans[None] + e[:, None, :]
    )


def _viterbi_numpy(start_scores, pair_scores, mask):
    """Host-side batched Viterbi with the semantics of `_chain_decode`.

    Eager `ops.scan` is traced and compiled again on every call (about a
    second per batch on CPU), so the layers' `decode`, which works on
    `model.predict` output anyway, runs this numpy loop instead (milliseconds).
    start_scores (batch, seq, tags); pair_scores(t) -> (batch, tags, tags).
    """
    batch, length, num_tags = start_scores.shape
    alpha = np.zeros((batch, num_tags))
    started = np.zeros(batch, bool)
    back = np.full((batch, length, num_tags), -1)  # -1: the chain starts here
    for t in range(length):
        scores = alpha[:, :, None] + pair_scores(t)
        best_prev = scores.argmax(1)
        moved = np.take_along_axis(scores, best_prev[:, None, :], 1)[:, 0]
        back[started, t] = best_prev[started]
        new = np.where(started[:, None], moved, start_scores[:, t])
        alpha = np.where(mask[:, t, None], new, alpha)
        started |= mask[:, t]
    tags = np.full((batch, length), -1, "int32")
    current = alpha.argmax(1)
    rows = np.arange(batch)
    for t in reversed(range(length)):
        real = mask[:, t]
        tags[real, t] = current[real]
        previous = back[rows, t, current]
        current = np.where(real & (previous >= 0), previous, current)
    return tags


def _log_softmax_numpy(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


# ---------------------------------------------------------------------------
# Label checks
# ---------------------------------------------------------------------------


def check_tag_labels(labels, num_tags, mask=None, sparse=True):
    """Raise a clear ValueError when tag labels cannot train a tagger.

    labels: (batch, seq) integer tags (sparse=True) or one-hot
    (batch, seq, num_tags); mask: the model's (batch, seq) input mask or
    token ids (nonzero = real). Checks that the label length equals the
    input length and that every label on a real position is in
    [0, num_tags). Values on padded positions are ignored. Works on numpy
    data before `fit` and on eager tensors; returns None when all is well.

    >>> check_tag_labels([[0, 1, 2]], num_tags=3)
    >>> check_tag_labels([[0, 5]], num_tags=3)
    Traceback (most recent call last):
    ...
    ValueError: Tag label 5 at (sample 0, position 1) is outside the tag set [0, 3) ...
    """
    labels = np.asarray(labels)
    if not sparse:
        if labels.ndim != 3 or labels.shape[-1] != num_tags:
            raise ValueError(
                f"One-hot tag labels must be (batch, seq, {num_tags}); got shape "
                f"{labels.shape}."
            )
        labels = labels.argmax(-1)
    if labels.ndim == 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.ndim != 2:
        raise ValueError(
            f"Tag labels must be (batch, seq) integers; got shape {labels.shape}."
        )
    if mask is not None:
        mask = np.asarray(mask) != 0
        if labels.shape[1] != mask.shape[1]:
            raise ValueError(
                f"Label sequences have length {labels.shape[1]} but the inputs "
                f"have {mask.shape[1]} positions; pad or truncate the labels to "
                "the input length (one tag per token, [CLS]/[SEP] included)."
            )
    else:
        mask = np.ones(labels.shape, bool)
    bad = mask & ((labels < 0) | (labels >= num_tags))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"Tag label {labels[row, col]} at (sample {row}, position {col}) is "
            f"outside the tag set [0, {num_tags}) of the layer's {num_tags} "
            "tags; fix the label map or the number of output units."
        )


def _sparse_tag_labels(y_true, y_pred):
    """Labels as int32 (batch, seq), after checking the static shapes."""
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == 3 and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, -1)
    if len(y_true.shape) != 2:
        raise ValueError(
            f"Sparse tag labels must be (batch, seq) integers; got shape "
            f"{tuple(y_true.shape)} (use dense_loss for one-hot labels)."
        )
    a, b = y_true.shape[1], y_pred.shape[1]
    if isinstance(a, int) and isinstance(b, int) and a != b:
        raise ValueError(
            f"Label sequences have length {a} but the inputs have {b} positions; "
            "pad or truncate the labels to the input length."
        )
    return ops.cast(y_true, "int32")


def _dense_tag_labels(y_true, y_pred):
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) != 3:
        raise ValueError(
            f"Dense tag labels must be one-hot (batch, seq, num_tags); got shape "
            f"{tuple(y_true.shape)} (use sparse_loss for integer labels)."
        )
    for axis, what in ((1, "length"), (2, "number of tags")):
        a, b = y_true.shape[axis], y_pred.shape[axis]
        if isinstance(a, int) and isinstance(b, int) and a != b:
            raise ValueError(
                f"One-hot labels have {what} {a} but the scores have {b}; labels "
                f"must be (batch, seq, num_tags) like the layer output."
            )
    return ops.cast(y_true, "float32")


def _nan_where_invalid(loss, labels, mask, num_tags):
    """Inside a traced step a bad label cannot raise; it makes that sample's
    loss NaN so it is seen rather than silently trained on."""
    outside = ops.logical_or(ops.less(labels, 0), ops.greater_equal(labels, num_tags))
    bad = ops.any(ops.logical_and(outside, mask), axis=1)
    return ops.where(bad, float("nan"), loss)


def _masked_token_accuracy(labels, y_pred, mask):
    predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
    correct = ops.logical_and(ops.equal(predicted, labels), mask)
    count = ops.sum(ops.cast(mask, "float32"))
    return ops.sum(ops.cast(correct, "float32")) / ops.maximum(count, 1.0)


# Live CRF/MEMM layers by name, so that a loss restored by `load_model` finds
# the layer restored with it (the newest layer of that name).
_TAGGERS_BY_NAME = weakref.WeakValueDictionary()


@keras.saving.register_keras_serializable(package="bert4keras")
class TaggerFunction:
    """A CRF/MEMM loss or metric bound to its layer: what `crf.sparse_loss`,
    `crf.dense_loss`, `crf.sparse_accuracy` and `crf.dense_accuracy` return.

    Calling it computes the loss/metric with the layer's current weights. It
    serializes as (layer name, function name), so a model compiled with it
    survives `model.save` / `keras.models.load_model`: the restored function
    uses the restored layer of the same name.
    """

    def __init__(self, layer_name, function, layer=None):
        self.layer_name = layer_name
        self.function = function
        self.__name__ = function  # Keras names the loss/metric after this
        self._layer = layer

    def __call__(self, y_true, y_pred):
        layer = self._layer
        if layer is None:
            layer = _TAGGERS_BY_NAME.get(self.layer_name)
        if layer is None:
            raise ValueError(
                f"No live layer named {self.layer_name!r} for its {self.function}; "
                f"compile with the layer's own function, e.g. "
                f"model.compile(loss=crf.{self.function})."
            )
        return getattr(layer, "_" + self.function)(y_true, y_pred)

    def get_config(self):
        return {"layer_name": self.layer_name, "function": self.function}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class _TaggerBase(keras.layers.Layer):
    """Shared input handling, labels and accuracy of CRF and MEMM."""

    def __init__(self, lr_multiplier=1, **kwargs):
        super().__init__(**kwargs)
        self.lr_multiplier = lr_multiplier
        self.supports_masking = True
        self.num_tags = None
        _TAGGERS_BY_NAME[self.name] = self

    def _num_tags_from(self, input_shape):
        num_tags = _first_shape(input_shape)[-1]
        if num_tags is None:
            raise ValueError(
                f"{type(self).__name__} needs a known last axis (the number of "
                f"tags); got shape {_first_shape(input_shape)}."
            )
        self.num_tags = int(num_tags)
        return self.num_tags

    def _scaled_weight(self, name, shape):
        # Stored divided by lr_multiplier and multiplied back in use, so the
        # optimizer's step on the effective value is lr_multiplier times larger
        # under Adam-like optimizers (lr_multiplier**2 under plain SGD).
        weight = self.add_weight(name=name, shape=shape, initializer="glorot_uniform")
        if self.lr_multiplier != 1:
            weight.assign(weight / self.lr_multiplier)
        return weight

    def _scaled(self, weight):
        return weight * self.lr_multiplier if self.lr_multiplier != 1 else weight

    def call(self, inputs, mask=None):
        x, mask = _inputs_and_mask(inputs, mask)
        return _fill_padding(x, mask)

    def compute_mask(self, inputs, mask=None):
        # The padding now lives in the scores; a Keras mask on the output
        # would make Keras mask the per-sequence loss a second time.
        return None

    def check_labels(self, labels, mask=None, sparse=True):
        """`check_tag_labels` with this layer's number of tags."""
        if self.num_tags is None:
            raise ValueError("Call the layer (build the model) before checking labels.")
        check_tag_labels(labels, self.num_tags, mask=mask, sparse=sparse)

    def _eager_check(self, labels, mask):
        values, real = concrete_value(labels), concrete_value(mask)
        if values is not None and real is not None:
            check_tag_labels(values, self.num_tags, mask=real)

    @staticmethod
    def _host_scores_and_mask(y_pred, mask):
        """numpy float64 scores and bool mask (read from the scores if None)."""
        scores = np.asarray(ops.convert_to_numpy(y_pred), "float64")
        if mask is None:
            return scores, (scores > PADDING_THRESHOLD).any(-1)
        mask = np.asarray(ops.convert_to_numpy(mask)) != 0
        if mask.shape != scores.shape[:2]:
            raise ValueError(
                f"The mask has shape {mask.shape} but the scores cover "
                f"{scores.shape[:2]} (batch, seq) positions."
            )
        return scores, mask

    def _labels_and_mask(self, y_true, y_pred, sparse):
        y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
        mask = padding_from_scores(y_pred)
        if sparse:
            labels = _sparse_tag_labels(y_true, y_pred)
        else:
            labels = ops.cast(ops.argmax(_dense_tag_labels(y_true, y_pred), -1), "int32")
        self._eager_check(labels, mask)
        return labels, y_pred, mask

    @property
    def sparse_loss(self):
        """Loss for (batch, seq) integer tags: `loss(y_true, y_pred)`, one
        value per sequence; pass it to `model.compile(loss=...)`."""
        return TaggerFunction(self.name, "sparse_loss", self)

    @property
    def dense_loss(self):
        """`sparse_loss` for one-hot (batch, seq, num_tags) labels."""
        return TaggerFunction(self.name, "dense_loss", self)

    @property
    def sparse_accuracy(self):
        """Token accuracy of the per-position argmax of the scores over real
        tokens, for integer tags (a cheap training signal; `decode` gives the
        real paths). It reads no layer weight, so it works as a metric on
        JAX too, where Keras metrics cannot see trained weights."""
        return TaggerFunction(self.name, "sparse_accuracy", self)

    @property
    def dense_accuracy(self):
        """`sparse_accuracy` for one-hot labels."""
        return TaggerFunction(self.name, "dense_accuracy", self)

    def _sparse_accuracy(self, y_true, y_pred):
        labels, y_pred, mask = self._labels_and_mask(y_true, y_pred, sparse=True)
        return _masked_token_accuracy(labels, y_pred, mask)

    def _dense_accuracy(self, y_true, y_pred):
        labels, y_pred, mask = self._labels_and_mask(y_true, y_pred, sparse=False)
        return _masked_token_accuracy(labels, y_pred, mask)

    def _sparse_loss(self, y_true, y_pred):
        return self._loss(y_true, y_pred, sparse=True)

    def _dense_loss(self, y_true, y_pred):
        return self._loss(y_true, y_pred, sparse=False)

    def get_config(self):
        return {**super().get_config(), "lr_multiplier": self.lr_multiplier}


@keras.saving.register_keras_serializable(package="bert4keras")
class ConditionalRandomField(_TaggerBase):
    """Linear-chain CRF over per-token emission scores.

    Call it on emissions `x` (batch, seq, num_tags) or `[x, mask]` (mask:
    (batch, seq), nonzero on real tokens, e.g. the token ids). It learns a
    transition matrix `trans` (num_tags, num_tags), trans[i, j] scoring tag i
    followed by tag j, and returns the emissions with padded positions set to
    a large negative score; `sparse_loss` / `dense_loss` (negative
    log-likelihood per sequence) and `sparse_accuracy` / `dense_accuracy`
    read the padding back from there. Padding may be anywhere: the chain runs
    over the real positions.

    Args:
        lr_multiplier: the transition matrix trains this many times faster
            (it is stored divided by lr_multiplier and multiplied back).

    Decode with `crf.decode(scores)` or pass
    `keras.ops.convert_to_numpy(crf.trans)` to `snippets.ViterbiDecoder`.

    >>> import numpy as np
    >>> crf = ConditionalRandomField()
    >>> scores = crf([np.zeros((1, 3, 4), "float32"), np.array([[1, 1, 0]])])
    >>> tuple(crf.sparse_loss(np.array([[0, 1, 0]]), scores).shape)
    (1,)
    """

    def build(self, input_shape):
        num_tags = self._num_tags_from(input_shape)
        self._trans = self._scaled_weight("trans", (num_tags, num_tags))

    @property
    def trans(self):
        """The effective transition matrix (num_tags, num_tags)."""
        return self._scaled(self._trans)

    def _loss(self, y_true, y_pred, sparse):
        labels, y_pred, mask = self._labels_and_mask(y_true, y_pred, sparse)
        if sparse:
            tags = ops.one_hot(labels, self.num_tags, dtype="float32")
        else:
            tags = _dense_tag_labels(y_true, y_pred)
        loss = crf_negative_log_likelihood(y_pred, tags, self.trans, mask)
        return _nan_where_invalid(loss, labels, mask, self.num_tags)

    def decode(self, y_pred, mask=None):
        """Viterbi best paths as numpy (batch, seq) int32, -1 on padding.

        y_pred: the layer output (e.g. `model.predict(...)`); the padding is
        read from it unless `mask` is given. Runs on the host in numpy; use
        `crf_viterbi_decode` to decode inside a graph.
        """
        emissions, mask = self._host_scores_and_mask(y_pred, mask)
        trans = np.asarray(ops.convert_to_numpy(self.trans), "float64")
        return _viterbi_numpy(emissions, lambda t: trans[None] + emissions[:, t, None, :], mask)


@keras.saving.register_keras_serializable(package="bert4keras")
class MaximumEntropyMarkovModel(_TaggerBase):
    """(Bidirectional) maximum-entropy Markov model: a cheaper CRF stand-in.

    Each position is a softmax over (emission + transition from the previous
    gold tag) / 2; the first real position uses its emission alone. With
    bidirectional=True the same is done right-to-left with the transposed
    transitions and the two losses are averaged. Inputs, padding handling and
    the loss/accuracy methods are as in `ConditionalRandomField`; the loss is
    the mean token cross-entropy of each sequence.

    Args:
        lr_multiplier: learning-rate multiplier of the transitions.
        hidden_dim: if set, trans = l_trans @ r_trans.T with rank hidden_dim.
        bidirectional: also train the right-to-left direction.

    >>> import numpy as np
    >>> memm = MaximumEntropyMarkovModel()
    >>> scores = memm(np.zeros((2, 3, 4), "float32"))
    >>> tuple(memm.sparse_loss(np.zeros((2, 3)), scores).shape)
    (2,)
    """

    def __init__(self, lr_multiplier=1, hidden_dim=None, bidirectional=True, **kwargs):
        super().__init__(lr_multiplier=lr_multiplier, **kwargs)
        self.hidden_dim = hidden_dim
        self.bidirectional = bidirectional

    def build(self, input_shape):
        num_tags = self._num_tags_from(input_shape)
        if self.hidden_dim is None:
            self._trans = self._scaled_weight("trans", (num_tags, num_tags))
        else:
            self._l_trans = self._scaled_weight("l_trans", (num_tags, self.hidden_dim))
            self._r_trans = self._scaled_weight("r_trans", (num_tags, self.hidden_dim))

    @property
    def trans(self):
        """The effective transition matrix (num_tags, num_tags)."""
        if self.hidden_dim is None:
            return self._scaled(self._trans)
        left, right = self._scaled(self._l_trans), self._scaled(self._r_trans)
        return ops.matmul(left, ops.transpose(right))

    def _direction_loss(self, tags, y_pred, mask, trans, backwards):
        neighbour = _last_real_value(tags, mask, reverse=backwards)
        has_neighbour = _has_real_after(mask) if backwards else _has_real_before(mask)
        history = ops.matmul(neighbour, trans)
        logits = ops.where(has_neighbour[:, :, None], (y_pred + history) / 2, y_pred)
        token_loss = -ops.sum(tags * ops.log_softmax(logits, axis=-1), axis=-1)
        weights = ops.cast(mask, "float32")
        return ops.sum(token_loss * weights, 1) / ops.maximum(ops.sum(weights, 1), 1.0)

    def _loss(self, y_true, y_pred, sparse):
        labels, y_pred, mask = self._labels_and_mask(y_true, y_pred, sparse)
        tags = ops.one_hot(labels, self.num_tags, dtype="float32")
        trans = _float32(self.trans)
        loss = self._direction_loss(tags, y_pred, mask, trans, backwards=False)
        if self.bidirectional:
            backward = self._direction_loss(tags, y_pred, mask, ops.transpose(trans), True)
            loss = (loss + backward) / 2
        return _nan_where_invalid(loss, labels, mask, self.num_tags)

    def decode(self, y_pred, mask=None):
        """Exact best paths of the left-to-right model, numpy (batch, seq),
        -1 on padding: maximises sum_t log softmax((e_t + trans[y_{t-1}]) / 2)."""
        emissions, mask = self._host_scores_and_mask(y_pred, mask)
        trans = np.asarray(ops.convert_to_numpy(self.trans), "float64")

        def pair_scores(t):
            return _log_softmax_numpy((emissions[:, t, None, :] + trans[None]) / 2)

        return _viterbi_numpy(_log_softmax_numpy(emissions), pair_scores, mask)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "bidirectional": self.bidirectional,
        }


# ---------------------------------------------------------------------------
# GlobalPointer
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="bert4keras")
class GlobalPointer(keras.layers.Layer):
    """Scores every span (start, end) of a sequence for each of `heads` types.

    Input `x` (batch, seq, hidden) or `[x, mask]` (see the module docstring);
    output logits (batch, heads, seq, seq) with
    logits[b, h, i, j] = <q_h(x_i), k_h(x_j)> / sqrt(head_size),
    q and k rotated by their positions (RoPE) so the score sees j - i. Spans
    touching padding, and with tril_mask=True spans with end < start, are set
    to a large negative score. Train with `losses.global_pointer_crossentropy`
    (or the sparse form), evaluate with `losses.GlobalPointerF1`, and read the
    spans with `decode_spans`.

    >>> import numpy as np
    >>> gp = GlobalPointer(heads=2, head_size=8)
    >>> tuple(gp([np.zeros((1, 5, 16), "float32"), np.array([[1, 1, 1, 0, 0]])]).shape)
    (1, 2, 5, 5)
    """

    def __init__(
        self,
        heads,
        head_size,
        RoPE=True,
        use_bias=True,
        tril_mask=True,
        kernel_initializer="lecun_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if RoPE and head_size % 2:
            raise ValueError(
                f"RoPE rotates pairs of features; head_size={head_size} must be even."
            )
        self.heads = heads
        self.head_size = head_size
        self.RoPE = RoPE
        self.use_bias = use_bias
        self.tril_mask = tril_mask
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.supports_masking = True
        self._make_projections()

    def _make_projections(self):
        self.dense = keras.layers.Dense(
            self.heads * self.head_size * 2,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            name="dense",
        )

    def build(self, input_shape):
        self.dense.build(_first_shape(input_shape))

    def _project(self, x):
        """q, k: (batch, heads, seq, head_size), and an optional span bias."""
        h = self.dense(x)
        shape = ops.shape(h)
        h = ops.reshape(h, (shape[0], shape[1], self.heads, 2 * self.head_size))
        h = ops.transpose(h, (0, 2, 1, 3))
        return h[..., : self.head_size], h[..., self.head_size :], None

    def call(self, inputs, mask=None):
        x, mask = _inputs_and_mask(inputs, mask)
        q, k, bias = self._project(x)
        if self.RoPE:
            positions = ops.arange(ops.shape(x)[1])
            q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        logits = ops.einsum("bhmd,bhnd->bhmn", q, k) / math.sqrt(self.head_size)
        if bias is not None:
            logits = logits + bias
        return self._mask_spans(logits, mask)

    def _mask_spans(self, logits, mask):
        seq_len = ops.shape(logits)[-1]
        keep = None
        if mask is not None:
            keep = ops.logical_and(mask[:, None, :, None], mask[:, None, None, :])
        if self.tril_mask:
            idx = ops.arange(seq_len)
            upper = ops.greater_equal(idx[None, :], idx[:, None])[None, None]
            keep = upper if keep is None else ops.logical_and(keep, upper)
        if keep is None:
            return logits
        return ops.where(keep, logits, ops.cast(_padding_score(logits.dtype), logits.dtype))

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "heads": self.heads,
            "head_size": self.head_size,
            "RoPE": self.RoPE,
            "use_bias": self.use_bias,
            "tril_mask": self.tril_mask,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


@keras.saving.register_keras_serializable(package="bert4keras")
class EfficientGlobalPointer(GlobalPointer):
    """GlobalPointer with one shared (q, k) projection plus per-type biases.

    logits[b, h, i, j] = <q(x_i), k(x_j)> / sqrt(head_size)
                         + (w_start_h . p_i + w_end_h . p_j) / 2
    where p = [q, k] interleaved is the shared projection; far fewer
    parameters than GlobalPointer when there are many types. Same arguments,
    inputs and masking as `GlobalPointer`.

    >>> import numpy as np
    >>> egp = EfficientGlobalPointer(heads=3, head_size=8)
    >>> tuple(egp(np.zeros((2, 4, 16), "float32")).shape)
    (2, 3, 4, 4)
    """

    def _make_projections(self):
        init = self.kernel_initializer
        self.p_dense = keras.layers.Dense(
            self.head_size * 2, use_bias=self.use_bias, kernel_initializer=init, name="p_dense"
        )
        self.q_dense = keras.layers.Dense(
            self.heads * 2, use_bias=self.use_bias, kernel_initializer=init, name="q_dense"
        )

    def build(self, input_shape):
        shape = _first_shape(input_shape)
        self.p_dense.build(shape)
        self.q_dense.build(tuple(shape[:-1]) + (self.head_size * 2,))

    def _project(self, x):
        p = self.p_dense(x)
        shape = ops.shape(p)
        # Even features are q, odd ones k; shared by all heads: (batch, 1, seq, d).
        pairs = ops.reshape(p, (shape[0], shape[1], self.head_size, 2))
        q, k = pairs[:, None, :, :, 0], pairs[:, None, :, :, 1]
        bias = ops.reshape(self.q_dense(p) / 2, (shape[0], shape[1], self.heads, 2))
        bias = ops.transpose(bias, (0, 2, 3, 1))  # (batch, heads, 2, seq)
        # Channel 2h scores the end of a span of type h, channel 2h + 1 its start.
        return q, k, bias[:, :, 0, None, :] + bias[:, :, 1, :, None]


def decode_spans(scores, threshold=0.0, mapping=None, categories=None):
    """Spans whose GlobalPointer score exceeds `threshold`.

    scores: (heads, seq, seq) for one text, or (batch, heads, seq, seq) for a
    batch (then `mapping` is a list of mappings and a list of lists is
    returned). Padded and masked spans (score <= PADDING_THRESHOLD) and spans
    with end < start are never returned, whatever the threshold.

    Without `mapping`: [(type, start, end)] with token positions, end
    inclusive. With `mapping` (the tokenizer's `rematch`: for each token, the
    list of character indices it covers in the original text; [] for special
    tokens such as [CLS]/[SEP]): [(type, char_start, char_end)] with
    char_end inclusive, i.e. the entity is text[char_start:char_end + 1];
    spans starting or ending on a special token are dropped. `categories`
    maps type indices to names. Results are sorted by (start, end, type).

    >>> import numpy as np
    >>> s = np.full((1, 4, 4), -10.0); s[0, 1, 2] = 5.0
    >>> decode_spans(s)
    [(0, 1, 2)]
    >>> decode_spans(s, mapping=[[], [0, 1], [2], []], categories=["PER"])
    [('PER', 0, 2)]
    """
    scores = np.asarray(ops.convert_to_numpy(scores))
    if scores.ndim == 4:
        mappings = [None] * len(scores) if mapping is None else mapping
        if len(mappings) != len(scores):
            raise ValueError(
                f"Got {len(mappings)} mappings for a batch of {len(scores)} score tensors."
            )
        return [decode_spans(s, threshold, m, categories) for s, m in zip(scores, mappings)]
    if scores.ndim != 3 or scores.shape[1] != scores.shape[2]:
        raise ValueError(
            "Scores must be (heads, seq, seq) or (batch, heads, seq, seq); "
            f"got shape {scores.shape}."
        )
    if mapping is not None and len(mapping) > scores.shape[1]:
        raise ValueError(
            f"The mapping covers {len(mapping)} tokens but the scores only "
            f"{scores.shape[1]} positions; tokenize with the same maxlen as the model input."
        )
    found = (scores > threshold) & (scores > PADDING_THRESHOLD)
    spans = []
    for kind, start, end in np.argwhere(found):
        if end < start:
            continue
        label = categories[kind] if categories is not None else int(kind)
        if mapping is None:
            spans.append((label, int(start), int(end)))
        elif end < len(mapping) and mapping[start] and mapping[end]:
            spans.append((label, int(mapping[start][0]), int(mapping[end][-1])))
    return sorted(spans, key=lambda span: (span[1], span[2], str(span[0])))


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------


class _MaskedPooling1D(keras.layers.Layer):
    def __init__(self, keepdims=False, **kwargs):
        super().__init__(**kwargs)
        self.keepdims = keepdims
        self.supports_masking = True

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {**super().get_config(), "keepdims": self.keepdims}


@keras.saving.register_keras_serializable(package="bert4keras")
class GlobalAveragePooling1D(_MaskedPooling1D):
    """Mean over the real positions of (batch, seq, features).

    Call on `x` (a Keras mask is honoured) or `[x, mask]`; padded positions
    are excluded exactly (whatever they hold); an all-padding row gives 0.

    >>> import numpy as np
    >>> x = np.array([[[1.0], [3.0], [100.0]]])
    >>> pooled = GlobalAveragePooling1D()([x, np.array([[1, 1, 0]])])
    >>> keras.ops.convert_to_numpy(pooled).tolist()
    [[2.0]]
    """

    def call(self, inputs, mask=None):
        x, mask = _inputs_and_mask(inputs, mask)
        if mask is None:
            return ops.mean(x, axis=1, keepdims=self.keepdims)
        real = mask[:, :, None]
        total = ops.sum(ops.where(real, x, ops.zeros_like(x)), axis=1, keepdims=self.keepdims)
        count = ops.sum(ops.cast(real, x.dtype), axis=1, keepdims=self.keepdims)
        return total / ops.maximum(count, ops.ones_like(count))


@keras.saving.register_keras_serializable(package="bert4keras")
class GlobalMaxPooling1D(_MaskedPooling1D):
    """Max over the real positions of (batch, seq, features).

    Call on `x` (a Keras mask is honoured) or `[x, mask]`; padded positions
    are excluded exactly; an all-padding row gives 0.

    >>> import numpy as np
    >>> x = np.array([[[1.0], [3.0], [100.0]]])
    >>> pooled = GlobalMaxPooling1D()([x, np.array([[1, 1, 0]])])
    >>> keras.ops.convert_to_numpy(pooled).tolist()
    [[3.0]]
    """

    def call(self, inputs, mask=None):
        x, mask = _inputs_and_mask(inputs, mask)
        if mask is None:
            return ops.max(x, axis=1, keepdims=self.keepdims)
        real = mask[:, :, None]
        lowest = ops.cast(np.finfo(keras.backend.standardize_dtype(x.dtype)).min, x.dtype)
        best = ops.max(ops.where(real, x, lowest), axis=1, keepdims=self.keepdims)
        any_real = ops.any(real, axis=1, keepdims=self.keepdims)
        return ops.where(any_real, best, ops.zeros_like(best))
