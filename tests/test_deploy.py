"""TF SavedModel and ONNX export (`bert4keras.export`).

TensorFlow-backend tests: both exports trace the model with TensorFlow, so
on another backend they are skipped (the one test that runs everywhere
checks the error message export gives there).
"""
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from bert4keras import build_transformer_model, export
from bert4keras.heads import ConditionalRandomField, GlobalAveragePooling1D, GlobalPointer

BACKEND = keras.backend.backend()
tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason=f"TensorFlow-backend test: SavedModel/ONNX export traces the model with TensorFlow; "
    f"this run uses the {BACKEND!r} backend",
)
SMALL = dict(
    vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=32, max_position=32,
)

# Two shapes that differ in both batch size and sequence length; padding included.
BATCHES = [
    (np.array([[2, 5, 6, 7, 3]], "int32"), np.array([[0, 0, 0, 0, 0]], "int32")),
    (
        np.array([[2, 8, 9, 10, 11, 12, 13, 14, 3], [2, 15, 16, 3, 0, 0, 0, 0, 0], [2, 17, 3, 0, 0, 0, 0, 0, 0]], "int32"),
        np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0, 0]], "int32"),
    ),
]


def _classifier():
    """A BERT sentence classifier given one training step (a 'fine-tuned' model)."""
    bert = build_transformer_model(with_pool=True, **SMALL)
    probs = keras.layers.Dense(3, activation="softmax", name="classifier")(bert.output)
    model = keras.Model(bert.inputs, probs)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", run_eagerly=True)
    tokens, segments = BATCHES[1]
    model.fit([tokens, segments], np.array([0, 1, 2]), epochs=1, verbose=0)
    return model


def _tagger():
    """BERT + CRF scores (padding written in) and a masked mean: two outputs."""
    bert = build_transformer_model(**SMALL)
    emissions = keras.layers.Dense(4, name="emissions")(bert.output)
    scores = ConditionalRandomField(name="CRF")([emissions, bert.inputs[0]])
    pooled = GlobalAveragePooling1D(name="mean")([bert.output, bert.inputs[0]])
    return keras.Model(bert.inputs, [scores, pooled])


def _span_model():
    """GPT-2-style LM body (tanh GELU, one input) + GlobalPointer span scores."""
    gpt = build_transformer_model(model="gpt2", with_lm=False, **SMALL)
    spans = GlobalPointer(heads=2, head_size=8, name="GlobalPointer")([gpt.output, gpt.inputs[0]])
    return keras.Model(gpt.inputs, spans)


def _feeds(model, batch, names):
    return {name: batch[i] for i, name in enumerate(names[: len(model.inputs)])}


def _keras_outputs(model, batch):
    inputs = list(batch[: len(model.inputs)])
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [keras.ops.convert_to_numpy(y) for y in outputs]


@pytest.fixture(scope="module")
def models():
    return {"classifier": _classifier(), "tagger": _tagger(), "spans": _span_model()}


def test_export_needs_tensorflow_backend(monkeypatch, tmp_path):
    model = build_transformer_model(**SMALL)
    monkeypatch.setattr(export.keras.backend, "backend", lambda: "jax")
    for function in (export.export_saved_model, export.export_onnx):
        with pytest.raises(RuntimeError, match="'jax' Keras backend.*KERAS_BACKEND=tensorflow"):
            function(model, tmp_path / "out")


def test_signature_names():
    model = build_transformer_model(with_pool=True, with_mlm=True, **SMALL)
    assert export.signature_names(model) == (
        ["Input_Token", "Input_Segment"],
        ["Pooler_Dense", "MLM_Activation"],
    )
    with pytest.raises(TypeError, match="functional keras.Model"):
        export.signature_names(keras.layers.Dense(2))


# A fresh process with TensorFlow only: no Keras model code, no bert4keras.
SERVING_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    folder, count = sys.argv[1], int(sys.argv[2])
    for name in sys.argv[3:]:
        loaded = tf.saved_model.load(folder + "/" + name)
        serve = loaded.signatures["serving_default"]
        specs = serve.structured_input_signature[1]
        print(name, "inputs", sorted((k, tuple(v.shape), v.dtype.name) for k, v in specs.items()))
        results = {}
        for b in range(count):
            feeds = np.load("%s/%s.feeds%d.npz" % (folder, name, b))
            outputs = serve(**{k: tf.constant(feeds[k]) for k in feeds.files})
            results.update({"%s@%d" % (k, b): v.numpy() for k, v in outputs.items()})
        np.savez("%s/%s.served.npz" % (folder, name), **results)
    assert "bert4keras" not in sys.modules
    """
)


@tensorflow_only
def test_saved_model_reloads_in_fresh_process(models, tmp_path):
    for name, model in models.items():
        input_names, _ = export.signature_names(model)
        export.export_saved_model(model, tmp_path / name)
        for b, batch in enumerate(BATCHES):
            np.savez(tmp_path / f"{name}.feeds{b}.npz", **_feeds(model, batch, input_names))
    child = subprocess.run(
        [sys.executable, "-c", SERVING_CHILD, str(tmp_path), str(len(BATCHES)), *models],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    for name, model in models.items():
        input_names, output_names = export.signature_names(model)
        # Variable batch and length in the signature, int32 ids, named after the model inputs.
        expected_specs = sorted((n, (None, None), "int32") for n in input_names)
        assert f"{name} inputs {expected_specs}" in child.stdout
        served = np.load(tmp_path / f"{name}.served.npz")
        assert sorted(served.files) == sorted(f"{o}@{b}" for o in output_names for b in range(len(BATCHES)))
        for b, batch in enumerate(BATCHES):
            for output, expected in zip(output_names, _keras_outputs(model, batch)):
                # Measured max |diff| 0 to 4e-7: the same TF kernels, traced instead of eager.
                np.testing.assert_allclose(
                    served[f"{output}@{b}"], expected, rtol=0, atol=1e-5, err_msg=f"{name}/{output}"
                )


@tensorflow_only
def test_onnx_matches_keras(models, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX tests need onnxruntime (bert4keras[export])")
    for name, model in models.items():
        input_names, output_names = export.signature_names(model)
        path = tmp_path / f"{name}.onnx"
        export.export_onnx(model, path)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == input_names
        assert [o.name for o in session.get_outputs()] == output_names
        for spec in session.get_inputs():  # symbolic (variable) batch and sequence axes
            assert len(spec.shape) == 2 and not any(isinstance(d, int) for d in spec.shape)
        for batch in BATCHES:
            got = session.run(output_names, _feeds(model, batch, input_names))
            for output, actual, expected in zip(output_names, got, _keras_outputs(model, batch)):
                # Measured max |diff| ~5e-7 (float32 op order; erf vs erfc in GELU).
                np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5, err_msg=f"{name}/{output}")


def test_unconvertible_op_is_reported(tmp_path):
    onnx = pytest.importorskip("onnx", reason="needs the onnx package (bert4keras[export])")
    helper = onnx.helper
    node = helper.make_node("Erfc", ["x"], ["y"])  # what tf2onnx leaves when it cannot convert
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="could not convert the TensorFlow op.*Erfc"):
        export._check_onnx_ops(path)


@tensorflow_only
def test_export_command(models, tmp_path, capsys):
    from bert4keras import cli

    pytest.importorskip("onnxruntime", reason="ONNX tests need onnxruntime (bert4keras[export])")
    import onnxruntime
    import tensorflow as tf

    model = models["classifier"]
    model.save(tmp_path / "m.keras")
    cli.main(["export", "--model", str(tmp_path / "m.keras"),
              "--saved-model", str(tmp_path / "sm"), "--onnx", str(tmp_path / "m.onnx")])
    assert "wrote SavedModel" in capsys.readouterr().out
    tokens, segments = BATCHES[1]
    expected = _keras_outputs(model, BATCHES[1])[0]
    loaded = tf.saved_model.load(str(tmp_path / "sm"))  # keep it alive while calling
    served = loaded.serve(tokens, segments)["classifier"]
    np.testing.assert_allclose(served.numpy(), expected, rtol=0, atol=1e-5)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"Input_Token": tokens, "Input_Segment": segments})[0]
    np.testing.assert_allclose(onnx_out, expected, rtol=0, atol=1e-5)
    with pytest.raises(SystemExit):
        cli.main(["export", "--model", str(tmp_path / "m.keras")])  # neither output given
    assert "nothing to do" in capsys.readouterr().err
