"""Luigi wiring of the pipeline. Importing this package registers every task with Luigi.

Kept cheap to import (no torch/transformers): ``luigi --module tasks`` and ``tinykd`` load it
on every rerun.
"""
from tasks import ablations, augment, base, deploy, distill, glue, prepare, teacher  # noqa: F401
