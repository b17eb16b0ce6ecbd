"""Benchmark of a URL workdir (moto's S3 server on 127.0.0.1): reader speed and no-op rerun.

    python scripts/bench_store.py [--rows 1500] [--repeats 2] [--skip-dag] [--work DIR]

1. **Reader.** A teacher cache of ``--rows`` examples (random values written by the real
   writer classes: no teacher run; 3 shards, fp16, hidden 128, 4 heads, 2 hidden layers and 1
   attention layer, lengths 5-64) on local disk and the same files on the bucket. Examples/s of
   an epoch of the reader's batches (batch 32, torch on 1 thread): from the local directory
   (the local-workdir reader), from the store without a local cache (every epoch streams ranged
   reads), and from the store with ``[pipeline] local_cache_gb`` (epoch 1 downloads each shard
   once, epoch 2 reads local disk). The goal: epoch 2 >= 0.9x the local reader's epoch 2 (the
   same reader object's second epoch, best of ``--repeats``, on both sides).
2. **No-op rerun** of the demo DAG (``configs/demo.cfg``, ``Ablations``: all 28 tasks) against
   the bucket: built once with reduced sizes (48 train / 24 dev sentences, 2 training steps per
   stage: the DAG's shape, not its compute), then ``tinykd run Ablations`` again in a fresh
   process, three times with the same scratch directory (a worker re-running) and once with an
   empty one (a new machine). Wall time, interpreter start included. The goal: <= 2 s.

Prints one JSON line and one human line. Figures depend on what else runs on the machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

BUCKET = "bench"
REDUCED = ["--PrepareData-max-train-examples", "48", "--PrepareData-max-dev-examples", "24",
           "--FineTuneTeacher-epochs", "1", "--Augment-num-aug", "2", "--Augment-examples-per-shard", "16",
           "--TeacherCache-shard-size", "50", "--DistillIntermediate-max-steps", "2",
           "--DistillPrediction-max-steps", "2", "--DistillPrediction-eval-every", "2", "--workers", "1"]
RUNNING = re.compile(r"running\s+\w+\[")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synthetic_cache(directory: Path, rows: int, shards: int = 3, hidden: int = 128, heads: int = 4) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cache.writer import CacheSpec, RowGroupBuffer, cache_schema
    from pipeline.stage import sha256_file

    spec = CacheSpec([0, 1], [1], "float16", 64, layout="full")
    schema = cache_schema(spec, pa.int64())
    rng = np.random.default_rng(0)
    listed = []
    per_shard = -(-rows // shards)
    for index in range(shards):
        shard = directory / "shards" / f"part-{index:05d}.parquet"
        shard.parent.mkdir(parents=True, exist_ok=True)
        count = min(per_shard, rows - index * per_shard)
        with pq.ParquetWriter(shard, schema, compression="zstd") as writer:
            buffer = RowGroupBuffer(writer, schema, 1 << 20)
            for i in range(count):
                length = int(rng.integers(5, 65))
                buffer.add({"id": f"x-{index}-{i}", "orig_id": f"x-{index}-{i}", "aug_index": 0, "label": i % 2,
                            "length": length, "input_ids": np.arange(length, dtype=np.int32),
                            "token_type_ids": np.zeros(length, np.int8),
                            "logits": rng.standard_normal(2).astype(np.float32),
                            "hidden_0": rng.standard_normal(length * hidden).astype(np.float16),
                            "hidden_1": rng.standard_normal(length * hidden).astype(np.float16),
                            "attn_1": rng.standard_normal(heads * length * length).astype(np.float16)})
            buffer.flush()
        listed.append({"file": f"shards/{shard.name}", "index": index, "rows": count,
                       "bytes": shard.stat().st_size, "sha256": sha256_file(shard)})
    info = {"hidden_layers": [0, 1], "attention_layers": [1], "dtype": "float16", "with_logits": True,
            "hidden_size": hidden, "num_heads": heads, "num_labels": 2, "shards": listed}
    (directory / "manifest.json").write_text(json.dumps({"info": info}))
    return directory


def epoch_speed(reader, epoch: int) -> float:
    start = time.perf_counter()
    count = sum(len(batch["ids"]) for batch in reader.batches(32, seed=0, epoch=epoch))
    return count / (time.perf_counter() - start)


def bench_reader(root: Path, rows: int, repeats: int) -> dict:
    import torch

    from pipeline.cache.reader import open_cache
    from pipeline.store import LocalObjectCache, open_store

    torch.set_num_threads(1)
    local = synthetic_cache(root / "cache", rows)
    url = f"s3://{BUCKET}/work/teacher_cache/bench"
    store = open_store(url)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        store.upload(file, file.relative_to(local).as_posix())
    cache_bytes = sum(p.stat().st_size for p in local.rglob("*.parquet"))
    local_first, local_second = [], []
    for _ in range(repeats):   # epoch 1 and epoch 2 of one reader, as for the store below
        reader = open_cache(local)
        local_first.append(epoch_speed(reader, 0))
        local_second.append(epoch_speed(reader, 1))
    local_speed = max(local_second)
    streamed = epoch_speed(open_cache(url), 0)
    epoch1, epoch2 = [], []
    for attempt in range(repeats):
        disk = LocalObjectCache(root / f"local-cache-{attempt}", 2 << 30)
        reader = open_cache(url, local_cache=disk)
        epoch1.append(epoch_speed(reader, 0))
        epoch2.append(epoch_speed(reader, 1))
    return {"cache_bytes": cache_bytes, "rows": rows, "local_examples_s": round(local_speed, 1),
            "local_epoch1_examples_s": round(max(local_first), 1),
            "store_streamed_examples_s": round(streamed, 1),
            "store_epoch1_examples_s": round(max(epoch1), 1),
            "store_epoch2_local_cache_examples_s": round(max(epoch2), 1),
            "epoch2_vs_local": round(max(epoch2) / local_speed, 3)}


def bench_noop(root: Path, env: dict) -> dict:
    from pipeline.prepare.demo_task import ensure_demo_task

    demo = root / "demo"
    ensure_demo_task(demo)
    command = [sys.executable, "-m", "tasks", "--config", str(PROJECT_ROOT / "configs" / "demo.cfg"), "run",
               "Ablations", "--PrepareData-glue-dir", str(demo), *REDUCED]

    def run(scratch: Path) -> tuple[float, subprocess.CompletedProcess]:
        started = time.perf_counter()
        result = subprocess.run(command, env={**env, "TINYKD_SCRATCH": str(scratch)}, cwd=PROJECT_ROOT,
                                capture_output=True, text=True, timeout=1800)
        return time.perf_counter() - started, result

    build_seconds, built = run(root / "scratch-a")
    if built.returncode != 0:
        raise SystemExit(f"the DAG build failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}")
    tasks_built = len(RUNNING.findall(built.stdout + built.stderr))
    same = []
    for _ in range(3):
        seconds, result = run(root / "scratch-a")
        assert result.returncode == 0 and not RUNNING.findall(result.stdout + result.stderr), result.stderr[-2000:]
        same.append(round(seconds, 2))
    fresh_seconds, result = run(root / "scratch-fresh")
    assert result.returncode == 0 and not RUNNING.findall(result.stdout + result.stderr), result.stderr[-2000:]
    return {"dag_tasks_built": tasks_built, "dag_build_s": round(build_seconds, 1),
            "noop_same_scratch_s": same, "noop_fresh_scratch_s": round(fresh_seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-dag", action="store_true", help="reader figures only")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    root = Path(args.work or tempfile.mkdtemp(prefix="tinykd-bench-store-"))
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    aws = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(aws)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYKD_")}
    env.update(aws, PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TINYKD_WORKDIR=f"s3://{BUCKET}/work")
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        figures = {"reader": bench_reader(root, args.rows, args.repeats)}
        if not args.skip_dag:
            figures["noop"] = bench_noop(root, env)
    finally:
        server.stop()
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures, sort_keys=True))
    r = figures["reader"]
    line = (f"reader on {r['rows']} examples ({r['cache_bytes'] / 2**20:.0f} MiB): local {r['local_examples_s']}/s, "
            f"store streamed {r['store_streamed_examples_s']}/s, store epoch 1 {r['store_epoch1_examples_s']}/s, "
            f"epoch 2 from the local cache {r['store_epoch2_local_cache_examples_s']}/s "
            f"({r['epoch2_vs_local']}x local; goal >= 0.9x)")
    if "noop" in figures:
        n = figures["noop"]
        line += (f"; demo DAG ({n['dag_tasks_built']} tasks, built in {n['dag_build_s']} s) no-op rerun "
                 f"{min(n['noop_same_scratch_s'])}-{max(n['noop_same_scratch_s'])} s, fresh scratch "
                 f"{n['noop_fresh_scratch_s']} s (goal <= 2 s)")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
