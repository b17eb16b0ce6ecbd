"""Soak test of the promise "one fingerprint, one content": kills, concurrency, corruption.

    python scripts/soak.py [--kills 20] [--task Ablations] [--config configs/demo.cfg]
                           [--glue-dir data/demo] [--seed 0] [--cache-flips 100] [--work DIR]
                           [-- LUIGI_ARGS ...]

Four phases, each in its own workdir under ``--work`` (default: a temporary directory):

1. **reference**: one uninterrupted ``tinykd run TASK`` from scratch.
2. **kills**: the same run from scratch, SIGKILLed (its whole process group) ``--kills`` times
   at random points (uniform over the reference run's stage time: see ``phase_kills``),
   resumed after each, then run to the end. Every final file must equal the reference's byte for byte, except the run-history
   fields (timings, pids, resume counters: ``pipeline.stage.RUN_HISTORY_*``), compared with those
   fields removed: ``manifest.json`` via ``manifest_content``, JSON files key by key, the
   ablation table without its training-time column. Every phase builds in the same directory
   (renamed after the phase), so recorded absolute paths agree.
3. **concurrent**: two identical runs started together on one workdir (no luigid): both must
   exit 0, and the outputs must equal the reference's as above.
4. **flips**: in a copy of the reference, for every file of every stage output (manifest
   included), one random byte is flipped and the check a consumer runs before using it must
   fail naming that file: ``verify_upstream`` (sizes, sha256, the manifest's own checksum), and
   for the teacher cache, whose Parquet is not re-hashed, reading every row group through the
   cache reader (page CRCs). The flip is undone before the next file. Then ``--cache-flips``
   flips in one cache shard, each left to the reader alone (no sha256), are counted.

Prints one JSON line with the figures and one human line; exits 1 if any phase failed. Sized
for the demo DAG (``make demo``: about 6 min per run on 2 cores, so 20 kills take about an
hour); pass LUIGI_ARGS after ``--`` to shrink it, e.g. ``--task DistillPrediction --
--PrepareData-max-train-examples 64``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from pipeline.errors import InputError  # noqa: E402
from pipeline.stage import (MANIFEST_NAME, RUN_HISTORY_FILES, load_manifest, manifest_content,  # noqa: E402
                            verify_upstream, without_run_history)

#: Stages whose Parquet files their readers check by page CRC instead of sha256.
PAGE_CRC_STAGES = ("teacher_cache",)
#: Luigi's log line of a task starting (the last one before a kill names the stage it hit).
RUNNING = re.compile(r"running\s+(\w+)[\[(]")
#: Table columns (Markdown/CSV headers) holding timings.
TIMING_COLUMN_WORDS = ("time", "seconds")


def tinykd_command(args) -> list[str]:
    command = [sys.executable, "-m", "tasks"]
    if args.config:
        command += ["--config", str(args.config)]
    command += ["run", args.task, "--PrepareData-glue-dir", str(args.glue_dir), *args.luigi_args]
    return command


def environment(workdir: Path) -> dict:
    return {**os.environ, "TINYKD_WORKDIR": str(workdir), "PYTHONPATH": str(PROJECT_ROOT),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def start(args, workdir: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(tinykd_command(args), cwd=PROJECT_ROOT, env=environment(workdir),
                            stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(args, workdir: Path, log: Path) -> tuple[int, float, list[tuple[float, str]]]:
    """Run to the end; the exit code, the wall time and the timeline of stage starts
    (seconds since the start, task family), read from Luigi's log as the run goes."""
    started = time.monotonic()
    offset = log.stat().st_size if log.exists() else 0
    process = start(args, workdir, log)
    timeline: list[tuple[float, str]] = []
    while True:
        code = process.poll()
        for family in RUNNING.findall(_new_text(log, offset))[len(timeline):]:
            timeline.append((round(time.monotonic() - started, 2), family))
        if code is not None:
            return code, time.monotonic() - started, timeline
        time.sleep(0.05)


def _new_text(log: Path, offset: int) -> str:
    with open(log, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


# --- comparison -------------------------------------------------------------------------------
def final_files(workdir: Path) -> dict[str, Path]:
    """``stage/fingerprint/relative path`` -> file, for every completed output."""
    found = {}
    for stage in sorted(p for p in workdir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for output in sorted(p for p in stage.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for file in sorted(output.rglob("*")):
                if file.is_file() and not any(part.startswith(".") for part in file.relative_to(output).parts):
                    found[file.relative_to(workdir).as_posix()] = file
    return found


def _mask_table(text: str, delimiter: str) -> str:
    """A Markdown (``|``) or CSV table without its timing columns."""
    if delimiter == ",":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return text
        keep = [i for i, h in enumerate(rows[0]) if not any(w in h.lower() for w in TIMING_COLUMN_WORDS)]
        return "\n".join(",".join(row[i] for i in keep if i < len(row)) for row in rows)
    out, keep = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            out.append(line)
            keep = None
            continue
        cells = line.strip().strip("|").split("|")
        if keep is None:   # a header row
            keep = [i for i, h in enumerate(cells) if not any(w in h.lower() for w in TIMING_COLUMN_WORDS)]
        out.append("|".join(cells[i] for i in keep if i < len(cells)))
    return "\n".join(out)


def comparable(file: Path):
    """The file's content without its run-history fields."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    if file.name == MANIFEST_NAME:
        return manifest_content(json.loads(text))
    if file.name in RUN_HISTORY_FILES and file.suffix == ".jsonl":
        return [without_run_history(json.loads(line)) for line in text.splitlines() if line.strip()]
    if file.suffix == ".json":
        return without_run_history(json.loads(text))
    if file.suffix == ".md":
        return _mask_table(text, "|")
    if file.suffix == ".csv":
        return _mask_table(text, ",")
    return text


def differences(reference: Path, other: Path) -> list[str]:
    ours, theirs = final_files(reference), final_files(other)
    problems = [f"only in the reference: {rel}" for rel in sorted(set(ours) - set(theirs))]
    problems += [f"not in the reference: {rel}" for rel in sorted(set(theirs) - set(ours))]
    for rel in sorted(set(ours) & set(theirs)):
        if comparable(ours[rel]) != comparable(theirs[rel]):
            problems.append(f"differs: {rel}")
    return problems


# --- phases ------------------------------------------------------------------------------------
def build_dir(work: Path) -> Path:
    """Every phase builds in the same directory (then renamed after its phase), so that the
    absolute paths some outputs record (the teacher's, in the cache manifest) are equal."""
    return work / "build"


def phase_kills(args, work: Path, timeline: list[tuple[float, str]], reference_seconds: float,
                rng: random.Random) -> dict:
    """SIGKILL at ``--kills`` random points of the run, then run it to the end and compare.

    A point is an instant drawn uniformly over the reference run from its first stage start
    to its end, taken as (the stage running then, seconds into it). Each restart is killed
    that long after it starts that stage (or a later one, if a resumed run has it done
    already), so the kills land in the stages in proportion to their running time, not in
    the interpreter's start-up that every restart repeats.
    """
    workdir, log = build_dir(work), work / "killed.log"
    order = [family for _, family in timeline]
    points = []
    for instant in sorted(rng.uniform(timeline[0][0], reference_seconds) for _ in range(args.kills)):
        index = max(i for i, (t, _) in enumerate(timeline) if t <= instant)
        points.append((index, instant - timeline[index][0]))
    kills, killed_in = 0, []
    for index, seconds_in in points:
        offset = log.stat().st_size if log.exists() else 0
        process = start(args, workdir, log)
        reached = None
        while process.poll() is None and reached is None:   # wait for that stage (or a later one)
            seen = RUNNING.findall(_new_text(log, offset))
            later = [f for f in seen if f in order[index:]]
            reached = later[0] if later else None
            time.sleep(0.05)
        try:
            code = process.wait(timeout=seconds_in)
        except subprocess.TimeoutExpired:
            running = RUNNING.findall(_new_text(log, offset))
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            kills += 1
            killed_in.append(f"{running[-1]} +{seconds_in:.1f}s")
            continue
        if code != 0:
            workdir.rename(work / "killed")
            return {"kills": kills, "error": f"run exited {code} (see {log})", "differences": []}
        break      # it finished before the kill: nothing left to interrupt
    code, _, _ = run_to_end(args, workdir, log)
    workdir.rename(work / "killed")
    problems = differences(work / "reference", work / "killed") if code == 0 else [f"final run exited {code}"]
    return {"kills": kills, "killed_in": killed_in, "differences": problems}


def phase_concurrent(args, work: Path) -> dict:
    workdir = build_dir(work)
    processes = [start(args, workdir, work / f"concurrent-{i}.log") for i in (1, 2)]
    codes = [p.wait() for p in processes]
    workdir.rename(work / "concurrent")
    # stages one run found published by the other once it had waited for their build lock
    waited = sum(log.read_text().count("was published by another process")
                 for log in (work / "concurrent-1.log", work / "concurrent-2.log"))
    problems = differences(work / "reference", work / "concurrent") if codes == [0, 0] else []
    return {"exit_codes": codes, "stages_skipped_after_waiting": waited, "differences": problems}


def _detected(stage: str, output: Path, file: Path) -> str:
    """How the check a consumer runs before using ``output`` reacts to a damaged ``file``:
    "named" (an InputError naming it), "unnamed" (another error: a bug to fix) or "" (none)."""
    try:
        verify_upstream(output, hash_parquet=stage not in PAGE_CRC_STAGES)
    except (InputError, ValueError) as exc:
        named = str(file) in str(exc) or (file.name == MANIFEST_NAME and str(output) in str(exc))
        return "named" if named else "unnamed"
    if stage in PAGE_CRC_STAGES and file.suffix == ".parquet":
        try:
            _read_all(output)
        except InputError as exc:
            return "named" if str(file) in str(exc) or str(output) in str(exc) else "unnamed"
        except Exception:  # noqa: BLE001 - counted: every failure must name its file
            return "unnamed"
    return ""


def _read_all(output: Path) -> list[dict]:
    from pipeline.cache.reader import open_cache

    return list(open_cache(output).batches(64, shuffle=False))


def _same_batches(got: list[dict], expected: list[dict]) -> bool:
    import torch

    def same(a, b):
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
        return a == b

    return len(got) == len(expected) and all(same(g, e) for g, e in zip(got, expected))


def phase_flips(work: Path, rng: random.Random, cache_flips: int) -> dict:
    copy = work / "flips"
    shutil.copytree(work / "reference", copy)   # real copies: the cache's hard links are not shared
    tried, missed = 0, []
    for rel, file in final_files(copy).items():
        stage = rel.split("/")[0]
        output = copy / "/".join(rel.split("/")[:2])
        original = file.read_bytes()
        if not original:
            continue
        position = rng.randrange(len(original))
        flipped = bytearray(original)
        flipped[position] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(flipped))
        try:
            tried += 1
            outcome = _detected(stage, output, file)
            if outcome != "named":
                missed.append(f"{rel} @ byte {position}: {outcome or 'not detected'}")
        finally:
            file.write_bytes(original)
    result = {"files_flipped": tried, "undetected": missed}
    # The teacher cache is the one output not re-hashed before use: many flips in one shard,
    # each left to the reader alone (page CRCs, footer and layout checks).
    shards = sorted(copy.glob("teacher_cache/[!.]*/shards/*.parquet"))
    if shards and cache_flips:
        shard, output = shards[0], shards[0].parent.parent
        original = shard.read_bytes()
        expected = _read_all(output)
        caught, harmless, silent, unnamed = 0, 0, [], []
        for _ in range(cache_flips):
            position = rng.randrange(len(original))
            flipped = bytearray(original)
            flipped[position] ^= 1 << rng.randrange(8)
            shard.write_bytes(bytes(flipped))
            outcome = _detected("teacher_cache", output, shard)
            if outcome == "named":
                caught += 1
            elif outcome == "unnamed":
                unnamed.append(position)
            elif _same_batches(_read_all(output), expected):
                harmless += 1            # e.g. a statistics byte in the footer: nothing read changed
            else:
                silent.append(position)
        shard.write_bytes(original)
        result["cache_shard_flips"] = {"file": shard.relative_to(copy).as_posix(), "bytes": len(original),
                                       "flips": cache_flips, "detected_by_the_reader": caught,
                                       "undetected_but_nothing_read_changed": harmless,
                                       "failed_without_naming_the_file": unnamed,
                                       "silently_changed_what_was_read": silent}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--task", default="Ablations")
    parser.add_argument("--config", type=Path, default=PROJECT_ROOT / "configs" / "demo.cfg")
    parser.add_argument("--glue-dir", type=Path, default=PROJECT_ROOT / "data" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-flips", type=int, default=100,
                        help="single-byte flips in one teacher-cache shard, each left to the reader")
    parser.add_argument("--work", type=Path, default=None, help="kept afterwards when given")
    parser.add_argument("luigi_args", nargs="*", help="after --: more tinykd run arguments")
    args = parser.parse_args()
    if args.glue_dir == PROJECT_ROOT / "data" / "demo":
        from pipeline.prepare.demo_task import ensure_demo_task

        ensure_demo_task(args.glue_dir)
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="tinykd-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    code, reference_seconds, timeline = run_to_end(args, build_dir(work), work / "reference.log")
    build_dir(work).rename(work / "reference")
    if code != 0 or not timeline:
        print(json.dumps({"error": f"the reference run exited {code}", "log": str(work / "reference.log")}))
        return 1
    kills = phase_kills(args, work, timeline, reference_seconds, rng)
    concurrent = phase_concurrent(args, work)
    flips = phase_flips(work, rng, args.cache_flips)
    ok = (not kills.get("error") and not kills["differences"] and concurrent["exit_codes"] == [0, 0]
          and not concurrent["differences"] and not flips["undetected"]
          and not flips.get("cache_shard_flips", {}).get("silently_changed_what_was_read")
          and not flips.get("cache_shard_flips", {}).get("failed_without_naming_the_file"))
    result = {"task": args.task, "luigi_args": args.luigi_args, "reference_seconds": round(reference_seconds, 1),
              "reference_stage_starts": timeline,
              "kills": kills, "concurrent": concurrent, "flips": flips, "ok": ok,
              "seconds": round(time.monotonic() - started, 1), "work": str(work)}
    print(json.dumps(result))
    print(f"soak {'OK' if ok else 'FAILED'}: {kills.get('kills', 0)} SIGKILLs -> "
          f"{len(kills.get('differences', [])) or 'no'} differing files; two concurrent runs -> exit "
          f"{concurrent['exit_codes']}, {len(concurrent['differences']) or 'no'} differing files; "
          f"{flips['files_flipped']} flipped files -> {len(flips['undetected'])} undetected; "
          f"{flips.get('cache_shard_flips', {}).get('detected_by_the_reader', 0)}/"
          f"{flips.get('cache_shard_flips', {}).get('flips', 0)} cache-shard flips caught by the reader "
          f"({result['seconds']:.0f} s, reference run {reference_seconds:.0f} s)")
    if args.work is None and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
