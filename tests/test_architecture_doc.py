"""docs/ARCHITECTURE.md is the map of the code: its tables name files that exist, one module
per row, and every module of the library, the strategies, the server and the engine has a row.

Reads files only (no project module is imported), so it stays fast.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
COVERED = ("fedneq", "strategies", "sims/server", "sims/engine")  # every module needs a row
PY_PATH = re.compile(r"`([A-Za-z0-9_./-]+\.py)`")


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of the tables whose header is ``| concept | module | ... |``, as cells."""
    rows: list[list[str]] = []
    in_rule_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_rule_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["concept", "module"]:
            in_rule_table = True
        elif in_rule_table and not set(cells[0]) <= set("-: "):
            rows.append(cells)
    return rows


def _table_paths(text: str) -> set[str]:
    """Every backticked ``*.py`` path in any table line of the page."""
    lines = (line for line in text.splitlines() if line.startswith("|"))
    return {p for line in lines for p in PY_PATH.findall(line) if "/" in p}


def _modules() -> list[str]:
    return sorted(
        p.relative_to(ROOT).as_posix()
        for package in COVERED
        for p in (ROOT / package).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    )


def test_the_rule_tables_are_read() -> None:
    text = DOC.read_text()
    rows = _table_rows(text)
    assert len(rows) > 50
    assert "`fedneq/selection/velocity.py`" in {r[1] for r in rows}
    assert _table_rows("| concept | module | x |\n|---|---|---|\n| a | `b.py` | c |\n") == [
        ["a", "`b.py`", "c"]
    ]


def test_every_row_names_one_module() -> None:
    bad = [
        " | ".join(row)
        for row in _table_rows(DOC.read_text())
        if len(row) < 3 or not re.fullmatch(r"`[A-Za-z0-9_./-]+\.py`", row[1])
    ]
    assert bad == [], "a row's module cell must be one backticked .py path:\n" + "\n".join(bad)


def test_every_path_in_the_tables_exists() -> None:
    missing = sorted(p for p in _table_paths(DOC.read_text()) if not (ROOT / p).is_file())
    assert missing == [], f"docs/ARCHITECTURE.md names files that do not exist: {missing}"


@pytest.mark.parametrize("package", COVERED)
def test_every_module_has_a_row(package: str) -> None:
    rows = {row[1].strip("`") for row in _table_rows(DOC.read_text())}
    missing = [m for m in _modules() if m.startswith(package + "/") and m not in rows]
    assert missing == [], f"modules without a row in docs/ARCHITECTURE.md: {missing}"


def test_the_four_rules_are_each_in_one_row() -> None:
    """The velocity formula, the selection rule, the wire format and the aggregation rule."""
    rows = _table_rows(DOC.read_text())
    for concept, module in [
        ("velocity formula", "fedneq/selection/velocity.py"),
        ("selection rule", "fedneq/selection/rules.py"),
        ("wire format", "fedneq/federation/wire/rows.py"),
        ("aggregation rule", "strategies/sparse_fedavg.py"),  # the default run's (sims/configs/default.toml)
    ]:
        hits = [r[1].strip("`") for r in rows if f"**{concept}**" in r[0]]
        assert hits == [module], (concept, hits)
