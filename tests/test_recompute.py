"""Recompute (gradient checkpointing): same gradients as without, dropout included."""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from bert4keras import build_transformer_model


def tiny(recompute, seed=0):
    keras.utils.set_random_seed(seed)
    model = build_transformer_model(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position=32, dropout_rate=0.2, attention_dropout_rate=0.3,
        with_pool=True, recompute=recompute,
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="mse")
    return model


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 60, size=(4, 12)).astype("int32")
    ids[1, 8:] = 0
    return [ids, np.zeros_like(ids)], rng.normal(size=(4, 16)).astype("float32")


def test_recompute_layers_are_marked():
    model = tiny(True)
    marked = [l.name for l in model.layers if getattr(l, "recompute", False)]
    assert "Transformer-0-MultiHeadSelfAttention" in marked and "Transformer-1-FeedForward" in marked
    assert not any(getattr(l, "recompute", False) for l in tiny(False).layers)


def test_selective_recompute_marks_attention_only():
    model = tiny("attention")
    assert model.get_layer("Transformer-0-MultiHeadSelfAttention").recompute == "attention"
    assert model.get_layer("Transformer-0-FeedForward").recompute is False
    with pytest.raises(ValueError, match="recompute must be False, True or 'attention'"):
        tiny("everything")
    assert tiny(1).get_layer("Transformer-0-FeedForward").recompute is True  # truthy means full


@pytest.mark.parametrize("mode", [True, "attention"])
def test_recompute_gives_the_same_training_step_with_dropout(mode):
    """One SGD step (lr 1, so the update is the gradient) in a compiled fit, dropout active."""
    x, y = batch()
    plain, recomputed = tiny(False), tiny(mode)
    for a, b in zip(plain.weights, recomputed.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    before = [keras.ops.convert_to_numpy(w) for w in plain.weights]
    plain.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False)
    recomputed.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False)
    moved = 0
    for w0, a, b in zip(before, plain.weights, recomputed.weights):
        a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg="weights differ after the same steps")
        moved += np.abs(a - w0).max() > 1e-4
    assert moved > 10  # the step really changed the weights


def test_dropout_is_active_in_recomputed_training():
    model = tiny(True)
    x, _ = batch()
    x = [keras.ops.convert_to_tensor(v) for v in x]
    a = keras.ops.convert_to_numpy(model(x, training=True))
    b = keras.ops.convert_to_numpy(model(x, training=True))
    assert np.abs(a - b).max() > 1e-4


def test_recompute_environment_variable():
    code = (
        "from bert4keras import build_transformer_model\n"
        "m = build_transformer_model(vocab_size=10, hidden_size=8, num_hidden_layers=1,"
        " num_attention_heads=2, intermediate_size=8, return_keras_model=False)\n"
        "print(m.recompute, m.model.get_layer('Transformer-0-FeedForward').recompute)\n"
    )
    env = dict(os.environ, RECOMPUTE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("True True")


def test_recompute_survives_serialization(tmp_path):
    model = tiny(True)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("Transformer-0-MultiHeadSelfAttention").recompute is True
    x, _ = batch()
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


@pytest.mark.parametrize("layer_name", ["Transformer-0-MultiHeadSelfAttention"])
def test_recompute_matches_in_eager_gradient(layer_name):
    """Gradient of a scalar through the model, taken directly (no optimizer)."""
    x, _ = batch()
    grads = []
    for flag in (False, True):
        model = tiny(flag)
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model([tf.constant(v) for v in x], training=True) ** 2)
            grads.append(
                [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, [w.value for w in model.trainable_weights])]
            )
        else:
            import jax

            trainable = [w.value for w in model.trainable_variables]
            non_trainable = [w.value for w in model.non_trainable_variables]

            def loss_fn(tv):
                out, _ = model.stateless_call(tv, non_trainable, x, training=True)
                return (out**2).sum()

            grads.append([np.asarray(g) for g in jax.grad(loss_fn)(trainable)])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-5)
