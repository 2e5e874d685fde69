"""Losses and metrics: closed forms on hand cases, sparse == dense, exact F1
counts, and the UniLM masked cross-entropy against explicit numpy.

Tolerance: 1e-5 relative on float32 values unless stated.
"""
import itertools
import math

import keras
import numpy as np
import pytest
from keras import ops

from bert4keras import losses


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def closed_form(y_true, y_pred):
    """log(1 + sum_neg e^s) + log(1 + sum_pos e^-s) per row, float64."""
    y_true, y_pred = np.asarray(y_true, bool), np.asarray(y_pred, np.float64)
    neg = np.where(y_true, 0.0, np.exp(np.minimum(y_pred, 700))).sum(-1)
    pos = np.where(y_true, np.exp(np.minimum(-y_pred, 700)), 0.0).sum(-1)
    return np.log1p(neg) + np.log1p(pos)


def test_multilabel_hand_cases():
    cases = [
        # (y_true, y_pred, expected)
        (
            [1, 0, 1],
            [2.0, -1.0, 0.5],
            math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2) + math.exp(-0.5)),
        ),
        ([0, 0, 0], [0.0, 0.0, 0.0], math.log(4)),  # no positives: only the negative part
        ([1, 1], [0.0, math.log(3)], math.log(1 + 1 + 1 / 3)),  # no negatives
        ([0, 1], [-1e9, 3.0], math.log(1 + math.exp(-3))),  # masked score adds nothing
    ]
    for y_true, y_pred, want in cases:
        y_true, y_pred = np.array([y_true], "float32"), np.array([y_pred], "float32")
        got = np_(losses.multilabel_categorical_crossentropy(y_true, y_pred))
        np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_multilabel_random_matches_closed_form():
    rng = np.random.default_rng(0)
    y_pred = rng.normal(scale=3, size=(3, 4, 10)).astype("float32")
    y_true = (rng.random((3, 4, 10)) < 0.3).astype("float32")
    got = np_(losses.multilabel_categorical_crossentropy(y_true, y_pred))
    np.testing.assert_allclose(got, closed_form(y_true, y_pred), rtol=1e-5)


def dense_to_indices(y_true, k, pad):
    rows = y_true.reshape(-1, y_true.shape[-1])
    out = np.full((len(rows), k), pad, "int32")
    for r, row in enumerate(rows):
        idx = np.flatnonzero(row)
        out[r, : len(idx)] = idx
    return out.reshape(y_true.shape[:-1] + (k,))


@pytest.mark.parametrize("mask_zero", [False, True])
def test_sparse_equals_dense(mask_zero):
    rng = np.random.default_rng(1)
    y_pred = rng.normal(scale=3, size=(2, 3, 12)).astype("float32")
    if mask_zero:
        # Rows with 0..4 positives among classes 1..11, padded with index 0;
        # class 0 is then neither positive nor negative (score masked in dense).
        y_true = (rng.random((2, 3, 12)) < 0.3).astype("float32")
        y_true[..., 0] = 0
        y_true[0, 0] = 0
        indices = dense_to_indices(y_true, int(y_true.sum(-1).max()) + 1, pad=0)
        dense_pred = y_pred.copy()
        dense_pred[..., 0] = -1e9
    else:
        # Without padding every row lists exactly its 3 positives.
        y_true = np.zeros_like(y_pred)
        for idx in np.ndindex(y_true.shape[:-1]):
            y_true[idx][rng.choice(12, 3, replace=False)] = 1
        indices = dense_to_indices(y_true, 3, pad=-1)
        dense_pred = y_pred
    got = np_(
        losses.sparse_multilabel_categorical_crossentropy(indices, y_pred, mask_zero=mask_zero)
    )
    want = np_(losses.multilabel_categorical_crossentropy(y_true, dense_pred))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got, closed_form(y_true, dense_pred), rtol=1e-5)


def test_sparse_is_exact_when_positives_are_confident():
    """log(1 - sum_pos/sum_all) would cancel to 0 here; the explicit negative
    mask keeps the loss at its true value ~ (#neg + #pos) * e^-30."""
    y_pred = np.array([[30.0, -30.0, -30.0, 30.0, -30.0]], "float32")
    indices = np.array([[0, 3]])
    got = np_(losses.sparse_multilabel_categorical_crossentropy(indices, y_pred))
    want = closed_form([[1, 0, 0, 1, 0]], y_pred)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-12)
    assert got[0] < 1e-11


def test_sparse_index_out_of_range_raises():
    with pytest.raises(ValueError, match=r"index 5 is outside \[0, 5\)"):
        losses.sparse_multilabel_categorical_crossentropy(np.array([[5]]), np.zeros((1, 5)))
    with pytest.raises(ValueError, match=r"shape \(1, 4\) but y_pred has shape \(1, 5\)"):
        losses.multilabel_categorical_crossentropy(np.zeros((1, 4)), np.zeros((1, 5)))


# ------------------------------ GlobalPointer ------------------------------


def random_spans(seed, batch=2, heads=3, n=6):
    rng = np.random.default_rng(seed)
    y_pred = rng.normal(scale=2, size=(batch, heads, n, n)).astype("float32")
    y_true = np.zeros_like(y_pred)
    for b, h in itertools.product(range(batch), range(heads)):
        for _ in range(2):
            s = rng.integers(1, n)
            y_true[b, h, s, rng.integers(s, n)] = 1
    return y_true, y_pred


def to_sparse_spans(y_true, max_spans=4):
    out = np.zeros(y_true.shape[:2] + (max_spans, 2), "int32")
    for b, h in itertools.product(range(y_true.shape[0]), range(y_true.shape[1])):
        found = np.argwhere(y_true[b, h])
        out[b, h, : len(found)] = found
    return out


def test_global_pointer_crossentropy_is_mean_over_heads_of_closed_form():
    y_true, y_pred = random_spans(2)
    got = np_(losses.global_pointer_crossentropy(y_true, y_pred))
    want = closed_form(y_true.reshape(2, 3, -1), y_pred.reshape(2, 3, -1)).mean(1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sparse_global_pointer_equals_dense():
    y_true, y_pred = random_spans(3)
    masked = y_pred.copy()
    masked[:, :, 0, 0] = -1e9  # (0, 0) is the sparse form's padding span
    got = np_(losses.sparse_global_pointer_crossentropy(to_sparse_spans(y_true), y_pred))
    want = np_(losses.global_pointer_crossentropy(y_true, masked))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_global_pointer_label_errors():
    y_true, y_pred = random_spans(4)
    sparse = to_sparse_spans(y_true)
    with pytest.raises(ValueError, match="2 heads .* but the scores have 3"):
        losses.sparse_global_pointer_crossentropy(sparse[:, :2], y_pred)
    sparse[0, 0, 0] = [2, 6]
    with pytest.raises(ValueError, match="position 6 is outside the sequence of length 6"):
        losses.sparse_global_pointer_crossentropy(sparse, y_pred)
    message = r"shape \(2, 3, 5, 5\) but the scores have shape \(2, 3, 6, 6\)"
    with pytest.raises(ValueError, match=message):
        losses.global_pointer_crossentropy(y_true[:, :, :5, :5], y_pred)


def test_f1_hand_case_and_exact_accumulation():
    y_true = np.zeros((1, 1, 4, 4), "float32")
    y_true[0, 0, [0, 1, 2], [1, 1, 3]] = 1  # 3 true spans
    y_pred = np.full((1, 1, 4, 4), -1.0, "float32")
    y_pred[0, 0, [0, 2, 3], [1, 2, 3]] = 1.0  # 3 predicted, 1 right
    np.testing.assert_allclose(np_(losses.global_pointer_f1_score(y_true, y_pred)), 2 * 1 / 6)
    sparse = to_sparse_spans(y_true)  # 3 spans + one (0, 0) padding slot
    sparse_f1 = losses.sparse_global_pointer_f1_score(sparse, y_pred)
    np.testing.assert_allclose(np_(sparse_f1), 2 * 1 / 6)
    # Nothing to find, nothing found: perfect.
    nothing = np.full((1, 1, 4, 4), -1.0, "float32")
    empty_f1 = losses.global_pointer_f1_score(np.zeros_like(nothing), nothing)
    np.testing.assert_allclose(np_(empty_f1), 1.0)

    # The stateful metric pools counts over batches:
    # (1 + 2) true positives, (3 + 2) true spans, (3 + 2) predicted spans.
    metric = losses.GlobalPointerF1()
    metric.update_state(y_true, y_pred)
    y_true2, y_pred2 = np.zeros_like(y_true), np.full_like(y_pred, -1.0)
    y_true2[0, 0, [1, 2], [2, 2]] = 1
    y_pred2[0, 0, [1, 2], [2, 2]] = 1
    metric.update_state(y_true2, y_pred2)
    np.testing.assert_allclose(np_(metric.result()), 2 * 3 / 10, rtol=1e-6)
    sparse_metric = losses.GlobalPointerF1(sparse=True)
    sparse_metric.update_state(sparse, y_pred)
    sparse_metric.update_state(to_sparse_spans(y_true2), y_pred2)
    np.testing.assert_allclose(np_(sparse_metric.result()), 2 * 3 / 10, rtol=1e-6)
    metric.reset_state()
    np.testing.assert_allclose(np_(metric.result()), 1.0)


def test_f1_metric_config_round_trip():
    metric = losses.GlobalPointerF1(threshold=0.5, sparse=True, name="f1")
    clone = losses.GlobalPointerF1.from_config(metric.get_config())
    assert clone.get_config() == metric.get_config()
    for name in [
        "multilabel_categorical_crossentropy",
        "sparse_multilabel_categorical_crossentropy",
        "global_pointer_crossentropy",
        "sparse_global_pointer_crossentropy",
        "global_pointer_f1_score",
        "masked_sequence_crossentropy",
    ]:
        registered = keras.saving.get_registered_object(f"bert4keras>{name}")
        assert registered is getattr(losses, name)


# ---------------------------------- UniLM ----------------------------------


@pytest.mark.parametrize("from_logits", [False, True])
def test_masked_sequence_crossentropy_matches_numpy(from_logits):
    rng = np.random.default_rng(5)
    token_ids = rng.integers(1, 7, size=(2, 5))
    segment_ids = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])  # row 2: padded target
    logits = rng.normal(size=(2, 5, 7)).astype("float32")
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    y_pred = logits if from_logits else probs
    got = np_(
        losses.masked_sequence_crossentropy(
            token_ids, y_pred, segment_ids, from_logits=from_logits
        )
    )
    terms = []
    for b, t in itertools.product(range(2), range(1, 5)):
        if segment_ids[b, t]:  # token t is a target, predicted at position t - 1
            terms.append(-np.log(probs[b, t - 1, token_ids[b, t]]))
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
    none = losses.masked_sequence_crossentropy(
        token_ids, y_pred, np.zeros((2, 5)), from_logits=from_logits
    )
    assert float(np_(none)) == 0.0


def test_masked_sequence_crossentropy_errors():
    uniform = np.full((1, 5, 3), 1 / 3)
    with pytest.raises(ValueError, match="mask has 4 positions but y_pred has 5"):
        losses.masked_sequence_crossentropy(np.ones((1, 5)), uniform, np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"index 3 is outside \[0, 3\)"):
        losses.masked_sequence_crossentropy(np.full((1, 5), 3), uniform, np.ones((1, 5)))
