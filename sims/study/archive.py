"""A study's complete runs kept small and apart from the machine that ran them.

    python -m sims.study --out DIR --archive ARCHIVE

first restores into ``DIR`` every run ``ARCHIVE`` holds that ``DIR`` lacks
complete, then runs (or reports) the study, then packs every complete run of
``DIR`` that ``ARCHIVE`` does not hold yet (or holds shorter). A run's archive is
``ARCHIVE/alpha<a>/<variant>/seed<k>.tar.xz``: its result files only
(:data:`RESULT_FILES`, about 80 kB), not its checkpoint or client state, which
only an incomplete run needs. Beside them: the study's pretrained checkpoint
(``_pretrained/``) and ``study.json``. An archived run is rewritten only when
the run has grown past it (a study extended to more rounds), and its bytes
depend on its files alone (sorted members, no times or owners), so an archive
kept in git grows by each run once per length.

A restored run's ``config.json`` names the folder it ran in (``[run]
out_dir``, the checkpoint under it); those paths are moved to ``DIR``, so the
study continues there as if it had run there.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from sims.server.results import atomic_write_bytes, atomic_write_text
from sims.study.plan import Study, expand
from sims.study.runner import STUDY_FILE, rounds_done, run_complete

__all__ = ["RESULT_FILES", "pack", "restore"]

RESULT_FILES = (
    "config.json", "rounds.csv", "clients.csv", "coverage.csv", "device_classes.csv",
    "timing.csv", "initial.json", "harness.json", "status.json",
)  # fmt: skip
PRETRAINED = "_pretrained"
SUFFIX = ".tar.xz"


def _archived_rounds(tar: tarfile.TarFile) -> int:
    """Rows of an archived run's rounds.csv."""
    return tar.extractfile("rounds.csv").read().decode().count("\n") - 1  # type: ignore[union-attr]


def _tar_bytes(run_dir: Path) -> bytes:
    """The run's result files as tar.xz bytes that depend on their contents alone."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name in RESULT_FILES:
            path = run_dir / name
            if not path.exists():
                continue
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def pack(study: Study, out_dir: Path, archive: Path, log: Callable[[str], None] = print) -> list[str]:
    """Archive every complete run of ``study`` under ``out_dir`` not yet in ``archive``, with the
    pretrained checkpoint and study.json; returns the keys of the runs it added."""
    out_dir, archive = Path(out_dir), Path(archive)
    added = []
    for run in expand(study):
        target = archive / f"{run.key}{SUFFIX}"
        if not run_complete(out_dir / run.key, study.rounds):
            continue
        if target.exists():
            with tarfile.open(target, "r:xz") as tar:
                if _archived_rounds(tar) >= rounds_done(out_dir / run.key):
                    continue
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, _tar_bytes(out_dir / run.key))
        added.append(run.key)
    for path in sorted((out_dir / PRETRAINED).glob("*")):
        kept = archive / PRETRAINED / path.name
        if path.is_file() and not kept.exists():
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, kept)
    if (out_dir / STUDY_FILE).exists():
        archive.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / STUDY_FILE, archive / STUDY_FILE)
    log(f"[study] archive {archive}: {len(added)} runs added, "
        f"{len(list(archive.rglob('*' + SUFFIX)))} in all")  # fmt: skip
    return added


def _move_paths(run_dir: Path, out_dir: Path) -> None:
    """Point the restored run's config.json at ``out_dir`` (``[run] out_dir``) and at the
    pretrained checkpoint under it (``[model] checkpoint``), as the runner would configure it."""
    path = run_dir / "config.json"
    config = json.loads(path.read_text())
    config["run"]["out_dir"] = str(out_dir)
    checkpoint = Path(config["model"].get("checkpoint") or "")
    if checkpoint.parent.name == PRETRAINED:
        config["model"]["checkpoint"] = str((out_dir / PRETRAINED / checkpoint.name).resolve())
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True))


def restore(archive: Path, out_dir: Path, log: Callable[[str], None] = print) -> list[str]:
    """Unpack into ``out_dir`` every archived run that ``out_dir`` lacks complete (an incomplete
    folder of that run is replaced), and the pretrained checkpoint and study.json where missing;
    returns the keys of the runs it restored."""
    archive, out_dir = Path(archive), Path(out_dir)
    if not archive.is_dir():
        raise ValueError(f"no study archive at {archive}")
    restored = []
    for path in sorted(archive.rglob("*" + SUFFIX)):
        key = str(path.relative_to(archive))[: -len(SUFFIX)]
        run_dir = out_dir / key
        with tarfile.open(path, "r:xz") as tar:
            if run_complete(run_dir, _archived_rounds(tar)):
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            tar.extractall(run_dir, filter="data")
        _move_paths(run_dir, out_dir)
        restored.append(key)
    for path in sorted((archive / PRETRAINED).glob("*")):
        target = out_dir / PRETRAINED / path.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    if (archive / STUDY_FILE).exists() and not (out_dir / STUDY_FILE).exists():
        shutil.copyfile(archive / STUDY_FILE, out_dir / STUDY_FILE)
    log(f"[study] restored {len(restored)} runs from {archive} into {out_dir}")
    return restored
