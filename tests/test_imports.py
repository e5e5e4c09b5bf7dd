"""The import graph of fedneq, strategies and sims: no cycle, no upward import, light library.

The graph is read from the source (``ast``): every ``import`` statement, at
module level or inside a function, is an edge from the importing module to
the module it names (``from pkg import name`` names ``pkg.name`` when that is
a module, else ``pkg``). Importing ``a.b.c`` runs ``a/__init__`` first; that
implicit edge is left out, so a package ``__init__`` may import its own
submodules (how selectors register) while they import each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedneq", "strategies", "sims")
LAYER = {"fedneq": 0, "strategies": 1, "sims": 2}  # may import its own layer and lower ones


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module ``name`` (file ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` where only a.b is ours
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or ``None``."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        on_path = {root}
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                on_path.discard(node)
                done.add(node)
                continue
            nxt = todo.pop()
            if nxt in on_path:
                path = [n for n, _ in stack]
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                stack.append((nxt, sorted(graph[nxt])))
                on_path.add(nxt)
    return None


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "fedneq.selection.registry" in graph["fedneq.selection.velocity_selectors"]
    assert "strategies.base" in graph["strategies.registry"]  # a relative import
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_upward_import() -> None:
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in _graph().items()
        for target in targets
        if LAYER[target.split(".")[0]] > LAYER[name.split(".")[0]]
    )
    assert upward == [], "sims -> strategies -> fedneq, never upward"


def test_importing_fedneq_starts_no_server_stack() -> None:
    code = (
        "import sys, fedneq\n"
        "heavy = sorted(m for m in sys.modules if m == 'ray' or m.startswith("
        "('ray.', 'flwr.server', 'flwr.serverapp')))\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
