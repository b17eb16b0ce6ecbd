"""A seeded, randomly initialised BERT masked LM of the TinyBERT paper's teacher shape.

The GPU check's paper profile (``scripts/gpu_check.py --profile paper``) measures the DAG at
the shapes the TinyBERT paper distils: a BERT-base teacher (12 layers, 768 wide, 12 heads,
FFN 3072) and a TinyBERT4 student (4 x 312, 12 heads, FFN 1200), length 64. A GPU machine
without network cannot download bert-base-uncased, and the packaged MiniLM is a 6 x 384
encoder without a masked-LM head, so this script builds the stand-in: a BERT masked LM of
that shape with random weights drawn from a fixed seed, saved with the tokenizer files of a
given directory (the GPU kit's ``tok/``, else the packaged MiniLM's, which has the same
bert-base-uncased vocabulary). It plays both roles the real checkpoint would:

* the **teacher**: ``FineTuneTeacher`` puts a new classification head on it and fine-tunes
  it for one epoch, so its accuracy is near chance. The check measures throughput and
  memory, which depend on the shape, not on the weights;
* the **masked LM of ``tinybert`` augmentation**: its MLM head is present (random), so
  ``Candidates`` accepts it and proposes random one-piece words, at the cost of a real one.

The same seed gives the same weights and files, so a rerun into the same workdir reuses
every stage built from them. ``SHAPES["tiny"]`` is a toy shape for the CPU test of the
profile: it runs the same code without building a 110M-parameter model.

    python scripts/paper_teacher.py --out /tmp/teacher [--shape base] [--tokenizer-dir .gpu/tok]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

#: Files of a BERT WordPiece tokenizer; vocab.txt is the one that must be there.
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SEED = 0


@dataclass(frozen=True)
class Shape:
    """An encoder's shape: layers, width, attention heads, feed-forward width."""

    layers: int
    hidden: int
    heads: int
    intermediate: int

    def describe(self) -> str:
        return f"{self.layers} x {self.hidden}, {self.heads} heads, FFN {self.intermediate}"


@dataclass(frozen=True)
class PaperShapes:
    """The teacher and the student of one profile shape."""

    teacher: Shape
    student: Shape


#: ``base``: the paper's (BERT-base teacher, TinyBERT4 student). ``tiny``: the CPU test's.
SHAPES = {
    "base": PaperShapes(teacher=Shape(12, 768, 12, 3072), student=Shape(4, 312, 12, 1200)),
    "tiny": PaperShapes(teacher=Shape(4, 48, 4, 96), student=Shape(2, 32, 4, 64)),
}


def tokenizer_dir(kit: Path | None = None) -> Path:
    """Where the tokenizer files come from: the kit's ``tok/`` when it has one, else the
    packaged MiniLM's model directory (bert-base-uncased's vocabulary)."""
    if kit is not None and (Path(kit) / "tok" / "vocab.txt").is_file():
        return Path(kit) / "tok"
    from pipeline.teacher.finetune import default_teacher_dir

    return default_teacher_dir()


def built_shape(directory: Path) -> Shape | None:
    """The shape of the masked LM saved in ``directory``, or None if none is complete there."""
    import json

    config = directory / "config.json"
    if not config.is_file() or not (directory / "model.safetensors").is_file() \
            or not (directory / "vocab.txt").is_file():
        return None
    c = json.loads(config.read_text())
    return Shape(c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["intermediate_size"])


def build_paper_teacher(out: Path, shape: str = "base", tokenizer_from: Path | None = None) -> Path:
    """Save a seeded random ``BertForMaskedLM`` of ``SHAPES[shape].teacher`` and the tokenizer
    files of ``tokenizer_from`` (default: :func:`tokenizer_dir`) in ``out``; return ``out``.

    An ``out`` that already holds a complete model of this shape is kept as it is (the same
    seed would write the same files). The model is written into a sibling directory and
    renamed, so an interrupted build leaves nothing that looks complete.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from pipeline.errors import InputError

    out = Path(out)
    dims = SHAPES[shape].teacher
    if built_shape(out) == dims:
        return out
    source = Path(tokenizer_from) if tokenizer_from is not None else tokenizer_dir()
    if not (source / "vocab.txt").is_file():
        raise InputError("no vocab.txt: a BERT WordPiece tokenizer directory is needed", source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=len(tokenizer), num_hidden_layers=dims.layers, hidden_size=dims.hidden,
                        num_attention_heads=dims.heads, intermediate_size=dims.intermediate)
    BertForMaskedLM(config).save_pretrained(partial)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, partial / name)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to save the masked LM in")
    parser.add_argument("--shape", default="base", choices=sorted(SHAPES),
                        help="base: 12 x 768 (the paper's teacher); tiny: the CPU test's")
    parser.add_argument("--tokenizer-dir", type=Path, default=None,
                        help="tokenizer files to save beside it (default: .gpu/tok, else the packaged MiniLM's)")
    args = parser.parse_args(argv)
    source = args.tokenizer_dir or tokenizer_dir(PROJECT_ROOT / ".gpu")
    out = build_paper_teacher(args.out, args.shape, source)
    print(f"masked LM {SHAPES[args.shape].teacher.describe()} (seed {SEED}, tokenizer of {source}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
