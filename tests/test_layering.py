"""The import rules of docs/architecture.md, checked on the source: every ``import`` and ``from`` in
data/, oracles/, solvers/ and pipelines/ (inside functions too, which hide a loop from Python's own
import machinery, not from the reader) points one way, pipelines → oracles, solvers → data, and no
modules of the project import each other in a loop."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data", "oracles", "solvers", "pipelines")
# what each package may import from the others (its own modules always)
ALLOWED = {"data": set(), "oracles": {"data"}, "solvers": {"data"}, "pipelines": {"data", "oracles", "solvers"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module → every module name it imports anywhere in its source (``from pkg import mod`` names the
    module ``pkg.mod`` when it is one of ours, else ``pkg``)."""
    out = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                targets |= subs or {node.module}
        out[name] = targets
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the project's modules it imports anywhere in its source."""
    modules = _modules()
    return {name: {t for t in targets if t in modules and t != name} for name, targets in _imports(modules).items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop through each strongly connected group of modules (Tarjan), as a list of names."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_modules_import_each_other_in_a_loop():
    assert cycles(import_graph()) == []


def test_imports_point_one_way():
    wrong = [
        f"{src} imports {dst}"
        for src, targets in import_graph().items()
        for dst in targets
        if dst.split(".")[0] != src.split(".")[0] and dst.split(".")[0] not in ALLOWED[src.split(".")[0]]
    ]
    assert wrong == []


def test_prefect_only_in_pipelines_and_no_torch_in_data():
    wrong = [
        f"{src} imports {dst}"
        for src, targets in _imports(_modules()).items()
        for dst in targets
        if (dst.split(".")[0] == "prefect" and not src.startswith("pipelines")) or (dst.split(".")[0] == "torch" and src.startswith("data"))
    ]
    assert wrong == []


def test_the_cycle_finder_finds_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
