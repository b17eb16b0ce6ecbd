"""Data-parallel distillation: what each rank trains on, and how its losses add up.

A run of k ranks (torch.distributed, launched by :mod:`distill.launch` or ``torchrun``) trains
the same student as one process, up to floating-point reduction order, because:

* **Same batches.** Every rank draws the same *global* batch from the source's deterministic
  plan (a pure function of seed and epoch: ``pipeline.cache.reader``) and keeps its own
  contiguous block of rows (:func:`rank_rows`). The block keeps the global batch's padded
  width, so a loss that depends on padding (the ``reference`` attention loss averages over
  padded positions too) sees exactly what it sees in one process.
* **Same loss.** Every loss term is a mean whose denominator is a count over the batch --
  examples (prediction loss, the ``reference`` attention loss over B x heads x T x T), real
  tokens (embedding and hidden MSEs) or real query/key pairs (the ``masked`` attention loss).
  A rank computes its term over its rows; :func:`loss_shares` all-reduces the counts, and the
  rank's term is weighted by its share of the global count. Summed over ranks that *is* the
  global batch's mean, also for the last, smaller batch of an epoch and for uneven token
  counts. DistributedDataParallel averages gradients over the k ranks, so each rank's
  weighted term is multiplied by k (:meth:`DistillStep.forward` returns it that way).
* **Same update.** After DDP's all-reduce every rank holds the global gradient: clipping,
  AdamW and the schedule then run identically on every rank.

What is *not* identical: dropout. Each rank draws its own dropout masks (rank 0 from the
single-process seed, rank r from a seed derived from it), so with dropout on, runs with
different rank counts are equivalent in distribution, not in bits. The equality tests use
students without dropout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from distill.data import Batch

#: Which count each loss term's mean divides by (attention: by its mode).
TERM_COUNTS = {"embedding": "tokens", "hidden": "tokens", "prediction": "examples"}
ATTENTION_COUNTS = {"reference": "examples", "masked": "pairs"}
COUNT_KINDS = ("examples", "tokens", "pairs")


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` (1: a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, TensorBoard and the export."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The initialised process group's rank and size, else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def rank_rows(batch_rows: int, world: World) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous block of a global batch of ``batch_rows``
    (the first ``batch_rows % size`` ranks take one row more; a rank may get none)."""
    base, extra = divmod(batch_rows, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (1 if world.rank < extra else 0)


def slice_batch(batch: Batch, world: World) -> tuple[Batch, int]:
    """This rank's rows of a global batch, padded width kept, and how many rows it owns.

    A rank that owns no row (a last batch smaller than the rank count) gets the first row to
    run forward and backward with (DDP needs every rank in every all-reduce) and owns 0 rows:
    its loss weight is 0.
    """
    rows = int(batch["input_ids"].shape[0])
    start, stop = rank_rows(rows, world)
    owned = stop - start
    if owned == 0:
        start, stop = 0, 1

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return value[start:stop]
        if isinstance(value, dict):
            return {k: take(v) for k, v in value.items()}
        if isinstance(value, list) and len(value) == rows:
            return value[start:stop]
        return value

    return {key: take(value) for key, value in batch.items()}, owned


def local_counts(batch: Batch, owned: int) -> torch.Tensor:
    """``[examples, tokens, pairs]`` of this rank's rows (zeros for a rank that owns none)."""
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1).to(torch.float64)
    counts = torch.stack([torch.tensor(float(mask.shape[0]), dtype=torch.float64, device=mask.device),
                          lengths.sum(), lengths.pow(2).sum()])
    return counts * (1.0 if owned > 0 else 0.0)


def count_kind(term: str, attention_mode: str) -> str:
    return ATTENTION_COUNTS[attention_mode] if term == "attention" else TERM_COUNTS[term]


def loss_shares(batch: Batch, owned: int, terms, attention_mode: str) -> dict[str, torch.Tensor]:
    """Per loss term, this rank's share of the global batch's count (sums to 1 over ranks)."""
    import torch.distributed as dist

    counts = local_counts(batch, owned)
    total = counts.clone()
    dist.all_reduce(total)
    shares = torch.where(total > 0, counts / total.clamp_min(1.0), torch.zeros_like(counts))
    return {term: shares[COUNT_KINDS.index(count_kind(term, attention_mode))].float() for term in terms}


def global_values(losses: dict[str, torch.Tensor], shares: dict[str, torch.Tensor]) -> dict[str, float]:
    """The global batch's loss terms (for logging): the all-reduced sum of share x term."""
    import torch.distributed as dist

    names = list(losses)
    vector = torch.stack([(losses[n].detach().float() * shares[n]) for n in names]).to(torch.float64)
    dist.all_reduce(vector)
    return {name: float(value) for name, value in zip(names, vector.tolist())}


class DistillStep(torch.nn.Module):
    """The student and projections as one module whose forward is one loss computation, so
    that ``DistributedDataParallel`` can wrap it (its reducer needs its own forward called;
    the score-capture hooks of ``forward_internals`` need the bare student inside)."""

    def __init__(self, trainer):
        super().__init__()
        self.student = trainer.student
        self.projections = trainer.projections
        self._trainer = [trainer]   # a list: not registered as a submodule

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self._trainer[0].batch_losses(batch)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The dropout seed of rank ``rank`` > 0 from ``step`` on (rank 0 keeps the run's RNG)."""
    return (int(seed) * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)
