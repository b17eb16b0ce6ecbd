"""The offline demo task: a small SST-2-like sentiment set in the GLUE layout, generated.

The demo must run without network access and without ../shared, and GLUE files are never
committed, so the project *writes* its own tiny task: ``<glue_root>/SST-2/{train,dev}.tsv``
(header ``sentence<TAB>label``, 1 = positive). ``tinykd demo`` writes it into ``data/demo/``
(git-ignored) the first time it runs. Sentences are generated from hand-written word lists and
templates, deterministically (a fixed seed: every machine writes the same bytes, so the
PrepareData fingerprint, which hashes file content, is the same everywhere), lower-cased and
with punctuation split off like SST-2's text. They use ordinary English words so that GloVe
neighbours and MLM predictions during augmentation are meaningful.

To make the task learnable but not a bag-of-words lookup, the label often depends on
structure: negation ("is not good"), contrast where the later clause wins ("... is dull but
the ending is moving"), expectations overturned ("expected a bad film and got a great one"),
negated negatives ("not a single dull moment"), "far from a masterpiece", "nothing clever
about it" and "could not be more charming" (a negation that does not flip). Train and dev hold
different sentences.

By hand:  python -m pipeline.prepare.demo_task --out DIR [--train 600 --dev 120]
"""
from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

SEED = 20201116  # fixed: every machine must write the same bytes
#: Sizes of the demo task's splits.
DEMO_TRAIN, DEMO_DEV = 600, 120
SPLITS = ("train", "dev")

POSITIVE_ADJECTIVES = [
    "good", "great", "wonderful", "charming", "delightful", "moving", "funny", "clever",
    "beautiful", "brilliant", "engaging", "touching", "smart", "fresh", "warm", "enjoyable",
    "gripping", "memorable", "witty", "superb", "stunning", "heartfelt", "inventive",
    "thoughtful", "lovely", "compelling", "satisfying", "powerful", "elegant", "sweet",
]
NEGATIVE_ADJECTIVES = [
    "bad", "dull", "boring", "tedious", "awful", "clumsy", "bland", "predictable", "tiresome",
    "lifeless", "pointless", "messy", "shallow", "forgettable", "silly", "painful", "stale",
    "flat", "weak", "terrible", "ugly", "lazy", "confusing", "hollow", "annoying", "sloppy",
    "dreary", "cheap", "empty", "mediocre",
]
NOUNS = [
    "film", "movie", "story", "script", "cast", "performance", "direction", "plot", "ending",
    "soundtrack", "dialogue", "acting", "comedy", "drama", "thriller", "picture", "screenplay",
    "photography", "documentary", "romance", "sequel", "premise", "finale", "score",
]
INTENSIFIERS = ["", "", "very ", "really ", "quite ", "remarkably ", "truly ", "rather ",
                "genuinely ", "surprisingly ", "consistently "]
POSITIVE_NOUNS = ["triumph", "joy", "gem", "treat", "delight", "masterpiece", "pleasure", "marvel"]
NEGATIVE_NOUNS = ["mess", "disaster", "bore", "chore", "letdown", "failure", "waste", "slog"]
POSITIVE_VERBS = ["loved", "enjoyed", "admired", "adored", "savored", "appreciated"]
NEGATIVE_VERBS = ["hated", "disliked", "regretted", "resented", "endured", "despised"]
# Verbs whose negation reads as clearly negative ("did not enjoy").
NEGATABLE_VERBS = ["enjoy", "like", "love", "admire", "recommend", "appreciate"]
SUBJECTS = ["i", "we", "my friends", "the audience", "critics", "most viewers", "my family"]
OPENERS = ["", "", "", "frankly , ", "overall , ", "in the end , ", "honestly , ", "sadly , ",
           "thankfully , ", "by the way , "]
# "sadly" / "thankfully" carry sentiment themselves; they are only used where they agree.
SENTIMENT_OPENERS = {"sadly , ": 0, "thankfully , ": 1}


def _adjective(rng: random.Random, polarity: int) -> str:
    return rng.choice(POSITIVE_ADJECTIVES if polarity else NEGATIVE_ADJECTIVES)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(rng: random.Random) -> tuple[str, int]:
    """One (sentence, label) pair from a randomly chosen template."""
    label = rng.randrange(2)
    noun, other = rng.sample(NOUNS, 2)
    adj = _adjective(rng, label)
    flipped = _adjective(rng, 1 - label)
    intensifier = rng.choice(INTENSIFIERS)
    template = rng.randrange(14)
    if template == 0:
        text = f"the {noun} is {intensifier}{adj} ."
    elif template == 1:  # negation flips the adjective
        text = f"the {noun} is not {intensifier}{flipped} ."
    elif template == 2:
        phrase = f"{intensifier}{adj}"
        text = f"{_article(phrase)} {phrase} {noun} ."
    elif template == 3:  # contrast: the clause after "but" decides
        text = f"the {noun} is {flipped} but the {other} is {intensifier}{adj} ."
    elif template == 4:
        text = f"although the {noun} is {flipped} , the {other} is {intensifier}{adj} ."
    elif template == 5:
        verb = rng.choice(POSITIVE_VERBS if label else NEGATIVE_VERBS)
        text = f"{rng.choice(SUBJECTS)} {verb} this {noun} ."
    elif template == 6 and label == 0:
        text = f"{rng.choice(SUBJECTS)} did not {rng.choice(NEGATABLE_VERBS)} this {noun} at all ."
    elif template == 6:
        text = f"{rng.choice(SUBJECTS)} would gladly {rng.choice(['watch', 'see', 'recommend'])} " \
               f"this {noun} again ."
    elif template == 7:
        pnoun = rng.choice(POSITIVE_NOUNS if label else NEGATIVE_NOUNS)
        text = f"the {noun} is {_article(pnoun)} {pnoun} ."
    elif template == 8:  # "far from a masterpiece" is negative, "far from a disaster" positive
        pnoun = rng.choice(NEGATIVE_NOUNS if label else POSITIVE_NOUNS)
        text = f"this {noun} is far from {_article(pnoun)} {pnoun} ."
    elif template == 9:  # a negation that does not flip
        text = f"the {noun} could not be more {adj} ."
    elif template == 10:
        text = f"there is nothing {flipped} about the {noun} ."
    elif template == 11:  # "not a single dull moment" is praise
        text = f"not a single {flipped} moment in the whole {noun} ."
    elif template == 12:
        text = f"i expected {_article(flipped)} {flipped} {noun} and got {_article(adj)} {adj} one ."
    else:
        second = _adjective(rng, label)
        text = f"{adj} and {second} , the {noun} {rng.choice(['works', 'plays', 'unfolds'])} " \
               f"{rng.choice(['well', 'as intended', 'just as planned', 'from start to finish'])} ." \
            if label else \
            f"{adj} and {second} , the {noun} never {rng.choice(['works', 'comes alive', 'finds its feet'])} ."
    opener = rng.choice(OPENERS)
    if SENTIMENT_OPENERS.get(opener, label) != label:
        opener = ""
    return opener + text, label


def generate(count: int, rng: random.Random, exclude: set[str]) -> list[tuple[str, int]]:
    """``count`` distinct sentences not in ``exclude``, with labels balanced to within one."""
    rows: list[tuple[str, int]] = []
    seen = set(exclude)
    per_label = [0, 0]
    while len(rows) < count:
        text, label = _sentence(rng)
        if text in seen or per_label[label] >= (count + 1) // 2:
            continue
        seen.add(text)
        per_label[label] += 1
        rows.append((text, label))
    return rows


def _write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("sentence\tlabel\n")
        for text, label in rows:
            handle.write(f"{text}\t{label}\n")


def write_demo_task(glue_root: Path, train: int = DEMO_TRAIN, dev: int = DEMO_DEV) -> Path:
    """Write ``<glue_root>/SST-2/{train,dev}.tsv``; return the task directory.

    Each file is written under a temporary name and renamed into place, so an interrupted
    write never leaves a truncated file that a later run would take for the demo set.
    """
    rng = random.Random(SEED)
    rows = {"train": generate(train, rng, set())}
    rows["dev"] = generate(dev, rng, {text for text, _ in rows["train"]})
    task_dir = Path(glue_root) / "SST-2"
    task_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        temporary = task_dir / f".{split}.tsv.tmp"
        _write_tsv(temporary, rows[split])
        os.replace(temporary, task_dir / f"{split}.tsv")
    return task_dir


def ensure_demo_task(glue_root: Path) -> Path:
    """The demo task under ``glue_root``, written first if a split file is missing."""
    task_dir = Path(glue_root) / "SST-2"
    if all((task_dir / f"{split}.tsv").is_file() for split in SPLITS):
        return task_dir
    return write_demo_task(glue_root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="GLUE root to write SST-2/{train,dev}.tsv into")
    parser.add_argument("--train", type=int, default=DEMO_TRAIN, help="train sentences")
    parser.add_argument("--dev", type=int, default=DEMO_DEV, help="dev sentences")
    args = parser.parse_args()
    task_dir = write_demo_task(args.out, args.train, args.dev)
    print(f"wrote {args.train} train and {args.dev} dev sentences to {task_dir}")


if __name__ == "__main__":
    main()
