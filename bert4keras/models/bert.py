"""BERT (and RoBERTa, which shares its layout): post-LN encoder with heads.

Layer names follow bert4keras, so scripts that pick layers by name port
unchanged: Embedding-Token, Embedding-Segment, Embedding-Position,
Embedding-Norm, Transformer-{i}-MultiHeadSelfAttention[-Norm],
Transformer-{i}-FeedForward[-Norm], Pooler-Dense, NSP-Proba, MLM-Dense,
MLM-Norm, MLM-Bias.
"""
import re

import keras

from bert4keras.layers import (
    BiasAdd,
    Embedding,
    FeedForward,
    LayerNormalization,
    MultiHeadAttention,
    PositionEmbedding,
    TakeToken,
)
from bert4keras.models.base import Transformer, linear_kernel


class BERT(Transformer):
    """BERT / RoBERTa.

    Outputs (as bert4keras): the last hidden states alone when no head is
    asked for; with one head, that head's output alone; with several, the
    list [pooled or NSP, MLM] in that order.

    Args beyond `Transformer`: segment_vocab_size (0 drops segment inputs),
    with_pool (True or an activation), with_nsp, with_mlm (True / 'softmax'
    gives probabilities, 'linear' logits), hierarchical_position,
    custom_position_ids.
    """

    def __init__(
        self,
        max_position=512,
        segment_vocab_size=2,
        with_pool=False,
        with_nsp=False,
        with_mlm=False,
        hierarchical_position=None,
        custom_position_ids=False,
        **kwargs,
    ):
        super().__init__(max_position=max_position, **kwargs)
        self.segment_vocab_size = segment_vocab_size
        self.with_pool = with_pool or with_nsp
        self.with_nsp = with_nsp
        self.with_mlm = with_mlm
        self.hierarchical_position = hierarchical_position
        self.custom_position_ids = custom_position_ids

    def get_inputs(self):
        inputs = [keras.Input((self.sequence_length,), dtype="int32", name="Input-Token")]
        if self.segment_vocab_size > 0:
            inputs.append(keras.Input((self.sequence_length,), dtype="int32", name="Input-Segment"))
        if self.custom_position_ids:
            inputs.append(keras.Input((self.sequence_length,), dtype="int32", name="Input-Position"))
        return inputs

    def apply_embeddings(self, inputs):
        token_ids = inputs[0]
        x = self.apply(
            token_ids,
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
        if self.absolute_positions:
            position_inputs = [x, inputs[-1]] if self.custom_position_ids else x
            x = self.apply(
                position_inputs,
                PositionEmbedding,
                input_dim=self.max_position,
                output_dim=self.embedding_size,
                merge_mode="add",
                hierarchical=self.hierarchical_position,
                embeddings_initializer=self.initializer(),
                custom_position_ids=self.custom_position_ids,
                name="Embedding-Position",
            )
        x = self.apply(x, LayerNormalization, epsilon=self.layer_norm_eps, name="Embedding-Norm")
        x = self.apply(x, keras.layers.Dropout, rate=self.dropout_rate, name="Embedding-Dropout")
        if self.embedding_size != self.hidden_size:
            x = self.apply(
                x,
                keras.layers.Dense,
                units=self.hidden_size,
                kernel_initializer=self.initializer(),
                name="Embedding-Mapping",
            )
        return x

    #: False drops the learned absolute position table (NEZHA, RoFormer).
    absolute_positions = True

    def attention_layer(self):
        """(attention layer class, extra constructor kwargs); NEZHA/RoFormer change it."""
        return MultiHeadAttention, {}

    def apply_main_layers(self, x, index):
        """Post-LN block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""
        attention = f"{self.block_name(index)}-MultiHeadSelfAttention"
        feed_forward = f"{self.block_name(index)}-FeedForward"
        attention_layer, attention_kwargs = self.attention_layer()
        y = self.apply(
            [x, x, x],
            attention_layer,
            arguments={"attention_mask": self.attention_mask},
            **attention_kwargs,
            heads=self.num_attention_heads,
            head_size=self.attention_head_size,
            key_size=self.attention_key_size,
            attention_dropout=self.attention_dropout_rate,
            kernel_initializer=self.initializer(),
            name=attention,
        )
        y = self.apply(y, keras.layers.Dropout, rate=self.dropout_rate, name=f"{attention}-Dropout")
        x = self.apply([x, y], keras.layers.Add, name=f"{attention}-Add")
        x = self.apply(x, LayerNormalization, epsilon=self.layer_norm_eps, name=f"{attention}-Norm")
        y = self.apply(
            x,
            FeedForward,
            units=self.intermediate_size,
            activation=self.hidden_act,
            kernel_initializer=self.initializer(),
            name=feed_forward,
        )
        y = self.apply(y, keras.layers.Dropout, rate=self.dropout_rate, name=f"{feed_forward}-Dropout")
        x = self.apply([x, y], keras.layers.Add, name=f"{feed_forward}-Add")
        x = self.apply(x, LayerNormalization, epsilon=self.layer_norm_eps, name=f"{feed_forward}-Norm")
        return x

    def apply_final_layers(self, x):
        outputs = [x]
        if self.with_pool:
            pooled = self.apply(x, TakeToken, index=0, name="Pooler")
            pool_activation = "tanh" if self.with_pool is True else self.with_pool
            pooled = self.apply(
                pooled,
                keras.layers.Dense,
                units=self.hidden_size,
                activation=pool_activation,
                kernel_initializer=self.initializer(),
                name="Pooler-Dense",
            )
            if self.with_nsp:
                pooled = self.apply(
                    pooled,
                    keras.layers.Dense,
                    units=2,
                    activation="softmax",
                    kernel_initializer=self.initializer(),
                    name="NSP-Proba",
                )
            outputs.append(pooled)
        if self.with_mlm:
            y = self.apply(
                x,
                keras.layers.Dense,
                units=self.embedding_size,
                activation=_activation(self.hidden_act),
                kernel_initializer=self.initializer(),
                name="MLM-Dense",
            )
            y = self.apply(y, LayerNormalization, epsilon=self.layer_norm_eps, name="MLM-Norm")
            y = self.apply(y, Embedding, arguments={"mode": "dense"}, name="Embedding-Token")
            y = self.apply(y, BiasAdd, name="MLM-Bias")
            mlm_activation = "softmax" if self.with_mlm is True else self.with_mlm
            y = self.apply(
                y, keras.layers.Activation, activation=mlm_activation, dtype="float32", name="MLM-Activation"
            )
            outputs.append(y)
        if len(outputs) == 1:
            return outputs[0]
        if len(outputs) == 2:
            return outputs[1]
        return outputs[1:]

    # -- checkpoint names ------------------------------------------------

    def vocab_variables(self):
        return (f"{self.prefix}/embeddings/word_embeddings", "cls/predictions/output_bias")

    def load_variable(self, checkpoint, name):
        value = super().load_variable(checkpoint, name)
        if name == "cls/seq_relationship/output_weights":
            value = value.T
        return value

    def save_variable(self, name, value):
        if name == "cls/seq_relationship/output_weights":
            value = value.T
        return value

    def variable_mapping(self):
        p = self.prefix
        mapping = {
            "Embedding-Token/embeddings": f"{p}/embeddings/word_embeddings",
            "Embedding-Norm/gamma": f"{p}/embeddings/LayerNorm/gamma",
            "Embedding-Norm/beta": f"{p}/embeddings/LayerNorm/beta",
        }
        if self.absolute_positions:
            mapping["Embedding-Position/embeddings"] = f"{p}/embeddings/position_embeddings"
        if self.segment_vocab_size > 0:
            mapping["Embedding-Segment/embeddings"] = f"{p}/embeddings/token_type_embeddings"
        if self.embedding_size != self.hidden_size:
            mapping.update(_dense("Embedding-Mapping", f"{p}/encoder/embedding_hidden_mapping_in"))
        for i in range(self.num_hidden_layers):
            mapping.update(self.block_mapping(f"Transformer-{i}", f"{p}/encoder/layer_{i}"))
        if self.with_pool:
            mapping.update(_dense("Pooler-Dense", f"{p}/pooler/dense"))
        if self.with_nsp:
            mapping["NSP-Proba/kernel"] = "cls/seq_relationship/output_weights"
            mapping["NSP-Proba/bias"] = "cls/seq_relationship/output_bias"
        if self.with_mlm:
            mapping.update(_dense("MLM-Dense", "cls/predictions/transform/dense"))
            mapping.update(_norm("MLM-Norm", "cls/predictions/transform/LayerNorm"))
            mapping["MLM-Bias/bias"] = "cls/predictions/output_bias"
        return mapping

    @staticmethod
    def block_mapping(layer, scope):
        """The variables of one encoder block; ALBERT maps every block to one scope."""
        attention = f"{layer}-MultiHeadSelfAttention"
        feed_forward = f"{layer}-FeedForward"
        mapping = {}
        for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
            mapping.update(_dense(f"{attention}/{short}_dense", f"{scope}/attention/self/{name}"))
        mapping.update(_dense(f"{attention}/o_dense", f"{scope}/attention/output/dense"))
        mapping.update(_norm(f"{attention}-Norm", f"{scope}/attention/output/LayerNorm"))
        mapping.update(_dense(f"{feed_forward}/i0_dense", f"{scope}/intermediate/dense"))
        mapping.update(_dense(f"{feed_forward}/o_dense", f"{scope}/output/dense"))
        mapping.update(_norm(f"{feed_forward}-Norm", f"{scope}/output/LayerNorm"))
        return mapping

    def from_hf_weights(self, state):
        return bert_hf_to_google(state, self.prefix)

    def google_config(self):
        return {**super().google_config(), "type_vocab_size": self.segment_vocab_size}


def _activation(name):
    from bert4keras.backend import get_activation

    return get_activation(name)


def _dense(path, scope):
    return {f"{path}/kernel": f"{scope}/kernel", f"{path}/bias": f"{scope}/bias"}


def _norm(path, scope):
    return {f"{path}/gamma": f"{scope}/gamma", f"{path}/beta": f"{scope}/beta"}


# HuggingFace -> Google names. Embedding tables keep their shape; Linear
# weights are (out, in) in PyTorch and become (in, out) kernels.
_HF_BERT_RULES = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight", r"embeddings/\1_embeddings"),
    (r"embeddings\.LayerNorm\.(weight|gamma)", "embeddings/LayerNorm/gamma"),
    (r"embeddings\.LayerNorm\.(bias|beta)", "embeddings/LayerNorm/beta"),
    (r"encoder\.layer\.(\d+)\.(.*)", r"encoder/layer_\1/\2"),
    (r"pooler\.dense\.(.*)", r"pooler/dense/\1"),
]


def _hf_leaf(name, value):
    """Renames a HF leaf (weight/bias of Linear or LayerNorm) the Google way."""
    name = name.replace(".", "/")
    if re.search(r"LayerNorm/(weight|gamma)$", name) or re.search(r"layer_norm/(weight|gamma)$", name):
        return re.sub(r"(weight|gamma)$", "gamma", name).replace("layer_norm", "LayerNorm"), value
    if re.search(r"LayerNorm/(bias|beta)$", name) or re.search(r"layer_norm/(bias|beta)$", name):
        return re.sub(r"(bias|beta)$", "beta", name).replace("layer_norm", "LayerNorm"), value
    if name.endswith("/weight"):
        return name[: -len("weight")] + "kernel", linear_kernel(value)
    return name, value


def bert_hf_to_google(state, prefix="bert", position_offset=None):
    """HF BertModel / BertForPreTraining / RobertaModel weights in Google naming.

    RoBERTa's HF position table starts at padding_idx + 1 = 2; those first two
    rows are dropped so position 0 is the first token, as in Google's layout.
    """
    is_roberta = any(k.startswith("roberta.") or k.startswith("lm_head.") for k in state)
    if position_offset is None:
        position_offset = 2 if is_roberta else 0
    out = {}
    for name, value in state.items():
        name = re.sub(r"^(bert|roberta|model)\.", "", name)
        if name.endswith("position_ids") or "decoder" in name:
            continue  # buffers, and the MLM decoder tied to the word embeddings
        if name in ("cls.predictions.bias", "lm_head.bias"):
            out["cls/predictions/output_bias"] = value
            continue
        if name.startswith("cls.seq_relationship."):
            leaf = "output_weights" if name.endswith("weight") else "output_bias"
            out[f"cls/seq_relationship/{leaf}"] = value
            continue
        if name.startswith(("cls.predictions.transform.", "lm_head.")):
            name = re.sub(r"^(cls\.predictions\.transform|lm_head)\.", "", name)
            name = name.replace("layer_norm", "LayerNorm")
            new, value = _hf_leaf(name, value)
            out[f"cls/predictions/transform/{new}"] = value
            continue
        for pattern, replacement in _HF_BERT_RULES:
            if re.fullmatch(pattern, name):
                name = re.sub(pattern, replacement, name)
                break
        else:
            continue  # heads of other tasks (classifiers etc.) are not part of the encoder
        if "embeddings/" in name and not name.startswith("embeddings/LayerNorm"):
            if name == "embeddings/position_embeddings":
                value = value[position_offset:]
            out[f"{prefix}/{name}"] = value
            continue
        if name.startswith("embeddings/LayerNorm"):
            out[f"{prefix}/{name}"] = value
            continue
        new, value = _hf_leaf(name, value)
        out[f"{prefix}/{new}"] = value
    return out


def bert_hf_config(config):
    """HF config.json (BERT/RoBERTa) -> bert_config.json keys."""
    google = {
        key: config[key]
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "hidden_act",
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "max_position_embeddings",
            "type_vocab_size",
            "initializer_range",
            "pad_token_id",
        )
        if key in config
    }
    google["layer_norm_eps"] = config.get("layer_norm_eps", 1e-12)
    if config.get("model_type") == "roberta":
        google["max_position_embeddings"] -= config.get("pad_token_id", 1) + 1
    return google
