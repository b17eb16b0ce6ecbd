"""The repository explains itself: README and docs/ link only to files that are in it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOCS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_point_inside_the_repository(doc):
    text = doc.read_text()
    assert "shared/docs" not in text, f"{doc.name} sends readers to a file outside the repository"
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(PROJECT_ROOT) and resolved.exists(), f"{doc.name}: broken link {target}"


def test_code_paths_named_in_the_docs_exist():
    """Every ``pipeline/...``, ``distill/...``, ``tasks/...`` path in README and docs/ exists."""
    missing = []
    for doc in DOCS:
        for path in re.findall(r"\b((?:pipeline|distill|tasks|scripts|configs|tests)/[\w/.-]*\w)", doc.read_text()):
            if not (PROJECT_ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing
