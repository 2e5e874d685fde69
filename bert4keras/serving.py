"""Serve a saved model and its tokenizer over HTTP with a JSON API.

    python -m bert4keras.serving --model m.keras --vocab vocab.txt \\
        --task classify --labels negative,positive --maxlen 128 --port 8000
    bert4keras serve ...            (the same)

The server listens on 127.0.0.1 unless `--host` says otherwise. Endpoints:

* `GET /health` -> `{"status": "ok", "task": ..., "maxlen": ..., ...}`
* `POST /predict` with `{"text": "..."}` -> one answer, or with
  `{"texts": ["...", ...]}` -> `{"results": [answer, ...]}`.

Answers by `--task`:

| task | model output | answer |
| --- | --- | --- |
| `classify` | (batch, classes) | `{"label": "positive", "scores": {"negative": 0.1, "positive": 0.9}}` |
| `embed` | (batch, dim), or (batch, seq, dim) averaged over the real tokens | `{"embedding": [...]}` |
| `tag` | (batch, seq, tags); Viterbi when the output layer is a CRF | `{"tokens": [...], "tags": [...]}` |
| `generate` | (batch, seq, vocab) of an LM, UniLM or T5 model | `{"text": "...", "token_ids": [...]}` |

Bad requests get a 4xx answer `{"error": "<what was wrong and how to fix it>"}`
and the server keeps running: 400 for a body that is not JSON, 413 for a body
over `--max-body-bytes`, 422 for missing or mistyped fields, too many texts
(`--max-batch`) or a text longer than `--maxlen` tokens (start/end tokens
included); 404/405 for unknown paths/methods.

`Predictor` does the work without HTTP (usable on its own); `create_app`
wraps it in a Starlette app and `serve` runs that with uvicorn
(`pip install starlette uvicorn`, or `bert4keras[serve]`).
"""
import argparse
import json
import logging
import os
import threading

import numpy as np

from bert4keras.snippets import AutoRegressiveDecoder

TASKS = ("classify", "embed", "tag", "generate")
DEFAULT_MAXLEN = 512
logger = logging.getLogger("bert4keras.serving")


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------
# Predictor: texts -> JSON-ready answers
# ---------------------------------------------------------------------------


class Predictor:
    """Turns texts into answers with one model and tokenizer (no HTTP here).

    model: a keras.Model whose inputs are token ids (and optionally segment
    ids), as built by `build_transformer_model` or reloaded with
    `keras.models.load_model`. task: one of TASKS. labels: class names
    (classify) or tag names (tag); default "0", "1", ... maxlen: the longest
    accepted text in tokens, start/end tokens included. output: the model
    output to use when it has several (its name). For `generate`:
    max_new_tokens and beam_size (1: greedy).

    >>> import keras
    >>> from bert4keras import build_transformer_model
    >>> from bert4keras.tokenizers import Tokenizer
    >>> tokenizer = Tokenizer({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "film": 5})
    >>> bert = build_transformer_model(vocab_size=6, hidden_size=8, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=16, with_pool=True)
    >>> model = keras.Model(bert.inputs, keras.layers.Dense(2, activation="softmax")(bert.output))
    >>> predictor = Predictor(model, tokenizer, "classify", labels=["negative", "positive"])
    >>> answer = predictor.predict(["good film"])[0]
    >>> answer["label"] in ("negative", "positive"), sorted(answer["scores"])
    (True, ['negative', 'positive'])
    """

    def __init__(
        self,
        model,
        tokenizer,
        task,
        labels=None,
        maxlen=None,
        max_batch=32,
        output=None,
        max_new_tokens=32,
        beam_size=1,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}.")
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.input_roles = _input_roles(model, task)
        self.output_index = _output_index(model, output)
        self.output_name = model.output_names[self.output_index]
        self.output_shape = tuple(model.outputs[self.output_index].shape)
        positions = _position_limit(model)
        self.maxlen = int(maxlen or min(DEFAULT_MAXLEN, positions or DEFAULT_MAXLEN))
        if self.maxlen < 2:
            raise ValueError(f"maxlen must be at least 2 (the start and end tokens); got {maxlen}.")
        if positions is not None and self.maxlen > positions:
            raise ValueError(
                f"maxlen={self.maxlen} is more than the model's {positions} positions; "
                f"use --maxlen {positions} or less."
            )
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int; got {max_batch!r}.")
        self.max_batch = max_batch
        self.labels = None if labels is None else [str(label) for label in labels]
        self.decoder = None
        getattr(self, f"_setup_{task}")(positions, max_new_tokens, beam_size)

    # -- per-task checks at start-up ------------------------------------------

    def _need_rank(self, rank, what):
        if len(self.output_shape) not in rank:
            raise ValueError(
                f"--task {self.task} needs a model output of shape {what}; output "
                f"{self.output_name!r} has shape {self.output_shape}."
            )

    def _check_labels(self, count, what):
        if self.labels is None:
            if count is None:
                raise ValueError(f"The number of {what} is unknown; pass --labels.")
            self.labels = [str(i) for i in range(count)]
        elif count is not None and len(self.labels) != count:
            raise ValueError(
                f"{len(self.labels)} labels given ({', '.join(self.labels)}) but the model "
                f"output {self.output_name!r} has {count} {what}."
            )

    def _setup_classify(self, *_):
        self._need_rank((2,), "(batch, classes)")
        self._check_labels(self.output_shape[-1], "classes")

    def _setup_embed(self, *_):
        self._need_rank((2, 3), "(batch, dim) or (batch, seq, dim)")

    def _setup_tag(self, *_):
        self._need_rank((3,), "(batch, seq, tags)")
        self._check_labels(self.output_shape[-1], "tags")
        layer = self.model.get_layer(self.output_name)
        self.crf = layer if hasattr(layer, "decode") and hasattr(layer, "trans") else None

    def _setup_generate(self, positions, max_new_tokens, beam_size):
        self._need_rank((3,), "(batch, seq, vocab)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}.")
        if not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size must be a positive int; got {beam_size!r}.")
        mode = _generation_mode(self.input_roles)
        if positions is not None and mode != "seq2seq" and self.maxlen + max_new_tokens > positions:
            raise ValueError(
                f"maxlen ({self.maxlen}) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's {positions} positions; lower one of them."
            )
        self.beam_size = beam_size
        self.decoder = _TextGenerator(
            self.model, self.output_index, mode, self.tokenizer, max_new_tokens
        )

    # -- requests ------------------------------------------------------------

    def describe(self):
        """What GET /health reports."""
        info = {
            "status": "ok",
            "task": self.task,
            "maxlen": self.maxlen,
            "max_batch": self.max_batch,
            "output": self.output_name,
        }
        if self.labels is not None:
            info["labels"] = self.labels
        return info

    def encode(self, texts):
        """Token ids of each text; RequestError (422) for a text over maxlen."""
        if len(texts) > self.max_batch:
            raise RequestError(
                422,
                f"Too many texts: {len(texts)} in one request; this server takes at most "
                f"{self.max_batch} (--max-batch). Split the request.",
            )
        encoded = []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text)[0]
            if len(ids) > self.maxlen:
                where = "text" if len(texts) == 1 else f"texts[{i}]"
                raise RequestError(
                    422,
                    f"Text too long: {where} is {len(ids)} tokens (start/end tokens included); "
                    f"this server accepts at most {self.maxlen} (--maxlen). Shorten the text "
                    "or restart the server with a larger --maxlen.",
                )
            encoded.append(ids)
        return encoded

    def predict(self, texts):
        """Answers (JSON-ready dicts) for a list of texts."""
        encoded = self.encode(texts)
        if self.task == "generate":
            return [self.decoder.generate(ids, self.beam_size) for ids in encoded]
        token_ids = _pad(encoded, self.tokenizer.token_pad_id or 0)
        output = self._run(token_ids)
        return getattr(self, f"_answer_{self.task}")(output, token_ids, encoded)

    def _run(self, token_ids):
        inputs = _model_inputs(self.input_roles, token_ids)
        outputs = self.model(inputs, training=False)
        if isinstance(outputs, (list, tuple)):
            outputs = outputs[self.output_index]
        return np.asarray(_to_numpy(outputs), dtype="float64")

    def _answer_classify(self, output, token_ids, encoded):
        return [
            {
                "label": self.labels[int(np.argmax(row))],
                "scores": {label: float(v) for label, v in zip(self.labels, row)},
            }
            for row in output
        ]

    def _answer_embed(self, output, token_ids, encoded):
        if output.ndim == 3:  # mean over the real (non-padding) tokens
            real = (token_ids != (self.tokenizer.token_pad_id or 0)).astype("float64")
            output = (output * real[..., None]).sum(1) / real.sum(1, keepdims=True)
        return [{"embedding": row.tolist()} for row in output]

    def _answer_tag(self, output, token_ids, encoded):
        if self.crf is not None:
            paths = self.crf.decode(output, mask=token_ids != (self.tokenizer.token_pad_id or 0))
        else:
            paths = output.argmax(-1)
        has_start = self.tokenizer.token_start_id is not None
        has_end = self.tokenizer.token_end_id is not None
        answers = []
        for ids, path in zip(encoded, paths):
            keep = slice(int(has_start), len(ids) - int(has_end))
            answers.append(
                {
                    "tokens": self.tokenizer.ids_to_tokens(ids[keep]),
                    "tags": [self.labels[int(t)] for t in path[keep]],
                }
            )
        return answers


def _to_numpy(x):
    import keras

    return keras.ops.convert_to_numpy(x)


def _pad(rows, pad_id):
    out = np.full((len(rows), max(len(r) for r in rows)), pad_id, dtype="int32")
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


#: Model input names -> the role the server fills them with.
_ROLES = {
    "Input-Token": "token",
    "Input-Segment": "segment",
    "Input-Position": "position",
    "Encoder-Input-Token": "token",
    "Decoder-Input-Token": "decoder",
}


def _input_roles(model, task):
    names = [t.name for t in model.inputs]
    roles = [_ROLES.get(name) for name in names]
    if None in roles:
        # A model with its own input names: token ids first, then segment ids.
        if len(names) > 2:
            raise ValueError(
                f"Cannot tell what to feed the model inputs {names}; the server fills "
                f"{', '.join(_ROLES)} (or, by position, token ids then segment ids)."
            )
        roles = ["token", "segment"][: len(names)]
    if roles.count("token") != 1:
        raise ValueError(f"The model needs exactly one token-id input; its inputs are {names}.")
    if "decoder" in roles and task != "generate":
        raise ValueError(f"An encoder-decoder model (inputs {names}) serves only --task generate.")
    return roles


def _model_inputs(roles, token_ids, segment_ids=None, decoder_ids=None):
    values = {
        "token": token_ids,
        "segment": np.zeros_like(token_ids) if segment_ids is None else segment_ids,
        "position": np.broadcast_to(np.arange(token_ids.shape[1], dtype="int32"), token_ids.shape),
        "decoder": decoder_ids,
    }
    return [np.asarray(values[role], dtype="int32") for role in roles]


def _output_index(model, output):
    names = list(model.output_names)
    if output is None:
        if len(names) > 1:
            raise ValueError(f"The model has several outputs ({', '.join(names)}); pick one with --output.")
        return 0
    if output not in names:
        raise ValueError(f"--output {output!r} is not a model output; outputs: {', '.join(names)}.")
    return names.index(output)


def _position_limit(model):
    """The number of absolute positions the model embeds, or None (relative positions)."""
    from bert4keras.layers import PositionEmbedding

    def walk(layers):
        for layer in layers:
            yield layer
            yield from walk(getattr(layer, "layers", []))  # nested models

    limits = [
        layer.input_dim
        for layer in walk(model.layers)
        if isinstance(layer, PositionEmbedding) and not layer.hierarchical
    ]
    return min(limits) if limits else None


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def _generation_mode(roles):
    if "decoder" in roles:
        return "seq2seq"  # T5: the text goes to the encoder
    if "segment" in roles:
        return "unilm"  # the text is segment 0, the answer segment 1
    return "lm"  # the answer continues the text


def _log_probs(scores):
    """Next-token scores as log-probabilities, whether the head gives
    probabilities (softmax) or logits."""
    scores = np.asarray(scores, dtype="float64")
    if scores.min() >= 0 and np.allclose(scores.sum(-1), 1.0, atol=1e-3):
        return np.log(np.maximum(scores, 1e-300))
    scores = scores - scores.max(-1, keepdims=True)
    return scores - np.log(np.exp(scores).sum(-1, keepdims=True))


class _TextGenerator(AutoRegressiveDecoder):
    """Generation from a reloaded model: the whole prefix is run at each step
    (a reloaded file carries no key/value cache model)."""

    def __init__(self, model, output_index, mode, tokenizer, max_new_tokens):
        end_id = tokenizer.token_end_id
        start_id = tokenizer.token_start_id if mode == "seq2seq" else None
        if end_id is None:
            raise ValueError("Generation stops at the tokenizer's end token; this tokenizer has none.")
        super().__init__(start_id=start_id, end_id=end_id, maxlen=max_new_tokens)
        self.model, self.output_index, self.mode = model, output_index, mode
        self.roles = _input_roles(model, "generate")
        self.tokenizer = tokenizer

    @AutoRegressiveDecoder.wraps(default_rtype="logits")
    def predict(self, inputs, output_ids, states):
        prompt = inputs[0]  # one row per hypothesis
        if self.mode == "seq2seq":
            x = _model_inputs(self.roles, prompt, decoder_ids=output_ids)
        else:
            tokens = np.concatenate([prompt, output_ids], axis=1)
            segments = np.concatenate([np.zeros_like(prompt), np.ones_like(output_ids)], axis=1)
            x = _model_inputs(self.roles, tokens, segment_ids=segments)
        outputs = self.model(x, training=False)
        if isinstance(outputs, (list, tuple)):
            outputs = outputs[self.output_index]
        return _log_probs(_to_numpy(outputs)[:, -1])

    def generate(self, token_ids, beam_size):
        prompt = list(token_ids)
        if self.mode == "lm" and prompt and prompt[-1] == self.end_id:
            prompt = prompt[:-1]  # continue the text rather than start after its end
        ids = self.beam_search([np.array(prompt, dtype="int32")], topk=beam_size)
        ids = [int(i) for i in ids if i not in (self.start_id, self.end_id)]
        return {"text": self.tokenizer.decode(ids), "token_ids": ids}


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


def parse_request(body):
    """(texts, single) from a request body (bytes); RequestError when malformed.

    >>> parse_request(b'{"texts": ["a", "b"]}')
    (['a', 'b'], False)
    >>> parse_request(b'{"txt": "a"}')
    Traceback (most recent call last):
    ...
    bert4keras.serving.RequestError: Unknown field(s) 'txt'; send 'text' (a string) or 'texts' (a list of strings).
    """
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(
            400,
            f"Request body is not valid JSON ({error}). Send e.g. "
            '{"text": "..."} or {"texts": ["...", "..."]} with Content-Type: application/json.',
        ) from None
    if not isinstance(payload, dict):
        raise RequestError(
            422, f'The JSON body must be an object such as {{"text": "..."}}; got a {type(payload).__name__}.'
        )
    unknown = sorted(set(payload) - {"text", "texts"})
    if unknown:
        raise RequestError(
            422, f"Unknown field(s) {', '.join(map(repr, unknown))}; send 'text' (a string) or 'texts' (a list of strings)."
        )
    if "text" in payload and "texts" in payload:
        raise RequestError(422, "Give either 'text' or 'texts', not both.")
    if "text" in payload:
        if not isinstance(payload["text"], str):
            raise RequestError(422, f"'text' must be a string; got {type(payload['text']).__name__}.")
        return [payload["text"]], True
    if "texts" in payload:
        texts = payload["texts"]
        if not isinstance(texts, list) or not texts:
            raise RequestError(422, "'texts' must be a non-empty list of strings.")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise RequestError(422, f"'texts[{i}]' must be a string; got {type(text).__name__}.")
        return texts, False
    raise RequestError(422, "Missing field: send 'text' (a string) or 'texts' (a list of strings).")


def create_app(predictor, max_body_bytes=1 << 20):
    """A Starlette app serving `predictor` (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    lock = threading.Lock()  # one model call at a time

    def run(texts):
        with lock:
            return predictor.predict(texts)

    def error(status, message):
        return JSONResponse({"error": message}, status_code=status)

    async def health(request):
        return JSONResponse(predictor.describe())

    async def predict(request):
        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > max_body_bytes:
                raise RequestError(413, f"Request body too large: {length} bytes; the limit is {max_body_bytes}.")
            body = await request.body()
            if len(body) > max_body_bytes:
                raise RequestError(413, f"Request body too large: {len(body)} bytes; the limit is {max_body_bytes}.")
            texts, single = parse_request(body)
            results = await run_in_threadpool(run, texts)
        except RequestError as bad:
            return error(bad.status, bad.message)
        except Exception as failure:  # keep serving; the log has the traceback
            logger.exception("prediction failed")
            return error(500, f"Internal error while predicting: {type(failure).__name__}: {failure}")
        return JSONResponse(results[0] if single else {"results": results})

    async def http_error(request, exc):
        hints = {404: "Unknown path; use POST /predict or GET /health.", 405: "Method not allowed here."}
        return error(exc.status_code, hints.get(exc.status_code, exc.detail))

    return Starlette(
        routes=[Route("/health", health, methods=["GET"]), Route("/predict", predict, methods=["POST"])],
        exception_handlers={HTTPException: http_error},
    )


def load_predictor(model_path, vocab_path, task, do_lower_case=False, **kwargs):
    """A Predictor for a saved .keras model and a vocab.txt."""
    import keras

    import bert4keras  # noqa: F401  (registers the layers the file refers to)
    from bert4keras.tokenizers import Tokenizer

    for path, what in ((model_path, "--model"), (vocab_path, "--vocab")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} {path!r} does not exist.")
    model = keras.models.load_model(model_path, compile=False)
    tokenizer = Tokenizer(vocab_path, do_lower_case=do_lower_case)
    return Predictor(model, tokenizer, task, **kwargs)


def serve(predictor, host="127.0.0.1", port=8000, log_level="info", max_body_bytes=1 << 20):
    """Runs the HTTP server until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    uvicorn.run(create_app(predictor, max_body_bytes), host=host, port=port, log_level=log_level)


def _read_labels(value):
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [label.strip() for label in value.split(",")]


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a saved bert4keras model over HTTP (JSON API; see bert4keras.serving)."
    )
    parser.add_argument("--model", required=True, help="model file written by model.save('m.keras')")
    parser.add_argument("--vocab", required=True, help="the model's vocab.txt")
    parser.add_argument("--task", choices=TASKS, default="classify")
    parser.add_argument("--labels", help="class/tag names: 'neg,pos' or a file with one per line")
    parser.add_argument("--maxlen", type=int, default=None, help="longest accepted text in tokens")
    parser.add_argument("--do-lower-case", action="store_true", help="lowercase text (uncased vocab)")
    parser.add_argument("--output", help="which model output to use, by name, when it has several")
    parser.add_argument("--max-batch", type=int, default=32, help="most texts per request")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generate: most tokens generated")
    parser.add_argument("--beam-size", type=int, default=1, help="generate: beam width (1: greedy)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        predictor = load_predictor(
            args.model,
            args.vocab,
            args.task,
            do_lower_case=args.do_lower_case,
            labels=_read_labels(args.labels),
            maxlen=args.maxlen,
            max_batch=args.max_batch,
            output=args.output,
            max_new_tokens=args.max_new_tokens,
            beam_size=args.beam_size,
        )
    except (ValueError, FileNotFoundError) as problem:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    serve(predictor, args.host, args.port, args.log_level, args.max_body_bytes)


if __name__ == "__main__":
    main()
