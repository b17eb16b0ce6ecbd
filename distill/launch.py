"""One distillation stage on k ranks: torch's elastic launcher, and the entry point each rank runs.

A stage with ``nproc`` > 1 does not fork workers of its own. :func:`run_ranks` writes the
stage's call (:func:`distill.run.distill_from_cache`'s arguments, plain JSON) to a *job file*
and hands ``python -m distill.launch <job file>`` to torch's elastic agent
(``torch.distributed.launcher.api.elastic_launch``: c10d rendezvous on 127.0.0.1, a port we
check or choose, no restarts). Each rank process runs :func:`main`: it reads the job, binds its
device (the stage's leased devices, one per local rank), joins the process group
(``init_process_group`` over NCCL on CUDA, gloo on CPU, with a collective *timeout*, so a rank
waiting on a dead peer gives up instead of hanging) and calls ``distill_from_cache``, which
trains data-parallel (:mod:`distill.distributed`); rank 0 writes the output.

The same entry point runs under ``torchrun`` on several machines
(``torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint host:29400 -m
distill.launch job.json``; README "Several GPUs"): the job file names the inputs, and with
``devices`` empty each rank takes ``cuda:<LOCAL_RANK>``.

Failure. When a rank dies (an exception, a signal, an out-of-memory kill) the agent stops the
others and raises ``ChildFailedError``; :func:`run_ranks` turns it into one
:class:`RankFailed` line naming the first rank that failed and why. Every rank asks the kernel
to kill it when the launching process dies (``PR_SET_PDEATHSIG``), so a killed Luigi worker
leaves no rank behind. Checkpoints are rank 0's, written atomically: the partial output keeps
the last one, and a rerun (with any rank count) resumes from it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import InputError

LOG = logging.getLogger("tinykd.distill")
JOB_NAME = ".launch-job.json"
BACKENDS = ("auto", "gloo", "nccl")
#: Seconds a collective waits for the other ranks before the rank fails (dev evaluation by
#: rank 0 included: the others wait at a barrier meanwhile).
DEFAULT_TIMEOUT_S = 1800
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class RankFailed(RuntimeError):
    """A rank of a data-parallel stage failed; the message is one line naming it."""


def choose_backend(backend: str, devices: Sequence[str]) -> str:
    """``auto``: NCCL when the ranks run on CUDA devices, gloo on the CPU. NCCL asked for on a
    CPU is refused (it moves CUDA tensors only)."""
    on_cuda = bool(devices) and all(str(d).startswith("cuda") for d in devices)
    if backend not in BACKENDS:
        raise InputError(f"dist_backend = {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if on_cuda else "gloo"
    if backend == "nccl" and not on_cuda:
        raise InputError(f"dist_backend = nccl, but the ranks run on {', '.join(devices) or 'cpu'}: "
                         "NCCL needs CUDA devices; use gloo (or auto) on the CPU")
    return backend


def check_port(port: int, host: str = "127.0.0.1") -> int:
    """``port`` if it can be bound on ``host`` now; 0: a free port chosen by the kernel."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            raise InputError(f"rendezvous port {port} on {host} is in use ({exc.strerror}): set "
                             "rdzv_port to a free port, or 0 to let the stage choose one") from None
        return sock.getsockname()[1]


def check_ranks(nproc: int, batch_size: int) -> None:
    """A global batch must split evenly over the ranks (each rank's part of every batch)."""
    if nproc > 1 and batch_size % nproc:
        raise InputError(f"batch_size = {batch_size} does not split evenly over nproc = {nproc} "
                         f"ranks: choose a batch size divisible by {nproc}")


def write_job(path: Path, cache_dir, out_dir, config, student_spec=None, *, devices: Sequence[str] = (),
              backend: str = "gloo", timeout_s: int = DEFAULT_TIMEOUT_S, num_threads: int = 0,
              **kwargs) -> Path:
    """The job file of one stage: ``distill_from_cache``'s arguments as JSON."""
    local_cache = kwargs.pop("local_cache", None)
    if local_cache is not None:
        kwargs["local_cache"] = {"root": str(local_cache.root), "max_bytes": int(local_cache.max_bytes)}
    job = {"cache_dir": str(cache_dir), "out_dir": str(out_dir), "config": asdict(config),
           "student_spec": asdict(student_spec) if student_spec is not None else None,
           "devices": list(devices), "backend": backend, "timeout_s": int(timeout_s),
           "num_threads": int(num_threads),
           "kwargs": {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(job, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def failure_line(exc, nproc: int) -> str:
    """One line for a ``ChildFailedError``: the first rank that failed, and how."""
    rank, failure = exc.get_first_failure()
    data = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    elif isinstance(data, dict) and data.get("message"):
        how = f"failed: {str(data['message']).strip().splitlines()[-1]}"
    else:
        how = f"exited with code {failure.exitcode}"
    return f"distillation rank {rank} of {nproc} (pid {failure.pid}) {how}"


def run_ranks(job_path: Path, nproc: int, port: int = 0) -> None:
    """Run ``python -m distill.launch job_path`` on ``nproc`` local ranks under the elastic
    agent; raise :class:`RankFailed` (one line) if any rank fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = check_port(port)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"tinykd-{uuid.uuid4().hex[:12]}", rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"is_host": True},
                          max_restarts=0, monitor_interval=0.1, local_addr="127.0.0.1")
    # the ranks import this project: make sure they find it however this process did
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([path] if path else []))
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.ERROR)   # the agent's own failure report is RankFailed's line
    try:
        elastic_launch(config, sys.executable)("-m", "distill.launch", str(job_path))
    except ChildFailedError as exc:
        raise RankFailed(failure_line(exc, nproc)) from None
    finally:
        elastic.setLevel(level)
        if path:
            os.environ["PYTHONPATH"] = path
        else:
            os.environ.pop("PYTHONPATH", None)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this rank when its launching process dies (no orphans)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def rank_device(devices: Sequence[str], local_rank: int) -> str:
    """This rank's device: the job's ``devices[local_rank]``, else ``cuda:<local_rank>`` when
    CUDA is present (torchrun on a GPU machine), else the CPU."""
    import torch

    if devices:
        if local_rank >= len(devices):
            raise InputError(f"local rank {local_rank} has no device: the job lists {list(devices)}")
        return devices[local_rank]
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def run_job(job: dict[str, Any]) -> dict:
    """One rank's part of a job (inside an initialised or initialisable process group)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from distill.run import distill_from_cache
    from distill.student import StudentSpec
    from distill.trainer import TrainConfig

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(job.get("devices") or [], local_rank)
    backend = choose_backend(job.get("backend", "auto"), [device])
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if job.get("num_threads"):
        torch.set_num_threads(int(job["num_threads"]))
    config = TrainConfig(**{**job["config"], "device": device})
    spec = StudentSpec(**job["student_spec"]) if job.get("student_spec") else None
    kwargs = dict(job.get("kwargs") or {})
    if kwargs.get("local_cache"):
        from pipeline.store import LocalObjectCache
        kwargs["local_cache"] = LocalObjectCache(Path(kwargs["local_cache"]["root"]),
                                                 kwargs["local_cache"]["max_bytes"])
    owns_group = not dist.is_initialized()
    if owns_group:
        import inspect

        options = {"timeout": timedelta(seconds=int(job.get("timeout_s", DEFAULT_TIMEOUT_S)))}
        if device.startswith("cuda") and "device_id" in inspect.signature(dist.init_process_group).parameters:
            options["device_id"] = torch.device(device)   # binds NCCL's communicator (torch >= 2.3)
        dist.init_process_group(backend, **options)
    try:
        return distill_from_cache(job["cache_dir"], job["out_dir"], config, spec, **kwargs)
    finally:
        if owns_group:
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distill.launch JOB.json``: one rank (under the elastic agent or torchrun)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m distill.launch JOB.json  (one rank; run it under torchrun)", file=sys.stderr)
        return 2
    _die_with_parent()
    job = json.loads(Path(argv[0]).read_text())
    record(run_job)(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
