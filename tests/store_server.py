"""A real S3-compatible server for the tests: moto's threaded server on 127.0.0.1.

``moto[server]`` (a dev dependency) runs moto's S3 implementation behind a real HTTP endpoint,
so pyarrow's S3 client talks to it exactly as to MinIO or AWS: signed requests, multipart
uploads, listings. Tests point ``AWS_ENDPOINT_URL`` at it (the same variable a MinIO user sets).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Test credentials: moto accepts any; the secret is long enough for tests to look for it in output.
TEST_KEY_ID = "AKIATINYKDTEST0000000"
TEST_SECRET = "tinykd-test-secret-Xq9vZ"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict

    def url(self, prefix: str = "work") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=TEST_KEY_ID,
                            aws_secret_access_key=TEST_SECRET, region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(o["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
                      for o in page.get("Contents", []))


def s3_environment(endpoint: str) -> dict:
    return {"AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def s3(monkeypatch):
    """A fresh moto S3 server with one empty bucket ``tinykd``; the AWS variables point at it."""
    pytest.importorskip("moto.server")
    import urllib.request

    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        # moto keeps its state per process: start every test from an empty account
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
        env = s3_environment(endpoint)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        served = S3Server(endpoint, "tinykd", env)
        served.client().create_bucket(Bucket=served.bucket)
        yield served
    finally:
        server.stop()


def start_moto_subprocess(env: dict) -> tuple[subprocess.Popen, str]:
    """moto's server as its own process (for settings moto reads at start, such as auth)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)


def start_luigid(tmp_path: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """A real central scheduler on a free port (stopped by the caller)."""
    port = free_port()
    logs = tmp_path / "luigid-logs"
    logs.mkdir(exist_ok=True)
    luigid = Path(sys.executable).parent / "luigid"
    process = subprocess.Popen([str(luigid), "--port", str(port), "--logdir", str(logs),
                                "--state-path", str(tmp_path / "luigid-state.pickle")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            return process, port
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError("luigid did not start")
            time.sleep(0.2)


def without_aws(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith("AWS_")}


__all__ = ["S3Server", "s3", "free_port", "start_luigid", "start_moto_subprocess", "s3_environment",
           "without_aws", "TEST_SECRET", "TEST_KEY_ID", "PROJECT_ROOT", "os"]
