"""House rules of the source tree, checked: imports flow one way, no cycles, small modules.

`harness` (bench, chaos) builds on the runtime; `deployment` builds on `workers`. Only the CLI,
the entry point, reaches up, and only lazily inside a command.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("workers", "deployment", "harness")
ENTRY_POINT = "workers.cli"
MAX_LINES = 500


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that `path` imports, at any depth (lazy imports inside functions count too)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def test_no_import_cycles_among_our_modules() -> None:
    edges = graph()
    # A package's __init__ re-exporting its own submodules is not a cycle of concerns.
    for name in edges:
        edges[name] = {t for t in edges[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


@pytest.mark.parametrize(
    "low, forbidden",
    [
        ("workers.params", "workers"),  # generation params import nothing of ours
        ("workers", "deployment"),  # the runtime never imports the Serve application
        ("workers", "harness"),  # nor the test and benchmark harness
        ("workers.model", "workers.fetch"),  # the model reads S3 through workers.s3 alone
    ],
)
def test_imports_flow_one_way(low: str, forbidden: str) -> None:
    offenders = {
        f"{name} imports {target}"
        for name, targets in graph().items()
        if (name == low or name.startswith(low + ".")) and name != ENTRY_POINT
        for target in targets
        if (target == forbidden or target.startswith(forbidden + ".")) and not target.startswith(low)
    }
    assert not offenders, sorted(offenders)


def test_no_module_over_the_size_limit() -> None:
    too_long = {
        str(p.relative_to(REPO)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, too_long


def test_the_cli_reaches_up_only_lazily() -> None:
    path = REPO / "workers" / "cli.py"
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    upward = [
        (node.module, id(node) in top_level)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("harness", "deployment")
    ]
    assert {module.split(".")[0] for module, _ in upward} == {"harness", "deployment"}
    assert not [module for module, top in upward if top], "import the harness and deployment inside commands"
