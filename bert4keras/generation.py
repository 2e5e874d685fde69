"""Cached (incremental) decoding for LM, UniLM and encoder-decoder (T5) models.

`CachedDecoder` is an `AutoRegressiveDecoder` (bert4keras's beam search and
sampling, see `bert4keras.snippets`) whose `predict` runs the prompt once and
then one position per new token, reading past keys and values from a cache,
instead of re-running the whole prefix at every step.

    >>> decoder = CachedDecoder(model, start_id=None, end_id=sep_id, maxlen=32)  # doctest: +SKIP
    >>> decoder.beam_search([token_ids, segment_ids], topk=3)                    # doctest: +SKIP

Prompts of a batch are left-padded so that every row writes its new keys into
the same cache slot; positions are counted from each row's first real token,
so results equal those of the unpadded prompt. For T5 the source is encoded
once and the decoder's self-attention is cached.
"""
import keras
import numpy as np
from keras import ops

from bert4keras import backend
from bert4keras.layers import MultiHeadAttention, PositionEmbedding, RelativePositionBias
from bert4keras.snippets import AutoRegressiveDecoder


class _CachedSelfAttention(keras.layers.Layer):
    """Calls a shared attention layer with its cache.

    A functional graph reads a layer's output structure from its first call,
    which returned no cache; this wrapper is a new node whose first call does.
    """

    def __init__(self, attention, **kwargs):
        # ALBERT calls one shared attention layer in every block: names need a uid.
        uid = keras.backend.get_uid(f"{attention.name}-Cached")
        super().__init__(name=f"{attention.name}-Cached-{uid}", **kwargs)
        self.attention = attention

    def call(self, inputs, **kwargs):
        return self.attention(inputs, **kwargs)

    def compute_output_spec(self, inputs, **kwargs):
        return self.attention.compute_output_spec(inputs, **kwargs)


class DecodingContext:
    """Re-applies a Transformer's layers with the cache wired in (see `Transformer.apply`).

    cache: one (keys, values) pair per self-attention layer, in call order.
    """

    def __init__(self, positions, cache, index, mask):
        self.positions = positions
        self.cache = cache
        self.index = index
        self.mask = mask
        self.updated = []  # (keys, values) of each cached layer, written
        self.biases = []  # attention biases made here, which already hold the mask

    def __call__(self, layer, inputs, arguments):
        if isinstance(layer, PositionEmbedding) and not layer.custom_position_ids:
            return layer(inputs, position_ids=self.positions, **arguments)
        if isinstance(layer, RelativePositionBias):
            arguments.update(attention_mask=self.mask, query_offset=self.index, key_length=self.mask.shape[-1])
            bias = layer(inputs, **arguments)
            self.biases.append(bias)
            return bias
        is_self_attention = (
            isinstance(layer, MultiHeadAttention)
            and isinstance(inputs, (list, tuple))
            and inputs[0] is inputs[1]
        )
        if is_self_attention:
            slot = len(self.updated)
            given = arguments.get("attention_mask")
            mask = given if any(given is bias for bias in self.biases) else self.mask
            arguments.update(cache=self.cache[slot], cache_index=self.index, attention_mask=mask)
            outputs, keys, values = _CachedSelfAttention(layer)(inputs, **arguments)
            self.updated.append((keys, values))
            return outputs
        return layer(inputs, **arguments)


def compiled_inference(model, donate_inputs=(), exact_shapes=False):
    """`model(inputs, training=False)` compiled once per input shape.

    Keras' predict_on_batch rebuilds a data adapter on every call, which
    costs more than a decoding step itself; this calls the backend's
    compiler directly (tf.function, jax.jit; eager on PyTorch).

    donate_inputs: on JAX, the positions of inputs whose buffers the call
    may reuse for its outputs (the decoding cache, updated in place); the
    caller must not read those inputs again.
    exact_shapes: on TensorFlow, trace every input shape on its own. By
    default a second shape makes the trace shape-generic (fewer traces for
    varying lengths), and a generic trace computes shapes at run time: for a
    decoding step, whose shapes are few and fixed, that is dozens of extra
    small ops per layer.
    """
    name = backend.backend_name()
    if name == "tensorflow":
        import tensorflow as tf

        function = tf.function(lambda inputs: model(inputs, training=False), reduce_retracing=not exact_shapes)
        concrete = {}

        def run(inputs):
            # A tf.function call matches its arguments against every trace
            # (hashing each input's type) before it runs: with a decoding
            # step's ~20 inputs that costs more than a millisecond. The
            # matching concrete function is looked up once per input shape.
            flat = isinstance(inputs, (list, tuple)) and not any(isinstance(x, (list, tuple, dict)) for x in inputs)
            if flat:  # the decoding case: a flat list, checked cheaply
                tensors = [tf.convert_to_tensor(x) for x in inputs]
                structured, structure = tensors, (type(inputs), len(tensors))
            else:  # a single array, a dict, nested lists
                tensors = [tf.convert_to_tensor(x) for x in tf.nest.flatten(inputs)]
                structured = tf.nest.pack_sequence_as(inputs, tensors)
                structure = repr(tf.nest.map_structure(lambda _: None, inputs))
            key = (structure, *((x.dtype, *x.shape) for x in tensors))
            call = concrete.get(key)
            if call is None:
                call = concrete[key] = function.get_concrete_function(structured)
            return call(structured)

        return run
    if name == "jax":
        import jax

        # Walking the layer tree for the variables costs more than a decoding
        # step: the list is taken once, the values are read at each call (so
        # training in between is seen; trainable flags do not matter here).
        # `_value` is the stored array; the public `value` goes through
        # autocast-scope checks per variable, a large share of a small
        # model's host time per decoding step.
        variables = list(model.variables)
        read = (lambda v: v._value) if all(hasattr(v, "_value") for v in variables) else (lambda v: v.value)
        donate = sorted(donate_inputs)

        def call(values, kept, donated):
            inputs = list(kept)
            for position, value in zip(donate, donated):
                inputs.insert(position, value)
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return model(inputs, training=False)

        run = jax.jit(call, donate_argnums=(2,) if donate else ())

        def runner(inputs):
            if not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            kept = [x for i, x in enumerate(inputs) if i not in donate]
            return run([read(v) for v in variables], kept, [inputs[i] for i in donate])

        runner.stale = lambda: len(model.variables) != len(variables)  # LoRA, quantization
        return runner
    if name == "torch":
        import torch

        def run(inputs):
            # Keras on PyTorch refuses a mix of numpy arrays and tensors (the cache).
            if isinstance(inputs, (list, tuple)):
                inputs = [ops.convert_to_tensor(x) for x in inputs]
            with torch.no_grad():
                return model(inputs, training=False)

        return run
    return lambda inputs: model(inputs, training=False)


class IncrementalModel:
    """Prompt pass and single-token steps of a Transformer, with a cache.

    transformer: the object `build_transformer_model(..., return_keras_model=
    False)` returns (or its keras model), built with application 'lm' or
    'unilm' and a single LM output (e.g. with_mlm=True), or a T5 with its LM
    head (with_lm=True or 'linear').

    Each self-attention layer's keys and values live in their own
    (rows, heads, max_length, head_size) arrays, written in place: on JAX
    `prefill` and `step` donate the cache arrays they are given, so a state
    must not be stepped twice (continue from the state a call returns).
    """

    def __init__(self, transformer):
        transformer = getattr(transformer, "bert4keras", transformer)
        transformer.build()
        self.application = transformer.decoding_application
        if self.application not in ("lm", "unilm"):
            raise ValueError(
                f"Cached decoding needs application='lm' or 'unilm'; this model is "
                f"{transformer.application!r}."
            )
        self.transformer = transformer
        self.pad_id = transformer.decoding_pad_id
        self.uses_segments = getattr(transformer, "segment_vocab_size", 0) > 0
        # Encoder-decoder models (T5): the decoder reads the encoder output.
        self.encoder = getattr(transformer, "encoder", None)
        self._models = {}
        self._compiled = {}

    def _compiled_for(self, model, check_stale=True, step=False):
        # The staleness check walks the layer tree: once per prompt, not per token.
        runner = self._compiled.get((model, step))
        if runner is not None and check_stale and getattr(runner, "stale", lambda: False)():
            self._compiled = {key: value for key, value in self._compiled.items() if key[0] is not model}
            runner = None
        if runner is None:
            # The cache (inputs of cache models only) is updated in place.
            donate = [i for i, x in enumerate(model.inputs) if x.name.startswith("Cache-Layer")]
            # Steps have few shapes (row, cache-length and, for T5, source-length
            # buckets): each gets its own static-shape trace. Prompts vary in
            # length: one generic trace.
            runner = compiled_inference(model, donate_inputs=donate, exact_shapes=step)
            self._compiled[(model, step)] = runner
        return runner

    def encode(self, token_ids):
        """The encoder output for a batch of (padded) source ids, as a backend tensor."""
        token_ids = np.asarray(token_ids, "int32")
        # Negative fill values (pad_value=-1, as GPT-2 needs) mean padding here too.
        token_ids = np.where(token_ids < 0, self.transformer.pad_token_id, token_ids)
        # The encoder output is an input of every decoding step, which is
        # compiled per shape: sources are padded to a multiple of 32 tokens
        # (padding is masked in the encoder and in cross-attention).
        length = token_ids.shape[1]
        padding = -length % 32
        if padding:
            token_ids = np.pad(token_ids, ((0, 0), (0, padding)), constant_values=self.transformer.pad_token_id)
        return self._compiled_for(self.encoder)(token_ids)

    def cache_model(self, max_length):
        limit = self.transformer.decoding_max_length
        if limit is not None and max_length > limit:
            raise ValueError(
                f"Decoding would need {max_length} positions but the model has "
                f"max_position={limit}; lower maxlen or shorten the prompt."
            )
        if max_length not in self._models:
            model = self.transformer.build_cache_model(max_length)
            self._models[max_length] = model
        return self._models[max_length]

    def _run(self, model, inputs, check_stale=False, step=False):
        # Rows are padded up to a power of two: beam search drops finished rows,
        # and every new row count would otherwise compile the step again.
        rows = len(inputs[0])
        bucket = 1 << max(rows - 1, 0).bit_length()
        if bucket != rows:
            inputs = [ops.concatenate([x, ops.repeat(x[-1:], bucket - rows, axis=0)], axis=0) for x in inputs]
        scores, *cache = self._compiled_for(model, check_stale, step)(inputs)
        # The cache stays in backend tensors between steps: no host copies.
        if bucket != rows:
            cache = [c[:rows] for c in cache]
        return ops.convert_to_numpy(scores)[:rows], cache

    def prefill(self, sequences, segments=None, max_length=None, context=None):
        """Runs left-padded prompts; returns (scores at the last position, state).

        context: the encoder output (`encode`), one row per sequence, for
        encoder-decoder models.
        """
        rows = len(sequences)
        length = max(len(s) for s in sequences)
        max_length = max_length or length
        # Left padding; the fill id must be a valid embedding row even for
        # models whose pad id is -1 (GPT-2): padding is given by `valid`.
        token_ids = np.full((rows, length), max(self.pad_id, 0), dtype="int32")
        segment_ids = np.zeros((rows, length), dtype="int32")
        valid = np.zeros((rows, length), dtype=bool)
        for r, sequence in enumerate(sequences):
            sequence = np.asarray(sequence)
            token_ids[r, length - len(sequence):] = sequence
            valid[r, length - len(sequence):] = sequence != self.pad_id
            if segments is not None:
                segment_ids[r, length - len(sequence):] = segments[r]
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype("int32")
        mask = ops.convert_to_numpy(backend.prefill_mask(valid, segment_ids, self.application, max_length))
        t = self.transformer
        shape = (rows, t.num_attention_heads, max_length, t.attention_head_size)
        dtype = keras.backend.standardize_dtype(keras.config.floatx())
        cache = [np.zeros(shape, dtype) for _ in range(2 * t.num_cached_layers)]  # keys, values per layer
        if (context is None) != (self.encoder is None):
            raise ValueError("An encoder-decoder model needs `context` (the encoder output); others take none.")
        model = self.cache_model(max_length)
        inputs = [] if context is None else [context]
        inputs += [token_ids] + ([segment_ids] if self.uses_segments else [])
        inputs += [positions, *cache, np.zeros(rows, "int32"), mask]
        scores, cache = self._run(model, inputs, check_stale=True)
        valid_keys = np.zeros((rows, max_length), dtype=bool)
        valid_keys[:, :length] = valid
        state = {
            "cache": cache,
            "valid": valid_keys,
            "position": positions[:, -1],
            "index": np.full(rows, length, dtype="int32"),
        }
        if context is not None:
            state["context"] = context
        return scores, state

    def step(self, tokens, state, segment_id=0):
        """Feeds one token per row; returns (scores, new state)."""
        index = int(state["index"][0])
        max_length = state["valid"].shape[1]
        if index >= max_length:
            raise ValueError(f"The cache is full ({max_length} positions).")
        rows = len(tokens)
        valid = state["valid"].copy()
        # A generated padding id is masked like padding anywhere else, so the
        # cached model sees exactly what the full model would.
        valid[:, index] = np.asarray(tokens) != self.pad_id
        positions = (state["position"] + 1).astype("int32")
        mask = backend.step_mask(valid, index)
        inputs = [state["context"]] if "context" in state else []
        inputs.append(np.asarray(tokens, "int32").reshape(rows, 1))
        if self.uses_segments:
            inputs.append(np.full((rows, 1), segment_id, dtype="int32"))
        inputs += [positions[:, None], *state["cache"], state["index"], mask]
        scores, cache = self._run(self.cache_model(max_length), inputs, step=True)
        new_state = dict(state, cache=cache, valid=valid, position=positions, index=state["index"] + 1)
        return scores, new_state


class CachedDecoder(AutoRegressiveDecoder):
    """Beam search / sampling over an LM or UniLM model with a key/value cache.

    inputs (per example, as for AutoRegressiveDecoder): `[token_ids]` for an
    LM prompt, `[token_ids, segment_ids]` for UniLM (the source; generated
    tokens get segment 1). Generated tokens continue the prompt. The model's
    output must be next-token probabilities (with_mlm=True) or logits
    (with_mlm='linear').

    T5 (encoder-decoder): inputs are `[source_ids]`, encoded once; the
    decoder starts from `start_id` (T5's decoder start id, 0) and only its
    self-attention is cached (cross-attention reads the encoder output).
    """

    def __init__(self, model, start_id, end_id, maxlen, minlen=1, length_bucket=64):
        super().__init__(start_id, end_id, maxlen, minlen)
        self.incremental = IncrementalModel(model)
        transformer = self.incremental.transformer
        output = getattr(transformer, "with_mlm", None) or getattr(transformer, "with_lm", None)
        if not output:
            raise ValueError("Cached decoding needs the model's LM output: build it with with_mlm=True "
                             "(or 'linear'; T5: with_lm=True or 'linear').")
        self.outputs_logits = output == "linear"
        self.length_bucket = length_bucket
        if self.incremental.encoder is not None and start_id is None:
            raise ValueError("An encoder-decoder model decodes from a start token: give start_id (0 for T5).")

    def _to_log_probs(self, scores):
        if self.outputs_logits:
            return scores
        # float32 suffices: the decoder renormalises in float64 next.
        return np.log(np.maximum(scores, np.asarray(1e-30, scores.dtype)))

    @AutoRegressiveDecoder.wraps(default_rtype="logits", use_states=True)
    def predict(self, inputs, output_ids, states):
        segment_id = 1 if self.incremental.application == "unilm" else 0
        if states is None and self.incremental.encoder is not None:
            # Encoder-decoder: inputs[0] is the source; the decoder starts from output_ids.
            context = self.incremental.encode(inputs[0])
            sequences = [np.asarray(row, "int32") for row in output_ids]
            scores, state = self.incremental.prefill(
                sequences, None, self._cache_length(sequences), context=context
            )
        elif states is None:
            sequences, segments = [], []
            for r in range(len(output_ids)):
                prompt = np.asarray(inputs[0][r])
                keep = prompt != self.incremental.pad_id
                prompt = prompt[keep]
                sequences.append(np.concatenate([prompt, output_ids[r]]).astype("int32"))
                if len(inputs) > 1:
                    seg = np.asarray(inputs[1][r])[keep]
                else:
                    seg = np.zeros(len(prompt), "int32")
                segments.append(np.concatenate([seg, np.full(len(output_ids[r]), segment_id)]))
            scores, state = self.incremental.prefill(sequences, segments, self._cache_length(sequences))
        else:
            scores, state = self.incremental.step(output_ids[:, -1], states, segment_id)
        return self._to_log_probs(scores), state

    def _cache_length(self, sequences):
        """Cache slots for these prompts plus maxlen new tokens, rounded up to
        a multiple of length_bucket (fewer compiled shapes)."""
        needed = max(len(s) for s in sequences) + self.maxlen
        max_length = -(-needed // self.length_bucket) * self.length_bucket
        limit = self.incremental.transformer.decoding_max_length
        return limit if limit is not None and max_length > limit >= needed else max_length
