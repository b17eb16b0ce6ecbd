"""The GPU kit: what a GPU machine with no network needs to run the GPU check on the paper's shapes.

``scripts/gpu_check.py --profile paper`` runs the DAG with a BERT-base-shaped teacher
(``scripts/paper_teacher.py`` builds it there, from a seed) and ``tinybert`` augmentation. A
GPU machine that cannot reach the network still needs a few files from here, and the two
assets the project normally uses are too large to carry (the packaged MiniLM and GloVe wheels
are 171 MB together). This script builds, in the ignored folder ``.gpu/`` (about 15 MB):

* ``whl/``: the wheels the GPU image may lack: Luigi and what it needs, at the versions of
  this virtualenv, for the GPU machine's Python (``--python-version``), Linux x86-64. They
  are installed there only if ``luigi`` does not import (:func:`ensure_importable`), into
  ``.gpu/site-pyX.Y``, and only those whose distribution is missing, so nothing the image
  already has (typing-extensions, say) is shadowed;
* ``glue/SST-2/``: SST-2's TSV files from a GLUE directory (``--glue-dir``; by default
  ``../shared/data/glue`` when it is there). Without it the check runs on the project's own
  demo task, generated on the GPU machine;
* ``glove20k.txt``: the first 20,000 GloVe 6B 50d vectors of the packaged GloVe, as GloVe
  text (``[WordVectors] vectors_source = glove_text``): the neighbours of multi-piece words
  in ``tinybert`` augmentation;
* ``tok/``: the bert-base-uncased tokenizer files (from the packaged MiniLM), for the
  seeded teacher;
* ``kit.json``: what was built, from which commit, for which Python, and the bytes of each part.

Build it here (pip downloads the wheels from PyPI), then carry ``.gpu/`` into the checkout on
the GPU machine (README: "On a GPU, the check to run")::

    .venv/bin/python scripts/gpu_kit.py [--python-version 3.12] [--glue-dir DIR | --glue-dir none]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

KIT_DIR = PROJECT_ROOT / ".gpu"
WHEELS = "whl"
GLUE = "glue"
GLOVE_TEXT = "glove20k.txt"
TOKENIZER = "tok"
MANIFEST = "kit.json"
#: The task carried from a GLUE directory, and its files (test.tsv is optional).
TASK = "SST-2"
TASK_FILES = ("train.tsv", "dev.tsv", "test.tsv")
GLOVE_WORDS = 20_000
#: What the GPU image lacked on the first GPU run (the H200 image, commit 54db3fd): Luigi. The
#: wheels are Luigi and its requirements, resolved from this virtualenv's metadata.
ROOT_DISTRIBUTIONS = ("luigi",)
#: The GPU image's Python (the H200 image: 3.12). Luigi's closure is pure Python but for
#: tornado, whose wheels are abi3 (any CPython >= 3.9).
DEFAULT_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: The kit must stay small enough to carry next to the checkout (issue 27: at most ~20 MB).
MAX_BYTES = 20 * 2**20
SHARED_GLUE = PROJECT_ROOT.parent / "shared" / "data" / "glue"


class KitError(RuntimeError):
    """The kit cannot be built or used; the message says what is missing and how to get it."""


# --- building (on a machine with the project's virtualenv and PyPI) ------------------------

def wheel_requirements(python_version: str, roots=ROOT_DISTRIBUTIONS) -> list[str]:
    """``name==version`` of ``roots`` and everything they require (no extras), at the versions
    installed here, with environment markers evaluated for Linux and ``python_version``."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    environment = {"python_version": python_version, "python_full_version": python_version + ".0",
                   "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                   "platform_machine": "x86_64", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "extra": ""}
    pinned: dict[str, str] = {}
    pending = list(roots)
    while pending:
        name = canonicalize_name(pending.pop())
        if name in pinned:
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise KitError(f"{name} is required by the kit's wheels but not installed in this "
                           f"virtualenv ({sys.prefix}); run make setup") from None
        pinned[name] = distribution.version
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                pending.append(requirement.name)
    return [f"{name}=={version}" for name, version in sorted(pinned.items())]


def download_wheels(dest: Path, requirements: list[str], python_version: str) -> None:
    """pip download of exactly ``requirements`` (no dependency resolution: the list is closed)."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", "--dest", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    done = subprocess.run(command + requirements, capture_output=True, text=True)
    if done.returncode != 0:
        raise KitError(f"pip download of {' '.join(requirements)} failed:\n{done.stderr.strip()[-2000:]}")


def write_glove_text(path: Path, words: int) -> int:
    """The first ``words`` vectors of the packaged GloVe 6B 50d as GloVe text (five decimals:
    the conversion normalises every row, so the neighbours do not change); returns the rows."""
    from pipeline.augment.word_vectors import read_packaged

    rows = 0
    with open(path, "w", encoding="utf-8") as out:
        for chunk_words, matrix in read_packaged(max_words=words):
            for word, vector in zip(chunk_words, matrix):
                out.write(word + " " + " ".join(f"{x:.5f}" for x in vector) + "\n")
            rows += len(chunk_words)
    return rows


def copy_tokenizer(dest: Path) -> Path:
    """The bert-base-uncased tokenizer files of the packaged MiniLM, into ``dest``."""
    from scripts.paper_teacher import TOKENIZER_FILES, tokenizer_dir

    source = tokenizer_dir(None)
    dest.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
    return source


def copy_task(glue_dir: Path, dest: Path) -> None:
    """``glue_dir/SST-2``'s TSV files into ``dest/SST-2`` (train and dev must be there)."""
    source = Path(glue_dir) / TASK
    missing = [name for name in TASK_FILES[:2] if not (source / name).is_file()]
    if missing:
        raise KitError(f"{source}: no {', '.join(missing)} (a GLUE directory holds {TASK}/train.tsv "
                       "and dev.tsv); pass --glue-dir none to run on the demo task")
    (dest / TASK).mkdir(parents=True)
    for name in TASK_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, dest / TASK / name)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def build_kit(out: Path = KIT_DIR, python_version: str = DEFAULT_PYTHON, glue_dir: Path | None = None,
              glove_words: int = GLOVE_WORDS, wheels: bool = True) -> dict:
    """Build the kit in ``out`` (replacing one that is there; built beside it and renamed, so an
    interrupted build leaves the old kit or none). Returns the manifest written to kit.json."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    manifest: dict = {"commit": commit(), "python_version": python_version, "wheels": [],
                      "glue_task": None, "glove_words": 0, "tokenizer_from": None}
    try:
        if wheels:
            requirements = wheel_requirements(python_version)
            (partial / WHEELS).mkdir()
            download_wheels(partial / WHEELS, requirements, python_version)
            manifest["wheels"] = sorted(p.name for p in (partial / WHEELS).glob("*.whl"))
        if glue_dir is not None:
            copy_task(glue_dir, partial / GLUE)
            manifest["glue_task"] = f"{TASK} from {Path(glue_dir).resolve()}"
        manifest["glove_words"] = write_glove_text(partial / GLOVE_TEXT, glove_words)
        manifest["tokenizer_from"] = str(copy_tokenizer(partial / TOKENIZER))
        parts = {name: folder_bytes(partial / name) if (partial / name).is_dir() else (partial / name).stat().st_size
                 for name in (WHEELS, GLUE, GLOVE_TEXT, TOKENIZER) if (partial / name).exists()}
        manifest["bytes"] = {**parts, "total": sum(parts.values())}
        if manifest["bytes"]["total"] > MAX_BYTES:
            raise KitError(f"the kit is {manifest['bytes']['total'] / 2**20:.1f} MiB, over the "
                           f"{MAX_BYTES / 2**20:.0f} MiB it must fit in ({parts})")
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return manifest


# --- using it (on the GPU machine) ---------------------------------------------------------

def site_dir(kit: Path) -> Path:
    """Where the kit's wheels are installed for this interpreter."""
    return Path(kit) / f"site-py{sys.version_info.major}.{sys.version_info.minor}"


def _use(site: Path) -> None:
    """Put ``site`` first on this process's path and on its children's (DataLoader workers,
    the launcher's ranks)."""
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(site) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site)] + paths)
    importlib.invalidate_caches()


def _importable(modules) -> list[str]:
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def ensure_importable(kit: Path = KIT_DIR, modules=("luigi",)) -> list[str]:
    """Make ``modules`` importable, installing the kit's wheels when one of them is not.

    Nothing happens when they all import (this machine, any image with Luigi). Otherwise the
    kit's wheels whose distribution is not installed go into :func:`site_dir` (``pip install
    --no-index --no-deps --target``: offline) and that folder is put on the path. Returns the
    wheels installed (empty when none were needed or an earlier run had installed them).
    """
    if not _importable(modules):
        return []
    from packaging.utils import parse_wheel_filename

    kit = Path(kit).resolve()   # absolute: children with another working directory use it too
    site = site_dir(kit)
    if site.is_dir():
        _use(site)
        if not _importable(modules):
            return []
    wheels = sorted((kit / WHEELS).glob("*.whl")) if (kit / WHEELS).is_dir() else []
    if not wheels:
        raise KitError(f"{', '.join(_importable(modules))} cannot be imported and {kit / WHEELS} holds no "
                       "wheels: build the kit with scripts/gpu_kit.py on a machine with PyPI and carry "
                       ".gpu/ here (README: On a GPU, the check to run)")

    def installed(wheel: Path) -> bool:
        try:
            importlib.metadata.distribution(parse_wheel_filename(wheel.name)[0])
            return True
        except importlib.metadata.PackageNotFoundError:
            return False

    needed = [w for w in wheels if not installed(w)]
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--no-index", "--no-deps", "--no-compile", "--target", str(site)]
                          + [str(w) for w in needed], capture_output=True, text=True)
    if done.returncode != 0:
        raise KitError(f"installing the kit's wheels into {site} failed:\n{done.stderr.strip()[-2000:]}")
    _use(site)
    still = _importable(modules)
    if still:
        raise KitError(f"{', '.join(still)} still cannot be imported after installing {kit / WHEELS} into "
                       f"{site}: a requirement is missing from the kit (rebuild it with scripts/gpu_kit.py)")
    return [w.name for w in needed]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=KIT_DIR, help="the kit's folder (default: .gpu)")
    parser.add_argument("--python-version", default=DEFAULT_PYTHON,
                        help="the GPU machine's python3 version, for the wheels (default %(default)s)")
    parser.add_argument("--glue-dir", default=None,
                        help=f"a GLUE directory to carry {TASK} from ('none': the demo task is used "
                             f"on the GPU machine; default: {SHARED_GLUE} when present)")
    parser.add_argument("--glove-words", type=int, default=GLOVE_WORDS, help="GloVe vectors to carry")
    parser.add_argument("--no-wheels", action="store_true",
                        help="carry no wheels (a GPU image that has Luigi; needs no PyPI here)")
    args = parser.parse_args(argv)
    if args.glue_dir is None:
        glue_dir = SHARED_GLUE if (SHARED_GLUE / TASK / "train.tsv").is_file() else None
    else:
        glue_dir = None if args.glue_dir == "none" else Path(args.glue_dir)
    try:
        manifest = build_kit(args.out, args.python_version, glue_dir, args.glove_words, not args.no_wheels)
    except KitError as exc:
        print(f"gpu_kit: {exc}", file=sys.stderr)
        return 1
    sizes = manifest["bytes"]
    print(json.dumps({"gpu_kit": manifest}, sort_keys=True))
    print(f"{args.out}: {sizes['total'] / 2**20:.1f} MiB ("
          + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items() if name != "total")
          + f"); {len(manifest['wheels'])} wheels for Python {manifest['python_version']}, "
          f"{manifest['glue_task'] or 'no GLUE task (the demo task is generated there)'}, "
          f"{manifest['glove_words']} GloVe vectors. Carry it to the GPU machine as .gpu/ in the checkout.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
