"""Loading a checkpoint and saying, in our words, what its load left out.

``from_pretrained`` prints a load report whenever the checkpoint and the model class differ:
a table of ``MISSING`` / ``UNEXPECTED`` / ``MISMATCH`` keys with ANSI colour codes (even when
the output is a file) and the advice "Consider training on your downstream task". In this
pipeline most of those differences are the plan, not a problem:

* a bare encoder (the packaged MiniLM, ``bert-base-uncased``) loaded as a sequence classifier
  has no classifier weights -- the head is new *on purpose*, and ``FineTuneTeacher`` or stage 2
  trains it;
* a fine-tuned teacher loaded as a bare encoder (a student built from teacher layers, a cache
  of hidden states only) leaves the classifier unused on purpose;
* a pre-training checkpoint loaded as a masked LM leaves its next-sentence head unused.

Printed as the library prints them, these read like errors on the first screen of a run. So
:func:`load_pretrained` keeps the library's report off the console, compares what the load did
with what the caller declared (``new_head``: the task head may be missing or resized;
``partial``: checkpoint weights outside the model are expected), and logs one warning naming
the checkpoint for everything else -- an encoder weight missing or resized (it would be
random), an unexpected key where the checkpoint should match the model exactly. Nothing the
library reports is dropped: what was expected is in :class:`LoadReport` for the caller's own
one-line message ("new classification head: 2 labels, trained by this stage").
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

LOG = logging.getLogger("tinykd.loading")

#: Buffers a checkpoint may or may not carry, recomputed by the model either way.
_DERIVED_BUFFERS = ("position_ids", "token_type_ids")


@dataclass
class LoadReport:
    """What one ``from_pretrained`` call did, split into what the caller expected and what not."""

    checkpoint: str
    #: task-head weights that the checkpoint lacked or had in another shape: newly initialised
    new_head_keys: list[str] = field(default_factory=list)
    #: checkpoint weights the model does not use (expected with ``partial``)
    unused_keys: list[str] = field(default_factory=list)
    #: every difference the caller did not declare, as readable phrases (empty: a clean load)
    problems: list[str] = field(default_factory=list)

    @property
    def head_is_new(self) -> bool:
        return bool(self.new_head_keys)


class _DropLoadReport(logging.Filter):
    """Drops the one record that holds transformers' load report table."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def library_report_silenced() -> Iterator[None]:
    """Keep transformers' load report and its "Loading weights" progress bar off the console
    for the duration of one load; every other message of the library still gets through.

    The report is one record of the ``transformers.modeling_utils`` logger, dropped by a filter
    on that logger (its level is left alone: transformers 5 reads it to decide other warnings).
    """
    from transformers.utils import logging as hf_logging

    loader_logger = logging.getLogger("transformers.modeling_utils")
    drop_report = _DropLoadReport()
    bar = hf_logging.is_progress_bar_enabled()
    loader_logger.addFilter(drop_report)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        loader_logger.removeFilter(drop_report)
        if bar:
            hf_logging.enable_progress_bar()


def _listing(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}"


def classify_load(model, checkpoint: str, info: dict, *, new_head: bool, partial: bool) -> LoadReport:
    """Split ``from_pretrained``'s ``loading_info`` into the expected and the unexpected.

    A model with a task head (``model.base_model is not model``) has head keys: those outside
    its ``base_model_prefix``. Missing or resized head keys are expected with ``new_head``;
    missing or resized encoder keys never are. Unused checkpoint keys are expected with
    ``partial``.
    """
    prefix = f"{model.base_model_prefix}."
    has_head = model.base_model is not model

    def is_head(key: str) -> bool:
        return has_head and not key.startswith(prefix)

    def derived(key: str) -> bool:
        return key.rsplit(".", 1)[-1] in _DERIVED_BUFFERS

    missing = sorted(k for k in info.get("missing_keys", ()) if not derived(k))
    mismatched = sorted(info.get("mismatched_keys", ()))
    unused = sorted(k for k in info.get("unexpected_keys", ()) if not derived(k))
    report = LoadReport(str(checkpoint), unused_keys=unused)
    head_missing = [k for k in missing if is_head(k)]
    head_resized = [k for k, *_ in mismatched if is_head(k)]
    encoder_missing = [k for k in missing if not is_head(k)]
    encoder_resized = [f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in mismatched if not is_head(k)]
    if new_head:
        report.new_head_keys = head_missing + head_resized
    else:
        encoder_missing += head_missing
        encoder_resized += [f"{k} (resized)" for k in head_resized]
    if encoder_missing:
        report.problems.append(f"{len(encoder_missing)} weight(s) missing from the checkpoint, "
                               f"newly initialised (random): {_listing(encoder_missing)}")
    if encoder_resized:
        report.problems.append(f"{len(encoder_resized)} weight(s) of another shape in the checkpoint, "
                               f"newly initialised (random): {_listing(encoder_resized)}")
    if unused and not partial:
        report.problems.append(f"{len(unused)} checkpoint weight(s) the model does not use: "
                               f"{_listing(unused)}")
    return report


def load_pretrained(model_class, checkpoint: str | Path, *, new_head: bool = False,
                    partial: bool = False, **kwargs):
    """``model_class.from_pretrained(checkpoint, **kwargs)`` with our load report instead of
    the library's: returns ``(model, LoadReport)``, having logged one warning naming the
    checkpoint when the load did anything the caller did not declare (see the module text).

    Errors of the load itself (a missing directory, a corrupt file) propagate unchanged.
    """
    with library_report_silenced():
        model, info = model_class.from_pretrained(str(checkpoint), output_loading_info=True, **kwargs)
    report = classify_load(model, str(checkpoint), info, new_head=new_head, partial=partial)
    if report.problems:
        LOG.warning("loading %s as %s: %s", checkpoint, type(model).__name__, "; ".join(report.problems))
    return model, report
