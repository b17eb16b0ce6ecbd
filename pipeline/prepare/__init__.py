"""Stage ``PrepareData``: any supported source -> validated ``train``/``dev`` Parquet splits.

* :mod:`pipeline.prepare.splits` reads a GLUE directory, a Hugging Face dataset or CSV/TSV/
  JSONL/Parquet files, validates every row and writes the normalised ``id, text_a, text_b,
  label`` layout every later stage reads.
* :mod:`pipeline.prepare.demo_task` writes the offline demo's small SST-2-like task.
"""
