"""Tokenisation helpers shared by the teacher, the cache writer and the trainer.

Every stage that feeds text to a BERT must produce the same token ids for the same example,
and every stage that compares vocabularies must compute one identity for a tokenizer: the
fine-tune's evaluation, the cache writer and the student all use these functions. Examples are
tokenised unpadded (the cache stores real tokens only); ``pad_batch`` pads a ragged batch right
before a forward pass, and ``length_sorted_batches`` groups similar lengths so little compute
is spent on padding.

:class:`TokenizedRows` holds a whole shard's token ids as flat arrays plus offsets, the form
Arrow stores (``list<int32>``) and the form a batch is padded from with whole-array numpy
operations: at GPU rates (a batch of 512 every few milliseconds) a Python loop over a batch's
rows is a measurable share of the forward's time.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipeline.errors import InputError


def tokenizer_vocab_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), the identity the student must share."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def check_tokenizer_matches_teacher(tokenizer, model, teacher: str, tokenizer_source: str) -> None:
    """The data is tokenised with ``tokenizer``; its ids must index the teacher's embeddings.

    The embedding table may be larger than the tokenizer (DeBERTa-v3 and ModernBERT pad it to a
    multiple of 64 or 128 rows); a tokenizer with more tokens than rows is refused."""
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise InputError(f"the tokenizer has {len(tokenizer)} tokens (from {tokenizer_source}) but "
                         f"the teacher's vocabulary only {vocab_size}; the teacher, the data's "
                         "tokenizer and the student must share one vocabulary", teacher)


def tokenize_examples(tokenizer, examples: pa.Table, max_seq_length: int,
                      source: str = "") -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and segment ids of every example (truncated, unpadded)."""
    text_a = examples.column("text_a").to_pylist()
    text_b = examples.column("text_b").to_pylist()
    for row, text in enumerate(text_a):
        if text is None:
            raise InputError("text_a is null", source or None, row)
    has_b = [t is not None for t in text_b]
    if any(has_b) and not all(has_b):
        row = has_b.index(False)
        raise InputError("text_b is null in a sentence-pair source", source or None, row)
    encoded = tokenizer(text_a, text_b if any(has_b) else None, truncation=True,
                        max_length=max_seq_length, return_token_type_ids=True,
                        return_attention_mask=False)
    return encoded["input_ids"], encoded["token_type_ids"]


def length_sorted_batches(lengths: Sequence[int], batch_size: int, sort_window: int) -> list[list[int]]:
    """Batches of indices with similar lengths: sort within consecutive windows, then cut."""
    batches = []
    for start in range(0, len(lengths), sort_window):
        window = sorted(range(start, min(start + sort_window, len(lengths))),
                        key=lambda i: (lengths[i], i))
        batches += [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
    return batches


@dataclass
class TokenizedRows:
    """Ragged token and segment ids of many rows as flat arrays: row ``r`` is
    ``ids[offsets[r]:offsets[r + 1]]`` (``types`` alike, one segment id per token)."""

    ids: np.ndarray        # int32 [total tokens]
    types: np.ndarray      # int8 [total tokens]
    offsets: np.ndarray    # int64 [rows + 1]

    @classmethod
    def from_lists(cls, input_ids: Sequence[Sequence[int]],
                   token_type_ids: Sequence[Sequence[int]]) -> "TokenizedRows":
        lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        ids = np.fromiter(itertools.chain.from_iterable(input_ids), dtype=np.int32, count=total)
        types = np.fromiter(itertools.chain.from_iterable(token_type_ids), dtype=np.int8, count=total)
        return cls(ids, types, offsets)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def to_arrow(self) -> tuple[pa.ListArray, pa.ListArray]:
        """``(input_ids list<int32>, token_type_ids list<int8>)`` of every row, zero-copy."""
        offsets = pa.array(self.offsets.astype(np.int32), pa.int32())
        return (pa.ListArray.from_arrays(offsets, pa.array(self.ids, pa.int32())),
                pa.ListArray.from_arrays(offsets, pa.array(self.types, pa.int8())))

    def pad(self, rows: Sequence[int] | np.ndarray, pad_token_id: int):
        """Rows ``rows`` right-padded into ``(input_ids, token_type_ids, attention_mask)`` long
        tensors of the longest row's width, with whole-array operations (no loop over rows)."""
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], self.lengths[rows]
        width = int(lengths.max())
        mask = np.arange(width) < lengths[:, None]
        # Token t of row b sits at starts[b] + t; the mask lists the real (b, t) in row-major order.
        source = (starts[:, None] + np.arange(width))[mask]
        ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
        ids[mask] = self.ids[source]
        types = np.zeros((len(rows), width), dtype=np.int64)
        types[mask] = self.types[source]
        return torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(mask.astype(np.int64))


def pad_batch(input_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]],
              pad_token_id: int):
    """Right-pad ragged token lists into ``(input_ids, token_type_ids, attention_mask)`` tensors."""
    return TokenizedRows.from_lists(input_ids, token_type_ids).pad(np.arange(len(input_ids)), pad_token_id)
