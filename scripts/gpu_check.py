"""The GPU acceptance run: the DAG on CUDA, and the figures that say whether it trains well there.

Run once on a machine with one or more NVIDIA GPUs, it checks the CUDA paths end to end and
prints one JSON line (``{"gpu_check": ...}``) followed by human-readable lines. Two profiles:

* ``--profile demo`` (the default): the demo DAG (configs/demo.cfg, the packaged MiniLM
  teacher and GloVe), about 8 minutes on one GPU;
* ``--profile paper``: the TinyBERT paper's shapes on a machine with no network: a seeded
  random BERT-base-shaped masked LM (``scripts/paper_teacher.py``: 12 x 768, 12 heads, FFN
  3072) as the teacher and as ``tinybert`` augmentation's masked LM, a TinyBERT4 student
  (4 x 312, FFN 1200), length 64, SST-2 (``--train`` rows, ``--aug`` copies each) or the
  project's demo task, trainer batch ``--batch-size`` (256), forward batch 512. Its few
  files come from the GPU kit (``scripts/gpu_kit.py``: ``.gpu/``, about 15 MB), whose wheels
  are installed first when Luigi is missing. About 3-4 minutes on an H200: an estimate from
  the first GPU run of the same DAG (README: On a GPU, the check to run), not yet measured.

What it measures, either profile:

1. **The DAG on CUDA** (``DistillPrediction``) with ``[TeacherCache] autocast = bf16`` and
   ``[DistillIntermediate] amp = true``: per stage its wall time, examples/s and peak GPU
   memory (``torch.cuda.max_memory_allocated``, reset when the stage starts; stages run in
   this process, one at a time).
2. **Plain-PyTorch bounds** (``scripts/gpu_bounds.py``), in the same process, on the cache's
   own first batches: the bare teacher forward, the student step with targets on the device,
   the live teacher plus the step.
3. **Every figure as a ratio to its bound** (``ratios``), beside the issue-27 goal it is held to:
   the stage-1 epoch's online/cache ratio against the plain-PyTorch ratio (and the FLOP
   bound: teacher forward plus student step over the student step, from the models' sizes);
   the writer (``TeacherCacheShard`` examples/s) against the bare forward; the reader's host
   side (``CacheReader.packed_batches``, and on CUDA the copy into pinned buffers: what the
   trainer's reader thread does) against the plain step's examples/s; the trainer on batches
   already on the device against the plain loop; the trainer reading the cache with 0, 1, 2, 4
   DataLoader workers against on-device (the first count reaching 0.95x is reported).
4. **The trainer under the launcher** (torch's elastic launcher, ``distill.launch``) with
   nproc = the GPUs present, and whether its losses equal the one-process run's.
5. **The student's dev metric** against the CPU run's (``--cpu-reference``, e.g. README's
   demo figure; "not given" without it).

Without CUDA it exits at once with one line saying so. ``--cpu-dry-run`` runs the same code on
the CPU (no autocast, no amp, two gloo ranks, no memory figures), on whatever DAG ``--config``
names (the test suite passes a tiny one) or on the paper profile at a toy shape (``--shape
tiny``, hidden), so the script itself is tested on every ``make test``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from scripts.gpu_kit import GLOVE_TEXT, GLUE, KIT_DIR, TASK, KitError, ensure_importable  # noqa: E402
from scripts.paper_teacher import SHAPES, build_paper_teacher, tokenizer_dir  # noqa: E402

#: The loader no longer starves the trainer once it reaches this share of the steps/s on
#: batches already on the device (the issue's goal).
STARVING_BELOW = 0.95
WORKER_COUNTS = (0, 1, 2, 4)
#: Issue 27's goals on a GPU at batch 256, each a ratio to its bound (judged only on CUDA).
GOALS = {"epoch": 1.5, "writer": 0.5, "trainer": 0.9, "from_cache": STARVING_BELOW}
#: ... and the writer's in examples/s, on an H200.
WRITER_GOAL_EXAMPLES_PER_S = 10_000
#: The paper profile's defaults: the GPU baseline's (3,800 SST-2 rows after the holdout
#: split, x 7 with the originals = 26,600 cached examples), trainer batch, forward batch, length.
PAPER_TRAIN, PAPER_AUG, PAPER_BATCH, PAPER_FORWARD_BATCH, PAPER_LENGTH = 4000, 6, 256, 512, 64


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo", choices=["demo", "paper"],
                        help="demo: the demo DAG (or --config); paper: BERT-base-shaped teacher -> "
                             "TinyBERT4 offline, from the GPU kit (scripts/gpu_kit.py)")
    parser.add_argument("--workdir", default="", help="where the DAG's outputs go (default: a new "
                                                      "temporary directory)")
    parser.add_argument("--config", action="append", default=[],
                        help="luigi.cfg file(s) describing the DAG instead of configs/demo.cfg (with "
                             "--profile paper: read after the profile's, to change it)")
    parser.add_argument("--kit", default=str(KIT_DIR),
                        help="the GPU kit's folder (default: .gpu): wheels installed when Luigi is "
                             "missing; the paper profile's GloVe text, tokenizer and SST-2")
    parser.add_argument("--glue-dir", default="",
                        help=f"paper profile: a GLUE directory with {TASK} (default: the kit's, else "
                             "the project's demo task, generated)")
    parser.add_argument("--train", type=int, default=PAPER_TRAIN,
                        help="paper profile: train rows kept (PrepareData max_train_examples)")
    parser.add_argument("--aug", type=int, default=PAPER_AUG,
                        help="paper profile: augmented copies of each train row (Augment num_aug)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"trainer batch of both stages (paper profile: {PAPER_BATCH}; demo: the profile's)")
    parser.add_argument("--forward-batch-size", type=int, default=None,
                        help=f"teacher forward batch of the cache writer (paper: {PAPER_FORWARD_BATCH})")
    parser.add_argument("--compile", action="store_true",
                        help="[DistillIntermediate] compile = true (torch.compile of the student's step)")
    # The CPU test's toy shape of the paper profile (scripts/paper_teacher.py SHAPES).
    parser.add_argument("--shape", default="base", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--cpu-reference", type=float, default=None,
                        help="the student's dev metric of a CPU run of the same DAG")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run this script's code path on the CPU (no figures about a GPU)")
    parser.add_argument("--steps", type=int, default=40,
                        help="training steps of each loader / launcher / bound measurement")
    return parser.parse_args(argv)


def config_text(sections: dict[str, dict[str, object]]) -> str:
    """luigi.cfg text of ``{section: {option: value}}``."""
    lines = []
    for section, options in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{option} = {value}" for option, value in options.items()]
    return "\n".join(lines) + "\n"


def paper_kit(args) -> Path:
    """The kit the paper profile reads its GloVe text (and tokenizer, SST-2) from."""
    kit = Path(args.kit).resolve()
    if not (kit / GLOVE_TEXT).is_file():
        raise KitError(f"{kit} holds no {GLOVE_TEXT}: build the GPU kit with scripts/gpu_kit.py and "
                       "carry .gpu/ here (README: On a GPU, the check to run)")
    return kit


def paper_task_dir(args, kit: Path) -> tuple[Path, str]:
    """The GLUE directory the paper profile reads SST-2 from, and what it is."""
    if args.glue_dir:
        return Path(args.glue_dir).resolve(), f"{TASK} from {args.glue_dir}"
    if (kit / GLUE / TASK / "train.tsv").is_file():
        return (kit / GLUE).resolve(), f"{TASK} from the kit"
    from pipeline.prepare.demo_task import ensure_demo_task
    from tasks.cli import DEMO_DATA

    ensure_demo_task(DEMO_DATA)
    return DEMO_DATA, "the demo task (generated; no SST-2 in the kit)"


def paper_profile(args, kit: Path, teacher: Path, glue_dir: Path) -> dict[str, dict[str, object]]:
    """The paper profile's DAG: the GPU baseline's settings (a BERT-base-shaped random teacher
    fine-tuned one epoch, tinybert augmentation with the same model as its masked LM and the
    kit's GloVe text, a TinyBERT4 student from a random init, holdout selection, length 64)."""
    student = SHAPES[args.shape].student
    quiet = {"progress": "false"}
    batch = args.batch_size or PAPER_BATCH
    return {
        "PrepareData": {"source": "glue", "task": TASK, "glue_dir": glue_dir, "selection": "holdout",
                        "max_train_examples": args.train},
        "WordVectors": {"vectors_source": "glove_text", "vectors_path": (kit / GLOVE_TEXT).resolve()},
        "Augment": {"mode": "tinybert", "mlm_model": teacher, "num_aug": args.aug, "examples_per_shard": 2000,
                    "aug_progress": "false"},
        "FineTuneTeacher": {"teacher": teacher, "finetune": "always", "epochs": 1, "batch_size": 32,
                            "learning_rate": "1e-4", "max_seq_length": PAPER_LENGTH, "eval_every": 0, **quiet},
        "TeacherCache": {"examples": "augmented", "student_layers": student.layers, "extra_layer_maps": "",
                         "max_seq_length": PAPER_LENGTH,
                         "forward_batch_size": args.forward_batch_size or PAPER_FORWARD_BATCH, **quiet},
        "DistillIntermediate": {"student_init": "config", "student_hidden_size": student.hidden,
                                "student_intermediate_size": student.intermediate,
                                "student_heads": student.heads, "epochs": 1, "log_every": 50,
                                "batch_size": batch, **quiet},
        "DistillPrediction": {"epochs": 1, "eval_every": 0, "log_every": 50, "batch_size": batch, **quiet},
    }


def configure(args, workdir: Path) -> dict:
    """Luigi's configuration: the profile (demo, ``--config`` or paper) and this run's
    overrides; returns what the profile is (for the report)."""
    from luigi.configuration import LuigiConfigParser

    files = [str(Path(f).resolve()) for f in args.config]
    overrides: dict[str, dict[str, object]] = {
        "pipeline": {"workdir": workdir, "devices": "cpu" if args.cpu_dry_run else "auto"}}
    if not args.cpu_dry_run:
        overrides["TeacherCache"] = {"autocast": "bf16"}
        overrides["DistillIntermediate"] = {"amp": "true"}
    profile: dict = {"name": args.profile}
    if args.profile == "paper":
        kit = paper_kit(args)
        shapes = SHAPES[args.shape]
        teacher = build_paper_teacher(workdir / f"paper-teacher-{args.shape}", args.shape, tokenizer_dir(kit))
        glue_dir, task = paper_task_dir(args, kit)
        written = workdir / "paper.cfg"
        written.write_text(f"# written by scripts/gpu_check.py --profile paper --shape {args.shape}: the DAG "
                           "it measures\n" + config_text(paper_profile(args, kit, teacher, glue_dir)))
        files = [str(written)] + files
        profile.update(shape=args.shape, teacher=shapes.teacher.describe(), student=shapes.student.describe(),
                       task=task, train=args.train, aug=args.aug, kit=str(kit), config=str(written))
    elif not files:
        from pipeline.prepare.demo_task import ensure_demo_task
        from tasks.cli import DEMO_CONFIG, DEMO_DATA

        ensure_demo_task(DEMO_DATA)
        files = [str(DEMO_CONFIG)]
        overrides["PrepareData"] = {"glue_dir": DEMO_DATA}
    if args.profile != "paper":   # the paper profile's config has them already
        for section in ("DistillIntermediate", "DistillPrediction"):
            if args.batch_size:
                overrides.setdefault(section, {})["batch_size"] = args.batch_size
        if args.forward_batch_size:
            overrides.setdefault("TeacherCache", {})["forward_batch_size"] = args.forward_batch_size
    if args.compile:
        overrides.setdefault("DistillIntermediate", {})["compile"] = "true"
    written = workdir / "gpu_check.cfg"
    written.write_text(config_text(overrides))
    LuigiConfigParser._config_paths = files + [str(written)]
    LuigiConfigParser._instance = None
    return profile


def run_dag(cuda: bool) -> tuple[object, list[dict]]:
    """Build DistillPrediction in this process; per stage: seconds, examples/s, peak memory."""
    import luigi
    import torch

    from tasks.base import StageTask
    from tasks.distill import DistillPrediction

    stages, started = [], {}

    @StageTask.event_handler(luigi.Event.START)
    def start(task):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started[task.task_id] = time.perf_counter()

    @StageTask.event_handler(luigi.Event.SUCCESS)
    def done(task):
        if task.task_id not in started:
            return
        seconds = time.perf_counter() - started[task.task_id]
        manifest = json.loads((task.output_dir() / "manifest.json").read_text())
        rows, info = manifest.get("rows", {}), manifest.get("info", {})
        per_second = info.get("examples_per_s")
        if per_second is None and rows.get("examples"):
            per_second = rows["examples"] / seconds
        stages.append({"stage": type(task).__name__, "seconds": round(seconds, 2),
                       "examples": rows.get("examples"),
                       "examples_per_s": round(per_second, 1) if per_second else None,
                       "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                       "device_lease": info.get("device_lease")})

    target = DistillPrediction()
    result = luigi.build([target], local_scheduler=True, workers=1, detailed_summary=True,
                         log_level="WARNING")
    if result.status.name not in ("SUCCESS", "SUCCESS_WITH_RETRY"):
        raise SystemExit(f"gpu_check: the DAG failed:\n{result.summary_text}")
    return target, stages


def writer_rate(stages: list[dict]) -> float | None:
    """TeacherCacheShard examples/s over this run's shards (None when every shard existed)."""
    shards = [s for s in stages if s["stage"] == "TeacherCacheShard" and s["examples"]]
    if not shards:
        return None
    return round(sum(s["examples"] for s in shards) / sum(s["seconds"] for s in shards), 1)


class Stage1:
    """What the measurements need of the DAG's stage 1: its layer map, student and settings."""

    def __init__(self, task, cache_dir):
        from transformers import AutoConfig

        from pipeline.cache.reader import load_cache_info
        from tasks.distill import _mapped_layers

        self.task = task
        self.cache_dir = cache_dir
        self.strategy, self.explicit, depth = task.trainer_layer_map(task.cache_task())
        self.mapped = _mapped_layers(task.cache_task(), self.strategy, self.explicit, depth)
        self.spec = task.student_spec(depth, self.mapped)
        self.info = load_cache_info(cache_dir)
        self.teacher_path = self.info["teacher"]["path"]
        self.teacher_config = AutoConfig.from_pretrained(self.teacher_path)
        self.config = task.train_config()
        self.forward_batch_size = task.cache_task().forward_batch_size

    def student(self):
        from distill.student import build_student

        return build_student(self.spec, self.teacher_config, 2)


def flop_bound(teacher_dir: str, student) -> float:
    """(teacher forward + student step) / student step, a step being 3 forwards (forward and
    a backward of twice its cost), a forward 2 FLOPs per non-embedding weight per token."""
    from transformers import AutoConfig, AutoModel

    def weights(model) -> int:
        embeddings = model.get_input_embeddings()
        skip = {id(p) for p in (embeddings.parameters() if embeddings is not None else [])}
        base = getattr(model, "base_model", model)
        for name, module in base.named_children():
            if "embed" in name:
                skip |= {id(p) for p in module.parameters()}
        return sum(p.numel() for p in base.parameters() if id(p) not in skip)

    teacher = AutoModel.from_config(AutoConfig.from_pretrained(teacher_dir))   # sizes only: no weights read
    student_weights = weights(student)
    return (2 * weights(teacher) + 6 * student_weights) / (6 * student_weights)


def cache_vs_online(stage1: Stage1, device: str, root: Path) -> dict:
    """One stage-1 epoch from the cache and the same epoch with the live teacher."""
    from dataclasses import replace

    from distill.run import distill_from_cache

    config = replace(stage1.config, epochs=1, max_steps=0, checkpoint_every=0, device=device, progress=False)
    seconds = {}
    for online in (False, True):
        out = root / ("online" if online else "cache")
        summary = distill_from_cache(stage1.cache_dir, out, config, stage1.spec, layer_strategy=stage1.strategy,
                                     explicit_layers=stage1.explicit, online=online)
        seconds["online" if online else "cache"] = summary["train_seconds"]
    return {"cache_epoch_s": seconds["cache"], "online_epoch_s": seconds["online"],
            "online_over_cache": round(seconds["online"] / seconds["cache"], 3),
            "flop_bound": round(flop_bound(stage1.teacher_path, stage1.student()), 3)}


def device_batches(reader, batch_size: int, seed: int, count: int, device) -> list[dict]:
    """The first ``count`` batches of the epoch-0 plan, expanded on ``device`` (the trainer's
    order: the same rows and widths it trains on first)."""
    from distill.data import to_device

    batches = []
    for packed in reader.packed_batches(batch_size, seed, 0):
        batches.append(to_device(packed, device))
        if len(batches) == count:
            break
    return batches


class OnDevice:
    """The first ``count`` batches of a source, expanded once on the device: the trainer's
    speed when reading costs nothing."""

    def __init__(self, reader, batch_size: int, seed: int, count: int, device):
        self.batch_list = device_batches(reader, batch_size, seed, count, device)
        self.num_examples = sum(int(b["input_ids"].shape[0]) for b in self.batch_list)

    def batches(self, batch_size, seed=0, epoch=0, start_batch=0):
        return iter(self.batch_list[start_batch:])

    def parts(self, device=None):
        return None


def reader_host_side(reader, batch_size: int, seed: int, count: int, cuda: bool) -> tuple[float, float]:
    """Examples/s and batches/s of the reader's host side over ``count`` batches: decoding and
    gathering packed batches (:meth:`CacheReader.packed_batches`) and, on CUDA, their copy into
    reused pinned buffers: what the trainer's reader thread does (``distill.data.staged_for``)
    before the non-blocking copy. Not the expansion, which runs on the device."""
    from pipeline.cache.packed import ArenaPool

    pool = ArenaPool(pin=True) if cuda else None
    started, batches, rows = time.perf_counter(), 0, 0
    for packed in reader.packed_batches(batch_size, seed, 0):
        if pool is not None:
            packed.into_arena(pool)
            packed.release()
        batches, rows = batches + 1, rows + packed.rows
        if batches == count:
            break
    seconds = time.perf_counter() - started
    return rows / seconds, batches / seconds


def loader_against_trainer(stage1: Stage1, device: str, steps: int, root: Path) -> dict:
    """The reader's host side, and trainer steps/s from the cache (0, 1, 2, 4 workers) against
    the same steps on batches already on the device."""
    from dataclasses import replace

    import torch

    from distill.trainer import CachedTeacher, Trainer
    from pipeline.cache.layer_map import cached_layers
    from pipeline.cache.reader import open_cache

    hidden, attention = cached_layers(stage1.mapped)
    reader = open_cache(stage1.cache_dir, hidden, attention)
    base = replace(stage1.config, epochs=1, max_steps=0, checkpoint_every=0, log_every=0, device=device,
                   progress=False)
    steps = min(steps, reader.num_batches(base.batch_size))
    torch_device = torch.device(device)
    host_examples, host_batches = reader_host_side(reader, base.batch_size, base.seed, steps,
                                                   torch_device.type == "cuda")

    def steps_per_s(source, workers: int, teacher) -> float:
        # batches already on the device are neither read ahead nor pinned
        config = replace(base, max_steps=steps, num_workers=workers, epochs=1,
                         prefetch=0 if isinstance(source, OnDevice) else base.prefetch)
        trainer = Trainer(config, stage1.student(), source, teacher,
                          root / f"loader-{workers}-{id(source)}",
                          list(zip(range(1, len(stage1.mapped) + 1), stage1.mapped)),
                          int(stage1.info.get("hidden_size", stage1.teacher_config.hidden_size)), tensorboard=False)
        result = trainer.train()
        return result.steps / result.seconds

    on_device = OnDevice(reader, base.batch_size, base.seed, steps, torch_device)
    ceiling = steps_per_s(on_device, 0, CachedTeacher(reader.parts(torch_device)))
    rows = []
    for workers in WORKER_COUNTS:
        rate = steps_per_s(reader, workers, CachedTeacher(reader.parts(torch_device)))
        rows.append({"workers": workers, "steps_per_s": round(rate, 2), "of_on_device": round(rate / ceiling, 3)})
    enough = next((r["workers"] for r in rows if r["of_on_device"] >= STARVING_BELOW), None)
    return {"reader_host_examples_per_s": round(host_examples, 1), "reader_host_batches_per_s": round(host_batches, 2),
            "on_device_steps_per_s": round(ceiling, 2),
            "on_device_examples_per_s": round(ceiling * on_device.num_examples / len(on_device.batch_list), 1),
            "from_cache": rows, "workers_not_starving": enough, "steps": steps, "batch_size": base.batch_size}


def measure_bounds(stage1: Stage1, device: str, autocast: bool, steps: int) -> dict:
    """The plain-PyTorch bounds (scripts/gpu_bounds.py) on the cache's first batches: ``steps``
    at the trainer's batch size, as many at the writer's forward batch size."""
    import torch

    from pipeline.cache.reader import open_cache
    from scripts.gpu_bounds import plain_bounds

    torch_device = torch.device(device)
    tokens = open_cache(stage1.cache_dir, with_teacher=False)

    def pairs(batch_size: int) -> list:
        count = min(steps, tokens.num_batches(batch_size))
        return [(b["input_ids"], b["attention_mask"])
                for b in device_batches(tokens, batch_size, stage1.config.seed, count, torch_device)]

    return plain_bounds(stage1.teacher_config, stage1.student().config, stage1.mapped,
                        pairs(stage1.config.batch_size), pairs(stage1.forward_batch_size), torch_device,
                        autocast)


def ratios(report: dict, cuda: bool) -> dict:
    """Each figure over its bound, with issue 27's goal and, on CUDA, whether it is met."""
    bounds, epoch, loader = report["bounds"], report["cache_vs_online"], report["loader"]

    def judged(value: float | None, bound: float, goal: float | None) -> dict:
        ratio = round(value / bound, 3) if value is not None and bound else None
        met = ratio >= goal if cuda and goal is not None and ratio is not None else None
        return {"value": value, "bound": bound, "ratio": ratio, "goal": goal, "met": met}

    writer = judged(report["writer_examples_per_s"], bounds["teacher_forward_examples_per_s"], GOALS["writer"])
    if writer["met"] is not None:
        writer["met"] = writer["met"] and writer["value"] >= WRITER_GOAL_EXAMPLES_PER_S
    best = max(r["of_on_device"] for r in loader["from_cache"])
    return {
        "epoch": {**judged(epoch["online_over_cache"], bounds["online_over_cache"], None),
                  "flop_bound": epoch["flop_bound"], "goal": GOALS["epoch"],
                  "met": epoch["online_over_cache"] >= GOALS["epoch"] if cuda else None},
        "writer": {**writer, "goal_examples_per_s": WRITER_GOAL_EXAMPLES_PER_S},
        "reader": judged(loader["reader_host_examples_per_s"], bounds["student_step_examples_per_s"], None),
        "trainer": judged(loader["on_device_examples_per_s"], bounds["student_step_examples_per_s"], GOALS["trainer"]),
        "from_cache": {"ratios": {r["workers"]: r["of_on_device"] for r in loader["from_cache"]}, "best": best,
                       "goal": GOALS["from_cache"], "met": best >= GOALS["from_cache"] if cuda else None},
    }


def under_the_launcher(stage1: Stage1, devices: list[str], steps: int, root: Path) -> dict:
    """The stage-1 trainer on len(devices) ranks (elastic launcher) against one process."""
    from dataclasses import replace

    from distill.launch import choose_backend, run_ranks, write_job
    from distill.run import distill_from_cache

    config = replace(stage1.config, max_steps=steps, checkpoint_every=0, log_every=1, progress=False)
    single = distill_from_cache(stage1.cache_dir, root / "one", replace(config, device=devices[0]), stage1.spec,
                                layer_strategy=stage1.strategy, explicit_layers=stage1.explicit)
    job = write_job(root / "launch.json", stage1.cache_dir, root / "ranks", config, stage1.spec, devices=devices,
                    backend=choose_backend("auto", devices), timeout_s=600,
                    num_threads=1 if devices[0] == "cpu" else 0, layer_strategy=stage1.strategy,
                    explicit_layers=list(stage1.explicit))
    started = time.perf_counter()
    run_ranks(job, len(devices))
    wall = time.perf_counter() - started
    ranks = json.loads((root / "ranks" / "metrics.json").read_text())

    def losses(out):
        return [json.loads(l)["total"] for l in (out / "metrics.jsonl").read_text().splitlines()
                if '"eval"' not in l]

    a, b = losses(root / "one"), losses(root / "ranks")
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
    return {"nproc": len(devices), "devices": devices, "steps": steps,
            "one_process_train_s": single["train_seconds"], "ranks_train_s": ranks["train_seconds"],
            "ranks_wall_s": round(wall, 2), "max_relative_loss_difference": worst,
            "note": "per-step losses agree to float noise only without dropout and amp (each rank "
                    "draws its own dropout masks); tests/test_distributed.py checks a dropout-free student"}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print(f"gpu_check: no CUDA device is visible (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); this check needs a GPU -- --cpu-dry-run runs its "
              "code path on the CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        installed = ensure_importable(Path(args.kit))   # Luigi, from the kit's wheels if missing
        if args.profile == "paper":
            paper_kit(args)   # before anything is written
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tinykd-gpu-check-")).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        profile = configure(args, workdir)
    except KitError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    profile["wheels_installed"] = installed
    began = time.perf_counter()
    target, stages = run_dag(cuda)
    stage1 = Stage1(target.requires()["stage1"], target.upstream_dir("cache"))
    device = "cuda:0" if cuda else "cpu"
    scratch = workdir / "gpu-check"
    report = {"cuda": cuda, "devices": torch.cuda.device_count() if cuda else 0,
              "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
              "profile": profile, "batch_size": stage1.config.batch_size,
              "forward_batch_size": stage1.forward_batch_size, "compile": stage1.config.compile,
              "stages": stages, "writer_examples_per_s": writer_rate(stages)}
    report["cache_vs_online"] = cache_vs_online(stage1, device, scratch / "epoch")
    report["loader"] = loader_against_trainer(stage1, device, args.steps, scratch / "loader")
    report["bounds"] = measure_bounds(stage1, device, autocast=cuda, steps=args.steps)
    report["ratios"] = ratios(report, cuda)
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else ["cpu", "cpu"]
    report["launcher"] = under_the_launcher(stage1, devices, min(args.steps, 20), scratch / "launcher")
    dev = json.loads((target.output_dir() / "manifest.json").read_text())["info"].get("dev_metrics") or {}
    report["dev"] = {"metric": dev.get("primary_metric"), "gpu": dev.get("primary"), "cpu": args.cpu_reference,
                     "difference": (dev.get("primary") - args.cpu_reference)
                     if dev.get("primary") is not None and args.cpu_reference is not None else None}
    report["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps({"gpu_check": report}, sort_keys=True))
    print(human(report))
    return 0


def goal_text(goal: float | None, met: bool | None, extra: str = "") -> str:
    """``goal >= 1.5x: met`` on CUDA; ``goal on a GPU >= 1.5x`` on the dry run."""
    if goal is None:
        return ""
    if met is None:
        return f"; goal on a GPU >= {goal}x{extra}"
    return f"; goal >= {goal}x{extra}: {'met' if met else 'NOT met'}"


def human(report: dict) -> str:
    where = report["gpu"] or "CPU dry run (no GPU figures)"
    p = report["profile"]
    if p["name"] == "paper":
        what = (f"paper profile: teacher {p['teacher']} -> student {p['student']}; {p['task']}, "
                f"{p['train']} train rows x (1 + {p['aug']}); batch {report['batch_size']}, "
                f"forward batch {report['forward_batch_size']}")
    else:
        what = f"demo profile: batch {report['batch_size']}, forward batch {report['forward_batch_size']}"
    lines = [f"gpu_check ({what}{', compiled' if report['compile'] else ''}) on {where}, "
             f"torch {report['torch']}, {report['seconds']} s"]
    for s in report["stages"]:
        memory = f", peak {s['peak_gpu_mib']} MiB" if s["peak_gpu_mib"] is not None else ""
        rate = f", {s['examples_per_s']} examples/s" if s["examples_per_s"] else ""
        lines.append(f"  {s['stage']}: {s['seconds']} s{rate}{memory}")
    b, r, l = report["bounds"], report["ratios"], report["loader"]
    lines.append(f"plain PyTorch ({b['arithmetic']}, the cache's first {b['steps']} batches, mean width "
                 f"{b['mean_width']}): bare teacher forward {b['teacher_forward_examples_per_s']:.0f} examples/s "
                 f"(batch {b['forward_batch_size']}), student step {b['student_step_examples_per_s']:.0f}, live "
                 f"teacher + step {b['online_step_examples_per_s']:.0f} (batch {b['batch_size']})")
    c, e = report["cache_vs_online"], r["epoch"]
    lines.append(f"stage-1 epoch: cache {c['cache_epoch_s']} s, online teacher {c['online_epoch_s']} s: "
                 f"{c['online_over_cache']}x; plain PyTorch {e['bound']}x ({e['ratio']}x of it); FLOP bound "
                 f"{c['flop_bound']}x" + goal_text(e["goal"], e["met"]))
    w = r["writer"]
    lines.append(f"writer: TeacherCacheShard {w['value']} examples/s = {w['ratio']}x of the bare forward"
                 + goal_text(w["goal"], w["met"], f" and >= {w['goal_examples_per_s']} examples/s")
                 if w["value"] is not None else
                 "writer: not measured (every TeacherCacheShard was complete already: use a fresh --workdir)")
    lines.append(f"reader (host side: packed batches): {r['reader']['value']:.0f} examples/s "
                 f"({l['reader_host_batches_per_s']} batches/s) = {r['reader']['ratio']}x of the plain step "
                 "(1x feeds it)")
    t = r["trainer"]
    lines.append(f"trainer on batches on the device: {l['on_device_steps_per_s']} steps/s = {t['value']:.0f} "
                 f"examples/s = {t['ratio']}x of the plain loop" + goal_text(t["goal"], t["met"]))
    for row in l["from_cache"]:
        lines.append(f"  from the cache, {row['workers']} DataLoader workers: {row['steps_per_s']} steps/s "
                     f"({row['of_on_device']}x of on-device)")
    f = r["from_cache"]
    lines.append((f"  the loader stops starving the trainer at: {l['workers_not_starving']} workers"
                  if l["workers_not_starving"] is not None else
                  f"  the loader starves the trainer at every worker count tried "
                  f"({', '.join(map(str, WORKER_COUNTS))})")
                 + goal_text(f["goal"], f["met"], " with <= 4 workers"))
    r = report["launcher"]
    lines.append(f"launcher: {r['nproc']} ranks on {','.join(r['devices'])}: {r['ranks_train_s']} s train "
                 f"({r['ranks_wall_s']} s wall) vs one process {r['one_process_train_s']} s; losses "
                 f"differ by at most {r['max_relative_loss_difference']:.2e} (relative; {r['note']})")
    d = report["dev"]
    lines.append(f"student dev {d['metric']}: {d['gpu']} here, CPU run "
                 f"{d['cpu'] if d['cpu'] is not None else 'not given'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
