"""ALBERT, ALBERT (unshared), NEZHA, RoFormer, RoFormer-v2 and ELECTRA.

* HF equivalence: small random HF models (tests/fixtures/make_bert_family_fixtures.py)
  loaded from their safetensors folder and after `convert_hf_to_google`;
  max abs difference < 1e-4 on non-padding positions.
* NEZHA and RoFormer-v2 (no HF reference): a numpy re-implementation with
  explicit loops over heads, positions and rotary pairs; < 1e-4.
* Mapping completeness, save/reload round trips (.keras, .weights.h5, Google
  checkpoint: identical outputs), keep_tokens, applications and bad input.
"""
import json
import math
import os

import keras
import numpy as np
import pytest

from bert4keras import build_transformer_model
from bert4keras.convert import convert_hf_to_google
from bert4keras.layers import RelativePositionAttention
from bert4keras.models import load_config

TOL = 1e-4
FAMILIES = ["albert", "albert_unshared", "nezha", "roformer", "roformer_v2", "electra"]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference(fixtures_dir, folder):
    return dict(np.load(os.path.join(fixtures_dir, folder, "outputs.npz")))


def max_diff_on_tokens(a, b, token_ids):
    return np.abs(a - b)[token_ids != 0].max()


def predict(model, inputs):
    """Outputs as a list of numpy arrays (an eager call: faster than predict for tiny models)."""
    out = model([keras.ops.convert_to_tensor(x) for x in inputs], training=False)
    out = out if isinstance(out, (list, tuple)) else [out]
    return [keras.ops.convert_to_numpy(x) for x in out]


def sources(fixtures_dir, folder, source, tmp_path):
    """(config, checkpoint) of an HF fixture, as is or converted to Google's layout."""
    hf = os.path.join(fixtures_dir, folder)
    if source == "safetensors":
        return hf, hf
    prefix = convert_hf_to_google(hf, tmp_path / "google")
    return tmp_path / "google" / "bert_config.json", prefix


# -- HF equivalence ------------------------------------------------------------

# folder, model, build kwargs, [(output key, transform of the HF output)]
HF_CASES = {
    "albert-heads": (
        "albert/pretraining",
        "albert",
        {"with_nsp": True, "with_mlm": "linear"},
        [("sop_logits", softmax), ("mlm_logits", None)],
    ),
    "albert-pool": ("albert/pretraining", "albert", {"with_pool": True}, [("pooler_output", None)]),
    "albert": ("albert/pretraining", "albert", {}, [("last_hidden_state", None)]),
    "albert_unshared": ("albert/pretraining", "albert_unshared", {}, [("last_hidden_state", None)]),
    "albert-equal-sizes": ("albert/equal_sizes", "albert", {}, [("last_hidden_state", None)]),
    "roformer": ("roformer/mlm", "roformer", {}, [("last_hidden_state", None)]),
    "roformer-mlm": ("roformer/mlm", "roformer", {"with_mlm": "linear"}, [("mlm_logits", None)]),
    "roformer-lm": (
        "roformer/mlm",
        "roformer",
        {"with_mlm": "linear", "application": "lm"},
        [("lm_logits", None)],
    ),
    "electra": ("electra/discriminator", "electra", {}, [("last_hidden_state", None)]),
    "electra-discriminator": (
        "electra/discriminator",
        "electra",
        {"with_discriminator": True},
        [("discriminator_logits", lambda x: sigmoid(x)[..., None])],
    ),
    "electra-generator": ("electra/generator", "electra", {"with_mlm": "linear"}, [("mlm_logits", None)]),
    "electra-generator-hidden": ("electra/generator", "electra", {}, [("last_hidden_state", None)]),
}


@pytest.mark.parametrize("source", ["safetensors", "google"])
@pytest.mark.parametrize("case", list(HF_CASES))
def test_matches_hf(fixtures_dir, tmp_path, case, source):
    folder, model_name, kwargs, outputs = HF_CASES[case]
    ref = reference(fixtures_dir, folder)
    config, checkpoint = sources(fixtures_dir, folder, source, tmp_path)
    model = build_transformer_model(config, checkpoint, model=model_name, **kwargs)
    got = predict(model, [ref["token_ids"], ref["segment_ids"]])
    assert len(got) == len(outputs)
    for value, (key, transform) in zip(got, outputs):
        expected = transform(ref[key]) if transform else ref[key]
        assert value.shape == expected.shape
        if value.ndim == 3:
            assert max_diff_on_tokens(value, expected, ref["token_ids"]) < TOL, key
        else:
            assert np.abs(value - expected).max() < TOL, key


def test_converted_configs_keep_family_settings(fixtures_dir, tmp_path):
    for folder, key, value in [
        ("albert/pretraining", "embedding_size", 16),
        ("albert/pretraining", "hidden_act", "gelu_new"),
        ("albert/equal_sizes", "embedding_mapping", True),
        ("roformer/mlm", "embedding_size", 16),
        ("electra/discriminator", "embedding_size", 16),
    ]:
        convert_hf_to_google(os.path.join(fixtures_dir, folder), tmp_path / folder)
        with open(tmp_path / folder / "bert_config.json") as f:
            assert json.load(f)[key] == value, (folder, key)


def test_albert_shares_one_block_and_unshared_copies_it(fixtures_dir):
    folder = os.path.join(fixtures_dir, "albert/pretraining")
    shared = build_transformer_model(folder, folder, model="albert")
    names = [layer.name for layer in shared.layers]
    assert "Transformer-MultiHeadSelfAttention" in names
    assert not any(name.startswith("Transformer-0") for name in names)
    unshared = build_transformer_model(folder, folder, model="albert_unshared")
    weights = {w.path: keras.ops.convert_to_numpy(w) for w in unshared.weights}
    assert len(unshared.weights) > len(shared.weights)
    for path, value in weights.items():
        if path.startswith("Transformer-1-"):
            np.testing.assert_array_equal(value, weights[path.replace("Transformer-1-", "Transformer-0-")])


def test_albert_unshared_refuses_to_save_diverged_copies(fixtures_dir, tmp_path):
    folder = os.path.join(fixtures_dir, "albert/pretraining")
    transformer = build_transformer_model(folder, folder, model="albert_unshared", return_keras_model=False)
    transformer.save_weights_as_checkpoint(str(tmp_path / "same" / "bert_model.ckpt"))  # copies equal: fine
    kernel = transformer.model.get_layer("Transformer-1-FeedForward").o_dense.kernel
    kernel.assign(kernel + 1.0)
    with pytest.raises(ValueError, match="copies of .*ffn_1/intermediate/output/dense/kernel.*differ"):
        transformer.save_weights_as_checkpoint(str(tmp_path / "diverged" / "bert_model.ckpt"))


# -- formula tests (no HF reference) -------------------------------------------


def randomize(model, seed):
    """Seeded random weights (norm gains around 1) so that no term is trivial."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        value = rng.normal(0.0, 0.3, weight.shape)
        if weight.path.endswith("gamma"):
            value = 1.0 + 0.1 * value
        weight.assign(value.astype("float32"))
    return {w.path: keras.ops.convert_to_numpy(w).astype("float64") for w in model.weights}


def layer_norm(x, gamma=None, beta=None, center=True, eps=1e-12):
    if center:
        x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    if gamma is not None:
        x = x * gamma
    if beta is not None:
        x = x + beta
    return x


def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def dense(w, name, x, bias=True):
    y = x @ w[f"{name}/kernel"]
    return y + w[f"{name}/bias"] if bias else y


def nezha_relative_row(distance, max_relative, depth):
    """Row clip(distance) + M of NEZHA's table, entry by entry."""
    pos = min(max(distance, -max_relative), max_relative) + max_relative
    row = np.zeros(depth)
    for m in range(depth // 2):
        row[2 * m] = math.sin(pos / 10000 ** (2 * m / depth))
        row[2 * m + 1] = math.cos(pos / 10000 ** (2 * m / depth))
    return row


def nezha_attention(w, name, x, valid, heads, max_relative):
    length, size = x.shape[0], x.shape[1] // heads
    q, k, v = (dense(w, f"{name}/{c}_dense", x) for c in "qkv")
    out = np.zeros((length, heads * size))
    for h in range(heads):
        cols = slice(h * size, (h + 1) * size)
        for i in range(length):
            rows = [nezha_relative_row(j - i, max_relative, size) for j in range(length)]
            scores = np.array(
                [q[i, cols] @ (k[j, cols] + rows[j]) / math.sqrt(size) if valid[j] else -np.inf for j in range(length)]
            )
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[i, cols] = sum(p[j] * (v[j, cols] + rows[j]) for j in range(length))
    return dense(w, f"{name}/o_dense", out)


def rotate_pairs(x, position):
    """RoFormer rotation of one vector, pair by pair."""
    y = np.zeros_like(x)
    d = len(x)
    for m in range(d // 2):
        theta = position * 10000 ** (-2 * m / d)
        y[2 * m] = x[2 * m] * math.cos(theta) - x[2 * m + 1] * math.sin(theta)
        y[2 * m + 1] = x[2 * m] * math.sin(theta) + x[2 * m + 1] * math.cos(theta)
    return y


def rotary_attention(w, name, x, valid, heads, bias):
    length, size = x.shape[0], x.shape[1] // heads
    q, k, v = (dense(w, f"{name}/{c}_dense", x, bias) for c in "qkv")
    out = np.zeros((length, heads * size))
    for h in range(heads):
        cols = slice(h * size, (h + 1) * size)
        rq = [rotate_pairs(q[i, cols], i) for i in range(length)]
        rk = [rotate_pairs(k[j, cols], j) for j in range(length)]
        for i in range(length):
            scores = np.array([rq[i] @ rk[j] / math.sqrt(size) if valid[j] else -np.inf for j in range(length)])
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[i, cols] = sum(p[j] * v[j, cols] for j in range(length))
    return dense(w, f"{name}/o_dense", out, bias)


TINY = dict(vocab_size=23, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12)
TOKENS = np.array([[3, 9, 14, 2, 7, 21, 5], [4, 11, 6, 19, 0, 0, 0]], dtype="int32")
SEGMENTS = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]], dtype="int32")


def test_nezha_matches_explicit_relative_position_loops():
    max_relative = 2  # length 7 > 2 * 2 + 1, so distances are clipped
    model = build_transformer_model(model="nezha", max_relative_position=max_relative, with_mlm=True, **TINY)
    w = randomize(model, seed=0)
    got = predict(model, [TOKENS, SEGMENTS])[0]
    for b in range(2):
        valid = TOKENS[b] != 0
        x = w["Embedding-Token/embeddings"][TOKENS[b]] + w["Embedding-Segment/embeddings"][SEGMENTS[b]]
        x = layer_norm(x, w["Embedding-Norm/gamma"], w["Embedding-Norm/beta"])
        for i in range(2):
            a, f = f"Transformer-{i}-MultiHeadSelfAttention", f"Transformer-{i}-FeedForward"
            x = layer_norm(x + nezha_attention(w, a, x, valid, 2, max_relative), w[f"{a}-Norm/gamma"], w[f"{a}-Norm/beta"])
            y = dense(w, f"{f}/o_dense", gelu(dense(w, f"{f}/i0_dense", x)))
            x = layer_norm(x + y, w[f"{f}-Norm/gamma"], w[f"{f}-Norm/beta"])
        y = layer_norm(gelu(dense(w, "MLM-Dense", x)), w["MLM-Norm/gamma"], w["MLM-Norm/beta"])
        expected = softmax(y @ w["Embedding-Token/embeddings"].T + w["MLM-Bias/bias"])
        assert np.abs(got[b][valid] - expected[valid]).max() < TOL


def test_roformer_v2_matches_explicit_rotary_rms_loops():
    model = build_transformer_model(model="roformer_v2", with_mlm=True, embedding_size=6, **TINY)
    w = randomize(model, seed=1)
    assert all(path.endswith(("kernel", "embeddings")) for path in w)  # no bias, no norm weights
    got = predict(model, [TOKENS, SEGMENTS])[0]
    for b in range(2):
        valid = TOKENS[b] != 0
        x = w["Embedding-Token/embeddings"][TOKENS[b]] + w["Embedding-Segment/embeddings"][SEGMENTS[b]]
        x = layer_norm(x, center=False) @ w["Embedding-Mapping/kernel"]
        for i in range(2):
            a, f = f"Transformer-{i}-MultiHeadSelfAttention", f"Transformer-{i}-FeedForward"
            x = layer_norm(x + rotary_attention(w, a, x, valid, 2, bias=False), center=False)
            y = np.maximum(x @ w[f"{f}/i0_dense/kernel"], 0) @ w[f"{f}/o_dense/kernel"]
            x = layer_norm(x + y, center=False)
        expected = softmax(x @ w["Output-Mapping/kernel"] @ w["Embedding-Token/embeddings"].T)
        assert np.abs(got[b][valid] - expected[valid]).max() < TOL


def test_roformer_matches_explicit_rotary_loops():
    """RoFormer without HF: q/k rotation by pairs, BERT block otherwise."""
    model = build_transformer_model(model="roformer", **{**TINY, "num_hidden_layers": 1})
    w = randomize(model, seed=2)
    got = predict(model, [TOKENS, SEGMENTS])[0]
    for b in range(2):
        valid = TOKENS[b] != 0
        x = w["Embedding-Token/embeddings"][TOKENS[b]] + w["Embedding-Segment/embeddings"][SEGMENTS[b]]
        x = layer_norm(x, w["Embedding-Norm/gamma"], w["Embedding-Norm/beta"])
        a, f = "Transformer-0-MultiHeadSelfAttention", "Transformer-0-FeedForward"
        x = layer_norm(x + rotary_attention(w, a, x, valid, 2, bias=True), w[f"{a}-Norm/gamma"], w[f"{a}-Norm/beta"])
        y = dense(w, f"{f}/o_dense", gelu(dense(w, f"{f}/i0_dense", x)))
        x = layer_norm(x + y, w[f"{f}-Norm/gamma"], w[f"{f}-Norm/beta"])
        assert np.abs(got[b][valid] - x[valid]).max() < TOL


def test_relative_position_attention_cache_matches_full_causal_pass():
    layer = RelativePositionAttention(heads=2, head_size=4, max_relative_position=3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 6, 8)).astype("float32")
    causal = np.tril(np.ones((6, 6), bool))[None, None]
    full = keras.ops.convert_to_numpy(layer([x, x, x], attention_mask=causal))
    cache = (np.zeros((1, 2, 6, 4), "float32"),) * 2  # (keys, values): (batch, heads, slots, size)
    for t in range(6):
        step = x[:, t : t + 1]
        mask = (np.arange(6) <= t)[None, None, None]
        out, *cache = layer([step, step, step], attention_mask=mask, cache=cache, cache_index=t)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(out)[0, 0], full[0, t], atol=1e-5)


def test_relative_position_attention_config_round_trip():
    layer = RelativePositionAttention(heads=2, head_size=4, max_relative_position=5, use_bias=False, name="rel")
    clone = RelativePositionAttention.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.max_relative_position == 5 and clone.use_bias is False
    with pytest.raises(ValueError, match="even size"):
        RelativePositionAttention(heads=1, head_size=3)([np.ones((1, 2, 3), "float32")] * 3)


# -- every family: mapping, round trips, keep_tokens, applications --------------

HEADS = {
    "albert": {"with_pool": True, "with_nsp": True, "with_mlm": True},
    "albert_unshared": {"with_pool": True, "with_mlm": True},
    "nezha": {"with_pool": True, "with_mlm": True},
    "roformer": {"with_pool": True, "with_mlm": True},
    "roformer_v2": {"with_mlm": True},
    "electra": {"with_discriminator": True, "with_mlm": True},
}


def family_config(tmp_path):
    path = tmp_path / "bert_config.json"
    path.write_text(
        json.dumps(
            {
                "vocab_size": 30, "hidden_size": 16, "embedding_size": 12, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 20, "hidden_act": "gelu",
                "max_position_embeddings": 16, "type_vocab_size": 2, "max_relative_position": 4,
            }
        )
    )
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_mapping_covers_every_weight(tmp_path, family):
    model = build_transformer_model(family_config(tmp_path), model=family, **HEADS[family])
    mapping = model.bert4keras.variable_mapping()
    assert set(mapping) == {w.path for w in model.weights}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_round_trips(tmp_path, family):
    config = family_config(tmp_path)
    transformer = build_transformer_model(config, model=family, return_keras_model=False, **HEADS[family])
    randomize(transformer.model, seed=4)
    if family == "albert_unshared":  # Google's layout holds one block: keep the copies equal
        for weight in transformer.model.weights:
            if weight.path.startswith("Transformer-1-"):
                source = weight.path.replace("Transformer-1-", "Transformer-0-")
                copy = next(w for w in transformer.model.weights if w.path == source)
                weight.assign(keras.ops.convert_to_numpy(copy))  # a copy: JAX must not share buffers
    inputs = [TOKENS, SEGMENTS]
    expected = predict(transformer.model, inputs)

    def same(model):
        for got, want in zip(predict(model, inputs), expected, strict=True):
            np.testing.assert_array_equal(got, want)

    transformer.model.save(tmp_path / "model.keras")
    same(keras.models.load_model(tmp_path / "model.keras"))
    transformer.model.save_weights(tmp_path / "model.weights.h5")
    fresh = build_transformer_model(config, model=family, **HEADS[family])
    fresh.load_weights(tmp_path / "model.weights.h5")
    same(fresh)
    prefix = transformer.save_weights_as_checkpoint(str(tmp_path / "ckpt" / "bert_model.ckpt"))
    same(build_transformer_model(tmp_path / "ckpt" / "bert_config.json", prefix, model=family, **HEADS[family]))


@pytest.mark.parametrize(
    "folder, model_name, kwargs",
    [
        ("albert/pretraining", "albert", {"with_mlm": "linear"}),
        ("roformer/mlm", "roformer", {"with_mlm": "linear"}),
        ("electra/generator", "electra", {"with_mlm": "linear"}),
    ],
)
def test_keep_tokens_select_vocabulary_rows(fixtures_dir, folder, model_name, kwargs):
    ref = reference(fixtures_dir, folder)
    path = os.path.join(fixtures_dir, folder)
    keep = [0, 2, 3, 17, 45, 8, 91, 33, 60, 5, 71, 12, 98, 6]  # every id of the inputs
    model = build_transformer_model(path, path, model=model_name, keep_tokens=keep, **kwargs)
    position = {token: i for i, token in enumerate(keep)}
    remapped = np.vectorize(position.get)(ref["token_ids"])
    logits = predict(model, [remapped, ref["segment_ids"]])[0]
    assert logits.shape[-1] == len(keep)
    assert max_diff_on_tokens(logits, ref["mlm_logits"][..., keep], ref["token_ids"]) < TOL


def test_nezha_unilm_source_sees_only_source_and_lm_is_causal():
    unilm = build_transformer_model(model="nezha", application="unilm", max_relative_position=3, **TINY)
    randomize(unilm, seed=5)
    tokens, segments = TOKENS[:1], SEGMENTS[:1]  # source = positions 0..2
    full = predict(unilm, [tokens, segments])[0]
    encoder = build_transformer_model(model="nezha", max_relative_position=3, **TINY)
    encoder.set_weights(unilm.get_weights())
    source_only = predict(encoder, [tokens[:, :3], segments[:, :3]])[0]
    np.testing.assert_allclose(full[0, :3], source_only[0], atol=1e-5)
    changed = tokens.copy()
    changed[0, 5] = 1  # a later target token
    other = predict(unilm, [changed, segments])[0]
    np.testing.assert_allclose(full[0, :5], other[0, :5], atol=1e-5)
    assert np.abs(full[0, 5:] - other[0, 5:]).max() > 1e-3

    lm = build_transformer_model(model="albert", application="lm", **TINY)
    randomize(lm, seed=6)
    a, b = predict(lm, [tokens, segments])[0], predict(lm, [changed, segments])[0]
    np.testing.assert_allclose(a[0, :5], b[0, :5], atol=1e-5)
    assert np.abs(a[0, 5:] - b[0, 5:]).max() > 1e-3


@pytest.mark.parametrize("family", ["albert", "nezha", "roformer", "roformer_v2"])
def test_cached_decoding_matches_full_pass(family):
    """Key/value-cached decoding (left-padded prompts) equals re-running the whole prefix."""
    from bert4keras.generation import IncrementalModel

    extra = {"max_relative_position": 2} if family == "nezha" else {}  # clipping inside the cache
    model = build_transformer_model(model=family, application="lm", with_mlm=True, **TINY, **extra)
    randomize(model, seed=7)
    prompts, fed = [[3, 9, 14, 2, 7], [4, 11, 6]], [[5, 8], [12, 1]]
    incremental = IncrementalModel(model)
    scores, state = incremental.prefill(prompts, max_length=8)
    cached = [scores]
    for t in range(2):
        scores, state = incremental.step([fed[0][t], fed[1][t]], state)
        cached.append(scores)
    for r in range(2):
        sequence = np.array([prompts[r] + fed[r]], "int32")
        full = predict(model, [sequence, np.zeros_like(sequence)])[0][0]
        for t in range(3):
            got = np.reshape(cached[t][r], -1)
            np.testing.assert_allclose(got, full[len(prompts[r]) - 1 + t], atol=1e-5)


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_application_lists_valid_ones(family):
    with pytest.raises(ValueError, match="'encoder', 'lm', 'unilm'"):
        build_transformer_model(model=family, application="seq2seq", **TINY)


def test_family_specific_errors(tmp_path):
    with pytest.raises(ValueError, match="with_discriminator"):
        build_transformer_model(model="electra", with_pool=True, **TINY)
    with pytest.raises(ValueError, match="roformer_v2 has no pooler"):
        build_transformer_model(model="roformer_v2", with_nsp=True, **TINY)
    with pytest.raises(ValueError, match="hierarchical_position"):
        build_transformer_model(model="nezha", hierarchical_position=True, **TINY)
    with pytest.raises(ValueError, match="custom_position_ids"):
        build_transformer_model(model="roformer", custom_position_ids=True, **TINY)
    with pytest.raises(ValueError, match="key size must be even"):
        build_transformer_model(model="roformer", **{**TINY, "hidden_size": 6})
    with pytest.raises(NotImplementedError, match="no RoFormer-v2"):
        build_transformer_model(model="roformer_v2", return_keras_model=False, **TINY).from_hf_weights({})
    albert = {"model_type": "albert", "hidden_size": 8, "num_hidden_groups": 2}
    (tmp_path / "config.json").write_text(json.dumps(albert))
    with pytest.raises(ValueError, match="num_hidden_groups=2 is not supported"):
        load_config(tmp_path / "config.json")
    roformer = {"model_type": "roformer", "hidden_size": 8, "rotary_value": True}
    (tmp_path / "config.json").write_text(json.dumps(roformer))
    with pytest.raises(ValueError, match="rotary_value=True"):
        load_config(str(tmp_path / "config.json"))
