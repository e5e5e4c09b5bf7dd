"""sims.server imports nothing from sims outside itself: a deployment's ServerApp needs only it.

Every import in ``sims/server/*.py`` (module level or inside a function) is
read from the source; its top-level package must be fedneq, strategies, the
server package itself, the standard library, or one of the few third-party
packages the server uses.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[1] / "sims" / "server"
THIRD_PARTY = {"flwr", "numpy", "torch", "safetensors", "matplotlib"}
OURS = {"fedneq", "strategies"}


def imported_modules(path: Path) -> list[str]:
    """The absolute module names ``path`` imports (relative imports resolved in sims.server)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:  # from . import x, from ..y import z
            package = ["sims", "server"][: 3 - node.level]
            if node.module:
                names.append(".".join([*package, node.module]))
            else:  # the names imported may be modules
                names += [".".join([*package, alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def outside_imports(path: Path) -> list[str]:
    """The imports of ``path`` that break the rule."""
    bad = []
    for name in imported_modules(path):
        top = name.split(".")[0]
        if top == "sims":
            if name != "sims.server" and not name.startswith("sims.server."):
                bad.append(name)
        elif top not in OURS | THIRD_PARTY and top not in sys.stdlib_module_names:
            bad.append(name)
    return bad


@pytest.mark.parametrize("path", sorted(SERVER.glob("*.py")), ids=lambda p: p.name)
def test_server_modules_import_only_the_server_fedneq_strategies_and_their_dependencies(
    path: Path,
) -> None:
    assert outside_imports(path) == []


def test_the_rule_catches_a_driver_import_and_a_relative_one(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text(
        "import json\nfrom sims.server.results import read_csv\n"
        "def f():\n    from sims.cli import Parser\n    from .. import run\n    import ray\n"
    )
    assert outside_imports(module) == ["sims.cli", "sims.run", "ray"]


def test_the_server_package_holds_its_modules() -> None:
    assert {"round_loop.py", "server_app.py", "discovery.py", "knowledge.py"} <= {
        p.name for p in SERVER.glob("*.py")
    }
