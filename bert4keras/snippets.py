"""Data helpers and decoders: text utilities, padding, batching, parallel
mapping, Viterbi decoding and autoregressive decoding (beam search, sampling).

Everything here is plain Python and numpy, so it runs the same on every Keras
backend. TensorFlow is imported only inside `DataGenerator.to_dataset`, and
Keras only when a Keras tensor or model is handed in.
"""
import builtins
import functools
import json
import multiprocessing
import os
import pickle
import queue
import random as python_random
import threading
import traceback
import unicodedata

import numpy as np

# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


def is_string(s):
    """True for text (`str`), False for everything else, bytes included."""
    return isinstance(s, str)


def strQ2B(ustring):
    """Full-width characters -> half-width ones.

    >>> strQ2B("ＡＢＣ１２３，　ｏｋ！")
    'ABC123, ok!'
    """
    chars = []
    for ch in ustring:
        code = ord(ch)
        if code == 0x3000:  # ideographic space
            code = 0x20
        elif 0xFF01 <= code <= 0xFF5E:  # full-width ASCII sits 0xFEE0 above ASCII
            code -= 0xFEE0
        chars.append(chr(code))
    return "".join(chars)


def lowercase_and_normalize(text):
    """Lower-case and strip accents (NFD, then drop combining marks).

    >>> lowercase_and_normalize("Café ÄÖ")
    'cafe ao'
    """
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(ch for ch in text if unicodedata.category(ch) != "Mn")


def text_segmentate(text, maxlen, seps="\n", strips=None):
    """Split `text` at separators into pieces of at most `maxlen` characters.

    The text is cut at `seps[0]` and neighbouring pieces are merged back while
    they fit in `maxlen`; a piece still too long is cut at `seps[1]`, and so
    on. Separators stay at the end of their piece; each piece is stripped of
    whitespace, then of the characters in `strips`; empty pieces are dropped.
    A piece with no separator left to cut at may stay longer than `maxlen`.

    >>> text_segmentate("今天很好。我们去公园吧！好的。", 8, seps="。！")
    ['今天很好。', '我们去公园吧！', '好的。']
    """
    text = text.strip().strip(strips)
    if len(text) <= maxlen or not seps:
        return [text] if text else []
    sep = seps[0]
    pieces = text.split(sep)
    pieces = [p + sep for p in pieces[:-1]] + [pieces[-1]]
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > maxlen:
            chunks.append(current)
            current = ""
        current += piece
    chunks.append(current)
    return [t for c in chunks for t in text_segmentate(c, maxlen, seps[1:], strips)]


class open:
    """File wrapper for large line-oriented text files.

    Iterating reads lines lazily. With `indexable=True` one pass records the
    byte offset of every line, so `f[i]` (or `f[-1]`, `f[a:b]`) reads line i by
    seeking, and `len(f)` is the number of lines. Give a path instead of True
    to keep the offsets there as JSON (rebuilt when the file's size or mtime
    changes). Lines keep their newline ('\\r\\n' becomes '\\n'), as with the
    built-in `open`; text is decoded as `encoding` (UTF-8 when None), which
    must be a line-oriented encoding such as UTF-8 or GBK. Mode 'rb' gives bytes.

        with open("corpus.txt", indexable=True) as f:
            print(len(f), f[0], f[-1])
            for line in f:
                ...
    """

    def __init__(self, name, mode="r", encoding=None, errors="strict", indexable=False):
        self.name = name
        self.binary = "b" in mode
        if self.binary and encoding is not None:
            raise ValueError("Binary mode ('b' in mode) takes no encoding.")
        self.encoding = None if self.binary else (encoding or "utf-8")
        self.errors = errors
        self.file = builtins.open(name, mode.replace("b", "").replace("t", "") + "b")
        self.offsets = None
        if indexable:
            if not self.file.readable():
                raise ValueError(f"indexable=True needs a readable file; got mode {mode!r}.")
            self.offsets = self._load_or_build_offsets(indexable)

    def _load_or_build_offsets(self, indexable):
        stat = os.stat(self.name)
        signature = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        cache = indexable if isinstance(indexable, (str, os.PathLike)) else None
        if cache is not None and os.path.exists(cache):
            with builtins.open(cache) as f:
                saved = json.load(f)
            if isinstance(saved, dict) and saved.get("signature") == signature:
                return saved["offsets"]
        offsets, offset = [], 0
        self.file.seek(0)
        for line in self.file:
            offsets.append(offset)
            offset += len(line)
        self.file.seek(0)
        if cache is not None:
            with builtins.open(cache, "w") as f:
                json.dump({"signature": signature, "offsets": offsets}, f)
        return offsets

    def _decode(self, line):
        if self.binary:
            return line
        text = line.decode(self.encoding, self.errors)
        return text[:-2] + "\n" if text.endswith("\r\n") else text

    def __iter__(self):
        return self

    def __next__(self):
        line = self.file.readline()
        if not line:
            raise StopIteration
        return self._decode(line)

    next = __next__

    def __len__(self):
        if self.offsets is None:
            raise TypeError("len() needs open(..., indexable=True).")
        return len(self.offsets)

    def __getitem__(self, key):
        if self.offsets is None:
            raise TypeError("f[i] needs open(..., indexable=True).")
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(len(self)))]
        position = self.file.tell()  # so f[i] does not disturb ongoing iteration
        self.file.seek(self.offsets[key])
        line = self.file.readline()
        self.file.seek(position)
        return self._decode(line)

    def read(self, size=-1):
        data = self.file.read(size)
        return data if self.binary else data.decode(self.encoding, self.errors)

    def readline(self):
        return self._decode(self.file.readline())

    def readlines(self):
        return list(self)

    def write(self, text):
        return self.file.write(text if self.binary else text.encode(self.encoding, self.errors))

    def flush(self):
        self.file.flush()

    def tell(self):
        return self.file.tell()

    def seek(self, offset=0, whence=0):
        return self.file.seek(offset, whence)

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# ---------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------


def sequence_padding(inputs, length=None, value=0, seq_dims=1, mode="post"):
    """Pad (and, if `length` is given, truncate) sequences into one array.

    The first `seq_dims` axes of every input are sequence axes; `length` is an
    int (for every sequence axis), a tuple with one entry per sequence axis
    (None: the longest), or None (the longest on every axis). `mode='post'`
    pads at the end, 'pre' at the start; truncation always keeps the first
    `length` items. The dtype is that of the (non-empty) inputs.

    >>> sequence_padding([[1, 2, 3], [4]])
    array([[1, 2, 3],
           [4, 0, 0]])
    >>> sequence_padding([[1, 2, 3], [4]], length=2, mode="pre")
    array([[1, 2],
           [0, 4]])
    """
    if mode not in ("post", "pre"):
        raise ValueError(f"mode must be 'post' or 'pre'; got {mode!r}.")
    arrays = [np.asarray(x) for x in inputs]
    for i, a in enumerate(arrays):
        if a.ndim < seq_dims:
            raise ValueError(f"Input {i} has {a.ndim} axes, fewer than seq_dims={seq_dims}.")
    if isinstance(length, (int, np.integer)):
        length = [int(length)] * seq_dims
    elif length is None:
        length = [None] * seq_dims
    elif len(length) != seq_dims:
        raise ValueError(f"length={length!r} needs one entry per sequence axis ({seq_dims}).")
    if not arrays:
        dtype = np.asarray(value).dtype
        return np.zeros((0,) + tuple(n or 0 for n in length), dtype)
    longest = np.max([a.shape[:seq_dims] for a in arrays], axis=0)
    length = [int(m) if n is None else n for n, m in zip(length, longest)]
    trailing = arrays[0].shape[seq_dims:]
    for i, a in enumerate(arrays):
        if a.shape[seq_dims:] != trailing:
            raise ValueError(
                f"Input {i} has non-sequence shape {a.shape[seq_dims:]} but input 0 has "
                f"{trailing}; only the first seq_dims={seq_dims} axes may differ."
            )
    non_empty = [a.dtype for a in arrays if a.size]
    dtype = np.result_type(*non_empty) if non_empty else np.asarray(value).dtype
    outputs = np.full((len(arrays), *length, *trailing), value, dtype=dtype)
    for i, a in enumerate(arrays):
        a = a[tuple(slice(0, n) for n in length)]
        sizes = a.shape[:seq_dims]
        if mode == "post":
            where = tuple(slice(0, s) for s in sizes)
        else:
            where = tuple(slice(n - s, n) for n, s in zip(length, sizes))
        outputs[(i,) + where] = a
    return outputs


def truncate_sequences(maxlen, indices, *sequences):
    """Shorten lists in place until their total length is at most `maxlen`.

    Repeatedly pops the item at position `indices` (an int for all lists, or
    one per list) from the currently longest list (the first one on ties).
    None entries are skipped; the remaining lists are returned.

    >>> first, second = [1, 2, 3, 4, 99], [5, 6, 99]
    >>> truncate_sequences(5, -2, first, second)
    [[1, 99], [5, 6, 99]]
    """
    if maxlen < 0:
        raise ValueError(f"maxlen must be >= 0; got {maxlen}.")
    if not isinstance(indices, (list, tuple)):
        indices = [indices] * len(sequences)
    if len(indices) != len(sequences):
        raise ValueError(f"Got {len(indices)} indices for {len(sequences)} sequences.")
    pairs = [(s, i) for s, i in zip(sequences, indices) if s is not None]
    for s, _ in pairs:
        if not hasattr(s, "pop"):
            raise TypeError(f"truncate_sequences edits lists in place; got {type(s).__name__}.")
    while pairs and sum(len(s) for s, _ in pairs) > maxlen:
        longest, index = max(pairs, key=lambda pair: len(pair[0]))
        longest.pop(index)
    return [s for s, _ in pairs]


def softmax(x, axis=-1):
    """Numpy softmax."""
    return np.exp(log_softmax(x, axis))


def log_softmax(x, axis=-1):
    """Numpy log-softmax in float64; a row that is all -inf stays all -inf."""
    x = np.asarray(x, dtype=np.float64)
    top = np.max(x, axis=axis, keepdims=True)
    finite = np.isfinite(top)
    all_finite = finite.all()
    shifted = x - (top if all_finite else np.where(finite, top, 0.0))
    with np.errstate(divide="ignore"):
        result = shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    return result if all_finite else np.where(finite, result, -np.inf)


# ---------------------------------------------------------------------------
# Parallel map
# ---------------------------------------------------------------------------


def _short_repr(item, limit=200):
    text = repr(item)
    return text if len(text) <= limit else text[:limit] + "..."


def _worker_loop(func, in_queue, out_queue, seed, reseed, serialize):
    # Forked workers inherit the parent's RNG state; reseed so they differ.
    if reseed:
        np.random.seed(seed)
        python_random.seed(seed)
    while True:
        task = in_queue.get()
        if task is None:
            return
        index, item = task
        if serialize:
            item = pickle.loads(item)
        try:
            result = func(item)
            # Pickle here: a result that cannot be pickled must be reported,
            # not dropped by the queue's background thread (the caller would hang).
            if serialize:
                result = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
            out_queue.put((index, True, result))
        except BaseException:  # SystemExit too: a silent exit would hang the caller
            message = (
                f"func failed on item {index} ({_short_repr(item)}):\n"
                f"{traceback.format_exc()}"
            )
            out_queue.put((index, False, message))


class _Feeder(threading.Thread):
    """Reads the iterable and hands items to the workers, at most `limit`
    items ahead of what the caller has consumed."""

    def __init__(self, iterable, in_queue, limit, serialize, num_workers):
        super().__init__(daemon=True)
        self.iterable, self.in_queue = iterable, in_queue
        self.serialize, self.num_workers = serialize, num_workers
        self.slots = threading.Semaphore(limit)
        self.stop = threading.Event()
        self.count = None  # number of items fed, once the iterable is exhausted
        self.error = None

    def run(self):
        fed = 0
        try:
            for index, item in enumerate(self.iterable):
                while not self.slots.acquire(timeout=0.1):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                if self.serialize:
                    try:
                        item = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
                    except Exception as e:
                        raise RuntimeError(
                            f"Item {index} ({_short_repr(item)}) cannot be pickled for a "
                            f"worker process: {e}. Use dummy=True (threads) instead."
                        ) from e
                self.in_queue.put((index, item))
                fed += 1
            self.count = fed
        except BaseException as e:
            self.error = e
        finally:
            for _ in range(self.num_workers):
                self.in_queue.put(None)


def _worker_seeds(random_seeds, workers):
    if random_seeds is True:
        return [None] * workers, True  # None: fresh OS entropy per worker
    if random_seeds is None or random_seeds is False:
        return [None] * workers, False
    seeds = list(random_seeds)
    if len(seeds) != workers:
        raise ValueError(f"random_seeds has {len(seeds)} seeds for {workers} workers.")
    return seeds, True


def _lost_workers(pool, dummy, feeding):
    """Why results can no longer all arrive, or None. Workers exit normally
    only after the last item has been handed out."""
    crashed = [w.exitcode for w in pool if not dummy and w.exitcode not in (None, 0)]
    if crashed:
        return f"A worker process died (exit code {crashed[0]})"
    exited = sum(not w.is_alive() for w in pool)
    if exited == len(pool) or (exited and feeding):
        return "A worker exited before all items were processed"
    return None


def parallel_apply_generator(
    func,
    iterable,
    workers,
    max_queue_size,
    dummy=False,
    random_seeds=True,
    unordered=False,
):
    """Apply `func` to every item of `iterable` in parallel; yield (index, result).

    Work runs in `workers` processes (forked, so `func` may be a lambda or a
    closure), or in threads when `dummy=True`. The iterable is read lazily, at
    most `max_queue_size + workers` items ahead of the consumer. Results come in
    input order, or as soon as each is done with `unordered=True`. Each worker
    process reseeds numpy's and Python's RNG: from fresh entropy when
    `random_seeds=True`, from `random_seeds[k]` when it is a list (one seed per
    worker), not at all when False (threads share one RNG and are never
    reseeded). An exception in `func` is raised here as a RuntimeError naming
    the item's index and repr, with the worker's traceback; a worker process
    that dies is reported the same way instead of leaving the caller waiting.

    >>> [r for _, r in parallel_apply_generator(abs, [-1, 2, -3], 2, 4, dummy=True)]
    [1, 2, 3]
    """
    for name, value in (("workers", workers), ("max_queue_size", max_queue_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")
    seeds, reseed = _worker_seeds(random_seeds, workers)
    if dummy:
        in_queue, out_queue = queue.Queue(), queue.Queue()
        pool = [
            threading.Thread(
                target=_worker_loop,
                args=(func, in_queue, out_queue, None, False, False),
                daemon=True,
            )
            for _ in range(workers)
        ]
    else:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        in_queue, out_queue = context.Queue(), context.Queue()
        pool = [
            context.Process(
                target=_worker_loop,
                args=(func, in_queue, out_queue, seed, reseed, True),
                daemon=True,
            )
            for seed in seeds
        ]
    for worker in pool:  # start workers before the feeder thread exists (fork)
        worker.start()
    feeder = _Feeder(iterable, in_queue, max_queue_size + workers, not dummy, workers)
    feeder.start()

    received, next_index, pending, suspect = 0, 0, {}, False
    try:
        while True:
            if feeder.error is not None:
                raise RuntimeError(f"Reading the iterable failed: {feeder.error}") from feeder.error
            if feeder.count is not None and received == feeder.count:
                return
            try:
                index, ok, payload = out_queue.get(timeout=0.1)
            except queue.Empty:
                # A worker that exits leaves its results in the queue first,
                # so a failure seen before an empty wait is real.
                failure = _lost_workers(pool, dummy, feeding=feeder.count is None)
                if failure and suspect:
                    raise RuntimeError(f"{failure}; {received} results had arrived.")
                suspect = failure is not None
                continue
            suspect = False
            received += 1
            if not ok:
                raise RuntimeError(payload)
            result = payload if dummy else pickle.loads(payload)
            if unordered:
                feeder.slots.release()
                yield index, result
                continue
            pending[index] = result
            while next_index in pending:
                feeder.slots.release()
                yield next_index, pending.pop(next_index)
                next_index += 1
    finally:
        feeder.stop.set()
        if dummy:
            for _ in pool:  # wake idle threads so they exit
                in_queue.put(None)
        else:
            in_queue.cancel_join_thread()  # unread items must not block interpreter exit
            for worker in pool:
                worker.terminate()
            for worker in pool:
                worker.join(timeout=5)


def parallel_apply(
    func,
    iterable,
    workers,
    max_queue_size,
    callback=None,
    dummy=False,
    random_seeds=True,
    unordered=False,
):
    """Apply `func` to every item of `iterable` in parallel.

    Returns the list of results (in input order; in completion order with
    `unordered=True`), or, given `callback`, calls `callback(result)` for each
    in that order and returns None. Arguments as in `parallel_apply_generator`.

    >>> parallel_apply(lambda x: x * x, range(5), workers=2, max_queue_size=4)
    [0, 1, 4, 9, 16]
    """
    generator = parallel_apply_generator(
        func, iterable, workers, max_queue_size, dummy, random_seeds, unordered
    )
    if callback is None:
        return [result for _, result in generator]
    for _, result in generator:
        callback(result)


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def _make_rng(seed):
    """A numpy Generator; seed=None draws its seed from numpy's global RNG, so
    `np.random.seed(...)` still makes runs repeatable."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        seed = np.random.randint(0, 2**63 - 1, dtype=np.int64)
    return np.random.default_rng(seed)


def length_boundaries(lengths, num_buckets, max_candidates=1024):
    """At most `num_buckets` bucket upper bounds that minimise the total padding
    when every example is padded to its bucket's bound; the last bound is the
    longest length. Exact dynamic programme over the distinct lengths (over
    `max_candidates` quantiles of them when there are more).

    >>> length_boundaries([1, 2, 3, 4, 5, 6, 7, 8], 4)
    [2, 4, 6, 8]
    >>> length_boundaries([3, 3, 3, 4, 100], 2)
    [4, 100]
    """
    if not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
        raise ValueError(f"num_buckets must be a positive int; got {num_buckets!r}.")
    lengths = np.sort(np.asarray(lengths, dtype=np.int64).ravel())
    if lengths.size == 0:
        raise ValueError("Cannot choose boundaries for an empty list of lengths.")
    candidates = np.unique(lengths)
    if len(candidates) > max_candidates:
        picks = np.linspace(0, len(candidates) - 1, max_candidates).round().astype(int)
        candidates = np.unique(candidates[picks])
    # count[j] / total[j]: number / sum of lengths <= candidates[j].
    count = np.searchsorted(lengths, candidates, side="right").astype(np.float64)
    total = np.concatenate([[0], np.cumsum(lengths)])[count.astype(int)].astype(np.float64)
    # pad[i, j]: padding of a bucket holding lengths in (candidates[i], candidates[j]].
    pad = (count[None, :] - count[:, None]) * candidates[None, :]
    pad -= total[None, :] - total[:, None]
    pad[np.tril_indices(len(candidates))] = np.inf
    # cost[j]: least padding of lengths <= candidates[j] in k buckets, the
    # last one ending at candidates[j]; start with k = 1.
    cost = count * candidates - total
    splits = []
    for _ in range(min(num_buckets, len(candidates)) - 1):  # k -> k + 1 buckets
        options = cost[:, None] + pad
        splits.append(options.argmin(axis=0))
        cost = options.min(axis=0)
    bounds, j = [int(candidates[-1])], len(candidates) - 1
    for split in reversed(splits):  # walk back through the previous bounds
        j = int(split[j])
        bounds.append(int(candidates[j]))
    return bounds[::-1]


def bucket_by_length(lengths, batch_size, boundaries, random=False, rng=None):
    """Batches of example indices grouped by length.

    `boundaries` are sorted bucket upper bounds (bucket b holds lengths in
    (boundaries[b-1], boundaries[b]]), or an int: that many buckets, bounds
    chosen to minimise padding (see `length_boundaries`). Returns a list of
    `(indices, pad_length)`; pad each batch to its `pad_length`, its bucket's
    upper bound, so a model sees at most len(boundaries) sequence lengths (and
    at most two batch sizes per bucket). With `random=True` examples are
    shuffled within buckets and the batches shuffled, using `rng` (a seed or a
    numpy Generator; None: numpy's global RNG).

    >>> batches = bucket_by_length([3, 9, 4, 8, 2], batch_size=2, boundaries=[4, 9])
    >>> [(list(map(int, i)), n) for i, n in batches]
    [([0, 2], 4), ([4], 4), ([1, 3], 9)]
    """
    lengths = np.asarray(lengths)
    if isinstance(boundaries, (int, np.integer)):
        boundaries = length_boundaries(lengths, boundaries)
    boundaries = [int(b) for b in boundaries]
    if sorted(set(boundaries)) != boundaries or not boundaries:
        raise ValueError(f"boundaries must be strictly increasing; got {boundaries}.")
    if lengths.size and lengths.max() > boundaries[-1]:
        i = int(lengths.argmax())
        raise ValueError(
            f"Example {i} has length {lengths[i]} > the largest boundary "
            f"{boundaries[-1]}; add a boundary >= {lengths[i]}."
        )
    shuffler = (np.random if rng is None else _make_rng(rng)) if random else None
    bucket_of = np.searchsorted(boundaries, lengths, side="left")
    batches = []
    for bucket, pad_length in enumerate(boundaries):
        members = np.flatnonzero(bucket_of == bucket)
        if random:
            members = shuffler.permutation(members)
        for start in range(0, len(members), batch_size):
            batches.append((members[start : start + batch_size], pad_length))
    if random:
        batches = [batches[i] for i in shuffler.permutation(len(batches))]
    return batches


_NOTHING = object()  # marks "no item" where None could be an item


def _is_plain(x):
    """Python scalars and (nested) lists of them: data, not structure."""
    if isinstance(x, (list, tuple)):
        return all(_is_plain(v) for v in x)
    return isinstance(x, (int, float, bool, str, bytes, np.generic))


def _name_structure(names, element):
    """Turn parts of a batch into dicts keyed by `names` (see `to_dataset`)."""
    if names is None:
        return element
    if is_string(names):
        return {names: element}
    if len(names) != len(element):
        raise ValueError(f"names {names!r} has {len(names)} entries for {len(element)} values.")
    if all(is_string(n) for n in names):
        return dict(zip(names, element))
    return tuple(_name_structure(n, v) for n, v in zip(names, element))


def _as_tf_structure(element, top=True):
    """Batch -> tuples/dicts of numpy arrays, as tf.data nests them. Lists and
    tuples holding arrays (and the top-level tuple, e.g. `(x, y)`) are
    structure; lists of plain numbers are data."""
    if isinstance(element, dict):
        return {k: _as_tf_structure(v, False) for k, v in element.items()}
    if isinstance(element, (list, tuple)) and (
        (top and isinstance(element, tuple)) or not _is_plain(element)
    ):
        return tuple(_as_tf_structure(v, False) for v in element)
    return np.asarray(element)


class DataGenerator:
    """Base class of data generators: subclass it and write `__iter__`.

    `__iter__(random)` yields batches, usually by collecting items from
    `self.sample(random)`, which yields `(is_end, item)`, and padding them:

        class Generator(DataGenerator):
            def __iter__(self, random=False):
                batch_ids, batch_labels = [], []
                for is_end, (ids, label) in self.sample(random):
                    batch_ids.append(ids)
                    batch_labels.append([label])
                    if len(batch_ids) == self.batch_size or is_end:
                        yield (sequence_padding(batch_ids, length=self.pad_length),
                               np.array(batch_labels))
                        batch_ids, batch_labels = [], []

        generator = Generator(data, batch_size=32)
        fit_generator(model, generator, epochs=3)
        # or: model.fit(generator.forfit(), steps_per_epoch=len(generator), epochs=3)

    Shuffling (`random=True`) permutes `data` when it has a length and is
    indexable, or else shuffles within a buffer of `buffer_size` items (default
    batch_size * 1000) as it streams.

    Length bucketing: with `bucket_boundaries` (sorted upper bounds, or an int
    number of buckets, see `length_boundaries`) and `length_fn(item)` giving the
    padded length an item needs, `sample` yields items bucket by bucket,
    flags `is_end=True` at the end of every batch and sets `self.pad_length`
    to the current bucket's bound; pass it to `sequence_padding(...,
    length=self.pad_length)` so the model sees a bounded number of shapes.
    Without bucketing `self.pad_length` is None (pad to the longest).
    """

    def __init__(
        self, data, batch_size=32, buffer_size=None, bucket_boundaries=None, length_fn=None
    ):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
        self.data = data
        self.batch_size = batch_size
        self.buffer_size = buffer_size or batch_size * 1000
        self.pad_length = None
        self.lengths = None
        self.bucket_boundaries = None
        if hasattr(data, "__len__"):
            self.steps = -(-len(data) // batch_size)
        else:
            self.steps = None
        if bucket_boundaries is not None:
            if length_fn is None:
                raise ValueError(
                    "bucket_boundaries needs length_fn(item) -> the item's padded length."
                )
            if self.steps is None or not hasattr(data, "__getitem__"):
                raise ValueError(
                    "Length bucketing needs data with len() and indexing (e.g. a list)."
                )
            self.lengths = np.array([length_fn(d) for d in data])
            if isinstance(bucket_boundaries, (int, np.integer)):
                bucket_boundaries = length_boundaries(self.lengths, bucket_boundaries)
            self.bucket_boundaries = list(bucket_boundaries)
            self.steps = len(bucket_by_length(self.lengths, batch_size, self.bucket_boundaries))

    def __len__(self):
        if self.steps is None:
            raise TypeError("The data has no len(), so the number of batches is unknown.")
        return self.steps

    def _shuffled(self):
        if self.steps is not None and hasattr(self.data, "__getitem__"):
            for i in np.random.permutation(len(self.data)):
                yield self.data[i]
            return
        buffer = []
        for item in self.data:
            buffer.append(item)
            if len(buffer) >= self.buffer_size:
                yield self._pop_random(buffer)
        while buffer:
            yield self._pop_random(buffer)

    @staticmethod
    def _pop_random(buffer):
        i = np.random.randint(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]  # O(1) removal
        return buffer.pop()

    def sample(self, random=False):
        """Yield `(is_end, item)`: is_end is True for the last item of the
        epoch, and with bucketing also for the last item of every batch."""
        if self.bucket_boundaries is not None:
            batches = bucket_by_length(
                self.lengths, self.batch_size, self.bucket_boundaries, random
            )
            for indices, pad_length in batches:
                self.pad_length = pad_length
                for j, i in enumerate(indices):
                    yield j == len(indices) - 1, self.data[i]
            return
        items = self._shuffled() if random else iter(self.data)
        current = next(items, _NOTHING)
        if current is _NOTHING:
            return
        for item in items:  # look one item ahead to know which one is last
            yield False, current
            current = item
        yield True, current

    def __iter__(self, random=False):
        raise NotImplementedError(
            "Subclasses of DataGenerator write __iter__(self, random=False) to yield batches."
        )

    def forfit(self, random=True):
        """Batches forever, epoch after epoch (for `model.fit`)."""
        while True:
            empty = True
            for batch in self.__iter__(random):
                empty = False
                yield batch
            if empty:
                raise ValueError("__iter__ yielded no batch for a whole epoch; is the data empty?")

    def fortest(self, random=False):
        """One pass over the batches (for evaluation and prediction)."""
        yield from self.__iter__(random)

    def to_dataset(self, names=None, padded_batch=False, random=True, seq_dims=1):
        """A `tf.data.Dataset` of `forfit(random)` (TensorFlow only).

        Dtypes and shapes are read from the first element: the batch axis and
        the next `seq_dims` axes become None, later axes keep their size.
        With `padded_batch=False`, `__iter__` yields ready batches; with
        `padded_batch=True` it yields single examples, which tf.data pads to the
        longest in each batch of `batch_size`.

        `names` turns values into dicts keyed by input names: a string wraps
        the whole element, a tuple of strings zips with the element's parts,
        and a tuple of such entries (None: leave that part alone) applies
        part by part, e.g. `names=(("Input-Token", "Input-Segment"), None)`
        for batches `([token_ids, segment_ids], labels)`.
        """
        try:
            import tensorflow as tf
        except ImportError as e:
            raise ImportError("to_dataset needs TensorFlow (pip install tensorflow).") from e

        def structured(element):
            return _as_tf_structure(_name_structure(names, element))

        first = next(iter(self.__iter__(random)), _NOTHING)
        if first is _NOTHING:
            raise ValueError("__iter__ yielded nothing; cannot infer the dataset's shapes.")
        leading = seq_dims if padded_batch else seq_dims + 1

        def spec(array):
            if array.dtype.kind in "OV":
                raise TypeError(f"Cannot make a tensor from a {array.dtype} array.")
            dtype = tf.string if array.dtype.kind in "US" else tf.as_dtype(array.dtype)
            shape = [None] * min(array.ndim, leading) + list(array.shape[leading:])
            return tf.TensorSpec(shape, dtype)

        signature = tf.nest.map_structure(spec, structured(first))

        def generator():
            for element in self.forfit(random):
                yield structured(element)

        dataset = tf.data.Dataset.from_generator(generator, output_signature=signature)
        if padded_batch:
            dataset = dataset.padded_batch(self.batch_size)
        return dataset


def fit_generator(model, generator, epochs=1, callbacks=None, verbose=1, random=True):
    """Train a compiled `model` on a `DataGenerator`, one `train_on_batch` per batch.

    Keras 2's `model.fit_generator`, which bert4keras scripts used, is gone
    from Keras 3; this takes its place and behaves like `model.fit` (Keras
    callbacks, progress bar, a `History` returned, an optimizer's EMA weights
    swapped in at the end, `model.stop_training` honoured), with each epoch
    being one pass of `generator.__iter__(random)`:

        history = fit_generator(model, train_generator, epochs=3, callbacks=[evaluator])

    Why not `model.fit(generator.forfit())` for length-bucketed batches: on
    TensorFlow, `fit` needs a tf.data pipeline (`to_dataset()`) whose sequence
    axis has no fixed length, and then runs one shape-generic graph for all
    buckets; `train_on_batch` traces one graph per bucket shape. With buckets
    up to 256 tokens the per-shape graphs trained 10% faster and traced in
    less time; with buckets up to 128 both were equal (2-core CPU,
    benchmarks/README.md). On JAX and PyTorch both ways compile or run per shape.
    """
    import keras

    steps = len(generator)
    callbacks = keras.callbacks.CallbackList(
        callbacks, add_history=True, add_progbar=verbose != 0, verbose=verbose,
        epochs=epochs, steps=steps, model=model,
    )
    model.stop_training = False
    callbacks.on_train_begin()
    logs = {}
    for epoch in range(epochs):
        callbacks.on_epoch_begin(epoch)
        totals, rows, step = {}, 0, -1
        for step, batch in enumerate(generator.__iter__(random)):
            callbacks.on_train_batch_begin(step)
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
            batch_logs = model.train_on_batch(x, y, sample_weight, return_dict=True)
            # train_on_batch gives this batch's values; `fit` logs the running
            # means over the epoch, weighted by batch size (exact for the loss
            # and for mean metrics such as accuracy).
            size = len(keras.tree.flatten(x)[0])
            rows += size
            for name, value in batch_logs.items():
                totals[name] = totals.get(name, 0.0) + float(value) * size
            logs = {name: total / rows for name, total in totals.items()}
            callbacks.on_train_batch_end(step, logs)
            if model.stop_training:
                break
        if step < 0:
            raise ValueError("__iter__ yielded no batch for a whole epoch; is the data empty?")
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    if epochs > 0 and isinstance(model.optimizer, keras.optimizers.Optimizer):
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs)
    return model.history


# ---------------------------------------------------------------------------
# Viterbi decoding
# ---------------------------------------------------------------------------


class ViterbiDecoder:
    """Best tag path for per-position scores and a transition matrix (numpy).

    `trans[i, j]` scores tag i followed by tag j; `starts` / `ends` list the
    tags a path may start / end with (None: any). `decode(nodes)` takes scores
    of shape (seq_len, num_tags) and returns the tag ids of the path with the
    highest sum of node and transition scores.

    >>> trans = np.array([[0.0, -5.0], [0.0, 0.0]])
    >>> ViterbiDecoder(trans).decode(np.array([[1.0, 0.0], [0.0, 1.0]]))
    array([0, 0])
    >>> ViterbiDecoder(trans, ends=[1]).decode(np.array([[1.0, 0.0], [0.0, 1.0]]))
    array([1, 1])
    """

    def __init__(self, trans, starts=None, ends=None):
        self.trans = np.asarray(trans, dtype=np.float64)
        if self.trans.ndim != 2 or self.trans.shape[0] != self.trans.shape[1]:
            raise ValueError(f"trans must be (num_tags, num_tags); got shape {self.trans.shape}.")
        self.num_labels = len(self.trans)
        self.starts = self._check_tags(starts, "starts")
        self.ends = self._check_tags(ends, "ends")

    def _check_tags(self, tags, name):
        if tags is None:
            return None
        tags = sorted({int(t) for t in tags})
        if not tags or tags[0] < 0 or tags[-1] >= self.num_labels:
            raise ValueError(
                f"{name} must be non-empty tag ids in [0, {self.num_labels}); got {tags}."
            )
        return tags

    def _forbid_others(self, scores, allowed):
        if allowed is not None:
            forbidden = np.ones(self.num_labels, bool)
            forbidden[allowed] = False
            scores[forbidden] = -np.inf

    def decode(self, nodes):
        nodes = np.array(nodes, dtype=np.float64)  # a copy: the caller's array is untouched
        if nodes.ndim != 2 or nodes.shape[1] != self.num_labels:
            raise ValueError(
                f"nodes must be (seq_len, {self.num_labels}); got shape {nodes.shape}."
            )
        if len(nodes) == 0:
            return np.zeros(0, dtype=int)
        self._forbid_others(nodes[0], self.starts)
        self._forbid_others(nodes[-1], self.ends)
        scores, backpointers = nodes[0], []
        for t in range(1, len(nodes)):
            # total[i, j]: best path ending in tag i at t-1, then tag j at t.
            total = scores[:, None] + self.trans + nodes[t][None, :]
            backpointers.append(total.argmax(axis=0))
            scores = total.max(axis=0)
        if not np.isfinite(scores.max()):
            raise ValueError("No tag path satisfies starts, ends and the finite transitions.")
        path = [int(scores.argmax())]
        for back in reversed(backpointers):
            path.append(int(back[path[-1]]))
        return np.array(path[::-1])


# ---------------------------------------------------------------------------
# Autoregressive decoding
# ---------------------------------------------------------------------------


def gather_states(states, indices):
    """Select rows `indices` from every array in a nested structure.

    `states` is None, or dicts / lists / tuples of numpy arrays or backend
    tensors whose leading axis is the row (one row per live hypothesis);
    non-array leaves (ints, strings) are passed through. Beam search and
    sampling call this whenever they reorder, drop or duplicate rows.

    >>> gather_states({"k": np.array([[1], [2]]), "step": 3}, [1, 1, 0])
    {'k': array([[2],
           [2],
           [1]]), 'step': 3}
    """
    indices = np.asarray(indices, dtype=np.int64)
    # Every row kept in place (greedy search): arrays of that many rows are
    # returned as they are, no copy of a device tensor.
    keep_rows = len(indices) if np.array_equal(indices, np.arange(len(indices))) else None
    return _gather_rows(states, indices, keep_rows)


def _gather_rows(states, indices, keep_rows):
    if states is None or isinstance(states, (str, bytes, int, float, bool, np.generic)):
        return states
    if isinstance(states, dict):
        return type(states)((k, _gather_rows(v, indices, keep_rows)) for k, v in states.items())
    if isinstance(states, tuple) and hasattr(states, "_fields"):  # namedtuple
        return type(states)(*(_gather_rows(v, indices, keep_rows) for v in states))
    if isinstance(states, (list, tuple)):
        return type(states)(_gather_rows(v, indices, keep_rows) for v in states)
    if isinstance(states, np.ndarray):
        return states[indices] if states.ndim else states
    shape = states.shape
    if len(shape) == 0 or shape[0] == keep_rows:
        return states
    from keras import ops

    return ops.take(states, ops.convert_to_tensor(indices.astype("int32")), axis=0)


def _check_state_rows(states, rows, path="states"):
    """Every array in `states` must have one row per hypothesis."""
    if isinstance(states, dict):
        for k, v in states.items():
            _check_state_rows(v, rows, f"{path}[{k!r}]")
    elif isinstance(states, (list, tuple)):
        for i, v in enumerate(states):
            _check_state_rows(v, rows, f"{path}[{i}]")
    elif hasattr(states, "shape") and len(states.shape) > 0 and states.shape[0] != rows:
        raise ValueError(
            f"{path} has leading axis {states.shape[0]} but there are {rows} rows "
            f"(hypotheses); every state array needs one row per row of output_ids."
        )


def _next_token_log_probs(scores, default_rtype, temperature, rows):
    """The user's predict output -> float64 (rows, vocab) log-probabilities."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != rows:
        raise ValueError(
            f"predict must return next-token scores of shape (rows, vocab_size) = ({rows}, V); "
            f"got shape {scores.shape}. If the model scores every position, return "
            f"scores[:, -1]."
        )
    scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("predict returned NaN scores.")
    if default_rtype == "logits":
        return log_softmax(scores / temperature)
    if (scores < 0).any():
        raise ValueError(
            "predict is declared to return probabilities (default_rtype='probas') but "
            "returned negative values; for logits use wraps(default_rtype='logits')."
        )
    with np.errstate(divide="ignore"):
        return log_softmax(np.log(scores) / temperature)


def _batch_model_inputs(inputs_list, pad_value, pad_mode):
    """Per-example lists of model inputs -> one list of batched arrays.

    Inputs whose shapes differ between examples are padded on every axis with
    `pad_value` (a scalar, or one value per model input)."""
    examples = [list(x) if isinstance(x, (list, tuple)) else [x] for x in inputs_list]
    count = len(examples[0])
    if any(len(x) != count for x in examples):
        raise ValueError("Every example must have the same number of model inputs.")
    pad_values = list(pad_value) if isinstance(pad_value, (list, tuple)) else [pad_value] * count
    if len(pad_values) != count:
        raise ValueError(f"pad_value has {len(pad_values)} entries for {count} model inputs.")
    batched = []
    for j in range(count):
        arrays = [np.asarray(x[j]) for x in examples]
        if len({a.shape for a in arrays}) == 1:
            batched.append(np.stack(arrays))
        elif len({a.ndim for a in arrays}) == 1:
            padded = sequence_padding(
                arrays, value=pad_values[j], seq_dims=arrays[0].ndim, mode=pad_mode
            )
            batched.append(padded)
        else:
            raise ValueError(f"Model input {j} has a different number of axes across examples.")
    return batched


def _top_indices(values, k):
    """Indices of the k largest values, largest first, ties in index order (as
    a stable sort of everything would give, in linear time for large arrays)."""
    if k < len(values):
        kth = np.partition(values, len(values) - k)[len(values) - k]
        candidates = np.flatnonzero(values >= kth)
    else:
        candidates = np.arange(len(values))
    return candidates[np.argsort(-values[candidates], kind="stable")[:k]]


def _nucleus_mask(probas, topp):
    """True on the smallest set of most likely tokens whose probability
    reaches `topp` (of each row's total). Rows are first tried on their 64
    most likely tokens, then on more, so peaked rows skip a full sort."""
    rows, vocab_size = probas.shape
    total = np.maximum(probas.sum(axis=1, keepdims=True), 1e-300)
    mask = np.zeros(probas.shape, bool)
    pending, size = np.arange(rows), min(vocab_size, 64)
    while len(pending):
        p = probas[pending]
        if size < vocab_size:
            top = np.argpartition(-p, size - 1, axis=1)[:, :size]
        else:
            top = np.broadcast_to(np.arange(vocab_size), p.shape)
        order = np.argsort(-np.take_along_axis(p, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        top_p = np.take_along_axis(p, top, axis=1) / total[pending]
        mass_before = np.cumsum(top_p, axis=1) - top_p
        done = (mass_before[:, -1] + top_p[:, -1] >= topp) | (size == vocab_size)
        mask[pending[done, None], top[done]] = mass_before[done] < topp
        pending, size = pending[~done], min(vocab_size, size * 16)
    return mask


def _restrict_support(probas, topk, topp):
    """Zero all but the topk most likely tokens, then all but the smallest
    most-likely set whose probability reaches topp (nucleus)."""
    if topk is not None and topk < probas.shape[1]:
        keep = np.argpartition(-probas, topk - 1, axis=1)[:, :topk]
        mask = np.zeros(probas.shape, bool)
        np.put_along_axis(mask, keep, True, axis=1)
        probas = np.where(mask, probas, 0.0)
    if topp is not None:
        probas = np.where(_nucleus_mask(probas, topp), probas, 0.0)
    return probas


def _sample_tokens(probas, rng):
    """One token per row drawn from (unnormalised) probas; -1 for a row with
    no probability mass."""
    cumulative = np.cumsum(probas, axis=1)
    total = cumulative[:, -1]
    u = rng.random(len(probas)) * total
    tokens = (cumulative <= u[:, None]).sum(axis=1)  # first index with cumulative > u
    # Rounding can put u at the very top: fall back to the last possible token.
    last_possible = probas.shape[1] - 1 - np.argmax(probas[:, ::-1] > 0, axis=1)
    tokens = np.minimum(tokens, last_possible)
    return np.where(total > 0, tokens, -1)


class AutoRegressiveDecoder:
    """Beam search and random sampling for any next-token model.

    Subclass it and write `predict(self, inputs, output_ids, states)`, decorated
    with `@AutoRegressiveDecoder.wraps(default_rtype, use_states)`:

    - `inputs`: list of model-input arrays with one row per hypothesis;
    - `output_ids`: (rows, length) ids so far (starting with `start_id` unless
      it is None);
    - `states`: whatever predict returned last time (with `use_states=True`),
      rows already reordered to match `output_ids`;
    - returns next-token scores of shape (rows, vocab_size): probabilities
      (`default_rtype='probas'`) or logits (`'logits'`); with
      `use_states=True` a pair `(scores, new_states)`.

    `states` may be any nested dict/list/tuple of numpy arrays or backend
    tensors with the row on the leading axis; the decoder applies every row
    selection to them with `gather_states`. The first call sees one row per
    input (inputs are only duplicated afterwards).

    Sequences returned include `start_id` (if any) and the end token(s).
    `maxlen` is the most tokens generated after the start token; `minlen` the
    shortest returned sequence length (start and end tokens included): until
    then the end token that would finish a sequence is forbidden (the other
    tokens' probabilities renormalised); `min_ends` end tokens finish a sequence.

    >>> rng = np.random.default_rng(0)
    >>> table = rng.normal(size=(6, 6))  # bigram logits: next token | last token
    >>> class Bigram(AutoRegressiveDecoder):
    ...     @AutoRegressiveDecoder.wraps(default_rtype="logits")
    ...     def predict(self, inputs, output_ids, states):
    ...         return table[output_ids[:, -1]]
    >>> decoder = Bigram(start_id=0, end_id=5, maxlen=8)
    >>> ids = decoder.beam_search([], topk=3)  # no model inputs besides the ids
    >>> samples = decoder.random_sample([], n=4, topk=3, seed=1)
    """

    def __init__(self, start_id, end_id, maxlen, minlen=1):
        for name, value in (("start_id", start_id), ("end_id", end_id)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
                raise ValueError(f"{name} must be a token id (int >= 0) or None; got {value!r}.")
        if not isinstance(maxlen, (int, np.integer)) or maxlen < 1:
            raise ValueError(f"maxlen must be a positive int; got {maxlen!r}.")
        if not isinstance(minlen, (int, np.integer)) or minlen < 0:
            raise ValueError(f"minlen must be an int >= 0; got {minlen!r}.")
        self.start_id = start_id
        self.end_id = end_id
        self.maxlen = int(maxlen)
        self.minlen = int(minlen)
        self.models = {}
        if start_id is None:
            self.first_output_ids = np.empty((1, 0), dtype=int)
        else:
            self.first_output_ids = np.array([[start_id]], dtype=int)

    @staticmethod
    def wraps(default_rtype="probas", use_states=False):
        """Decorator for `predict`. The wrapped method takes
        `(inputs, output_ids, states, temperature=1, rtype=default_rtype)` and
        returns `(result, states)`: normalised probabilities for
        rtype='probas', normalised log-probabilities for rtype='logits', after
        the temperature is applied."""
        if default_rtype not in ("probas", "logits"):
            raise ValueError(f"default_rtype must be 'probas' or 'logits'; got {default_rtype!r}.")

        def decorator(predict):
            @functools.wraps(predict)
            def wrapped(self, inputs, output_ids, states, temperature=1, rtype=default_rtype):
                if rtype not in ("probas", "logits"):
                    raise ValueError(f"rtype must be 'probas' or 'logits'; got {rtype!r}.")
                result = predict(self, inputs, output_ids, states)
                if use_states:
                    if not (isinstance(result, (tuple, list)) and len(result) == 2):
                        raise ValueError(
                            "With use_states=True, predict must return (scores, states)."
                        )
                    scores, states = result
                else:
                    scores, states = result, None
                log_probs = _next_token_log_probs(
                    scores, default_rtype, temperature, len(output_ids)
                )
                return (np.exp(log_probs) if rtype == "probas" else log_probs), states

            wrapped.is_wrapped_predict = True
            return wrapped

        return decorator

    def predict(self, inputs, output_ids, states):
        raise NotImplementedError(
            "Write predict(self, inputs, output_ids, states) in a subclass, decorated "
            "with @AutoRegressiveDecoder.wraps(default_rtype=..., use_states=...)."
        )

    def last_token(self, model):
        """A Keras model with `model`'s inputs whose outputs keep only the last
        position (cached per model)."""
        key = id(model)
        if key not in self.models:
            import keras

            outputs = [output[:, -1] for output in model.outputs]
            last = keras.Model(model.inputs, outputs[0] if len(outputs) == 1 else outputs)
            self.models[key] = (model, last)  # keep model alive so its id stays unique
        return self.models[key][1]

    # -- shared step ---------------------------------------------------------

    def _check_args(self, temperature, min_ends, repetition_penalty):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}.")
        if not isinstance(min_ends, (int, np.integer)) or min_ends < 1:
            raise ValueError(f"min_ends must be a positive int; got {min_ends!r}.")
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0; got {repetition_penalty!r}.")

    def _next_log_probs(
        self, inputs, output_ids, states, temperature, repetition_penalty, end_counts, min_ends
    ):
        """Log-probabilities of the next token for every row, with the
        repetition penalty and the minlen rule applied."""
        if not getattr(self.predict, "is_wrapped_predict", False):
            raise TypeError(
                f"{type(self).__name__}.predict must be decorated with "
                "@AutoRegressiveDecoder.wraps(default_rtype=..., use_states=...)."
            )
        rows = len(output_ids)
        log_probs, states = self.predict(inputs, output_ids, states, temperature, "logits")
        _check_state_rows(states, rows)
        vocab_size = log_probs.shape[1]
        if self.end_id is not None and self.end_id >= vocab_size:
            raise ValueError(
                f"end_id={self.end_id} is outside the vocabulary of size {vocab_size}."
            )
        if repetition_penalty != 1:
            # Each token already generated has its log-probability multiplied
            # by the penalty (p -> p ** penalty), then the row is renormalised.
            generated = output_ids[:, 0 if self.start_id is None else 1 :]
            seen = np.zeros(log_probs.shape, bool)
            seen[np.arange(rows)[:, None], generated] = True
            log_probs = log_softmax(np.where(seen, log_probs * repetition_penalty, log_probs))
        if self.end_id is not None and output_ids.shape[1] + 1 < self.minlen:
            # The end token that would finish a row is forbidden; the rest of
            # the row is renormalised, as if the model had been told so.
            would_finish = end_counts == min_ends - 1
            log_probs[would_finish, self.end_id] = -np.inf
            log_probs = log_softmax(log_probs)
        return log_probs, states

    def _generated_length(self, output_ids):
        return output_ids.shape[1] - (0 if self.start_id is None else 1)

    # -- beam search -----------------------------------------------------------

    def beam_search(
        self,
        inputs,
        topk,
        states=None,
        temperature=1,
        min_ends=1,
        length_penalty=0.0,
        repetition_penalty=1.0,
    ):
        """Best sequence for one example (`inputs`: a list of model inputs)."""
        return self.beam_search_batch(
            [inputs], topk, states, temperature, min_ends, length_penalty, repetition_penalty
        )[0]

    def beam_search_batch(
        self,
        inputs_list,
        topk,
        states=None,
        temperature=1,
        min_ends=1,
        length_penalty=0.0,
        repetition_penalty=1.0,
        pad_value=0,
        pad_mode="post",
    ):
        """Beam search for many examples at once; returns one id array each.

        `inputs_list` holds one entry per example: a list of model inputs
        (bert4keras style) or a single array. Inputs whose shapes differ are
        padded with `pad_value` (scalar or one per model input) at the end
        (`pad_mode='post'`) or start ('pre'); predict must tolerate that padding.
        `states` (optional) has one row per example.

        Each example keeps `topk` hypotheses; a hypothesis that ends moves to
        a finished pool and the beam narrows by one. Hypotheses are ranked by
        summed log-probability; finished ones are compared by that sum divided
        by (number of generated tokens) ** length_penalty (0: the plain sum;
        > 0 favours longer ones). An example stops as soon as no live
        hypothesis can beat its best finished one.

        `repetition_penalty`: every token a row has already generated gets
        its probability raised to this power (log-probability times the
        penalty), then the row is renormalised; > 1 discourages repeats. It
        applies after the temperature.
        """
        if not isinstance(topk, (int, np.integer)) or topk < 1:
            raise ValueError(f"topk (the beam size) must be a positive int; got {topk!r}.")
        self._check_args(temperature, min_ends, repetition_penalty)
        num = len(inputs_list)
        if num == 0:
            return []
        inputs = _batch_model_inputs(inputs_list, pad_value, pad_mode)
        output_ids = np.repeat(self.first_output_ids, num, axis=0)
        owner = np.arange(num)  # which example each row belongs to; kept sorted
        scores = np.zeros(num)  # summed log-probability of each row
        end_counts = np.zeros(num, dtype=int)
        finished = [[] for _ in range(num)]  # (final score, ids) per example

        def finish(rows, ids):
            length = max(self._generated_length(ids), 1)
            for r in rows:
                final = scores[r] / length**length_penalty
                finished[owner[r]].append((final, ids[r]))

        for step in range(self.maxlen):
            log_probs, states = self._next_log_probs(
                inputs, output_ids, states, temperature, repetition_penalty, end_counts, min_ends
            )
            candidates = scores[:, None] + log_probs
            vocab_size = candidates.shape[1]

            # Each example keeps its best (topk - finished) finite candidates.
            chosen_rows, chosen_tokens = [], []
            examples, starts = np.unique(owner, return_index=True)
            for ex, lo, hi in zip(examples, starts, list(starts[1:]) + [len(owner)]):
                flat = candidates[lo:hi].ravel()
                best = _top_indices(flat, topk - len(finished[ex]))
                best = best[np.isfinite(flat[best])]
                if len(best) == 0:  # nothing can follow: finish the rows as they are
                    finish(range(lo, hi), output_ids)
                chosen_rows.append(lo + best // vocab_size)
                chosen_tokens.append(best % vocab_size)
            rows = np.concatenate(chosen_rows).astype(int)
            tokens = np.concatenate(chosen_tokens).astype(int)

            output_ids = np.concatenate([output_ids[rows], tokens[:, None]], axis=1)
            scores = candidates[rows, tokens]
            owner = owner[rows]
            end_counts = end_counts[rows] + (tokens == self.end_id)
            done = end_counts >= min_ends
            if step == self.maxlen - 1:
                done[:] = True
            finish(np.flatnonzero(done), output_ids)

            # Drop examples whose best finished sequence no live one can beat:
            # log-probabilities only add up to lower sums, so a live row's final
            # score is at most its sum divided by the most favourable length.
            length = max(self._generated_length(output_ids), 1)
            with np.errstate(invalid="ignore"):
                bound = np.maximum(
                    scores / length**length_penalty, scores / self.maxlen**length_penalty
                )
            keep = ~done
            for ex in np.unique(owner[keep]):
                live = keep & (owner == ex)
                if len(finished[ex]) >= topk or (
                    finished[ex] and max(f for f, _ in finished[ex]) >= bound[live].max()
                ):
                    keep[live] = False

            keep = np.flatnonzero(keep)
            if len(keep) == 0:
                break
            selected = rows[keep]  # indices into the rows predict just saw
            inputs = [x[selected] for x in inputs]
            states = gather_states(states, selected)
            output_ids, scores = output_ids[keep], scores[keep]
            owner, end_counts = owner[keep], end_counts[keep]

        results = []
        for pool in finished:
            best = int(np.argmax([f for f, _ in pool]))
            results.append(pool[best][1])
        return results

    # -- sampling ---------------------------------------------------------------

    def random_sample(
        self,
        inputs,
        n,
        topk=None,
        topp=None,
        states=None,
        temperature=1,
        min_ends=1,
        repetition_penalty=1.0,
        seed=None,
    ):
        """`n` sampled sequences for one example (`inputs`: a list of model inputs)."""
        return self.random_sample_batch(
            [inputs], n, topk, topp, states, temperature, min_ends, repetition_penalty, seed
        )[0]

    def random_sample_batch(
        self,
        inputs_list,
        n,
        topk=None,
        topp=None,
        states=None,
        temperature=1,
        min_ends=1,
        repetition_penalty=1.0,
        seed=None,
        pad_value=0,
        pad_mode="post",
    ):
        """Sample `n` sequences for each example; returns a list (per example)
        of `n` id arrays, in sample order.

        Each step draws from the `topk` most likely tokens (None: all), then
        from the smallest most-likely set whose probability reaches `topp`
        (None: no limit), renormalised. `seed` (int, numpy Generator, or
        None: drawn from numpy's global RNG) makes sampling reproducible.
        Inputs, padding, `states` and `repetition_penalty` as in
        `beam_search_batch`.
        """
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int; got {n!r}.")
        if topk is not None and (not isinstance(topk, (int, np.integer)) or topk < 1):
            raise ValueError(f"topk must be a positive int or None; got {topk!r}.")
        if topp is not None and not 0 < topp <= 1:
            raise ValueError(f"topp must be in (0, 1] or None; got {topp!r}.")
        self._check_args(temperature, min_ends, repetition_penalty)
        rng = _make_rng(seed)
        num = len(inputs_list)
        if num == 0:
            return []
        inputs = _batch_model_inputs(inputs_list, pad_value, pad_mode)
        output_ids = np.repeat(self.first_output_ids, num, axis=0)
        owner = np.arange(num)
        sample_index = np.zeros(num, dtype=int)
        end_counts = np.zeros(num, dtype=int)
        results = [[None] * n for _ in range(num)]

        for step in range(self.maxlen):
            log_probs, states = self._next_log_probs(
                inputs, output_ids, states, temperature, repetition_penalty, end_counts, min_ends
            )
            if step == 0:  # one prediction per example, then n rows each
                rows = np.repeat(np.arange(num), n)
                log_probs, output_ids = log_probs[rows], output_ids[rows]
                end_counts = end_counts[rows]
                inputs = [x[rows] for x in inputs]
                states = gather_states(states, rows)
                owner, sample_index = rows, np.tile(np.arange(n), num)
            probas = _restrict_support(np.exp(log_probs), topk, topp)
            tokens = _sample_tokens(probas, rng)
            stuck = tokens < 0  # no token allowed: finish the row as it is
            new_ids = np.concatenate([output_ids, np.maximum(tokens, 0)[:, None]], axis=1)
            end_counts = end_counts + (tokens == self.end_id)
            done = stuck | (end_counts >= min_ends) | (step == self.maxlen - 1)
            for r in np.flatnonzero(done):
                results[owner[r]][sample_index[r]] = output_ids[r] if stuck[r] else new_ids[r]
            keep = np.flatnonzero(~done)
            if len(keep) == 0:
                break
            inputs = [x[keep] for x in inputs]
            states = gather_states(states, keep)
            output_ids, end_counts = new_ids[keep], end_counts[keep]
            owner, sample_index = owner[keep], sample_index[keep]
        return results
