"""The plain-Python stages of the tinykd DAG (no Luigi here: ``tasks/`` wires them).

One subpackage per stage of the DAG, in data order, over two shared modules:

* :mod:`pipeline.stage` (the stage contract: fingerprints, atomic publication, manifests),
  :mod:`pipeline.locks` (one builder per output) and
  :mod:`pipeline.errors` (the one exception a bad input raises) sit at the bottom;
* :mod:`pipeline.common`: pieces several stages share (example sources, tokenisation, metrics,
  the compute device);
* :mod:`pipeline.prepare` -> :mod:`pipeline.augment` -> :mod:`pipeline.teacher` ->
  :mod:`pipeline.cache` -> (``distill/``, the trainer) -> :mod:`pipeline.ablations`.

A module imports only from its own stage, from stages before it in that order, and from the
bottom layer; ``tests/test_layering.py`` fails on an import circle or an upward import.
"""
