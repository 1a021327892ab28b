"""The house rules of the source tree, checked by walking every import (README, "Layout").

Folders are floors: ``research`` (one-off studies) > ``macstream`` (CLI, demo) > ``benchmarks`` > ``serving`` >
``workers`` > ``pipeline``. A module may import its own floor and the floors below, never a floor above (so nothing
in the product imports a study); and no chain of imports between the project's
modules may come back to where it started. Function-level imports count: hiding an import in a function does not
hide the dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOORS = ("pipeline", "workers", "serving", "benchmarks", "macstream", "research")  # bottom to top


def _modules() -> dict[str, Path]:
    out = {}
    for floor in FLOORS:
        for path in (REPO / floor).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports (``from a import b`` counts as a.b when b is a module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import (line {node.lineno}); write the absolute path"
                for alias in node.names:
                    deps.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in mods else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def floor(module: str) -> int:
    return FLOORS.index(module.split(".")[0])


def test_no_module_imports_a_floor_above_its_own() -> None:
    upward = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps if floor(d) > floor(m)]
    assert not upward, "imports that point up:\n" + "\n".join(sorted(upward))


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_claim() -> None:
    """The walker itself: a planted cycle and an upward edge are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert floor("workers.consumer") < floor("serving.gateway")
    graph = import_graph()
    assert "pipeline.model.mac" in graph["serving.model"]  # the graph sees real edges


def test_light_modules_load_no_model_code() -> None:
    """The HTTP gateway, the records and the store owner are imported by processes that hold no model: they must not
    pull torch or transformers in."""
    code = ("import sys, serving.gateway, serving.schemas, pipeline.schemas, pipeline.modes, pipeline.store.actor; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"heavy modules loaded: {out.stdout.strip()}"
