"""Data-parallel distillation on CPU (gloo, one thread per rank): 2 ranks train the student 1
rank trains, step by step; a rank killed mid-epoch fails the stage in one line, leaves no
process, keeps the checkpoint, and the rerun (with another rank count) ends where an
uninterrupted run ends; the bad launch settings are refused before anything runs.

The students have no dropout: each rank draws its own dropout masks (distill.distributed),
so only a dropout-free run can be compared bit for bit across rank counts.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distill.launch import RankFailed, check_port, check_ranks, choose_backend, run_ranks, write_job
from distill.run import distill_from_cache
from distill.student import StudentSpec
from distill.trainer import recipe
from pipeline.cache.layer_map import cached_layers, layer_map
from pipeline.cache.writer import CacheSpec
from pipeline.cache.assemble import build_cache
from pipeline.errors import InputError
from tests.test_distill_cache import SST2, write_examples

LOSSES = ("embedding", "attention", "hidden", "prediction", "total")


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, minilm_dir):
    """A tiny teacher and its cache of 64 examples (two global batches of 32 per epoch), a dev
    split, and a dropout-free student checkpoint to start stage 1 from."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("ddp")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    labels = dict(num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    teacher = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=4,
                         num_attention_heads=4, intermediate_size=96, max_position_embeddings=64, **labels)
    BertForSequenceClassification(teacher).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    student = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **labels)
    torch.manual_seed(1)
    BertForSequenceClassification(student).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    write_examples(root / "train.parquet", 64, "train", 0)
    (root / "prepared").mkdir()
    write_examples(root / "prepared" / "dev.parquet", 16, "dev", 1)
    hidden, attention = cached_layers(layer_map(4, 2))
    build_cache(root / "train.parquet", root / "teacher", root / "cache",
                CacheSpec(hidden, attention, "float32", max_seq_length=32), shard_size=16, task_info=SST2)
    return root


def stage1_config(**overrides):
    return recipe("intermediate", **{**dict(epochs=10, max_steps=20, batch_size=32, log_every=1,
                                            checkpoint_every=0, device="cpu", prefetch=0,
                                            progress=False), **overrides})


def stage2_config(**overrides):
    return recipe("prediction", **{**dict(epochs=10, max_steps=20, batch_size=32, log_every=1,
                                          eval_every=10, checkpoint_every=0, device="cpu", prefetch=0,
                                          progress=False), **overrides})


def spec(assets: Path) -> StudentSpec:
    return StudentSpec(init="checkpoint", checkpoint=str(assets / "student"))


def launched(assets: Path, out: Path, config, nproc: int, **kwargs) -> Path:
    job = write_job(out.parent / f".{out.name}.job.json", assets / "cache", out, config,
                    kwargs.pop("student_spec", spec(assets)), backend="gloo", timeout_s=60,
                    num_threads=1, **kwargs)
    run_ranks(job, nproc)
    return job


def step_losses(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k in LOSSES + ("step",)}
            for line in (out / "metrics.jsonl").read_text().splitlines() if "eval" not in json.loads(line)]


def evaluations(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if "eval" in json.loads(line)]


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b):
        for name in set(x) - {"step"}:
            assert abs(x[name] - y[name]) <= 1e-5 * max(abs(x[name]), 1e-8), (x["step"], name, x[name], y[name])


@pytest.mark.slow
def test_two_ranks_train_the_one_rank_student(assets, tmp_path):
    """Stage 1 and stage 2, 20 steps each of global batch 32: 2 ranks x 16 rows give the losses
    of 1 rank x 32 at every step, the same dev evaluations, and students transformers loads."""
    from transformers import pipeline

    one1, two1 = tmp_path / "one-s1", tmp_path / "two-s1"
    distill_from_cache(assets / "cache", one1, stage1_config(), spec(assets))
    launched(assets, two1, stage1_config(), 2)
    assert_same_losses(step_losses(one1), step_losses(two1))
    assert len(step_losses(one1)) == 20
    assert json.loads((two1 / "metrics.json").read_text())["nproc"] == 2

    one2, two2 = tmp_path / "one-s2", tmp_path / "two-s2"
    distill_from_cache(assets / "cache", one2, stage2_config(), stage1_dir=one1,
                       prepared_dir=assets / "prepared")
    launched(assets, two2, stage2_config(), 2, student_spec=None, stage1_dir=str(one1),
             prepared_dir=str(assets / "prepared"))
    assert_same_losses(step_losses(one2), step_losses(two2))
    a, b = evaluations(one2), evaluations(two2)
    assert [e["step"] for e in a] == [10, 20] == [e["step"] for e in b]
    for x, y in zip(a, b):
        assert x["eval"]["primary"] == pytest.approx(y["eval"]["primary"], abs=1e-9)
    for out in (one2, two2):
        classify = pipeline("text-classification", model=str(out / "student"), device="cpu")
        assert classify("a good movie")[0]["label"] in ("negative", "positive")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["online_teacher", "general"])
def test_two_ranks_with_the_online_teacher_and_in_general_distillation(assets, tmp_path, kind):
    """The live teacher (each rank runs it on its rows) and general distillation (a bare
    encoder's cache, no logits): 2 ranks log the losses of 1 rank."""
    cache = assets / "cache"
    if kind == "general":
        cache = tmp_path / "general-cache"
        hidden, attention = cached_layers(layer_map(4, 2))
        build_cache(assets / "train.parquet", assets / "teacher", cache,
                    CacheSpec(hidden, attention, "float32", max_seq_length=32, with_logits=False),
                    shard_size=16, task_info=SST2)
    online = kind == "online_teacher"
    config = stage1_config(max_steps=8)
    one, two = tmp_path / "one", tmp_path / "two"
    distill_from_cache(cache, one, config, spec(assets), online=online)
    job = write_job(tmp_path / ".two.job.json", cache, two, config, spec(assets), backend="gloo",
                    timeout_s=60, num_threads=1, online=online)
    run_ranks(job, 2)
    assert_same_losses(step_losses(one), step_losses(two))
    assert json.loads((two / "metrics.json").read_text())["online_teacher"] is online


def assert_same_batch(a, b) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, dict):
            assert_same_batch(value, b[key])
        elif isinstance(value, torch.Tensor):
            assert value.shape == b[key].shape and torch.allclose(value, b[key], rtol=1e-6, atol=1e-6), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("batch_size, ranks", [(24, 3), (21, 2)])
def test_a_rank_reads_its_rows_of_the_whole_batch(assets, batch_size, ranks):
    """The reader's rank=(r, k) gives each rank exactly its block of every batch of the plan,
    padded to the whole batch's width: the rows a sliced whole batch holds, once the teacher
    tensors the cache left out are recomputed (a block may need fewer of them than its batch).
    64 rows in batches of 24 end with 16 (uneven over 3 ranks); in batches of 21 with one row
    (rank 1 owns none)."""
    from distill.distributed import World, slice_batch
    from distill.trainer import CachedTeacher
    from pipeline.cache.reader import open_cache

    hidden, attention = cached_layers(layer_map(4, 2))
    reader = open_cache(assets / "cache", hidden, attention)
    complete = CachedTeacher(reader.parts(torch.device("cpu")))
    whole = list(reader.batches(batch_size, seed=3, epoch=1))
    owned_total = 0
    for rank in range(ranks):
        mine = list(reader.batches(batch_size, seed=3, epoch=1, rank=(rank, ranks)))
        assert len(mine) == len(whole)
        for full, part in zip(whole, mine):
            expected, owned = slice_batch(complete(full), World(rank, ranks))
            assert part.pop("rank_rows") == owned and part.pop("batch_rows") == len(full["ids"])
            assert_same_batch(expected, complete(part))
            owned_total += owned
    assert owned_total == 64
    if batch_size == 21:
        assert len(whole[-1]["ids"]) == 1


def rank_pids(job: Path) -> dict[int, int]:
    """``rank -> pid`` of the live rank processes of ``job`` (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if str(job).encode() not in cmdline:
                continue
            environ = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0")
                           if b"=" in item)
            found[int(environ[b"RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_killed_rank_fails_in_one_line_and_the_rerun_resumes(assets, tmp_path, first, second):
    """SIGKILL of one rank after the mid-epoch checkpoint at step 3: one line naming the rank,
    no rank process left, the checkpoint kept; the rerun with the other rank count resumes
    from it and logs the uninterrupted run's losses."""
    reference = tmp_path / "reference"
    distill_from_cache(assets / "cache", reference, stage1_config(), spec(assets))

    out = tmp_path / "killed"
    config = stage1_config(checkpoint_every=3)
    job = write_job(tmp_path / ".killed.job.json", assets / "cache", out, config, spec(assets),
                    backend="gloo", timeout_s=60, num_threads=1)
    victim = first - 1
    killed = {}

    def kill_after_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if (out / "checkpoints" / "last.pt").exists():
                pids = rank_pids(job)
                if victim in pids:
                    os.kill(pids[victim], signal.SIGKILL)
                    killed["pid"] = pids[victim]
                    return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_after_checkpoint)
    watcher.start()
    with pytest.raises(RankFailed) as failed:
        run_ranks(job, first)
    watcher.join()
    message = str(failed.value)
    assert "\n" not in message and f"rank {victim} of {first}" in message and "SIGKILL" in message
    assert rank_pids(job) == {}
    meta = json.loads(torch.load(out / "checkpoints" / "last.pt", weights_only=True)["meta"])
    assert meta["step"] >= 3 and meta["step"] < 20

    if second == 1:
        distill_from_cache(assets / "cache", out, config, spec(assets))
    else:
        run_ranks(job, second)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["resumed_from"] == meta["step"]
    assert_same_losses(step_losses(reference), step_losses(out))


@pytest.mark.slow
def test_ranks_die_with_the_process_that_launched_them(assets, tmp_path):
    """A Luigi worker SIGKILLed while its ranks train leaves none of them running (and so no
    one holding its device lease)."""
    import subprocess
    import sys

    job = write_job(tmp_path / ".orphans.job.json", assets / "cache", tmp_path / "out",
                    stage1_config(max_steps=100000, epochs=100000), spec(assets), backend="gloo",
                    timeout_s=60, num_threads=1)
    launcher = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                                 "from distill.launch import run_ranks; run_ranks(Path(sys.argv[1]), 2)",
                                 str(job)], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.time() + 120
        while len(rank_pids(job)) < 2 or not (tmp_path / "out" / "metrics.jsonl").exists():
            assert time.time() < deadline and launcher.poll() is None, "the ranks did not start"
            time.sleep(0.05)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.time() + 10
        while rank_pids(job) and time.time() < deadline:
            time.sleep(0.05)
        assert rank_pids(job) == {}
    finally:
        launcher.kill()
        for pid in rank_pids(job).values():
            os.kill(pid, signal.SIGKILL)


def test_bad_launch_settings_are_refused_before_training(tmp_path):
    """Batch that the ranks cannot split, NCCL on the CPU, a rendezvous port in use: one
    InputError each, naming the setting."""
    with pytest.raises(InputError, match="batch_size = 30 does not split evenly over nproc = 4"):
        check_ranks(4, 30)
    check_ranks(2, 32)
    with pytest.raises(InputError, match="NCCL needs CUDA devices"):
        choose_backend("nccl", ["cpu", "cpu"])
    assert choose_backend("auto", ["cpu", "cpu"]) == "gloo"
    assert choose_backend("auto", ["cuda:0", "cuda:1"]) == "nccl"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InputError, match=f"rendezvous port {port} on 127.0.0.1 is in use"):
            check_port(port)
    assert check_port(0) > 0
