"""GPT, GPT-2 and GPT2-ML: left-to-right language models with a tied LM head.

    model='gpt'      BERT's post-LN block under a causal mask; token +
                     position (+ optional segment) embeddings with no
                     embedding LayerNorm. Checkpoint names under `gpt/`.
    model='gpt2'     OpenAI GPT-2: pre-LN blocks and a final LayerNorm. Reads
                     HF GPT-2 safetensors. Checkpoint names under `gpt2/`.
    model='gpt2_ml'  the GPT2-ML Chinese release: embedding LayerNorm, an
                     attention residual without a norm, then
                     LN -> FFN -> add -> LN. Checkpoint names under `newslm/`.

All three are language models only (`application='lm'`, their default;
any other application is an error). Outputs: with_lm=True or 'softmax' gives
next-token probabilities, 'linear' logits, False the last hidden states.
The configs of these releases say `hidden_act: "gelu"` while their code
computes the tanh approximation, so 'gelu' is read as 'gelu_new' here; pass
hidden_act='gelu_erf' for the erf form.

Layer names (bert4keras): Input-Token, Input-Segment, Embedding-Token,
Embedding-Segment, Embedding-Position, Embedding-Norm (gpt2_ml),
Transformer-{i}-MultiHeadSelfAttention[-Norm],
Transformer-{i}-FeedForward[-Norm] (gpt2_ml: -Norm-0 and -Norm-1),
Output-Norm (gpt2), LM-Activation.

Checkpoint (Google layout) names of gpt2, with the HF GPT-2 tensor each
comes from:

    gpt2/embeddings/word_embeddings                       wte
    gpt2/embeddings/position_embeddings                   wpe
    gpt2/transformer/layer_{i}/attention/input/LayerNorm/{gamma,beta}       h.{i}.ln_1
    gpt2/transformer/layer_{i}/attention/self/{query,key,value}/{kernel,bias}
                                                          h.{i}.attn.c_attn (split in 3)
    gpt2/transformer/layer_{i}/attention/output/dense/{kernel,bias}         h.{i}.attn.c_proj
    gpt2/transformer/layer_{i}/input/LayerNorm/{gamma,beta}                 h.{i}.ln_2
    gpt2/transformer/layer_{i}/intermediate/dense/{kernel,bias}             h.{i}.mlp.c_fc
    gpt2/transformer/layer_{i}/output/dense/{kernel,bias}                   h.{i}.mlp.c_proj
    gpt2/output/LayerNorm/{gamma,beta}                    ln_f

gpt uses BERT's names with `bert/encoder/` replaced by `gpt/transformer/`.
"""
import re

import keras

from bert4keras.layers import (
    AttentionMask,
    Embedding,
    FeedForward,
    LayerNormalization,
    MultiHeadAttention,
    PositionEmbedding,
)
from bert4keras.models.bert import BERT, _dense, _norm


def tanh_gelu(activation):
    """'gelu' as these checkpoints' own code computed it: the tanh approximation."""
    if isinstance(activation, (list, tuple)):
        return [tanh_gelu(a) for a in activation]
    return "gelu_new" if activation == "gelu" else activation


class GPT(BERT):
    """GPT: BERT's post-LN encoder under a causal mask, with a tied LM head.

    Args beyond `Transformer`: with_lm (True / 'softmax', 'linear' or False),
    segment_vocab_size (default 0: no segment input),
    shared_segment_embeddings (look segment ids up in the token embedding,
    as dialogue GPTs that mark speakers with tokens do),
    hierarchical_position, custom_position_ids.

    >>> gpt = GPT(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...           num_attention_heads=2, intermediate_size=16)
    >>> tuple(gpt.build().output.shape)
    (None, None, 50)
    """

    applications = ("lm",)
    prefix = "gpt"

    def __init__(
        self,
        with_lm=True,
        segment_vocab_size=0,
        shared_segment_embeddings=False,
        application="lm",
        hidden_act="gelu",
        **kwargs,
    ):
        for head in ("with_pool", "with_nsp", "with_mlm"):
            if kwargs.pop(head, False):
                raise ValueError(
                    f"{type(self).__name__} has a language-model head only; {head} is not "
                    "available (use with_lm=True, 'linear' or False)."
                )
        super().__init__(
            segment_vocab_size=segment_vocab_size,
            application=application,
            hidden_act=tanh_gelu(hidden_act),
            **kwargs,
        )
        if self.embedding_size != self.hidden_size:
            raise ValueError(
                f"{type(self).__name__} ties its LM head to the token embedding, so "
                f"embedding_size ({self.embedding_size}) must equal hidden_size "
                f"({self.hidden_size})."
            )
        self.with_lm = with_lm
        # The LM head plays the part of BERT's MLM head; cached decoding
        # (bert4keras.generation) reads with_mlm to tell logits from probabilities.
        self.with_mlm = with_lm
        self.shared_segment_embeddings = shared_segment_embeddings

    def apply_embeddings(self, inputs):
        """Token + position (+ segment) embeddings, with no LayerNorm after them."""
        token_ids = inputs[0]
        x = self.apply(
            token_ids,
            Embedding,
            input_dim=self.vocab_size,
            output_dim=self.hidden_size,
            embeddings_initializer=self.initializer(),
            name="Embedding-Token",
        )
        if self.segment_vocab_size > 0:
            name = "Embedding-Token" if self.shared_segment_embeddings else "Embedding-Segment"
            s = self.apply(
                inputs[1],
                Embedding,
                input_dim=self.segment_vocab_size,
                output_dim=self.hidden_size,
                embeddings_initializer=self.initializer(),
                name=name,
            )
            x = self.apply([x, s], keras.layers.Add, name="Embedding-Token-Segment")
        x = self.apply_position_embedding(x, inputs)
        return self.apply(x, keras.layers.Dropout, rate=self.dropout_rate, name="Embedding-Dropout")

    def apply_position_embedding(self, x, inputs):
        return self.apply(
            [x, inputs[-1]] if self.custom_position_ids else x,
            PositionEmbedding,
            input_dim=self.max_position,
            output_dim=self.hidden_size,
            merge_mode="add",
            hierarchical=self.hierarchical_position,
            embeddings_initializer=self.initializer(),
            custom_position_ids=self.custom_position_ids,
            name="Embedding-Position",
        )

    def apply_final_layers(self, x):
        """The LM head: hidden states times the transposed token embedding."""
        if not self.with_lm:
            return x
        x = self.apply(x, Embedding, arguments={"mode": "dense"}, name="Embedding-Token")
        activation = "softmax" if self.with_lm is True else self.with_lm
        return self.apply(
            x, keras.layers.Activation, activation=activation, dtype="float32", name="LM-Activation"
        )

    # -- checkpoint names ------------------------------------------------

    def vocab_variables(self):
        return (f"{self.prefix}/embeddings/word_embeddings",)

    def variable_mapping(self):
        p = self.prefix
        mapping = {
            "Embedding-Token/embeddings": f"{p}/embeddings/word_embeddings",
            "Embedding-Position/embeddings": f"{p}/embeddings/position_embeddings",
        }
        if self.segment_vocab_size > 0 and not self.shared_segment_embeddings:
            mapping["Embedding-Segment/embeddings"] = f"{p}/embeddings/token_type_embeddings"
        for i in range(self.num_hidden_layers):
            mapping.update(self.block_mapping(f"Transformer-{i}", f"{p}/transformer/layer_{i}"))
        return mapping

    def from_hf_weights(self, state):
        raise NotImplementedError(
            f"{type(self).__name__} reads Google-format checkpoints only; HF GPT-2 "
            "safetensors load with model='gpt2'."
        )

    def google_config(self):
        config = super().google_config()
        if self.shared_segment_embeddings:
            config["shared_segment_embeddings"] = True
        return config


class GPT2(GPT):
    """GPT-2: pre-LN blocks (LN -> attention -> add, LN -> FFN -> add), final LN.

    No segment embeddings, and no padding mask: id 0 is a real GPT-2 token,
    and right padding cannot reach earlier tokens through the causal mask.
    Reads HF `GPT2Model` / `GPT2LMHeadModel` safetensors.

    >>> gpt2 = GPT2(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...             num_attention_heads=2, intermediate_size=16, with_lm='linear')
    >>> tuple(gpt2.build().output.shape)
    (None, None, 50)
    """

    prefix = "gpt2"

    def __init__(self, layer_norm_eps=1e-5, hidden_act="gelu_new", pad_token_id=-1, **kwargs):
        # pad_token_id=-1 (the default) matches no token id: GPT-2 has no padding
        # token, and 0 is a real one. Batched decoding pads prompts with -1.
        if kwargs.get("segment_vocab_size"):
            raise ValueError("GPT-2 has no segment embeddings; leave segment_vocab_size at 0.")
        super().__init__(layer_norm_eps=layer_norm_eps, hidden_act=hidden_act, **kwargs)
        self.pad_token_id = -1 if pad_token_id is None else pad_token_id

    def compute_attention_mask(self, inputs):
        return self.apply(
            inputs[0], AttentionMask, application="lm", pad_id=self.pad_token_id, name="Attention-Mask"
        )

    def apply_main_layers(self, x, index):
        """Pre-LN block: x = x + Attn(LN(x)); x = x + FFN(LN(x))."""
        attention = f"Transformer-{index}-MultiHeadSelfAttention"
        feed_forward = f"Transformer-{index}-FeedForward"
        y = self.apply(x, LayerNormalization, epsilon=self.layer_norm_eps, name=f"{attention}-Norm")
        y = self.apply(
            [y, y, y],
            MultiHeadAttention,
            arguments={"attention_mask": self.attention_mask},
            heads=self.num_attention_heads,
            head_size=self.attention_head_size,
            key_size=self.attention_key_size,
            attention_dropout=self.attention_dropout_rate,
            kernel_initializer=self.initializer(),
            name=attention,
        )
        y = self.apply(y, keras.layers.Dropout, rate=self.dropout_rate, name=f"{attention}-Dropout")
        x = self.apply([x, y], keras.layers.Add, name=f"{attention}-Add")
        y = self.apply(x, LayerNormalization, epsilon=self.layer_norm_eps, name=f"{feed_forward}-Norm")
        y = self.apply(
            y,
            FeedForward,
            units=self.intermediate_size,
            activation=self.hidden_act,
            kernel_initializer=self.initializer(),
            name=feed_forward,
        )
        y = self.apply(y, keras.layers.Dropout, rate=self.dropout_rate, name=f"{feed_forward}-Dropout")
        return self.apply([x, y], keras.layers.Add, name=f"{feed_forward}-Add")

    def apply_final_layers(self, x):
        x = self.apply(x, LayerNormalization, epsilon=self.layer_norm_eps, name="Output-Norm")
        x = self.apply(x, keras.layers.Dropout, rate=self.dropout_rate, name="Output-Dropout")
        return super().apply_final_layers(x)

    def variable_mapping(self):
        mapping = super().variable_mapping()
        mapping.update(_norm("Output-Norm", f"{self.prefix}/output/LayerNorm"))
        return mapping

    @staticmethod
    def block_mapping(layer, scope):
        attention = f"{layer}-MultiHeadSelfAttention"
        feed_forward = f"{layer}-FeedForward"
        mapping = _norm(f"{attention}-Norm", f"{scope}/attention/input/LayerNorm")
        for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
            mapping.update(_dense(f"{attention}/{short}_dense", f"{scope}/attention/self/{name}"))
        mapping.update(_dense(f"{attention}/o_dense", f"{scope}/attention/output/dense"))
        mapping.update(_norm(f"{feed_forward}-Norm", f"{scope}/input/LayerNorm"))
        mapping.update(_dense(f"{feed_forward}/i0_dense", f"{scope}/intermediate/dense"))
        mapping.update(_dense(f"{feed_forward}/o_dense", f"{scope}/output/dense"))
        return mapping

    def from_hf_weights(self, state):
        return gpt2_hf_to_google(state, self.prefix)


class GPT2_ML(GPT):
    """GPT2-ML: LN(token + position); per block x = x + Attn(x), then
    x = LN1(x + FFN(LN0(x))). Names follow the released `newslm/` checkpoint.

    >>> ml = GPT2_ML(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...              num_attention_heads=2, intermediate_size=16)
    >>> tuple(ml.build().output.shape)
    (None, None, 50)
    """

    prefix = "newslm"

    def __init__(self, layer_norm_eps=1e-5, **kwargs):
        if kwargs.get("segment_vocab_size"):
            raise ValueError("GPT2-ML has no segment embeddings; leave segment_vocab_size at 0.")
        super().__init__(layer_norm_eps=layer_norm_eps, **kwargs)

    def apply_position_embedding(self, x, inputs):
        x = super().apply_position_embedding(x, inputs)
        return self.apply(x, LayerNormalization, epsilon=self.layer_norm_eps, name="Embedding-Norm")

    def apply_main_layers(self, x, index):
        attention = f"Transformer-{index}-MultiHeadSelfAttention"
        feed_forward = f"Transformer-{index}-FeedForward"
        y = self.apply(
            [x, x, x],
            MultiHeadAttention,
            arguments={"attention_mask": self.attention_mask},
            heads=self.num_attention_heads,
            head_size=self.attention_head_size,
            key_size=self.attention_key_size,
            attention_dropout=self.attention_dropout_rate,
            kernel_initializer=self.initializer(),
            name=attention,
        )
        y = self.apply(y, keras.layers.Dropout, rate=self.dropout_rate, name=f"{attention}-Dropout")
        x = self.apply([x, y], keras.layers.Add, name=f"{attention}-Add")
        y = self.apply(x, LayerNormalization, epsilon=self.layer_norm_eps, name=f"{feed_forward}-Norm-0")
        y = self.apply(
            y,
            FeedForward,
            units=self.intermediate_size,
            activation=self.hidden_act,
            kernel_initializer=self.initializer(),
            name=feed_forward,
        )
        y = self.apply(y, keras.layers.Dropout, rate=self.dropout_rate, name=f"{feed_forward}-Dropout")
        x = self.apply([x, y], keras.layers.Add, name=f"{feed_forward}-Add")
        return self.apply(x, LayerNormalization, epsilon=self.layer_norm_eps, name=f"{feed_forward}-Norm-1")

    def vocab_variables(self):
        return ("newslm/embeddings/word_embed",)

    def variable_mapping(self):
        mapping = {
            "Embedding-Token/embeddings": "newslm/embeddings/word_embed",
            "Embedding-Position/embeddings": "newslm/embeddings/pos_embed",
            **_norm("Embedding-Norm", "newslm/embeddings/LayerNorm_embed_norm"),
        }
        for i in range(self.num_hidden_layers):
            scope = f"newslm/layer{i:02d}"
            attention = f"Transformer-{i}-MultiHeadSelfAttention"
            feed_forward = f"Transformer-{i}-FeedForward"
            for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
                mapping.update(_dense(f"{attention}/{short}_dense", f"{scope}/{name}_layer"))
            mapping.update(_dense(f"{attention}/o_dense", f"{scope}/context_projection_layer"))
            mapping.update(_norm(f"{feed_forward}-Norm-0", f"{scope}/LayerNorm_mlp_ln0"))
            mapping.update(_dense(f"{feed_forward}/i0_dense", f"{scope}/intermediate"))
            mapping.update(_dense(f"{feed_forward}/o_dense", f"{scope}/output"))
            mapping.update(_norm(f"{feed_forward}-Norm-1", f"{scope}/LayerNorm_mlp_ln1"))
        return mapping


# -- HuggingFace GPT-2 ---------------------------------------------------------

# HF GPT-2 uses Conv1D, whose weight is already (in, out): no transpose.
_HF_GPT2_RULES = [
    (r"wte\.weight", "embeddings/word_embeddings"),
    (r"wpe\.weight", "embeddings/position_embeddings"),
    (r"h\.(\d+)\.ln_1\.(weight|bias)", r"transformer/layer_\1/attention/input/LayerNorm/\2"),
    (r"h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"transformer/layer_\1/attention/output/dense/\2"),
    (r"h\.(\d+)\.ln_2\.(weight|bias)", r"transformer/layer_\1/input/LayerNorm/\2"),
    (r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"transformer/layer_\1/intermediate/dense/\2"),
    (r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"transformer/layer_\1/output/dense/\2"),
    (r"ln_f\.(weight|bias)", r"output/LayerNorm/\1"),
]
_LEAF = {"LayerNorm/weight": "LayerNorm/gamma", "LayerNorm/bias": "LayerNorm/beta"}


def gpt2_hf_to_google(state, prefix="gpt2"):
    """HF GPT2Model / GPT2LMHeadModel weights in the Google-style names above.

    c_attn holds query, key and value side by side on its last axis; it is
    split into three. The LM head is tied to wte and the causal-mask buffers
    (attn.bias, attn.masked_bias) are not weights, so both are skipped.
    """
    out = {}
    for name, value in state.items():
        name = re.sub(r"^transformer\.", "", name)
        match = re.fullmatch(r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", name)
        if match:
            layer, leaf = match.groups()
            leaf = "kernel" if leaf == "weight" else "bias"
            size = value.shape[-1] // 3
            for part, short in enumerate(("query", "key", "value")):
                piece = value[..., part * size : (part + 1) * size]
                out[f"{prefix}/transformer/layer_{layer}/attention/self/{short}/{leaf}"] = piece.copy()
            continue
        for pattern, replacement in _HF_GPT2_RULES:
            if re.fullmatch(pattern, name):
                new = re.sub(pattern, replacement, name)
                break
        else:
            continue  # lm_head (tied), attention-mask buffers, heads of other tasks
        for old, leaf in _LEAF.items():
            if new.endswith(old):
                new = new[: -len(old)] + leaf
        if new.endswith("/dense/weight"):
            new = new[: -len("weight")] + "kernel"
        out[f"{prefix}/{new}"] = value
    return out


def gpt2_hf_config(config):
    """HF GPT-2 config.json -> bert_config.json keys."""
    if config.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError(
            "GPT-2 configs with scale_attn_by_inverse_layer_idx=True are not supported."
        )
    if config.get("scale_attn_weights") is False:
        raise ValueError("GPT-2 configs with scale_attn_weights=False are not supported.")
    hidden = config.get("n_embd", 768)
    return {
        "vocab_size": config.get("vocab_size", 50257),
        "hidden_size": hidden,
        "num_hidden_layers": config.get("n_layer", 12),
        "num_attention_heads": config.get("n_head", 12),
        "intermediate_size": config.get("n_inner") or 4 * hidden,
        "hidden_act": config.get("activation_function", "gelu_new"),
        "hidden_dropout_prob": config.get("resid_pdrop", 0.1),
        "attention_probs_dropout_prob": config.get("attn_pdrop", 0.1),
        "max_position_embeddings": config.get("n_positions", 1024),
        "initializer_range": config.get("initializer_range", 0.02),
        "layer_norm_eps": config.get("layer_norm_epsilon", 1e-5),
    }
