"""The package layering: the runtime never imports the tooling, and `workers` never imports upward.

`harness` (bench, chaos) builds on the runtime; `deployment` builds on `workers`. Only the CLI,
the entry point, reaches up, and only lazily inside a command.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = REPO / "workers" / "cli.py"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, whether at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top_level))
    return found


def _upward(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(REPO)}: {module}{'' if top else ' (inside a function)'}"
        for module, top in _imports(path)
        if module.split(".")[0] in forbidden and not (path == ENTRY_POINT and not top)
    ]


def test_the_runtime_never_imports_the_harness() -> None:
    runtime = sorted((REPO / "workers").rglob("*.py")) + sorted((REPO / "deployment").rglob("*.py"))
    assert runtime
    assert [hit for path in runtime for hit in _upward(path, ("harness",))] == []


def test_workers_never_import_deployment() -> None:
    assert [hit for path in sorted((REPO / "workers").rglob("*.py")) for hit in _upward(path, ("deployment",))] == []


def test_the_cli_reaches_the_harness_lazily() -> None:
    lazy = [module for module, top in _imports(ENTRY_POINT) if module.split(".")[0] in ("harness", "deployment")]
    assert {m.split(".")[0] for m in lazy} == {"harness", "deployment"}
    assert all(not top for module, top in _imports(ENTRY_POINT) if module.split(".")[0] in ("harness", "deployment"))
