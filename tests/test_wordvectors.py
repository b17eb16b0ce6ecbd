"""Word-vector conversion (every source format), bad files, and batched neighbour queries."""
from __future__ import annotations

import gzip
import json
import struct
import zipfile

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.stage import load_manifest
from pipeline.augment.word_vectors import (VECTORS_FILE, VOCAB_FILE, WordVectors, convert_source, train_glove)

RNG = np.random.default_rng(0)
WORDS = ["the", "cat", "dog", "movie", "film", "good", "great", "bad", "café", "awful"]
MATRIX = RNG.normal(size=(len(WORDS), 6)).astype(np.float32)


def glove_lines(words=WORDS, matrix=MATRIX):
    return [w + " " + " ".join(f"{x:.6f}" for x in row) for w, row in zip(words, matrix)]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def expected_unit_rows(matrix=MATRIX):
    rounded = np.array([[float(f"{x:.6f}") for x in row] for row in matrix], dtype=np.float32)
    return (rounded / np.linalg.norm(rounded.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)


def converted(tmp_path, name, source, **kwargs):
    out = tmp_path / name
    out.mkdir()
    info = convert_source(source, out, **kwargs)
    return out, info


def test_glove_text_gz_and_zip_convert_to_the_same_normalised_matrix(tmp_path):
    txt = write(tmp_path / "g.txt", glove_lines())
    with gzip.open(tmp_path / "g.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write(txt.read_text(encoding="utf-8"))
    with zipfile.ZipFile(tmp_path / "g.zip", "w") as archive:
        archive.write(txt, "glove.6B.6d.txt")
    outputs = [converted(tmp_path, f"o{i}", "glove_text", path=tmp_path / name)
               for i, name in enumerate(["g.txt", "g.txt.gz", "g.zip"])]
    for out, info in outputs:
        assert (info.dim, info.vocab_size, info.rows_read) == (6, len(WORDS), len(WORDS))
        matrix = np.load(out / VECTORS_FILE)
        assert matrix.dtype == np.float32
        np.testing.assert_allclose(matrix, expected_unit_rows(), rtol=0, atol=1e-6)
        assert (out / VOCAB_FILE).read_text(encoding="utf-8").split("\n")[:-1] == WORDS
    assert np.load(outputs[0][0] / VECTORS_FILE).tobytes() == np.load(outputs[2][0] / VECTORS_FILE).tobytes()


def test_word2vec_text_and_binary(tmp_path):
    write(tmp_path / "w.txt", [f"{len(WORDS)} 6"] + glove_lines())
    with open(tmp_path / "w.bin", "wb") as handle:
        handle.write(f"{len(WORDS)} 6\n".encode())
        for word, row in zip(WORDS, MATRIX):
            handle.write(word.encode() + b" " + struct.pack("<6f", *row) + b"\n")
    text_out, _ = converted(tmp_path, "t", "word2vec", path=tmp_path / "w.txt")
    bin_out, info = converted(tmp_path, "b", "word2vec", path=tmp_path / "w.bin", max_words=4)
    np.testing.assert_allclose(np.load(text_out / VECTORS_FILE), expected_unit_rows(), atol=1e-6)
    unit = MATRIX[:4] / np.linalg.norm(MATRIX[:4].astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(np.load(bin_out / VECTORS_FILE), unit, atol=1e-7)
    assert info.vocab_size == 4
    assert (bin_out / VOCAB_FILE).read_text(encoding="utf-8").split() == WORDS[:4]


@pytest.mark.parametrize("bad_line, problem", [
    ("dog 0.1 0.2 0.3", "expected a word and 6 numbers, found 3"),
    ("dog 0.1 0.2 0.3 0.4 0.5 0.6 0.7", "found 7"),
    ("dog 0.1 0.2 zero 0.4 0.5 0.6", "not a number"),
    ("dog 0.1 0.2 nan 0.4 0.5 0.6", "non-finite"),
])
def test_malformed_glove_line_is_one_error_naming_the_line(tmp_path, bad_line, problem):
    lines = glove_lines()
    lines[3] = bad_line
    path = write(tmp_path / "bad.txt", lines)
    with pytest.raises(InputError, match=problem) as error:
        convert_source("glove_text", tmp_path, path=path)
    assert error.value.line == 4 and error.value.path == str(path)
    assert not (tmp_path / VECTORS_FILE).exists()


def test_word2vec_header_in_a_glove_file_and_truncated_binary_are_named(tmp_path):
    path = write(tmp_path / "h.txt", ["10 6"] + glove_lines())
    with pytest.raises(InputError, match="word2vec header") as error:
        convert_source("glove_text", tmp_path, path=path)
    assert error.value.line == 1
    with open(tmp_path / "short.bin", "wb") as handle:
        handle.write(b"3 6\n" + b"cat " + struct.pack("<6f", *MATRIX[0]) + b"dog " + b"\0" * 8)
    with pytest.raises(InputError, match="entry 2 has 8 bytes"):
        convert_source("word2vec", tmp_path, path=tmp_path / "short.bin")


def test_zero_rows_and_duplicates_are_dropped(tmp_path):
    lines = glove_lines() + ["zero " + " ".join(["0.0"] * 6), glove_lines()[1].replace("cat", "cat", 1)]
    out, info = converted(tmp_path, "o", "glove_text", path=write(tmp_path / "g.txt", lines))
    assert (info.zero_rows_dropped, info.duplicates_dropped, info.vocab_size) == (1, 1, len(WORDS))


def brute_force_neighbours(matrix, words, word, k):
    unit = np.asarray(matrix, dtype=np.float64)
    idx = words.index(word)
    scores = unit @ unit[idx]
    scores[idx] = -np.inf
    return [words[i] for i in np.argsort(-scores, kind="stable")[:k]]


def test_neighbours_are_the_brute_force_ones_for_any_batching(tmp_path):
    out, _ = converted(tmp_path, "p", "packaged", max_words=20_000)
    vectors = WordVectors(out, max_words=5000)
    assert len(vectors.words) == 5000 and vectors.dim == 50
    queries = ["movie", "good", "king", "paris", "running", "the", "notaword123", "zebra"]
    one = vectors.neighbours(queries, 15, batch_size=1)
    many = vectors.neighbours(queries, 15, batch_size=64)
    assert one == many
    assert "notaword123" not in one
    for word in one:
        assert one[word] == brute_force_neighbours(vectors.matrix, vectors.words, word, 15)
        assert word not in one[word] and len(one[word]) == 15
    assert {"film", "movies"} <= set(one["movie"])
    # words past max_words are neither found nor returned
    rare = WordVectors(out).words[10_000]
    assert rare not in vectors and rare not in vectors.neighbours([rare], 5)


def test_glove_python_training_orders_vocabulary_by_frequency(tmp_path):
    corpus = [["the", "cat", "sat", "on", "the", "mat"], ["the", "dog", "sat", "on", "the", "log"],
              ["a", "cat", "and", "a", "dog"]] * 20
    words, matrix = train_glove(corpus, dimensions=8, window=3, epochs=3, min_count=40)
    assert words == ["the", "a", "cat", "dog", "on", "sat"]
    assert matrix.shape == (6, 8) and np.isfinite(matrix).all()
    again = train_glove(corpus, dimensions=8, window=3, epochs=3, min_count=40)
    assert np.array_equal(again[1], matrix)      # one thread + a seed: reproducible
    out, info = converted(tmp_path, "t", "trained", corpus=corpus,
                          train_options={"dimensions": 8, "window": 3, "epochs": 3})
    assert info.source == "glove-python" and info.vocab_size == 9   # every distinct word
    with pytest.raises(InputError, match="min_count=1000"):
        train_glove(corpus, min_count=1000)


def test_luigi_word_vectors_from_a_glove_file_identified_by_content(tmp_path, isolated_workdir):
    import luigi

    from tasks.augment import WordVectors

    (tmp_path / "a").mkdir()
    path = write(tmp_path / "a" / "vectors.txt", glove_lines())
    task = WordVectors(vectors_source="glove_text", vectors_path=str(path))
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    out = task.output_dir()
    assert (out / VOCAB_FILE).read_text(encoding="utf-8").split() == WORDS
    assert str(path) not in json.dumps(load_manifest(out)["params"])
    (tmp_path / "b").mkdir()
    moved = (tmp_path / "b" / "same.txt")
    moved.write_bytes(path.read_bytes())
    assert WordVectors(vectors_source="glove_text", vectors_path=str(moved)).output_dir() == out
    bad = write(tmp_path / "b" / "bad.txt", glove_lines()[:2] + ["dog 1 2"])
    failing = WordVectors(vectors_source="glove_text", vectors_path=str(bad))
    assert not luigi.build([failing], local_scheduler=True, log_level="CRITICAL")
    assert not failing.output_dir().exists()
    with pytest.raises(InputError, match="bad.txt:3: expected a word and 6 numbers, found 2"):
        convert_source("glove_text", tmp_path / "b", path=bad)
    with pytest.raises(InputError, match="needs vectors_path"):
        WordVectors(vectors_source="word2vec").fingerprint()
