"""The layer rules, checked on the source: layers point down only (kvgate → bench → batch → gateway → engine),
no import cycles between product modules, no product file over MAX_LINES. Every import counts, lazy ones inside
functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kvgate", "bench", "batch", "gateway", "engine")  # each may import itself and those to its right
MAX_LINES = 400


def product_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the product packages (a package is its __init__)."""
    modules = {}
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(imported product module, line, statement) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            while target and target not in modules:  # import a.b.c of a non-module c: a.b
                target = target.rpartition(".")[0]
            if target:
                found.append((target, node.lineno, ast.unparse(node)))
    return found


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, list[tuple[str, int, str]]]]:
    modules = product_modules(root)
    return modules, {name: imports(name, path, modules) for name, path in modules.items()}


def layer_violations(root: Path) -> list[str]:
    modules, graph = import_graph(root)
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for name, edges in graph.items():
        own = name.split(".")[0]
        for target, line, statement in edges:
            other = target.split(".")[0]
            if rank[other] < rank[own]:
                bad.append(f"{modules[name].relative_to(root)}:{line}: `{statement}`: {own}/ may not import "
                           f"{other}/ (layers: {' → '.join(LAYERS)})")
    return bad


def cycles(root: Path) -> list[str]:
    """Each strongly connected component of more than one module, with the imports that close it."""
    modules, graph = import_graph(root)
    succ = {name: {t for t, _, _ in edges if t != name} for name, edges in graph.items()}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph has a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while v not in component:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
            if len(component) > 1:
                components.append(component)

    for v in sorted(succ):
        if v not in index:
            visit(v)
    report = []
    for component in components:
        edges = [f"  {modules[a].relative_to(root)}:{line}: `{statement}`"
                 for a in sorted(component) for t, line, statement in graph[a] if t in component and t != a]
        report.append(f"import cycle between {', '.join(sorted(component))}:\n" + "\n".join(edges))
    return report


def long_files(root: Path) -> list[str]:
    return [f"{path.relative_to(root)}: {n} lines (at most {MAX_LINES}: a file this long does two jobs)"
            for path in product_modules(root).values() if (n := len(path.read_text().splitlines())) > MAX_LINES]


def test_layers_point_down():
    bad = layer_violations(ROOT)
    assert not bad, "imports pointing up or sideways:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(ROOT)
    assert not found, "\n".join(found)


def test_product_files_are_small():
    found = long_files(ROOT)
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------- the checks can fail

@pytest.fixture
def planted(tmp_path: Path) -> Path:
    files = {
        "kvgate/__init__.py": "",
        "bench/__init__.py": "",
        "batch/__init__.py": "",
        "gateway/__init__.py": "",
        "engine/__init__.py": "",
        "engine/a.py": "import engine.b\n",
        "engine/b.py": "def f():\n    from engine import c\n",  # lazy, and `from pkg import module`
        "engine/c.py": "from . import a\n",  # relative; closes a → b → c → a
        "engine/ok.py": "from engine.a import x\nimport os\n",
        "gateway/up.py": "def f():\n    from batch.x import y\n",  # lazy import of a package's __init__
        "batch/x.py": "",
        "engine/long.py": "x = 1\n" * (MAX_LINES + 1),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_planted_violations_are_found(planted: Path):
    (up,) = layer_violations(planted)
    assert up.startswith("gateway/up.py:2: `from batch.x import y`: gateway/ may not import batch/")
    (cycle,) = cycles(planted)
    assert cycle.startswith("import cycle between engine.a, engine.b, engine.c:")
    for edge in ("engine/a.py:1: `import engine.b`", "engine/b.py:2: `from engine import c`",
                 "engine/c.py:1: `from . import a`"):
        assert edge in cycle
    assert "engine/ok.py" not in cycle
    (long,) = long_files(planted)
    assert long.startswith("engine/long.py: 401 lines")
