"""Stages ``TeacherCacheShard`` and ``TeacherCache``: the teacher runs once, Parquet keeps it.

* :mod:`pipeline.cache.layer_map` decides which teacher layers a student learns from, and so
  which layers the cache must hold;
* :mod:`pipeline.common.encoder_outputs` (shared with the trainer, which runs it on the
  student) captures an encoder's internals (hidden states and pre-softmax attention scores or
  attention log-probabilities, through the family's adapter in :mod:`pipeline.common.encoders`)
  from a live forward pass;
* :mod:`pipeline.cache.writer` runs the teacher over examples and writes one shard's Parquet
  file; :mod:`pipeline.cache.assemble` makes that a stage output and assembles the shards into
  a cache (manifest, teacher parts, size figures);
* :mod:`pipeline.cache.reader` streams training batches back out of them, packed
  (:mod:`pipeline.cache.packed`: rows as stored, expanded on the training device);
* :mod:`pipeline.cache.inspect_cache` summarises and verifies a cache (``tinykd inspect``).

The trainer (``distill/``) reads caches only through :mod:`pipeline.cache.reader`.
"""
