"""Which teacher layer each student layer learns from (TinyBERT's mapping function g).

Layers are numbered as in ``output_hidden_states``: 0 is the embedding output, 1..N the
transformer layers. With a teacher of N layers and a student of M, student layer m learns
from teacher layer g(m); g(0) = 0 always (embedding loss).

* ``uniform``: g(m) = m·N/M (TinyBERT's default). When N/M is not an integer (a 6-layer
  MiniLM teacher and a 4-layer student) the product is rounded half up, which keeps
  g(M) = N and spreads the others evenly.
* ``top``: the last M teacher layers, g(m) = N − M + m.
* ``bottom``: the first M teacher layers, g(m) = m.
* ``explicit``: a user-given list of M teacher layers.

The teacher cache stores hidden states for ``[0] + g(1..M)`` and attention scores for
``g(1..M)``, so the mapping is part of the cache's identity and the trainer checks it.
"""
from __future__ import annotations

import math
from typing import Sequence

STRATEGIES = ("uniform", "top", "bottom", "explicit")


def layer_map(teacher_layers: int, student_layers: int, strategy: str = "uniform",
              explicit: Sequence[int] | None = None) -> list[int]:
    """Teacher layer (1..N) for each student layer 1..M, as a list of length M."""
    if teacher_layers < 1 or student_layers < 1:
        raise ValueError(f"layer counts must be positive (teacher {teacher_layers}, student {student_layers})")
    if strategy != "explicit" and student_layers > teacher_layers:
        raise ValueError(f"a {student_layers}-layer student cannot map onto a {teacher_layers}-layer "
                         "teacher with one teacher layer per student layer; give an explicit map")
    if strategy == "uniform":
        ratio = teacher_layers / student_layers
        mapped = [int(math.floor(m * ratio + 0.5)) for m in range(1, student_layers + 1)]
    elif strategy == "top":
        mapped = [teacher_layers - student_layers + m for m in range(1, student_layers + 1)]
    elif strategy == "bottom":
        mapped = list(range(1, student_layers + 1))
    elif strategy == "explicit":
        if explicit is None or len(explicit) != student_layers:
            raise ValueError(f"explicit layer map needs {student_layers} teacher layers, got {explicit!r}")
        mapped = [int(x) for x in explicit]
    else:
        raise ValueError(f"unknown layer-map strategy {strategy!r}; choose one of {STRATEGIES}")
    bad = [x for x in mapped if not 1 <= x <= teacher_layers]
    if bad:
        raise ValueError(f"teacher layer(s) {bad} outside the teacher's 1..{teacher_layers}")
    return mapped


def cached_layers(mapped: Sequence[int]) -> tuple[list[int], list[int]]:
    """(hidden-state layers, attention layers) a cache must hold for a layer map."""
    return [0, *mapped], list(mapped)


def parse_layer_list(text: str) -> list[int]:
    """Parse ``"2,4,6"`` (empty string: empty list) into ints, with a clear error."""
    text = text.strip()
    if not text:
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"layer list must be comma-separated integers, got {text!r}") from None
