"""The examples: every script's --smoke run end to end, and their data helpers.

Each smoke run is a subprocess on the current Keras backend (KERAS_BACKEND is
inherited); it must exit with 0 and print its final metric line. On JAX the
sentiment and NER examples run (the others are TensorFlow-checked only, as CI
promises). The Chinese model the examples share is made once per session in
a temporary cache, as a new user's first run makes it.
"""
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import chinese_model  # noqa: E402
import datasets  # noqa: E402

# script, extra arguments, the final line it must print
SMOKE_RUNS = {
    "sentiment": (["--save", "{tmp}/sentiment.keras"], r"^test accuracy: [\d.]+%  \(character-bigram logistic regression: [\d.]+%\)$"),
    "ner_crf": (["--text", "国家主席江泽民在北京会见了安南。"], r"^entity F1: [\d.]+%  \(precision [\d.]+%, recall [\d.]+%\)$"),
    "ner_globalpointer": (["--text", "国家主席江泽民在北京会见了安南。"], r"^entity F1: [\d.]+%  \(precision [\d.]+%, recall [\d.]+%\)$"),
    "cws_crf": (["--text", "他来到了网易杭研大厦"], r"^word F1: [\d.]+%  \(precision [\d.]+%, recall [\d.]+%\)$"),
    "unilm_punctuation": ([], r"^punctuation F1: [\d.]+%  \(precision [\d.]+%, recall [\d.]+%; '。 at the end' alone: [\d.]+%\)$"),
    "semantic_search": (["--query", "how do I catch an error?"], r"^title -> page retrieval over \d+ pages: hit@1 [\d.]+%, hit@5 [\d.]+%, MRR [\d.]+ .*\)$"),
    "simbert": (["--text", "国务院总理李鹏今天会见了日本客人。"], r"^adjacent-sentence retrieval, after training: hit@1 [\d.]+%, hit@10 [\d.]+%, MRR [\d.]+$"),
    "training_tricks": (["--grad-accum-steps", "2", "--ema", "0.9", "--adversarial", "0.5", "--recompute"], r"^test accuracy: [\d.]+%$"),
    "sentence_similarity": ([], r"^queries whose best match is the intended sentence: \d+/\d+$"),
}
ON_JAX = ("sentiment", "ner_crf", "ner_globalpointer")
SCRIPTS = sorted(SMOKE_RUNS) if keras.backend.backend() != "jax" else list(ON_JAX)


@pytest.fixture(scope="session")
def example_env(tmp_path_factory):
    """Environment of the smoke runs: a fresh model cache, made once here."""
    env = dict(os.environ, BERT4KERAS_CACHE=str(tmp_path_factory.mktemp("cache")), TF_CPP_MIN_LOG_LEVEL="3")
    code = "import chinese_model; chinese_model.prepare()"
    subprocess.run([sys.executable, "-c", code], cwd=EXAMPLES, env=env, check=True, timeout=600)
    return env


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run(script, example_env, tmp_path):
    arguments, final_line = SMOKE_RUNS[script]
    command = [sys.executable, os.path.join(EXAMPLES, f"{script}.py"), "--smoke"]
    command += [a.format(tmp=tmp_path) for a in arguments]
    result = subprocess.run(command, env=example_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.match(final_line, last), f"last line of {script}: {last!r}"
    if script == "sentiment":
        assert os.path.getsize(tmp_path / "sentiment.keras") > 0


# -- the data helpers ----------------------------------------------------------


def test_review_split_is_fixed_disjoint_and_deduplicated():
    train, test = datasets.split_reviews()
    assert (len(train), len(test)) == (15627, 1736)
    texts = [text for text, _ in train + test]
    assert len(set(texts)) == len(texts)
    assert datasets.split_reviews() == (train, test)
    assert {label for _, label in train} == {0, 1}


def test_people_daily_entities_and_segmentation_agree():
    entities = datasets.load_people_daily_entities("test", maxlen=64)
    segmentation = datasets.load_segmentation("test", maxlen=64)
    assert [text for text, _ in entities] == [text for text, _ in segmentation]
    assert all(len(text) == len(tags) for text, tags in segmentation)
    train_lines, test_lines = datasets._people_daily_lines("train"), datasets._people_daily_lines("test")
    assert not set(train_lines) & set(test_lines) and len(train_lines) + len(test_lines) == 19484
    # The corpus' second paragraph, checked by hand: 中共中央/nt 总书记/n 、/w 国家/n 主席/n 江/nr 泽民/nr.
    text, spans = datasets.load_people_daily_entities("all", maxlen=64)[1]
    assert text == "中共中央总书记、国家主席江泽民"
    assert [(text[s:e], kind) for s, e, kind in spans] == [("中共中央", "ORG"), ("江泽民", "PER")]


def test_extend_vocabulary_by_hand(tmp_path):
    base = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "hello", "world", "##s", "中", "a"]
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in base), encoding="utf-8")
    token_dict, keep, new = chinese_model.extend_vocabulary(str(path), ["中文文本 hellos", "文本。"])
    assert new == ["文", "本", "。"]  # by frequency; 中 is known; letters are not standalone
    assert keep == [0, 1, 2, 3, 4, 6, 8, 9, 10]  # [unused0] and unused 'world' dropped, single characters kept
    assert list(token_dict) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "##s", "中", "a", "文", "本", "。"]
    assert list(token_dict.values()) == list(range(12))


def test_cooccurrence_vectors_group_characters_used_alike():
    # 甲 and 乙 appear in the same contexts, 丙 in others.
    texts = ["你甲好", "你乙好", "我丙他", "你甲好", "我丙他", "你乙好"]
    vectors = chinese_model.cooccurrence_vectors(texts, list("甲乙丙你好我他"), dim=3)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    assert vectors[0] @ vectors[1] > 0.99 and abs(vectors[0] @ vectors[2]) < 0.1


@pytest.fixture(scope="module")
def test_tokenizer():
    """The Chinese model's tokenizer without the model (the vocabulary step only)."""
    from bert4keras.tokenizers import Tokenizer

    texts = chinese_model.training_texts()
    token_dict, _, _ = chinese_model.extend_vocabulary(os.path.join(chinese_model.minilm_folder(), "vocab.txt"), texts)
    return Tokenizer(token_dict, do_lower_case=True)


def test_ner_labels_decode_back_to_the_gold_entities(test_tokenizer):
    """Perfect tags/spans give F1 = 1 through rematch: the encoding loses nothing."""
    import ner_crf
    import ner_globalpointer

    from bert4keras.heads import decode_spans

    for text, entities in datasets.load_people_daily_entities("test", maxlen=64)[:500]:
        _, labels, mapping, _ = ner_crf.encode(test_tokenizer, text, entities, 64)
        assert set(ner_crf.entities_from_tags(labels, mapping)) == set(entities)
        token_ids, spans, mapping, _ = ner_globalpointer.encode(test_tokenizer, text, entities, 64)
        scores = np.full((3, len(token_ids), len(token_ids)), -10.0)
        for kind, first, last in spans:
            scores[kind, first, last] = 10.0
        decoded = decode_spans(scores, mapping=mapping, categories=datasets.ENTITY_TYPES)
        assert {(s, e + 1, kind) for kind, s, e in decoded} == set(entities)


def test_segmentation_labels_decode_back_to_the_gold_words(test_tokenizer):
    import cws_crf

    samples = datasets.load_segmentation("test", maxlen=64)[:500]
    lost = 0
    for text, tags in samples:
        _, labels, mapping, gold = cws_crf.encode(test_tokenizer, text, tags, 64)
        predicted = set(cws_crf.words_from_token_tags(labels, mapping))
        lost += predicted != set(gold)
    # Only a token spanning two words (e.g. a number and a Latin letter) can lose a boundary.
    assert lost <= 2


def test_punctuation_marks_by_hand():
    import unilm_punctuation

    assert unilm_punctuation.strip_punctuation("你好,世界。") == "你好世界"
    assert unilm_punctuation.punctuation_marks("你好,世界。") == {(2, ",", 1), (4, "。", 1)}
    assert unilm_punctuation.punctuation_marks("“好”。") == {(0, "“", 1), (1, "”", 1), (1, "。", 1)}


def test_punctuation_restorer_only_inserts_marks_and_ends_on_a_final_one():
    """The decoding constraint by hand (uniform model scores), then a real cached beam search."""
    import unilm_punctuation

    from bert4keras import build_transformer_model
    from bert4keras.tokenizers import Tokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "你", "好", "世", "界", "，", "。", "！"]
    tokenizer = Tokenizer({token: i for i, token in enumerate(tokens)})
    model = build_transformer_model(
        vocab_size=len(tokens), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position=32, application="unilm", with_mlm=True,
    )
    source = np.array([2, 4, 5, 6, 7, 3])  # [CLS] 你好世界 [SEP]
    outputs = [[], [4, 5], [4, 8, 9], [4, 5, 6, 7], [4, 5, 6, 7, 9]]
    log_probs = np.full((len(outputs), len(tokens)), np.log(1 / len(tokens)))
    marks, no_mark = [8, 9, 10], np.log(1 - 1 / len(tokens))  # inside a sentence only ， (8) may go

    decoder = unilm_punctuation.PunctuationRestorer(model, tokenizer, mark_bias=1.0, start_id=None, maxlen=12)
    scores = decoder.constrain(log_probs, [source] * len(outputs), outputs)
    allowed = [set(np.flatnonzero(np.isfinite(row))) for row in scores]
    # no leading mark, <= 2 in a row, 。！ only at the end, then the end token
    assert allowed == [{4}, {6, 8}, {5}, {9, 10}, {3}]
    np.testing.assert_allclose(scores[1, 6], no_mark)
    np.testing.assert_allclose(scores[1, 8], np.log(1 / len(tokens)) + 1.0)  # the bias shifts the marks' log-odds
    assert scores[4, 3] == 0.0

    free = unilm_punctuation.PunctuationRestorer(model, tokenizer, final_marks="", start_id=None, maxlen=12)
    row = free.constrain(log_probs, [source], [[4, 5, 6, 7]])[0]
    assert set(np.flatnonzero(np.isfinite(row))) == {3, *marks}

    token_ids, segment_ids = tokenizer.encode("你好世界")
    output = tokenizer.decode(decoder.beam_search_batch([[token_ids, segment_ids]], topk=2)[0])
    assert unilm_punctuation.strip_punctuation(output.replace(" ", "")) == "你好世界" and output[-1] in "。！"


def test_punctuation_scores_by_hand():
    import unilm_punctuation

    scores = unilm_punctuation.punctuation_scores(["你好，世界。", "好！"], ["你好世界。", "好。"])
    # gold marks: 3, predicted: 2, right: 1 (the first sentence's 。)
    assert scores["precision"] == 0.5 and abs(scores["recall"] - 1 / 3) < 1e-12
    assert abs(scores["f1"] - 2 * 1 / (2 + 3)) < 1e-12 and scores["exact"] == 1.0
    assert abs(scores["baseline_f1"] - 2 * 1 / (2 + 3)) < 1e-12
