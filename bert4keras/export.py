"""Export a model for serving outside Keras: TF SavedModel and ONNX.

    from bert4keras.export import export_saved_model, export_onnx
    export_saved_model(model, "exported/classifier")   # TF Serving, tf.saved_model.load
    export_onnx(model, "classifier.onnx")              # onnxruntime

    bert4keras export --model m.keras --saved-model exported/classifier --onnx m.onnx

Both trace the model with TensorFlow, so they need the TensorFlow backend
(the default). A model trained on another backend exports after
`model.save("m.keras")` and `keras.models.load_model("m.keras")` in a
TensorFlow process; `bert4keras export` does exactly that.

Signatures: one input per model input, named after it with '-' replaced by
'_' (`Input-Token` -> `Input_Token`), int32 of shape (batch, seq) with both
axes variable; one output per model output, named the same way after its
layer. Any model built from this library's layers and heads exports; ONNX
export also needs `pip install tf2onnx onnxruntime` (bert4keras[export]).
"""
import argparse
import contextlib
import re

import keras

#: ONNX opset used unless told otherwise; onnxruntime reads it since 1.11.
DEFAULT_OPSET = 17


def _require_tensorflow(what):
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{what} traces the model with TensorFlow, but this process runs the "
            f"{backend!r} Keras backend. Save the model (model.save('m.keras')) and "
            "export it from a process started with KERAS_BACKEND=tensorflow, e.g. "
            "`KERAS_BACKEND=tensorflow bert4keras export --model m.keras ...`."
        )


def _signature_name(name):
    """A Keras input/layer name as a valid TF signature key ('Input-Token' -> 'Input_Token')."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return name if re.match(r"[A-Za-z]", name) else f"x_{name}"


def _check_model(model):
    if not isinstance(model, keras.Model) or not getattr(model, "inputs", None):
        raise TypeError(
            "Expected a built functional keras.Model (e.g. from build_transformer_model "
            f"or keras.models.load_model); got {type(model).__name__}."
        )


def signature_names(model):
    """(input names, output names) that the exported signatures use."""
    _check_model(model)
    inputs = [_signature_name(t.name) for t in model.inputs]
    outputs = [_signature_name(name) for name in model.output_names]
    for kind, names in (("input", inputs), ("output", outputs)):
        if len(set(names)) != len(names):
            raise ValueError(
                f"Two model {kind}s map to the same signature name ({names}); "
                f"give the {kind} layers distinct names."
            )
    return inputs, outputs


def _serving_function(model):
    """A tf.function over named TensorSpecs returning {output name: tensor}."""
    import tensorflow as tf

    input_names, output_names = signature_names(model)
    specs = [
        tf.TensorSpec(tuple(t.shape), t.dtype, name=name)
        for t, name in zip(model.inputs, input_names)
    ]

    def serve(*inputs):
        outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(output_names, outputs))

    return tf.function(serve, input_signature=specs, autograph=False), specs


def export_saved_model(model, path, verbose=False):
    """Writes `model` as a TF SavedModel for TF Serving / `tf.saved_model.load`.

    The 'serving_default' signature (also callable as `loaded.serve(...)`)
    takes the model inputs by name as int32 (batch, seq) tensors of any
    batch size and length, and returns a dict of the outputs by name (see
    the module docstring). The SavedModel needs neither Keras nor bert4keras
    to run. Returns `path`.

    ```python
    from bert4keras import build_transformer_model
    model = build_transformer_model(vocab_size=30, hidden_size=8,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    export_saved_model(model, "/tmp/tiny_bert")

    import tensorflow as tf  # in any process: no Keras, no bert4keras needed
    loaded = tf.saved_model.load("/tmp/tiny_bert")
    serve = loaded.signatures["serving_default"]
    out = serve(Input_Token=tf.constant([[2, 5, 3]]), Input_Segment=tf.zeros((1, 3), "int32"))
    hidden = out["Transformer_0_FeedForward_Norm"]  # (1, 3, 8)
    ```
    """
    _require_tensorflow("export_saved_model")
    _check_model(model)
    function, _ = _serving_function(model)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serve", fn=function)
    archive.write_out(str(path), verbose=verbose)
    return path


def _erfc_to_onnx(ctx, node, name, args):
    """tf2onnx handler for TF's Erfc (exact GELU uses it): erfc(x) = 1 - erf(x).

    ONNX has Erf but no Erfc. In float32, 1 - erf(x) is off by at most about
    1e-7; that matters only where erfc itself is that small, i.e. for GELU
    inputs below about -5, whose outputs are ~0 either way.
    """
    import numpy as np
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=dtype))
    erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=name)
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])
    node.type = "Sub"


def export_onnx(model, path, opset=None):
    """Writes `model` as an ONNX file for onnxruntime; returns `path`.

    Inputs and outputs are named as in `export_saved_model`, with variable
    batch and sequence axes. Needs `tf2onnx` (pip install tf2onnx onnxruntime).

    ```python
    export_onnx(model, "/tmp/tiny_bert.onnx")

    import numpy as np, onnxruntime
    session = onnxruntime.InferenceSession("/tmp/tiny_bert.onnx")
    hidden, = session.run(None, {"Input_Token": np.array([[2, 5, 3]], "int32"),
                                 "Input_Segment": np.zeros((1, 3), "int32")})
    ```
    """
    _require_tensorflow("export_onnx")
    _check_model(model)
    try:
        import tf2onnx
    except ImportError:
        raise ImportError(
            "ONNX export needs tf2onnx: pip install tf2onnx onnxruntime "
            "(or pip install 'bert4keras[export]')."
        ) from None
    if keras.config.dtype_policy().name != "float32":
        raise ValueError(
            f"ONNX export runs in float32; the global dtype policy is "
            f"{keras.config.dtype_policy().name!r}. Call "
            "keras.config.set_dtype_policy('float32') and reload the model first."
        )
    function, specs = _serving_function(model)
    with _without_reshape_optimizer():
        tf2onnx.convert.from_function(
            function,
            input_signature=specs,
            opset=opset or DEFAULT_OPSET,
            custom_op_handlers={"Erfc": (_erfc_to_onnx, [])},
            output_path=str(path),
        )
    _check_onnx_ops(path)
    return path


@contextlib.contextmanager
def _without_reshape_optimizer():
    """Runs tf2onnx without its reshape optimizer.

    That pass rewrites the (batch, seq, heads, size) reshape of attention
    into "copy dimension" zeros, and a later pass then merges it with the
    Dense layer's (batch * seq, units) reshape, where the zeros copy the
    wrong dimensions: onnxruntime fails on every attention layer. The other
    passes are kept; tf2onnx has no public switch for one pass.
    """
    from tf2onnx import optimizer

    passes = getattr(optimizer, "_optimizers", None)
    if not isinstance(passes, dict) or "reshape_optimizer" not in passes:
        yield  # another tf2onnx layout: nothing to switch off
        return
    saved = list(passes.items())
    del passes["reshape_optimizer"]
    try:
        yield
    finally:
        passes.clear()
        passes.update(saved)


def _check_onnx_ops(path):
    """Fails if tf2onnx left TF ops that ONNX does not define (it writes them anyway)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    unknown = sorted(
        {n.op_type for n in graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)}
    )
    if unknown:
        raise ValueError(
            f"ONNX export of this model is not supported: tf2onnx could not convert the "
            f"TensorFlow op(s) {', '.join(unknown)} (written to {path}, which onnxruntime "
            "will refuse). Export a TF SavedModel (export_saved_model) instead."
        )


def main(argv=None, prog=None):
    """`bert4keras export`: a saved .keras model to a SavedModel and/or ONNX."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Export a saved bert4keras model (.keras) to a TF SavedModel and/or ONNX."
    )
    parser.add_argument("--model", required=True, help="the model file written by model.save('m.keras')")
    parser.add_argument("--saved-model", help="folder to write the TF SavedModel to")
    parser.add_argument("--onnx", help="file to write the ONNX model to")
    parser.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    args = parser.parse_args(argv)
    if not (args.saved_model or args.onnx):
        parser.error("nothing to do: give --saved-model DIR and/or --onnx FILE")
    _require_tensorflow("bert4keras export")
    import bert4keras  # noqa: F401  (registers the layers the file refers to)

    model = keras.models.load_model(args.model, compile=False)
    if args.saved_model:
        export_saved_model(model, args.saved_model)
        print(f"wrote SavedModel {args.saved_model}")
    if args.onnx:
        export_onnx(model, args.onnx, opset=args.opset)
        print(f"wrote ONNX {args.onnx}")


if __name__ == "__main__":
    main()
