"""The teacher-cache reader on a store (moto S3): the same batches as from local disk, ranged
streaming, the size-bounded local disk cache, and ``inspect --verify`` on a URL."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.cache.reader import open_cache
from pipeline.cache.writer import CacheSpec
from pipeline.cache.assemble import build_cache
from pipeline.store import LocalObjectCache, open_store
from tests.store_server import PROJECT_ROOT, TEST_SECRET, s3  # noqa: F401
from tests.test_cache import examples, teacher_dir  # noqa: F401


@pytest.fixture
def caches(teacher_dir, examples, tmp_path, s3):  # noqa: F811
    """One compact cache (3 shards, teacher parts) on local disk and the same files on the store."""
    local = tmp_path / "cache"
    build_cache(examples, teacher_dir, local, CacheSpec([0, 2, 4], [2, 4], "float16", 64),
                shard_size=6, row_group_bytes=3000)
    url = s3.url("work/teacher_cache/0123456789abcdef")
    store = open_store(url)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        store.upload(file, file.relative_to(local).as_posix())
    return local, url


def _same(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"]
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        elif isinstance(value, dict) and value and isinstance(next(iter(value.values())), torch.Tensor):
            assert value.keys() == b[key].keys()
            for layer in value:
                assert torch.equal(value[layer], b[key][layer]), (key, layer)


def test_a_cache_on_the_store_reads_the_same_batches_as_on_local_disk(caches):
    local, url = caches
    here, there = open_cache(local), open_cache(url)
    assert there.num_examples == here.num_examples == 17 and there.derives
    for epoch in (0, 1):
        pairs = list(zip(here.batches(4, seed=3, epoch=epoch), there.batches(4, seed=3, epoch=epoch)))
        assert len(pairs) == 5
        for a, b in pairs:
            _same(here.complete(a), there.complete(b))   # the teacher parts come from the store too
    assert there.verify() == []


def test_the_local_cache_serves_the_second_epoch_without_the_store(caches, s3, tmp_path):
    local, url = caches
    disk = LocalObjectCache(tmp_path / "local-cache", 10 << 20)
    reader = open_cache(url, local_cache=disk)
    first = list(reader.batches(4, seed=1, epoch=0))
    assert len(disk.entries()) == 3   # every shard, fetched once and checked
    for key in s3.keys("work/teacher_cache/0123456789abcdef/shards/"):
        s3.client().delete_object(Bucket=s3.bucket, Key=key)   # epoch 2 cannot download
    second = list(reader.batches(4, seed=1, epoch=1))
    expected = list(open_cache(local).batches(4, seed=1, epoch=1))
    for a, b in zip(expected, second, strict=True):
        _same(a, b)
    assert first and [b["ids"] for b in first] == [b["ids"] for b in open_cache(local).batches(4, seed=1, epoch=0)]


def test_the_local_cache_stays_within_its_budget(caches, tmp_path):
    local, url = caches
    sizes = sorted(f.stat().st_size for f in (local / "shards").iterdir())
    budget = sizes[-1] + sizes[0] // 2   # room for one shard, never two
    disk = LocalObjectCache(tmp_path / "lc", budget)
    reader = open_cache(url, local_cache=disk)
    ids = [i for b in reader.batches(4, seed=0) for i in b["ids"]]
    assert sorted(ids) == sorted(f"train-{i}" for i in range(17))
    assert 0 < disk.used_bytes() <= budget and len(disk.entries()) == 1
    tiny = LocalObjectCache(tmp_path / "tiny", sizes[0] - 1)   # no shard fits: all streamed
    assert [b["ids"] for b in open_cache(url, local_cache=tiny).batches(4, seed=0)] == \
        [b["ids"] for b in open_cache(local).batches(4, seed=0)]
    assert tiny.entries() == []


def _inspect(url: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tasks", "inspect", url, *flags], env=env,
                          capture_output=True, text=True, timeout=120)


def test_inspect_verify_works_on_a_url_and_names_a_damaged_shard(caches, s3):
    local, url = caches
    result = _inspect(url, "--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert url in result.stdout and TEST_SECRET not in result.stdout + result.stderr
    shard = sorted((local / "shards").iterdir())[1]
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    open_store(url).write_bytes(f"shards/{shard.name}", bytes(damaged))
    result = _inspect(url, "--verify")
    assert result.returncode == 1
    assert f"{url}/shards/{shard.name}: checksum differs from the manifest" in result.stdout
