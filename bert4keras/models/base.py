"""The `Transformer` base class: embeddings -> N blocks -> heads.

A model family subclasses it and writes `apply_embeddings`,
`apply_main_layers`, `apply_final_layers` and `variable_mapping`. Layers are
created by name through `apply()`, so every weight has a readable path such as
`Transformer-3-FeedForward/o_dense/kernel`, and the mapping to checkpoint
variables is a plain dictionary.
"""
import inspect
import json
import os

import keras
import numpy as np

from bert4keras import backend, checkpoints
from bert4keras.layers import AttentionMask, MultiHeadAttention, RecomputedBlock

APPLICATIONS = ("encoder", "lm", "unilm")


class Transformer:
    """Base class of all models. Build with `build()`, then `.model` is a keras.Model."""

    #: Applications the family supports; 'lm' and 'unilm' change only the mask.
    applications = APPLICATIONS
    #: Prefix of checkpoint names (Google layout), e.g. 'bert'.
    prefix = "bert"

    def __init__(
        self,
        vocab_size,
        hidden_size,
        num_hidden_layers,
        num_attention_heads,
        intermediate_size,
        hidden_act="gelu",
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        embedding_size=None,
        attention_head_size=None,
        attention_key_size=None,
        max_position=512,
        sequence_length=None,
        keep_tokens=None,
        compound_tokens=None,
        application="encoder",
        layer_norm_eps=1e-12,
        initializer_range=0.02,
        pad_token_id=0,
        ignore_invalid_weights=False,
        recompute=None,
        name=None,
    ):
        if application not in self.applications:
            raise ValueError(
                f"application={application!r} is not supported by {type(self).__name__}; "
                f"valid: {', '.join(repr(a) for a in self.applications)}."
            )
        if keep_tokens is not None:
            vocab_size = len(keep_tokens)
        if compound_tokens is not None:
            vocab_size += len(compound_tokens)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = attention_head_size or hidden_size // num_attention_heads
        self.attention_key_size = attention_key_size or self.attention_head_size
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.dropout_rate = dropout_rate or 0.0
        self.attention_dropout_rate = attention_dropout_rate or 0.0
        self.embedding_size = embedding_size or hidden_size
        self.max_position = max_position
        self.sequence_length = sequence_length
        self.keep_tokens = keep_tokens
        self.compound_tokens = compound_tokens
        self.application = application
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.pad_token_id = pad_token_id or 0
        self.ignore_invalid_weights = ignore_invalid_weights
        if recompute is None:
            recompute = os.environ.get("RECOMPUTE", "0")
            recompute = "attention" if recompute == "attention" else recompute not in ("", "0", "false", "False")
        self.recompute = backend.normalize_recompute(recompute)
        self.name = name
        self.layers = {}
        self.model = None
        self.decoding = None  # set while build_cache_model re-applies the layers
        self._recomputed_blocks = {}

    # -- construction -----------------------------------------------------

    def initializer(self):
        return keras.initializers.TruncatedNormal(stddev=self.initializer_range)

    def apply(self, inputs=None, layer=None, arguments=None, **kwargs):
        """Calls the layer named kwargs['name'], creating it on first use.

        Reusing a name reuses the layer (and its weights), which is how the
        MLM head shares the token embedding and ALBERT shares its block.
        """
        name = kwargs.get("name")
        if name not in self.layers:
            # recompute='attention' recomputes the attention core of each
            # block (see MultiHeadAttention); True recomputes whole blocks
            # (see apply_block), not their sub-layers one by one.
            if (
                self.recompute == "attention"
                and isinstance(layer, type)
                and issubclass(layer, MultiHeadAttention)
                and "recompute" in accepted_arguments(layer)
            ):
                kwargs["recompute"] = self.recompute
            self.layers[name] = layer(**kwargs)
        if inputs is None:
            return self.layers[name]
        if self.decoding is not None:
            return self.decoding(self.layers[name], inputs, dict(arguments or {}))
        return self.layers[name](inputs, **(arguments or {}))

    def get_inputs(self):
        raise NotImplementedError

    def apply_embeddings(self, inputs):
        raise NotImplementedError

    def apply_main_layers(self, x, index):
        raise NotImplementedError

    def apply_final_layers(self, x):
        return x

    def block_name(self, index):
        """Prefix of block `index`'s layer names; ALBERT shares one block."""
        return f"Transformer-{index}"

    def apply_block(self, function, x, name):
        """`function(x)` (a transformer block applied through `apply`), made
        one `RecomputedBlock` named `name` when recompute=True.

        The block's layers are first called directly, so their weights keep
        their usual paths; the sub-model is then cut from that graph between
        `x` plus every other tensor the block reads (the attention mask,
        position biases, an encoder's output) and its output. Blocks made of
        the same layers (ALBERT's shared block) are one sub-model called
        again.
        """
        if self.recompute is not True or self.decoding is not None:
            return function(x)
        # Calls made before this block (e.g. T5's position bias, computed from
        # the embeddings' shape) are inputs of the block even when they depend on x.
        earlier = {id(node) for layer in self.layers.values() for node in layer._inbound_nodes}
        y = function(x)
        inputs = [x] + _tensors_read_by(y, x, earlier)
        block = RecomputedBlock(*_replay_on_new_inputs(inputs, y), name=name)
        key = tuple(id(layer) for layer in block.layers if not isinstance(layer, keras.layers.InputLayer))
        block = self._recomputed_blocks.setdefault(key, block)
        return block(inputs)

    def compute_attention_mask(self, inputs):
        """The mask of `self.application`, computed once and shared by all blocks."""
        token_ids = inputs[0]
        segment_ids = inputs[1] if len(inputs) > 1 else None
        if self.application == "unilm" and segment_ids is None:
            raise ValueError("application='unilm' needs segment ids (segment_vocab_size > 0).")
        return self.apply(
            token_ids,
            AttentionMask,
            arguments={"segment_ids": segment_ids} if self.application == "unilm" else None,
            application=self.application,
            pad_id=self.pad_token_id,
            name="Attention-Mask",
        )

    def build(self):
        """Builds `self.model` (a functional keras.Model) and returns it."""
        if self.model is not None:
            return self.model
        inputs = self.get_inputs()
        self.attention_mask = self.compute_attention_mask(inputs)
        x = self.apply_embeddings(inputs)
        for index in range(self.num_hidden_layers):
            block = lambda x: self.apply_main_layers(x, index)  # noqa: E731
            x = self.apply_block(block, x, f"{self.block_name(index)}-Recomputed")
        outputs = self.apply_final_layers(x)
        self.model = keras.Model(inputs, outputs, name=self.name or type(self).__name__.lower())
        self.model.bert4keras = self
        return self.model

    # -- cached decoding (see bert4keras.generation) -----------------------

    decoding_pad_id = property(lambda self: self.pad_token_id, doc="Token id treated as padding while decoding.")
    decoding_application = property(lambda self: self.application, doc="'lm' or 'unilm' when decodable.")
    num_cached_layers = property(lambda self: self.num_hidden_layers, doc="Self-attention layers with a cache.")

    @property
    def decoding_max_length(self):
        """The most positions a cached decode may use (None: no limit)."""
        return None if getattr(self, "hierarchical_position", None) else self.max_position

    def decoding_inputs(self):
        """The token inputs of the cached model (before the cache inputs)."""
        return self.get_inputs()

    def decoding_outputs(self, inputs):
        """Re-applies the layers on `inputs`; `self.decoding` wires in the cache."""
        saved_mask, self.attention_mask = self.attention_mask, self.decoding.mask
        try:
            x = self.apply_embeddings(inputs)
            for index in range(self.num_hidden_layers):
                x = self.apply_main_layers(x, index)
            # Only the last position's output is used: the (position-wise) LM
            # head, a vocabulary-wide product, runs on it alone, not on every
            # prompt position.
            return self.apply_final_layers(x[:, -1:])
        finally:
            self.attention_mask = saved_mask

    def build_cache_model(self, max_length):
        """The incremental-decoding twin of `self.model` (same layers and weights).

        Extra inputs after `decoding_inputs()`: Cache-Position (batch, t)
        positions of the new tokens; for each self-attention layer its past
        keys then values, Cache-Layer-i-Keys / -Values (batch, heads,
        max_length, head_size); Cache-Index (batch,) where the new keys go
        (same for all rows); Cache-Mask (batch, 1, t, max_length). Outputs:
        the model's output at the last new position, then every cache input
        updated. See `bert4keras.generation`.
        """
        from bert4keras.generation import DecodingContext

        self.build()
        inputs = self.decoding_inputs()
        positions = keras.Input((None,), dtype="int32", name="Cache-Position")
        shape = (self.num_attention_heads, max_length, self.attention_head_size)
        cache = [
            (keras.Input(shape, name=f"Cache-Layer-{i}-Keys"), keras.Input(shape, name=f"Cache-Layer-{i}-Values"))
            for i in range(self.num_cached_layers)
        ]
        index = keras.Input((), dtype="int32", name="Cache-Index")
        mask = keras.Input((1, None, max_length), dtype="bool", name="Cache-Mask")
        context = DecodingContext(positions, cache, index[0], mask)
        self.decoding = context
        try:
            outputs = self.decoding_outputs(inputs)
        finally:
            self.decoding = None
        if isinstance(outputs, (list, tuple)):
            raise ValueError("Cached decoding needs a model with a single (LM) output.")
        if len(context.updated) != len(cache):
            raise ValueError(
                f"{type(self).__name__} declares {len(cache)} cached attention layers "
                f"but its decoder called {len(context.updated)}."
            )
        flat_cache = [tensor for pair in cache for tensor in pair]
        return keras.Model(
            inputs + [positions, *flat_cache, index, mask],
            [outputs[:, -1]] + [tensor for pair in context.updated for tensor in pair],
            name=f"{self.model.name}_cached",
        )

    # -- checkpoints ------------------------------------------------------

    def variable_mapping(self):
        """{keras variable path: checkpoint variable name}; families override."""
        return {}

    def load_variable(self, checkpoint, name):
        """Reads one checkpoint variable, applying keep_tokens / compound_tokens."""
        value = checkpoint[name]
        if name in self.vocab_variables():
            if self.keep_tokens is not None:
                value = value[np.asarray(self.keep_tokens)]
            if self.compound_tokens is not None:
                output_side = name in self.output_vocab_variables()
                rows = [self._compound_row(value, name, item, output_side) for item in self.compound_tokens]
                value = np.concatenate([value, np.stack(rows).astype(value.dtype)], axis=0)
        return value

    @staticmethod
    def _compound_row(value, name, item, output_side=False):
        """The new vocabulary row of `value` (checkpoint variable `name`) for one item.

        Ids index the vocabulary after keep_tokens, as in bert4keras. An item
        is a list of ids (their mean), `(ids, weights)` (a weighted mean), or
        a float vector: the new token's embedding itself. A vector sets the
        rows of input embeddings of that width; output-side variables (an MLM
        bias, an untied LM head) get the mean of their rows.
        """
        vector = None if isinstance(item, tuple) else np.asarray(item)
        if vector is not None and vector.dtype.kind == "f":
            if output_side or value.ndim == 1:
                return value.mean(axis=0)
            if value.shape[1:] == vector.shape:
                return vector
            raise ValueError(
                f"compound_tokens: an embedding of shape {vector.shape} cannot be a new row of "
                f"{name}, whose rows have shape {value.shape[1:]}; give vectors of "
                f"length {value.shape[-1]}."
            )
        ids, weights = item if isinstance(item, tuple) else (item, None)
        ids = np.asarray(ids)
        if ids.size == 0 or ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= len(value):
            raise ValueError(
                f"compound_tokens: {item!r} is not a list of token ids below {len(value)}, an "
                f"(ids, weights) pair or a float embedding vector."
            )
        return np.average(value[ids], axis=0, weights=weights)

    def save_variable(self, name, value):
        """Inverse of the per-variable transform of `load_variable` (for saving)."""
        return value

    def vocab_variables(self):
        """Checkpoint names whose first axis is the vocabulary."""
        return ()

    def output_vocab_variables(self):
        """The vocab_variables of an output layer only (not an input embedding)."""
        return ()

    def open_checkpoint(self, checkpoint_path):
        """A name -> array view in Google naming, whatever the file format."""
        if not isinstance(checkpoint_path, (str, os.PathLike)):
            return checkpoint_path
        path = os.fspath(checkpoint_path)
        reader = checkpoints.open_checkpoint(path)
        if reader is not None:
            return reader
        files = checkpoints.find_safetensors(path)
        if files:
            state = {}
            for file in files:
                state.update(checkpoints.read_safetensors(file))
            return checkpoints.DictCheckpoint(self.from_hf_weights(state), path)
        if not os.path.exists(path) and not os.path.exists(path + ".index"):
            raise FileNotFoundError(f"Checkpoint not found: {path!r} does not exist.")
        raise FileNotFoundError(
            f"No checkpoint in {path!r}: expected a Google TF checkpoint "
            "(bert_model.ckpt.index + .data-*) or a HuggingFace model.safetensors."
        )

    def from_hf_weights(self, state):
        raise NotImplementedError(f"{type(self).__name__} cannot read HuggingFace weights.")

    def load_weights_from_checkpoint(self, checkpoint_path, mapping=None):
        """Loads every mapped variable, by explicit name, with shape checks."""
        checkpoint = self.open_checkpoint(checkpoint_path)
        mapping = mapping or self.variable_mapping()
        variables = {v.path: v for v in self.model.weights}
        missing = []
        for path, name in mapping.items():
            variable = variables.get(path)
            if variable is None:
                raise KeyError(f"Internal mapping names {path!r}, which the model does not have.")
            if name not in checkpoint:
                missing.append(name)
                continue
            value = self.load_variable(checkpoint, name)
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Shape mismatch for checkpoint variable {name!r} (model weight {path!r}): "
                    f"checkpoint shape {tuple(value.shape)}, model shape {tuple(variable.shape)}. "
                    "Check that the config matches the checkpoint."
                )
            variable.assign(value.astype(variable.dtype))
        if missing and not self.ignore_invalid_weights:
            raise KeyError(
                f"{len(missing)} variable(s) missing from checkpoint {checkpoint.path!r}: "
                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. "
                "Pass ignore_invalid_weights=True to keep their initial values."
            )
        return missing

    def checkpoint_tensors(self, mapping=None):
        """{checkpoint name: numpy value} of the current weights (Google naming)."""
        mapping = mapping or self.variable_mapping()
        variables = {v.path: v for v in self.model.weights}
        return {
            name: self.save_variable(name, keras.ops.convert_to_numpy(variables[path]))
            for path, name in mapping.items()
        }

    def save_weights_as_checkpoint(self, prefix, mapping=None, write_config=True):
        """Saves the weights as a Google-format checkpoint (+ bert_config.json)."""
        checkpoints.save_tf_checkpoint(prefix, self.checkpoint_tensors(mapping))
        if write_config:
            path = os.path.join(os.path.dirname(os.path.abspath(prefix)), "bert_config.json")
            with open(path, "w") as f:
                json.dump(self.google_config(), f, indent=2)
        return prefix

    def google_config(self):
        """The model's settings in Google `bert_config.json` keys."""
        config = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.dropout_rate,
            "attention_probs_dropout_prob": self.attention_dropout_rate,
            "max_position_embeddings": self.max_position,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_eps,
        }
        if self.pad_token_id:
            config["pad_token_id"] = self.pad_token_id
        if self.embedding_size != self.hidden_size:
            config["embedding_size"] = self.embedding_size
        return config


def _tensors_read_by(output, x, earlier=()):
    """The symbolic tensors that the graph from `x` to `output` reads besides
    `x`: inputs of its nodes that do not themselves depend on `x`, and
    outputs of the nodes in `earlier` (ids of calls made before the block)."""
    depends = {id(x): True}
    read = []

    def visit(tensor):
        if id(tensor) not in depends:
            operation, node_index, _ = tensor._keras_history
            node = operation._inbound_nodes[node_index]
            inputs = [] if node.is_input or id(node) in earlier else node.input_tensors
            flags = [visit(t) for t in inputs]
            depends[id(tensor)] = any(flags)
            if depends[id(tensor)]:
                read.extend(t for t, f in zip(inputs, flags) if not f and all(t is not r for r in read))
        return depends[id(tensor)]

    visit(output)
    return read


def _replay_on_new_inputs(inputs, output):
    """The graph from `inputs` to `output` called again on fresh keras.Input
    tensors: (new inputs, new output), for a sub-model of the same layers.

    (keras.Model(inputs, output) on intermediate tensors would clone the
    nodes instead, and re-point the history of any true model input among
    them, which breaks the models that already use it.)
    """
    new = {id(t): keras.Input(batch_shape=t.shape, dtype=t.dtype, name=f"{t.name}-Block-Input") for t in inputs}

    def replay(value):
        if not isinstance(value, keras.KerasTensor):
            return value
        if id(value) not in new:
            operation, node_index, _ = value._keras_history
            node = operation._inbound_nodes[node_index]
            args = keras.tree.map_structure(replay, node.arguments.args)
            kwargs = keras.tree.map_structure(replay, node.arguments.kwargs)
            outputs = keras.tree.flatten(operation(*args, **kwargs))
            new.update((id(old), tensor) for old, tensor in zip(node.outputs, outputs))
        return new[id(value)]

    return [new[id(t)] for t in inputs], replay(output)


def accepted_arguments(cls):
    """Names of the constructor arguments of `cls` and its bases."""
    names = set()
    for klass in inspect.getmro(cls):
        if klass is object or "__init__" not in vars(klass):
            continue
        names.update(
            p.name
            for p in inspect.signature(klass.__init__).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"
        )
    return names


def linear_kernel(weight):
    """A PyTorch Linear weight (out, in) as a Keras Dense kernel (in, out)."""
    return np.ascontiguousarray(np.transpose(weight))
