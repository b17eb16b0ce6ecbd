"""Batches for the trainer: tokenised in-memory examples, device transfer and prefetching.

The trainer consumes *batch sources*: objects with ``num_examples`` and
``batches(batch_size, seed, epoch, start_batch=0)`` yielding the Batch dicts of
docs/DESIGN.md. The teacher-cache reader (``pipeline.cache.reader``) is the main one; it also
has ``packed_batches``, whose :class:`~pipeline.cache.packed.PackedBatch` items hold the rows as
stored and are expanded into Batch dicts on the training device (:func:`to_device`). This
module adds :class:`TokenizedExamples` for text that has no cached teacher outputs (the dev
split, and the online-teacher mode's tests), with the same contract: the order of an epoch is
a pure function of (seed, epoch), so a resumed run can restart at any batch.

:class:`Prefetcher` runs a source's iterator in a background thread, so decoding and gathering
the next batches (pyarrow/numpy work that releases the GIL) overlaps the training step.
:class:`DeviceFeeder` hands the step its batch on the device; on CUDA it has already started
the *next* batch's copy from pinned memory on a side stream, so the copy overlaps the step.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from pipeline.cache.packed import ArenaPool, PackedBatch, expand

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


def to_device(batch: Batch | PackedBatch, device: torch.device) -> Batch:
    """Move every tensor (also inside the per-layer dicts) to ``device``; a packed batch is
    expanded there (:func:`pipeline.cache.packed.expand`)."""
    if isinstance(batch, PackedBatch):
        return expand(batch, device)
    non_blocking = device.type == "cuda"

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=non_blocking)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return {k: move(v) for k, v in batch.items()}


def pin(batch: Batch | PackedBatch) -> Batch | PackedBatch:
    if isinstance(batch, PackedBatch):
        return batch if batch.arena is not None and batch.arena.is_pinned() else batch.pin_memory()

    def pinned(value):
        if isinstance(value, torch.Tensor):
            return value.pin_memory()
        if isinstance(value, dict):
            return {k: pinned(v) for k, v in value.items()}
        return value

    return {k: pinned(v) for k, v in batch.items()}


def staged_for(iterator: Iterator, device: torch.device, pool: ArenaPool | None = None) -> Iterator:
    """The host-side half of feeding ``device``, to run in the reader's thread: on the CPU a
    packed batch is expanded right there (the device *is* the CPU); on CUDA it is copied into a
    pinned buffer of ``pool``, ready for one non-blocking copy."""
    for item in iterator:
        if isinstance(item, PackedBatch):
            item = expand(item, device) if device.type == "cpu" else item.into_arena(pool)
        yield item


class DeviceFeeder:
    """Batches on the training device, in order, from an iterator of host batches.

    On CUDA, when it hands out batch k it has already issued batch k+1's host-to-device copy
    on a side stream (from pinned memory, non-blocking), so that copy runs while step k
    computes; batch k's expansion (:func:`~pipeline.cache.packed.expand`) runs on the compute
    stream after waiting for its copy. Elsewhere it moves each batch when it is asked for.
    """

    def __init__(self, iterator: Iterator, device: torch.device):
        self.iterator = iterator
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staged: Any = None
        self._done = False

    def _stage(self) -> None:
        """Start moving the next packed batch (CUDA only)."""
        try:
            item = next(self.iterator)
        except StopIteration:
            self._done = True
            return
        if isinstance(item, PackedBatch) and self.stream is not None:
            with torch.cuda.stream(self.stream):
                item.move_to(self.device)
        self._staged = item

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.stream is None:
            return to_device(next(self.iterator), self.device)
        if self._staged is None and not self._done:
            self._stage()
        if self._done and self._staged is None:
            raise StopIteration
        item, self._staged = self._staged, None
        if isinstance(item, PackedBatch):
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            item.record_stream(current)
        self._stage()   # the next copy overlaps this batch's step
        return to_device(item, self.device)

    def close(self) -> None:
        closer = getattr(self.iterator, "close", None)
        if closer is not None:
            closer()


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
