"""Tokenizers: BERT WordPiece (`Tokenizer`) and SentencePiece (`SpTokenizer`).

`Tokenizer` gives the same token ids as Hugging Face's `BertTokenizer` (the
Python one) for the same vocab and `do_lower_case`. Two engines produce them:

* the Rust `tokenizers` package, used for every text whose characters it is
  known to treat exactly like the Python rules (checked one character at a
  time, the first time each character is seen, and cached);
* a pure-Python path for everything else (rare scripts, final sigma, lone
  surrogates, characters from a newer Unicode than Python's) and whenever a
  `pre_tokenize` hook is given. It caches the WordPiece split of each word.

Deliberate differences from `BertTokenizer`:

* a word longer than `word_maxlen` characters (default 200, HF: 100) becomes
  one `[UNK]`; words of 101..200 characters are therefore split into pieces
  here. Pass `word_maxlen=100` for HF's behaviour.
* truncation follows bert4keras (`truncate_from`, longest sequence first,
  ties cut from the first sequence), not HF's `longest_first`.

Example:

>>> vocab = {'[PAD]': 0, '[UNK]': 1, '[CLS]': 2, '[SEP]': 3, 'hello': 4,
...          'world': 5, '!': 6, '你': 7, '好': 8}
>>> tokenizer = Tokenizer(vocab, do_lower_case=True)
>>> tokenizer.tokenize('Hello, world!')
['[CLS]', 'hello', '[UNK]', 'world', '!', '[SEP]']
>>> tokenizer.encode('你好', 'hello')
([2, 7, 8, 3, 4, 3], [0, 0, 0, 0, 1, 1])
>>> tokenizer.rematch('Hello 你好', tokenizer.tokenize('Hello 你好'))
[[], [0, 1, 2, 3, 4], [6], [7], []]
"""
import itertools
import re
import unicodedata

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_AUTO = object()  # "pick the start/end token from the SentencePiece model"
_WORD_CACHE_SIZE = 1 << 17


# ---------------------------------------------------------------------------
# Character classes, as BERT defines them.
# ---------------------------------------------------------------------------
def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch):
    # Every "C*" category (control, format, private use, unassigned,
    # surrogate) is dropped, except the three whitespace controls.
    return ch not in "\t\n\r" and unicodedata.category(ch)[0] == "C"


def _is_removed(ch):
    return ch == "\x00" or ch == "\ufffd" or _is_control(ch)


def _is_punctuation(ch):
    cp = ord(ch)
    # All non-alphanumeric ASCII counts as punctuation ("$", "^", "`", ...).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch)[0] == "P"


def _is_cjk(ch):
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class _LazyTable(dict):
    """A `str.translate` table filled on first use of each code point."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def __missing__(self, cp):
        value = self[cp] = self.rule(chr(cp))
        return value


def _clean_rule(ch):  # drop controls, unify whitespace
    if _is_removed(ch):
        return None
    return " " if _is_whitespace(ch) else ch


def _clean_cjk_rule(ch):  # ... and put spaces around CJK characters
    if _is_cjk(ch) and not _is_removed(ch):  # (unassigned code points in CJK blocks go)
        return " " + ch + " "
    return _clean_rule(ch)


def _punct_rule(ch):
    return " " + ch + " " if _is_punctuation(ch) else ch


def _strip_punct_rule(ch):  # drop nonspacing marks (accents), space out punctuation
    if unicodedata.category(ch) == "Mn":
        return None
    return _punct_rule(ch)


def _strip_rule(ch):
    return None if unicodedata.category(ch) == "Mn" else ch


# ASCII text takes one fixed table: clean + punctuation in a single pass.
_ASCII_TABLE = {
    cp: None if _is_removed(chr(cp)) else _punct_rule(_clean_rule(chr(cp))) for cp in range(128)
}


def _lower_strip(text):
    """Lowercase, then drop accents the way BERT does (NFD, remove Mn)."""
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(ch for ch in text if unicodedata.category(ch) != "Mn")


# ---------------------------------------------------------------------------
# Vocab files.
# ---------------------------------------------------------------------------
def load_vocab(dict_path, encoding="utf-8", simplified=False, startswith=None, do_lower_case=False):
    """Read a BERT `vocab.txt`: one token a line, the id is the line number.

    With `simplified=True` returns `(token_dict, keep_tokens)`: the vocab
    without the tokens `Tokenizer` can never produce (multi-character tokens
    holding CJK characters, punctuation, whitespace or control characters and,
    with `do_lower_case=True`, characters that lowercasing/accent stripping
    would change), renumbered, and `keep_tokens`, the old id of each kept token
    (slice an embedding matrix with it). The tokens in `startswith` come first;
    `[PAD]`/`[UNK]`/`[CLS]`/`[SEP]`/`[MASK]` are always kept.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), 'vocab.txt')
    >>> save_vocab(path, {'[PAD]': 0, '[UNK]': 1, '##的': 2, 'ok': 3})
    >>> load_vocab(path, simplified=True)
    ({'[PAD]': 0, '[UNK]': 1, 'ok': 2}, [0, 1, 3])
    """
    with open(dict_path, encoding=encoding) as reader:
        # Same rule as HF: strip only the newline, a later duplicate wins.
        token_dict = {line.rstrip("\n"): i for i, line in enumerate(reader)}
    if not simplified:
        return token_dict

    startswith = list(startswith or [])
    missing = [t for t in startswith if t not in token_dict]
    if missing:
        raise KeyError(f"load_vocab: startswith tokens {missing} are not in {dict_path}")
    new_dict, keep_tokens = {}, []
    for token in startswith:
        if token not in new_dict:
            new_dict[token] = len(new_dict)
            keep_tokens.append(token_dict[token])
    for token, old_id in sorted(token_dict.items(), key=lambda kv: kv[1]):
        if token in new_dict:
            continue
        if token in SPECIAL_TOKENS or not _is_redundant(token, do_lower_case):
            new_dict[token] = len(new_dict)
            keep_tokens.append(old_id)
    return new_dict, keep_tokens


def _is_redundant(token, do_lower_case):
    """True when no text can make `Tokenizer` output `token`."""
    if token == "":
        return True
    stem = token[2:] if token.startswith("##") else token
    if stem == "" or any(_is_removed(c) or c.isspace() for c in stem):
        return True
    if len(token) > 1 and any(_is_cjk(c) or _is_punctuation(c) for c in stem):
        return True  # CJK characters and punctuation always stand alone
    return do_lower_case and _lower_strip(stem) != stem


def save_vocab(dict_path, token_dict, encoding="utf-8"):
    """Write `token_dict` (token -> id, ids 0..n-1) as a `vocab.txt`."""
    tokens = sorted(token_dict, key=token_dict.get)
    if [token_dict[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("save_vocab: token ids must be exactly 0..len(token_dict)-1")
    bad = [t for t in tokens if "\n" in t or "\r" in t]
    if bad:
        raise ValueError(f"save_vocab: tokens {bad[:5]} contain a newline and cannot be saved")
    with open(dict_path, "w", encoding=encoding, newline="\n") as writer:
        writer.write("".join(t + "\n" for t in tokens))


# ---------------------------------------------------------------------------
# Truncation and padding (shared by both tokenizers).
# ---------------------------------------------------------------------------
def _cut_lengths(lengths, maxlen):
    """Final lengths after bert4keras' loop: cut one token from the longest
    sequence (the first one on ties) until the total fits `maxlen`."""
    if len(lengths) == 1 or sum(lengths) <= maxlen:
        return [min(lengths[0], maxlen)] if len(lengths) == 1 else list(lengths)
    a, b = lengths
    excess = a + b - maxlen
    step = min(excess, abs(a - b))  # first bring the longer down to the shorter
    if a >= b:
        a -= step
    else:
        b -= step
    excess -= step
    return [a - (excess + 1) // 2, b - excess // 2]


def _delete_at(seq, index, count):
    """`seq` after `count` times `seq.pop(index)`, done in one slice."""
    if count <= 0:
        return seq
    n = len(seq)
    if index >= 0:
        if index + count > n:
            raise ValueError(
                f"truncate_from={index} cannot remove {count} tokens from a sequence of {n}"
            )
        return seq[:index] + seq[index + count:]
    first = n + index - count + 1
    if first < 0 or n + index < 0:
        raise ValueError(f"truncate_from={index} cannot remove {count} tokens from a sequence of {n}")
    return seq[:first] + seq[n + index + 1:]


def _check_text(value, name):
    if isinstance(value, str):
        return
    if isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{name} must be str, got bytes: decode it first, e.g. text.decode('utf-8')")
    raise TypeError(f"{name} must be str, got {type(value).__name__}")


class TokenizerBase:
    """The shared bert4keras interface: `tokenize`, `encode`, `encode_batch`,
    `decode`, `rematch` and the id/token conversions."""

    def __init__(self, token_start="[CLS]", token_end="[SEP]", pre_tokenize=None, token_translate=None):
        if pre_tokenize is not None and not callable(pre_tokenize):
            raise TypeError("pre_tokenize must be a function text -> list of words")
        if token_translate is not None and not isinstance(token_translate, dict):
            raise TypeError("token_translate must be a dict token -> token")
        self._token_pad, self._token_unk, self._token_mask = "[PAD]", "[UNK]", "[MASK]"
        self._token_start, self._token_end = token_start, token_end
        self._pre_tokenize = pre_tokenize
        self._token_translate = dict(token_translate or {})
        self._token_translate_inv = {v: k for k, v in self._token_translate.items()}

    # -- subclasses provide these ------------------------------------------
    def token_to_id(self, token):
        raise NotImplementedError

    def id_to_token(self, i):
        raise NotImplementedError

    def _content_ids(self, text):
        """Ids of `text` without start/end tokens (before token_translate)."""
        raise NotImplementedError

    def _content_ids_batch(self, texts):
        return [self._content_ids(t) for t in texts]

    def _content_tokens(self, text):
        return self.ids_to_tokens(self._content_ids(text))

    def _content_spans(self, text):
        """(tokens, [(start, end), ...]) of `text` without start/end tokens."""
        raise NotImplementedError

    # -- ids and tokens ------------------------------------------------------
    @property
    def vocab_size(self):
        return self._vocab_size

    token_pad_id = property(lambda self: self._token_pad_id)
    token_unk_id = property(lambda self: self._token_unk_id)
    token_mask_id = property(lambda self: self._token_mask_id)
    token_start_id = property(lambda self: self._token_start_id)
    token_end_id = property(lambda self: self._token_end_id)

    def tokens_to_ids(self, tokens):
        return [self.token_to_id(t) for t in tokens]

    def ids_to_tokens(self, ids):
        return [self.id_to_token(i) for i in ids]

    def _check_id(self, i):
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"token ids must be integers, got {type(i).__name__}")
        i = int(i)
        if not 0 <= i < self._vocab_size:
            raise IndexError(f"token id {i} is out of range for a vocab of {self._vocab_size} tokens")
        return i

    def _translated(self, ids):
        if not self._id_translate:
            return ids
        get = self._id_translate.get
        return [get(i, i) for i in ids]

    def _setup_translate(self):
        self._id_translate = {}
        for src, dst in self._token_translate.items():
            src_id = self.token_to_id(src)
            if src_id != self._token_unk_id or src == self._token_unk:
                self._id_translate[src_id] = self.token_to_id(dst)

    def _wrap(self, ids):
        start = [] if self._token_start is None else [self._token_start_id]
        end = [] if self._token_end is None else [self._token_end_id]
        return start + ids + end

    # -- tokenize / encode ---------------------------------------------------
    def tokenize(self, text, maxlen=None):
        """Tokens of `text` with the start/end tokens, cut to `maxlen` before the end token."""
        _check_text(text, "text")
        return self._finish_tokens(self._content_tokens(text), None, maxlen)[0]

    def tokenize_with_offsets(self, text, maxlen=None):
        """`(tokens, offsets)`: `text[start:end]` is the text each token came from.

        The added start/end tokens get `None`.
        """
        _check_text(text, "text")
        tokens, spans = self._content_spans(text)
        return self._finish_tokens(tokens, list(spans), maxlen)

    def _finish_tokens(self, tokens, spans, maxlen):
        tokens = [self._token_translate.get(t) or t for t in tokens]
        start = [] if self._token_start is None else [self._token_start]
        end = [] if self._token_end is None else [self._token_end]
        tokens = start + tokens + end
        if spans is not None:
            spans = [None] * len(start) + spans + [None] * len(end)
        if maxlen is not None:
            self._check_maxlen(maxlen, len(start) + len(end))
            index, count = -len(end) - 1, len(tokens) - maxlen
            tokens = _delete_at(tokens, index, count)
            if spans is not None:
                spans = _delete_at(spans, index, count)
        return tokens, spans

    def _check_maxlen(self, maxlen, minimum):
        if isinstance(maxlen, bool) or not isinstance(maxlen, (int, np.integer)):
            raise TypeError(f"maxlen must be an int or None, got {type(maxlen).__name__}")
        if maxlen < minimum:
            raise ValueError(
                f"maxlen={maxlen} is too small: the start/end tokens alone take {minimum} positions"
            )

    def _as_ids(self, value, name):
        """A text becomes start + content + end ids; a token list is converted as is."""
        if isinstance(value, str):
            return self._wrap(self._translated(self._content_ids(value)))
        if isinstance(value, (list, tuple)):
            for t in value:
                _check_text(t, f"every token in {name}")
            return self.tokens_to_ids(value)
        _check_text(value, name)

    def encode(self, first, second=None, maxlen=None, pattern="S*E*E", truncate_from="right"):
        """`(token_ids, segment_ids)` for one text or a pair of texts.

        `first`/`second` are strings, or token lists such as `tokenize` returns.
        `pattern`: 'S*E*E' gives `[CLS] a [SEP] b [SEP]`, 'S*ES*E' keeps the
        second `[CLS]`. `maxlen` (None: no limit) cuts tokens from the longer
        sequence, at the end ('right'), after the start token ('left') or at
        a given list index (an int, deleted repeatedly).
        """
        first_ids = self._as_ids(first, "first")
        second_ids = None if second is None else self._as_ids(second, "second")
        return self._build(first_ids, second_ids, maxlen, pattern, truncate_from)

    def _truncate_index(self, truncate_from):
        if truncate_from == "right":
            return -int(self._token_end is not None) - 1
        if truncate_from == "left":
            return int(self._token_start is not None)
        if isinstance(truncate_from, (int, np.integer)) and not isinstance(truncate_from, bool):
            return int(truncate_from)
        raise ValueError(f"truncate_from must be 'right', 'left' or an int index, got {truncate_from!r}")

    def _check_pattern(self, pattern):
        if pattern not in ("S*E*E", "S*ES*E"):
            raise ValueError(f"pattern must be 'S*E*E' or 'S*ES*E', got {pattern!r}")

    def _build(self, first_ids, second_ids, maxlen, pattern, truncate_from):
        self._check_pattern(pattern)
        drop_start = second_ids is not None and pattern == "S*E*E" and self._token_start is not None
        if maxlen is not None:
            n_special = int(self._token_start is not None) + int(self._token_end is not None)
            minimum = n_special if second_ids is None else 2 * n_special - int(drop_start)
            self._check_maxlen(maxlen, minimum)
            index = self._truncate_index(truncate_from)
            if second_ids is None:
                first_ids = _delete_at(first_ids, index, len(first_ids) - maxlen)
            else:
                # The second start token is still there while cutting (bert4keras).
                la, lb = _cut_lengths([len(first_ids), len(second_ids)], maxlen + int(drop_start))
                first_ids = _delete_at(first_ids, index, len(first_ids) - la)
                second_ids = _delete_at(second_ids, index, len(second_ids) - lb)
        if second_ids is None:
            return list(first_ids), [0] * len(first_ids)
        if drop_start:
            second_ids = second_ids[1:]
        return list(first_ids) + list(second_ids), [0] * len(first_ids) + [1] * len(second_ids)

    def encode_batch(self, first_texts, second_texts=None, maxlen=None, pattern="S*E*E",
                     truncate_from="right", length=None):
        """Encode many texts at once into padded arrays for `model.predict`.

        Returns `(token_ids, segment_ids)`, two int32 arrays of shape
        `(len(first_texts), L)`, padded at the end with the `[PAD]` id (segment
        id 0). `L` is the longest row, or `length` when given. Each row equals
        `encode(first, second, maxlen, pattern, truncate_from)`.

        >>> vocab = {'[PAD]': 0, '[UNK]': 1, '[CLS]': 2, '[SEP]': 3, 'a': 4, 'b': 5}
        >>> token_ids, segment_ids = Tokenizer(vocab).encode_batch(['a b a', 'b'])
        >>> token_ids.tolist()
        [[2, 4, 5, 4, 3], [2, 5, 3, 0, 0]]
        """
        firsts = self._check_batch(first_texts, "first_texts")
        if second_texts is not None:
            seconds = self._check_batch(second_texts, "second_texts")
            if len(seconds) != len(firsts):
                raise ValueError(
                    f"first_texts has {len(firsts)} texts but second_texts has {len(seconds)}"
                )
        if length is not None and (isinstance(length, bool) or not isinstance(length, (int, np.integer))):
            raise TypeError(f"length must be an int or None, got {type(length).__name__}")
        self._check_pattern(pattern)
        contents = [self._translated(ids) for ids in self._content_ids_batch(firsts)]
        if second_texts is None and truncate_from in ("right", "left"):
            return self._pad_single(contents, maxlen, truncate_from, length)
        wrap = self._wrap
        rows_a = [wrap(ids) for ids in contents]
        rows_b = (
            [wrap(self._translated(ids)) for ids in self._content_ids_batch(seconds)]
            if second_texts is not None else [None] * len(rows_a)
        )
        rows, seg_starts = [], []
        for a, b in zip(rows_a, rows_b):
            ids, segs = self._build(a, b, maxlen, pattern, truncate_from)
            rows.append(ids)
            seg_starts.append(len(segs) - sum(segs))
        return self._pad(rows, seg_starts, length)

    def _pad_single(self, contents, maxlen, truncate_from, length):
        """The common case of `encode_batch`, with the start/end tokens placed by numpy."""
        n_start, n_end = int(self._token_start is not None), int(self._token_end is not None)
        if maxlen is not None:
            self._check_maxlen(maxlen, n_start + n_end)
            keep = maxlen - n_start - n_end
            if truncate_from == "right":
                contents = [c if len(c) <= keep else c[:keep] for c in contents]
            else:
                contents = [c if len(c) <= keep else c[len(c) - keep:] for c in contents]
        n = len(contents)
        lengths = np.fromiter(map(len, contents), dtype=np.int64, count=n)
        longest = int(lengths.max()) + n_start + n_end if n else 0
        width = self._width(longest, length)
        token_ids = np.full((n, width), self._token_pad_id, dtype=np.int32)
        columns = np.arange(width)
        filled = (columns >= n_start) & (columns < (lengths + n_start)[:, None])
        token_ids[filled] = np.fromiter(
            itertools.chain.from_iterable(contents), dtype=np.int32, count=int(lengths.sum())
        )
        if n_start and n:
            token_ids[:, 0] = self._token_start_id
        if n_end:
            token_ids[np.arange(n), lengths + n_start] = self._token_end_id
        return token_ids, np.zeros((n, width), dtype=np.int32)

    @staticmethod
    def _width(longest, length):
        if length is None:
            return longest
        if length < longest:
            raise ValueError(
                f"length={length} is shorter than the longest encoded row ({longest} tokens); "
                f"pass maxlen={length} to truncate"
            )
        return int(length)

    def _check_batch(self, texts, name):
        if isinstance(texts, (str, bytes)):
            raise TypeError(f"{name} must be a list of strings; for one text use encode()")
        if isinstance(texts, np.ndarray):
            texts = texts.tolist()
        try:
            texts = list(texts)
        except TypeError:
            raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}") from None
        for i, t in enumerate(texts):
            _check_text(t, f"{name}[{i}]")
        return texts

    def _pad(self, rows, seg_starts, length):
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        width = self._width(int(lengths.max()) if len(rows) else 0, length)
        token_ids = np.full((len(rows), width), self._token_pad_id, dtype=np.int32)
        filled = np.arange(width) < lengths[:, None]
        token_ids[filled] = np.fromiter(
            itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum())
        )
        segment_ids = np.zeros((len(rows), width), dtype=np.int32)
        if seg_starts is not None:
            starts = np.asarray(seg_starts, dtype=np.int64).reshape(-1, 1)
            segment_ids[filled & (np.arange(width) >= starts)] = 1
        return token_ids, segment_ids

    # -- rematch ---------------------------------------------------------------
    def rematch(self, text, tokens):
        """Character positions in `text` of each token of `tokens`.

        `tokens` is what `tokenize(text)` (or `tokenize(text, maxlen)`)
        returned. Each entry is the list of indices `i` such that `text[i]`
        produced the token (`[]` for the added start/end tokens); an `[UNK]`
        maps to the whole word it replaced.
        """
        full_tokens, spans = self.tokenize_with_offsets(text)
        tokens = list(tokens)
        positions = _align(tokens, full_tokens, spans)
        return [[] if s is None else list(range(s[0], s[1])) for s in positions]

    def decode(self, ids):
        raise NotImplementedError


def _align(tokens, full_tokens, spans):
    """Spans for `tokens`, a copy of `full_tokens` that may miss one block (truncation)."""
    n, m = len(tokens), len(full_tokens)
    if tokens == full_tokens:
        return spans
    if n < m:
        prefix = 0
        while prefix < n and tokens[prefix] == full_tokens[prefix]:
            prefix += 1
        for keep in range(prefix, -1, -1):  # prefer the longest kept head (right truncation)
            tail = n - keep
            if tokens[keep:] == full_tokens[m - tail:]:
                return spans[:keep] + spans[m - tail:]
    # Anything else: match greedily in order, unmatched tokens get no position.
    out, j = [], 0
    for t in tokens:
        k = j
        while k < m and full_tokens[k] != t:
            k += 1
        if k < m:
            out.append(spans[k])
            j = k + 1
        else:
            out.append(None)
    return out


# ---------------------------------------------------------------------------
# WordPiece tokenizer.
# ---------------------------------------------------------------------------
class Tokenizer(TokenizerBase):
    """BERT WordPiece tokenizer with the bert4keras API.

    Args:
        token_dict: path of a `vocab.txt`, or a dict token -> id.
        do_lower_case: lowercase and strip accents (uncased models).
        word_maxlen: words longer than this many characters become `[UNK]`.
        pre_tokenize: optional function text -> words (e.g. `jieba.lcut`); a
            word found in the vocab is kept whole, others are split as usual.
            It receives the cleaned (and, if uncased, lowercased) text.
        token_translate: dict token -> token applied after tokenizing (and
            reversed by `decode`).
        token_start, token_end: tokens added around each text (None: none).
        engine: 'auto' (Rust where it is exact, Python otherwise) or 'python'.
            Both give the same ids. The Python engine caches the split of
            every word it has seen, so on a machine with few cores it is the
            faster one for large batches (see benchmarks/bench_tokenizers.py).

    >>> vocab = {'[PAD]': 0, '[UNK]': 1, '[CLS]': 2, '[SEP]': 3, 'un': 4, '##aff': 5, '##able': 6}
    >>> tokenizer = Tokenizer(vocab, do_lower_case=True)
    >>> tokenizer.tokenize('UNAFFABLE')
    ['[CLS]', 'un', '##aff', '##able', '[SEP]']
    >>> tokenizer.decode(tokenizer.encode('unaffable')[0])
    'unaffable'
    """

    def __init__(self, token_dict, do_lower_case=False, word_maxlen=200, pre_tokenize=None,
                 token_translate=None, token_start="[CLS]", token_end="[SEP]", engine="auto"):
        super().__init__(token_start, token_end, pre_tokenize, token_translate)
        if isinstance(token_dict, (str, bytes)) or hasattr(token_dict, "__fspath__"):
            token_dict = load_vocab(token_dict)
        if not isinstance(token_dict, dict) or not all(
            isinstance(t, str) and isinstance(i, int) and i >= 0 for t, i in token_dict.items()
        ):
            raise TypeError("token_dict must be a vocab.txt path or a dict str token -> int id >= 0")
        if isinstance(word_maxlen, bool) or not isinstance(word_maxlen, int) or word_maxlen < 1:
            raise ValueError(f"word_maxlen must be a positive int, got {word_maxlen!r}")
        if engine not in ("auto", "python"):
            raise ValueError(f"engine must be 'auto' or 'python', got {engine!r}")
        required = [self._token_pad, self._token_unk] + [t for t in (token_start, token_end) if t is not None]
        missing = [t for t in dict.fromkeys(required) if t not in token_dict]
        if missing:
            raise ValueError(
                f"the vocab has no {', '.join(missing)} token(s); a BERT vocab needs "
                f"{', '.join(dict.fromkeys(required))} (pass token_start=None/token_end=None "
                "to go without start/end tokens)"
            )
        self._token_dict = token_dict
        self._token_dict_inv = {v: k for k, v in token_dict.items()}
        self._vocab_size = max(token_dict.values()) + 1
        self._do_lower_case = bool(do_lower_case)
        self._word_maxlen = word_maxlen
        for name in ("pad", "unk", "mask", "start", "end"):
            token = getattr(self, f"_token_{name}")
            setattr(self, f"_token_{name}_id", token_dict.get(token) if token is not None else None)
        self._setup_translate()

        # Tokens written in the text that stay whole, as HF's special tokens do.
        specials = [t for t in dict.fromkeys(SPECIAL_TOKENS + (token_start, token_end)) if t in token_dict]
        self._specials = specials
        self._special_re = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
        )
        self._max_first = max((len(t) for t in token_dict if not t.startswith("##")), default=1)
        self._max_next = max((len(t) - 2 for t in token_dict if t.startswith("##")), default=1)
        self._word_cache = {}
        self._clean_cjk = _LazyTable(_clean_cjk_rule)
        self._clean = _LazyTable(_clean_rule)
        self._after = _LazyTable(_strip_punct_rule if do_lower_case else _punct_rule)
        self._strip = _LazyTable(_strip_rule)

        self._engine = engine if pre_tokenize is None else "python"
        self._rust = None
        if self._engine == "auto":
            try:
                self._rust = _RustEngine(self)
            except ImportError:
                self._engine = "python"

    # -- vocab --------------------------------------------------------------
    def token_to_id(self, token):
        return self._token_dict.get(token, self._token_unk_id)

    def id_to_token(self, i):
        return self._token_dict_inv.get(self._check_id(i), self._token_unk)

    @staticmethod
    def stem(token):
        """The token without its '##' continuation prefix."""
        return token[2:] if token[:2] == "##" else token

    # -- the Python engine ------------------------------------------------------
    def _normalize(self, text):
        """Normalized text with spaces between words, as HF's BasicTokenizer splits it."""
        if text.isascii():
            if self._do_lower_case:
                text = text.lower()
            return text.translate(_ASCII_TABLE)
        text = unicodedata.normalize("NFC", text.translate(self._clean_cjk))
        if self._do_lower_case:
            # Lowercasing the whole text is the same as word by word: the one
            # context rule of str.lower (final sigma) never looks across spaces.
            text = unicodedata.normalize("NFD", text.lower())
        return text.translate(self._after)

    def _normalize_for_pre_tokenize(self, text):
        text = unicodedata.normalize("NFC", text.translate(self._clean))
        if self._do_lower_case:
            text = unicodedata.normalize("NFD", text.lower()).translate(self._strip)
        return text

    def _wordpiece(self, word):
        """Greedy longest-match-first pieces of one word, as (id, text) pairs."""
        if len(word) > self._word_maxlen:
            return ((self._token_unk_id, word),)
        vocab, pieces, start, n = self._token_dict, [], 0, len(word)
        while start < n:
            prefix, longest = ("##", self._max_next) if start else ("", self._max_first)
            end = min(n, start + longest)
            while end > start:
                token_id = vocab.get(prefix + word[start:end])
                if token_id is not None:
                    break
                end -= 1
            else:
                return ((self._token_unk_id, word),)
            pieces.append((token_id, word[start:end]))
            start = end
        return tuple(pieces)

    def _word_ids(self, word):
        ids = self._word_cache.get(word)
        if ids is None:
            if len(self._word_cache) >= _WORD_CACHE_SIZE:
                self._word_cache.clear()
            ids = self._word_cache[word] = [i for i, _ in self._wordpiece(word)]
        return ids

    def _chunks(self, text):
        """Split out special tokens written in the text: [(piece, is_special)]."""
        if not self._specials or self._special_re.search(text) is None:
            return [(text, False)]
        parts = self._special_re.split(text)
        return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]

    def _python_ids(self, text):
        ids = []
        for chunk, special in self._chunks(text):
            if special:
                ids.append(self._token_dict[chunk])
            elif self._pre_tokenize is not None:
                ids.extend(i for i, _ in self._pre_tokenized_pieces(chunk))
            else:
                for word in self._normalize(chunk).split():
                    ids.extend(self._word_ids(word))
        return ids

    def _pieces(self, text):
        """(id, piece text) for a text without special tokens; [UNK] keeps its word."""
        return [p for word in self._normalize(text).split() for p in self._wordpiece(word)]

    def _pre_tokenized_pieces(self, chunk):
        pieces = []
        for word in self._pre_tokenize(self._normalize_for_pre_tokenize(chunk)):
            _check_text(word, "every word returned by pre_tokenize")
            if not word.strip():
                continue
            if word in self._token_dict:
                pieces.append((self._token_dict[word], word))
            else:
                pieces.extend(self._pieces(word))
        return pieces

    def _python_spans(self, text):
        ids, spans = [], []
        pos = 0
        for chunk, special in self._chunks(text):
            if special:
                ids.append(self._token_dict[chunk])
                spans.append((pos, pos + len(chunk)))
            else:
                if self._pre_tokenize is not None:
                    pieces = self._pre_tokenized_pieces(chunk)
                else:
                    pieces = self._pieces(chunk)
                ids.extend(i for i, _ in pieces)
                spans.extend(self._locate(chunk, [p for _, p in pieces], pos))
            pos += len(chunk)
        return ids, spans

    def _clusters(self, chunk):
        """[text, start, end] runs of the cleaned chunk that normalization may
        merge or reorder: a character with the combining marks after it, or
        characters NFC composes (Hangul jamo)."""
        clusters = []
        for i, ch in enumerate(chunk):
            ch = self._clean[ord(ch)]
            if not ch:
                continue
            if clusters and ord(ch) >= 0x300 and not clusters[-1][0].isspace() and (
                unicodedata.combining(ch) or _composes(clusters[-1][0], ch)
            ):
                clusters[-1][0] += ch
                clusters[-1][2] = i + 1
            else:
                clusters.append([ch, i, i + 1])
        return clusters

    def _locate(self, chunk, pieces, offset):
        """Where each normalized piece lies in `chunk` (characters, + offset).

        The chunk is normalized one NFC cluster at a time, so each normalized
        character knows the original characters it came from; the pieces are
        then found in order. Final sigma is the one thing per-cluster
        lowercasing gets different, so sigma forms are compared as equal.
        """
        chars, starts, ends = [], [], []
        for cluster, start, end in self._clusters(chunk):
            norm = unicodedata.normalize("NFC", cluster)
            if self._do_lower_case:
                norm = _lower_strip(norm)
            chars.append(norm)
            starts.extend([start] * len(norm))
            ends.extend([end] * len(norm))
        normalized = "".join(chars).replace("ς", "σ")
        spans, cursor = [], 0
        for piece in pieces:
            at = normalized.find(piece.replace("ς", "σ"), cursor) if piece else -1
            if at < 0:
                spans.append(None)
                continue
            cursor = at + len(piece)
            spans.append((offset + starts[at], offset + ends[cursor - 1]))
        return spans

    # -- engine choice ------------------------------------------------------------
    def _content_ids(self, text):
        _check_text(text, "text")
        if self._rust is not None:
            engine = self._rust.route(text)
            if engine is not None:
                return engine.encode(text, add_special_tokens=False).ids
        return self._python_ids(text)

    def _content_ids_batch(self, texts):
        if self._rust is None:
            return [self._python_ids(t) for t in texts]
        return self._rust.encode_batch(texts, self._python_ids)

    def _content_spans(self, text):
        _check_text(text, "text")
        engine = self._rust.route(text) if self._rust is not None else None
        if engine is not None:
            encoding = engine.encode(text, add_special_tokens=False)
            ids, spans = encoding.ids, encoding.offsets
            if not text.isascii():
                # Widen to whole clusters (a letter and its marks), as the Python path does.
                spans = self._snap_to_clusters(text, spans)
        else:
            ids, spans = self._python_spans(text)
        return self.ids_to_tokens(ids), _extend_over_marks(text, spans)

    def _snap_to_clusters(self, text, spans):
        first, last = list(range(len(text))), list(range(1, len(text) + 1))
        pos = 0
        for chunk, special in self._chunks(text):
            if not special:
                for _, start, end in self._clusters(chunk):
                    first[pos + start:pos + end] = [pos + start] * (end - start)
                    last[pos + start:pos + end] = [pos + end] * (end - start)
            pos += len(chunk)
        return [(first[s], last[e - 1]) if e > s else (s, e) for s, e in spans]

    # -- decode ---------------------------------------------------------------
    def decode(self, ids, tokens=None):
        """Readable text from ids: no spaces around CJK characters, English
        punctuation attached the usual way. Pad/start/end tokens are dropped."""
        if tokens is None:
            tokens = self.ids_to_tokens(ids)
        tokens = [self._token_translate_inv.get(t) or t for t in tokens]
        drop = {self._token_pad, self._token_start, self._token_end}
        words = []
        for token in tokens:
            if token in drop:
                continue
            if token.startswith("##") and words:
                words[-1] += token[2:]
            else:
                words.append(self.stem(token))
        return _join_words(words)


def _extend_over_marks(text, spans):
    """Let a token's span cover the accents (combining marks) written after
    it, which lowercasing strips, unless the next token starts there."""
    spans = list(spans)
    limit = len(text)
    for k in range(len(spans) - 1, -1, -1):
        if spans[k] is None:
            continue
        start, end = spans[k]
        j = end
        while j < limit and (unicodedata.category(text[j])[0] == "M" or _is_removed(text[j])):
            j += 1
            if unicodedata.category(text[j - 1])[0] == "M":
                end = j
        spans[k] = (start, end)
        limit = start
    return spans


def _composes(cluster, ch):
    """Does NFC merge `ch` into the cluster before it?"""
    nfc = unicodedata.normalize
    return nfc("NFC", cluster + ch) != nfc("NFC", cluster) + nfc("NFC", ch)


_CLOSING = set(".,!?;:%)]}…") | set("，。！？、；：）」』】》〉〕”’")
_OPENING = set("([{$#") | set("（「『【《〈〔“‘")
_CONTRACTIONS = {"s", "t", "re", "ve", "m", "ll", "d"}


def _join_words(words):
    """Join decoded words with English spacing, none around CJK or full-width punctuation."""
    out, quotes = "", 0
    for i, word in enumerate(words):
        if not out:
            out = word
            if word == '"':
                quotes += 1
            continue
        prev = out[-1]
        nxt = words[i + 1] if i + 1 < len(words) else ""
        glue = (
            _is_cjk(prev) or _is_cjk(word[0])
            or word in _CLOSING
            or prev in _OPENING
            or unicodedata.east_asian_width(prev) in "FW" and _is_punctuation(prev)
            or unicodedata.east_asian_width(word[0]) in "FW" and _is_punctuation(word[0])
            or word in ("-", "/", "_", "@") or prev in "-/_@" and out[-2:-1].isalnum()
            or word == "'" and nxt in _CONTRACTIONS and prev.isalpha()
            or prev == "'" and word in _CONTRACTIONS and out[-2:-1].isalpha()
            or word == '"' and quotes % 2 == 1
            or prev == '"' and quotes % 2 == 1
            or prev in ".,:" and word[0].isdigit() and out[-2:-1].isdigit()
        )
        if word == '"':
            quotes += 1
        out += word if glue else " " + word
    return out


class _RustEngine:
    """The `tokenizers` (Rust) pipelines that reproduce `Tokenizer`'s Python rules.

    Two pipelines: `fast` is HF's BertNormalizer alone (for NFC text without
    dropped characters), `full` adds NFC and does lowercase/accents in the
    same order as the Python rules. Each character is checked once against
    the Python rules; a text uses a pipeline only if all its characters
    passed for it.
    """

    FAST, FULL, PYTHON, UNKNOWN = 2, 1, 0, 255

    def __init__(self, owner):
        from tokenizers import AddedToken, Regex
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import normalizers, pre_tokenizers
        from tokenizers.models import WordPiece

        self.owner = owner
        lower = owner._do_lower_case
        bert = normalizers.BertNormalizer
        fast = bert(clean_text=True, handle_chinese_chars=True, strip_accents=lower, lowercase=lower)
        steps = [bert(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False),
                 normalizers.NFC()]
        if lower:
            steps += [normalizers.Lowercase(), normalizers.NFD(), normalizers.Replace(Regex(r"\p{Mn}"), "")]
        full = normalizers.Sequence(steps)
        self.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        model = WordPiece(dict(owner._token_dict), unk_token=owner._token_unk,
                          max_input_chars_per_word=owner._word_maxlen)
        self.engines = {}
        for key, normalizer in ((self.FAST, fast), (self.FULL, full)):
            engine = RustTokenizer(model)
            engine.normalizer = normalizer
            engine.pre_tokenizer = self.pre_tokenizer
            specials = [AddedToken(t, special=True, normalized=False) for t in owner._specials]
            engine.add_special_tokens(specials)
            self.engines[key] = engine
        self.normalizers = {self.FAST: fast, self.FULL: full}
        self.state = {}  # char -> FAST / FULL / PYTHON
        self.state_array = None  # the same, by code point, for batches
        # ASCII text has nothing for NFC to compose, so the fast pipeline only
        # has to agree on each of the 128 characters (controls included).
        ascii_ok = all(
            self._check(chr(cp)) != self.PYTHON
            and all(self._words(self.FAST, t) == owner._normalize(t).split()
                    for t in (chr(cp), "x" + chr(cp) + "x"))
            for cp in range(128)
        )
        self.ascii = self.FAST if ascii_ok else self.PYTHON

    def _words(self, key, ch):
        normalized = self.normalizers[key].normalize_str(ch)
        return [w for w, _ in self.pre_tokenizer.pre_tokenize_str(normalized)]

    def _check(self, ch):
        state = self.state.get(ch)
        if state is not None:
            return state
        state = self.PYTHON
        cp = ord(ch)
        sigma = self.owner._do_lower_case and ch == "Σ"  # lowercases by context in Python
        if not sigma and not 0xD800 <= cp <= 0xDFFF:
            # Alone and between letters, so that a different idea of what is
            # punctuation, space or CJK shows up as a different split.
            probes = [ch, "x" + ch + "x"]
            agree = lambda key, texts: all(  # noqa: E731
                self._words(key, t) == self.owner._normalize(t).split() for t in texts
            )
            try:
                if agree(self.FULL, probes):
                    state = self.FULL
                    nfc = [unicodedata.normalize("NFC", t) for t in probes]
                    if not _is_removed(ch) and agree(self.FAST, nfc):
                        state = self.FAST
            except Exception:  # a character the Rust side cannot take
                state = self.PYTHON
        self.state[ch] = state
        if self.state_array is not None:
            self.state_array[cp] = state
        return state

    def _check_many(self, chars):
        """`_check` for many new characters: all probes in one string first
        (spaces keep them apart), one by one only if that string differs."""
        plain = [c for c in chars if c != "Σ" and not 0xD800 <= ord(c) <= 0xDFFF
                 and not _is_removed(c) and not c.isspace()]
        probes = " ".join(c + " x" + c + "x" for c in plain)
        try:
            full_ok = self._words(self.FULL, probes) == self.owner._normalize(probes).split()
            nfc = unicodedata.normalize("NFC", probes)
            fast_ok = full_ok and self._words(self.FAST, nfc) == self.owner._normalize(nfc).split()
        except Exception:
            full_ok = fast_ok = False
        if fast_ok:
            for c in plain:
                self.state[c] = self.FAST
                if self.state_array is not None:
                    self.state_array[ord(c)] = self.FAST
        for c in chars:
            self._check(c)

    def _route_state(self, text):
        if text.isascii():
            return self.ascii
        chars = set(text)
        new = [c for c in chars if c not in self.state]
        if len(new) > 1:
            self._check_many(new)
        state = min(map(self._check, chars))
        if state == self.FAST and not unicodedata.is_normalized("NFC", text):
            state = self.FULL
        if state == self.FULL:
            # NFC may build characters that were not in the text: check them too.
            composed = unicodedata.normalize("NFC", text.translate(self.owner._clean_cjk))
            state = min([state] + [self._check(c) for c in set(composed)])
        return state

    def route(self, text):
        """The Rust tokenizer that is exact for `text`, or None for the Python path."""
        state = self._route_state(text)
        return self.engines[state] if state != self.PYTHON else None

    def encode_batch(self, texts, python_ids):
        if not texts:
            return []
        joined = "".join(texts)
        if joined.isascii() and self.ascii == self.FAST:
            states = None
        else:
            if self.state_array is None:
                self.state_array = np.full(0x110000, self.UNKNOWN, dtype=np.uint8)
                for ch, state in self.state.items():
                    self.state_array[ord(ch)] = state
            codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            per_char = self.state_array[codes]
            unknown = np.unique(codes[per_char == self.UNKNOWN])
            if unknown.size:
                self._check_many([chr(cp) for cp in unknown.tolist()])
                per_char = self.state_array[codes]
            if per_char.min() == self.FAST and all(unicodedata.is_normalized("NFC", t) for t in texts):
                states = None
            else:
                states = [self._route_state(t) for t in texts]
        if states is None:
            return self._run(self.FAST, texts)
        out = [None] * len(texts)
        for key in (self.FAST, self.FULL):
            index = [i for i, s in enumerate(states) if s == key]
            if index:
                for i, ids in zip(index, self._run(key, [texts[i] for i in index])):
                    out[i] = ids
        for i, s in enumerate(states):
            if s == self.PYTHON:
                out[i] = python_ids(texts[i])
        return out

    def _run(self, key, texts):
        engine = self.engines[key]
        run = getattr(engine, "encode_batch_fast", engine.encode_batch)
        return [e.ids for e in run(texts, add_special_tokens=False)]


# ---------------------------------------------------------------------------
# SentencePiece tokenizer.
# ---------------------------------------------------------------------------
class SpTokenizer(TokenizerBase):
    """SentencePiece tokenizer (ALBERT, T5, ...) with the same interface.

    Args:
        sentencepiece_model: path of a `.model` file, or its bytes.
        token_start, token_end: tokens added around each text. By default
            `[CLS]`/`[SEP]` when the model has them, otherwise no start token
            and the model's end-of-sentence piece (e.g. `</s>`) if it has one.
        pre_tokenize, token_translate: as for `Tokenizer`.

    Needs the optional package `sentencepiece` (`pip install sentencepiece`).
    Padding uses the model's pad id, or 0 when the model has none.

    >>> import io, sentencepiece
    >>> model = io.BytesIO()
    >>> sentencepiece.SentencePieceTrainer.train(
    ...     sentence_iterator=iter(['hello world', 'hello there', 'the world is here'] * 30),
    ...     model_writer=model, vocab_size=19, minloglevel=2)
    >>> tokenizer = SpTokenizer(model.getvalue())
    >>> tokenizer.tokenize('hello world')
    ['▁he', 'l', 'l', 'o', '▁world', '</s>']
    >>> tokenizer.rematch('hello world', tokenizer.tokenize('hello world'))
    [[0, 1], [2], [3], [4], [6, 7, 8, 9, 10], []]
    >>> tokenizer.decode(tokenizer.encode('hello world')[0])
    'hello world'
    """

    def __init__(self, sentencepiece_model, token_start=_AUTO, token_end=_AUTO,
                 pre_tokenize=None, token_translate=None):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(
                "SpTokenizer needs the sentencepiece package: pip install sentencepiece"
            ) from None
        sp = sentencepiece.SentencePieceProcessor()
        if isinstance(sentencepiece_model, (bytes, bytearray)):
            sp.LoadFromSerializedProto(bytes(sentencepiece_model))
        else:
            sp.Load(str(sentencepiece_model))
        self.sp_model = sp
        unk = sp.unk_id()
        has = lambda piece: sp.piece_to_id(piece) != unk or piece == sp.id_to_piece(unk)  # noqa: E731
        if token_start is _AUTO:
            token_start = "[CLS]" if has("[CLS]") else None
        if token_end is _AUTO:
            eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
            token_end = "[SEP]" if has("[SEP]") else eos
        super().__init__(token_start, token_end, pre_tokenize, token_translate)
        missing = [t for t in (token_start, token_end) if t is not None and not has(t)]
        if missing:
            raise ValueError(f"the SentencePiece model has no {', '.join(missing)} piece(s)")
        self._vocab_size = sp.get_piece_size()
        self._token_unk = sp.id_to_piece(sp.unk_id())
        self._token_pad = sp.id_to_piece(sp.pad_id()) if sp.pad_id() >= 0 else None
        self._token_pad_id = sp.pad_id() if sp.pad_id() >= 0 else 0
        self._token_unk_id = sp.unk_id()
        self._token_mask_id = sp.piece_to_id(self._token_mask) if has(self._token_mask) else None
        self._token_start_id = None if token_start is None else sp.piece_to_id(token_start)
        self._token_end_id = None if token_end is None else sp.piece_to_id(token_end)
        self._setup_translate()

    def token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def id_to_token(self, i):
        return self.sp_model.id_to_piece(self._check_id(i))

    @staticmethod
    def stem(token):
        """The piece without its word-start marker '▁'."""
        return token[1:] if token[:1] == "\u2581" else token

    def _prepared(self, text):
        """The text SentencePiece sees, and where each of its characters came from."""
        if self._pre_tokenize is None:
            return text, None
        words = [w for w in self._pre_tokenize(text)]
        for w in words:
            _check_text(w, "every word returned by pre_tokenize")
        joined = " ".join(words)
        origin, cursor = [], 0  # origin[i]: index in text of joined[i], or None
        for k, word in enumerate(words):
            at = text.find(word, cursor)
            if at < 0:
                origin.extend([None] * len(word))
            else:
                origin.extend(range(at, at + len(word)))
                cursor = at + len(word)
            if k + 1 < len(words):
                origin.append(None)
        return joined, origin

    def _content_ids(self, text):
        _check_text(text, "text")
        return self.sp_model.encode(self._prepared(text)[0], out_type=int)

    def _content_ids_batch(self, texts):
        prepared = [self._prepared(t)[0] for t in texts]
        return self.sp_model.encode(prepared, out_type=int)

    def _content_tokens(self, text):
        _check_text(text, "text")
        return self.sp_model.encode(self._prepared(text)[0], out_type=str)

    def _content_spans(self, text):
        _check_text(text, "text")
        prepared, origin = self._prepared(text)
        tokens, spans = self._pieces_with_offsets(prepared)
        if origin is not None:
            mapped = []
            for start, end in spans:
                inside = [origin[i] for i in range(start, end) if origin[i] is not None]
                mapped.append((min(inside), max(inside) + 1) if inside else (0, 0))
            spans = mapped
        # A piece's span starts after the space its '▁' stands for; a lone
        # '▁' covers no text.
        trimmed = []
        for start, end in spans:
            while start < end and text[start].isspace():
                start += 1
            trimmed.append((start, end) if start < end else None)
        return tokens, trimmed

    def _pieces_with_offsets(self, text):
        """Pieces and their character offsets in `text`."""
        try:  # sentencepiece >= 0.2.1
            out = self.sp_model.encode(text, out_type="offset_mapping")
            return out["pieces"], [tuple(o) for o in out["offsets"]]
        except (ValueError, TypeError):
            pass
        # Older versions report UTF-8 byte offsets in an immutable proto.
        proto = self.sp_model.encode(text, out_type="immutable_proto")
        sizes = [len(c.encode("utf-8")) for c in text]
        byte_to_char = np.zeros(sum(sizes) + 1, dtype=np.int64)
        byte_to_char[np.cumsum([0] + sizes)] = np.arange(len(text) + 1)
        pieces = [p.piece if p.id != self._token_unk_id else p.surface for p in proto.pieces]
        spans = [(int(byte_to_char[p.begin]), int(byte_to_char[p.end])) for p in proto.pieces]
        return pieces, spans

    def decode(self, ids):
        """Text from ids; pad/start/end and ids SentencePiece marks as control are dropped."""
        ids = [self._check_id(i) for i in ids]
        drop = {self._token_start_id, self._token_end_id}
        if self._token_pad is not None:
            drop.add(self._token_pad_id)
        pieces = [self.id_to_token(i) for i in ids if i not in drop]
        pieces = [self._token_translate_inv.get(p) or p for p in pieces]
        return self.sp_model.decode_pieces(pieces)
