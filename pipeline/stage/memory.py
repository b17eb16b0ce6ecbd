"""What a stage costs in memory, and the memory it freed given back before the next stage.

Luigi's local worker runs every stage of a run in one process (``tinykd demo`` runs 28 of
them, a nine-task ``tinykd run GLUE`` hundreds), so whatever one stage leaves behind, the next
ones carry. Two things can be left:

* **objects still referenced**: a reference cycle (a trainer and its evaluation callback
  pointing at each other, with the student, optimizer state and reader inside) is freed only
  when Python's cyclic collector next runs a full collection, which with a few million
  long-lived objects of torch and transformers in the heap can be many stages later. The
  stages' code keeps its objects out of cycles (``distill/run.py``'s selection callback holds
  the trainer weakly); ``tests/test_memory.py`` runs trainer stages back to back and fails if
  the memory after each grows.
* **memory freed but kept by the allocator**: glibc's malloc keeps freed heap pages in its
  arenas (one per thread that allocated: the reader's thread, TensorBoard's writer...) for
  reuse, so the resident size stays at the stage's high-water mark. ``malloc_trim(0)`` hands
  every arena's free pages back to the kernel; it runs after every stage's build, successful
  or not (:func:`release_memory`), which changes no result. Elsewhere (another libc, no
  ``malloc_trim``) it is skipped. With CUDA, torch's caching allocator's unused blocks go back
  to the driver the same way (``torch.cuda.empty_cache``).

:func:`measured` records, for the stage's manifest, the process's peak resident set size while
the stage built (the kernel's high-water mark ``VmHWM``, reset at the stage's start through
``/proc/self/clear_refs``; where that cannot be reset, RSS sampled every 0.1 s), its RSS at the
start and after the release, and with CUDA the peak of torch's allocator on each device. They
describe the run, not the output: ``memory`` is run history
(:data:`~pipeline.stage.manifest.RUN_HISTORY_INFO_KEYS`), like the timings. Processes the
stage starts (data-parallel ranks, DataLoader workers) are not included.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

MB = 1e6   # megabytes (10^6 bytes), as the keys say and scripts/memory_profile.py reports
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LIBC: Any = None


def rss_bytes() -> int | None:
    """This process's resident set size now (None where /proc is absent)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS to its current RSS (Linux
    ``/proc/self/clear_refs``, value 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_bytes("VmHWM") is not None
    except OSError:
        return False


def malloc_trim() -> bool:
    """glibc's ``malloc_trim(0)``: free pages of every malloc arena back to the kernel. False
    (and nothing done) without glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


def _cuda():
    """torch's CUDA module when torch is loaded and CUDA initialised (never imports torch)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda
    except Exception:   # a broken CUDA setup must not fail a stage over its bookkeeping
        pass
    return None


def release_memory() -> None:
    """Give memory freed by a finished stage back to the system: torch's cached CUDA blocks,
    then every malloc arena's free pages (see the module docstring)."""
    cuda = _cuda()
    if cuda is not None:
        cuda.empty_cache()
    malloc_trim()


class _Sampler(threading.Thread):
    """RSS sampled every ``interval`` seconds: the peak where VmHWM cannot be reset."""

    def __init__(self, interval: float = 0.1):
        super().__init__(name="tinykd-rss-sampler", daemon=True)
        self.interval, self.peak, self.stopped = interval, rss_bytes() or 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, rss_bytes() or 0)

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return max(self.peak, rss_bytes() or 0)


@contextlib.contextmanager
def measured(record: dict[str, Any]) -> Iterator[None]:
    """Measure the block's memory into ``record`` (when it succeeds), and release memory after it
    either way: ``peak_rss_mb``, ``start_rss_mb``, ``end_rss_mb`` (after the release), how the peak
    was measured, and ``cuda_peak_mb`` per device (torch's allocator) when CUDA was in use."""
    start = rss_bytes()
    sampler = None
    if not reset_peak_rss():
        sampler = _Sampler()
        sampler.start()
    cuda = _cuda()
    if cuda is not None:
        for device in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(device)
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        peak = sampler.stop() if sampler is not None else _status_bytes("VmHWM")
        cuda = _cuda()   # initialised by the block, perhaps
        cuda_peaks = ({f"cuda:{d}": round(cuda.max_memory_allocated(d) / MB, 1)
                       for d in range(cuda.device_count())} if cuda is not None else {})
        release_memory()
        if succeeded and start is not None:
            record.update(start_rss_mb=round(start / MB, 1), peak_rss_mb=round((peak or 0) / MB, 1),
                          end_rss_mb=round((rss_bytes() or 0) / MB, 1),
                          peak_from="sampled every 0.1 s" if sampler is not None else "VmHWM")
            if cuda_peaks:
                record["cuda_peak_mb"] = cuda_peaks
