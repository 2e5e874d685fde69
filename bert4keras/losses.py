"""Losses and metrics for task heads, written with `keras.ops` only.

* `multilabel_categorical_crossentropy` and its sparse form: the softmax
  cross-entropy generalised to several positive classes, with 0 as the
  threshold between "positive" and "negative" scores (https://kexue.fm/archives/7359).
* `global_pointer_*`: those losses and an F1 score laid over GlobalPointer's
  (batch, heads, seq, seq) span scores.
* `masked_sequence_crossentropy`: the UniLM seq2seq target loss.

Every loss returns one value per sample (or a scalar where noted), so Keras's
own reduction and `sample_weight` apply in `model.fit`.

Example:

>>> import numpy as np
>>> y_true = np.array([[1.0, 0.0, 1.0]])
>>> y_pred = np.array([[2.0, -1.0, 0.5]])
>>> float(multilabel_categorical_crossentropy(y_true, y_pred)[0]) > 0
True
"""
import keras
import numpy as np
from keras import ops

# Stands in for infinity inside logsumexp; finite so that no inf * 0 can
# appear in a gradient. Losses are always evaluated in float32.
_BIG = 1e12


def concrete_value(x):
    """`x` as numpy when it holds concrete values (eager), else None.

    Inside a traced step (`tf.function`, `jax.jit`) the values are not known
    yet; checks that need them are then skipped.
    """
    if x is None or isinstance(x, keras.KerasTensor):
        return None
    if isinstance(x, (np.ndarray, list, tuple, int, float)):
        return np.asarray(x)
    try:
        return np.asarray(ops.convert_to_numpy(x))
    except Exception:  # symbolic tf.Tensor or a JAX tracer
        return None


def _static_dim(x, axis):
    dim = x.shape[axis]
    return dim if isinstance(dim, int) else None


def _float32(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def _logsumexp_with_zero(x):
    """log(1 + sum(exp(x), axis=-1)): the '1' is the score-0 threshold class."""
    zeros = ops.zeros_like(x[..., :1])
    return ops.logsumexp(ops.concatenate([x, zeros], axis=-1), axis=-1)


@keras.saving.register_keras_serializable(package="bert4keras")
def multilabel_categorical_crossentropy(y_true, y_pred):
    """Multi-label softmax cross-entropy over the last axis.

    loss = log(1 + sum_{neg} exp(s_i)) + log(1 + sum_{pos} exp(-s_j))

    y_true: 0/1 with the shape of y_pred; y_pred: raw scores (no sigmoid). A
    class is predicted positive when its score is > 0. Scores at or below
    -1e9 (masked positions) contribute nothing.

    >>> import numpy as np
    >>> y_true, y_pred = np.array([[0.0, 1.0]]), np.array([[0.0, 0.0]])
    >>> loss = multilabel_categorical_crossentropy(y_true, y_pred)
    >>> round(float(loss[0]), 4)  # log(2) + log(2)
    1.3863
    """
    y_true = _float32(y_true)
    y_pred = _float32(y_pred)
    if y_true.shape != y_pred.shape and None not in y_true.shape + y_pred.shape:
        raise ValueError(
            f"y_true has shape {tuple(y_true.shape)} but y_pred has shape "
            f"{tuple(y_pred.shape)}; multilabel targets must be 0/1 of the "
            "same shape as the scores."
        )
    positive = ops.greater(y_true, 0.5)
    neg_scores = ops.where(positive, -_BIG, y_pred)
    pos_scores = ops.where(positive, -y_pred, -_BIG)
    return _logsumexp_with_zero(neg_scores) + _logsumexp_with_zero(pos_scores)


def _check_class_indices(y_true, num_classes):
    values = concrete_value(y_true)
    if values is None or num_classes is None or values.size == 0:
        return
    if values.min() < 0 or values.max() >= num_classes:
        bad = values[(values < 0) | (values >= num_classes)].flat[0]
        raise ValueError(
            f"Positive class index {int(bad)} is outside [0, {num_classes}); "
            f"y_pred has {num_classes} classes."
        )


@keras.saving.register_keras_serializable(package="bert4keras")
def sparse_multilabel_categorical_crossentropy(y_true, y_pred, mask_zero=False):
    """`multilabel_categorical_crossentropy` with positives given as indices.

    y_true: int (..., num_positive), the indices of the positive classes,
    each listed once; y_pred: (..., num_classes) scores. With mask_zero=True
    index 0 is padding: rows are padded with 0 and class 0 is excluded from
    the loss altogether (neither positive nor negative).

    The negative part is summed over an explicit mask of the non-positive
    classes, so the loss stays exact when the positives are very confident.

    >>> import numpy as np
    >>> scores = np.array([[0.0, 0.0, 0.0]])
    >>> round(float(sparse_multilabel_categorical_crossentropy(np.array([[1]]), scores)[0]), 4)
    1.7918
    """
    y_pred = _float32(y_pred)
    y_true = ops.cast(ops.convert_to_tensor(y_true), "int32")
    num_classes = _static_dim(y_pred, -1)
    _check_class_indices(y_true, num_classes)
    if len(y_true.shape) != len(y_pred.shape):
        raise ValueError(
            f"y_true has rank {len(y_true.shape)} and y_pred rank "
            f"{len(y_pred.shape)}; y_true must be (..., num_positive) indices "
            "matching y_pred's leading axes."
        )

    valid = ops.greater(y_true, 0) if mask_zero else ops.ones_like(y_true, "bool")
    pos_scores = ops.take_along_axis(y_pred, y_true, axis=-1)
    pos_loss = _logsumexp_with_zero(ops.where(valid, -pos_scores, -_BIG))

    # Mark the positives of each row in a (rows, num_classes) grid.
    classes = ops.shape(y_pred)[-1]
    flat_pred = ops.reshape(y_pred, (-1, classes))
    flat_true = ops.reshape(y_true, (ops.shape(flat_pred)[0], -1))
    k = ops.shape(flat_true)[1]
    rows = ops.repeat(ops.arange(ops.shape(flat_pred)[0], dtype="int32"), k)
    indices = ops.stack([rows, ops.reshape(flat_true, (-1,))], axis=1)
    weights = ops.cast(ops.reshape(valid, (-1,)), "float32")
    is_positive = ops.greater(ops.scatter(indices, weights, ops.shape(flat_pred)), 0)
    if mask_zero:
        not_first = ops.not_equal(ops.arange(classes), 0)[None, :]
        is_positive = ops.logical_or(is_positive, ops.logical_not(not_first))
    neg_loss = _logsumexp_with_zero(ops.where(is_positive, -_BIG, flat_pred))
    neg_loss = ops.reshape(neg_loss, ops.shape(pos_loss))
    return pos_loss + neg_loss


# ---------------------------------------------------------------------------
# GlobalPointer: scores (batch, heads, seq, seq); a span is (start, end).
# ---------------------------------------------------------------------------


def _flatten_spans(y_pred):
    """(batch, heads, seq, seq) -> (batch, heads, seq * seq)."""
    shape = ops.shape(y_pred)
    return ops.reshape(y_pred, (shape[0], shape[1], -1))


def _check_dense_spans(y_true, y_pred):
    if len(y_pred.shape) != 4:
        raise ValueError(
            f"GlobalPointer scores must be (batch, heads, seq, seq); got shape "
            f"{tuple(y_pred.shape)}."
        )
    for axis in range(4):
        a, b = y_true.shape[axis], y_pred.shape[axis]
        if isinstance(a, int) and isinstance(b, int) and a != b:
            raise ValueError(
                f"Span labels have shape {tuple(y_true.shape)} but the scores "
                f"have shape {tuple(y_pred.shape)}; dense labels must be 0/1 "
                "(batch, heads, seq, seq) like the scores."
            )


def _sparse_span_indices(y_true, y_pred):
    """(batch, heads, max_spans, 2) start/end pairs -> flat indices start*seq+end."""
    if len(y_pred.shape) != 4:
        raise ValueError(
            f"GlobalPointer scores must be (batch, heads, seq, seq); got shape "
            f"{tuple(y_pred.shape)}."
        )
    y_true = ops.convert_to_tensor(y_true)
    heads, seq_len = _static_dim(y_pred, 1), _static_dim(y_pred, 2)
    if len(y_true.shape) != 4 or y_true.shape[-1] != 2:
        raise ValueError(
            f"Sparse span labels must be (batch, heads, max_spans, 2) "
            f"(start, end) pairs; got shape {tuple(y_true.shape)}."
        )
    if isinstance(y_true.shape[1], int) and heads is not None and y_true.shape[1] != heads:
        raise ValueError(
            f"Span labels have {y_true.shape[1]} heads (entity types) but the "
            f"scores have {heads}."
        )
    values = concrete_value(y_true)
    if values is not None and seq_len is not None and values.size:
        if values.min() < 0 or values.max() >= seq_len:
            raise ValueError(
                f"Span position {int(values[(values < 0) | (values >= seq_len)].flat[0])} "
                f"is outside the sequence of length {seq_len}; positions index "
                "tokens of the model input (0 is [CLS] and pads unused slots)."
            )
    y_true = ops.cast(y_true, "int32")
    n = ops.cast(ops.shape(y_pred)[2], "int32")
    return y_true[..., 0] * n + y_true[..., 1]


@keras.saving.register_keras_serializable(package="bert4keras")
def global_pointer_crossentropy(y_true, y_pred):
    """Multilabel cross-entropy over all spans, averaged over heads.

    y_true: 0/1 (batch, heads, seq, seq); y_pred: GlobalPointer scores.
    Returns (batch,).
    """
    y_true, y_pred = _float32(y_true), _float32(y_pred)
    _check_dense_spans(y_true, y_pred)
    loss = multilabel_categorical_crossentropy(
        _flatten_spans(y_true), _flatten_spans(y_pred)
    )
    return ops.mean(loss, axis=1)


@keras.saving.register_keras_serializable(package="bert4keras")
def sparse_global_pointer_crossentropy(y_true, y_pred):
    """`global_pointer_crossentropy` with spans as (start, end) index pairs.

    y_true: int (batch, heads, max_spans, 2), padded with (0, 0) pairs; the
    span (0, 0) is therefore never scored (position 0 is [CLS]). Memory grows
    with the number of spans, not with seq**2 labels. Returns (batch,).
    """
    y_pred = _float32(y_pred)
    flat_index = _sparse_span_indices(y_true, y_pred)
    loss = sparse_multilabel_categorical_crossentropy(
        flat_index, _flatten_spans(y_pred), mask_zero=True
    )
    return ops.mean(loss, axis=1)


def _span_counts(y_true, y_pred, threshold=0.0, sparse=False):
    """(true positives, true spans, predicted spans) as float32 scalars."""
    y_pred = _float32(y_pred)
    predicted = ops.cast(ops.greater(y_pred, threshold), "float32")
    n_pred = ops.sum(predicted)
    if sparse:
        flat_index = _sparse_span_indices(y_true, y_pred)
        valid = ops.cast(ops.greater(flat_index, 0), "float32")
        hit = ops.take_along_axis(_flatten_spans(predicted), flat_index, axis=-1)
        return ops.sum(hit * valid), ops.sum(valid), n_pred
    y_true = _float32(y_true)
    _check_dense_spans(y_true, y_pred)
    return ops.sum(y_true * predicted), ops.sum(y_true), n_pred


def _f1(tp, n_true, n_pred):
    total = n_true + n_pred
    # Nothing to find and nothing found counts as perfect.
    return ops.where(total > 0, 2.0 * tp / ops.maximum(total, 1.0), 1.0)


@keras.saving.register_keras_serializable(package="bert4keras")
def global_pointer_f1_score(y_true, y_pred):
    """Span F1 of one batch: 2 * |true & predicted| / (|true| + |predicted|).

    A span is predicted when its score is > 0. As a `compile` metric Keras
    averages it over batches; `GlobalPointerF1` gives the exact epoch F1.
    """
    return _f1(*_span_counts(y_true, y_pred))


@keras.saving.register_keras_serializable(package="bert4keras")
def sparse_global_pointer_f1_score(y_true, y_pred):
    """`global_pointer_f1_score` for (batch, heads, max_spans, 2) labels."""
    return _f1(*_span_counts(y_true, y_pred, sparse=True))


@keras.saving.register_keras_serializable(package="bert4keras")
class GlobalPointerF1(keras.metrics.Metric):
    """Span F1 accumulated over all batches (exact, not a mean of batch F1s).

    Args:
        threshold: a span is predicted when its score is above this.
        sparse: labels are (batch, heads, max_spans, 2) (start, end) pairs
            padded with (0, 0), instead of 0/1 (batch, heads, seq, seq).

    >>> import numpy as np
    >>> metric = GlobalPointerF1()
    >>> metric.update_state(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)))
    >>> float(metric.result())
    1.0
    """

    def __init__(self, threshold=0.0, sparse=False, name="global_pointer_f1", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.sparse = sparse
        self.true_positives = self.add_variable((), "zeros", name="true_positives")
        self.true_spans = self.add_variable((), "zeros", name="true_spans")
        self.predicted_spans = self.add_variable((), "zeros", name="predicted_spans")

    def update_state(self, y_true, y_pred, sample_weight=None):
        tp, n_true, n_pred = _span_counts(y_true, y_pred, self.threshold, self.sparse)
        self.true_positives.assign_add(tp)
        self.true_spans.assign_add(n_true)
        self.predicted_spans.assign_add(n_pred)

    def result(self):
        return _f1(self.true_positives, self.true_spans, self.predicted_spans)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold, "sparse": self.sparse}


# ---------------------------------------------------------------------------
# UniLM
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="bert4keras")
def masked_sequence_crossentropy(y_true, y_pred, mask, from_logits=False):
    """Next-token cross-entropy over the target part of a UniLM sequence.

    y_true: token ids (batch, seq); y_pred: (batch, seq, vocab) probabilities
    (or logits with from_logits=True) predicted at each position for the
    *next* token; mask: (batch, seq), nonzero on target tokens (the segment
    ids: 1 on the target, 0 on the source and padding). Position t predicts
    token t + 1, so the labels are y_true[:, 1:] weighted by mask[:, 1:].
    Returns the scalar mean over target tokens (0 when there are none).

    >>> import numpy as np
    >>> ids = np.array([[2, 5, 7]]); segs = np.array([[0, 1, 1]])
    >>> probs = np.full((1, 3, 10), 0.1)
    >>> round(float(masked_sequence_crossentropy(ids, probs, segs)), 4)  # -log(0.1)
    2.3026
    """
    y_true = ops.convert_to_tensor(y_true)
    y_pred = _float32(y_pred)
    mask = ops.convert_to_tensor(mask)
    for name, tensor in (("y_true", y_true), ("mask", mask)):
        a, b = _static_dim(tensor, 1), _static_dim(y_pred, 1)
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"{name} has {a} positions but y_pred has {b}; the token ids, "
                "segment ids and predictions must cover the same sequence."
            )
    _check_class_indices(y_true, _static_dim(y_pred, -1))
    targets = ops.cast(y_true[:, 1:], "int32")
    weights = ops.cast(ops.not_equal(mask[:, 1:], 0), "float32")
    loss = ops.sparse_categorical_crossentropy(
        targets, y_pred[:, :-1], from_logits=from_logits
    )
    return ops.sum(loss * weights) / ops.maximum(ops.sum(weights), 1.0)
