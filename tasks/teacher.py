"""Luigi wiring of the teacher stages: fine-tune, cache shards, and the assembled cache.

* ``FineTuneTeacher`` (stage ``teacher``): the task's teacher as a saved sequence classifier,
  fine-tuned from ``teacher`` when its head is untrained (:mod:`pipeline.teacher.finetune`).
* ``TeacherCacheShard`` (stage ``teacher_cache_shard``): examples
  ``[i·shard_size, (i+1)·shard_size)`` of the source, run through the teacher once.
* ``TeacherCache`` (stage ``teacher_cache``): requires every shard and writes a self-contained
  cache directory (shard files hard-linked) whose manifest lists them.

One task per shard is what lets ``--workers 2`` run shards side by side, and several worker
processes under one ``luigid`` split them: the central scheduler hands each shard to one
worker. A killed run keeps its finished shards (each is a completed stage output) and the
rerun computes only the rest.

The number of shards depends on the number of examples, known only once the source exists.
``TeacherCache.requires()`` lists the shards when it can (reading Parquet footers only), and
``run()`` yields them as dynamic dependencies otherwise. Dynamic dependencies belong to the
worker that yielded them, so for several worker *processes* to split the shards, build the
example source first (e.g. ``tinykd run Augment``); ``--workers N`` in one process parallelises
either way. The cache's fingerprint never
depends on that: its upstream is the example source and the teacher, which determine the
shards.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import luigi

from pipeline.cache.compact import STORAGE_NAMES
from pipeline.errors import InputError
from pipeline.stage import StageBuild
from tasks.base import StageTask, num_threads_parameter
from tasks.prepare import PrepareData

EXAMPLE_SOURCES = ("augmented", "train", "corpus")


def _local(path: str) -> bool:
    return bool(path) and Path(path).expanduser().exists()


class FineTuneTeacher(StageTask):
    """The task's teacher, saved with ``save_pretrained`` (fine-tuned when its head is new)."""

    stage_name = "teacher"
    leases_devices = True   # fine-tuning runs on one leased device (one process; no DDP)
    stage_version = "2"   # 2: the fresh head is seeded (reproducible teacher)

    teacher = luigi.Parameter(
        default="", significant=True,
        description="Base checkpoint: a local directory or a hub name (e.g. bert-base-uncased, or a "
                    "model already fine-tuned on the task). Empty: the packaged MiniLM-L6 encoder. "
                    "A local directory enters the fingerprint by content, not by path.")
    finetune = luigi.ChoiceParameter(
        default="auto", choices=["auto", "always", "never"], significant=True,
        description="auto: fine-tune when the classifier head is untrained, keep a trained one; "
                    "always: fine-tune; never: keep the head as it is (warns loudly if random).")
    epochs = luigi.FloatParameter(default=3.0, significant=True, description="Fine-tuning epochs.")
    learning_rate = luigi.FloatParameter(default=2e-5, significant=True, description="AdamW peak learning rate.")
    batch_size = luigi.IntParameter(default=32, significant=True, description="Training batch size.")
    warmup_ratio = luigi.FloatParameter(default=0.1, significant=True,
                                        description="Fraction of steps of linear warm-up (then linear decay).")
    weight_decay = luigi.FloatParameter(default=0.01, significant=True, description="AdamW weight decay.")
    max_seq_length = luigi.IntParameter(default=128, significant=True, description="Truncation length in tokens.")
    eval_every = luigi.IntParameter(default=0, significant=True,
                                    description="Evaluate on dev every N steps and after the last one (0: at each "
                                                "epoch's end instead); the best checkpoint is kept.")
    max_train_examples = luigi.IntParameter(default=0, significant=True,
                                            description="Use only the first N training examples (0: all).")
    seed = luigi.IntParameter(default=42, significant=True, description="Seed of initialisation and shuffling.")
    device = luigi.Parameter(default="auto", significant=False,
                             description="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    progress = luigi.BoolParameter(
        default=True, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="Show a tqdm bar on the console (steps or examples, ETA); --progress false hides it.")
    num_threads = num_threads_parameter()

    def teacher_source(self) -> str:
        if self.teacher:
            return str(Path(self.teacher).expanduser().resolve()) if _local(self.teacher) else self.teacher
        from pipeline.teacher.finetune import default_teacher_dir

        return str(default_teacher_dir())

    def stage_params(self) -> dict[str, Any]:
        params = super().stage_params()
        # A local checkpoint is identified by its content (stage_inputs), not its path.
        params["teacher"] = "<local>" if _local(self.teacher_source()) else self.teacher_source()
        return params

    def stage_inputs(self) -> dict[str, str | Path]:
        source = self.teacher_source()
        return {"teacher": source} if _local(source) else {}

    def requires(self):
        return {"data": self.upstream(PrepareData)}

    def model_dir(self) -> Path:
        return self.readable_dir() / "model"

    def build(self, out: StageBuild) -> None:
        from pipeline.prepare.splits import task_info
        from pipeline.teacher.finetune import prepare_teacher

        data = self.upstream_dir("data")
        info_of_data = task_info(data)
        # selection = holdout: the fine-tune keeps its best checkpoint on the held-out train
        # rows (the students' selection set too), never on dev
        select = data / "holdout.parquet" if info_of_data.get("selection") == "holdout" else None
        with out.timed("teacher"):
            info = prepare_teacher(
                self.teacher_source(), data / "train.parquet", data / "dev.parquet", out.path / "model",
                info_of_data, mode=self.finetune, max_train_examples=self.max_train_examples,
                select_path=select,
                epochs=self.epochs, learning_rate=self.learning_rate, batch_size=self.batch_size,
                warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay,
                max_seq_length=self.max_seq_length, eval_every=self.eval_every, seed=self.seed,
                device=self.build_device(), progress=self.progress, tb_dir=out.path / "tb")
        out.info.update(info)


class TeacherCacheParams(luigi.Task):
    """Parameter holder: what to cache, from which teacher, in which layout."""

    examples = luigi.ChoiceParameter(
        default="augmented", choices=EXAMPLE_SOURCES, significant=True,
        description="Examples to cache: 'augmented' (the Augment stage's output), 'train' (the "
                    "prepared train split, augmentation off) or 'corpus' (a plain-text file, one "
                    "text per line, for general distillation with a bare encoder: no logits).")
    corpus = luigi.Parameter(
        default="", significant=False,
        description="Plain-text corpus for examples=corpus (content-hashed, path not significant).")
    augment = luigi.DictParameter(
        default={}, significant=True,
        description="examples=augmented: sampling settings over [Augment], e.g. {\"num_aug\": 10} "
                    "(keys num_aug, aug_p, aug_seed): an ablation variant's own augmentation, over "
                    "the same candidates. Identity only: the Augment output's fingerprint, not "
                    "this dict, enters the cache's key.")
    teacher = luigi.Parameter(
        default="", significant=True,
        description="examples=corpus only: the bare pre-trained encoder (local dir or hub name; "
                    "empty: packaged MiniLM). Otherwise the teacher is FineTuneTeacher's output.")
    tokenizer = luigi.Parameter(
        default="", significant=True,
        description="Tokenizer for the data (empty: the teacher's own). Must have the teacher's vocabulary.")
    student_layers = luigi.IntParameter(
        default=4, significant=True, description="Student depth M: the layer map picks M teacher layers.")
    layer_map = luigi.ChoiceParameter(
        default="uniform", choices=["uniform", "top", "bottom", "explicit"], significant=True,
        description="TinyBERT layer-map strategy (pipeline.cache.layer_map).")
    explicit_layers = luigi.Parameter(
        default="", significant=True, description="layer_map=explicit: teacher layers, e.g. '3,6,9,12'.")
    extra_layer_maps = luigi.Parameter(
        default="", significant=True,
        description="Also cache the layers of these strategies, e.g. 'top,bottom', so trainer runs "
                    "(ablations) with another layer map re-read this cache instead of rebuilding it.")
    hidden_layers = luigi.Parameter(
        default="", significant=True,
        description="Override: hidden-state layers to cache, e.g. '0,3,6' (empty: from the layer map).")
    attention_layers = luigi.Parameter(
        default="", significant=True,
        description="Override: attention-score layers to cache (empty: from the layer map).")
    attention_target = luigi.ChoiceParameter(
        default="scores", choices=["scores", "log_probs"], significant=True,
        description="What the attention columns hold: 'scores' (pre-softmax, TinyBERT; families whose "
                    "adapter captures them) or 'log_probs' (attention log-probabilities, any "
                    "family). The trainer's attention_target must be the same.")
    storage = luigi.ChoiceParameter(
        default="int8", choices=list(STORAGE_NAMES), significant=True,
        description="How hidden states and scores are stored: int8 (default: symmetric, one scale "
                    "per token / per head and query row; about half of fp16, 0.5-2 % error, and the "
                    "same student as fp16 on MRPC and SST-2: reports/*-cache.md), fp16, bf16 (raw "
                    "bits) or fp32 (exact).")
    layout = luigi.ChoiceParameter(
        default="compact", choices=["compact", "full"], significant=True,
        description="compact: store only what cannot be recomputed (layer 0 comes from the "
                    "teacher's embedding module, long rows keep a layer's input instead of its "
                    "scores); full: every mapped layer as it is (format-1 columns).")
    max_seq_length = luigi.IntParameter(default=128, significant=True, description="Truncation length in tokens.")
    shard_size = luigi.IntParameter(
        default=20_000, significant=True,
        description="Examples per shard (one Luigi task each); example i goes to shard i // shard_size.")
    row_group_mb = luigi.IntParameter(
        default=32, significant=True,
        description="Close a Parquet row group at this many MiB of teacher values; row groups are "
                    "the reader's shuffle unit, so this changes the training order.")
    autocast = luigi.ChoiceParameter(
        default="none", choices=["none", "bf16", "fp16"], significant=True,
        description="Run the teacher under autocast (CUDA); changes the values beyond noise.")
    forward_batch_size = luigi.IntParameter(
        default=64, significant=False,
        description="Teacher forward batch size (length-bucketed; values independent of it up to FP noise).")
    device = luigi.Parameter(default="auto", significant=False,
                             description="auto (CUDA when available, else CPU), cpu, cuda, ...")
    compression = luigi.ChoiceParameter(
        default="zstd", choices=["zstd", "lz4", "snappy", "none"], significant=False,
        description="Parquet codec of the shards (changes only the file size and the writing and "
                    "reading speed): zstd, the smallest; lz4 encodes about 2x faster for ~1.2x the "
                    "bytes (scripts/bench_writer.py), for a GPU teacher that outruns one core of zstd.")
    compression_level = luigi.IntParameter(default=3, significant=False,
                                           description="zstd level (changes only the file size).")
    byte_stream_split = luigi.BoolParameter(
        default=True, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="Parquet BYTE_STREAM_SPLIT encoding of the float columns before zstd "
                    "(smaller files, identical values).")
    progress = luigi.BoolParameter(
        default=True, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="Show a tqdm bar on the console (steps or examples, ETA); --progress false hides it.")
    num_threads = num_threads_parameter()

    # --- shared helpers -----------------------------------------------------------------
    def cache_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name, _ in TeacherCacheParams.get_params()}

    def corpus_path(self) -> str:
        if not self.corpus:
            raise InputError("examples=corpus needs a corpus file (--corpus)")
        return str(Path(self.corpus).expanduser().resolve())

    def upstream_requirements(self) -> dict[str, luigi.Task]:
        augment = self.augment_settings()
        if self.examples == "corpus":
            return {}
        required: dict[str, luigi.Task] = {"data": self.upstream(PrepareData),
                                            "teacher": self.upstream(FineTuneTeacher)}
        if self.examples == "augmented":
            from tasks.augment import Augment

            required["examples"] = self.upstream(Augment, **augment)
        return required

    def augment_settings(self) -> dict[str, Any]:
        """The ``augment`` overrides, checked: sampling parameters only, augmented data only."""
        from tasks.augment import SAMPLING_PARAMETERS

        settings = dict(self.augment)
        unknown = sorted(set(settings) - set(SAMPLING_PARAMETERS))
        if unknown:
            raise InputError(f"TeacherCache.augment: unknown key(s) {unknown}; allowed: "
                             f"{list(SAMPLING_PARAMETERS)} (the candidates are [Augment]'s)")
        if settings and self.examples != "augmented":
            raise InputError(f"TeacherCache.augment is set ({settings}) but examples="
                             f"{self.examples} does not read augmented data")
        return settings

    def teacher_source(self) -> str:
        if self.examples != "corpus":
            return str(self.upstream(FineTuneTeacher).model_dir())
        if self.teacher:
            return str(Path(self.teacher).expanduser().resolve()) if _local(self.teacher) else self.teacher
        from pipeline.teacher.finetune import default_teacher_dir

        return str(default_teacher_dir())

    def example_source(self) -> Path:
        if self.examples == "corpus":
            return Path(self.corpus_path())
        if self.examples == "augmented":
            return self.upstream_requirements()["examples"].readable_dir()
        return self.upstream_requirements()["data"].readable_dir() / "train.parquet"

    def cache_stage_params(self) -> dict[str, Any]:
        params = {name: self.param_kwargs[name] for name, p in TeacherCacheParams.get_params() if p.significant}
        params.pop("augment")  # the examples' fingerprint says which augmentation they are
        if self.examples == "corpus" and _local(self.teacher_source()):
            params["teacher"] = "<local>"
        return params

    def cache_stage_inputs(self) -> dict[str, str | Path]:
        inputs: dict[str, str | Path] = {}
        if self.examples == "corpus":
            inputs["corpus"] = self.corpus_path()
            if _local(self.teacher_source()):
                inputs["teacher"] = self.teacher_source()
        if self.tokenizer and _local(self.tokenizer):
            inputs["tokenizer"] = str(Path(self.tokenizer).expanduser().resolve())
        return inputs

    def cache_spec(self):
        """The layers to cache: explicit lists, else the layer map over the teacher's depth."""
        from pipeline.cache.layer_map import cached_layers, layer_map, parse_layer_list
        from pipeline.cache.writer import CacheSpec

        hidden = parse_layer_list(self.hidden_layers)
        attention = parse_layer_list(self.attention_layers)
        if not hidden or not attention:
            num_layers = self.teacher_num_layers()
            strategies = [self.layer_map] + [name.strip() for name in self.extra_layer_maps.split(",")
                                              if name.strip()]
            default_hidden, default_attention = set(), set()
            for strategy in strategies:
                try:
                    mapped = layer_map(num_layers, self.student_layers, strategy,
                                       parse_layer_list(self.explicit_layers) or None)
                except ValueError as exc:
                    raise InputError(f"layer map {strategy!r}: {exc}", self.teacher_source()) from None
                map_hidden, map_attention = cached_layers(mapped)
                default_hidden.update(map_hidden)
                default_attention.update(map_attention)
            hidden = hidden or sorted(default_hidden)
            attention = attention or sorted(default_attention)
        return CacheSpec(hidden, attention, STORAGE_NAMES[self.storage], self.max_seq_length,
                         with_logits=self.examples != "corpus", layout=self.layout,
                         attention_target=self.attention_target)

    def teacher_num_layers(self) -> int:
        """The teacher's depth, known before the fine-tuned teacher exists (fine-tuning keeps it)."""
        if self.examples == "corpus":
            return _teacher_num_layers(self.teacher_source())
        return _teacher_num_layers(self.upstream(FineTuneTeacher).teacher_source())

    def task_info(self) -> dict:
        if self.examples == "corpus":
            return {}
        from pipeline.prepare.splits import task_info

        return task_info(self.upstream_requirements()["data"].readable_dir())

    def num_examples(self) -> int | None:
        """Examples in the source from Parquet footers, or None while the source is not built."""
        from pipeline.common.examples import count_examples

        try:
            if self.examples != "corpus" and not self.upstream_requirements()[
                    "examples" if self.examples == "augmented" else "data"].complete():
                return None
            return count_examples(self.example_source())
        except FileNotFoundError:
            return None


def _teacher_num_layers(teacher: str) -> int:
    """The teacher's depth from its config.json (json only: no transformers import here)."""
    config = Path(teacher) / "config.json"
    if config.exists():
        return int(json.loads(config.read_text())["num_hidden_layers"])
    from transformers import AutoConfig  # a hub name: let transformers resolve it

    return AutoConfig.from_pretrained(teacher).num_hidden_layers


class TeacherCacheShard(TeacherCacheParams, StageTask):
    """One shard of the teacher cache: examples [i·shard_size, (i+1)·shard_size) of the source."""

    stage_name = "teacher_cache_shard"
    leases_devices = True   # the teacher's forward runs on one leased device
    stage_version = "3"   # 2: rows carry aug_index; 3: cache format 2 (compact layout, int8)
    # Gigabytes of Parquet with page CRCs (verified by pipeline.cache.reader on every read);
    # TeacherCache re-hashes each shard once, before linking it (assemble_cache).
    hash_parquet_on_read = False

    shard_index = luigi.IntParameter(significant=True, description="Which shard (0-based).")

    def requires(self):
        return self.upstream_requirements()

    def stage_params(self) -> dict[str, Any]:
        return {**self.cache_stage_params(), "shard_index": self.shard_index}

    def stage_inputs(self) -> dict[str, str | Path]:
        return self.cache_stage_inputs()

    def build(self, out: StageBuild) -> None:
        import os

        from pipeline.cache.writer import shard_ranges
        from pipeline.cache.assemble import write_shard_output

        total = self.num_examples() or 0
        ranges = shard_ranges(total, self.shard_size)
        if self.shard_index >= len(ranges):
            raise InputError(f"shard {self.shard_index} does not exist: {total} examples make "
                             f"{len(ranges)} shard(s) of {self.shard_size}", self.example_source())
        start, stop = ranges[self.shard_index]
        spec = self.cache_spec()  # bad layer requests fail here, before any work
        with out.timed("cache"):
            info = write_shard_output(
                self.example_source(), start, stop, self.shard_index, self.teacher_source(), out.path,
                spec, tokenizer=self.tokenizer or None, batch_size=self.forward_batch_size,
                device=self.build_device(), autocast=self.autocast, row_group_bytes=self.row_group_mb << 20,
                compression=self.compression, compression_level=self.compression_level,
                byte_stream_split=self.byte_stream_split,
                task_info=self.task_info(),
                progress=self.progress)
        info["worker_pid"] = os.getpid()
        out.rows["examples"] = info["examples"]
        out.info.update(info)


class TeacherCache(TeacherCacheParams, StageTask):
    """The whole teacher cache: every shard, assembled into one directory with one manifest."""

    stage_name = "teacher_cache"
    stage_version = "3"   # 2: rows carry aug_index; 3: cache format 2 (compact layout, int8)
    # Read by every trainer stage; its page CRCs are verified as they are read.
    hash_parquet_on_read = False
    # With a URL workdir the trainers stream it from the store (pipeline.cache.reader).
    stream_from_store = True
    # run() yields the shards when requires() could not count the examples yet
    dynamic_requirements = "TeacherCacheShard"

    def shard_tasks(self, num_examples: int) -> list[TeacherCacheShard]:
        count = -(-num_examples // self.shard_size)
        return [self.upstream(TeacherCacheShard, shard_index=i, **self.cache_params()) for i in range(count)]

    def requires(self):
        # Decided once per instance: Luigi re-reads requires() just before run(), and by then
        # the source may exist; the shards must then come as dynamic dependencies (run()),
        # not as "unfulfilled" static ones.
        if getattr(self, "_required", None) is None:
            required: dict[str, luigi.Task] = dict(self.upstream_requirements())
            total = self.num_examples()
            if total is not None:  # known now: schedule the shards statically (parallel workers)
                required.update({f"shard-{t.shard_index:05d}": t for t in self.shard_tasks(total)})
            self._required = required
        return self._required

    def upstream_tasks(self) -> dict[str, StageTask]:
        # Shards are determined by the source and the teacher; keep them out of the key so the
        # fingerprint does not depend on whether the source existed at scheduling time.
        return {k: t for k, t in super().upstream_tasks().items() if not k.startswith("shard-")}

    def stage_params(self) -> dict[str, Any]:
        return self.cache_stage_params()

    def stage_inputs(self) -> dict[str, str | Path]:
        return self.cache_stage_inputs()

    def run(self):
        shards = self.shard_tasks(self.num_examples() or 0)
        # Dynamic dependencies: a no-op when requires() already listed them.
        yield shards
        self._shards = shards
        super().run()

    def build(self, out: StageBuild) -> None:
        from pipeline.cache.assemble import assemble_cache

        shards = getattr(self, "_shards", None) or self.shard_tasks(self.num_examples() or 0)
        with out.timed("assemble"):
            info = assemble_cache([t.readable_dir() for t in shards], out.path, self.teacher_source())
        info["parameters"] = {k: v for k, v in self.cache_params().items()}
        out.rows["examples"] = info["examples"]
        out.info.update(info)
