"""Soak test of the store contract: SIGKILL a worker in the middle of its upload, many times.

    python scripts/soak_store.py [--kills 10] [--rows 4000] [--seed 0] [--workdir DIR]

Starts moto's S3 server on 127.0.0.1 (``moto[server]``, a dev dependency) with one bucket, and
a small GLUE-layout SST-2 task (``--rows`` train sentences). Then ``--kills`` times: a fresh
``tinykd run PrepareData`` process against ``s3://soak/work`` is SIGKILLed at a random point of
its upload (``PrepareData`` uploads ``dev.parquet``, ``train.parquet``, then ``manifest.json``):
in the middle of a file (half of its bytes written to the open multipart upload) or between
two files, including after the last file and before the manifest, the most dangerous moment.
The process runs the real stage contract; only ``Store.upload`` is wrapped, in the child, to
announce the kill point and wait there for the kill.

After each kill the store is checked the way Luigi and a reader see it: the killed output must
have no ``manifest.json`` (``complete_looking_after_kill`` counts the outputs that look complete
anyway: the goal is 0), and every output that has one must verify (sizes and sha256). Finally
an uninterrupted run must finish the output and it must verify.

Prints one JSON line and one human line; exits 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

BUCKET = "soak"
WORDS = "good bad movie plot actor great boring fun story scene long short film music".split()


def child(kill_at: int, mode: str, glue_dir: str) -> int:
    """A real ``tinykd run PrepareData`` whose ``kill_at``-th upload announces itself and waits."""
    from pipeline import store as store_module
    from tasks.cli import main

    real_upload = store_module.Store.upload
    count = [0]

    def upload(self, local, rel):
        index = count[0]
        count[0] += 1
        if index == kill_at and mode == "mid":
            data = Path(local).read_bytes()
            with self.fs.open_output_stream(self.path(rel)) as target:
                target.write(data[: len(data) // 2])
                target.flush()
                print(f"KILL-POINT mid {rel}", flush=True)
                time.sleep(120)
                target.write(data[len(data) // 2:])
            return None
        real_upload(self, local, rel)
        if index == kill_at and mode == "between":
            print(f"KILL-POINT after {rel}", flush=True)
            time.sleep(120)
        return None

    store_module.Store.upload = upload
    return main(["run", "PrepareData", "--PrepareData-task", "SST-2", "--PrepareData-glue-dir", glue_dir])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_task(root: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    task = root / "glue" / "SST-2"
    task.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", rows), ("dev.tsv", max(8, rows // 10))):
        lines = [f"{' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))}\t{i % 2}" for i in range(n)]
        (task / name).write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    return task.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("KILL_AT", "MODE", "GLUE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(int(args.child[0]), args.child[1], args.child[2])

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # moto's request log

    from pipeline.stage import MANIFEST_NAME, store_output_problems
    from pipeline.store import open_store

    root = Path(args.workdir or tempfile.mkdtemp(prefix="tinykd-soak-store-"))
    glue = write_task(root, args.rows, args.seed)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    aws = {"AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(aws)
    empty = root / "empty-luigi.cfg"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYKD_")}
    env.update(aws, PYTHONPATH=str(PROJECT_ROOT), LUIGI_CONFIG_PATH=str(empty), HF_HUB_OFFLINE="1",
               TINYKD_WORKDIR=f"s3://{BUCKET}/work", TINYKD_SCRATCH=str(root / "scratch"))
    rng = random.Random(args.seed)
    report = {"kills": 0, "killed_mid_upload": 0, "complete_looking_after_kill": 0,
              "damaged_manifests": 0, "kill_points": []}
    started = time.perf_counter()
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        store = open_store(f"s3://{BUCKET}/work")
        for _ in range(args.kills):
            # dev.parquet (0), train.parquet (1): mid-file, or after a file (after 1: before the manifest)
            kill_at, mode = rng.choice([(0, "mid"), (1, "mid"), (0, "between"), (1, "between")])
            process = subprocess.Popen([sys.executable, __file__, "--child", str(kill_at), mode, str(glue)],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                       start_new_session=True)
            point = None
            for line in process.stdout:
                if line.startswith("KILL-POINT"):
                    point = line.split(None, 1)[1].strip()
                    break
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            report["kills"] += 1
            if point is None:
                continue   # finished before the kill point: counted as not killed mid-upload
            report["killed_mid_upload"] += 1
            report["kill_points"].append(point)
            output = "/".join(point.split()[1].split("/")[:2])   # prepare_data/<fingerprint>
            if store.exists(f"{output}/{MANIFEST_NAME}"):
                report["complete_looking_after_kill"] += 1
            for name in store.list_files(""):
                if name.endswith(f"/{MANIFEST_NAME}") and name.count("/") == 2:
                    if store_output_problems(store, name.rsplit("/", 1)[0]):
                        report["damaged_manifests"] += 1
        final = subprocess.run([sys.executable, __file__, "--child", "-1", "none", str(glue)], env=env,
                               capture_output=True, text=True, timeout=300)
        outputs = [name.rsplit("/", 1)[0] for name in store.list_files("")
                   if name.startswith("prepare_data/") and name.endswith(f"/{MANIFEST_NAME}")]
        report["final_rc"] = final.returncode
        report["final_complete"] = final.returncode == 0 and len(outputs) == 1
        report["final_problems"] = [f"{w}: {p}" for o in outputs for w, p in store_output_problems(store, o)]
    finally:
        server.stop()
        if args.workdir is None:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    ok = (report["complete_looking_after_kill"] == 0 and report["damaged_manifests"] == 0
          and report["final_complete"] and not report["final_problems"])
    print(json.dumps(report, sort_keys=True))
    print(f"{report['killed_mid_upload']} of {report['kills']} SIGKILLs landed during an upload; "
          f"{report['complete_looking_after_kill']} left a complete-looking output; the rerun "
          f"{'finished and verified' if report['final_complete'] and not report['final_problems'] else 'FAILED'} "
          f"({report['seconds']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
