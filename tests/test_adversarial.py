"""FGM adversarial training: hand-computed first step, effect on training."""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from bert4keras.adversarial import adversarial_training

VOCAB, DIM, LENGTH, BATCH = 7, 3, 4, 6


def _data(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(BATCH, LENGTH)).astype("int32")
    y = rng.normal(size=(BATCH, 1)).astype("float32")
    return ids, y


def _linear_model(seed=1):
    """ids -> sum of token embeddings -> Dense(1): linear in each weight."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((LENGTH,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, DIM, name="Embedding-Token")(ids)
    h = keras.layers.Lambda(lambda t: keras.ops.sum(t, axis=1))(h)
    out = keras.layers.Dense(1, name="Dense")(h)
    return keras.Model(ids, out)


def _numpy_grads(E, W, b, ids, y):
    """Gradients of mean((sum_l E[ids] @ W + b - y)^2), written out by hand."""
    s = E[ids].sum(axis=1)  # (batch, dim)
    r = s @ W + b - y  # (batch, 1)
    d_pred = 2.0 * r / r.size
    dW = s.T @ d_pred
    db = d_pred.sum(axis=0)
    dE = np.zeros_like(E)
    for i in range(ids.shape[0]):
        for l in range(ids.shape[1]):
            dE[ids[i, l]] += d_pred[i, 0] * W[:, 0]
    return dE, dW, db


def test_first_step_matches_hand_computed_fgm():
    ids, y = _data()
    epsilon = 0.7
    model = _linear_model()
    E, W, b = [w.astype("float64") for w in model.get_weights()]
    model.compile(keras.optimizers.SGD(learning_rate=1.0), "mse")
    assert adversarial_training(model, "Embedding-Token", epsilon=epsilon) is model
    model.fit(ids, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    g1 = _numpy_grads(E, W, b, ids, y)
    delta = epsilon * g1[0] / (np.sqrt((g1[0] ** 2).sum()) + 1e-8)
    g2 = _numpy_grads(E + delta, W, b, ids, y)
    # SGD with lr 1: new = old - (clean gradient + perturbed gradient); the
    # embedding itself is back at E (not E + delta) before the update.
    expected = [p - a - c for p, a, c in zip((E, W, b), g1, g2)]
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The perturbation is not a no-op on this problem.
    assert np.abs(g2[1] - g1[1]).max() > 1e-3


def test_training_differs_from_plain_training_and_loss_is_clean():
    ids, y = _data(1)
    plain = _linear_model()
    plain.compile(keras.optimizers.Adam(learning_rate=0.05), "mse")
    adv = _linear_model()
    adv.compile(keras.optimizers.Adam(learning_rate=0.05), "mse")
    clean_loss = adv.evaluate(ids, y, verbose=0)
    adversarial_training(adv, epsilon=1.0)
    history = adv.fit(ids, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    plain.fit(ids, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    # The reported loss of the first step is the clean loss, not the perturbed
    # one (float32 forward passes, so 1e-5).
    np.testing.assert_allclose(history.history["loss"][0], clean_loss, rtol=1e-5)
    diff = max(
        np.abs(a - b).max() for a, b in zip(plain.get_weights(), adv.get_weights())
    )
    assert diff > 1e-3


def test_perturbs_through_nested_model_and_with_dropout():
    """The embedding is found inside a sub-model; dropout still trains."""
    ids, y = _data(2)
    inner = _linear_model()
    inputs = keras.Input((LENGTH,), dtype="int32")
    out = keras.layers.Dropout(0.1)(inner(inputs))
    model = keras.Model(inputs, out)
    model.compile(keras.optimizers.SGD(learning_rate=0.1), "mse")
    before = [w.copy() for w in model.get_weights()]
    adversarial_training(model, "Embedding-Token", epsilon=0.5)
    history = model.fit(ids, y, batch_size=3, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, model.get_weights()))


def test_bad_arguments_are_explained():
    model = _linear_model()
    with pytest.raises(ValueError, match="No layer named 'Embedding-Nope'.*Embedding-Token"):
        adversarial_training(model, "Embedding-Nope")
    with pytest.raises(ValueError, match="epsilon"):
        adversarial_training(model, epsilon=0)
    with pytest.raises(ValueError, match="no `embeddings` attribute"):
        adversarial_training(model, "Dense")  # kernel and bias: ambiguous
    model.get_layer("Embedding-Token").trainable = False
    model.compile(keras.optimizers.SGD(learning_rate=0.1), "mse")
    adversarial_training(model)
    ids, y = _data()
    with pytest.raises(ValueError, match="not trainable"):
        model.fit(ids, y, epochs=1, verbose=0)


def _mirrored_check():
    """Two replicas of 3 examples each: every replica perturbs the embedding
    with its own gradient; the update is the mean of the replicas' sums."""
    import tensorflow as tf

    ids, y = _data()
    epsilon = 0.7
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _linear_model()
        model.compile(keras.optimizers.SGD(learning_rate=1.0), "mse")
    E, W, b = [w.astype("float64") for w in model.get_weights()]
    adversarial_training(model, epsilon=epsilon)
    model.fit(ids, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    expected = [E.copy(), W.copy(), b.copy()]
    for half in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
        g1 = _numpy_grads(E, W, b, ids[half], y[half])
        delta = epsilon * g1[0] / (np.sqrt((g1[0] ** 2).sum()) + 1e-8)
        g2 = _numpy_grads(E + delta, W, b, ids[half], y[half])
        for i in range(3):
            expected[i] -= 0.5 * (g1[i] + g2[i])
    print(max(np.abs(a - c).max() for a, c in zip(model.get_weights(), expected)))


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute is TensorFlow-only"
)
def test_mirrored_strategy_two_logical_cpus():
    # Logical devices must be set before TF initializes: use a fresh process.
    script = (
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import test_adversarial; test_adversarial._mirrored_check()\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) < 1e-5
