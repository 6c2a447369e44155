"""The architecture's import rules (docs in ARCHITECTURE.md, contracts in pyproject.toml's
``[tool.importlinter]``): the layer contract and the forbidden imports hold, and no two top-level
parts of ``stepsearch`` import each other (directly or round a longer loop)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "stepsearch"


def test_import_linter_contracts_hold():
    """In a subprocess: import-linter reconfigures logging in its own process (run in this one,
    it silenced the log capture of later tests)."""
    script = (
        "from importlinter.cli import lint_imports; "
        f"raise SystemExit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, "
        "no_cache=True, no_logo=True))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


def _part(module: str) -> str:
    """``stepsearch.<part>`` of a module (the root package itself is its own part)."""
    return ".".join(module.split(".")[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_between_top_level_parts():
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    edges: dict[str, set[str]] = {}
    witnesses: dict[tuple[str, str], str] = {}
    for module in sorted(graph.modules):
        source = _part(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            target = _part(imported)
            if PACKAGE in (source, target) or source == target:
                continue  # the root package re-exports the core; a part may import itself
            edges.setdefault(source, set()).add(target)
            witnesses.setdefault((source, target), f"{module} -> {imported}")
    cycles = _cycles(edges)
    described = []
    for cycle in cycles:
        members = set(cycle)
        links = sorted(
            witness for (a, b), witness in witnesses.items() if a in members and b in members
        )
        described.append(f"{' <-> '.join(cycle)}: {'; '.join(links)}")
    assert not cycles, "import cycles between parts of stepsearch:\n" + "\n".join(described)
