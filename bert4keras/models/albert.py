"""ALBERT: BERT with factorised embeddings and one block shared by all layers.

`model='albert'` builds the shared block once (layers named
`Transformer-MultiHeadSelfAttention`, `Transformer-FeedForward`, ...) and calls
it num_hidden_layers times. `model='albert_unshared'` gives every layer its own
copy (`Transformer-{i}-...`), all loaded from the one shared block of the
checkpoint, so the copies can be fine-tuned apart.

Checkpoint names are those of Google's ALBERT release:
bert/encoder/transformer/group_0/inner_group_0/{attention_1/self/query,
attention_1/output/dense, LayerNorm, ffn_1/intermediate/dense,
ffn_1/intermediate/output/dense, LayerNorm_1}; embeddings bert/embeddings/...,
the factorised mapping bert/encoder/embedding_hidden_mapping_in and the MLM
head cls/predictions/... . HF `AlbertModel` / `AlbertForMaskedLM` /
`AlbertForPreTraining` safetensors are renamed to these.
"""
import re

import keras
import numpy as np

from bert4keras.models.base import linear_kernel
from bert4keras.models.bert import BERT, _dense, _norm, bert_hf_config

#: The one block of Google's ALBERT checkpoints (num_hidden_groups = inner_group_num = 1).
SHARED_SCOPE = "bert/encoder/transformer/group_0/inner_group_0"


class ALBERT(BERT):
    """ALBERT with its block shared across layers (as pretrained).

    embedding_mapping: apply `Embedding-Mapping` (embedding -> hidden Dense)
    even when embedding_size == hidden_size. Google's ALBERT has it only when
    the sizes differ; HF's always has it, so configs converted from HF set it.

    >>> model = ALBERT(vocab_size=100, embedding_size=8, hidden_size=16,
    ...                num_hidden_layers=2, num_attention_heads=2,
    ...                intermediate_size=32).build()
    >>> [l.name for l in model.layers if l.name.endswith("MultiHeadSelfAttention")]
    ['Transformer-MultiHeadSelfAttention']
    """

    def __init__(self, embedding_mapping=False, **kwargs):
        super().__init__(**kwargs)
        self.embedding_mapping = bool(embedding_mapping)

    def block_name(self, index):
        return "Transformer"

    def has_mapping(self):
        return self.embedding_mapping or self.embedding_size != self.hidden_size

    def apply_embeddings(self, inputs):
        x = super().apply_embeddings(inputs)
        if self.embedding_mapping and self.embedding_size == self.hidden_size:
            # BERT adds this Dense only when the sizes differ; HF ALBERT always has it.
            x = self.apply(
                x,
                keras.layers.Dense,
                units=self.hidden_size,
                kernel_initializer=self.initializer(),
                name="Embedding-Mapping",
            )
        return x

    def variable_mapping(self):
        mapping = super().variable_mapping()
        # Drop BERT's per-layer block names; the ALBERT block is mapped below.
        mapping = {k: v for k, v in mapping.items() if not k.startswith("Transformer-")}
        if self.has_mapping():
            mapping.update(_dense("Embedding-Mapping", f"{self.prefix}/encoder/embedding_hidden_mapping_in"))
        for layer in self.block_layer_names():
            mapping.update(albert_block_mapping(layer, SHARED_SCOPE))
        return mapping

    def block_layer_names(self):
        return ["Transformer"]

    def from_hf_weights(self, state):
        return albert_hf_to_google(state)

    def google_config(self):
        config = super().google_config()
        config["embedding_size"] = self.embedding_size
        if self.embedding_mapping and self.embedding_size == self.hidden_size:
            config["embedding_mapping"] = True
        return config


class ALBERTUnshared(ALBERT):
    """ALBERT with N independent blocks, each initialised from the shared one.

    Saving back to the Google layout (one block) requires the copies to be
    equal; after fine-tuning they are not, so save with `.weights.h5` instead.
    """

    def block_name(self, index):
        return f"Transformer-{index}"

    def block_layer_names(self):
        return [f"Transformer-{i}" for i in range(self.num_hidden_layers)]

    def checkpoint_tensors(self, mapping=None):
        mapping = mapping or self.variable_mapping()
        variables = {v.path: v for v in self.model.weights}
        tensors = {}
        for path, name in mapping.items():
            value = self.save_variable(name, keras.ops.convert_to_numpy(variables[path]))
            if name in tensors and not np.array_equal(tensors[name], value):
                raise ValueError(
                    f"albert_unshared: the layer copies of {name!r} differ (e.g. {path!r}), so "
                    "they cannot be saved as ALBERT's single shared block. Save with "
                    "model.save_weights('x.weights.h5') or model.save('x.keras') instead."
                )
            tensors[name] = value
        return tensors


def albert_block_mapping(layer, scope):
    """Keras paths of one block (layer name prefix `layer`) -> Google ALBERT names."""
    attention = f"{layer}-MultiHeadSelfAttention"
    feed_forward = f"{layer}-FeedForward"
    mapping = {}
    for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
        mapping.update(_dense(f"{attention}/{short}_dense", f"{scope}/attention_1/self/{name}"))
    mapping.update(_dense(f"{attention}/o_dense", f"{scope}/attention_1/output/dense"))
    mapping.update(_norm(f"{attention}-Norm", f"{scope}/LayerNorm"))
    mapping.update(_dense(f"{feed_forward}/i0_dense", f"{scope}/ffn_1/intermediate/dense"))
    mapping.update(_dense(f"{feed_forward}/o_dense", f"{scope}/ffn_1/intermediate/output/dense"))
    mapping.update(_norm(f"{feed_forward}-Norm", f"{scope}/LayerNorm_1"))
    return mapping


# HF AlbertLayer module -> Google scope inside group_0/inner_group_0.
_HF_ALBERT_BLOCK = {
    "attention.query": "attention_1/self/query",
    "attention.key": "attention_1/self/key",
    "attention.value": "attention_1/self/value",
    "attention.dense": "attention_1/output/dense",
    "attention.LayerNorm": "LayerNorm",
    "ffn": "ffn_1/intermediate/dense",
    "ffn_output": "ffn_1/intermediate/output/dense",
    "full_layer_layer_norm": "LayerNorm_1",
}


# Other HF modules with a Google scope of their own.
_HF_ALBERT_MODULES = {
    "encoder.embedding_hidden_mapping_in": "bert/encoder/embedding_hidden_mapping_in",
    "pooler": "bert/pooler/dense",
    "predictions.dense": "cls/predictions/transform/dense",
    "predictions.LayerNorm": "cls/predictions/transform/LayerNorm",
}


def _leaf(module_name, leaf, value):
    """Google leaf name and value of a HF Linear / LayerNorm parameter."""
    is_norm = "LayerNorm" in module_name or "layer_norm" in module_name
    if leaf == "weight":
        return ("gamma", value) if is_norm else ("kernel", linear_kernel(value))
    return ("beta" if is_norm else "bias"), value


def albert_hf_to_google(state):
    """HF ALBERT weights (`albert.` prefix optional) in Google ALBERT naming."""
    out = {}
    for name, value in state.items():
        name = re.sub(r"^albert\.", "", name)
        if name.endswith("position_ids") or name.startswith("predictions.decoder."):
            continue  # buffers, and the decoder tied to the word embeddings
        match = re.fullmatch(r"embeddings\.(word|position|token_type)_embeddings\.weight", name)
        if match:
            out[f"bert/embeddings/{match.group(1)}_embeddings"] = value
            continue
        if name.startswith("embeddings.LayerNorm."):
            leaf, value = _leaf("LayerNorm", name.rsplit(".", 1)[1], value)
            out[f"bert/embeddings/LayerNorm/{leaf}"] = value
            continue
        match = re.fullmatch(r"encoder\.albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if match:
            group, inner, module, leaf = match.groups()
            if module not in _HF_ALBERT_BLOCK:
                continue
            scope = f"bert/encoder/transformer/group_{group}/inner_group_{inner}/{_HF_ALBERT_BLOCK[module]}"
            leaf, value = _leaf(module, leaf, value)
            out[f"{scope}/{leaf}"] = value
            continue
        module, _, leaf = name.rpartition(".")
        if module in _HF_ALBERT_MODULES:
            leaf, value = _leaf(module, leaf, value)
            out[f"{_HF_ALBERT_MODULES[module]}/{leaf}"] = value
        elif name == "predictions.bias":
            out["cls/predictions/output_bias"] = value
        elif name == "sop_classifier.classifier.weight":
            out["cls/seq_relationship/output_weights"] = value  # (2, hidden), as Google stores it
        elif name == "sop_classifier.classifier.bias":
            out["cls/seq_relationship/output_bias"] = value
    return out


def albert_hf_config(config):
    """HF ALBERT config.json -> Google bert_config.json keys."""
    for key in ("num_hidden_groups", "inner_group_num"):
        if config.get(key, 1) != 1:
            raise ValueError(
                f"ALBERT with {key}={config[key]} is not supported: only the released layout "
                "with one shared block (num_hidden_groups = inner_group_num = 1)."
            )
    google = bert_hf_config(config)
    google["embedding_size"] = config.get("embedding_size", 128)
    google["hidden_act"] = config.get("hidden_act", "gelu_new")
    if google["embedding_size"] == google["hidden_size"]:
        google["embedding_mapping"] = True  # HF always has embedding_hidden_mapping_in
    return google
