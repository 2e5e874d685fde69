"""Cached decoding equals uncached full-prefix recomputation, token for token."""
import keras
import numpy as np
import pytest

from bert4keras import build_transformer_model
from bert4keras.generation import CachedDecoder, IncrementalModel, compiled_inference
from bert4keras.snippets import AutoRegressiveDecoder, sequence_padding

VOCAB = 40
END = 3


def tiny_model(application, model="bert", seed=0):
    keras.utils.set_random_seed(seed)
    return build_transformer_model(
        model=model,
        application=application,
        with_mlm=True,
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position=64,
        initializer_range=0.5,  # large weights: decisive, input-dependent argmaxes
    )


class FullPrefixDecoder(AutoRegressiveDecoder):
    """The reference: re-runs the whole prompt + output at every step."""

    def __init__(self, model, application, **kwargs):
        super().__init__(**kwargs)
        self.run, self.application = compiled_inference(model), application

    @AutoRegressiveDecoder.wraps(default_rtype="probas")
    def predict(self, inputs, output_ids, states):
        token_ids, segment_ids = [], []
        for r in range(len(output_ids)):
            prompt = np.asarray(inputs[0][r])
            prompt = prompt[prompt != 0]
            token_ids.append(np.concatenate([prompt, output_ids[r]]))
            target_segment = 1 if self.application == "unilm" else 0
            segment_ids.append([0] * len(prompt) + [target_segment] * len(output_ids[r]))
        # Right padding to one fixed shape (one compilation): the LM and UniLM
        # masks keep later padding invisible to the positions read here.
        rows = len(token_ids)
        lengths = [len(t) for t in token_ids]
        token_ids = sequence_padding(token_ids + [[0]] * (16 - rows), length=24)
        segment_ids = sequence_padding(segment_ids + [[0]] * (16 - rows), length=24)
        probas = keras.ops.convert_to_numpy(self.run([token_ids, segment_ids]))[:rows]
        return probas[np.arange(rows), np.array(lengths) - 1]


PROMPTS = [[2, 7, 9, 11, 5], [2, 13, 4], [2, 21, 22, 23, 24, 25, 26]]


@pytest.mark.parametrize("application", ["lm", "unilm"])
def test_cached_greedy_and_beam_equal_full_prefix(application):
    model = tiny_model(application)
    cached = CachedDecoder(model, start_id=None, end_id=END, maxlen=6)
    full = FullPrefixDecoder(model, application, start_id=None, end_id=END, maxlen=6)
    inputs = [np.array(PROMPTS[0]), np.zeros(len(PROMPTS[0]), "int32")]  # batch 1
    for topk in (1, 3):
        np.testing.assert_array_equal(
            cached.beam_search(inputs, topk=topk), full.beam_search(inputs, topk=topk)
        )
    # batch > 1, prompts of different lengths (padding inside the batch)
    batch = [[np.array(p), np.zeros(len(p), "int32")] for p in PROMPTS]
    for topk in (1, 3):
        got = cached.beam_search_batch(batch, topk=topk)
        want = [full.beam_search(x, topk=topk) for x in batch]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_cached_sampling_is_reproducible_and_matches_full():
    model = tiny_model("lm", seed=3)
    cached = CachedDecoder(model, start_id=None, end_id=END, maxlen=6)
    full = FullPrefixDecoder(model, "lm", start_id=None, end_id=END, maxlen=6)
    inputs = [np.array(PROMPTS[0]), np.zeros(5, "int32")]
    a = cached.random_sample(inputs, n=4, topk=5, seed=7)
    b = cached.random_sample(inputs, n=4, topk=5, seed=7)
    c = full.random_sample(inputs, n=4, topk=5, seed=7)
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


def test_cached_decoding_needs_lm_or_unilm():
    with pytest.raises(ValueError, match="application='lm' or 'unilm'"):
        IncrementalModel(tiny_model("encoder"))


def test_decoding_beyond_max_position_is_an_error():
    decoder = CachedDecoder(tiny_model("lm"), start_id=None, end_id=END, maxlen=100)
    with pytest.raises(ValueError, match="max_position=64"):
        decoder.beam_search([np.array(PROMPTS[0]), np.zeros(5, "int32")], topk=1)


def test_gpt2_batch_with_real_token_zero_matches_one_by_one():
    """GPT-2 has no padding id (0 is a real token): batch prompts are padded with -1."""
    keras.utils.set_random_seed(5)
    gpt2 = build_transformer_model(
        model="gpt2", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position=64, initializer_range=0.5,
    )
    decoder = CachedDecoder(gpt2, start_id=None, end_id=END, maxlen=5)
    prompts = [[5, 0, 7, 9], [0, 11], [4, 4, 0, 6, 8, 10]]
    batched = decoder.beam_search_batch([[np.array(p)] for p in prompts], topk=2, pad_value=-1)
    for prompt, got in zip(prompts, batched):
        np.testing.assert_array_equal(got, decoder.beam_search([np.array(prompt)], topk=2))


class T5FullPrefixDecoder(AutoRegressiveDecoder):
    """The T5 reference: re-runs encoder and decoder over the whole output at every step."""

    def __init__(self, t5, **kwargs):
        super().__init__(**kwargs)
        self.run = compiled_inference(t5.model)

    @AutoRegressiveDecoder.wraps(default_rtype="probas")
    def predict(self, inputs, output_ids, states):
        # Padded to one fixed shape (one compilation): padded source tokens
        # are masked by the encoder and cross-attention, and later decoder
        # positions are invisible to the causal position read here.
        rows, length = output_ids.shape
        assert rows <= 16 and length <= 8 and np.shape(inputs[0])[1] <= 16, "the fixed shape is too small"
        sources = sequence_padding(list(inputs[0]) + [[0]] * (16 - rows), length=16)
        outputs = sequence_padding(list(output_ids) + [[0]] * (16 - rows), length=8)
        probas = keras.ops.convert_to_numpy(self.run([sources.astype("int32"), outputs.astype("int32")]))
        return probas[:rows, length - 1]


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")  # the reference's first step
@pytest.mark.parametrize("version", ["t5.1.0", "t5.1.1"])
def test_t5_cached_decoding_equals_full_recomputation(version):
    keras.utils.set_random_seed(2)
    t5 = build_transformer_model(
        model=version, vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_decoder_layers=3,
        num_attention_heads=2, intermediate_size=24, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, initializer_range=0.5, return_keras_model=False,
    )
    cached = CachedDecoder(t5, start_id=0, end_id=END, maxlen=7)
    full = T5FullPrefixDecoder(t5, start_id=0, end_id=END, maxlen=7)
    sources = [[np.array(p)] for p in PROMPTS]  # different lengths: padded sources in the batch
    for topk in (1, 3):
        got = cached.beam_search_batch(sources, topk=topk)
        for source, g in zip(sources, got):
            np.testing.assert_array_equal(g, full.beam_search(source, topk=topk))
    a = cached.random_sample(sources[0], n=3, topk=5, seed=1)
    b = full.random_sample(sources[0], n=3, topk=5, seed=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="give start_id"):
        CachedDecoder(t5, start_id=None, end_id=END, maxlen=7)
