"""Publish the study into the docs: its section in ``RESULTS.md``, its tables and curves beside it.

``python -m sims.study --docs docs`` copies the study's CSVs and plots into
``docs/results/study/`` and writes its section between the study markers of
``docs/RESULTS.md`` (:data:`sims.paper.report.STUDY_START`), one heading level
down: it is the heterogeneous setting's section there. ``python -m sims.paper``
keeps that block when it regenerates the page. A page without the markers gets
the block under its heterogeneous heading (or at its end).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from sims.paper.report import STUDY_END, STUDY_START, TITLES
from sims.server.results import atomic_write_text

__all__ = ["FIGURES", "publish", "splice"]

FIGURES = "results/study"  # relative to the docs folder


def _demote(section: str) -> str:
    """Every markdown heading one level down."""
    return re.sub(r"^(#+) ", r"#\1 ", section, flags=re.MULTILINE)


def splice(page_text: str, block: str) -> str:
    """``page_text`` with ``block`` between the study markers (added when missing)."""
    wrapped = f"{STUDY_START}\n{block.strip()}\n{STUDY_END}"
    if STUDY_START in page_text and STUDY_END in page_text:
        head, rest = page_text.split(STUDY_START, 1)
        return head + wrapped + rest.split(STUDY_END, 1)[1]
    heading = f"## {TITLES['heterogeneous']}\n"
    if heading in page_text:
        head, rest = page_text.split(heading, 1)
        return f"{head}{heading}\n{wrapped}\n{rest}"
    return page_text.rstrip("\n") + "\n\n" + wrapped + "\n"


def publish(out_dir: Path, docs_dir: Path, section: str, files: Sequence[str]) -> Path:
    """Copy the study's ``files`` (its tables and curves) to ``<docs>/results/study`` and splice
    ``section`` (rendered with its figures under :data:`FIGURES`) into ``<docs>/RESULTS.md``;
    returns the page."""
    out_dir, docs_dir = Path(out_dir), Path(docs_dir)
    target = docs_dir / FIGURES
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
        if (out_dir / name).exists():
            shutil.copyfile(out_dir / name, target / name)
    page = docs_dir / "RESULTS.md"
    text = page.read_text() if page.exists() else "# Results\n"
    atomic_write_text(page, splice(text, _demote(section)))
    return page
