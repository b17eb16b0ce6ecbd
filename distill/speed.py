"""How big and how fast a model is where it is deployed: the paper's #Params and Speedup, measured.

People distil to get a model that is smaller and faster at the same quality. TinyBERT's Table 1
prints each student's parameters and its speed-up over the teacher beside its score; this
module measures both halves of that claim for any exported model directory
(``save_pretrained``: a stage-2 ``student/``, a fine-tuned teacher's ``model/``).

Per model (:func:`measure_model`):

* **parameters**, total and without the embedding lookup tables (every ``nn.Embedding``: words,
  positions, token types). The tables are most of a small student (TinyBERT4: 9.7M of 14.4M)
  but cost a lookup, not arithmetic, which is why the speed-up exceeds the size ratio;
* **bytes** of its ``*.safetensors`` files, as shipped;
* **CPU latency at batch 1**: every sentence alone, at its real length (dev sentences tokenised
  as the teacher cache tokenises them, truncated, never padded); p50 and p95 over the calls.
  With 1 thread (a server running one request per core, a phone) and with every core;
* **CPU throughput at batch 32**: the same sentences in batches of 32 (repeated to fill one
  batch when fewer), each padded to its longest sentence, examples per second, every core;
* **GPU throughput at batch 256 in bf16**, when an accelerator is given (``auto``: CUDA when
  present). The tests run the same code on the CPU (``accelerator = "cpu"``).

:func:`measure_deployment` measures a student and its teacher one after the other in the same
process, on the same sentences and settings, and adds the ratios teacher / student: size ratio
and speed-up (latency p50 per thread count, throughput). The speed-up depends on where, at
which batch and with how many threads it is measured, so every figure carries those, and
:func:`report_values` turns a record into the values a report prints, with a one-line
"measured on <machine>, <threads> threads, batch N".

Timing uses torch's own clock, the one :class:`torch.utils.benchmark.Timer` reads (it
synchronises an accelerator first): one warm-up pass over the inputs (first calls allocate,
and every new shape picks its kernels), then ``runs`` timed passes, every call timed alone, so
p50 and p95 are taken over all ``sentences x runs`` calls -- requests at their real lengths --
with torch's intra-op thread count set for the measurement. Any callable runs under it: the
PyTorch model (:class:`TorchRunner`) and onnxruntime sessions (:mod:`pipeline.deploy`) are
timed by the same functions on the same inputs. All timings sit under ``speed`` keys, which
the stage contract treats as run history (``pipeline.stage.RUN_HISTORY_INFO_KEYS``): a
resumed build differs from an uninterrupted one there and nowhere else. The defaults (16
sentences, 2 timed runs) keep the cost to 1.5-1.8 s per student-and-teacher pair in the demo
(two cores), which DistillPrediction pays after every training; ``scripts/bench_speed.py``
and ``tinykd speed`` take more.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.errors import InputError

#: The order of a model's inputs (the ONNX export's input order too).
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
#: Thread-count labels of the latency figures: one thread, and every core of the machine.
ONE_THREAD, ALL_THREADS = "1", "all"
#: The speed-up of each latency figure, by its thread-count label.
SPEEDUP_KEYS = {ONE_THREAD: "latency_p50_1_thread", ALL_THREADS: "latency_p50_all_threads"}


@dataclass(frozen=True)
class SpeedSettings:
    """How the speed figures are measured (none of it changes what a model computes)."""

    runs: int = 2                # timed calls per sentence, and timed throughput passes (after a warm-up pass)
    max_sentences: int = 16      # sentences timed, evenly spaced over the file (0: all)
    batch_size: int = 32         # CPU throughput batch
    gpu_batch_size: int = 256    # accelerator throughput batch (bf16)
    accelerator: str = "auto"    # auto: CUDA when present, else none; none; or a device ("cpu" in tests)

    def __post_init__(self):
        if self.runs < 1:
            raise InputError(f"speed runs = {self.runs}: at least one timed run per sentence")
        if self.max_sentences < 0 or self.batch_size < 1 or self.gpu_batch_size < 1:
            raise InputError("speed sentences must be >= 0 and the batch sizes >= 1")

    def accelerator_device(self) -> str | None:
        """The device of the bf16 throughput figure, or None (not measured)."""
        if self.accelerator in ("", "none"):
            return None
        if self.accelerator == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else None
        return self.accelerator


# --- inputs ---------------------------------------------------------------------------------

@dataclass
class Sentences:
    """The token ids the timings run on (unpadded, one list per sentence), and what they are."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    source: str                      # e.g. "dev sentences at real lengths"
    pad_token_id: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def describe(self) -> str:
        lengths = self.lengths()
        return (f"{len(lengths)} {self.source} (mean {np.mean(lengths):.1f} tokens, "
                f"max {max(lengths)})")

    def subset(self, rows: Sequence[int]) -> "Sentences":
        return Sentences([self.input_ids[r] for r in rows], [self.token_type_ids[r] for r in rows],
                         self.source, self.pad_token_id)

    def batch(self, rows: Sequence[int], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows ``rows`` right-padded to their longest, as int64 arrays named ``names``."""
        width = max(len(self.input_ids[r]) for r in rows)
        arrays = {"input_ids": np.full((len(rows), width), self.pad_token_id, dtype=np.int64),
                  "attention_mask": np.zeros((len(rows), width), dtype=np.int64),
                  "token_type_ids": np.zeros((len(rows), width), dtype=np.int64)}
        for out_row, row in enumerate(rows):
            ids, types = self.input_ids[row], self.token_type_ids[row]
            arrays["input_ids"][out_row, :len(ids)] = ids
            arrays["token_type_ids"][out_row, :len(types)] = types
            arrays["attention_mask"][out_row, :len(ids)] = 1
        return {name: arrays[name] for name in names}

    def batches(self, batch_size: int, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """Consecutive batches of ``batch_size`` sentences (the last one may be smaller)."""
        return [self.batch(range(start, min(start + batch_size, len(self))), names)
                for start in range(0, len(self), batch_size)]


def evenly_spaced(count: int, limit: int) -> list[int]:
    """``limit`` row numbers spread evenly over ``count`` rows (all of them when ``limit`` is 0
    or at least ``count``): a subset with the file's length distribution, the same every run."""
    if limit <= 0 or limit >= count:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, limit)})


def sentences_from_table(table, tokenizer, max_seq_length: int, limit: int = 0,
                         source: str = "dev sentences at real lengths", where: str = "") -> Sentences:
    """Rows ``text_a`` (and ``text_b``) of a table, tokenised as the teacher cache tokenises them
    (truncated to ``max_seq_length``, unpadded); ``limit`` rows evenly spaced (0: all)."""
    from pipeline.common.tokenize import tokenize_examples

    if table.num_rows == 0:
        raise InputError("no sentences to time (the table is empty)", where or None)
    table = table.take(evenly_spaced(table.num_rows, limit))
    if "text_b" not in table.column_names:
        import pyarrow as pa

        table = table.append_column("text_b", pa.nulls(table.num_rows, pa.string()))
    ids, types = tokenize_examples(tokenizer, table, max_seq_length, where)
    return Sentences(ids, types, source, tokenizer.pad_token_id or 0)


def sentences_from_path(path: Path | str, tokenizer, max_seq_length: int, limit: int = 0) -> Sentences:
    """Sentences from a prepared data output (its ``dev.parquet``), a Parquet file with
    ``text_a`` (and ``text_b``), or a text file with one sentence per line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "dev.parquet"
    if not path.is_file():
        raise InputError("no such file (give a prepared data output, a .parquet with text_a, or a "
                         "text file with one sentence per line)", path)
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"cannot read it as Parquet ({exc})", path) from None
        if "text_a" not in table.column_names:
            raise InputError(f"no text_a column (columns: {table.column_names})", path)
        columns = ["text_a"] + (["text_b"] if "text_b" in table.column_names else [])
        return sentences_from_table(table.select(columns), tokenizer, max_seq_length, limit,
                                    f"sentences of {path.name} at real lengths", str(path))
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sentences_from_table(pa.table({"text_a": pa.array(lines, pa.string())}), tokenizer,
                                max_seq_length, limit, f"sentences of {path.name} at real lengths", str(path))


def fixed_length_sentences(vocab_size: int, length: int, count: int, seed: int = 0) -> Sentences:
    """``count`` sequences of exactly ``length`` random token ids (ids 1000.. of the vocabulary,
    past BERT's special and unused tokens): the paper's fixed-length timing, no tokenizer needed."""
    if length < 1 or count < 1:
        raise InputError(f"fixed-length inputs need length >= 1 and count >= 1 (got {length}, {count})")
    rng = np.random.default_rng(seed)
    low = min(1000, vocab_size - 1)
    ids = rng.integers(low, vocab_size, size=(count, length)).tolist()
    return Sentences(ids, [[0] * length for _ in range(count)], f"random sequences of length {length}")


# --- models ---------------------------------------------------------------------------------

@dataclass
class ExportedModel:
    """A ``save_pretrained`` classifier loaded for measuring: model (eval mode), tokenizer (or
    None when the directory has none), its weight files and the forward's input names."""

    directory: Path
    model: Any
    tokenizer: Any
    weight_files: list[Path]
    input_names: list[str] = field(default_factory=list)


def weight_files(directory: Path) -> list[Path]:
    """The model's ``*.safetensors`` files; one InputError naming the directory when it is not a
    model directory (no config.json) or holds no weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError("no such model directory", directory)
    if not (directory / "config.json").is_file():
        raise InputError("not an exported model: no config.json (give a save_pretrained directory, "
                         "e.g. a distill_stage2 output's student/)", directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InputError("not an exported model: no *.safetensors weights beside config.json", directory)
    return files


def check_safetensors(path: Path) -> None:
    """Read a safetensors file's header and check that the file holds every tensor it lists: a
    truncated or damaged file is one InputError naming it (the library's own message says only
    'incomplete metadata' and not which file)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_bytes = int.from_bytes(handle.read(8), "little")
            if header_bytes <= 0 or 8 + header_bytes > size:
                raise ValueError(f"header of {header_bytes} bytes in a file of {size}")
            header = json.loads(handle.read(header_bytes))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"not a readable safetensors file ({exc}); re-export it", path) from None
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
              default=0)
    if 8 + header_bytes + end != size:
        raise InputError(f"truncated or damaged weights: the header lists {8 + header_bytes + end:,} bytes, "
                         f"the file has {size:,}; re-export it", path)


def load_exported(directory: Path | str) -> ExportedModel:
    """Load an exported classifier (eval mode) and its tokenizer for measuring or exporting;
    bad input is one InputError naming the directory or the file."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.common.encoders import family_of
    from pipeline.common.loading import load_pretrained

    directory = Path(directory).expanduser().resolve()
    files = weight_files(directory)
    for path in files:
        check_safetensors(path)
    try:
        model, _ = load_pretrained(AutoModelForSequenceClassification, directory)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"cannot load the model ({' '.join(str(exc).split())})", directory) from None
    model.eval()
    tokenizer = None
    if any((directory / name).exists() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the tokenizer ({exc})", directory) from None
    dummy = family_of(model, directory).model_inputs("ids", "types", "mask")
    return ExportedModel(directory, model, tokenizer, files, [n for n in INPUT_ORDER if n in dummy])


def parameter_counts(model) -> dict[str, int]:
    """Parameters in total and without the embedding lookup tables (every ``nn.Embedding``)."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    tables = sum(p.numel() for module in model.modules() if isinstance(module, torch.nn.Embedding)
                 for p in module.parameters(recurse=False))
    return {"parameters": int(total), "parameters_without_embeddings": int(total - tables)}


class TorchRunner:
    """A PyTorch classifier as a timed callable: ``feed(arrays)`` makes the tensors once (outside
    the timing), ``runner(feed)`` is one forward under ``torch.inference_mode``."""

    def __init__(self, model, input_names: Sequence[str], device: str = "cpu"):
        self.model, self.input_names, self.device = model, list(input_names), device

    def feed(self, arrays: dict[str, np.ndarray]) -> dict:
        import torch

        return {name: torch.from_numpy(arrays[name]).to(self.device) for name in self.input_names}

    def __call__(self, feed: dict):
        import torch

        with torch.inference_mode():
            return self.model(**feed).logits

    def logits(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return self(self.feed(arrays)).float().cpu().numpy()


# --- timing ---------------------------------------------------------------------------------

def timed_calls(runner: Callable, feeds: Sequence[Any], runs: int, threads: int) -> np.ndarray:
    """Seconds of each call ``runner(feed)``: one warm-up pass over ``feeds`` (first calls
    allocate, and every new shape has its own kernels to pick), then ``runs`` timed passes, each
    call timed alone with torch.utils.benchmark's clock (the one its Timer uses: it synchronises
    an accelerator before reading the time), with ``threads`` intra-op threads."""
    from torch.utils.benchmark.utils.timer import timer as clock

    from pipeline.common.device import torch_threads

    samples = []
    with torch_threads(threads):
        for feed in feeds:
            runner(feed)
        clock()
        for _ in range(runs):
            for feed in feeds:
                started = clock()
                runner(feed)
                samples.append(clock() - started)
    return np.asarray(samples)


def batch1_latency(runner, sentences: Sentences, input_names: Sequence[str], runs: int,
                   threads: int) -> dict[str, float]:
    """Milliseconds per call at batch 1, each sentence alone at its own length: p50, p95 and the
    mean over every timed call (``runs`` per sentence, after a warm-up pass)."""
    feeds = [runner.feed(sentences.batch([row], input_names)) for row in range(len(sentences))]
    seconds = timed_calls(runner, feeds, runs, threads)
    return {"p50": round(float(np.percentile(seconds, 50)) * 1e3, 4),
            "p95": round(float(np.percentile(seconds, 95)) * 1e3, 4),
            "mean": round(float(seconds.mean()) * 1e3, 4), "threads": int(threads)}


def throughput(runner, sentences: Sentences, input_names: Sequence[str], batch_size: int, runs: int,
               threads: int) -> dict[str, Any]:
    """Examples per second in batches of ``batch_size`` (each padded to its longest sentence)
    over the sentences, repeated in order when there are fewer than one batch of them."""
    rows = list(range(max(len(sentences), batch_size)))
    feeds = [runner.feed(sentences.batch([r % len(sentences) for r in rows[start:start + batch_size]],
                                         input_names)) for start in range(0, len(rows), batch_size)]
    seconds = timed_calls(runner, feeds, runs, threads).sum()
    return {"examples_per_s": round(len(rows) * runs / seconds, 3), "batch_size": int(batch_size),
            "examples": len(rows), "threads": int(threads)}


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; os.cpu_count() where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_speed(make_runner: Callable[[int], Any], sentences: Sentences, input_names: Sequence[str],
              settings: SpeedSettings, cores: int | None = None) -> dict[str, Any]:
    """Batch-1 latency with 1 thread and with every core, and batch throughput with every core.

    ``make_runner(threads)`` returns the callable to time with that many threads (a PyTorch
    runner ignores it: the timer sets torch's thread count; an onnxruntime session is made with
    that many threads)."""
    cores = cores or available_cores()
    latency = {ONE_THREAD: batch1_latency(make_runner(1), sentences, input_names, settings.runs, 1)}
    latency[ALL_THREADS] = (dict(latency[ONE_THREAD]) if cores == 1 else
                            batch1_latency(make_runner(cores), sentences, input_names, settings.runs, cores))
    return {"cpu_latency_ms": latency,
            "cpu_throughput": throughput(make_runner(cores), sentences, input_names, settings.batch_size,
                                         settings.runs, cores)}


def accelerator_throughput(model, sentences: Sentences, input_names: Sequence[str], device: str,
                           batch_size: int, runs: int) -> dict[str, Any]:
    """Examples per second of a bf16 copy of ``model`` on ``device`` at ``batch_size`` (the
    sentences repeated to fill one batch). Written for CUDA; runs anywhere (tests: the CPU)."""
    import copy

    import torch

    copied = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16).eval()
    runner = TorchRunner(copied, input_names, device)
    rows = [row % len(sentences) for row in range(batch_size)]
    feed = runner.feed(sentences.batch(rows, input_names))
    seconds = timed_calls(runner, [feed], runs, torch.get_num_threads()).mean()
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else str(device)
    result = {"examples_per_s": round(batch_size / seconds, 3), "batch_size": int(batch_size),
              "dtype": "bfloat16", "device": name}
    del copied, runner, feed
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def measure_model(exported: ExportedModel, sentences: Sentences, settings: SpeedSettings,
                  cores: int | None = None) -> dict[str, Any]:
    """One model's size and, under ``speed``, its timings (see the module text)."""
    runner = TorchRunner(exported.model, exported.input_names)
    speed = cpu_speed(lambda threads: runner, sentences, exported.input_names, settings, cores)
    device = settings.accelerator_device()
    speed["accelerator_bf16_throughput"] = (
        accelerator_throughput(exported.model, sentences, exported.input_names, device,
                               settings.gpu_batch_size, settings.runs) if device else None)
    return {**parameter_counts(exported.model),
            "safetensors_bytes": int(sum(path.stat().st_size for path in exported.weight_files)),
            "speed": speed}


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or not denominator:
        return None
    return round(float(numerator) / float(denominator), 4)


def speedups(teacher_speed: dict, student_speed: dict) -> dict[str, float | None]:
    """Teacher / student: how many times faster the student is, figure by figure (latency:
    teacher's time over the student's; throughput: student's examples/s over the teacher's)."""
    result = {SPEEDUP_KEYS[label]: _ratio(teacher_speed["cpu_latency_ms"][label]["p50"],
                                          student_speed["cpu_latency_ms"][label]["p50"])
              for label in (ONE_THREAD, ALL_THREADS)}
    result["cpu_throughput"] = _ratio(student_speed["cpu_throughput"]["examples_per_s"],
                                      teacher_speed["cpu_throughput"]["examples_per_s"])
    gpu_student, gpu_teacher = (student_speed.get("accelerator_bf16_throughput"),
                                teacher_speed.get("accelerator_bf16_throughput"))
    result["accelerator_bf16_throughput"] = (
        _ratio(gpu_student["examples_per_s"], gpu_teacher["examples_per_s"]) if gpu_student and gpu_teacher else None)
    return result


def measure_deployment(student_dir: Path | str, teacher_dir: Path | str | None,
                       make_sentences: Callable[[ExportedModel], Sentences],
                       settings: SpeedSettings = SpeedSettings()) -> dict[str, Any]:
    """The student's (and its teacher's) size and speed, measured in this one process on the
    same inputs, and the ratios teacher / student.

    ``make_sentences(model)`` gives the inputs for a model (its own tokenizer tokenises the same
    text). Layout: ``{"student": {...}, "teacher": {...} | None, "size_ratio", "size_ratio_without_
    embeddings", "bytes_ratio", "speed": {"measured_on", "cores", "inputs", "runs", "speedup"}}``.
    """
    import torch

    cores = available_cores()
    student = load_exported(student_dir)
    sentences = make_sentences(student)
    record: dict[str, Any] = {"student": measure_model(student, sentences, settings, cores), "teacher": None}
    del student
    speed = {"measured_on": cpu_name(), "cores": cores, "inputs": sentences.describe(), "runs": settings.runs,
             "torch": torch.__version__, "speedup": None}
    if teacher_dir is not None:
        teacher = load_exported(teacher_dir)
        record["teacher"] = measure_model(teacher, make_sentences(teacher), settings, cores)
        del teacher
        for key, name in (("size_ratio", "parameters"), ("size_ratio_without_embeddings",
                                                         "parameters_without_embeddings"),
                          ("bytes_ratio", "safetensors_bytes")):
            record[key] = _ratio(record["teacher"][name], record["student"][name])
        speed["speedup"] = speedups(record["teacher"]["speed"], record["student"]["speed"])
    gpu = record["student"]["speed"].get("accelerator_bf16_throughput")
    speed["accelerator"] = gpu["device"] if gpu else None
    record["speed"] = speed
    return record


# --- reporting ------------------------------------------------------------------------------

def millions(count: int | float) -> str:
    """A parameter count as the paper prints it: ``14.4M``."""
    return f"{count / 1e6:.1f}M"


def _times(value: float | None) -> str:
    return f"{value:.1f}x" if value is not None else "n/a"


def report_values(deployment: dict | None, threads: str = ONE_THREAD) -> dict[str, Any] | None:
    """What a report prints for one stage's recorded deployment figures (``info["deployment"]``
    of a DistillPrediction output), or None when the stage recorded none (outputs built before
    the measurement existed).

    ``threads`` picks the speed-up: ``"1"`` (batch-1 p50 latency, one thread), ``"all"`` (the
    same with every core) or ``"throughput"`` (batch 32, every core). Returns the cells
    (``student_params``, ``teacher_params``: ``14.4M``; ``size_ratio``, ``speedup``: ``7.6x``),
    their numbers (``*_value``) and ``measured``: one line saying where and how the speed-up was
    measured, to print under the table.
    """
    if not deployment:
        return None
    student, teacher = deployment["student"], deployment.get("teacher")
    speed = deployment.get("speed") or {}
    cores = speed.get("cores")
    if threads == "throughput":
        key = "cpu_throughput"
        batch = student["speed"]["cpu_throughput"]["batch_size"]
        how = f"{cores} threads, batch {batch}, examples/s"
    elif threads in (ONE_THREAD, ALL_THREADS):
        key = SPEEDUP_KEYS[threads]
        count = 1 if threads == ONE_THREAD else cores
        how = f"{count} thread{'s' if count != 1 else ''}, batch 1, p50 latency"
    else:
        raise ValueError(f"threads must be '1', 'all' or 'throughput', not {threads!r}")
    speedup = (speed.get("speedup") or {}).get(key)
    return {"student_params": millions(student["parameters"]), "student_params_value": student["parameters"],
            "teacher_params": millions(teacher["parameters"]) if teacher else None,
            "teacher_params_value": teacher["parameters"] if teacher else None,
            "size_ratio": _times(deployment.get("size_ratio")), "size_ratio_value": deployment.get("size_ratio"),
            "speedup": _times(speedup), "speedup_value": speedup,
            "measured": f"measured on {speed.get('measured_on', 'unknown CPU')} ({cores} cores), {how}, "
                        f"{speed.get('inputs', 'unknown inputs')}"}


def describe_deployment(deployment: dict) -> list[str]:
    """Human lines: one row per model (size, bytes, latency, throughput) and the ratios."""
    speed = deployment["speed"]
    cores = speed["cores"]
    header = (f"{'':<18} {'params':>8} {'w/o emb.':>9} {'MB':>8} {'p50/p95 ms 1 thr':>18} "
              f"{f'p50/p95 ms {cores} thr':>18} {'ex/s b32':>9} {'GPU bf16 ex/s':>14}")
    lines = [header]

    def row(name: str, model: dict) -> str:
        timing = model["speed"]
        one, every = timing["cpu_latency_ms"][ONE_THREAD], timing["cpu_latency_ms"][ALL_THREADS]
        gpu = timing.get("accelerator_bf16_throughput")
        return (f"{name:<18} {millions(model['parameters']):>8} {millions(model['parameters_without_embeddings']):>9} "
                f"{model['safetensors_bytes'] / 1e6:>8.1f} {one['p50']:>8.2f} / {one['p95']:<7.2f} "
                f"{every['p50']:>8.2f} / {every['p95']:<7.2f} {timing['cpu_throughput']['examples_per_s']:>9.1f} "
                f"{format(gpu['examples_per_s'], '.1f') if gpu else 'n/a':>14}")

    lines.append(row("student", deployment["student"]))
    if deployment.get("teacher"):
        lines.append(row("teacher", deployment["teacher"]))
        up = speed["speedup"]
        lines.append(f"{'teacher / student':<18} {_times(deployment['size_ratio']):>8} "
                     f"{_times(deployment['size_ratio_without_embeddings']):>9} {_times(deployment['bytes_ratio']):>8} "
                     f"{_times(up[SPEEDUP_KEYS[ONE_THREAD]]):>18} "
                     f"{_times(up[SPEEDUP_KEYS[ALL_THREADS]]):>18} {_times(up['cpu_throughput']):>9} "
                     f"{_times(up['accelerator_bf16_throughput']):>14}")
    lines.append(f"measured on {speed['measured_on']} ({cores} cores), torch {speed['torch']}, "
                 f"{speed['runs']} timed runs per sentence after warm-up, {speed['inputs']}; "
                 f"GPU: {speed['accelerator'] or 'not measured'}")
    return lines
