"""The packages' layering, read from the source: imports only run downward.

- No import circles inside `pec` or `pec_kernels`, counting every import statement (module level, inside
  functions, and under TYPE_CHECKING): a function-level import that closes a circle still ties the two
  modules together.
- `pec_kernels` imports torch, triton and the standard library only.
- `pec` uses only the public API of `pec_kernels` (`from pec_kernels import ...`).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module named by each import statement, names it imports) of one file, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def _graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for base, names in _imports(name, path):
            targets = [resolve(f"{base}.{n}") if f"{base}.{n}" in modules else resolve(base) for n in names] \
                if names else [resolve(base)]
            graph[name] |= {t for t in targets if t and t != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return circles


@pytest.mark.parametrize("package", ["pec", "pec_kernels"])
def test_no_import_circles(package):
    assert _circles(_graph(package)) == []


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pec_kernels_depends_on_torch_and_triton_only():
    allowed = {"torch", "triton", "pec_kernels", "__future__"} | set(sys.stdlib_module_names)
    outside = {(name, base) for name, path in _modules("pec_kernels").items()
               for base, _ in _imports(name, path) if base.split(".")[0] not in allowed}
    assert outside == set()


def test_pec_uses_only_the_public_api_of_pec_kernels():
    private = {(name, base) for name, path in _modules("pec").items()
               for base, _ in _imports(name, path) if base.startswith("pec_kernels.")}
    assert private == set()
