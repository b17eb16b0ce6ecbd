"""The tiny real DAG that the end-to-end tests run: a SST-2-like task of a few dozen rows in
TSV files, a tiny random teacher with MiniLM's real vocabulary, and a 2-layer, 32-wide student.

``tiny_task`` writes the inputs and returns the [PrepareData] and [FineTuneTeacher] sections;
``tiny_stages`` returns the [TeacherCache], [DistillIntermediate] and [DistillPrediction]
sections, each test changing only the settings it is about. One definition, so that a new
trainer setting or a renamed option is changed here once and not in every test's config text.
"""
from __future__ import annotations

import random

from tests.test_cache import make_teacher

WORDS = "good bad movie plot actor great boring fun story scene long short film music".split()

#: The tiny stages' settings, section by section (the values as luigi.cfg text).
TINY_STAGES: dict[str, dict[str, str]] = {
    "TeacherCache": {"examples": "train", "student_layers": "2", "max_seq_length": "32"},
    "DistillIntermediate": {"student_hidden_size": "32", "student_intermediate_size": "64",
                            "student_heads": "4", "epochs": "1", "batch_size": "8",
                            "device": "cpu"},
    "DistillPrediction": {"epochs": "1", "batch_size": "8", "eval_every": "3", "device": "cpu"},
}


def write_tsv(path, n, seed):
    """``n`` rows of random words from WORDS with alternating labels, as a GLUE SST-2 TSV."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"] + [
        f"{' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))}\t{i % 2}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def tiny_task(root, minilm_dir, train_rows: int, dev_rows: int) -> str:
    """A tiny SST-2-like task in ``root`` (TSV files, a tiny random teacher with the real
    vocabulary); returns the [PrepareData] and [FineTuneTeacher] sections that read it."""
    make_teacher(root / "teacher", minilm_dir, hidden_size=48)
    write_tsv(root / "train.tsv", train_rows, 0)
    write_tsv(root / "dev.tsv", dev_rows, 1)
    return f"""
[PrepareData]
source = files
task = SST-2
train_file = {root / 'train.tsv'}
dev_file = {root / 'dev.tsv'}
columns = {{"text_a": "sentence", "label": "label"}}
[FineTuneTeacher]
teacher = {root / 'teacher'}
finetune = never
"""


def tiny_stages(**changes: dict[str, object]) -> str:
    """The cache and the two distillation sections of TINY_STAGES as luigi.cfg text, with
    ``changes`` per section: ``DistillPrediction={"epochs": 2, "eval_every": None}`` sets one
    setting and drops the other (None removes a setting, so its default applies)."""
    unknown = set(changes) - set(TINY_STAGES)
    if unknown:
        raise ValueError(f"tiny_stages: no section {sorted(unknown)} (sections: {list(TINY_STAGES)})")
    text = []
    for section, settings in TINY_STAGES.items():
        merged: dict[str, object] = {**settings, **changes.get(section, {})}
        text.append(f"[{section}]")
        text += [f"{key} = {value}" for key, value in merged.items() if value is not None]
    return "\n" + "\n".join(text) + "\n"
