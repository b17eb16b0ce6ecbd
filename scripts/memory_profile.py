"""Measure a command's memory from outside: RSS of its whole process tree, sampled, per stage.

Runs COMMAND (e.g. the demo on a fresh workdir), samples the resident set size (and the
proportional set size, which counts pages shared between processes once) of the command's
process and every descendant from ``/proc`` every ``--interval`` seconds, and when it ends
reads the manifests under ``--workdir`` to find when each stage started and finished. For
every training stage (``distill_*``) it reports the tree's RSS at the stage's end and its peak
while the stage ran, and the least-squares slope of the end RSS over the stages in the order
they finished: the growth per trainer stage that a leak (a reference cycle, memory the
allocator keeps) shows as a positive slope.

    flock /tmp/heavy.lock env HF_HUB_OFFLINE=1 TINYKD_WORKDIR=/tmp/demo-work \\
        .venv/bin/python scripts/memory_profile.py --workdir /tmp/demo-work -- \\
        .venv/bin/python -m tasks demo

Prints one JSON line (every stage, the peak, the slope) and one human line. Linux only (it
reads ``/proc``); no dependency beyond the standard library. Manifest times have a resolution
of one second, so the stage boundaries do too.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1e6


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant (from the parent pids in /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_and_pss(pids: list[int]) -> tuple[int, int]:
    """Bytes resident (RSS summed) and proportional (PSS summed) over ``pids``."""
    rss = pss = 0
    for pid in pids:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue
    return rss, pss


def sample(command: list[str], interval: float) -> tuple[int, list[tuple[float, int, int]]]:
    """Run ``command`` to its end; its exit code and the samples ``(unix time, rss, pss)``."""
    process = subprocess.Popen(command)
    samples = []
    while process.poll() is None:
        rss, pss = rss_and_pss(process_tree(process.pid))
        samples.append((time.time(), rss, pss))
        time.sleep(interval)
    return process.returncode, samples


def stage_windows(workdir: Path) -> list[dict]:
    """Every stage output under ``workdir``: stage name, start and end (unix seconds), and
    what its own manifest recorded of its memory (``info.memory``, when the code records it)."""
    found = []
    for manifest in workdir.glob("*/*/manifest.json"):
        data = json.loads(manifest.read_text())
        timings = data.get("timings") or {}
        if "started" not in timings:
            continue
        found.append({"stage": data["stage"], "fingerprint": data["fingerprint"],
                      "started": dt.datetime.fromisoformat(timings["started"]).timestamp(),
                      "finished": dt.datetime.fromisoformat(timings["finished"]).timestamp(),
                      "recorded": (data.get("info") or {}).get("memory")})
    return sorted(found, key=lambda s: s["finished"])


def slope(values: list[float]) -> float | None:
    """Least-squares slope of ``values`` against 0, 1, 2, ... (None for fewer than two)."""
    n = len(values)
    if n < 2:
        return None
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return (sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
            / sum((i - mean_x) ** 2 for i in range(n)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=Path,
                        help="the workdir the command writes its stage outputs into")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--samples", type=Path, help="also write every sample here (JSON lines)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    started = time.time()
    code, samples = sample(command, args.interval)
    if args.samples:
        args.samples.write_text("".join(json.dumps({"t": t, "rss": r, "pss": p}) + "\n" for t, r, p in samples))
    trainers = []
    for window in stage_windows(args.workdir):
        if not window["stage"].startswith("distill_") or window["finished"] < started:
            continue
        during = [r for t, r, _ in samples if window["started"] - 1 <= t <= window["finished"] + 1]
        after = [r for t, r, _ in samples if t >= window["finished"]]
        trainers.append({"stage": window["stage"], "fingerprint": window["fingerprint"],
                         "seconds": round(window["finished"] - window["started"]),
                         "end_rss_mb": round(after[0] / MB) if after else None,
                         "peak_rss_mb": round(max(during) / MB) if during else None,
                         "recorded": window["recorded"]})
    ends = [t["end_rss_mb"] for t in trainers if t["end_rss_mb"] is not None]
    growth = slope(ends)
    result = {"command": command, "exit_code": code, "seconds": round(time.time() - started),
              "samples": len(samples), "peak_rss_mb": round(max((r for _, r, _ in samples), default=0) / MB),
              "peak_pss_mb": round(max((p for _, _, p in samples), default=0) / MB),
              "trainer_stages": len(trainers), "end_rss_mb": ends,
              "slope_mb_per_trainer_stage": None if growth is None else round(growth, 1),
              "stages": trainers}
    print(json.dumps(result))
    print(f"exit {code}; {result['seconds']} s; peak RSS {result['peak_rss_mb']} MB "
          f"(PSS {result['peak_pss_mb']} MB); {len(trainers)} trainer stages, RSS at their ends "
          f"{ends[0] if ends else '-'} -> {ends[-1] if ends else '-'} MB, slope "
          f"{'-' if growth is None else f'{growth:+.1f}'} MB per trainer stage")
    return code


if __name__ == "__main__":
    sys.exit(main())
