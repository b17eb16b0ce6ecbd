"""The folder tree is the DAG: imports go down the stage order, never up, sideways or in circles.

``pipeline/`` holds one package per stage in data order, over a bottom layer (the stage
contract and the error type) and ``pipeline.common`` (pieces several stages share);
``distill/`` (the trainer) comes after the cache and before the ablation report, and the
GLUE table (``pipeline.glue``) after that. A module may
import its own package, any package ranked below it, and the bottom layer. Only ``tasks/``
imports Luigi. Every ``import`` statement counts, including those inside functions (the
project defers heavy imports into functions, and a deferred import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMPUTE_PACKAGES = ("pipeline", "distill")

#: Rank of each layer; a module imports only layers of lower rank, and its own.
LAYER_RANK = {
    "pipeline.stage": 0, "pipeline.errors": 0, "pipeline.locks": 0, "pipeline.store": 0,
    "pipeline.common": 1,
    "pipeline.prepare": 2,
    "pipeline.augment": 3, "pipeline.teacher": 3,   # siblings: neither reads the other
    "pipeline.cache": 4,
    "distill": 5,
    "pipeline.ablations": 6,
    "pipeline.glue": 7,   # the GLUE table reuses the ablation statistics
    "pipeline.deploy": 7,   # the ONNX export reuses them too (a sibling: neither reads the other)
}
BOTTOM = {"pipeline.stage", "pipeline.errors", "pipeline.locks", "pipeline.store"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(root: Path, packages=COMPUTE_PACKAGES) -> dict[str, set[str]]:
    """``module -> every module name it imports`` (absolute names, imports at any depth)."""
    graph: dict[str, set[str]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            targets: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    assert not node.level, f"{path}: relative import (the project uses absolute ones)"
                    targets.add(node.module)
                    # ``from pipeline.cache import reader`` imports the submodule ``reader``
                    targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            graph[module_name(path, root)] = targets
    return graph


def internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` restricted to the project's own modules."""
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def layer_of(module: str) -> str:
    for layer in sorted(LAYER_RANK, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in graph.items():
        for target in sorted(targets):
            if target.split(".")[0] in ("luigi", "tasks"):
                problems.append(f"{module} imports {target} (only tasks/ may import Luigi or tasks)")
    for module, targets in internal(graph).items():
        own = layer_of(module)
        for target in sorted(targets):
            other = layer_of(target)
            if other == own or other in BOTTOM:
                continue
            if own in BOTTOM or LAYER_RANK.get(other, 99) >= LAYER_RANK.get(own, -1):
                problems.append(f"{module} imports {target}: {other} is not below {own}")
    return problems


def code_graph() -> dict[str, set[str]]:
    return internal(project_imports(PROJECT_ROOT))


def test_every_compute_module_belongs_to_a_layer():
    unplaced = [m for m in code_graph() if layer_of(m) not in LAYER_RANK and m not in ("pipeline",)]
    assert not unplaced, f"modules outside the declared layers (add them to LAYER_RANK): {unplaced}"


def test_no_import_circle():
    assert find_cycle(code_graph()) is None, f"import circle: {' -> '.join(find_cycle(code_graph()))}"


def test_imports_go_down_the_stage_order_and_only_tasks_imports_luigi():
    assert layering_violations(project_imports(PROJECT_ROOT)) == []


# --- the checker itself catches what it is for ------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture()
def fake_tree(tmp_path):
    _write(tmp_path, {"pipeline/__init__.py": "", "distill/__init__.py": "",
                      "pipeline/errors.py": "", "pipeline/common/__init__.py": "",
                      "pipeline/common/metrics.py": "from pipeline.errors import X\n",
                      "pipeline/cache/__init__.py": "", "pipeline/teacher/__init__.py": "",
                      "distill/trainer.py": "from pipeline.common.metrics import f\n"})
    return tmp_path


def test_checker_finds_a_circle_through_a_deferred_import(fake_tree):
    _write(fake_tree, {"pipeline/teacher/finetune.py": "from pipeline.cache import writer\n",
                       "pipeline/cache/writer.py": "def f():\n    from pipeline.teacher.finetune import g\n"})
    cycle = find_cycle(internal(project_imports(fake_tree)))
    assert cycle and set(cycle) == {"pipeline.teacher.finetune", "pipeline.cache.writer"}


def test_checker_finds_upward_and_luigi_imports(fake_tree):
    _write(fake_tree, {"pipeline/teacher/finetune.py": "def f():\n    from distill.trainer import t\n",
                       "pipeline/cache/writer.py": "import luigi\n"})
    problems = layering_violations(project_imports(fake_tree))
    assert any("pipeline.teacher.finetune imports distill.trainer" in p for p in problems)
    assert any("pipeline.cache.writer imports luigi" in p for p in problems)
    assert not any("distill.trainer imports" in p for p in problems)   # downward: allowed
