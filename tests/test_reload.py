"""Whole-model save / reload in a fresh process that imports only `bert4keras`.

The test process builds every model family (tiny random sizes), models with
task heads, and a model compiled with a bert4keras optimizer and schedule,
saves them with `model.save`, and writes the inputs and outputs. A new
Python process (same backend) then runs `import bert4keras` and
`keras.models.load_model` on each file, and its outputs, losses and one
more training step are compared with the ones computed here.
"""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from bert4keras import build_transformer_model, losses, optimizers
from bert4keras.heads import (
    ConditionalRandomField,
    EfficientGlobalPointer,
    GlobalAveragePooling1D,
    GlobalPointer,
    MaximumEntropyMarkovModel,
)
from bert4keras.models import MODELS

# One block keeps JAX's tracing cheap; ALBERT, which calls one shared block
# repeatedly, gets two (a layer reused in the graph must reload as one).
SMALL = dict(
    vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=32, max_position=32,
)
TWO_BLOCKS = ("albert", "albert_unshared")
TOKENS = np.array([[2, 6, 7, 8, 9, 3], [2, 11, 12, 3, 0, 0]], "int32")
SEGMENTS = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0]], "int32")
TAGS = np.array([[0, 1, 2, 2, 1, 0], [0, 2, 1, 0, 0, 0]], "int32")

# The whole child program: nothing from bert4keras but the package import.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    import keras, numpy as np
    import bert4keras

    folder = sys.argv[1]
    report = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".keras"):
            continue
        key = name[: -len(".keras")]
        model = keras.models.load_model(os.path.join(folder, name))
        data = np.load(os.path.join(folder, key + ".npz"))
        inputs = [data["x%d" % i] for i in range(len(model.inputs))]
        outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        result = {"y%d" % i: keras.ops.convert_to_numpy(y) for i, y in enumerate(outputs)}
        entry = {"class": type(model).__name__}
        if "labels" in data.files:  # compiled: the restored loss function
            loss = model.loss(data["labels"], outputs[0])
            entry["loss"] = float(np.mean(keras.ops.convert_to_numpy(loss)))
        if "step" in data.files:  # the restored optimizer takes one more step
            optimizer = model.optimizer
            entry["optimizer"] = type(optimizer).__name__
            entry["iterations_before"] = int(keras.ops.convert_to_numpy(optimizer.iterations))
            entry["schedule"] = type(optimizer._learning_rate).__name__
            entry["schedule_config"] = optimizer._learning_rate.get_config()
            weights = model.trainable_weights
            optimizer.apply_gradients(
                [(0.01 * np.sin(np.arange(int(np.prod(w.shape)), dtype="float32")).reshape(w.shape), w) for w in weights]
            )
            for i, w in enumerate(weights):
                result["trained%d" % i] = keras.ops.convert_to_numpy(w)
        np.savez(os.path.join(folder, key + ".reloaded.npz"), **result)
        report[key] = entry
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(report, f)
    print("modules:", sorted(m for m in sys.modules if m.startswith("bert4keras")))
    """
)


def _inputs_for(model):
    values = []
    for tensor in model.inputs:
        if "Segment" in tensor.name:
            values.append(SEGMENTS)
        elif "Position" in tensor.name:
            values.append(np.tile(np.arange(6, dtype="int32"), (2, 1)))
        else:
            values.append(TOKENS)
    return values


def _call(model, inputs):
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [keras.ops.convert_to_numpy(y) for y in outputs]


def _family_models():
    models = {
        name: build_transformer_model(model=name, **{**SMALL, "num_hidden_layers": 1 + (name in TWO_BLOCKS)})
        for name in MODELS
    }
    models["bert-pool-nsp-mlm"] = build_transformer_model(with_pool=True, with_nsp=True, with_mlm=True, **SMALL)
    models["bert-unilm"] = build_transformer_model(application="unilm", with_mlm="linear", **SMALL)
    models["bert-positions"] = build_transformer_model(
        custom_position_ids=True, hierarchical_position=True, **SMALL
    )
    return models


# No fit/evaluate here: compiling a train step costs ~10 s per tiny model on
# CI's two cores. The restored loss is called directly, and the optimizer
# takes steps with fixed synthetic gradients (`_synthetic_step`).


def _tagger(layer_class, name):
    bert = build_transformer_model(**SMALL)
    emissions = keras.layers.Dense(3, name="emissions")(bert.output)
    layer = layer_class(lr_multiplier=2, name=name)
    model = keras.Model(bert.inputs, layer([emissions, bert.inputs[0]]))
    model.compile("adam", loss=layer.sparse_loss, metrics=[layer.sparse_accuracy])
    return model


def _span_model(layer):
    bert = build_transformer_model(**SMALL)
    model = keras.Model(bert.inputs, layer([bert.output, bert.inputs[0]]))
    model.compile("adam", loss=losses.sparse_global_pointer_crossentropy)
    return model


def _head_models():
    """Head models, with labels where compiled (the child calls the restored loss)."""
    span_labels = np.array([[[1, 2], [0, 0]], [[1, 1], [2, 2]]], "int32")  # (batch, heads, spans, 2)
    span_labels = span_labels[:, :, None, :]
    crf = _tagger(ConditionalRandomField, "CRF")
    memm = _tagger(MaximumEntropyMarkovModel, "MEMM")
    pointer = _span_model(GlobalPointer(heads=2, head_size=8, name="GlobalPointer"))
    efficient = _span_model(EfficientGlobalPointer(heads=2, head_size=8, name="EfficientGlobalPointer"))
    bert = build_transformer_model(**SMALL)
    pooled = keras.Model(bert.inputs, GlobalAveragePooling1D()([bert.output, bert.inputs[0]]))
    return {
        "head-crf": (crf, TAGS),
        "head-memm": (memm, TAGS),
        "head-globalpointer": (pointer, span_labels),
        "head-efficientglobalpointer": (efficient, span_labels),
        "head-pooling": (pooled, None),
    }


def _synthetic_step(model):
    """One optimizer step with fixed gradients (the child repeats it exactly)."""
    weights = model.trainable_weights
    model.optimizer.apply_gradients(
        [(0.01 * np.sin(np.arange(int(np.prod(w.shape)), dtype="float32")).reshape(w.shape), w) for w in weights]
    )


def _optimizer_model():
    """A classifier compiled with AdamW and a PiecewiseLinearSchedule, one step taken."""
    bert = build_transformer_model(with_pool=True, **SMALL)
    probs = keras.layers.Dense(2, activation="softmax", name="classifier")(bert.output)
    model = keras.Model(bert.inputs, probs)
    schedule = optimizers.PiecewiseLinearSchedule(1e-3, {2: 1.0, 10: 0.1})
    optimizer = optimizers.AdamW(
        learning_rate=schedule, weight_decay_rate=0.01, exclude_from_weight_decay=["Norm", "bias"]
    )
    model.compile(optimizer, loss="sparse_categorical_crossentropy")
    _synthetic_step(model)  # step 0: lr 0 on the warmup, but the moments move
    return model, None


def _loss(model, labels, outputs):
    return float(np.mean(keras.ops.convert_to_numpy(model.loss(labels, outputs[0]))))


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Saves everything, reloads it in a fresh process; returns what both saw."""
    folder = tmp_path_factory.mktemp("reload")
    expected = {}
    saved = {key: (model, None) for key, model in _family_models().items()}
    saved.update(_head_models())
    saved["optimizer-adamw-schedule"] = _optimizer_model()
    for key, (model, labels) in saved.items():
        inputs = _inputs_for(model)
        arrays = {f"x{i}": x for i, x in enumerate(inputs)}
        entry = {"outputs": _call(model, inputs)}
        if labels is not None:
            arrays["labels"] = labels
            entry["loss"] = _loss(model, labels, entry["outputs"])
        if key.startswith("optimizer"):
            arrays["step"] = np.array(1)
            entry["iterations"] = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        np.savez(folder / f"{key}.npz", **arrays)
        model.save(folder / f"{key}.keras")
        if key.startswith("optimizer"):  # the step the child will take, taken here after saving
            _synthetic_step(model)
            entry["trained"] = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
        expected[key] = entry
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert child.returncode == 0, child.stderr[-4000:]
    with open(folder / "report.json") as f:
        report = json.load(f)
    results = {key: dict(np.load(folder / f"{key}.reloaded.npz")) for key in expected}
    return expected, report, results, child.stdout


def test_fresh_process_imports_only_the_package(reloaded):
    *_, stdout = reloaded
    # The child imported no submodule itself: `import bert4keras` brought in
    # (and so registered) the heads, losses and optimizers.
    assert "import bert4keras\n" in CHILD and "from bert4keras" not in CHILD
    for module in ("bert4keras.heads", "bert4keras.losses", "bert4keras.optimizers", "bert4keras.layers"):
        assert f"'{module}'" in stdout


def test_every_public_keras_class_is_registered():
    import importlib
    import inspect
    import pkgutil

    import bert4keras

    kinds = (
        keras.layers.Layer, keras.losses.Loss, keras.metrics.Metric,
        keras.optimizers.Optimizer, keras.optimizers.schedules.LearningRateSchedule,
    )
    checked = []
    for info in pkgutil.walk_packages(bert4keras.__path__, "bert4keras."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or name.startswith("_") or not issubclass(cls, kinds):
                continue
            registered = keras.saving.get_registered_name(cls)
            assert registered.startswith("bert4keras>"), f"{info.name}.{name} is not registered"
            assert keras.saving.get_registered_object(registered) is cls
            checked.append(name)
    for name in ("ConditionalRandomField", "GlobalPointer", "MultiHeadAttention", "AdaFactor",
                 "PiecewiseLinearSchedule", "GlobalPointerF1"):
        assert name in checked


def test_every_family_reloads_with_identical_outputs(reloaded):
    expected, report, results, _ = reloaded
    for name in MODELS:
        assert name in report, f"{name} was not reloaded"
    for key, entry in expected.items():
        assert report[key]["class"] == "Functional"
        for i, y in enumerate(entry["outputs"]):
            # Same weights, same ops, same backend: bit-for-bit up to float summation order.
            np.testing.assert_allclose(results[key][f"y{i}"], y, rtol=0, atol=1e-6, err_msg=key)


def test_heads_reload_with_their_losses(reloaded):
    expected, report, results, _ = reloaded
    for key in ("head-crf", "head-memm", "head-globalpointer", "head-efficientglobalpointer"):
        # The restored loss function (TaggerFunction / registered loss) gives the same value.
        assert np.isfinite(expected[key]["loss"]) and expected[key]["loss"] > 0
        assert report[key]["loss"] == pytest.approx(expected[key]["loss"], rel=1e-5), key
    # Padded positions keep the padding score after reload (what the CRF decoders read).
    crf_scores = results["head-crf"]["y0"]
    assert (crf_scores[1, 4:] < -1e4).all() and (crf_scores[1, :4] > -1e4).all()


def test_optimizer_wrapper_and_schedule_reload(reloaded):
    expected, report, results, _ = reloaded
    entry = report["optimizer-adamw-schedule"]
    assert entry["optimizer"] == "AdamW"
    assert entry["schedule"] == "PiecewiseLinearSchedule"
    assert entry["schedule_config"]["lr_schedule"] == [[2, 1.0], [10, 0.1]]
    assert entry["iterations_before"] == expected["optimizer-adamw-schedule"]["iterations"] == 1


def test_training_continues_identically_after_reload(reloaded):
    # One more step in the fresh process equals the same step taken in this
    # one: the optimizer slots, step count and schedule were all restored
    # (a fresh optimizer would take a different step: see the next test).
    expected, report, results, _ = reloaded
    for key, entry in expected.items():
        if "trained" not in entry:
            continue
        assert len(entry["trained"]) == sum(k.startswith("trained") for k in results[key]), key
        for i, w in enumerate(entry["trained"]):
            np.testing.assert_allclose(results[key][f"trained{i}"], w, rtol=0, atol=1e-6, err_msg=key)


def test_synthetic_step_depends_on_optimizer_state():
    # The continuation test above can fail: the same step from a fresh
    # optimizer (no slots, step 0) gives other weights.
    restored, _ = _optimizer_model()
    fresh = keras.models.clone_model(restored)
    fresh.set_weights(restored.get_weights())
    fresh.compile(
        optimizers.AdamW(
            learning_rate=optimizers.PiecewiseLinearSchedule(1e-3, {2: 1.0, 10: 0.1}),
            weight_decay_rate=0.01, exclude_from_weight_decay=["Norm", "bias"],
        ),
        loss="sparse_categorical_crossentropy",
    )
    _synthetic_step(restored)
    _synthetic_step(fresh)
    differences = [
        np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b)).max()
        for a, b in zip(restored.trainable_weights, fresh.trainable_weights)
    ]
    assert max(differences) > 1e-5
