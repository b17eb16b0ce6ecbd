"""The compute device every torch stage resolves the same way (``device = auto``: CUDA when
present), and the CPU thread count every torch stage sets the same way (``num_threads``)."""
from __future__ import annotations

import contextlib
from typing import Iterator


def resolve_device(device: str = "auto"):
    import torch

    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(num_threads: int = 0) -> Iterator[int]:
    """Run the block with ``num_threads`` intra-op CPU threads (0: leave torch's default, one
    per core); restore the previous count afterwards. Yields the count in force.

    On a machine whose cores other jobs share, torch's default oversubscribes them and its
    threads wait on each other at every operation (measured on 2 shared cores: a teacher
    fine-tuning step took 2.5-12.7 s with the default, ~1 s with one thread).
    """
    if num_threads <= 0:
        try:
            import torch
        except ImportError:   # a stage that never imports torch
            yield 0
            return
        yield torch.get_num_threads()
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
