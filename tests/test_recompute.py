"""Recompute (gradient checkpointing): same gradients as without, dropout included."""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from bert4keras import build_transformer_model
from bert4keras.layers import RecomputedBlock


def tiny(recompute, seed=0, model="bert"):
    keras.utils.set_random_seed(seed)
    model = build_transformer_model(
        model=model, vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
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


def test_full_recompute_wraps_each_block():
    model = tiny(True)
    blocks = [layer for layer in model.layers if isinstance(layer, RecomputedBlock)]
    assert [b.name for b in blocks] == ["Transformer-0-Recomputed", "Transformer-1-Recomputed"]
    inner = {layer.name for layer in blocks[0].layers}
    assert {"Transformer-0-MultiHeadSelfAttention", "Transformer-0-FeedForward-Norm"} <= inner
    # Only the block is recomputed, not each sub-layer again inside it.
    assert blocks[0].get_layer("Transformer-0-FeedForward").recompute is False
    # The weights keep the paths (and order) of the model without recompute.
    assert [w.path for w in model.weights] == [w.path for w in tiny(False).weights]
    assert not any(isinstance(layer, RecomputedBlock) for layer in tiny(False).layers)


def test_albert_shares_one_recomputed_block():
    model = tiny(True, model="albert")
    blocks = [layer for layer in model.layers if isinstance(layer, RecomputedBlock)]
    assert [b.name for b in blocks] == ["Transformer-Recomputed"]
    assert len(blocks[0]._inbound_nodes) >= 2  # called once per layer


def test_selective_recompute_marks_attention_only():
    model = tiny("attention")
    assert model.get_layer("Transformer-0-MultiHeadSelfAttention").recompute == "attention"
    assert model.get_layer("Transformer-0-FeedForward").recompute is False
    assert not any(isinstance(layer, RecomputedBlock) for layer in model.layers)
    with pytest.raises(ValueError, match="recompute must be False, True or 'attention'"):
        tiny("everything")
    assert isinstance(tiny(1).get_layer("Transformer-0-Recomputed"), RecomputedBlock)  # truthy means full


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
        "print(m.recompute, type(m.model.get_layer('Transformer-0-Recomputed')).__name__)\n"
    )
    env = dict(os.environ, RECOMPUTE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("True RecomputedBlock")


def test_recompute_survives_serialization(tmp_path):
    model = tiny(True)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.get_layer("Transformer-0-Recomputed"), RecomputedBlock)
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    x, _ = batch()
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


@pytest.mark.parametrize("family", ["albert", "t5"])
def test_shared_and_precomputed_layers_stay_outside_blocks_and_reload(family, tmp_path):
    """ALBERT's shared block and T5's position bias (computed once, from the
    embeddings, before the first block) round-trip through .keras."""
    model = family_model(True, family)
    for block in (layer for layer in model.layers if isinstance(layer, RecomputedBlock)):
        assert not any("Relative-Position" in layer.name for layer in block.layers), block.name
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert len(loaded.weights) == len(model.weights)
    x = family_inputs(family)
    for a, b in zip(keras.tree.flatten(model.predict(x, verbose=0)), keras.tree.flatten(loaded.predict(x, verbose=0))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_blocks_really_run_again_in_the_backward_pass():
    """Equal gradients alone would not show that anything is recomputed."""
    model = family_model(True, "bert")
    x = family_inputs("bert")
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        feed_forward = model.get_layer("Transformer-0-Recomputed").get_layer("Transformer-0-FeedForward")
        calls = []
        original = feed_forward.call
        feed_forward.call = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model([tf.constant(v) for v in x], training=True)[0] ** 2)
        assert len(calls) == 1
        tape.gradient(loss, model.trainable_weights)
        assert len(calls) == 2  # run again by the backward pass
    elif keras.backend.backend() == "jax":
        import jax

        trainable = [w.value for w in model.trainable_variables]
        non_trainable = [w.value for w in model.non_trainable_variables]

        def loss_fn(tv):
            outputs, _ = model.stateless_call(tv, non_trainable, x, training=True)
            return (outputs[0] ** 2).sum()

        jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn))(trainable))
        assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= 2  # one per block
    else:
        pytest.skip("PyTorch runs recompute blocks plainly (no recomputation)")


FAMILIES = {
    # family: (build_transformer_model arguments, inputs)
    "bert": ({"with_pool": True}, "ids+segments"),
    "albert": ({"model": "albert", "with_pool": True}, "ids+segments"),
    "nezha": ({"model": "nezha", "with_pool": True}, "ids+segments"),
    "roformer": ({"model": "roformer", "with_pool": True}, "ids+segments"),
    "gpt2": ({"model": "gpt2"}, "ids"),
    "t5": ({"model": "t5.1.1", "hidden_act": ["gelu", "linear"]}, "t5"),
}


def family_model(recompute, family):
    arguments, _ = FAMILIES[family]
    keras.utils.set_random_seed(0)
    settings = dict(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position=32, dropout_rate=0.2, attention_dropout_rate=0.3,
    )
    settings.update(arguments)
    return build_transformer_model(recompute=recompute, **settings)


def family_inputs(family):
    ids, segments = batch()[0]
    kind = FAMILIES[family][1]
    return [ids, segments] if kind == "ids+segments" else [ids] if kind == "ids" else [ids, ids[:, :7]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recompute_matches_in_eager_gradient(family):
    """Gradient of a scalar through the model with dropout active, taken
    directly (no optimizer), with and without whole-block recompute."""
    x = family_inputs(family)
    grads = []
    for flag in (False, True):
        model = family_model(flag, family)
        assert any(isinstance(layer, RecomputedBlock) for layer in model.layers) == flag
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                outputs = model([tf.constant(v) for v in x], training=True)
                loss = sum(tf.reduce_sum(tf.cast(o, "float32") ** 2) for o in tf.nest.flatten(outputs))
            values = tape.gradient(loss, [w.value for w in model.trainable_weights])
            grads.append({w.path: tf.convert_to_tensor(g).numpy() for w, g in zip(model.trainable_weights, values)})
        else:
            import jax

            trainable = [w.value for w in model.trainable_variables]
            non_trainable = [w.value for w in model.non_trainable_variables]

            def loss_fn(tv):
                outputs, _ = model.stateless_call(tv, non_trainable, x, training=True)
                return sum((o.astype("float32") ** 2).sum() for o in jax.tree_util.tree_leaves(outputs))

            values = jax.grad(loss_fn)(trainable)
            grads.append({w.path: np.asarray(g) for w, g in zip(model.trainable_variables, values)})
    assert sorted(grads[0]) == sorted(grads[1])  # the same weights, by path
    for path, plain in grads[0].items():
        np.testing.assert_allclose(grads[1][path], plain, atol=1e-5, err_msg=path)
