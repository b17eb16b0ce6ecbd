"""Device pools and leases: the pool logic on fake device lists, leases freed by the kernel
when their holder is killed, two distillation stages under --workers 2 on two CPU leases at
once, a 2-rank stage through Luigi, and the bad device/launch settings refused before anything
is written."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import luigi
import pytest

from pipeline.common.devices import DeviceLease, devices_needed, parse_pool, slot_names
from pipeline.errors import InputError
from tests.test_distill_tasks import build, configured, one_torch_thread  # noqa: F401 - fixtures


def test_pool_from_fake_device_lists():
    assert parse_pool("auto", 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_pool("auto", 0) == []   # the CPU, unleased
    assert parse_pool("cuda:1, cuda:0", 2) == ["cuda:1", "cuda:0"]
    assert parse_pool("cpu,cpu", 0) == ["cpu", "cpu"]
    assert slot_names(["cpu", "cpu", "cuda:0"]) == ["cpu-0", "cpu-1", "cuda0-0"]
    with pytest.raises(InputError, match=r"cuda:2 does not exist on this machine \(visible CUDA "
                                         r"devices: cuda:0..cuda:1\)"):
        parse_pool("cuda:0,cuda:2", 2)
    with pytest.raises(InputError, match="cuda:0 does not exist.*visible CUDA devices: none"):
        parse_pool("cuda:0", 0)
    with pytest.raises(InputError, match="'gpu0' is not a device"):
        parse_pool("gpu0", 1)
    assert devices_needed("auto", ["cuda:0", "cuda:1"]) == 2
    assert devices_needed("2", ["cpu", "cpu"]) == 2
    assert devices_needed(4, []) == 4   # the unleased CPU: any number of ranks
    with pytest.raises(InputError, match=r"nproc = 3 ranks, but \[pipeline\] devices holds 2"):
        devices_needed("3", ["cuda:0", "cuda:1"])


def test_leases_are_exclusive_and_a_killed_holder_frees_its_lease(tmp_path):
    pool = ["cpu", "cpu"]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline.common.devices import DeviceLease; "
        f"l = DeviceLease({str(tmp_path)!r}, ['cpu', 'cpu'], 1); print(l.acquire(), flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "['cpu']"
        mine = DeviceLease(tmp_path, pool, 1)
        assert mine.acquire() == ["cpu"] and mine.slots == ["cpu-1"]   # the other slot
        assert [h["pid"] for h in mine.holders()] == [holder.pid, __import__("os").getpid()]
        waited = []
        both = DeviceLease(tmp_path, pool, 2, poll_seconds=0.05, on_wait=waited.append)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        mine.release()
        assert both.acquire() == ["cpu", "cpu"]   # the killed holder's slot came free
        both.release()
    finally:
        holder.kill()


def test_a_full_pool_makes_a_stage_wait(tmp_path):
    first = DeviceLease(tmp_path, ["cpu"], 1)
    first.acquire()
    waited, got = [], []
    second = DeviceLease(tmp_path, ["cpu"], 1, poll_seconds=0.02, on_wait=waited.append)
    thread = threading.Thread(target=lambda: got.append(second.acquire()))
    thread.start()
    time.sleep(0.3)
    assert not got and waited and waited[0][0]["slot"] == "cpu-0"
    first.release()
    thread.join(timeout=5)
    assert got == [["cpu"]]
    second.release()


def add_config(root, text: str) -> None:
    from luigi.configuration import LuigiConfigParser

    with open(root / "luigi.cfg", "a") as handle:
        handle.write(text)
    LuigiConfigParser._instance = None
    luigi.task_register.Register.clear_instance_cache()


def test_two_distill_stages_under_two_workers_hold_two_cpu_leases_at_once(configured, isolated_workdir):
    import tasks.distill as distill_tasks
    from tasks.teacher import TeacherCache

    add_config(configured, "[pipeline]\ndevices = cpu,cpu\n")
    assert build(TeacherCache()).status.name in ("SUCCESS", "SUCCESS_WITH_RETRY")
    seen, stop = [], threading.Event()
    watcher = DeviceLease(isolated_workdir, ["cpu", "cpu"])

    def watch():
        while not stop.is_set():
            seen.append({h["slot"]: h["pid"] for h in watcher.holders()})
            time.sleep(0.02)

    thread = threading.Thread(target=watch)
    thread.start()
    stages = [distill_tasks.DistillIntermediate(seed=seed, device="auto", epochs=3) for seed in (1, 2)]
    try:
        result = luigi.build(stages, local_scheduler=True, workers=2, log_level="WARNING",
                             detailed_summary=True)
    finally:
        stop.set()
        thread.join()
    assert result.status.name == "SUCCESS", result.summary_text
    leases = [json.loads((s.output_dir() / "manifest.json").read_text())["info"]["device_lease"]
              for s in stages]
    assert sorted(lease["slots"][0] for lease in leases) == ["cpu-0", "cpu-1"]
    assert all(lease["devices"] == ["cpu"] for lease in leases)
    together = [held for held in seen if len(held) == 2]
    assert together and len(set(together[0].values())) == 2   # two processes, at the same time
    assert watcher.holders() == []   # both released


def test_a_two_rank_stage_through_luigi(configured, isolated_workdir):
    import tasks.distill as distill_tasks

    add_config(configured, "[pipeline]\ndevices = cpu,cpu\n")
    stage = distill_tasks.DistillIntermediate(device="auto", nproc="auto", num_threads=1)
    result = build(stage)
    assert result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY"), result.summary_text
    manifest = json.loads((stage.output_dir() / "manifest.json").read_text())
    assert manifest["info"]["nproc"] == 2 and manifest["info"]["device_lease"]["slots"] == ["cpu-0", "cpu-1"]
    assert manifest["rows"]["steps"] == 4
    assert not (stage.output_dir() / ".launch-job.json").exists()
    assert list((stage.output_dir() / "tb").glob("events.out.tfevents.*"))
    # where and how wide it ran is run history: not what the output's content is compared by
    from pipeline.stage import manifest_content

    content = manifest_content(manifest)
    assert "device_lease" not in content["info"] and "nproc" not in content["info"]
    assert any(rel.startswith("tb/") for rel in manifest["files"])
    assert not any(rel.startswith("tb/") for rel in content["files"])
    # nproc is not significant: the 1-rank task is the same output
    luigi.task_register.Register.clear_instance_cache()
    assert distill_tasks.DistillIntermediate(device="auto", nproc="1").complete()


@pytest.mark.parametrize("settings, devices, message", [
    (dict(nproc="3"), "cpu,cpu", r"nproc = 3 ranks, but \[pipeline\] devices holds 2 device\(s\)"),
    (dict(nproc="2", batch_size=7), "cpu,cpu", "batch_size = 7 does not split evenly over nproc = 2"),
    (dict(nproc="2", dist_backend="nccl"), "cpu,cpu", "NCCL needs CUDA devices"),
    (dict(nproc="2", rdzv_port=-1), "cpu,cpu", "rendezvous port .* is in use"),
    (dict(), "cuda:0", "cuda:0 does not exist on this machine"),
])
def test_bad_device_and_launch_settings_fail_before_anything_is_written(
        configured, isolated_workdir, settings, devices, message):
    import tasks.distill as distill_tasks

    add_config(configured, f"[pipeline]\ndevices = {devices}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if settings.get("rdzv_port") == -1:
            settings = {**settings, "rdzv_port": busy.getsockname()[1]}
        stage = distill_tasks.DistillIntermediate(device="auto", **settings)
        with pytest.raises(InputError, match=message):
            stage.run()
    assert not (isolated_workdir / "distill_stage1").exists()
    assert not (isolated_workdir / ".devices").exists()
