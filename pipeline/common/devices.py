"""The device pool and device leases: one device per Luigi worker, k devices per k-rank run.

``[pipeline] devices`` names the pool the compute stages share:

* ``auto``: every visible CUDA device (``cuda:0,cuda:1,…``); on a machine without CUDA the
  CPU, unleased (any number of stages may use it at once, as before device leases existed);
* ``cuda:0,cuda:2``: these GPUs (one slot each; naming one that is not there is an error);
* ``cpu`` / ``cpu,cpu``: one or two *CPU slots*: the CPU, leased like a GPU, so that at most
  that many compute stages run at once (and a test can exercise leases on a CPU machine).

A stage leases the slots it needs for as long as it builds: :class:`DeviceLease` takes an
exclusive ``fcntl.flock`` on one lock file per slot, ``<workdir>/.devices/.<slot>.lock``, next
to the build locks and with the same owner records (:mod:`pipeline.locks`). The kernel releases
a ``flock`` when its holder exits, however it exits, so a killed stage never leaves a device
taken. A stage that finds too few free slots waits, polling, without holding any (a stage that
holds one slot while waiting for a second could deadlock against another doing the same).

Everything here is plain Python over device *names*: the CUDA device count is an argument,
so the pool logic is tested with fake device lists on a CPU machine.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable, Sequence

from pipeline.errors import InputError
from pipeline.locks import BuildLock, lock_holder

LOG = logging.getLogger("tinykd.devices")
DEVICE_LOCK_DIR = ".devices"
CUDA_NAME = re.compile(r"cuda:(\d+)")


def cuda_device_count() -> int:
    """Visible CUDA devices (0 without torch's CUDA build); does not initialise CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_pool(spec: str, cuda_count: int) -> list[str]:
    """The pool's device names, one per slot, from ``[pipeline] devices`` (see the module
    docstring). ``[]`` means the unleased CPU (``auto`` without CUDA)."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return [f"cuda:{index}" for index in range(cuda_count)]
    names = [name.strip() for name in spec.split(",")]
    for name in names:
        match = CUDA_NAME.fullmatch(name)
        if name == "cpu":
            continue
        if match is None:
            raise InputError(f"[pipeline] devices = {spec}: {name!r} is not a device; list "
                             "cuda:<index> or cpu entries, or write auto")
        if int(match.group(1)) >= cuda_count:
            visible = f"cuda:0..cuda:{cuda_count - 1}" if cuda_count else "none"
            raise InputError(f"[pipeline] devices = {spec}: {name} does not exist on this machine "
                             f"(visible CUDA devices: {visible})")
    return names


def slot_names(pool: Sequence[str]) -> list[str]:
    """A file-name-safe, unique name per slot: ``cuda0``, ``cpu-0``, ``cpu-1``…"""
    counts: dict[str, int] = {}
    names = []
    for device in pool:
        index = counts.get(device, 0)
        counts[device] = index + 1
        names.append(f"{device.replace(':', '')}-{index}")
    return names


def devices_needed(nproc: str | int, pool: Sequence[str]) -> int:
    """How many slots a run of ``nproc`` ranks leases (``auto``: the whole pool, at least one);
    an ``nproc`` the pool cannot serve is an error named before anything runs."""
    if str(nproc) == "auto":
        return max(1, len(pool))
    try:
        count = int(nproc)
    except ValueError:
        raise InputError(f"nproc = {nproc!r}: write a positive number of ranks or auto") from None
    if count < 1:
        raise InputError(f"nproc = {nproc}: a run needs at least one rank")
    if pool and count > len(pool):
        raise InputError(f"nproc = {count} ranks, but [pipeline] devices holds {len(pool)} "
                         f"device(s) ({', '.join(pool)}): list more devices or ask for fewer ranks")
    return count


class DeviceLease:
    """Exclusive use of ``count`` slots of ``pool`` while the holder lives (a context manager).

    ``acquire()`` returns the leased device names (``[]`` for the unleased CPU pool) and
    waits, polling every ``poll_seconds``, while fewer than ``count`` slots are free;
    ``on_wait`` is called once, with the current holders, when it starts waiting.
    """

    def __init__(self, workdir: Path | str, pool: Sequence[str], count: int = 1,
                 poll_seconds: float = 0.5, on_wait: Callable[[list[dict]], None] | None = None):
        self.lock_dir = Path(workdir) / DEVICE_LOCK_DIR
        self.pool = list(pool)
        self.count = count
        self.poll_seconds = poll_seconds
        self.on_wait = on_wait
        self._held: list[tuple[str, BuildLock]] = []

    @property
    def devices(self) -> list[str]:
        return [device for device, _ in self._held]

    @property
    def slots(self) -> list[str]:
        return [lock.path.name[1:-len(".lock")] for _, lock in self._held]

    def _try_all(self) -> bool:
        for device, slot in zip(self.pool, slot_names(self.pool)):
            lock = BuildLock(self.lock_dir / slot)
            if lock.acquire(wait=False):
                self._held.append((device, lock))
                if len(self._held) == self.count:
                    return True
        self.release()   # too few free: hold none while waiting
        return False

    def acquire(self) -> list[str]:
        if not self.pool:
            return []
        if self.count > len(self.pool):
            raise InputError(f"{self.count} devices asked for, the pool holds {len(self.pool)}")
        waited = False
        while not self._try_all():
            if not waited and self.on_wait is not None:
                self.on_wait(self.holders())
            waited = True
            time.sleep(self.poll_seconds)
        return self.devices

    def holders(self) -> list[dict]:
        """Who holds each slot now (``{"slot", "device", "pid"…}``; unheld slots left out)."""
        held = []
        for device, slot in zip(self.pool, slot_names(self.pool)):
            owner = lock_holder(self.lock_dir / slot)
            if owner is not None:
                held.append({"slot": slot, "device": device, **owner})
        return held

    def release(self) -> None:
        held, self._held = self._held, []
        for _, lock in held:
            lock.release()

    def __enter__(self) -> list[str]:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
