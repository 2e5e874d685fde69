"""Optimizer extensions: each checked against a numpy reference or an
equivalent plain-Keras run.

The MirroredStrategy checks (TensorFlow only: tf.distribute does not exist on
other backends) run in a subprocess, because logical CPU devices must be set up
before TensorFlow initializes; run this file as a script with `--mirrored` to
see them directly.
"""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from bert4keras import optimizers as bo

BACKEND = keras.backend.backend()


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


def _named_model(seed=1):
    """A model whose variable paths look like a bert4keras Transformer's."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(6, name="Transformer-0-FeedForward")(inputs)
    h = keras.layers.LayerNormalization(name="Transformer-0-FeedForward-Norm")(h)
    outputs = keras.layers.Dense(3, name="MLM-Dense")(h)
    return keras.Model(inputs, outputs)


class _OneHotEmbedding(keras.layers.Embedding):
    """The same function as Embedding through a matmul: dense gradients."""

    def call(self, ids):
        return ops.matmul(ops.one_hot(ids, self.input_dim), self.embeddings)


def _embedding_model(dense=False, seed=1):
    keras.utils.set_random_seed(seed)
    ids = keras.Input((5,), dtype="int32")
    layer = _OneHotEmbedding if dense else keras.layers.Embedding
    h = layer(9, 4, name="Embedding-Token")(ids)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(ids, keras.layers.Dense(1)(h))


def _token_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    # 9 ids in rows of 5: most batches repeat a token (sparse rows repeat).
    return rng.integers(0, 9, (n, 5)).astype("int32"), rng.normal(size=(n, 1)).astype("float32")


def _regression_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.normal(size=(n, 3)).astype("float32")
    return x, y


def _random_grads(model, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [
        [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
        for _ in range(steps)
    ]


def _apply_steps(optimizer, model, grads_per_step):
    variables = model.trainable_variables
    for grads in grads_per_step:
        optimizer.apply([ops.convert_to_tensor(g) for g in grads], variables)
    return [ops.convert_to_numpy(v) for v in variables]


def _paths(model):
    return [v.path for v in model.trainable_variables]


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# Numpy references
# ---------------------------------------------------------------------------


def _adam_reference(w, grads, lr, beta_1=0.9, beta_2=0.999, eps=1e-7, extra=None):
    """Keras' Adam, one variable; `extra(w_old, delta, lr)` may rewrite delta."""
    w = w.astype("float64")
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        delta = -alpha * m / (np.sqrt(v) + eps)
        if extra is not None:
            delta = extra(w, delta, lr)
        w = w + delta
    return w


def _interp_with_warmup(steps, knots):
    """The schedule by numpy.interp, with the implicit (0, 0) start."""
    xs, ys = zip(*sorted(knots.items()))
    if xs[0] != 0:
        xs, ys = (0,) + xs, (0.0,) + ys
    return np.interp(steps, xs, ys)


# ---------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, steps", [(keras.optimizers.SGD, 2), (keras.optimizers.Adam, 3)]
)
def test_accumulated_steps_equal_one_large_batch(base, steps):
    """k batches of b accumulated == one batch of k*b, for a mean loss."""
    x, y = _regression_data(n=24)
    reference = _named_model()
    reference.compile(base(learning_rate=0.05), "mse")
    reference.fit(x, y, batch_size=4 * steps, epochs=2, shuffle=False, verbose=0)

    accumulating = _named_model()
    optimizer = bo.extend_with_gradient_accumulation(base)(
        learning_rate=0.05, grad_accum_steps=steps
    )
    accumulating.compile(optimizer, "mse")
    accumulating.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)

    # float32 sums in a different order: 1e-6 on weights of size ~1.
    assert _max_diff(reference.get_weights(), accumulating.get_weights()) < 1e-6
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 2 * 24 // (4 * steps)
    assert _max_diff(reference.get_weights(), _named_model().get_weights()) > 1e-2


def test_bert_pretraining_combination_accumulates_exactly():
    """AdamW + LAMB + piecewise schedule + accumulation == the same without
    accumulation on k-times larger batches (schedule counted in updates)."""
    AdamW = bo.extend_with_weight_decay(keras.optimizers.Adam, name="T_AdamW")
    LAMB = bo.extend_with_layer_adaptation(AdamW, name="T_LAMB")
    LAMBLR = bo.extend_with_piecewise_linear_lr(LAMB, name="T_LAMBLR")
    LAMBLRGA = bo.extend_with_gradient_accumulation(LAMBLR, name="T_LAMBLRGA")
    kwargs = dict(
        learning_rate=0.02,
        weight_decay_rate=0.1,
        exclude_from_weight_decay=["Norm", "bias"],
        exclude_from_layer_adaptation=["Norm", "bias"],
        lr_schedule={2: 1.0, 4: 0.5},
    )
    x, y = _regression_data(n=24)
    reference = _named_model()
    reference.compile(LAMBLR(**kwargs), "mse")
    reference.fit(x, y, batch_size=12, epochs=3, shuffle=False, verbose=0)
    accumulating = _named_model()
    optimizer = LAMBLRGA(grad_accum_steps=3, **kwargs)
    accumulating.compile(optimizer, "mse")
    accumulating.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    assert _max_diff(reference.get_weights(), accumulating.get_weights()) < 1e-6
    # 6 updates: the schedule's multiplier is now at its last knot, 0.5.
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(optimizer.learning_rate)), 0.01, rtol=1e-6
    )


def test_sparse_embedding_gradients_update_like_dense_ones():
    """TF hands embeddings IndexedSlices with repeated rows; the steps must
    equal those of the dense gradient (on JAX gradients are dense anyway)."""
    ids, y = _token_data()
    dense = _embedding_model(dense=True)
    dense.compile(keras.optimizers.Adam(learning_rate=0.05), "mse")
    dense.fit(ids, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for optimizer, batch_size in [
        (bo.Adam(learning_rate=0.05), 8),
        (bo.LAMB(learning_rate=0.05, weight_decay_rate=0.0), None),
        (bo.AdamGA(learning_rate=0.05, grad_accum_steps=2), 4),
    ]:
        if batch_size is None:  # LAMB: its own dense reference
            reference = _embedding_model(dense=True)
            reference.compile(bo.LAMB(learning_rate=0.05, weight_decay_rate=0.0), "mse")
            reference.fit(ids, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            batch_size, want = 8, reference.get_weights()
        else:
            want = dense.get_weights()
        sparse = _embedding_model()
        sparse.compile(optimizer, "mse")
        sparse.fit(ids, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
        # 1e-5: on TF bert4keras' Adam runs the fused kernel, which rounds
        # differently from Keras' op-by-op step (measured 1.3e-6 after 16
        # steps); adding squared rows instead of squaring their sum is off by
        # orders of magnitude more.
        assert _max_diff(want, sparse.get_weights()) < 1e-5, type(optimizer).__name__


# ---------------------------------------------------------------------------
# Exponential moving average
# ---------------------------------------------------------------------------


def test_ema_matches_closed_form_and_swaps_exactly():
    momentum, n = 0.8, 5
    x, y = _regression_data(n=8 * n)
    model = _named_model()
    SGDEMA = bo.extend_with_exponential_moving_average(keras.optimizers.SGD)
    optimizer = SGDEMA(learning_rate=0.1, ema_momentum=momentum)
    model.compile(optimizer, "mse")
    history = []  # weights after each update
    for i in range(n):
        model.train_on_batch(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
        history.append([w.astype("float64") for w in model.get_weights()])

    # Started at zero: ema_n = (1 - m) * sum_i m^(n-i) w_i.
    expected = [
        sum((1 - momentum) * momentum ** (n - i) * history[i - 1][j] for i in range(1, n + 1))
        for j in range(len(history[0]))
    ]
    for got, want in zip(optimizer.ema_weights, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    trained = model.get_weights()
    optimizer.apply_ema_weights()
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want / (1 - momentum**n), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already applied"):
        optimizer.apply_ema_weights()
    optimizer.reset_old_weights()
    for got, want in zip(model.get_weights(), trained):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="apply_ema_weights"):
        optimizer.reset_old_weights()
    optimizer.apply_ema_weights(bias_correction=False)
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    optimizer.reset_old_weights()


def test_ema_advances_once_per_accumulated_update_in_fit():
    momentum, steps = 0.5, 2
    x, y = _regression_data(n=16)
    AdamGAEMA = bo.extend_with_exponential_moving_average(bo.AdamGA)
    optimizer = AdamGAEMA(learning_rate=0.05, grad_accum_steps=steps, ema_momentum=momentum)
    model = _named_model()
    model.compile(optimizer, "mse")
    history = []
    for i in range(0, 16, 8):  # each fit call = one update of 2 batches of 4
        model.fit(x[i : i + 8], y[i : i + 8], batch_size=4, shuffle=False, verbose=0)
        history.append(model.get_weights())
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 2
    expected = [(1 - momentum) * (momentum * a + b) for a, b in zip(*history)]
    for got, want in zip(optimizer.ema_weights, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ema_errors_before_training():
    optimizer = bo.AdamEMA(learning_rate=0.1)
    with pytest.raises(ValueError, match="built optimizer"):
        optimizer.apply_ema_weights()
    model = _named_model()
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="No update"):
        optimizer.apply_ema_weights()


# ---------------------------------------------------------------------------
# Weight decay, layer adaptation, parameter-wise learning rates
# ---------------------------------------------------------------------------


def test_weight_decay_skips_variables_by_layer_path():
    lr, rate = 0.1, 0.3
    model = _named_model()
    start = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    grads = _random_grads(model, 2)
    SGDW = bo.extend_with_weight_decay(keras.optimizers.SGD)
    optimizer = SGDW(
        learning_rate=lr,
        weight_decay_rate=rate,
        exclude_from_weight_decay=["FeedForward-Norm", "bias"],
    )
    got = _apply_steps(optimizer, model, grads)
    decayed = {
        "Transformer-0-FeedForward/kernel": True,
        "Transformer-0-FeedForward/bias": False,
        "Transformer-0-FeedForward-Norm/gamma": False,
        "Transformer-0-FeedForward-Norm/beta": False,
        "MLM-Dense/kernel": True,
        "MLM-Dense/bias": False,
    }
    assert sorted(_paths(model)) == sorted(decayed)
    for i, path in enumerate(_paths(model)):
        w = start[i].astype("float64")
        for step in grads:
            w = w - lr * step[i] - (lr * rate * w if decayed[path] else 0)
        np.testing.assert_allclose(got[i], w, rtol=1e-5, atol=1e-6, err_msg=path)


def test_layer_adaptation_is_lamb_with_decay_inside_trust_ratio():
    lr, rate = 0.01, 0.1
    model = _named_model()
    start = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    grads = _random_grads(model, 3, seed=3)
    optimizer = bo.LAMB(
        learning_rate=lr,
        weight_decay_rate=rate,
        exclude_from_weight_decay=["bias"],
        exclude_from_layer_adaptation=["Norm"],
    )
    got = _apply_steps(optimizer, model, grads)
    for i, path in enumerate(_paths(model)):

        def extra(w, delta, lr, path=path):
            if "bias" not in path:
                delta = delta - lr * rate * w
            if "Norm" in path:
                return delta
            w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(delta / lr)
            return delta * (w_norm / u_norm if w_norm > 0 and u_norm > 1e-7 else 1.0)

        want = _adam_reference(start[i], [g[i] for g in grads], lr, extra=extra)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6, err_msg=path)
    # Biases start at zero, so their first step needs the ratio-1 fallback
    # (a ratio of 0 would leave them at zero and fail the loop above).
    assert np.abs(got[_paths(model).index("MLM-Dense/bias")]).min() > 1e-3


def test_adamw_matches_the_adam_formula_with_decoupled_decay():
    """bert4keras' Adam (on TF the fused ResourceApplyAdam kernel) and AdamW
    against the numpy formula, float64; tolerance 1e-5 relative (float32)."""
    lr, rate = 0.01, 0.1
    model = _named_model()
    start = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    grads = _random_grads(model, 4, seed=5)
    for optimizer, decay in [(bo.Adam(learning_rate=lr), 0.0),
                             (bo.AdamW(learning_rate=lr, weight_decay_rate=rate), rate)]:
        for variable, value in zip(model.trainable_variables, start):
            variable.assign(value)
        got = _apply_steps(optimizer, model, grads)
        for i, path in enumerate(_paths(model)):
            want = _adam_reference(
                start[i], [g[i] for g in grads], lr,
                extra=lambda w, delta, lr: delta - lr * decay * w,
            )
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the fused kernel is TensorFlow's")
def test_adam_step_is_one_fused_kernel_on_tensorflow():
    import tensorflow as tf

    variable = keras.Variable(np.ones((3, 2), "float32"))
    gradient = tf.constant(np.full((3, 2), 0.5, "float32"))
    for optimizer, fused in [(bo.AdamW(learning_rate=0.1), True),
                             (bo.Adam(learning_rate=0.1, amsgrad=True), False)]:
        optimizer.build([variable])
        graph = tf.function(
            lambda: optimizer.apply_gradients([(gradient, variable)])
        ).get_concrete_function().graph
        types = {op.type for op in graph.get_operations()}
        assert ("ResourceApplyAdam" in types) == fused, sorted(types)


def test_parameter_wise_lr_scales_the_step_of_matching_variables():
    lr = 0.1
    model = _named_model()
    start = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    grads = _random_grads(model, 2, seed=4)
    SGDP = bo.extend_with_parameter_wise_lr(keras.optimizers.SGD)
    schedule = {"Transformer-0": 0.5, "Norm": 0.1, "MLM-Dense/kernel": 3.0}
    got = _apply_steps(SGDP(learning_rate=lr, paramwise_lr_schedule=schedule), model, grads)
    for i, path in enumerate(_paths(model)):
        multiplier = np.prod([v for k, v in schedule.items() if k in path])
        want = start[i] - lr * multiplier * sum(g[i] for g in grads)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6, err_msg=path)


# ---------------------------------------------------------------------------
# Piecewise linear learning rate
# ---------------------------------------------------------------------------


def test_piecewise_schedule_at_and_between_knots():
    knots = {1000: 1.0, 2000: 0.1}
    schedule = bo.PiecewiseLinearSchedule(2.0, knots)
    steps = np.array([0, 1, 500, 999, 1000, 1001, 1500, 1999, 2000, 2500, 10**6])
    got = [float(ops.convert_to_numpy(schedule(s))) for s in steps]
    np.testing.assert_allclose(got, 2.0 * _interp_with_warmup(steps, knots), rtol=1e-6)
    np.testing.assert_allclose(got[:5], [0.0, 0.002, 1.0, 1.998, 2.0], rtol=1e-6)
    # A knot at step 0 replaces the warmup from zero; a nested schedule multiplies.
    inner = keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5)
    nested = bo.PiecewiseLinearSchedule(inner, {0: 2.0, 10: 1.0})
    np.testing.assert_allclose(float(ops.convert_to_numpy(nested(5))), 1.5 * 0.5**0.5, rtol=1e-6)


def test_piecewise_optimizer_learning_rate_and_config():
    optimizer = bo.AdamLR(learning_rate=1e-3, lr_schedule={1000: 1, 2000: 0.1})
    for step in [0, 250, 1000, 1750, 2000, 5000]:
        optimizer._iterations.assign(step)
        want = 1e-3 * _interp_with_warmup(step, {1000: 1, 2000: 0.1})
        np.testing.assert_allclose(
            float(ops.convert_to_numpy(optimizer.learning_rate)), want, rtol=1e-6
        )
    # Through JSON (integer keys become strings) and back.
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(optimizer)))
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is bo.AdamLR
    assert restored.lr_schedule == {1000: 1.0, 2000: 0.1}
    assert restored.get_config()["learning_rate"] == 1e-3
    schedule = bo.PiecewiseLinearSchedule(1.0, {"10": 1})
    assert bo.PiecewiseLinearSchedule.from_config(schedule.get_config()).knots == schedule.knots


def test_piecewise_schedule_counts_updates_not_micro_batches():
    AdamLRGA = bo.extend_with_gradient_accumulation(bo.AdamLR)
    optimizer = AdamLRGA(learning_rate=1.0, lr_schedule={10: 1.0}, grad_accum_steps=4)
    optimizer._iterations.assign(23)  # 5 updates done, 3 batches into the 6th
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 5
    np.testing.assert_allclose(float(ops.convert_to_numpy(optimizer.learning_rate)), 0.5)


# ---------------------------------------------------------------------------
# Lookahead
# ---------------------------------------------------------------------------


def test_lookahead_matches_reference():
    lr, k, alpha = 0.1, 3, 0.5
    model = _named_model()
    start = [ops.convert_to_numpy(v).astype("float64") for v in model.trainable_variables]
    grads = _random_grads(model, 7, seed=5)
    SGDLA = bo.extend_with_lookahead(keras.optimizers.SGD)
    optimizer = SGDLA(learning_rate=lr, steps_per_slow_update=k, slow_step_size=alpha)
    got = _apply_steps(optimizer, model, grads)
    for i in range(len(start)):
        fast = slow = start[i]
        for t, g in enumerate(grads, start=1):
            fast = fast - lr * g[i]
            if t % k == 0:
                slow = slow + alpha * (fast - slow)
                fast = slow
        np.testing.assert_allclose(got[i], fast, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# AdaFactor and Lion
# ---------------------------------------------------------------------------


def _adafactor_reference(w, grads, lr, beta1, factored, clip=1.0, eps1=1e-30, eps2=1e-3):
    """Adafactor written from the paper's matrix formulas (row/column sums)."""
    w = w.astype("float64")
    r = c = v = None
    m = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        beta2 = 1 - t**-0.8
        g2 = g * g + eps1
        if factored:
            r = beta2 * (0 if r is None else r) + (1 - beta2) * g2.sum(axis=1)
            c = beta2 * (0 if c is None else c) + (1 - beta2) * g2.sum(axis=0)
            v_hat = np.outer(r, c) / r.sum()
        else:
            v = beta2 * (0 if v is None else v) + (1 - beta2) * g2
            v_hat = v
        u = g / np.sqrt(v_hat)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip)
        m = beta1 * m + (1 - beta1) * u
        step = lr * max(eps2, np.sqrt(np.mean(w * w)))
        w = w - step * (m if beta1 else u)
    return w


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_adafactor_matches_reference_and_stores_factored_moments(beta1):
    lr = 0.01
    model = _named_model()
    start = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    grads = _random_grads(model, 3, seed=6)
    optimizer = bo.AdaFactor(learning_rate=lr, beta1=beta1, min_dim_size_to_factor=4)
    got = _apply_steps(optimizer, model, grads)
    for i, path in enumerate(_paths(model)):
        factored = start[i].ndim == 2 and min(start[i].shape) >= 4
        want = _adafactor_reference(start[i], [g[i] for g in grads], lr, beta1, factored)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6, err_msg=path)
    # Memory: the (4, 6) and (6, 3) kernels. The first is factored (4 + 6
    # numbers), the second is not (3 < 4): full second moment.
    sizes = {v.path: int(np.prod(v.shape)) for v in optimizer.variables}
    ff = [s for p, s in sizes.items() if "Transformer-0-FeedForward_kernel" in p]
    assert sorted(ff) == ([4, 6, 24] if beta1 else [4, 6])
    assert sum(s for p, s in sizes.items() if "MLM-Dense_kernel" in p) == 18 * (2 if beta1 else 1)


def test_adafactor_relative_step_and_config():
    optimizer = bo.AdaFactor(learning_rate=None, multiply_by_parameter_scale=False)
    assert optimizer.relative_step
    variable = keras.Variable(np.ones((3,), "float32"), name="w")
    optimizer.apply([ops.convert_to_tensor(np.full((3,), 2.0, "float32"))], [variable])
    # t = 1: lr = min(0.01, 1) * 0.05; beta2 = 0, v = g^2, u = sign(g) = 1.
    np.testing.assert_allclose(ops.convert_to_numpy(variable), 1 - 0.01 * 0.05, rtol=1e-6)
    restored = bo.AdaFactor.from_config(optimizer.get_config())
    assert restored.relative_step and restored.get_config() == optimizer.get_config()


def test_lion_with_weight_decay():
    lr, rate = 0.01, 0.5
    model = _named_model()
    start = [ops.convert_to_numpy(v).astype("float64") for v in model.trainable_variables]
    grads = _random_grads(model, 2, seed=7)
    LionW = bo.extend_with_weight_decay(bo.Lion)
    got = _apply_steps(LionW(learning_rate=lr, weight_decay_rate=rate), model, grads)
    for i in range(len(start)):
        w, m = start[i], np.zeros_like(start[i])
        for g in grads:
            w = w - lr * np.sign(0.9 * m + 0.1 * g[i]) - lr * rate * w
            m = 0.99 * m + 0.01 * g[i]
        np.testing.assert_allclose(got[i], w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Serialization and errors
# ---------------------------------------------------------------------------


def test_saved_model_reloads_composed_optimizer(tmp_path):
    Full = bo.extend_with_exponential_moving_average(
        bo.extend_with_lookahead(
            bo.extend_with_gradient_accumulation(
                bo.extend_with_parameter_wise_lr(
                    bo.extend_with_piecewise_linear_lr(bo.LAMB, name="T_Save_LR"),
                    name="T_Save_PLR",
                ),
                name="T_Save_GA",
            ),
            name="T_Save_LA",
        ),
        name="T_Save_Full",
    )
    optimizer = Full(
        learning_rate=0.01,
        weight_decay_rate=0.01,
        exclude_from_weight_decay=["Norm", "bias"],
        exclude_from_layer_adaptation=["Norm"],
        lr_schedule={3: 1.0},
        paramwise_lr_schedule={"MLM": 0.5},
        grad_accum_steps=2,
        steps_per_slow_update=2,
        ema_momentum=0.9,
    )
    x, y = _regression_data(n=16)
    model = _named_model()
    model.compile(optimizer, "mse")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored.optimizer) is Full
    assert restored.optimizer.get_config() == optimizer.get_config()
    for a, b in zip(restored.optimizer.variables, optimizer.variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    # Both continue identically.
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    restored.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert _max_diff(model.get_weights(), restored.get_weights()) < 1e-6


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (bo.AdamW, dict(weight_decay_rate=0.1, exclude_from_weight_decay=["bias"])),
        (bo.AdamLR, dict(lr_schedule={10: 1.0, 20: 0.5})),
        (bo.AdamGA, dict(grad_accum_steps=4)),
        (bo.AdamLA, dict(steps_per_slow_update=3, slow_step_size=0.4)),
        (bo.AdamEMA, dict(ema_momentum=0.99)),
        (bo.LAMB, dict(exclude_from_layer_adaptation=["Norm"])),
        (bo.AdaFactor, dict(beta1=0.5, min_dim_size_to_factor=32)),
    ],
)
def test_get_config_round_trip(cls, kwargs):
    optimizer = cls(learning_rate=0.01, **kwargs)
    config = optimizer.get_config()
    for key, value in kwargs.items():
        assert config[key] == (
            [[k, v] for k, v in sorted(value.items())] if key == "lr_schedule" else value
        )
    assert cls.from_config(json.loads(json.dumps(config))).get_config() == config


def test_bad_arguments_are_explained():
    with pytest.raises(TypeError, match="optimizer class"):
        bo.extend_with_weight_decay(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="already has weight decay"):
        bo.extend_with_weight_decay(bo.AdamW)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        bo.AdamGA(learning_rate=0.1, grad_accum_steps=0)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        bo.AdamGA(learning_rate=0.1)
    with pytest.raises(ValueError, match="list of strings"):
        bo.AdamW(exclude_from_weight_decay=[1, 2])
    with pytest.raises(ValueError, match="lr_schedule"):
        bo.AdamLR(lr_schedule={-5: 1.0})
    with pytest.raises(ValueError, match="lr_schedule"):
        bo.AdamLR()
    with pytest.raises(ValueError, match="use_ema"):
        bo.AdamEMA(use_ema=True)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        bo.AdamGA(grad_accum_steps=2, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="ema_momentum"):
        bo.AdamEMA(ema_momentum=1.0)
    with pytest.raises(ValueError, match="slow_step_size"):
        bo.AdamLA(slow_step_size=0)
    with pytest.raises(ValueError, match="paramwise_lr_schedule"):
        bo.extend_with_parameter_wise_lr(keras.optimizers.SGD)(paramwise_lr_schedule=["x"])
    with pytest.raises(ValueError, match="not recognized"):
        bo.AdamW(weight_decay_rat=0.1)  # a typo reaches Keras' own check


# ---------------------------------------------------------------------------
# MirroredStrategy (TensorFlow only), in a subprocess
# ---------------------------------------------------------------------------


def _mirrored_checks():
    """Run with two logical CPUs already configured; prints one line per check."""
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = _regression_data(n=24)

    def replicas_agree(model):
        return all(
            np.array_equal(c.numpy(), v.value.values[0].numpy())
            for v in model.trainable_variables
            for c in v.value.values
        )

    # 1. Accumulation == one large batch (2 replicas x 2 examples per batch).
    for base in (keras.optimizers.SGD, keras.optimizers.Adam):
        reference = _named_model()
        reference.compile(base(learning_rate=0.05), "mse")
        reference.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)
        with strategy.scope():
            model = _named_model()
            model.compile(
                bo.extend_with_gradient_accumulation(base)(
                    learning_rate=0.05, grad_accum_steps=3
                ),
                "mse",
            )
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        print("accumulation", base.__name__, _max_diff(reference.get_weights(), model.get_weights()), replicas_agree(model))

    # 2. Sparse embedding gradients, all-reduced (rows concatenated) then
    # merged: same as dense gradients on one device.
    ids, labels = _token_data()
    reference = _embedding_model(dense=True)
    reference.compile(keras.optimizers.Adam(learning_rate=0.05), "mse")
    reference.fit(ids, labels, batch_size=8, epochs=2, shuffle=False, verbose=0)
    with strategy.scope():
        model = _embedding_model()
        model.compile(bo.Adam(learning_rate=0.05), "mse")
    model.fit(ids, labels, batch_size=8, epochs=2, shuffle=False, verbose=0)
    print("sparse", _max_diff(reference.get_weights(), model.get_weights()), replicas_agree(model))

    # 3. Everything composed: same weights and EMA as without a strategy.
    Full = bo.extend_with_exponential_moving_average(
        bo.extend_with_lookahead(
            bo.extend_with_gradient_accumulation(
                bo.extend_with_piecewise_linear_lr(bo.LAMB, name="M_LR"), name="M_GA"
            ),
            name="M_LA",
        ),
        name="M_Full",
    )
    kwargs = dict(
        learning_rate=0.02, weight_decay_rate=0.1, exclude_from_weight_decay=["Norm", "bias"],
        lr_schedule={2: 1.0, 6: 0.2}, grad_accum_steps=2, steps_per_slow_update=2,
        ema_momentum=0.7,
    )
    plain = _named_model()
    plain_optimizer = Full(**kwargs)
    plain.compile(plain_optimizer, "mse")
    plain.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    with strategy.scope():
        model = _named_model()
        optimizer = Full(**kwargs)
        model.compile(optimizer, "mse")
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    ema_diff = _max_diff(plain_optimizer.ema_weights, optimizer.ema_weights)
    print("composed", _max_diff(plain.get_weights(), model.get_weights()), replicas_agree(model), ema_diff)

    trained = model.get_weights()
    optimizer.apply_ema_weights()
    swapped = _max_diff(model.get_weights(), trained) > 0 and replicas_agree(model)
    optimizer.reset_old_weights()
    restored = all(np.array_equal(a, b) for a, b in zip(model.get_weights(), trained))
    print("ema_swap", swapped, restored and replicas_agree(model))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TensorFlow-only")
def test_mirrored_strategy_two_logical_cpus():
    script = (
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import test_optimizers; test_optimizers._mirrored_checks()\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {}
    for line in result.stdout.splitlines():
        name, *values = line.split()
        lines[name if name != "accumulation" else f"{name}-{values.pop(0)}"] = values
    for base in ("SGD", "Adam"):
        diff, agree = lines[f"accumulation-{base}"]
        assert float(diff) < 1e-6 and agree == "True", (base, diff, agree)
    diff, agree = lines["sparse"]  # 1e-5: the fused kernel's rounding, as above
    assert float(diff) < 1e-5 and agree == "True", (diff, agree)
    diff, agree, ema_diff = lines["composed"]
    assert float(diff) < 1e-6 and agree == "True" and float(ema_diff) < 1e-6
    assert lines["ema_swap"] == ["True", "True"]

