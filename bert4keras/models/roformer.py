"""RoFormer and RoFormer-v2: BERT with rotary position embeddings.

`model='roformer'` is BERT with the position table replaced by the rotary
embedding of q and k (adjacent pairs (x[2i], x[2i+1]) rotated by
position * 10000^(-2i/d), `MultiHeadAttention(position_encoding='rotary')`).
Its checkpoints (RoFormer, RoFormer-Sim) use Google BERT names without
bert/embeddings/position_embeddings; HF `RoFormerModel` /
`RoFormerForMaskedLM` safetensors are renamed to those.

`model='roformer_v2'` drops every bias and replaces LayerNorm by a scale-free
RMS norm, x / sqrt(mean(x^2) + eps), applied after each residual (post-norm);
the FFN activation is the config's (relu in the released models) and the MLM
head is the tied embedding alone.
"""
import re

import keras

from bert4keras.layers import (
    Embedding,
    FeedForward,
    LayerNormalization,
    MultiHeadAttention,
)
from bert4keras.models.base import linear_kernel
from bert4keras.models.bert import BERT, bert_hf_config, bert_hf_to_google
from bert4keras.models.nezha import reject_absolute_position_options


class RoFormer(BERT):
    """RoFormer / RoFormer-Sim (rotary positions, BERT layout otherwise).

    >>> model = RoFormer(vocab_size=100, hidden_size=16, num_hidden_layers=1,
    ...                  num_attention_heads=2, intermediate_size=32).build()
    >>> model.get_layer("Transformer-0-MultiHeadSelfAttention").position_encoding
    'rotary'
    """

    absolute_positions = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        reject_absolute_position_options(self)
        if self.attention_key_size % 2:
            raise ValueError(
                f"Rotary positions rotate pairs of features: the per-head key size must be even, "
                f"got {self.attention_key_size}."
            )

    def attention_layer(self):
        return MultiHeadAttention, {"position_encoding": "rotary"}

    def from_hf_weights(self, state):
        return roformer_hf_to_google(state)


class RoFormerV2(RoFormer):
    """RoFormer-v2: rotary positions, no biases, scale-free RMS norm.

    Outputs the last hidden states, or with with_mlm the token probabilities
    (with_mlm='linear' gives logits) from the tied embedding. with_pool /
    with_nsp do not exist for this family.

    >>> model = RoFormerV2(vocab_size=100, hidden_size=16, num_hidden_layers=1,
    ...                    num_attention_heads=2, intermediate_size=32).build()
    >>> sorted({w.path.split("/")[-1] for w in model.weights})
    ['embeddings', 'kernel']
    """

    def __init__(self, hidden_act="relu", **kwargs):
        for option in ("with_pool", "with_nsp"):
            if kwargs.get(option):
                raise ValueError(f"roformer_v2 has no pooler / NSP head; drop {option}=.")
        super().__init__(hidden_act=hidden_act, **kwargs)

    def rms_norm(self, x, name):
        return self.apply(
            x, LayerNormalization, center=False, scale=False, epsilon=self.layer_norm_eps, name=name
        )

    def apply_embeddings(self, inputs):
        x = self.apply(
            inputs[0],
            Embedding,
            input_dim=self.vocab_size,
            output_dim=self.embedding_size,
            embeddings_initializer=self.initializer(),
            name="Embedding-Token",
        )
        if self.segment_vocab_size > 0:
            s = self.apply(
                inputs[1],
                Embedding,
                input_dim=self.segment_vocab_size,
                output_dim=self.embedding_size,
                embeddings_initializer=self.initializer(),
                name="Embedding-Segment",
            )
            x = self.apply([x, s], keras.layers.Add, name="Embedding-Token-Segment")
        x = self.apply(x, keras.layers.Dropout, rate=self.dropout_rate, name="Embedding-Dropout")
        x = self.rms_norm(x, "Embedding-Norm")
        if self.embedding_size != self.hidden_size:
            x = self.apply(
                x,
                keras.layers.Dense,
                units=self.hidden_size,
                use_bias=False,
                kernel_initializer=self.initializer(),
                name="Embedding-Mapping",
            )
        return x

    def apply_main_layers(self, x, index):
        """x = RMS(x + Attn(x)); x = RMS(x + FFN(x)), all without biases."""
        attention = f"Transformer-{index}-MultiHeadSelfAttention"
        feed_forward = f"Transformer-{index}-FeedForward"
        y = self.apply(
            [x, x, x],
            MultiHeadAttention,
            arguments={"attention_mask": self.attention_mask},
            heads=self.num_attention_heads,
            head_size=self.attention_head_size,
            key_size=self.attention_key_size,
            use_bias=False,
            position_encoding="rotary",
            attention_dropout=self.attention_dropout_rate,
            kernel_initializer=self.initializer(),
            name=attention,
        )
        y = self.apply(y, keras.layers.Dropout, rate=self.dropout_rate, name=f"{attention}-Dropout")
        x = self.apply([x, y], keras.layers.Add, name=f"{attention}-Add")
        x = self.rms_norm(x, f"{attention}-Norm")
        y = self.apply(
            x,
            FeedForward,
            units=self.intermediate_size,
            activation=self.hidden_act,
            use_bias=False,
            kernel_initializer=self.initializer(),
            name=feed_forward,
        )
        y = self.apply(y, keras.layers.Dropout, rate=self.dropout_rate, name=f"{feed_forward}-Dropout")
        x = self.apply([x, y], keras.layers.Add, name=f"{feed_forward}-Add")
        return self.rms_norm(x, f"{feed_forward}-Norm")

    def apply_final_layers(self, x):
        if not self.with_mlm:
            return x
        if self.embedding_size != self.hidden_size:
            x = self.apply(
                x,
                keras.layers.Dense,
                units=self.embedding_size,
                use_bias=False,
                kernel_initializer=self.initializer(),
                name="Output-Mapping",
            )
        x = self.apply(x, keras.layers.Dropout, rate=self.dropout_rate, name="Output-MLM-Dropout")
        x = self.apply(x, Embedding, arguments={"mode": "dense"}, name="Embedding-Token")
        activation = "softmax" if self.with_mlm is True else self.with_mlm
        return self.apply(
            x, keras.layers.Activation, activation=activation, dtype="float32", name="Output-MLM-Activation"
        )

    def vocab_variables(self):
        return (f"{self.prefix}/embeddings/word_embeddings",)

    def variable_mapping(self):
        p = self.prefix
        mapping = {"Embedding-Token/embeddings": f"{p}/embeddings/word_embeddings"}
        if self.segment_vocab_size > 0:
            mapping["Embedding-Segment/embeddings"] = f"{p}/embeddings/token_type_embeddings"
        if self.embedding_size != self.hidden_size:
            mapping["Embedding-Mapping/kernel"] = f"{p}/encoder/embedding_hidden_mapping_in/kernel"
            if self.with_mlm:
                # The hidden -> embedding projection sits where BERT's MLM dense does.
                mapping["Output-Mapping/kernel"] = "cls/predictions/transform/dense/kernel"
        for i in range(self.num_hidden_layers):
            block = self.block_mapping(f"Transformer-{i}", f"{p}/encoder/layer_{i}")
            mapping.update({k: v for k, v in block.items() if k.endswith("/kernel")})
        return mapping

    def from_hf_weights(self, state):
        raise NotImplementedError(
            "HF transformers has no RoFormer-v2; load a Google-format checkpoint (bert_model.ckpt)."
        )


def roformer_hf_to_google(state):
    """HF RoFormer weights in Google BERT naming (no position table)."""
    renamed = {}
    for name, value in state.items():
        name = re.sub(r"^roformer\.", "bert.", name)
        if name.endswith("embed_positions.weight"):
            continue  # the fixed sinusoid of the rotary positions, not a weight
        renamed[name] = value
    out = bert_hf_to_google(renamed, "bert", position_offset=0)
    # HF's embeddings_project is the embedding -> hidden Dense of BERT's layout.
    scope = "bert/encoder/embedding_hidden_mapping_in"
    for prefix in ("bert.", ""):
        if f"{prefix}embeddings_project.weight" in renamed:
            out[f"{scope}/kernel"] = linear_kernel(renamed[f"{prefix}embeddings_project.weight"])
            out[f"{scope}/bias"] = renamed[f"{prefix}embeddings_project.bias"]
    return out


def roformer_hf_config(config):
    """HF RoFormer config.json -> Google bert_config.json keys."""
    if config.get("rotary_value"):
        raise ValueError(
            "RoFormer with rotary_value=True (rotary positions applied to the values too) "
            "is not supported."
        )
    google = bert_hf_config(config)
    if config.get("embedding_size"):
        google["embedding_size"] = config["embedding_size"]
    return google
