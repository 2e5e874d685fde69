"""The HTTP server (`bert4keras.serving`, `bert4keras serve`).

All traffic goes to 127.0.0.1 on a free port, with a bounded number of
requests, each with a timeout, and every server is stopped at the end of
its test. One test starts the real command in a subprocess; the others run
the same app with uvicorn in a thread (no second TensorFlow start-up).
"""
import contextlib
import doctest
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from itertools import product

import keras
import numpy as np
import pytest

from bert4keras import build_transformer_model, cli, serving
from bert4keras.heads import ConditionalRandomField
from bert4keras.tokenizers import Tokenizer

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the", "a",
    "is", "very", "not", "fun", "boring", "plot", "actors",
]
TINY = dict(
    vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=32, max_position=64,
)
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(vocab_path):
    return Tokenizer(str(vocab_path))


def _classifier():
    bert = build_transformer_model(with_pool=True, **TINY)
    return keras.Model(bert.inputs, keras.layers.Dense(3, activation="softmax", name="sentiment")(bert.output))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port, method, path, body=None, timeout=60):
    """(status, decoded JSON) of one request to 127.0.0.1:port."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.contextmanager
def _thread_server(predictor):
    """The serving app under uvicorn in a thread; yields its port."""
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(serving.create_app(predictor), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _probabilities(model, tokenizer, text):
    token_ids, segment_ids = tokenizer.encode(text)
    return keras.ops.convert_to_numpy(model([np.array([token_ids]), np.array([segment_ids])]))[0]


def test_serve_command_end_to_end(tmp_path, vocab_path, tokenizer):
    model = _classifier()
    model.save(tmp_path / "classifier.keras")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    command = [
        sys.executable, "-m", "bert4keras.serving", "--model", str(tmp_path / "classifier.keras"),
        "--vocab", str(vocab_path), "--task", "classify", "--labels", ",".join(LABELS),
        "--maxlen", "8", "--max-batch", "4", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning",
    ]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    try:
        deadline = time.monotonic() + 180  # TensorFlow start-up on a busy 2-core machine
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not answer /health in time"
            try:
                status, health = _request(port, "GET", "/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.5)
        assert status == 200
        assert health == {"status": "ok", "task": "classify", "maxlen": 8, "max_batch": 4,
                          "output": "sentiment", "labels": LABELS}

        # One text: the label is the argmax of the model's own probabilities.
        status, answer = _request(port, "POST", "/predict", {"text": "good movie"})
        expected = _probabilities(model, tokenizer, "good movie")
        assert status == 200 and list(answer["scores"]) == LABELS
        np.testing.assert_allclose([answer["scores"][k] for k in LABELS], expected, rtol=0, atol=1e-5)
        assert answer["label"] == LABELS[int(np.argmax(expected))]

        # A batch of texts of different lengths: padding changes nothing.
        texts = ["the plot is boring", "fun"]
        status, answer = _request(port, "POST", "/predict", {"texts": texts})
        assert status == 200 and len(answer["results"]) == 2
        for text, result in zip(texts, answer["results"]):
            expected = _probabilities(model, tokenizer, text)
            np.testing.assert_allclose([result["scores"][k] for k in LABELS], expected, rtol=0, atol=1e-5)

        # Bad requests: a 4xx with a message saying what to fix.
        cases = [
            (b'{"text": "good', 400, "not valid JSON"),
            ({}, 422, "Missing field"),
            ({"text": 42}, 422, "'text' must be a string"),
            ({"texts": ["fun"] * 5}, 422, "at most 4 (--max-batch)"),
            # 9 words + [CLS] + [SEP] = 11 tokens > --maxlen 8
            ({"text": "the movie is very very good and not boring"}, 422, "11 tokens"),
        ]
        for body, code, message in cases:
            status, answer = _request(port, "POST", "/predict", body)
            assert status == code and message in answer["error"], (body, status, answer)
        assert "--maxlen" in answer["error"]
        status, answer = _request(port, "GET", "/nowhere")
        assert status == 404 and "POST /predict" in answer["error"]
        status, answer = _request(port, "GET", "/predict")
        assert status == 405

        # Still serving after the errors.
        assert _request(port, "GET", "/health")[0] == 200
        status, answer = _request(port, "POST", "/predict", {"text": "bad actors"})
        assert status == 200 and answer["label"] in LABELS
        assert server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)
        log.close()


def test_embed_mean_pools_real_tokens(tokenizer):
    encoder = build_transformer_model(**TINY)
    predictor = serving.Predictor(encoder, tokenizer, "embed")
    assert predictor.maxlen == 64  # from the position embedding
    texts = ["good movie", "the actors are not fun"]
    with _thread_server(predictor) as port:
        status, answer = _request(port, "POST", "/predict", {"texts": texts})
    assert status == 200
    for text, result in zip(texts, answer["results"]):
        # Reference: the text alone (no padding), averaged over all its positions.
        token_ids, segment_ids = tokenizer.encode(text)
        hidden = keras.ops.convert_to_numpy(encoder([np.array([token_ids]), np.array([segment_ids])]))[0]
        np.testing.assert_allclose(result["embedding"], hidden.mean(0), rtol=0, atol=1e-5)


def test_tag_with_crf_is_the_best_path(tokenizer):
    bert = build_transformer_model(**TINY)
    dense = keras.layers.Dense(3, name="emissions")
    crf = ConditionalRandomField(name="CRF")
    model = keras.Model(bert.inputs, crf([dense(bert.output), bert.inputs[0]]))
    # Emissions ~ (1, 0, 0.5) + a small token-dependent part: the per-token
    # argmax is tag 0 everywhere, while the transitions make 1 -> 1 the best
    # path, so the test tells Viterbi from an argmax on every backend.
    dense.kernel.assign(0.01 * keras.ops.convert_to_numpy(dense.kernel))
    dense.bias.assign(np.array([1.0, 0.0, 0.5], "float32"))
    trans = np.array([[0.5, -1.0, 0.0], [-1.0, 3.0, -1.0], [0.0, -1.0, 0.2]], "float32")
    crf._trans.assign(trans)
    tags = ["O", "B", "I"]
    predictor = serving.Predictor(model, tokenizer, "tag", labels=tags)
    assert predictor.crf is crf
    texts = ["good movie", "the plot"]
    with _thread_server(predictor) as port:
        status, answer = _request(port, "POST", "/predict", {"texts": texts})
    assert status == 200
    differs_from_argmax = False
    for text, result in zip(texts, answer["results"]):
        token_ids, segment_ids = tokenizer.encode(text)
        scores = keras.ops.convert_to_numpy(model([np.array([token_ids]), np.array([segment_ids])]))[0]
        # Brute force over all 3**4 paths of [CLS] w1 w2 [SEP].
        best = max(
            product(range(3), repeat=len(token_ids)),
            key=lambda path: sum(scores[t, k] for t, k in enumerate(path))
            + sum(trans[a, b] for a, b in zip(path, path[1:])),
        )
        assert result["tokens"] == tokenizer.ids_to_tokens(token_ids[1:-1])
        assert result["tags"] == [tags[k] for k in best[1:-1]]
        differs_from_argmax |= list(best) != scores.argmax(-1).tolist()
    assert differs_from_argmax  # the test tells Viterbi from a per-token argmax


def _greedy_reference(model, prompt, segments, end_id, steps):
    """Greedy decoding by an explicit loop over full prefixes."""
    generated = []
    for _ in range(steps):
        tokens = np.array([prompt + generated])
        inputs = [tokens] if segments is None else [tokens, np.array([segments + [1] * len(generated)])]
        next_id = int(np.argmax(keras.ops.convert_to_numpy(model(inputs))[0, -1]))
        if next_id == end_id:
            break
        generated.append(next_id)
    return generated


def _no_end_token(model, end_id):
    """Zero the end token's embedding row (tied LM head): its logit is then
    0 while others are not, so generation runs the full length."""
    embedding = model.get_layer("Embedding-Token").embeddings
    value = keras.ops.convert_to_numpy(embedding).copy()
    value[end_id] = 0
    embedding.assign(value * 5)


def test_generate_lm_and_unilm_greedy(tokenizer):
    end_id = tokenizer.token_end_id
    lm = build_transformer_model(model="gpt2", **TINY)
    unilm = build_transformer_model(application="unilm", with_mlm=True, **TINY)
    for model in (lm, unilm):
        _no_end_token(model, end_id)
    token_ids, _ = tokenizer.encode("good movie")
    references = {
        "lm": _greedy_reference(lm, token_ids[:-1], None, end_id, 4),  # continues the text
        "unilm": _greedy_reference(unilm, token_ids, [0] * len(token_ids), end_id, 4),  # answers it
    }
    for name, model in (("lm", lm), ("unilm", unilm)):
        predictor = serving.Predictor(model, tokenizer, "generate", maxlen=16, max_new_tokens=4)
        with _thread_server(predictor) as port:
            status, answer = _request(port, "POST", "/predict", {"text": "good movie"})
        assert status == 200
        assert len(references[name]) == 4 and answer["token_ids"] == references[name], name
        assert answer["text"] == tokenizer.decode(references[name])


def test_bad_configurations_are_refused_at_start(tokenizer, tmp_path, capsys):
    classifier = _classifier()
    encoder = build_transformer_model(**TINY)
    with pytest.raises(ValueError, match=r"needs a model output of shape \(batch, classes\)"):
        serving.Predictor(encoder, tokenizer, "classify")
    with pytest.raises(ValueError, match="2 labels given .* has 3 classes"):
        serving.Predictor(classifier, tokenizer, "classify", labels=["a", "b"])
    with pytest.raises(ValueError, match="more than the model's 64 positions"):
        serving.Predictor(classifier, tokenizer, "classify", maxlen=100)
    with pytest.raises(ValueError, match="task must be one of"):
        serving.Predictor(classifier, tokenizer, "summarize")
    both = build_transformer_model(with_pool=True, with_mlm=True, **TINY)
    with pytest.raises(ValueError, match="several outputs .* --output"):
        serving.Predictor(both, tokenizer, "embed")
    assert serving.Predictor(both, tokenizer, "embed", output="Pooler-Dense").output_index == 0
    with pytest.raises(SystemExit):
        serving.main(["--model", str(tmp_path / "missing.keras"), "--vocab", str(tmp_path / "v.txt")])
    assert "missing.keras' does not exist" in capsys.readouterr().err


def test_docstring_examples():
    result = doctest.testmod(serving)
    assert result.attempted >= 8 and result.failed == 0


def test_cli_dispatch(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: bert4keras serve") and "--vocab" in usage and "--task" in usage
    seen = []
    monkeypatch.setattr("bert4keras.convert.main", lambda argv=None: seen.append(argv))
    cli.main(["convert", "hf_folder", "out_folder", "--model", "bert"])
    assert seen == [["hf_folder", "out_folder", "--model", "bert"]]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bogus"])
    assert exit_info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
