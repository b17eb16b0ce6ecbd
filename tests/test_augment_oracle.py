"""The fast augmentation path against a plain, unbatched implementation of the reference.

The oracle below is written from docs/ALGORITHM.md §1 and the reference's behaviour: it re-tokenises
the sentence for every word, finds the word's pieces by counting word-initial pieces, runs one
MLM forward at batch size 1 per position (no padding, no attention mask), argsorts the GloVe
similarities of each word on its own, and samples with plain Python loops. It shares nothing
with :mod:`pipeline.augment.augmenter` except the stop-word file and the per-example seed derivation
(``example_rng``, which defines our determinism rather than the algorithm).

The MLM comparison runs the model in float64 on both sides: the batched path pads and groups
rows differently from a batch-size-1 forward, and in float32 two logits that differ by less
than the rounding noise could swap places in the top M. float64 removes that noise, so any
difference left is a difference in the algorithm.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.augment.augmenter import (AugmentConfig, Augmenter, NEVER_SPLIT, example_rng, load_stopwords)
from pipeline.augment.mlm_candidates import MaskedLMCandidates
from pipeline.augment.word_vectors import WordVectors, convert_source

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
WRITTEN = [
    "The film is a charming, often affecting journey through unaffordable housing.",
    "Hide new secretions from the parental units",
    "an extraordinarily unremarkable screenplay , but the cinematography is breathtaking .",
    "Café owners in Zürich weren't amused by the naïve critique!",
    "the the of and to",
    "... !!! ???",
    "",
    "Zyzzyvas quixotically outmaneuvered flibbertigibbets yesterday.",
    "Paris is lovely in the springtime, said the gallant musketeer.",
    # Plain content words, so that these sentences alone (no ../shared) exercise over 40 positions.
    "A quiet harbour town wakes slowly under grey autumn skies.",
    "The orchestra rehearsed the difficult symphony until midnight.",
    "Her brother painted wooden boats and sold them at the market.",
]
PAIRS = [("The cat sat on the mat.", "A dog slept under the wobbly table."),
         ("Revenue rose sharply in the third quarter.", "Profits declined despite higher sales.")]


def real_sentences(limit: int = 30) -> list[str]:
    """SST-2 train sentences when ../shared is present, then the written ones (enough alone)."""
    if not SST2.exists():
        return WRITTEN
    with open(SST2, encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:limit + 1]
    return [row[0] for row in rows] + WRITTEN


# ------------------------------------------------------------------------------------------
# The oracle: the reference algorithm, one word and one forward at a time.
# ------------------------------------------------------------------------------------------

class ReferenceOracle:
    def __init__(self, model, tokenizer, vectors: WordVectors, mode: str, top_m: int,
                 max_length: int):
        try:
            from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer
        except ImportError:  # transformers < 5
            from transformers.models.bert.tokenization_bert import BasicTokenizer

        self.model, self.tokenizer, self.mode, self.top_m = model, tokenizer, mode, top_m
        self.max_length = max_length
        self.basic = BasicTokenizer(do_lower_case=True, never_split=list(NEVER_SPLIT))
        self.stopwords = load_stopwords()
        if vectors is not None:
            self.emb = np.asarray(vectors.matrix, dtype=np.float64)
            self.vocab = {w: i for i, w in enumerate(vectors.words)}
            self.words = vectors.words

    def replaceable(self, word):
        return re.search("[^a-z]", word.lower()) is None and word.lower() not in self.stopwords

    def word_distance(self, word):
        if word not in self.vocab:
            return []
        idx = self.vocab[word]
        dist = self.emb @ self.emb[idx]
        dist[idx] = -np.inf
        order = np.argsort(-dist, kind="stable")[:self.top_m]
        found = [self.words[i] for i in order]
        return [w.title() for w in found] if word.istitle() else found

    def masked_lm(self, sentence, word_index):
        import torch

        pieces = self.tokenizer.tokenize(sentence)
        # The reference's walk: count word-initial pieces until the word's own pieces.
        token_idx, span = -1, []
        for i, piece in enumerate(pieces):
            if "##" not in piece:
                token_idx += 1
                if token_idx == word_index:
                    span = [i]
                elif token_idx > word_index:
                    break
            elif token_idx == word_index:
                span.append(i)
        if self.mode == "tinybert" and len(span) != 1:
            return None  # not an MLM word
        start, end = span[0], span[-1] + 1
        window = pieces
        if 2 * len(pieces) - (end - start) + 4 > self.max_length:
            width = (self.max_length - 4 + (end - start)) // 2
            first = max(0, start - (width - (end - start)) // 2)
            last = min(len(pieces), first + width)
            first = max(0, last - width)
            window, start, end = pieces[first:last], start - first, end - first
        masked = window[:start] + ["[MASK]"] + window[end:]
        tokens = ["[CLS]"] + masked + ["[SEP]"] + window + ["[SEP]"]
        segments = [0] * (len(masked) + 2) + [1] * (len(window) + 1)
        ids = torch.tensor([self.tokenizer.convert_tokens_to_ids(tokens)])
        with torch.no_grad():
            logits = self.model(input_ids=ids, token_type_ids=torch.tensor([segments])).logits
        best = torch.argsort(logits[0, 1 + start], descending=True)[:self.top_m].tolist()
        return [t for t in self.tokenizer.convert_ids_to_tokens(best) if not t.startswith("##")]

    def candidates(self, sentence):
        words = self.basic.tokenize(sentence)
        result = []
        for index, word in enumerate(words):
            if not self.replaceable(word):
                continue
            found = None
            if self.mode in ("tinybert", "mlm"):
                found = self.masked_lm(sentence, index)
            if found is None:
                found = self.word_distance(word)
            result.append((index, found or [word]))
        return words, result

    def augment_side(self, sentence, n, p, seed, example_id, side):
        words, cands = self.candidates(sentence)
        seen, out = [sentence, " ".join(words)], []
        if not cands:
            return out
        draws = example_rng(seed, example_id, side).random((n, len(cands), 2))
        for t in range(n):
            new = list(words)
            for j, (index, options) in enumerate(cands):
                pick = options[min(int(draws[t, j, 0] * len(options)), len(options) - 1)]
                if draws[t, j, 1] < p:
                    new[index] = pick
            text = " ".join(new)
            if text not in seen:
                seen.append(text)
                out.append(text)
        return out

    def augment(self, examples, n, p, seed):
        rows = []
        for ex in examples:
            texts = [(ex["text_a"], ex["text_b"])]
            texts += [(v, ex["text_b"]) for v in
                      self.augment_side(ex["text_a"], n, p, seed, ex["id"], "a")]
            if ex["text_b"] is not None:
                texts += [(ex["text_a"], v) for v in
                          self.augment_side(ex["text_b"], n, p, seed, ex["id"], "b")]
            rows += [{"id": f"{ex['id']}-aug{k}", "orig_id": ex["id"], "aug_index": k,
                      "text_a": a, "text_b": b, "label": ex["label"]}
                     for k, (a, b) in enumerate(texts)]
        return rows


# ------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared CPU their syncs cost 5x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def packaged_vectors(tmp_path_factory):
    out = tmp_path_factory.mktemp("glove")
    convert_source("packaged", out)
    # The first 30,000 rows keep the oracle's per-word full argsort quick (the default is 100,000).
    return WordVectors(out, max_words=30_000)


@pytest.fixture(scope="module")
def mlm64(tiny_mlm_dir):
    from transformers import AutoTokenizer, BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(tiny_mlm_dir).double().eval()
    return model, AutoTokenizer.from_pretrained(tiny_mlm_dir)


def fast_candidates(augmenter: Augmenter, sentences):
    """Per sentence: [(word index, candidates)] as the fast path resolves them."""
    examples = [{"id": f"s{i}", "text_a": s, "text_b": None, "label": 0}
                for i, s in enumerate(sentences)]
    return augmenter.position_candidates(examples)


@pytest.mark.parametrize("mode", ["tinybert", "glove", "mlm"])
def test_candidates_identical_to_the_reference_at_every_position(mode, mlm64, packaged_vectors):
    model, tokenizer = mlm64
    # The oracle's full-vocabulary forward per position is slow: fewer sentences for the MLM.
    sentences = real_sentences(30 if mode == "glove" else 20)
    mlm = MaskedLMCandidates(model, tokenizer, top_m=15, batch_size=16) if mode != "glove" else None
    augmenter = Augmenter(AugmentConfig(mode=mode), vectors=packaged_vectors if mode != "mlm" else None,
                          mlm=mlm, tokenizer=tokenizer if mode != "glove" else None)
    oracle = ReferenceOracle(model, tokenizer, packaged_vectors, mode, 15, 128)
    fast = fast_candidates(augmenter, sentences)
    positions = 0
    for sentence, got in zip(sentences, fast):
        words, expected = oracle.candidates(sentence)
        assert got == expected, sentence
        positions += len(expected)
    assert positions > 40
    counts = augmenter.counts
    if mode == "tinybert":  # both sources were exercised
        assert counts["positions_mlm"] > 0 and counts["positions_glove"] > 0
    if mode != "mlm":
        assert counts["positions_glove_word_absent"] > 0  # the invented words of WRITTEN


def test_augmented_output_identical_to_the_reference(mlm64, packaged_vectors):
    model, tokenizer = mlm64
    examples = [{"id": f"train-{i}", "text_a": s, "text_b": None, "label": i % 2}
                for i, s in enumerate(real_sentences(15))]
    examples += [{"id": f"pair-{i}", "text_a": a, "text_b": b, "label": 1}
                 for i, (a, b) in enumerate(PAIRS)]
    mlm = MaskedLMCandidates(model, tokenizer, top_m=15, batch_size=7)
    augmenter = Augmenter(AugmentConfig(mode="tinybert", n_attempts=20, p=0.4, seed=7),
                          vectors=packaged_vectors, mlm=mlm, tokenizer=tokenizer)
    oracle = ReferenceOracle(model, tokenizer, packaged_vectors, "tinybert", 15, 128)
    got = augmenter.augment(examples)
    assert got == oracle.augment(examples, n=20, p=0.4, seed=7)
    assert len(got) > 5 * len(examples)
    # pairs: every side-B variant carries the original side A (not the reference's bug)
    pair_rows = [r for r in got if r["orig_id"] == "pair-0"]
    assert {r["text_a"] for r in pair_rows if r["text_b"] != PAIRS[0][1]} == {PAIRS[0][0]}
    for orig_id in {r["orig_id"] for r in got}:  # no duplicates within an example's variants
        texts = [(r["text_a"], r["text_b"]) for r in got if r["orig_id"] == orig_id]
        assert len(set(texts)) == len(texts)


def test_long_inputs_are_windowed_like_the_documented_rule(mlm64, packaged_vectors):
    model, tokenizer = mlm64  # max_position_embeddings = 128: a 72-piece pair cannot fit
    sentence = " ".join(["the quick brown fox jumps over the lazy dog near the riverbank"] * 6)
    mlm = MaskedLMCandidates(model, tokenizer, top_m=15, batch_size=32)
    augmenter = Augmenter(AugmentConfig(mode="mlm"), mlm=mlm, tokenizer=tokenizer)
    oracle = ReferenceOracle(model, tokenizer, None, "mlm", 15, 128)
    (got,) = fast_candidates(augmenter, [sentence])
    assert got == oracle.candidates(sentence)[1]
    assert mlm.windowed == len(got) > 0
