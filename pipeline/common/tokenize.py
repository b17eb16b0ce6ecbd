"""Tokenisation helpers shared by the teacher, the cache writer and the trainer.

Every stage that feeds text to a BERT must produce the same token ids for the same example,
and every stage that compares vocabularies must compute one identity for a tokenizer: the
fine-tune's evaluation, the cache writer and the student all use these functions. Examples are
tokenised unpadded (the cache stores real tokens only); ``pad_batch`` pads a ragged batch right
before a forward pass, and ``length_sorted_batches`` groups similar lengths so little compute
is spent on padding.
"""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

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


def pad_batch(input_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]],
              pad_token_id: int):
    """Right-pad ragged token lists into ``(input_ids, token_type_ids, attention_mask)`` tensors."""
    import torch

    width = max(len(ids) for ids in input_ids)
    batch = len(input_ids)
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    types = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, (tok, seg) in enumerate(zip(input_ids, token_type_ids)):
        ids[row, :len(tok)] = torch.as_tensor(tok)
        types[row, :len(seg)] = torch.as_tensor(seg)
        mask[row, :len(tok)] = 1
    return ids, types, mask
