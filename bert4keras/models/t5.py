"""T5 (t5.1.0), T5.1.1 and mT5: encoder-decoder with relative position buckets.

    model='t5'       version from the config ('t5.1.0' when it says nothing)
    model='t5.1.0'   relu FFN, LM head tied to the token embedding, with the
                     decoder output scaled by hidden_size**-0.5 before it
    model='t5.1.1'   gated-gelu FFN, separate LM head (`decoder/logits`)
    model='mt5.1.1'  the mT5 release, same layout as t5.1.1

Every block is pre-norm with T5's RMS norm (no mean, no offset, epsilon
1e-6); no layer has a bias; attention scores are not scaled. Self-attention
adds a learned bias per bucket of key position - query position
(`backend.t5_relative_position_buckets`; bidirectional in the encoder,
unidirectional in the decoder), computed once per stack and shared by all
its layers. Cross-attention has no position bias. In T5 configs 'gelu' means
the tanh approximation ('gelu_new'), as in the mesh-tensorflow code.

`build()` makes three keras models sharing their layers:

    t5.encoder  Encoder-Input-Token -> encoder output (zero at padding)
    t5.decoder  [Input-Context, Decoder-Input-Token] -> LM output
    t5.model    [Encoder-Input-Token, Decoder-Input-Token] -> LM output

The decoder masks the context rows that are all zero, which is how the
encoder output marks padding, so `t5.decoder([t5.encoder(x), y])` equals
`t5.model([x, y])` on padded batches too. The decoder self-attention is
causal; it needs no padding mask because right padding is never visible to
earlier positions (and id 0 is also T5's decoder start token). with_lm:
True / 'softmax' gives probabilities, 'linear' logits, False the decoder
hidden states.

Layer names (bert4keras): Embedding-Token (shared by both stacks),
{Encoder,Decoder}-Embedding-Dropout, {Encoder,Decoder}-Embedding-Relative-Position,
Encoder-Transformer-{i}-MultiHeadSelfAttention[-Norm],
Decoder-Transformer-{i}-MultiHeadSelfAttention[-Norm],
Decoder-Transformer-{i}-MultiHeadCrossAttention[-Norm],
{Encoder,Decoder}-Transformer-{i}-FeedForward[-Norm],
{Encoder,Decoder}-Output-Norm, Decoder-Output-Scale (tied),
Decoder-Output-LM (untied), Decoder-Output-LM-Activation.

Checkpoint names are those of the released mesh-tensorflow checkpoints:
shared/embedding, encoder/block_{i:03d}/layer_000/SelfAttention/{q,k,v,o},
encoder/block_000/layer_000/SelfAttention/relative_attention_bias
(heads, buckets), encoder/block_{i:03d}/layer_001/DenseReluDense/wi/kernel
(wi_0 and wi_1 when gated), .../wo/kernel, decoder layer_001 is
EncDecAttention and layer_002 DenseReluDense, decoder/logits/kernel. Norm
scales are .../layer_norm/scale and {en,de}coder/final_layer_norm/scale in
t5.1.0, .../rms_norm/scale and {en,de}coder/rms_norm/scale in t5.1.1 / mT5.
"""
import re

import keras
import numpy as np

from bert4keras.layers import (
    AttentionMask,
    ContextMask,
    Embedding,
    FeedForward,
    LayerNormalization,
    MultiHeadAttention,
    RelativePositionBias,
    ZeroPaddedPositions,
)
from bert4keras.models.base import Transformer, linear_kernel

VERSIONS = ("t5.1.0", "t5.1.1", "mt5.1.1")


def _t5_activation(activation):
    if isinstance(activation, (list, tuple)):
        return [_t5_activation(a) for a in activation]
    return "gelu_new" if activation == "gelu" else activation


class T5(Transformer):
    """T5 encoder-decoder; `.encoder`, `.decoder` and `.model` after `build()`.

    Args beyond `Transformer`: version ('t5.1.0', 't5.1.1', 'mt5.1.1'),
    num_decoder_layers (default num_hidden_layers),
    relative_attention_num_buckets, relative_attention_max_distance,
    tie_word_embeddings (default: True for t5.1.0 only), with_lm,
    decoder_sequence_length. hidden_act defaults to 'relu' (t5.1.0) or the
    gated ['gelu_new', 'linear'] (t5.1.1, mT5); attention_head_size is T5's
    d_kv and may differ from hidden_size / heads.

    >>> t5 = T5(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...         num_attention_heads=2, intermediate_size=16, with_lm="linear")
    >>> _ = t5.build()
    >>> [tuple(m.output.shape) for m in (t5.encoder, t5.decoder, t5.model)]
    [(None, None, 8), (None, None, 50), (None, None, 50)]
    """

    applications = ("seq2seq",)

    def __init__(
        self,
        version="t5.1.0",
        num_decoder_layers=None,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        tie_word_embeddings=None,
        with_lm=True,
        decoder_sequence_length=None,
        hidden_act=None,
        layer_norm_eps=1e-6,
        application="seq2seq",
        **kwargs,
    ):
        if version not in VERSIONS:
            raise ValueError(f"Unknown T5 version {version!r}; valid: {', '.join(VERSIONS)}.")
        if hidden_act is None:
            hidden_act = "relu" if version == "t5.1.0" else ["gelu_new", "linear"]
        super().__init__(
            hidden_act=_t5_activation(hidden_act),
            layer_norm_eps=layer_norm_eps,
            application=application,
            **kwargs,
        )
        if self.embedding_size != self.hidden_size:
            raise ValueError("T5 needs embedding_size == hidden_size (d_model).")
        self.version = version
        self.num_decoder_layers = num_decoder_layers or self.num_hidden_layers
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        if tie_word_embeddings is None:
            tie_word_embeddings = version == "t5.1.0"
        self.tie_word_embeddings = tie_word_embeddings
        self.with_lm = with_lm
        self.decoder_sequence_length = decoder_sequence_length
        self.encoder = None
        self.decoder = None

    # -- construction -----------------------------------------------------

    def build(self):
        """Builds `self.encoder`, `self.decoder` and `self.model`; returns the latter."""
        if self.model is not None:
            return self.model
        encoder_tokens = keras.Input((self.sequence_length,), dtype="int32", name="Encoder-Input-Token")
        encoded = self.apply_encoder(encoder_tokens)
        context = keras.Input((self.sequence_length, self.hidden_size), name="Input-Context")
        decoder_tokens = keras.Input(
            (self.decoder_sequence_length,), dtype="int32", name="Decoder-Input-Token"
        )
        name = self.name or "t5"
        self.encoder = keras.Model(encoder_tokens, encoded, name=f"{name}_encoder")
        self.decoder = keras.Model(
            [context, decoder_tokens], self.apply_decoder(context, decoder_tokens), name=f"{name}_decoder"
        )
        self.model = keras.Model(
            [encoder_tokens, decoder_tokens], self.apply_decoder(encoded, decoder_tokens), name=name
        )
        for model in (self.encoder, self.decoder, self.model):
            model.bert4keras = self
        return self.model

    def _norm(self, x, name):
        return self.apply(x, LayerNormalization, center=False, epsilon=self.layer_norm_eps, name=name)

    def _dropout(self, x, name):
        return self.apply(x, keras.layers.Dropout, rate=self.dropout_rate, name=name)

    def _position_bias(self, x, mask, bidirectional, name):
        return self.apply(
            [x, x],
            RelativePositionBias,
            arguments={"attention_mask": mask},
            heads=self.num_attention_heads,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
            bidirectional=bidirectional,
            embeddings_initializer=self.initializer(),
            name=name,
        )

    def apply_attention(self, x, name, bias, context=None):
        """x + Attention(Norm(x)) over itself or over `context`."""
        y = self._norm(x, f"{name}-Norm")
        memory = y if context is None else context
        y = self.apply(
            [y, memory, memory],
            MultiHeadAttention,
            arguments={"attention_mask": bias},
            heads=self.num_attention_heads,
            head_size=self.attention_head_size,
            key_size=self.attention_key_size,
            use_bias=False,
            attention_scale=False,
            attention_dropout=self.attention_dropout_rate,
            kernel_initializer=self.initializer(),
            name=name,
        )
        y = self._dropout(y, f"{name}-Dropout")
        return self.apply([x, y], keras.layers.Add, name=f"{name}-Add")

    def apply_feed_forward(self, x, name):
        """x + FFN(Norm(x)); the FFN is gated when hidden_act is a list of two."""
        y = self._norm(x, f"{name}-Norm")
        y = self.apply(
            y,
            FeedForward,
            units=self.intermediate_size,
            activation=self.hidden_act,
            use_bias=False,
            kernel_initializer=self.initializer(),
            name=name,
        )
        y = self._dropout(y, f"{name}-Dropout")
        return self.apply([x, y], keras.layers.Add, name=f"{name}-Add")

    def apply_token_embedding(self, token_ids):
        return self.apply(
            token_ids,
            Embedding,
            input_dim=self.vocab_size,
            output_dim=self.hidden_size,
            embeddings_initializer=self.initializer(),
            name="Embedding-Token",
        )

    def apply_encoder_block(self, x, i, bias):
        x = self.apply_attention(x, f"Encoder-Transformer-{i}-MultiHeadSelfAttention", bias)
        return self.apply_feed_forward(x, f"Encoder-Transformer-{i}-FeedForward")

    def apply_encoder(self, token_ids):
        mask = self.apply(
            token_ids,
            AttentionMask,
            application="encoder",
            pad_id=self.pad_token_id,
            name="Encoder-Attention-Mask",
        )
        x = self.apply_token_embedding(token_ids)
        x = self._dropout(x, "Encoder-Embedding-Dropout")
        # Position bias and padding mask in one additive bias, shared by all layers.
        bias = self._position_bias(x, mask, True, "Encoder-Embedding-Relative-Position")
        for i in range(self.num_hidden_layers):
            block = lambda x: self.apply_encoder_block(x, i, bias)  # noqa: E731
            x = self.apply_block(block, x, f"Encoder-Transformer-{i}-Recomputed")
        x = self._norm(x, "Encoder-Output-Norm")
        x = self._dropout(x, "Encoder-Output-Dropout")
        return self.apply(
            [x, token_ids], ZeroPaddedPositions, pad_id=self.pad_token_id, name="Encoder-Output-Mask"
        )

    def apply_decoder_block(self, x, i, bias, context, context_mask):
        x = self.apply_attention(x, f"Decoder-Transformer-{i}-MultiHeadSelfAttention", bias)
        x = self.apply_attention(x, f"Decoder-Transformer-{i}-MultiHeadCrossAttention", context_mask, context)
        return self.apply_feed_forward(x, f"Decoder-Transformer-{i}-FeedForward")

    def apply_decoder(self, context, token_ids):
        context_mask = self.apply(context, ContextMask, name="Decoder-Context-Mask")
        # Causal only: pad_id=-1 matches no token (see the module docstring).
        causal = self.apply(
            token_ids, AttentionMask, application="lm", pad_id=-1, name="Decoder-Attention-Mask"
        )
        x = self.apply_token_embedding(token_ids)
        x = self._dropout(x, "Decoder-Embedding-Dropout")
        bias = self._position_bias(x, causal, False, "Decoder-Embedding-Relative-Position")
        for i in range(self.num_decoder_layers):
            block = lambda x: self.apply_decoder_block(x, i, bias, context, context_mask)  # noqa: E731
            x = self.apply_block(block, x, f"Decoder-Transformer-{i}-Recomputed")
        x = self._norm(x, "Decoder-Output-Norm")
        x = self._dropout(x, "Decoder-Output-Dropout")
        if not self.with_lm:
            return x
        if self.tie_word_embeddings:
            x = self.apply(
                x, keras.layers.Rescaling, scale=self.hidden_size**-0.5, name="Decoder-Output-Scale"
            )
            x = self.apply(x, Embedding, arguments={"mode": "dense"}, name="Embedding-Token")
        else:
            x = self.apply(
                x,
                keras.layers.Dense,
                units=self.vocab_size,
                use_bias=False,
                kernel_initializer=self.initializer(),
                name="Decoder-Output-LM",
            )
        activation = "softmax" if self.with_lm is True else self.with_lm
        return self.apply(
            x,
            keras.layers.Activation,
            activation=activation,
            dtype="float32",
            name="Decoder-Output-LM-Activation",
        )

    # -- cached decoding ---------------------------------------------------

    # The decoder is causal with no padding id (0 is its start token), and
    # only its self-attention layers are cached; cross-attention reads the
    # encoder output, given as an input at every step.
    decoding_pad_id = -1
    decoding_application = "lm"
    num_cached_layers = property(lambda self: self.num_decoder_layers)

    def decoding_inputs(self):
        context = keras.Input((None, self.hidden_size), name="Input-Context")
        return [context, keras.Input((None,), dtype="int32", name="Decoder-Input-Token")]

    def decoding_outputs(self, inputs):
        return self.apply_decoder(*inputs)

    # -- checkpoint names ------------------------------------------------

    def _norm_names(self):
        """(block norm leaf, final norm of a stack) for this version's checkpoints."""
        if self.version == "t5.1.0":
            return "layer_norm", "final_layer_norm"
        return "rms_norm", "rms_norm"

    def variable_mapping(self):
        block_norm, final_norm = self._norm_names()
        gated = isinstance(self.hidden_act, (list, tuple)) and len(self.hidden_act) > 1
        mapping = {
            "Embedding-Token/embeddings": "shared/embedding",
            "Encoder-Embedding-Relative-Position/embeddings": (
                "encoder/block_000/layer_000/SelfAttention/relative_attention_bias"
            ),
            "Decoder-Embedding-Relative-Position/embeddings": (
                "decoder/block_000/layer_000/SelfAttention/relative_attention_bias"
            ),
            "Encoder-Output-Norm/gamma": f"encoder/{final_norm}/scale",
            "Decoder-Output-Norm/gamma": f"decoder/{final_norm}/scale",
        }

        def attention(layer, scope):
            for short in "qkvo":
                mapping[f"{layer}/{short}_dense/kernel"] = f"{scope}/{short}"

        def feed_forward(layer, scope):
            if gated:
                mapping[f"{layer}/i0_dense/kernel"] = f"{scope}/wi_0/kernel"
                mapping[f"{layer}/i1_dense/kernel"] = f"{scope}/wi_1/kernel"
            else:
                mapping[f"{layer}/i0_dense/kernel"] = f"{scope}/wi/kernel"
            mapping[f"{layer}/o_dense/kernel"] = f"{scope}/wo/kernel"

        for stack, count in (("Encoder", self.num_hidden_layers), ("Decoder", self.num_decoder_layers)):
            sublayers = [("MultiHeadSelfAttention", "SelfAttention")]
            if stack == "Decoder":
                sublayers.append(("MultiHeadCrossAttention", "EncDecAttention"))
            sublayers.append(("FeedForward", "DenseReluDense"))
            for i in range(count):
                block = f"{stack.lower()}/block_{i:03d}"
                for j, (layer, module) in enumerate(sublayers):
                    layer = f"{stack}-Transformer-{i}-{layer}"
                    scope = f"{block}/layer_{j:03d}"
                    if module == "DenseReluDense":
                        feed_forward(layer, f"{scope}/{module}")
                    else:
                        attention(layer, f"{scope}/{module}")
                    mapping[f"{layer}-Norm/gamma"] = f"{scope}/{block_norm}/scale"
        if self.with_lm and not self.tie_word_embeddings:
            mapping["Decoder-Output-LM/kernel"] = "decoder/logits/kernel"
        return mapping

    def vocab_variables(self):
        return ("shared/embedding", "decoder/logits/kernel")

    def output_vocab_variables(self):
        return ("decoder/logits/kernel",)

    def load_variable(self, checkpoint, name):
        if name == "decoder/logits/kernel":
            # The vocabulary is the second axis here; keep_tokens works on the first.
            return super().load_variable({name: checkpoint[name].T}, name).T
        value = super().load_variable(checkpoint, name)
        if name.endswith("relative_attention_bias"):
            value = value.T  # checkpoint (heads, buckets) -> table (buckets, heads)
        return value

    def save_variable(self, name, value):
        return value.T if name.endswith("relative_attention_bias") else value

    def from_hf_weights(self, state):
        return t5_hf_to_google(state, self.version, self.tie_word_embeddings)

    def google_config(self):
        config = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_attention_heads": self.num_attention_heads,
            "attention_head_size": self.attention_head_size,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.dropout_rate,
            "attention_probs_dropout_prob": self.attention_dropout_rate,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_eps,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "tie_word_embeddings": self.tie_word_embeddings,
            "version": self.version,
        }
        if self.pad_token_id:
            config["pad_token_id"] = self.pad_token_id
        return config


# -- HuggingFace T5 / mT5 -------------------------------------------------------

_HF_T5_MODULES = {
    "encoder": {0: "SelfAttention", 1: "DenseReluDense"},
    "decoder": {0: "SelfAttention", 1: "EncDecAttention", 2: "DenseReluDense"},
}


def t5_hf_to_google(state, version="t5.1.0", tie_word_embeddings=True):
    """HF T5ForConditionalGeneration / MT5 weights in mesh-tensorflow names.

    Linear weights (out, in) become (in, out) kernels, the relative bias table
    (buckets, heads) becomes (heads, buckets). For an untied model without
    its own lm_head.weight (HF ties it to `shared` then), the logits kernel
    is the transposed shared embedding.
    """
    block_norm, final_norm = ("layer_norm", "final_layer_norm") if version == "t5.1.0" else ("rms_norm", "rms_norm")
    out = {}
    for name, value in state.items():
        match = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(\w+?)(?:\.(\w+))?\.weight", name)
        if match:
            stack, block, layer, module, leaf = match.groups()
            scope = f"{stack}/block_{int(block):03d}/layer_{int(layer):03d}"
            if module == "layer_norm":
                out[f"{scope}/{block_norm}/scale"] = value
            elif leaf is None:
                continue
            elif leaf == "relative_attention_bias":
                if module == "SelfAttention":  # cross-attention never uses one
                    out[f"{scope}/{module}/relative_attention_bias"] = np.ascontiguousarray(value.T)
            elif module == "DenseReluDense":
                out[f"{scope}/{module}/{leaf}/kernel"] = linear_kernel(value)
            else:
                out[f"{scope}/{module}/{leaf}"] = linear_kernel(value)
            continue
        match = re.fullmatch(r"(encoder|decoder)\.final_layer_norm\.weight", name)
        if match:
            out[f"{match.group(1)}/{final_norm}/scale"] = value
    shared = state.get("shared.weight")
    if shared is None:
        shared = state.get("encoder.embed_tokens.weight", state.get("decoder.embed_tokens.weight"))
    if shared is not None:
        out["shared/embedding"] = shared
    if not tie_word_embeddings:
        lm_head = state.get("lm_head.weight", shared)
        if lm_head is not None:
            out["decoder/logits/kernel"] = linear_kernel(lm_head)
    return out


def t5_hf_config(config):
    """HF T5 / mT5 config.json -> bert_config.json keys (with `version`).

    HF scales the decoder output by d_model**-0.5 exactly when the config
    says the embeddings are tied (`scale_decoder_outputs` in newer files);
    that is what tie_word_embeddings means here.
    """
    projection = config.get("feed_forward_proj", "relu")
    gated = config.get("is_gated_act", projection.startswith("gated-"))
    activation = config.get("dense_act_fn") or projection.split("-")[-1]
    if projection == "gated-gelu":
        activation = "gelu_new"
    tied = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True))
    if not gated:
        version = "t5.1.0"
    else:
        version = "mt5.1.1" if config.get("model_type") == "mt5" else "t5.1.1"
    num_layers = config.get("num_layers", 6)
    return {
        "vocab_size": config.get("vocab_size", 32128),
        "hidden_size": config.get("d_model", 512),
        "num_hidden_layers": num_layers,
        "num_decoder_layers": config.get("num_decoder_layers") or num_layers,
        "num_attention_heads": config.get("num_heads", 8),
        "attention_head_size": config.get("d_kv", 64),
        "intermediate_size": config.get("d_ff", 2048),
        "hidden_act": [activation, "linear"] if gated else activation,
        "hidden_dropout_prob": config.get("dropout_rate", 0.1),
        "attention_probs_dropout_prob": config.get("dropout_rate", 0.1),
        "layer_norm_eps": config.get("layer_norm_epsilon", 1e-6),
        "relative_attention_num_buckets": config.get("relative_attention_num_buckets", 32),
        "relative_attention_max_distance": config.get("relative_attention_max_distance", 128),
        "tie_word_embeddings": bool(tied),
        "version": version,
        "pad_token_id": config.get("pad_token_id") or 0,
    }
