"""Stages ``DistillIntermediate``, ``DistillPrediction`` and ``DistillGeneral``: the trainer.

The student learns from the teacher cache alone (:mod:`pipeline.cache.reader`), or from a live
teacher for parity checks: :mod:`distill.losses` (TinyBERT's losses), :mod:`distill.student`
(build, initialise and export the student), :mod:`distill.trainer` (the loop, resumable),
:mod:`distill.evaluate` (dev metrics), :mod:`distill.recipes` and :mod:`distill.run` (one
stage, end to end). ``distill`` imports from ``pipeline``, never the other way round.
"""
