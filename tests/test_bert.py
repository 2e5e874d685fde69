"""BERT / RoBERTa: real-weight equivalence with HF transformers, heads, round trips, errors.

References are HF transformers (PyTorch) outputs saved by
tests/fixtures/make_bert_fixtures.py; tolerance 1e-4 max abs on real tokens.
"""
import json
import os
import shutil

import keras
import numpy as np
import pytest

from bert4keras import build_transformer_model, save_weights_as_checkpoint
from bert4keras.checkpoints import read_safetensors, save_tf_checkpoint
from bert4keras.convert import convert_hf_to_google

TOL = 1e-4


def load_npz(fixtures_dir, name):
    return dict(np.load(os.path.join(fixtures_dir, name)))


def max_diff_on_tokens(a, b, token_ids, pad_id=0):
    mask = token_ids != pad_id
    return np.abs(a - b)[mask].max()


def test_minilm_safetensors_matches_hf(minilm_path, fixtures_dir):
    ref = load_npz(fixtures_dir, "minilm_reference.npz")
    model = build_transformer_model(minilm_path, minilm_path)
    out = model.predict([ref["token_ids"], ref["segment_ids"]], verbose=0)
    assert max_diff_on_tokens(out, ref["last_hidden"], ref["token_ids"]) < TOL


def test_minilm_google_conversion_matches_hf(minilm_path, fixtures_dir, tmp_path):
    ref = load_npz(fixtures_dir, "minilm_reference.npz")
    prefix = convert_hf_to_google(minilm_path, tmp_path / "google")
    assert os.path.exists(tmp_path / "google" / "vocab.txt")
    model = build_transformer_model(tmp_path / "google" / "bert_config.json", prefix)
    out = model.predict([ref["token_ids"], ref["segment_ids"]], verbose=0)
    assert max_diff_on_tokens(out, ref["last_hidden"], ref["token_ids"]) < TOL


def test_convert_command_line(minilm_path, tmp_path):
    from bert4keras.convert import main

    main([minilm_path, str(tmp_path / "out")])
    with open(tmp_path / "out" / "bert_config.json") as f:
        assert json.load(f)["num_hidden_layers"] == 6
    assert os.path.exists(tmp_path / "out" / "bert_model.ckpt.index")


@pytest.mark.parametrize("source", ["safetensors", "google"])
def test_tiny_bert_heads_match_hf(fixtures_dir, tmp_path, source):
    ref = load_npz(fixtures_dir, "bert_tiny.npz")
    folder = os.path.join(fixtures_dir, "bert_tiny")
    config, checkpoint = folder, folder
    if source == "google":
        checkpoint = convert_hf_to_google(folder, tmp_path)
        config = tmp_path / "bert_config.json"
    model = build_transformer_model(config, checkpoint, with_pool=True, with_nsp=True, with_mlm="linear")
    inputs = [ref["token_ids"], ref["segment_ids"]]
    nsp, mlm = model.predict(inputs, verbose=0)
    assert np.abs(nsp - ref["nsp_probas"]).max() < TOL
    assert max_diff_on_tokens(mlm, ref["mlm_logits"], ref["token_ids"]) < TOL
    encoder = build_transformer_model(config, checkpoint)
    hidden = encoder.predict(inputs, verbose=0)
    assert max_diff_on_tokens(hidden, ref["last_hidden"], ref["token_ids"]) < TOL
    pooler = build_transformer_model(config, checkpoint, with_pool=True)
    assert np.abs(pooler.predict(inputs, verbose=0) - ref["pooled"]).max() < TOL


def test_tiny_roberta_matches_hf(fixtures_dir, tmp_path):
    ref = load_npz(fixtures_dir, "roberta_tiny.npz")
    folder = os.path.join(fixtures_dir, "roberta_tiny")
    for config, checkpoint in [
        (folder, folder),
        (tmp_path / "bert_config.json", convert_hf_to_google(folder, tmp_path)),
    ]:
        model = build_transformer_model(config, checkpoint, model="roberta", with_mlm="linear")
        assert model.bert4keras.pad_token_id == 1
        hidden_model = build_transformer_model(config, checkpoint, model="roberta")
        inputs = [ref["token_ids"], ref["segment_ids"]]
        mlm = model.predict(inputs, verbose=0)
        hidden = hidden_model.predict(inputs, verbose=0)
        assert max_diff_on_tokens(hidden, ref["last_hidden"], ref["token_ids"], pad_id=1) < TOL
        assert max_diff_on_tokens(mlm, ref["mlm_logits"], ref["token_ids"], pad_id=1) < TOL


def test_mapping_covers_every_weight(fixtures_dir):
    folder = os.path.join(fixtures_dir, "bert_tiny")
    model = build_transformer_model(folder, None, with_nsp=True, with_mlm=True)
    mapping = model.bert4keras.variable_mapping()
    assert set(mapping) == {w.path for w in model.weights}


def tiny_config(tmp_path, **overrides):
    config = {
        "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 24, "hidden_act": "gelu", "max_position_embeddings": 32,
        "type_vocab_size": 2, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    }
    config.update(overrides)
    path = tmp_path / "bert_config.json"
    path.write_text(json.dumps(config))
    return path


def sample_inputs(vocab=50, batch=3, length=9, seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, vocab, size=(batch, length)).astype("int32")
    token_ids[1, 6:] = 0
    segment_ids = np.zeros_like(token_ids)
    segment_ids[:, 5:] = 1
    segment_ids[1, 6:] = 0
    return token_ids, segment_ids


@pytest.mark.parametrize("kwargs", [{}, {"with_pool": True, "with_mlm": True}])
def test_save_and_reload_round_trips(tmp_path, kwargs):
    model = build_transformer_model(tiny_config(tmp_path), return_keras_model=False, **kwargs)
    inputs = list(sample_inputs())
    expected = model.model.predict(inputs, verbose=0)
    expected = expected if isinstance(expected, list) else [expected]

    def same(other):
        got = other.predict(inputs, verbose=0)
        got = got if isinstance(got, list) else [got]
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)

    model.model.save(tmp_path / "model.keras")
    same(keras.models.load_model(tmp_path / "model.keras"))

    model.model.save_weights(tmp_path / "model.weights.h5")
    fresh = build_transformer_model(tiny_config(tmp_path), **kwargs)
    fresh.load_weights(tmp_path / "model.weights.h5")
    same(fresh)

    prefix = save_weights_as_checkpoint(model.model, str(tmp_path / "ckpt" / "bert_model.ckpt"))
    reloaded = build_transformer_model(tmp_path / "ckpt" / "bert_config.json", prefix, **kwargs)
    same(reloaded)


def test_keep_tokens_and_compound_tokens(fixtures_dir):
    folder = os.path.join(fixtures_dir, "bert_tiny")
    state = read_safetensors(os.path.join(folder, "model.safetensors"))
    table = state["bert.embeddings.word_embeddings.weight"]
    bias = state["cls.predictions.bias"]
    # compound ids index the kept vocabulary; (ids, weights) gives a weighted mean.
    keep, compound = [0, 5, 7, 3], [[1, 2], ([0, 1, 3], [1.0, 2.0, 1.0])]
    model = build_transformer_model(
        folder, folder, with_mlm=True, keep_tokens=keep, compound_tokens=compound
    )
    weights = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}
    kept, kept_bias = table[keep], bias[keep]
    weighted = (kept[0] + 2 * kept[1] + kept[3]) / 4
    expected = np.concatenate([kept, [kept[[1, 2]].mean(0), weighted]])
    np.testing.assert_allclose(weights["Embedding-Token/embeddings"], expected, rtol=1e-6)
    np.testing.assert_allclose(
        weights["MLM-Bias/bias"],
        np.concatenate([kept_bias, [kept_bias[[1, 2]].mean(), (kept_bias[0] + 2 * kept_bias[1] + kept_bias[3]) / 4]]),
        rtol=1e-6,
    )
    assert model.output.shape[-1] == len(keep) + len(compound)


def test_compound_tokens_with_chosen_embeddings(fixtures_dir):
    folder = os.path.join(fixtures_dir, "bert_tiny")
    state = read_safetensors(os.path.join(folder, "model.safetensors"))
    table = state["bert.embeddings.word_embeddings.weight"]
    bias = state["cls.predictions.bias"]
    vector = np.linspace(-1, 1, table.shape[1]).astype("float32")
    model = build_transformer_model(folder, folder, with_mlm=True, compound_tokens=[[4], vector])
    weights = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}
    np.testing.assert_allclose(weights["Embedding-Token/embeddings"][-2:], [table[4], vector], rtol=1e-6)
    # The MLM bias of an explicitly embedded token starts at the mean bias.
    np.testing.assert_allclose(weights["MLM-Bias/bias"][-2:], [bias[4], bias.mean()], rtol=1e-5)

    with pytest.raises(ValueError, match=r"shape \(3,\).*length %d" % table.shape[1]):
        build_transformer_model(folder, folder, compound_tokens=[np.ones(3, "float32")])
    with pytest.raises(ValueError, match="not a list of token ids"):
        build_transformer_model(folder, folder, compound_tokens=[[len(table)]])


def test_lm_application_is_causal(tmp_path):
    model = build_transformer_model(tiny_config(tmp_path), application="lm")
    token_ids, segment_ids = sample_inputs()
    changed = token_ids.copy()
    changed[:, 4:] = (changed[:, 4:] % 49) + 1  # change the future only (rows keep their padding length)
    changed[1, 6:] = 0
    a = model.predict([token_ids, segment_ids], verbose=0)
    b = model.predict([changed, segment_ids], verbose=0)
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert np.abs(a[0, 4:] - b[0, 4:]).max() > 1e-3


def test_unilm_application_masks_by_segment(tmp_path):
    model = build_transformer_model(tiny_config(tmp_path), application="unilm")
    token_ids, segment_ids = sample_inputs()
    # Changing target token 7 must not change the source (0..4) nor target positions 5, 6.
    changed = token_ids.copy()
    changed[[0, 2], 7] = (changed[[0, 2], 7] % 49) + 1
    a = model.predict([token_ids, segment_ids], verbose=0)
    b = model.predict([changed, segment_ids], verbose=0)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    # ... whereas changing a source token changes every position (bidirectional source).
    changed = token_ids.copy()
    changed[:, 4] = (changed[:, 4] % 49) + 1
    c = model.predict([changed, segment_ids], verbose=0)
    assert np.abs(a[0, :4] - c[0, :4]).max() > 1e-3


def test_padding_does_not_change_real_tokens(tmp_path):
    model = build_transformer_model(tiny_config(tmp_path))
    token_ids, segment_ids = sample_inputs()
    short = model.predict([token_ids[1:2, :6], segment_ids[1:2, :6]], verbose=0)
    batched = model.predict([token_ids, segment_ids], verbose=0)
    np.testing.assert_allclose(short[0], batched[1, :6], atol=1e-5)


def test_mixed_bfloat16_runs_and_masks(tmp_path):
    float_model = build_transformer_model(tiny_config(tmp_path), return_keras_model=False)
    prefix = float_model.save_weights_as_checkpoint(str(tmp_path / "ckpt" / "bert_model.ckpt"))
    token_ids, segment_ids = sample_inputs()
    expected = float_model.model.predict([token_ids, segment_ids], verbose=0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_transformer_model(tiny_config(tmp_path), prefix)
    out = keras.ops.convert_to_numpy(keras.ops.cast(model([token_ids, segment_ids]), "float32"))
    short = keras.ops.cast(model([token_ids[1:2, :6], segment_ids[1:2, :6]]), "float32")
    assert np.abs(out - expected).max() < 0.1  # bf16 has ~3 significant digits
    np.testing.assert_allclose(keras.ops.convert_to_numpy(short)[0], out[1, :6], atol=0.05)


@pytest.mark.parametrize("dtype, weight_dtype", [("bfloat16", "bfloat16"), ("mixed_bfloat16", "float32")])
def test_dtype_argument_sets_this_model_policy_only(tmp_path, dtype, weight_dtype):
    float_model = build_transformer_model(tiny_config(tmp_path), return_keras_model=False)
    prefix = float_model.save_weights_as_checkpoint(str(tmp_path / "ckpt" / "bert_model.ckpt"))
    token_ids, segment_ids = sample_inputs()
    expected = float_model.model.predict([token_ids, segment_ids], verbose=0)
    model = build_transformer_model(tiny_config(tmp_path), prefix, dtype=dtype)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left alone
    assert {v.dtype for v in model.weights} == {weight_dtype}
    out = keras.ops.convert_to_numpy(keras.ops.cast(model([token_ids, segment_ids]), "float32"))
    dense_layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dense)]
    assert dense_layers and {layer.compute_dtype for layer in dense_layers} == {"bfloat16"}
    # last hidden states (layer-normalised, mean |value| ~0.8); bf16 keeps ~3 significant digits
    assert np.abs(out - expected).mean() < 0.02 and np.abs(out - expected).max() < 0.1
    short = keras.ops.cast(model([token_ids[1:2, :6], segment_ids[1:2, :6]]), "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(short)[0], out[1, :6], atol=0.05)
    # a model built afterwards without dtype= is float32 again
    assert {v.dtype for v in build_transformer_model(tiny_config(tmp_path)).weights} == {"float32"}


def test_dropout_only_in_training(tmp_path):
    model = build_transformer_model(tiny_config(tmp_path))
    inputs = [keras.ops.convert_to_tensor(x) for x in sample_inputs()]
    a = keras.ops.convert_to_numpy(model(inputs, training=False))
    b = keras.ops.convert_to_numpy(model(inputs, training=False))
    c = keras.ops.convert_to_numpy(model(inputs, training=True))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


# -- bad input ----------------------------------------------------------------


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_transformer_model(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        build_transformer_model(tiny_config(tmp_path), tmp_path / "missing.ckpt")


def test_unknown_model_application_and_argument(tmp_path):
    with pytest.raises(ValueError, match="valid: .*bert"):
        build_transformer_model(tiny_config(tmp_path), model="bret")
    with pytest.raises(ValueError, match="'encoder', 'lm', 'unilm'"):
        build_transformer_model(tiny_config(tmp_path), application="seq2seq")
    with pytest.raises(TypeError, match="with_poll"):
        build_transformer_model(tiny_config(tmp_path), with_poll=True)


def test_missing_variable_is_named_and_can_be_ignored(tmp_path):
    transformer = build_transformer_model(tiny_config(tmp_path), return_keras_model=False)
    tensors = transformer.checkpoint_tensors()
    del tensors["bert/encoder/layer_1/output/dense/bias"]
    save_tf_checkpoint(str(tmp_path / "partial" / "model.ckpt"), tensors)
    with pytest.raises(KeyError, match="bert/encoder/layer_1/output/dense/bias.*ignore_invalid_weights"):
        build_transformer_model(tiny_config(tmp_path), tmp_path / "partial" / "model.ckpt")
    build_transformer_model(
        tiny_config(tmp_path), tmp_path / "partial" / "model.ckpt", ignore_invalid_weights=True
    )


def test_shape_mismatch_names_variable_and_shapes(tmp_path):
    transformer = build_transformer_model(tiny_config(tmp_path), return_keras_model=False)
    prefix = transformer.save_weights_as_checkpoint(str(tmp_path / "ckpt" / "model.ckpt"), write_config=False)
    with pytest.raises(ValueError, match=r"bert/encoder/layer_0/intermediate/dense/kernel.*\(16, 24\).*\(16, 30\)"):
        build_transformer_model(tiny_config(tmp_path, intermediate_size=30), prefix)


def test_too_long_input_is_a_clear_error(tmp_path):
    model = build_transformer_model(tiny_config(tmp_path))
    ids = np.ones((1, 40), "int32")
    with pytest.raises(Exception, match="max_position"):
        model.predict([ids, ids * 0], verbose=0)


def test_hierarchical_position_extends_length(tmp_path):
    model = build_transformer_model(tiny_config(tmp_path), hierarchical_position=True)
    ids = np.ones((1, 40), "int32")
    assert model.predict([ids, ids * 0], verbose=0).shape == (1, 40, 16)


def test_hf_and_google_folders_without_weights(tmp_path):
    os.makedirs(tmp_path / "empty")
    shutil.copy(tiny_config(tmp_path), tmp_path / "empty" / "bert_config.json")
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        build_transformer_model(tmp_path / "empty", tmp_path / "empty")
