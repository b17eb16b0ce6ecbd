"""The student as ONNX (checked by onnxruntime), its dynamic-int8 variant, and both timed.

Small encoders are deployed on runtimes, not in a PyTorch process: onnxruntime on a server or
a phone. :func:`export_student` turns a stage-2 ``student/`` into those artifacts and checks
them before anything is published:

* ``model.onnx``: torch's own exporter (``torch.onnx.export``, the ``torch.export``-based path
  that torch recommends since 2.9), logits only, with the batch and sequence axes dynamic (one
  file serves any batch and any length up to the model's positions). The inputs are exactly
  the student's tokenizer outputs (``input_ids``, ``attention_mask`` and, for families that
  embed them, ``token_type_ids``), so ``session.run(None, dict(tokenizer(texts,
  return_tensors="np")))`` works as it is. Weights are inside the file (no external data).
* **parity on the dev set**: onnxruntime and PyTorch run the same padded dev batches; the
  largest logit difference must stay within ``parity_tolerance`` (1e-4) and every prediction
  must be the same, else the stage fails naming the file and the worst example. The dev metric
  of both is recorded.
* ``model.int8.onnx`` (``quantize = "dynamic"``): onnxruntime's dynamic quantisation -- int8
  weights (per output channel) for every MatMul and the embedding tables (Gather), activations
  quantised on the fly. Its dev metric is compared with the fp32 model's by the ablations'
  paired bootstrap over dev examples (:func:`pipeline.ablations.statistics.paired_bootstrap`),
  and a loss beyond ``int8_tolerance`` points is **flagged** in the record (``flagged``) and
  logged as a warning: the variant is still written, for the user to judge, never hidden.
* the tokenizer and ``config.json`` beside them, so the directory is self-contained.

Every file is written under a temporary name and renamed (``pipeline.stage.write_file_atomic``),
inside the stage's partial directory: a failure leaves no ``model.onnx`` that looks complete.

Speed (:func:`runtime_speed`): PyTorch, onnxruntime fp32 and int8 timed by
:func:`distill.speed.cpu_speed` on the same dev sentences -- batch-1 latency with 1 thread and
every core, batch-32 throughput -- and the ratios to PyTorch. Those figures sit under
``speed`` keys (run history).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from distill.speed import (ALL_THREADS, ONE_THREAD, ExportedModel, Sentences, SpeedSettings, TorchRunner,
                           available_cores, cpu_name, cpu_speed, evenly_spaced, load_exported,
                           sentences_from_table)
from pipeline.errors import InputError
from pipeline.stage import write_file_atomic

LOG = logging.getLogger("tinykd.deploy")

ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
#: Largest |logit difference| between onnxruntime and PyTorch accepted on dev.
PARITY_TOLERANCE = 1e-4
#: Dev-metric points (metric x 100) the int8 variant may lose before it is flagged.
INT8_TOLERANCE_POINTS = 1.0
#: Batch size of the dev parity pass (PyTorch and onnxruntime run the same batches).
PARITY_BATCH = 32
QUANTIZE_MODES = ("none", "dynamic")


class ExportMismatch(RuntimeError):
    """The exported model does not compute what the PyTorch student computes."""


# --- export ---------------------------------------------------------------------------------

def _logits_module(model, input_names):
    """A module whose forward takes the inputs positionally and returns the logits alone."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        # named arguments in INPUT_ORDER (torch.export needs a fixed signature); token types
        # only for the families that embed them
        def forward(self, input_ids, attention_mask, token_type_ids=None):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                inputs["token_type_ids"] = token_type_ids
            return self.model(**inputs).logits

    # eval mode matters: exported in training mode, the graph would keep its dropout
    return LogitsOnly().eval()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's per-step progress lines and its warnings about optional operator
    libraries (torchvision) off the console; real errors still raise."""
    import io
    import warnings

    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        quiet.setLevel(level)


def export_onnx(exported: ExportedModel, path: Path, opset: int | None = None) -> dict[str, Any]:
    """Export ``exported.model`` to ``path`` with dynamic batch and sequence axes (atomically).

    The example input has batch 2 and length 8: ``torch.export`` specialises dimensions of size
    1, so neither axis may be 1 in the example."""
    import torch

    model, names = exported.model.eval(), exported.input_names
    example = tuple(torch.full((2, 8), 5, dtype=torch.long) if name == "input_ids" else
                    torch.ones((2, 8), dtype=torch.long) if name == "attention_mask" else
                    torch.zeros((2, 8), dtype=torch.long) for name in names)
    positions = getattr(model.config, "max_position_embeddings", None)
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=positions) if positions else torch.export.Dim("sequence")
    module = _logits_module(model, names)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(module, example, None, input_names=names, output_names=["logits"],
                                        dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
                                        opset_version=opset, dynamo=True, external_data=False,
                                        verbose=False)
    except Exception as exc:   # the exporter raises many types; one line naming the model
        raise ExportMismatch(f"{exported.directory}: torch.onnx.export failed "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:500]})") from exc
    write_file_atomic(path, lambda temporary: program.save(temporary, external_data=False))
    import onnx

    opsets = {entry.domain or "ai.onnx": entry.version
              for entry in onnx.load(str(path), load_external_data=False).opset_import}
    return {"file": path.name, "bytes": path.stat().st_size, "inputs": list(names), "outputs": ["logits"],
            "dynamic_axes": {"batch": 0, "sequence": 1}, "opset": opsets.get("ai.onnx"),
            "exporter": f"torch.onnx.export (dynamo), torch {torch.__version__}"}


def quantize_dynamic_int8(source: Path, path: Path) -> dict[str, Any]:
    """onnxruntime's dynamic quantisation of ``source`` into ``path`` (atomically): int8 weights
    per output channel for MatMul and Gather (the embedding tables), activations on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    advice = _DropPreprocessAdvice()
    root.addFilter(advice)
    try:
        write_file_atomic(path, lambda temporary: quantize_dynamic(
            source, temporary, weight_type=QuantType.QInt8, per_channel=True))
    finally:
        root.removeFilter(advice)
    return {"file": path.name, "bytes": path.stat().st_size,
            "quantization": "onnxruntime dynamic: int8 weights per channel (MatMul, Gather), "
                            "uint8 activations quantised per call"}


class _DropPreprocessAdvice(logging.Filter):
    """The quantiser logs a generic pre-processing advice (for image models) on every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in str(record.msg)


# --- onnxruntime ----------------------------------------------------------------------------

def onnx_session(path: Path, threads: int):
    """An onnxruntime CPU session of ``path`` with ``threads`` intra-op threads (all graph
    optimisations on; one inter-op thread: a BERT graph is one chain of operators)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:   # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        raise InputError(f"onnxruntime cannot load it ({' '.join(str(exc).split())[:300]})", path) from None


class OnnxRunner:
    """An onnxruntime session as a timed callable (the :class:`distill.speed.TorchRunner` contract)."""

    def __init__(self, session):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]

    def feed(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: arrays[name] for name in self.input_names}

    def __call__(self, feed: dict[str, np.ndarray]):
        return self.session.run(None, feed)[0]

    def logits(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self(self.feed(arrays)), dtype=np.float32)


def session_factory(path: Path):
    """``threads -> OnnxRunner`` with one session per thread count (onnxruntime fixes its
    threads when a session is made)."""
    sessions: dict[int, OnnxRunner] = {}

    def make(threads: int) -> OnnxRunner:
        if threads not in sessions:
            sessions[threads] = OnnxRunner(onnx_session(path, threads))
        return sessions[threads]

    return make


def all_logits(runner, sentences: Sentences, input_names, batch_size: int = PARITY_BATCH) -> np.ndarray:
    """Logits of every sentence, in order, run in padded batches of ``batch_size``."""
    return np.concatenate([runner.logits(batch) for batch in sentences.batches(batch_size, input_names)])


# --- checks ---------------------------------------------------------------------------------

def _predictions(logits: np.ndarray, task_type: str) -> np.ndarray:
    return logits[:, 0] if task_type == "regression" else logits.argmax(axis=-1)


def check_parity(reference: np.ndarray, candidate: np.ndarray, ids: list, task_type: str,
                 tolerance: float, where: Path) -> dict[str, Any]:
    """onnxruntime's logits against PyTorch's on the same batches: within ``tolerance`` and the
    same predictions, else :class:`ExportMismatch` naming the file and the worst example."""
    difference = np.abs(reference - candidate).max(axis=-1)
    worst = int(difference.argmax())
    changed = int((_predictions(reference, task_type) != _predictions(candidate, task_type)).sum()) \
        if task_type != "regression" else 0
    record = {"max_abs_logit_difference": float(difference.max()), "tolerance": tolerance,
              "predictions_equal": changed == 0, "predictions_changed": changed, "examples": len(ids)}
    if difference.max() > tolerance or changed:
        raise ExportMismatch(f"{where}: onnxruntime's logits differ from PyTorch's by up to "
                             f"{difference.max():.3g} (tolerance {tolerance:g}; worst: dev example "
                             f"{ids[worst]!r}), {changed} prediction(s) changed")
    return record


def compare_int8(fp32_logits: np.ndarray, int8_logits: np.ndarray, labels: np.ndarray, task: dict,
                 tolerance_points: float) -> dict[str, Any]:
    """The int8 variant's dev metric against the fp32 model's, with the 95 % paired-bootstrap
    interval of the difference (the ablations' statistics), and whether it is flagged: a loss
    of more than ``tolerance_points`` metric points (x 100) on the point estimate."""
    from pipeline.ablations.statistics import paired_bootstrap, predicted
    from pipeline.common.metrics import task_metrics

    task_type = task.get("task_type") or "classification"
    fp32 = task_metrics(task.get("task"), task_type, fp32_logits, labels, task.get("metric"))
    int8 = task_metrics(task.get("task"), task_type, int8_logits, labels, task.get("metric"))
    metric = fp32["primary_metric"]
    difference = paired_bootstrap(metric, predicted(int8_logits, metric), predicted(fp32_logits, metric), labels)
    loss_points = -100 * difference.delta
    changed = int((_predictions(fp32_logits, task_type) != _predictions(int8_logits, task_type)).sum()) \
        if task_type != "regression" else None
    return {"metric": metric, "fp32": fp32["primary"], "int8": int8["primary"],
            "difference": difference.as_dict(), "loss_points": round(loss_points, 4),
            "tolerance_points": tolerance_points, "flagged": bool(loss_points > tolerance_points),
            "predictions_changed": changed,
            "max_abs_logit_difference": float(np.abs(fp32_logits - int8_logits).max())}


# --- speed ----------------------------------------------------------------------------------

def runtime_speed(exported: ExportedModel, onnx_files: dict[str, Path], sentences: Sentences,
                  settings: SpeedSettings) -> dict[str, Any]:
    """PyTorch and each ONNX file timed the same way on the same sentences, and each ONNX
    runtime's figures over PyTorch's (latency: < 1 is faster; throughput: > 1 is faster)."""
    cores = available_cores()
    torch_runner = TorchRunner(exported.model, exported.input_names)
    figures = {"pytorch": cpu_speed(lambda threads: torch_runner, sentences, exported.input_names,
                                    settings, cores)}
    for name, path in onnx_files.items():
        figures[name] = cpu_speed(session_factory(path), sentences, exported.input_names, settings, cores)
    base = figures["pytorch"]
    versus = {}
    for name in onnx_files:
        own = figures[name]
        versus[name] = {
            **{f"latency_p50_{'1_thread' if label == ONE_THREAD else 'all_threads'}":
               round(own["cpu_latency_ms"][label]["p50"] / base["cpu_latency_ms"][label]["p50"], 4)
               for label in (ONE_THREAD, ALL_THREADS)},
            "cpu_throughput": round(own["cpu_throughput"]["examples_per_s"]
                                    / base["cpu_throughput"]["examples_per_s"], 4)}
    return {"measured_on": cpu_name(), "cores": cores, "inputs": sentences.describe(), "runs": settings.runs,
            "runtimes": figures, "versus_pytorch": versus}


# --- the stage's work -------------------------------------------------------------------------

def dev_sentences(prepared_dir: Path, tokenizer, max_seq_length: int):
    """Every dev row tokenised as the cache tokenises (``Sentences``), with labels and ids."""
    from pipeline.prepare.splits import read_split

    table = read_split(prepared_dir, "dev")
    sentences = sentences_from_table(table.select(["text_a", "text_b"]), tokenizer, max_seq_length,
                                     where=str(Path(prepared_dir) / "dev.parquet"))
    return sentences, table.column("label").to_numpy(zero_copy_only=False), table.column("id").to_pylist()


def export_student(student_dir: Path, prepared_dir: Path, out_dir: Path, task: dict, max_seq_length: int,
                   quantize: str = "none", parity_tolerance: float = PARITY_TOLERANCE,
                   int8_tolerance: float = INT8_TOLERANCE_POINTS,
                   settings: SpeedSettings = SpeedSettings(), measure_speed: bool = True) -> dict[str, Any]:
    """Export ``student_dir`` into ``out_dir`` (see the module text); return the record for the
    stage's manifest: ``onnx`` (file, bytes, parity, dev metrics), ``int8`` (with quantize =
    dynamic), ``student_bytes`` and, with ``measure_speed``, ``speed`` (run history)."""
    from pipeline.common.metrics import task_metrics

    if quantize not in QUANTIZE_MODES:
        raise InputError(f"quantize = {quantize!r}: choose one of {QUANTIZE_MODES}")
    out_dir = Path(out_dir)
    exported = load_exported(student_dir)
    if exported.tokenizer is None:
        raise InputError("the student has no tokenizer beside it (an export needs one)", student_dir)
    onnx_path = out_dir / ONNX_NAME
    record: dict[str, Any] = {"onnx": export_onnx(exported, onnx_path),
                              "student_bytes": int(sum(p.stat().st_size for p in exported.weight_files))}
    exported.tokenizer.save_pretrained(out_dir)
    exported.model.config.save_pretrained(out_dir)

    sentences, labels, ids = dev_sentences(prepared_dir, exported.tokenizer, max_seq_length)
    task_type = task.get("task_type") or "classification"
    torch_logits = all_logits(TorchRunner(exported.model, exported.input_names), sentences, exported.input_names)
    onnx_logits = all_logits(session_factory(onnx_path)(1), sentences, exported.input_names)
    record["onnx"]["parity"] = check_parity(torch_logits, onnx_logits, ids, task_type, parity_tolerance, onnx_path)
    metrics = {runtime: task_metrics(task.get("task"), task_type, logits, labels, task.get("metric"))
               for runtime, logits in (("pytorch", torch_logits), ("onnxruntime", onnx_logits))}
    record["onnx"]["dev_metric"] = {"metric": metrics["pytorch"]["primary_metric"],
                                    **{runtime: m["primary"] for runtime, m in metrics.items()}}
    onnx_files = {"onnxruntime": onnx_path}
    if quantize == "dynamic":
        int8_path = out_dir / INT8_NAME
        record["int8"] = quantize_dynamic_int8(onnx_path, int8_path)
        record["int8"]["bytes_vs_fp32"] = round(record["int8"]["bytes"] / record["onnx"]["bytes"], 4)
        int8_logits = all_logits(session_factory(int8_path)(1), sentences, exported.input_names)
        record["int8"]["dev"] = compare_int8(onnx_logits, int8_logits, labels, task, int8_tolerance)
        if record["int8"]["dev"]["flagged"]:
            dev = record["int8"]["dev"]
            LOG.warning("%s: the int8 variant loses %.2f %s points on dev (tolerance %.2f): flagged, "
                        "kept for you to judge; model.onnx is the fp32 student", int8_path,
                        dev["loss_points"], dev["metric"], int8_tolerance)
        onnx_files["onnxruntime_int8"] = int8_path
    if measure_speed:
        timed = sentences.subset(evenly_spaced(len(sentences), settings.max_sentences))
        record["speed"] = runtime_speed(exported, onnx_files, timed, settings)
    return record


def describe_export(record: dict[str, Any]) -> list[str]:
    """Human lines: the artifacts, parity, int8's metric with its interval, the timings."""
    onnx = record["onnx"]
    parity, metric = onnx["parity"], onnx["dev_metric"]
    lines = [f"model.onnx: {onnx['bytes'] / 1e6:.1f} MB (student safetensors {record['student_bytes'] / 1e6:.1f} MB); "
             f"onnxruntime vs PyTorch on {parity['examples']} dev examples: max |logit diff| "
             f"{parity['max_abs_logit_difference']:.2g} (tolerance {parity['tolerance']:g}), "
             f"{'same predictions' if parity['predictions_equal'] else 'PREDICTIONS DIFFER'}, "
             f"dev {metric['metric']} {metric['onnxruntime']:.4f} (PyTorch {metric['pytorch']:.4f})"]
    int8 = record.get("int8")
    if int8:
        dev = int8["dev"]
        diff = dev["difference"]
        lines.append(f"model.int8.onnx: {int8['bytes'] / 1e6:.1f} MB ({int8['bytes_vs_fp32']:.2f}x of fp32); dev "
                     f"{dev['metric']} {dev['int8']:.4f} vs fp32 {dev['fp32']:.4f}: "
                     f"{100 * diff['delta']:+.2f} points [{100 * diff['low']:+.2f}, {100 * diff['high']:+.2f}]"
                     + ("  ** FLAGGED: loses more than " f"{dev['tolerance_points']:g} points **" if dev["flagged"]
                        else f" (tolerance {dev['tolerance_points']:g} points)"))
    speed = record.get("speed")
    if speed:
        for name, figures in sorted(speed["runtimes"].items(), key=lambda item: item[0] != "pytorch"):
            one, every = figures["cpu_latency_ms"][ONE_THREAD], figures["cpu_latency_ms"][ALL_THREADS]
            versus = speed["versus_pytorch"].get(name)
            lines.append(f"  {name:<17} batch 1: p50 {one['p50']:.2f} ms (1 thread), {every['p50']:.2f} ms "
                         f"({every['threads']} threads); batch {figures['cpu_throughput']['batch_size']}: "
                         f"{figures['cpu_throughput']['examples_per_s']:.0f} examples/s"
                         + (f"  [{versus['latency_p50_1_thread']:.2f}x PyTorch's 1-thread latency]" if versus else ""))
        lines.append(f"  measured on {speed['measured_on']} ({speed['cores']} cores), {speed['runs']} timed runs "
                     f"per sentence after warm-up, {speed['inputs']}")
    return lines
