"""The study archive: complete runs packed once, byte-stable, restored so the study continues elsewhere."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sims.study.archive import RESULT_FILES, pack, restore
from sims.study.plan import STUDY, Run, Study, run_config
from sims.study.runner import _check_same_config

STUDY3 = dataclasses.replace(STUDY, rounds=3, seeds=(0,), alphas=(0.3,), variants=("velocity-per-param", "random", "static"))  # fmt: skip
DONE, FAILED, SHORT = (Run(0.3, v, 0) for v in STUDY3.variants)
CKPT = "small-cnn-fashion-mnist-0123abcd.safetensors"


def _config(study: Study, run: Run, out: Path):
    return run_config(study, run, out, (out / "_pretrained" / CKPT).resolve())


def _fake_study(out: Path) -> None:
    """Three run folders as the runner leaves them: complete, failed, interrupted."""
    (out / "_pretrained").mkdir(parents=True)
    (out / "_pretrained" / CKPT).write_bytes(b"weights")
    (out / "study.json").write_text('{"study": {}}')
    for run, rows, status in ((DONE, 3, "done"), (FAILED, 3, "failed"), (SHORT, 2, "running")):
        d = out / run.key
        (d / "checkpoint").mkdir(parents=True)
        (d / "checkpoint" / "LATEST").write_text("round-00002")
        (d / "config.json").write_text(json.dumps(_config(STUDY3, run, out).to_dict(), indent=2))
        (d / "rounds.csv").write_text("round,accuracy,skipped\n" + "".join(f"{r},0.{r},0\n" for r in range(1, rows + 1)))
        (d / "clients.csv").write_text("round,cid,device,status\n1,4,mcu,ok\n")
        (d / "status.json").write_text(json.dumps({"status": status}))


def test_only_complete_runs_are_packed_once_and_byte_stable(tmp_path: Path) -> None:
    out, archive = tmp_path / "out", tmp_path / "archive"
    _fake_study(out)
    assert pack(STUDY3, out, archive, log=lambda _: None) == [DONE.key]
    packed = archive / f"{DONE.key}.tar.xz"
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert set(names) <= set(RESULT_FILES) and {"rounds.csv", "config.json", "clients.csv"} <= set(names)
    assert (archive / "_pretrained" / CKPT).read_bytes() == b"weights"
    assert (archive / "study.json").exists()
    before = packed.stat().st_mtime_ns, packed.read_bytes()
    assert pack(STUDY3, out, archive, log=lambda _: None) == []  # never rewritten
    assert (packed.stat().st_mtime_ns, packed.read_bytes()) == before
    other = tmp_path / "other"
    (out / DONE.key / "clients.csv").touch()  # a newer time, the same contents: the same bytes
    pack(STUDY3, out, other, log=lambda _: None)
    assert (other / f"{DONE.key}.tar.xz").read_bytes() == before[1]


def test_a_run_extended_past_its_archive_replaces_it_once(tmp_path: Path) -> None:
    out, archive = tmp_path / "out", tmp_path / "archive"
    _fake_study(out)
    pack(STUDY3, out, archive, log=lambda _: None)
    with (out / DONE.key / "rounds.csv").open("a") as f:
        f.write("4,0.4,0\n")  # the study extended to 4 rounds
    longer = dataclasses.replace(STUDY3, rounds=4)
    assert pack(STUDY3, out, archive, log=lambda _: None) == [DONE.key]  # grown: rewritten
    assert pack(longer, out, archive, log=lambda _: None) == []  # once
    new = tmp_path / "new"
    assert restore(archive, new, log=lambda _: None) == [DONE.key]
    assert (new / DONE.key / "rounds.csv").read_bytes() == (out / DONE.key / "rounds.csv").read_bytes()


def test_a_restored_run_is_complete_where_it_lands_and_an_interrupted_one_is_replaced(tmp_path: Path) -> None:
    out, archive, new = tmp_path / "out", tmp_path / "archive", tmp_path / "elsewhere" / "study"
    _fake_study(out)
    pack(STUDY3, out, archive, log=lambda _: None)
    assert restore(archive, new, log=lambda _: None) == [DONE.key]
    assert (new / DONE.key / "rounds.csv").read_bytes() == (out / DONE.key / "rounds.csv").read_bytes()
    assert not (new / DONE.key / "checkpoint").exists()
    assert (new / "_pretrained" / CKPT).read_bytes() == b"weights"
    # the runner accepts the restored folder as this study's run in the new place, not another run
    _check_same_config(new / DONE.key, _config(STUDY3, DONE, new))
    with pytest.raises(ValueError, match="another config"):
        _check_same_config(new / DONE.key, _config(STUDY3, FAILED, new))
    assert restore(archive, new, log=lambda _: None) == []  # complete there already
    (new / DONE.key / "rounds.csv").write_text("round,accuracy,skipped\n1,0.1,0\n")  # an interrupted copy
    assert restore(archive, new, log=lambda _: None) == [DONE.key]
    assert (new / DONE.key / "rounds.csv").read_bytes() == (out / DONE.key / "rounds.csv").read_bytes()


def test_the_command_restores_reports_and_packs_and_refuses_a_missing_archive(tmp_path: Path) -> None:
    out, archive, new = tmp_path / "out", tmp_path / "archive", tmp_path / "new"
    _fake_study(out)
    pack(STUDY3, out, archive, log=lambda _: None)
    with pytest.raises(ValueError, match="no study archive"):
        restore(tmp_path / "missing", new, log=lambda _: None)
    variants = ",".join(STUDY3.variants)
    result = subprocess.run(
        [sys.executable, "-m", "sims.study", "--out", str(new), "--archive", str(archive), "--report-only",
         "--set", "rounds=3", "--set", "seeds=0", "--set", "alphas=0.3", "--set", f"variants={variants}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restored 1 runs" in result.stdout and "0 runs added, 1 in all" in result.stdout
    assert "velocity-per-param" in (new / "runs.csv").read_text()  # the report read the restored run
