"""The distillation training loop: cached (or live) teacher tensors in, a student out.

The loop never sees where the teacher's tensors come from. It draws Batch dicts
(docs/DESIGN.md) from a *batch source* and hands each to a *teacher provider*:

* :class:`CachedTeacher` passes the cache reader's tensors through (task distillation reads
  the Parquet cache only: no teacher forward);
* :class:`OnlineTeacher` runs the teacher live with
  :func:`pipeline.common.encoder_outputs.forward_internals` + ``zero_padding`` -- the very functions
  the cache writer used -- so the parity test of cache against online is one flag.

The student's own internals come from the same ``forward_internals`` (the score-capture hooks
keep the gradient; ``attention_target`` says whether the attention loss compares pre-softmax
scores or attention log-probabilities, and must be the cache's), the losses from :mod:`distill.losses`, each logged separately.

**Resume.** Every ``checkpoint_every`` steps the full state is written atomically to
``<out>/checkpoints/last.pt``: student, projections, optimizer, scheduler, the RNG states
(torch, CUDA, numpy, random), the data position (epoch, batch within it), the training time
so far and the length of ``metrics.jsonl``. An epoch's order is a pure function of (seed,
epoch), so a run killed at any point and restarted from that file replays exactly the steps
an uninterrupted run takes.

**Checkpoints are data, not code.** The file holds only tensors, numbers and strings: RNG
states as tensors, counters and the best-so-far record as one JSON string. It is read with
``torch.load(weights_only=True)``, so a planted pickle in a workdir cannot run as the user;
a checkpoint that cannot be read that way (corrupt, truncated, foreign) is discarded with a
warning naming it, and training starts over, rather than failing every rerun.

**Failure.** A non-finite loss stops the run naming the step and the loss terms; the last
checkpoint (written only after finite steps) stays in place for inspection or a retry.

**Several ranks.** Inside a torch.distributed process group (:mod:`distill.launch`) the loop
is data-parallel (:mod:`distill.distributed`): every rank reads the same global batch, keeps
its rows, and steps a DistributedDataParallel copy; the logged losses are the global batch's.
Rank 0 alone writes checkpoints (the same format: a 2-rank checkpoint resumes on 1 rank and
the other way round), ``metrics.jsonl`` and TensorBoard, and evaluates on dev while the others
wait at a barrier.

**TensorBoard.** Rank 0 writes every ``metrics.jsonl`` record as scalars into ``<out>/tb``
(:func:`tensorboard_scalars`: ``loss/<term>``, ``train/lr``, ``train/grad_norm``,
``train/examples_per_s``, ``train/loader_wait_share``, ``dev/<metric>``). A resumed run purges
the steps the killed one logged after its checkpoint, so the files read back as one run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from distill.data import Batch, DeviceFeeder, Prefetcher, num_batches, staged_for, to_device
from pipeline.cache.packed import ArenaPool
from distill.distributed import (DistillStep, World, current_world, global_values, loss_shares,
                                 rank_seed, slice_batch)
from distill.losses import (ATTENTION_MODES, PROJECTION_MODES, HiddenProjections, hinton_kd,
                            intermediate_losses, regression_loss, soft_cross_entropy)
from pipeline.common.encoder_outputs import forward_internals, zero_padding
from pipeline.common.encoders import capture_scores, family_of

LOSS_NAMES = ("embedding", "attention", "hidden", "prediction")
PREDICTION_LOSSES = ("soft_ce", "kd")
SCHEDULES = ("constant", "linear")
CHECKPOINT_NAME = "last.pt"
#: TensorBoard event files of the run, inside the stage output.
TENSORBOARD_DIR = "tb"
#: 2: weights_only-loadable (RNG states as tensors, counters and records as JSON).
CHECKPOINT_FORMAT = 2
LOG = logging.getLogger("tinykd.distill")
#: On CPU, a background reader thread gets a core of its own only above this many cores.
READER_THREAD_MIN_CORES = 2


class NonFiniteLoss(RuntimeError):
    """Raised when a loss is NaN/inf; names the step, the loss terms and the last checkpoint."""


@dataclass
class TrainConfig:
    """Every setting of a distillation run (stage recipes: :func:`recipe`)."""

    # loss weights; a term with weight 0 is not computed
    embedding_weight: float = 1.0
    attention_weight: float = 1.0
    hidden_weight: float = 1.0
    prediction_weight: float = 0.0
    attention_mode: str = "reference"
    attention_target: str = "scores"     # or "log_probs" (pipeline.common.encoder_outputs)
    projection_mode: str = "shared"
    prediction_loss: str = "soft_ce"     # regression tasks always use MSE to the teacher
    temperature: float = 1.0
    kd_alpha: float = 0.5                # only for prediction_loss="kd"
    # optimisation
    learning_rate: float = 5e-5
    epochs: int = 10
    max_steps: int = 0                   # > 0: stop after this many steps
    batch_size: int = 32
    schedule: str = "constant"
    warmup_proportion: float = 0.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    # bookkeeping (do not change results)
    eval_every: int = 0                  # steps; 0 = only at the end
    checkpoint_every: int = 500
    log_every: int = 50
    device: str = "auto"
    amp: bool = False                    # CUDA only: bf16 autocast
    prefetch: int = 4                    # batches a background thread reads ahead (0: none)
    num_workers: int = 0                 # > 0: DataLoader worker processes (sources with .dataset)
    num_threads: int = 0                 # CPU intra-op threads; 0 = torch default
    compile: bool = False                # torch.compile the student's forward and the losses
    progress: bool = False               # a tqdm bar on stderr: steps, loss, ETA (and dev metric)

    def validate(self) -> None:
        from pipeline.common.encoders import ATTENTION_TARGETS

        if self.attention_target not in ATTENTION_TARGETS:
            raise ValueError(f"attention_target {self.attention_target!r} not in {ATTENTION_TARGETS}")
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode {self.attention_mode!r} not in {ATTENTION_MODES}")
        if self.projection_mode not in PROJECTION_MODES:
            raise ValueError(f"projection_mode {self.projection_mode!r} not in {PROJECTION_MODES}")
        if self.prediction_loss not in PREDICTION_LOSSES:
            raise ValueError(f"prediction_loss {self.prediction_loss!r} not in {PREDICTION_LOSSES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} not in {SCHEDULES}")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError("kd_alpha must be within [0, 1]")
        if self.batch_size < 1 or (self.epochs < 1 and self.max_steps < 1):
            raise ValueError("batch_size and epochs (or max_steps) must be positive")

    @property
    def uses_intermediate(self) -> bool:
        return any(w > 0 for w in (self.embedding_weight, self.attention_weight, self.hidden_weight))

    @property
    def uses_prediction(self) -> bool:
        return self.prediction_weight > 0


def recipe(stage: str, **overrides) -> TrainConfig:
    """The default recipes (docs/ALGORITHM.md §2.8). ``intermediate``: stage 1 (and general
    distillation), lr 5e-5 constant, 10 epochs; ``prediction``: stage 2, lr 3e-5, 3 epochs, 10 %
    linear warm-up then decay."""
    from distill.recipes import RECIPES

    if stage not in RECIPES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(RECIPES)}")
    base = dict(RECIPES[stage])
    base.update(overrides)
    config = TrainConfig(**base)
    config.validate()
    return config


# --- teacher providers ---------------------------------------------------------------------
class CachedTeacher:
    """Teacher tensors come with the batch (the cache reader filled them in).

    A compact cache leaves out what it can recompute exactly (layer 0, the scores of long
    rows): ``parts`` (:meth:`pipeline.cache.reader.CacheReader.parts`) recompute them here, on
    the training device, before the losses see the batch.
    """

    online = False

    def __init__(self, parts=None):
        self.parts = parts

    def __call__(self, batch: Batch) -> Batch:
        from pipeline.cache.compact import complete_batch

        missing = [k for k in ("teacher_logits", "teacher_hidden", "teacher_scores") if k not in batch]
        if missing:
            raise KeyError(f"batch has no {missing}: read the cache with teacher outputs")
        return complete_batch(batch, self.parts)


class OnlineTeacher:
    """Run the teacher live on each batch, producing exactly the cached tensors' form."""

    online = True

    def __init__(self, model: torch.nn.Module, hidden_layers: Sequence[int],
                 attention_layers: Sequence[int], with_logits: bool = True,
                 attention_target: str = "scores"):
        from pipeline.cache.compact import TeacherParts

        self.model = model.eval()
        self.hidden_layers = list(hidden_layers)
        self.attention_layers = list(attention_layers)
        self.with_logits = with_logits
        self.attention_target = attention_target
        # Layer 0 comes from the teacher's embedding module, as a compact cache recomputes it
        # (families whose embedding output the parts cannot rebuild keep the forward's own).
        self.parts = TeacherParts.from_model(model, []) if TeacherParts.supports(model) else None

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Batch:
        internals = forward_internals(self.model, batch["input_ids"], batch["token_type_ids"],
                                      batch["attention_mask"],
                                      [l for l in self.hidden_layers if l != 0 or self.parts is None],
                                      self.attention_layers, with_logits=self.with_logits,
                                      attention_target=self.attention_target)
        hidden, scores = dict(internals.hidden), dict(internals.scores)
        if 0 in self.hidden_layers and self.parts is not None:
            hidden[0] = self.parts.embed(batch["input_ids"], batch["token_type_ids"])
        zero_padding(hidden, scores, batch["attention_mask"])
        out = dict(batch)
        if internals.logits is not None:
            out["teacher_logits"] = internals.logits.float()
        out["teacher_hidden"] = {k: v.float() for k, v in hidden.items()}
        out["teacher_scores"] = {k: v.float() for k, v in scores.items()}
        return out


# --- the loop -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int
    step_losses: list[dict] = field(default_factory=list)   # this process's steps only
    best: dict | None = None
    final_eval: dict | None = None
    data_wait_share: float = 0.0          # time waiting for batches / training time
    startup_wait_share: float = 0.0       # part of it spent on each epoch's first batch
    seconds: float = 0.0                  # training time, summed over resumes
    resumed_from: int | None = None
    threads: int = 0                      # torch intra-op threads used


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _rng_state() -> dict:
    """Every RNG state as tensors and JSON strings (loadable with ``weights_only=True``)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
             "numpy": json.dumps([kind, int(position), int(has_gauss), float(cached_gaussian)]),
             "python": json.dumps([version, list(internal), gauss])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, position, has_gauss, cached_gaussian = json.loads(state["numpy"])
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_json(value: Any) -> Any:
    """``value`` as plain JSON types (numpy scalars become Python numbers): a record that went
    through a checkpoint and one that did not must be the same values of the same types."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _parameter_groups(modules: Sequence[torch.nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and layer-norm weights (as BERT's recipe).

    Layer norms are found by type as well as by BERT's ``LayerNorm`` name: other families name
    them ``norm``, ``sa_layer_norm``, ``final_norm``..."""
    decay, no_decay = [], []
    for module in modules:
        norm_params = {id(p) for m in module.modules() if isinstance(m, torch.nn.LayerNorm)
                       for p in m.parameters(recurse=False)}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            exempt = name.endswith("bias") or "LayerNorm" in name or id(param) in norm_params
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = int(config.warmup_proportion * total_steps)
    if config.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _atomic_torch_save(value: Any, path: Path) -> None:
    """``torch.save`` to a per-process temporary name, then rename; on failure (a full disk:
    torch reports it as a bare RuntimeError) remove the temporary file and name the target."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Through a file object: given a path, torch names the archive inside after the file,
        # and a per-process temporary name would make equal states differ in bytes.
        with open(tmp, "wb") as handle:
            torch.save(value, handle)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path}: writing the checkpoint failed (is the disk full?): {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Trainer:
    """One distillation run into ``out_dir`` (normally the stage's partial directory).

    ``layer_pairs`` maps student layers 1..M to teacher layers (``pipeline.cache.layer_map``);
    ``evaluate`` (optional) is called with the student and returns a metrics dict holding
    ``primary``; ``on_best`` is called with the student when ``primary`` improves.
    """

    def __init__(self, config: TrainConfig, student: torch.nn.Module, source, teacher: Callable,
                 out_dir: Path, layer_pairs: Sequence[tuple[int, int]], teacher_hidden_size: int,
                 task_type: str = "classification", evaluate: Callable | None = None,
                 on_best: Callable | None = None, projections: HiddenProjections | None = None,
                 world: World | None = None, tensorboard: bool = True):
        config.validate()
        self.config = config
        self.world = world or current_world()
        if self.world.distributed and config.batch_size % self.world.size:
            raise ValueError(f"batch size {config.batch_size} does not split evenly over "
                             f"{self.world.size} ranks")
        self.device = resolve_device(config.device)
        self.tensorboard = tensorboard
        self.student = student.to(self.device)
        self.source = source
        self.teacher = teacher
        self.out_dir = Path(out_dir)
        self.layer_pairs = [(int(s), int(t)) for s, t in layer_pairs]
        self.task_type = task_type
        self.evaluate_fn = evaluate
        self.on_best = on_best
        student_layers = [0] + [s for s, _ in self.layer_pairs]
        if projections is None and config.uses_intermediate:
            projections = HiddenProjections(student.config.hidden_size, teacher_hidden_size,
                                            student_layers, config.projection_mode)
        self.projections = projections.to(self.device) if projections is not None else None
        self.student_hidden_layers = student_layers if config.uses_intermediate else []
        self.student_attention_layers = ([s for s, _ in self.layer_pairs]
                                         if config.uses_intermediate and config.attention_weight > 0 else [])
        self._captured = None    # the student's score hooks' dict while training
        self._compiled = None    # compute_losses compiled, while training with compile = true
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.tb_dir = self.out_dir / TENSORBOARD_DIR
        self.batches_per_epoch = num_batches(source.num_examples, config.batch_size)
        self.total_steps = self.batches_per_epoch * config.epochs
        if config.max_steps > 0:
            self.total_steps = min(self.total_steps, config.max_steps) if config.epochs > 0 else config.max_steps

    # -- state --------------------------------------------------------------------------
    def _modules(self) -> list[torch.nn.Module]:
        return [self.student] + ([self.projections] if self.projections is not None else [])

    def _save_checkpoint(self, step: int, epoch: int, batch_in_epoch: int, best: dict | None,
                         train_seconds: float) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        metrics_bytes = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        meta = {"format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "best": best, "metrics_bytes": metrics_bytes,
                "config": asdict(self.config), "total_steps": self.total_steps,
                "train_seconds": train_seconds}
        state = {
            "meta": json.dumps(plain_json(meta), sort_keys=True),
            "student": self.student.state_dict(),
            "projections": self.projections.state_dict() if self.projections is not None else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
        }
        _atomic_torch_save(state, self.checkpoint_dir / CHECKPOINT_NAME)

    def _read_checkpoint(self, path: Path) -> tuple[dict, dict] | None:
        """``(state, meta)`` of a checkpoint, or None (with a warning) if it cannot be read as
        data: never unpickle code from the workdir."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            meta = json.loads(state["meta"])
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"checkpoint format {meta.get('format')}, expected {CHECKPOINT_FORMAT}")
            return state, meta
        except Exception as exc:  # noqa: BLE001 - any unreadable file is discarded the same way
            if not self.world.main:
                return None   # rank 0 has discarded it (and said so)
            message = (f"{path}: unreadable checkpoint discarded, training this stage starts over "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            LOG.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            path.unlink(missing_ok=True)
            return None

    def _load_checkpoint(self) -> dict | None:
        """The last checkpoint's counters, its state loaded into the modules (or None).

        With several ranks, rank 0 reads first (discarding an unreadable file, truncating the
        log); the others read the same file after it, and all must agree on the step."""
        if not self.world.distributed:
            return self._load_checkpoint_here()
        import torch.distributed as dist

        meta = self._load_checkpoint_here() if self.world.main else None
        dist.barrier()
        if not self.world.main:
            meta = self._load_checkpoint_here()
        steps = torch.tensor([meta["step"] if meta is not None else -1], dtype=torch.float64,
                             device=self.device)
        lowest, highest = steps.clone(), steps.clone()
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)
        if lowest.item() != highest.item():
            raise RuntimeError(f"ranks resumed from different checkpoints (steps {int(lowest.item())}"
                               f" and {int(highest.item())}): {self.checkpoint_dir} changed during "
                               "the start")
        return meta

    def _load_checkpoint_here(self) -> dict | None:
        path = self.checkpoint_dir / CHECKPOINT_NAME
        loaded = self._read_checkpoint(path) if path.exists() else None
        if loaded is None:
            # no (readable) checkpoint: start over, log included
            if self.world.main and self.metrics_path.exists():
                self.metrics_path.unlink()
            return None
        state, meta = loaded
        if meta["total_steps"] != self.total_steps:
            raise ValueError(f"{path}: checkpoint of a run with {meta['total_steps']} steps, this run "
                             f"has {self.total_steps}; settings differ, remove it to start over")
        self.student.load_state_dict(state["student"])
        if self.projections is not None:
            self.projections.load_state_dict(state["projections"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        # drop log lines written after the checkpoint: they will be written again
        if self.world.main and self.metrics_path.exists():
            with open(self.metrics_path, "r+b") as handle:
                handle.truncate(meta["metrics_bytes"])
        return meta

    def _log(self, record: dict) -> None:
        """One metrics.jsonl line and the same values as TensorBoard scalars (rank 0 only)."""
        if not self.world.main:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for tag, value in tensorboard_scalars(record).items():
                self._tb.add_scalar(tag, value, record["step"])

    # -- one step -----------------------------------------------------------------------
    def compute_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Unweighted loss terms for one batch (teacher tensors already in the batch)."""
        config = self.config
        mask = batch["attention_mask"]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                  enabled=config.amp and self.device.type == "cuda")
        with autocast:
            internals = forward_internals(self.student, batch["input_ids"], batch["token_type_ids"], mask,
                                          self.student_hidden_layers, self.student_attention_layers,
                                          attention_target=config.attention_target,
                                          captured=self._captured)
        losses: dict[str, torch.Tensor] = {}
        if config.uses_intermediate:
            losses.update(intermediate_losses(
                internals.hidden, internals.scores, batch["teacher_hidden"],
                batch.get("teacher_scores", {}), self.layer_pairs, mask, self.projections,
                config.attention_mode, with_attention=bool(self.student_attention_layers)))
        if config.uses_prediction:
            logits, teacher_logits = internals.logits, batch["teacher_logits"]
            if self.task_type == "regression":
                losses["prediction"] = regression_loss(logits, teacher_logits)
            elif config.prediction_loss == "kd":
                losses["prediction"] = hinton_kd(logits, teacher_logits, batch["labels"],
                                                 config.temperature, config.kd_alpha)
            else:
                losses["prediction"] = soft_cross_entropy(logits, teacher_logits, config.temperature)
        return losses

    def batch_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """:meth:`compute_losses`, compiled when the run asked for it (``compile = true``)."""
        return (self._compiled or self.compute_losses)(batch)

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = {"embedding": self.config.embedding_weight, "attention": self.config.attention_weight,
                   "hidden": self.config.hidden_weight, "prediction": self.config.prediction_weight}
        return sum(weights[name] * value for name, value in losses.items() if weights[name] > 0)

    # -- the run ------------------------------------------------------------------------
    def train(self) -> TrainResult:
        config = self.config
        threads_before = torch.get_num_threads()
        self.read_ahead = config.prefetch > 0
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        elif self.device.type == "cpu" and config.prefetch > 0 and config.num_workers == 0:
            if threads_before > READER_THREAD_MIN_CORES:
                # Leave one core to the reader thread: its padding work would otherwise fight
                # the intra-op threads for the cores.
                torch.set_num_threads(threads_before - 1)
            else:
                # Too few cores to give one away: every core to the step, the batch read
                # between steps (measured on 2 cores: stage-1 epochs 1.5x faster than one
                # thread + a reader thread; reading is ~2% of such a step).
                self.read_ahead = False
        self._bar = None
        self._tb = None
        self._ddp = None
        self._pinned = None   # reused pinned buffers for packed batches (CUDA)
        # The student's score-capture hooks stay installed for the whole run (not installed and
        # removed every step): less Python per step, and a compiled step sees one module.
        capture = contextlib.nullcontext()
        if self.student_attention_layers and family_of(self.student).exposes_scores:
            capture = capture_scores(self.student, self.student_attention_layers)
        try:
            with capture as captured:
                self._captured = captured
                self._compiled = torch.compile(self.compute_losses, dynamic=True) if config.compile else None
                return self._train()
        finally:
            # no reference from the trainer to itself outlives the run (a bound method would)
            self._captured = self._compiled = None
            torch.set_num_threads(threads_before)
            if self._bar is not None:
                self._bar.close()
            if self._tb is not None:
                self._tb.close()

    def _progress_bar(self, step: int):
        """A tqdm bar over the run's steps (a resumed run starts where it left off), or None."""
        if not self.config.progress or not self.world.main:
            return None
        from tqdm.auto import tqdm

        stage = "prediction" if self.config.uses_prediction else "intermediate"
        return tqdm(total=self.total_steps, initial=step, unit="step", desc=f"distill ({stage})",
                    smoothing=0.1, mininterval=1.0)

    def _train(self) -> TrainResult:
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _seed_everything(config.seed)
        # fused: one kernel over all parameters (the 30k-row embedding makes the update a
        # sizeable share of a small student's step)
        self.optimizer = torch.optim.AdamW(_parameter_groups(self._modules(), config.weight_decay),
                                           lr=config.learning_rate,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = _make_scheduler(self.optimizer, config, self.total_steps)
        state = self._load_checkpoint()
        step, epoch, batch_in_epoch, best, seconds_before = 0, 0, 0, None, 0.0
        if state is not None:
            step, epoch, batch_in_epoch, best = (state["step"], state["epoch"], state["batch_in_epoch"],
                                                 state["best"])
            seconds_before = float(state.get("train_seconds", 0.0))
        world = self.world
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            if world.rank > 0:   # its own dropout masks (rank 0 keeps the single-process stream)
                torch.manual_seed(rank_seed(config.seed, world.rank, step))
            # The classifier head gets no gradient in stage 1: find_unused_parameters leaves its
            # .grad None (as in one process), so AdamW skips it on every rank alike.
            self._ddp = DistributedDataParallel(
                DistillStep(self), device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        if world.main and self.tensorboard:
            self._tb = self._tensorboard_writer(resumed_step=step if state is not None else None)
        result = TrainResult(steps=step, best=best, resumed_from=step if state is not None else None,
                             threads=torch.get_num_threads())
        last_checkpoint = step if state is not None else None
        for module in self._modules():
            module.train()
        started = time.perf_counter()
        wait_seconds = startup_wait = 0.0
        params = [p for m in self._modules() for p in m.parameters() if p.requires_grad]
        bar = self._bar = self._progress_bar(step)
        window = {"start": time.perf_counter(), "wait": 0.0, "examples": 0}   # since the last log line
        # Steps whose loss values are still on the device: read back (one sync) and checked at
        # the next log, evaluation or checkpoint step, or the run's end.
        pending: list[tuple[dict, Any]] = []

        def flush() -> None:
            """Read back every pending step's loss terms at once, check they are finite, record them."""
            nonlocal window
            if not pending:
                return
            rows = torch.stack([values for _, values in pending]).tolist()   # the one host sync
            for (meta, _), row in zip(pending, rows):
                values = dict(zip(meta.pop("names"), row))
                if not all(math.isfinite(v) for k, v in values.items() if k != "grad_norm"):
                    where = (f"last good checkpoint: step {last_checkpoint}, "
                             f"{self.checkpoint_dir / CHECKPOINT_NAME}" if last_checkpoint is not None
                             else "no checkpoint written yet")
                    pending.clear()
                    raise NonFiniteLoss(f"non-finite loss at step {meta['step']} (epoch {meta['epoch']}, "
                                        f"batch {meta['batch']}, ids {meta['ids']}...): "
                                        f"{json.dumps(values)}; {where}")
                values.update(step=meta["step"], epoch=meta["epoch"], lr=meta["lr"])
                result.step_losses.append(values)
            pending.clear()
            values = result.step_losses[-1]
            if bar is not None:
                # the split the kept student is chosen on: held-out train rows or dev
                chosen_on = "held-out" if best and best["metrics"].get("selection") == "holdout" else "dev"
                bar.set_postfix_str(f"loss={values['total']:.4f}" + (
                    f" best {chosen_on} {best['metrics']['primary_metric']}="
                    f"{best['metrics']['primary']:.4f}" if best else ""), refresh=False)

        while step < self.total_steps:
            if batch_in_epoch >= self.batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            feeder = self._epoch_batches(epoch, batch_in_epoch)
            first_of_epoch = True
            try:
                while step < self.total_steps:
                    step_start = time.perf_counter()
                    try:
                        batch = next(feeder)   # on the device (a packed batch is expanded there)
                    except StopIteration:
                        batch_in_epoch = self.batches_per_epoch
                        break
                    waited = time.perf_counter() - step_start
                    wait_seconds += waited
                    window["wait"] += waited
                    window["examples"] += int(batch.get("batch_rows", batch["input_ids"].shape[0]))
                    if first_of_epoch:   # the reader plans the epoch before its first batch
                        startup_wait += waited
                        first_of_epoch = False
                    ids = batch["ids"][:3]
                    if self._ddp is not None:
                        # this rank's rows of the global batch; its terms weighted by its share
                        # of each term's count, times the ranks DDP's gradient average divides by
                        if "rank_rows" in batch:   # the reader gathered this rank's rows only
                            owned = batch.pop("rank_rows")
                            batch.pop("batch_rows")
                        else:
                            batch, owned = slice_batch(batch, world)
                        batch = self.teacher(batch)
                        losses = self._ddp(batch)
                        shares = loss_shares(batch, owned, losses, config.attention_mode)
                        total = self.weighted_total({name: value * shares[name] * world.size
                                                     for name, value in losses.items()})
                        global_terms = global_values(losses, shares)
                        names = list(global_terms) + ["total"]
                        terms = torch.tensor([*global_terms.values(), float(self.weighted_total(global_terms))],
                                             dtype=torch.float64)
                    else:
                        batch = self.teacher(batch)
                        losses = self.batch_losses(batch)
                        total = self.weighted_total(losses)
                        names = list(losses) + ["total"]
                        terms = torch.stack([value.detach().float() for value in losses.values()]
                                            + [total.detach().float()])
                    del batch   # its tensors are freed once the backward pass is done with them
                    self.optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    if config.max_grad_norm > 0:
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).detach()
                    else:
                        grad_norm = torch.full((), float("nan"), device=total.device)   # no copy
                    lr = self.scheduler.get_last_lr()[0]
                    self.optimizer.step()
                    self.scheduler.step()
                    step += 1
                    batch_in_epoch += 1
                    pending.append(({"names": names + ["grad_norm"], "step": step, "epoch": epoch,
                                     "batch": batch_in_epoch - 1, "ids": ids, "lr": lr},
                                    torch.cat([terms.to(grad_norm.device, torch.float64),
                                               grad_norm.to(torch.float64).view(1)])))
                    if bar is not None:
                        bar.update(1)
                    log_now = config.log_every > 0 and (step % config.log_every == 0 or step == self.total_steps)
                    eval_now = self.evaluate_fn is not None and (
                        (config.eval_every > 0 and step % config.eval_every == 0) or step == self.total_steps)
                    checkpoint_now = config.checkpoint_every > 0 and step % config.checkpoint_every == 0 \
                        and step < self.total_steps
                    if log_now or eval_now or checkpoint_now or step == self.total_steps:
                        flush()   # raises NonFiniteLoss before anything is logged or saved
                    if log_now:
                        values = result.step_losses[-1]
                        now = time.perf_counter()
                        elapsed = max(now - window["start"], 1e-9)
                        self._log({**values, "data_wait_s": round(waited, 6),
                                   "step_s": round(now - step_start, 6),
                                   "examples_per_s": round(window["examples"] / elapsed, 3),
                                   "data_wait_share": round(window["wait"] / elapsed, 5)})
                        window = {"start": now, "wait": 0.0, "examples": 0}
                    if eval_now:
                        # rank 0 evaluates the whole dev split alone (the same numbers as one
                        # process); the others wait for it
                        if world.main:
                            best = self._evaluate(step, epoch, best, result)
                        if world.distributed:
                            import torch.distributed as dist
                            dist.barrier()
                    if checkpoint_now:
                        if world.main:
                            self._save_checkpoint(step, epoch, batch_in_epoch, best,
                                                  seconds_before + time.perf_counter() - started)
                        last_checkpoint = step
            finally:
                feeder.close()
        flush()
        result.steps = step
        result.best = best
        session_seconds = time.perf_counter() - started
        # Training time across resumes (the steps a killed run lost after its last
        # checkpoint are not counted twice: they are redone and counted once).
        result.seconds = seconds_before + session_seconds
        if session_seconds > 0:
            result.data_wait_share = wait_seconds / session_seconds
            result.startup_wait_share = startup_wait / session_seconds
        return result

    def _tensorboard_writer(self, resumed_step: int | None):
        """A SummaryWriter on ``<out>/tb``. A fresh run starts an empty directory; a resumed one
        purges the steps after its checkpoint that the killed run had logged (they are redone),
        so the event files read back as one run."""
        from torch.utils.tensorboard import SummaryWriter

        if resumed_step is None:
            shutil.rmtree(self.tb_dir, ignore_errors=True)
            return SummaryWriter(str(self.tb_dir))
        return SummaryWriter(str(self.tb_dir), purge_step=resumed_step + 1)

    def _epoch_batches(self, epoch: int, start_batch: int) -> DeviceFeeder:
        """The epoch's batches from ``start_batch`` on, on the device, read ahead of the step.

        A source with ``packed_batches`` (the cache reader) hands over rows as stored; they are
        expanded on the device (:func:`pipeline.cache.packed.expand`). Reading runs in one
        background thread (decoding releases the GIL; on the CPU the thread also expands),
        or in DataLoader worker processes when asked for (each worker gathers every k-th batch
        of the same plan, so the order does not depend on k). On CUDA batches wait in pinned
        buffers and :class:`~distill.data.DeviceFeeder` copies the next one during the step.
        """
        config = self.config
        cuda = self.device.type == "cuda"
        # a source that can gather one rank's rows (the cache reader) does; others are sliced
        rank = ({"rank": (self.world.rank, self.world.size)}
                if self.world.distributed and getattr(self.source, "slices_ranks", False) else {})
        if config.num_workers > 0 and hasattr(self.source, "dataset"):
            from torch.utils.data import DataLoader
            dataset = self.source.dataset(config.batch_size, seed=config.seed, epoch=epoch,
                                          start_batch=start_batch, **rank)
            # its own generator: the loader draws worker seeds from it, not from the global RNG
            # that drives dropout (else workers would change the training run)
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            return DeviceFeeder(iter(DataLoader(dataset, batch_size=None, num_workers=config.num_workers,
                                                pin_memory=cuda, prefetch_factor=max(2, config.prefetch),
                                                generator=generator)), self.device)
        read = getattr(self.source, "packed_batches", self.source.batches)
        iterator = read(config.batch_size, config.seed, epoch, start_batch=start_batch, **rank)
        if cuda and self._pinned is None:
            self._pinned = ArenaPool(pin=True, keep=config.prefetch + 4)
        iterator = staged_for(iterator, self.device, self._pinned)
        if self.read_ahead:
            # packed batches are pinned by staged_for; Batch dicts of other sources here
            iterator = Prefetcher(iterator, config.prefetch, pin_memory=cuda)
        return DeviceFeeder(iterator, self.device)

    def _evaluate(self, step: int, epoch: int, best: dict | None, result: TrainResult) -> dict | None:
        self.evaluating_step = step   # for an evaluate function that records its own files
        self.student.eval()
        try:
            metrics = self.evaluate_fn(self.student)
        finally:
            self.student.train()
        metrics = plain_json(metrics)
        record = {"step": step, "epoch": epoch, "eval": metrics}
        self._log(record)
        result.final_eval = metrics
        if best is None or metrics["primary"] > best["metrics"]["primary"]:
            best = {"step": step, "epoch": epoch, "metrics": metrics}
            if self.on_best is not None:
                self.on_best(self.student, best)
        return best

    def cleanup_checkpoints(self) -> None:
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


#: metrics.jsonl keys written as TensorBoard scalars, by tag (loss terms go under ``loss/``).
TENSORBOARD_TAGS = {"lr": "train/lr", "grad_norm": "train/grad_norm",
                    "examples_per_s": "train/examples_per_s", "data_wait_share": "train/loader_wait_share"}


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl record: ``loss/<term>`` and ``loss/total``,
    ``train/lr``, ``train/grad_norm``, ``train/examples_per_s``, ``train/loader_wait_share``
    per logged step; ``dev/<metric>`` for each numeric dev metric of an evaluation."""
    if "eval" in record:
        return {f"dev/{name}": float(value) for name, value in record["eval"].items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)}
    scalars = {f"loss/{name}": float(record[name]) for name in (*LOSS_NAMES, "total") if name in record}
    scalars.update({tag: float(record[key]) for key, tag in TENSORBOARD_TAGS.items() if key in record})
    return scalars


@torch.no_grad()
def predict_logits(student: torch.nn.Module, batches: Iterator[Batch], device: torch.device):
    """Student logits and labels over a batch source (evaluation mode is the caller's)."""
    from pipeline.common.encoders import model_inputs

    logits, labels = [], []
    for batch in batches:
        batch = to_device(batch, device)
        out = student(**model_inputs(student, batch["input_ids"], batch["token_type_ids"],
                                     batch["attention_mask"]))
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()
