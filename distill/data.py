"""Batches for the trainer: tokenised in-memory examples, device transfer and prefetching.

The trainer consumes *batch sources*: objects with ``num_examples`` and
``batches(batch_size, seed, epoch, start_batch=0)`` yielding the Batch dicts of
docs/DESIGN.md. The teacher-cache reader (``pipeline.cache.reader``) is the main one; this
module adds :class:`TokenizedExamples` for text that has no cached teacher outputs (the dev
split, and the online-teacher mode's tests), with the same contract: the order of an epoch is
a pure function of (seed, epoch), so a resumed run can restart at any batch.

:class:`Prefetcher` runs a source's iterator in a background thread, so decoding and padding
the next batches (pyarrow/numpy/torch work that releases the GIL) overlaps the training step;
on CUDA, :func:`to_device` copies from pinned memory asynchronously.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

Batch = dict[str, Any]


def epoch_order(num_examples: int, seed: int | None, epoch: int) -> np.ndarray:
    """Example order of one epoch: a permutation keyed on (seed, epoch), or identity for None."""
    if seed is None:
        return np.arange(num_examples)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def collate(examples: Sequence[dict], task_type: str, pad_token_id: int = 0) -> Batch:
    """Pad tokenised examples (``input_ids``, ``token_type_ids``, ``label``, ``id``) to a Batch."""
    length = max(len(e["input_ids"]) for e in examples)
    size = len(examples)
    input_ids = torch.full((size, length), pad_token_id, dtype=torch.long)
    token_type_ids = torch.zeros((size, length), dtype=torch.long)
    attention_mask = torch.zeros((size, length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"])
        token_type_ids[row, :n] = torch.as_tensor(example["token_type_ids"])
        attention_mask[row, :n] = 1
    label_dtype = torch.float32 if task_type == "regression" else torch.long
    labels = torch.tensor([e["label"] if e["label"] is not None else -100 for e in examples],
                          dtype=label_dtype)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": attention_mask, "labels": labels,
            "ids": [str(e["id"]) for e in examples]}


def tokenize_rows(tokenizer, rows: Iterable[dict], max_length: int) -> list[dict]:
    """Tokenise rows with ``text_a``/``text_b`` exactly as the cache writer does (truncation only)."""
    rows = list(rows)
    text_a = [r["text_a"] for r in rows]
    text_b = [r.get("text_b") for r in rows]
    pairs = any(t is not None for t in text_b)
    if pairs and any(t is None for t in text_b):
        raise ValueError("rows mix single sentences and sentence pairs")
    encoded = tokenizer(text_a, text_b if pairs else None, truncation=True, max_length=max_length,
                        return_token_type_ids=True)
    return [{"id": r.get("id", i), "label": r.get("label"), "input_ids": ids, "token_type_ids": types}
            for i, (r, ids, types) in enumerate(zip(rows, encoded["input_ids"], encoded["token_type_ids"]))]


class TokenizedExamples:
    """A batch source over tokenised examples held in memory (no teacher tensors)."""

    def __init__(self, examples: Sequence[dict], task_type: str, pad_token_id: int = 0):
        self.examples = list(examples)
        self.task_type = task_type
        self.pad_token_id = pad_token_id

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def batches(self, batch_size: int, seed: int | None = None, epoch: int = 0,
                start_batch: int = 0) -> Iterator[Batch]:
        order = epoch_order(len(self.examples), seed, epoch)
        for start in range(start_batch * batch_size, len(order), batch_size):
            chosen = [self.examples[i] for i in order[start:start + batch_size]]
            yield collate(chosen, self.task_type, self.pad_token_id)


def num_batches(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor (also inside the per-layer dicts) to ``device``."""
    non_blocking = device.type == "cuda"

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=non_blocking)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return {k: move(v) for k, v in batch.items()}


def pin(batch: Batch) -> Batch:
    def pinned(value):
        if isinstance(value, torch.Tensor):
            return value.pin_memory()
        if isinstance(value, dict):
            return {k: pinned(v) for k, v in value.items()}
        return value

    return {k: pinned(v) for k, v in batch.items()}


class Prefetcher:
    """Iterate ``iterator`` in a daemon thread, ``depth`` items ahead; re-raises its errors."""

    _END = object()

    def __init__(self, iterator: Iterator, depth: int = 4, pin_memory: bool = False):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterator, pin_memory), daemon=True)
        self._thread.start()

    def _run(self, iterator: Iterator, pin_memory: bool) -> None:
        try:
            for item in iterator:
                if pin_memory:
                    item = pin(item)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._queue.put(exc)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while True:   # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
