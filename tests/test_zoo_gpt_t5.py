"""GPT, GPT-2, GPT2-ML and T5 (t5.1.0 / t5.1.1 / mT5).

References:
  * gpt2 and t5: small random HF models and their outputs on a padded batch
    (tests/fixtures/make_gpt_t5_fixtures.py), loaded here from the HF
    safetensors and again after convert_hf_to_google. Tolerance 1e-4 max
    abs on the non-padded positions (float32).
  * gpt and gpt2_ml (no HF implementation): a numpy forward pass written
    from the formulas with an explicit loop over heads and positions,
    reading the weights by their Google checkpoint names. Tolerance 1e-5.
  * T5 relative buckets: a pure-python bucket function written from the
    mesh-tensorflow description.
Round trips (.keras, .weights.h5, Google checkpoint) must reproduce outputs
to 1e-6.
"""
import json
import math
import os

import keras
import numpy as np
import pytest
from keras import ops

from bert4keras import backend
from bert4keras.checkpoints import read_safetensors
from bert4keras.convert import convert_hf_to_google
from bert4keras.layers import ContextMask, RelativePositionBias, ZeroPaddedPositions
from bert4keras.models import build_transformer_model, load_config
from bert4keras.models.gpt import GPT, GPT2, GPT2_ML, gpt2_hf_to_google
from bert4keras.models.t5 import T5, t5_hf_config, t5_hf_to_google

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
GPT2_DIR = os.path.join(FIXTURES, "gpt2")
T5_DIRS = {
    "t5.1.0": os.path.join(FIXTURES, "t5", "relu_tied"),
    "t5.1.1": os.path.join(FIXTURES, "t5", "gated_untied"),
}
TINY = dict(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12)


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def run(model, inputs):
    return to_numpy(model(inputs, training=False))


def max_diff(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


def randomize(model, seed=0):
    """Random weights, so that every weight influences the outputs."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.normal(0.0, 0.5, variable.shape)
        if variable.path.endswith("gamma"):
            value = 1.0 + 0.2 * value
        variable.assign(value.astype("float32"))


# ---------------------------------------------------------------------------
# GPT-2 against HF
# ---------------------------------------------------------------------------


def check_gpt2(config, checkpoint, data):
    gpt2 = build_transformer_model(config, checkpoint, model="gpt2", with_lm="linear", return_keras_model=False)
    ids, mask = data["input_ids"], data["attention_mask"]
    logits = run(gpt2.model, ids)
    hidden = run(keras.Model(gpt2.model.inputs, gpt2.model.get_layer("Output-Norm").output), ids)
    assert max_diff(hidden, data["hidden"], mask) < 1e-4
    assert max_diff(logits, data["logits"], mask) < 1e-4
    return gpt2


def test_gpt2_matches_hf_from_safetensors_and_converted(tmp_path):
    data = np.load(os.path.join(GPT2_DIR, "outputs.npz"))
    assert data["input_ids"][0, 3] == 0  # id 0 is a real token here, not padding
    check_gpt2(GPT2_DIR, GPT2_DIR, data)
    prefix = convert_hf_to_google(GPT2_DIR, tmp_path)
    check_gpt2(tmp_path / "bert_config.json", prefix, data)
    # Default head: probabilities, the softmax of HF's logits.
    probs = run(build_transformer_model(tmp_path / "bert_config.json", prefix, model="gpt2"), data["input_ids"])
    logits = data["logits"] - data["logits"].max(-1, keepdims=True)
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert max_diff(probs, expected, data["attention_mask"]) < 1e-5


def test_gpt2_c_attn_split_in_query_key_value_order():
    state = read_safetensors(os.path.join(GPT2_DIR, "model.safetensors"))
    google = gpt2_hf_to_google(state)
    c_attn = state["transformer.h.1.attn.c_attn.weight"]  # (in, 3 * out), Conv1D layout
    bias = state["transformer.h.1.attn.c_attn.bias"]
    for part, name in enumerate(("query", "key", "value")):
        scope = f"gpt2/transformer/layer_1/attention/self/{name}"
        np.testing.assert_array_equal(google[f"{scope}/kernel"], c_attn[:, part * 32 : (part + 1) * 32])
        np.testing.assert_array_equal(google[f"{scope}/bias"], bias[part * 32 : (part + 1) * 32])
    np.testing.assert_array_equal(
        google["gpt2/transformer/layer_0/attention/input/LayerNorm/gamma"], state["transformer.h.0.ln_1.weight"]
    )
    np.testing.assert_array_equal(google["gpt2/output/LayerNorm/beta"], state["transformer.ln_f.bias"])
    assert not any("attn/bias" in k or "lm_head" in k for k in google)


def test_gpt2_keep_tokens_selects_embedding_rows():
    keep = [7, 0, 42, 5, 98]
    small = build_transformer_model(GPT2_DIR, GPT2_DIR, model="gpt2", with_lm="linear", keep_tokens=keep)
    assert small.get_layer("Embedding-Token").embeddings.shape == (5, 32)
    new_ids = np.array([[2, 0, 1, 4, 3]], dtype="int32")
    full = build_transformer_model(GPT2_DIR, GPT2_DIR, model="gpt2", with_lm="linear")
    expected = run(full, np.array(keep)[new_ids])[..., keep]
    np.testing.assert_allclose(run(small, new_ids), expected, atol=1e-5)


# ---------------------------------------------------------------------------
# T5 against HF
# ---------------------------------------------------------------------------


def load_t5(config, checkpoint, model, with_lm):
    return build_transformer_model(config, checkpoint, model=model, with_lm=with_lm, return_keras_model=False)


def test_t5_new_token_vector_sets_the_input_embedding_only():
    folder = T5_DIRS["t5.1.1"]
    state = read_safetensors(os.path.join(folder, "model.safetensors"))
    shared, head = state["shared.weight"], state["lm_head.weight"]
    vector = np.linspace(-1, 1, shared.shape[1]).astype("float32")
    t5 = build_transformer_model(folder, folder, model="t5", compound_tokens=[vector], return_keras_model=False)
    weights = {w.path: keras.ops.convert_to_numpy(w) for w in t5.model.weights}
    np.testing.assert_allclose(weights["Embedding-Token/embeddings"][-1], vector, rtol=1e-6)
    # The untied LM head's new row is the mean output row, not the input vector.
    np.testing.assert_allclose(weights["Decoder-Output-LM/kernel"][:, -1], head.mean(0), rtol=1e-5, atol=1e-7)


def check_t5(config, checkpoint, model, data):
    ids, mask = data["input_ids"], data["attention_mask"]
    dec_ids, dec_mask = data["decoder_input_ids"], data["decoder_attention_mask"]
    t5 = load_t5(config, checkpoint, model, "linear")
    encoded = run(t5.encoder, ids)
    assert max_diff(encoded, data["encoder_hidden"], mask) < 1e-4
    assert np.all(encoded[~mask.astype(bool)] == 0)  # padding rows are zero
    logits = run(t5.model, [ids, dec_ids])
    assert max_diff(logits, data["logits"], dec_mask) < 1e-4
    # The decoder alone, fed the encoder output, masks the source padding.
    np.testing.assert_allclose(run(t5.decoder, [encoded, dec_ids]), logits, atol=1e-5)
    hidden = load_t5(config, checkpoint, model, False)
    assert max_diff(run(hidden.model, [ids, dec_ids]), data["decoder_hidden"], dec_mask) < 1e-4
    return t5


@pytest.mark.parametrize("version", ["t5.1.0", "t5.1.1"])
def test_t5_matches_hf_from_safetensors_and_converted(version, tmp_path):
    folder = T5_DIRS[version]
    data = np.load(os.path.join(folder, "outputs.npz"))
    t5 = check_t5(folder, folder, "t5", data)
    assert t5.version == version and t5.tie_word_embeddings == (version == "t5.1.0")
    prefix = convert_hf_to_google(folder, tmp_path)
    with open(tmp_path / "bert_config.json") as f:
        assert json.load(f)["version"] == version
    check_t5(tmp_path / "bert_config.json", prefix, version, data)
    # The converted checkpoint uses the names of the released checkpoints.
    import tensorflow as tf

    names = {name for name, _ in tf.train.list_variables(prefix)}
    if version == "t5.1.0":
        expected = {
            "shared/embedding",
            "encoder/block_000/layer_000/SelfAttention/q",
            "encoder/block_000/layer_000/SelfAttention/relative_attention_bias",
            "encoder/block_001/layer_000/layer_norm/scale",
            "encoder/block_001/layer_001/DenseReluDense/wi/kernel",
            "encoder/final_layer_norm/scale",
            "decoder/block_001/layer_001/EncDecAttention/o",
            "decoder/block_001/layer_002/DenseReluDense/wo/kernel",
            "decoder/final_layer_norm/scale",
        }
        assert "decoder/logits/kernel" not in names
    else:
        expected = {
            "encoder/block_000/layer_001/rms_norm/scale",
            "encoder/block_000/layer_001/DenseReluDense/wi_0/kernel",
            "decoder/block_000/layer_002/DenseReluDense/wi_1/kernel",
            "decoder/rms_norm/scale",
            "decoder/logits/kernel",
        }
    assert expected <= names
    assert not any("EncDecAttention/relative_attention_bias" in n for n in names)
    assert len(names) == len(t5.variable_mapping())


def test_t5_google_layout_shapes():
    # Mesh-tensorflow stores the bias table as (heads, buckets), kernels as (in, out).
    state = read_safetensors(os.path.join(T5_DIRS["t5.1.1"], "model.safetensors"))
    google = t5_hf_to_google(state, "t5.1.1", tie_word_embeddings=False)
    table = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # (8, 4)
    np.testing.assert_array_equal(google["encoder/block_000/layer_000/SelfAttention/relative_attention_bias"], table.T)
    q = state["decoder.block.1.layer.1.EncDecAttention.q.weight"]  # (inner 32, d_model 24)
    np.testing.assert_array_equal(google["decoder/block_001/layer_001/EncDecAttention/q"], q.T)
    np.testing.assert_array_equal(google["decoder/logits/kernel"], state["lm_head.weight"].T)
    # Untied model whose file has no lm_head (HF then ties it to `shared`).
    del state["lm_head.weight"]
    google = t5_hf_to_google(state, "t5.1.1", tie_word_embeddings=False)
    np.testing.assert_array_equal(google["decoder/logits/kernel"], state["shared.weight"].T)
    assert "decoder/logits/kernel" not in t5_hf_to_google(state, "t5.1.0", tie_word_embeddings=True)


def test_t5_hf_config_versions():
    relu = t5_hf_config(json.load(open(os.path.join(T5_DIRS["t5.1.0"], "config.json"))))
    assert (relu["version"], relu["hidden_act"], relu["tie_word_embeddings"]) == ("t5.1.0", "relu", True)
    gated = t5_hf_config(json.load(open(os.path.join(T5_DIRS["t5.1.1"], "config.json"))))
    assert (gated["version"], gated["hidden_act"], gated["tie_word_embeddings"]) == (
        "t5.1.1",
        ["gelu_new", "linear"],
        False,
    )
    assert gated["attention_head_size"] == 8 and gated["hidden_size"] == 24
    # An mT5 config as released (older transformers: tie_word_embeddings=False).
    mt5 = {"model_type": "mt5", "d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 8,
           "num_heads": 6, "vocab_size": 250112, "feed_forward_proj": "gated-gelu",
           "tie_word_embeddings": False}
    converted = t5_hf_config(mt5)
    assert (converted["version"], converted["tie_word_embeddings"]) == ("mt5.1.1", False)
    assert converted["num_decoder_layers"] == 8


def test_t5_mt5_model_type_is_registered(tmp_path):
    config = json.load(open(os.path.join(T5_DIRS["t5.1.1"], "config.json")))
    config["model_type"] = "mt5"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_config(str(tmp_path))["version"] == "mt5.1.1"
    t5 = build_transformer_model(tmp_path, T5_DIRS["t5.1.1"], model="mt5.1.1", return_keras_model=False)
    assert t5.version == "mt5.1.1" and "Decoder-Output-LM" in [layer.name for layer in t5.model.layers]


def test_t5_keep_tokens_slices_embedding_and_logits_kernel():
    folder = T5_DIRS["t5.1.1"]
    keep = [0, 1, 9, 33, 4, 60]
    full = load_t5(folder, folder, "t5", "linear")
    small = build_transformer_model(folder, folder, model="t5", with_lm="linear", keep_tokens=keep,
                                    return_keras_model=False)
    new_enc = np.array([[2, 3, 4, 5, 1, 2], [5, 4, 3, 0, 0, 0]], dtype="int32")
    new_dec = np.array([[0, 2, 5, 1], [0, 3, 0, 0]], dtype="int32")
    expected = run(full.model, [np.array(keep)[new_enc], np.array(keep)[new_dec]])[..., keep]
    np.testing.assert_allclose(run(small.model, [new_enc, new_dec]), expected, atol=1e-5)


# ---------------------------------------------------------------------------
# T5 layers against formulas
# ---------------------------------------------------------------------------


def bucket_reference(relative, bidirectional, num_buckets, max_distance):
    """T5's bucket of one relative position (key - query), from its definition."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if relative > 0:
            bucket += num_buckets
        distance = abs(relative)
    else:
        distance = max(-relative, 0)
    exact = num_buckets // 2
    if distance < exact:
        return bucket + distance
    log_bucket = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (num_buckets - exact))
    return bucket + min(log_bucket, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bias_formula(bidirectional):
    layer = RelativePositionBias(heads=3, num_buckets=8, max_distance=10, bidirectional=bidirectional)
    q, k = np.zeros((1, 13, 2), "float32"), np.zeros((1, 13, 2), "float32")
    layer.build(None)
    table = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    layer.embeddings.assign(table)
    bias = run(layer, [q, k])
    assert bias.shape == (1, 3, 13, 13)
    buckets = set()
    for i in range(13):
        for j in range(13):
            b = bucket_reference(j - i, bidirectional, 8, 10)
            buckets.add(b)
            np.testing.assert_array_equal(bias[0, :, i, j], table[b])
    # Every bucket occurs (bucket 4, 'distance 0 to the right', cannot), so the
    # log-spaced buckets and the clipping at max_distance are both exercised.
    assert buckets == ({0, 1, 2, 3, 5, 6, 7} if bidirectional else set(range(8)))
    # A boolean mask adds NEG_INF where attention is not allowed.
    causal = backend.causal_mask(13)
    masked = to_numpy(layer([q, k], attention_mask=causal))
    allowed = np.tril(np.ones((13, 13), bool))
    np.testing.assert_array_equal(masked[0][:, allowed], bias[0][:, allowed])
    assert np.all(masked[0][:, ~allowed] < backend.NEG_INF / 2)


def test_zero_padded_positions_and_context_mask():
    x = np.arange(1, 13, dtype="float32").reshape(2, 3, 2)
    ids = np.array([[4, 5, 0], [4, 0, 0]], "int32")
    zeroed = run(ZeroPaddedPositions(), [x, ids])
    np.testing.assert_array_equal(zeroed, x * (ids != 0)[..., None])
    mask = to_numpy(ContextMask()(zeroed))
    assert mask.shape == (2, 1, 1, 3)
    np.testing.assert_array_equal(mask[:, 0, 0], ids != 0)


@pytest.mark.parametrize(
    "layer",
    [
        RelativePositionBias(heads=2, num_buckets=16, max_distance=64, bidirectional=False, name="r"),
        ZeroPaddedPositions(pad_id=3, name="z"),
        ContextMask(name="c"),
    ],
)
def test_layer_get_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer) and restored.get_config() == config


# ---------------------------------------------------------------------------
# GPT and GPT2-ML against a numpy forward pass
# ---------------------------------------------------------------------------


def np_layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_attention(x, w, names, ids, heads):
    """Causal self-attention, one head and one query position at a time."""
    q, k, v = (x @ w[f"{n}/kernel"] + w[f"{n}/bias"] for n in names[:3])
    size = q.shape[-1] // heads
    out = np.zeros_like(q)
    for h in range(heads):
        cols = slice(h * size, (h + 1) * size)
        for i in range(len(ids)):
            visible = [j for j in range(i + 1) if ids[j] != 0]
            scores = np.array([q[i, cols] @ k[j, cols] / np.sqrt(size) for j in visible])
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[i, cols] = sum(pj * v[j, cols] for pj, j in zip(p, visible))
    return out @ w[f"{names[3]}/kernel"] + w[f"{names[3]}/bias"]


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def gpt_reference(w, ids, segments, layers, heads, eps=1e-12):
    x = w["gpt/embeddings/word_embeddings"][ids] + w["gpt/embeddings/position_embeddings"][: len(ids)]
    x = x + w["gpt/embeddings/token_type_embeddings"][segments]
    for i in range(layers):
        s = f"gpt/transformer/layer_{i}"
        names = [f"{s}/attention/self/{n}" for n in ("query", "key", "value")] + [f"{s}/attention/output/dense"]
        a = np_attention(x, w, names, ids, heads)
        x = np_layer_norm(x + a, w[f"{s}/attention/output/LayerNorm/gamma"], w[f"{s}/attention/output/LayerNorm/beta"], eps)
        f = np_gelu_tanh(x @ w[f"{s}/intermediate/dense/kernel"] + w[f"{s}/intermediate/dense/bias"])
        f = f @ w[f"{s}/output/dense/kernel"] + w[f"{s}/output/dense/bias"]
        x = np_layer_norm(x + f, w[f"{s}/output/LayerNorm/gamma"], w[f"{s}/output/LayerNorm/beta"], eps)
    return np_softmax(x @ w["gpt/embeddings/word_embeddings"].T)


def gpt2_ml_reference(w, ids, layers, heads, eps=1e-5):
    x = w["newslm/embeddings/word_embed"][ids] + w["newslm/embeddings/pos_embed"][: len(ids)]
    x = np_layer_norm(x, w["newslm/embeddings/LayerNorm_embed_norm/gamma"],
                      w["newslm/embeddings/LayerNorm_embed_norm/beta"], eps)
    for i in range(layers):
        s = f"newslm/layer{i:02d}"
        names = [f"{s}/{n}_layer" for n in ("query", "key", "value", "context_projection")]
        x = x + np_attention(x, w, names, ids, heads)
        h = np_layer_norm(x, w[f"{s}/LayerNorm_mlp_ln0/gamma"], w[f"{s}/LayerNorm_mlp_ln0/beta"], eps)
        f = np_gelu_tanh(h @ w[f"{s}/intermediate/kernel"] + w[f"{s}/intermediate/bias"])
        f = f @ w[f"{s}/output/kernel"] + w[f"{s}/output/bias"]
        x = np_layer_norm(x + f, w[f"{s}/LayerNorm_mlp_ln1/gamma"], w[f"{s}/LayerNorm_mlp_ln1/beta"], eps)
    return np_softmax(x @ w["newslm/embeddings/word_embed"].T)


IDS = np.array([[3, 7, 1, 9, 4, 2], [5, 8, 2, 0, 0, 0]], "int32")


def test_gpt_formula():
    gpt = GPT(segment_vocab_size=2, **TINY)
    model = gpt.build()
    randomize(model, seed=1)
    segments = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]], "int32")
    probs = run(model, [IDS, segments])
    weights = gpt.checkpoint_tensors()
    for row in range(2):
        expected = gpt_reference(weights, IDS[row], segments[row], 2, 2)
        real = IDS[row] != 0
        np.testing.assert_allclose(probs[row][real], expected[real], atol=1e-5)
    # Causality: changing the last real token leaves earlier positions unchanged.
    changed = IDS.copy()
    changed[0, 5] = 11
    np.testing.assert_allclose(run(model, [changed, segments])[0, :5], probs[0, :5], atol=1e-6)
    assert np.abs(run(model, [changed, segments])[0, 5] - probs[0, 5]).max() > 1e-4


def test_gpt_shared_segment_embeddings_use_token_table():
    gpt = GPT(segment_vocab_size=2, shared_segment_embeddings=True, with_lm=False, **TINY)
    model = gpt.build()
    randomize(model, seed=2)
    assert "Embedding-Segment" not in [layer.name for layer in model.layers]
    assert "gpt/embeddings/token_type_embeddings" not in gpt.variable_mapping().values()
    # Segment id s adds token row s: same as a model whose segment table is those rows.
    ids = IDS[:1]
    segments = np.array([[0, 1, 1, 0, 1, 1]], "int32")
    separate = GPT(segment_vocab_size=2, with_lm=False, **TINY)
    separate.build()
    for variable in separate.model.weights:
        source = {v.path: v for v in model.weights}.get(variable.path)
        if source is not None:
            variable.assign(source)
    table = to_numpy(model.get_layer("Embedding-Token").embeddings)[:2]
    separate.model.get_layer("Embedding-Segment").embeddings.assign(table)
    np.testing.assert_allclose(run(model, [ids, segments]), run(separate.model, [ids, segments]), atol=1e-6)


def test_gpt2_ml_formula_and_names():
    ml = GPT2_ML(**TINY)
    model = ml.build()
    randomize(model, seed=3)
    probs = run(model, IDS)
    weights = ml.checkpoint_tensors()
    for name in (
        "newslm/embeddings/word_embed",
        "newslm/embeddings/pos_embed",
        "newslm/embeddings/LayerNorm_embed_norm/gamma",
        "newslm/layer00/query_layer/kernel",
        "newslm/layer01/key_layer/bias",
        "newslm/layer01/value_layer/kernel",
        "newslm/layer00/context_projection_layer/kernel",
        "newslm/layer00/LayerNorm_mlp_ln0/beta",
        "newslm/layer01/intermediate/kernel",
        "newslm/layer01/output/bias",
        "newslm/layer01/LayerNorm_mlp_ln1/gamma",
    ):
        assert name in weights
    for row in range(2):
        expected = gpt2_ml_reference(weights, IDS[row], 2, 2)
        real = IDS[row] != 0
        np.testing.assert_allclose(probs[row][real], expected[real], atol=1e-5)


# ---------------------------------------------------------------------------
# Mappings, round trips, errors
# ---------------------------------------------------------------------------


FAMILIES = {
    "gpt": lambda: GPT(segment_vocab_size=2, **TINY),
    "gpt2": lambda: GPT2(**TINY),
    "gpt2_ml": lambda: GPT2_ML(**TINY),
    "t5.1.0": lambda: T5(version="t5.1.0", num_decoder_layers=3, **TINY),
    "t5.1.1": lambda: T5(version="t5.1.1", **TINY),
}


def family_inputs(name):
    if name == "gpt":
        return [IDS, (IDS > 4).astype("int32")]
    if name.startswith("t5"):
        return [IDS, np.array([[0, 4, 6, 2], [0, 3, 0, 0]], "int32")]
    return IDS


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_variable_mapping_covers_every_weight(name):
    transformer = FAMILIES[name]()
    model = transformer.build()
    paths = [w.path for w in model.weights]
    assert len(paths) == len(set(paths))
    mapping = transformer.variable_mapping()
    assert set(mapping) == set(paths)
    assert len(set(mapping.values())) == len(mapping)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_save_and_reload_round_trips(name, tmp_path):
    transformer = FAMILIES[name]()
    model = transformer.build()
    randomize(model, seed=4)
    inputs = family_inputs(name)
    expected = run(model, inputs)

    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(run(reloaded, inputs), expected, atol=1e-6)

    model.save_weights(tmp_path / "m.weights.h5")
    fresh = FAMILIES[name]().build()
    fresh.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_allclose(run(fresh, inputs), expected, atol=1e-6)

    prefix = transformer.save_weights_as_checkpoint(str(tmp_path / "ckpt" / "bert_model.ckpt"))
    model_name = "t5" if name.startswith("t5") else name
    restored = build_transformer_model(tmp_path / "ckpt" / "bert_config.json", prefix, model=model_name)
    np.testing.assert_allclose(run(restored, inputs), expected, atol=1e-6)


def test_t5_encoder_decoder_models_share_weights():
    t5 = T5(version="t5.1.1", with_lm="linear", **TINY)
    t5.build()
    randomize(t5.model, seed=5)
    enc_ids, dec_ids = family_inputs("t5")
    encoded = run(t5.encoder, enc_ids)
    np.testing.assert_allclose(run(t5.decoder, [encoded, dec_ids]), run(t5.model, [enc_ids, dec_ids]), atol=1e-5)
    assert [i.name for i in t5.encoder.inputs] == ["Encoder-Input-Token"]
    assert [i.name for i in t5.decoder.inputs] == ["Input-Context", "Decoder-Input-Token"]
    assert {id(v) for v in t5.encoder.weights} | {id(v) for v in t5.decoder.weights} == {
        id(v) for v in t5.model.weights
    }


def test_t5_decoder_is_causal():
    t5 = T5(version="t5.1.0", with_lm="linear", **TINY)
    t5.build()
    randomize(t5.model, seed=6)
    enc_ids, dec_ids = family_inputs("t5")
    base = run(t5.model, [enc_ids, dec_ids])
    later = dec_ids.copy()
    later[0, 3] = 9
    changed = run(t5.model, [enc_ids, later])
    np.testing.assert_allclose(changed[0, :3], base[0, :3], atol=1e-6)
    assert np.abs(changed[0, 3] - base[0, 3]).max() > 1e-4


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="'lm'"):
        GPT2(application="unilm", **TINY)
    with pytest.raises(ValueError, match="with_lm"):
        GPT(with_mlm=True, **TINY)
    with pytest.raises(ValueError, match="segment"):
        GPT2(segment_vocab_size=2, **TINY)
    with pytest.raises(ValueError, match="embedding_size"):
        GPT(embedding_size=4, **TINY)
    with pytest.raises(ValueError, match="t5.1.1"):
        T5(version="t5.2", **TINY)
    with pytest.raises(ValueError, match="seq2seq"):
        T5(application="lm", **TINY)
    with pytest.raises(NotImplementedError, match="gpt2"):
        GPT(**TINY).from_hf_weights({})
    # The builder's default application is accepted and means the family's own.
    assert build_transformer_model(model="gpt2", return_keras_model=False, **TINY).application == "lm"


def test_gpt2_cached_decoding_matches_full_recomputation():
    from bert4keras.generation import CachedDecoder

    gpt2 = GPT2(with_lm="linear", **TINY)
    gpt2.build()
    randomize(gpt2.model, seed=4)  # a model whose greedy output varies
    prompt = np.array([5, 17, 21, 3], "int32")
    decoder = CachedDecoder(gpt2, start_id=None, end_id=29, maxlen=5, minlen=5)
    cached = [int(t) for t in decoder.beam_search([prompt], topk=1)]
    sequence = list(prompt)
    for _ in range(5):  # greedy, recomputing the whole prefix each step
        sequence.append(int(run(gpt2.model, np.array([sequence], "int32"))[0, -1].argmax()))
    assert len(set(sequence[len(prompt):])) > 1
    assert cached == sequence[len(prompt):]
