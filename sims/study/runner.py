"""Running the study: its runs into their folders, resumable, one simulation engine per seed.

:func:`run_study` pretrains the upstream checkpoint once (cached in
``<out>/_pretrained``), then runs every incomplete run of the study, grouped
by (seed, alpha): a group's runs share one simulation engine (Ray and the
client actors start once, :func:`sims.run.simulate_many`). A run is
complete when its rounds.csv has every round; one with a checkpoint resumes
after it. A run that fails is recorded and the others go on; the next
invocation retries it. Every run's ``harness.json`` lists the commits that
ran its rounds, ``study.json`` the study, its hardware and its invocations.
:func:`measure` runs each variant a few rounds in a scratch folder and
projects the whole study's wall time from the seconds per round.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedneq.config import Config
from fedneq.federation.devices import default_fleet
from fedneq.training.pretrain import cached_pretrain, checkpoint_paths
from sims.paper.sweep import git_info, hardware
from sims.server import STATUS_FILE, RunSpec
from sims.server.checkpoint import resume_conflicts
from sims.server.results import atomic_write_text, read_csv
from sims.study.plan import Run, Study, expand, run_config, study_dict

__all__ = [
    "Measurement",
    "STUDY_FILE",
    "measure",
    "pretrained_checkpoint",
    "rounds_done",
    "run_complete",
    "run_failed",
    "run_study",
    "study_configs",
]

HARNESS = "harness.json"
STUDY_FILE = "study.json"
RETRIES = 3  # a group whose engine ran no round is tried again this many times, then failed
RETRY_WAIT_S = 60.0


def pretrained_checkpoint(study: Study, cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Pretrain ``study.model`` on the upstream classes once (seed 0); later studies reuse it."""
    key = {"model": study.model, "width_mult": study.width_mult, "dataset": study.dataset,
           "image_size": study.image_size, "epochs": study.pretrain_epochs, "seed": 0}  # fmt: skip
    return cached_pretrain(
        study.model, study.dataset, cache_dir=cache_dir, key=key, epochs=study.pretrain_epochs,
        seed=0, image_size=study.image_size or None, width_mult=study.width_mult,
        log=lambda line: log(f"[study] {line}"),
    )  # fmt: skip


def study_configs(study: Study, out_dir: Path, checkpoint: str | Path = "") -> dict[Run, Config]:
    """The configuration of every run of ``study`` (validated), in run order."""
    return {run: run_config(study, run, out_dir, checkpoint) for run in expand(study)}


def rounds_done(run_dir: Path) -> int:
    """Rows of a run folder's rounds.csv (0 when it has none)."""
    path = Path(run_dir) / "rounds.csv"
    return len(read_csv(path)) if path.exists() else 0


def _check_same_config(run_dir: Path, config: Config) -> None:
    """Refuse a run folder that holds a run of another config (``[run] rounds`` may differ, and
    where the folder lives: :func:`sims.server.checkpoint.resume_conflicts`)."""
    saved = run_dir / "config.json"
    if not saved.exists():
        return
    changed = resume_conflicts(Config.from_dict(json.loads(saved.read_text())), config)
    if changed:
        raise ValueError(
            f"{run_dir} holds a run of another config (differs in {changed}); use another --out"
        )


def _record_commit(run_dir: Path, git: dict[str, Any], started_at_round: int) -> None:
    """Add this invocation's commit to the run's ``harness.json``."""
    path = run_dir / HARNESS
    record = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    record["invocations"].append(
        {"commit": git["commit"], "dirty": git["dirty"], "from_round": started_at_round + 1,
         "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    )  # fmt: skip
    record["commits"] = sorted({i["commit"] for i in record["invocations"]})
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))


def _wall_seconds(run_dir: Path) -> float:
    """The run's wall seconds over its rounds (timing.csv; Ray's start not included)."""
    path = run_dir / "timing.csv"
    return sum(float(r["seconds"]) for r in read_csv(path)) if path.exists() else 0.0


def _simulate(specs: Sequence[RunSpec], resume_command: str) -> None:
    from sims.run import simulate_many

    simulate_many(list(specs), check=False, resume_command=resume_command)


def run_study(
    study: Study,
    out_dir: Path,
    *,
    command: str = "run_study()",
    log: Callable[[str], None] = print,
    simulate: Callable[[Sequence[RunSpec], str], None] = _simulate,
) -> list[str]:
    """Run every incomplete run of ``study`` into ``out_dir``; returns the keys of failed runs."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started = time.time()
    with _study_lock(out_dir):  # another process may be starting on other seeds of the folder
        meta = _study_meta(study, out_dir)
        ckpt = pretrained_checkpoint(study, out_dir / "_pretrained", log)
        configs = study_configs(study, out_dir, ckpt.resolve())
        for run, config in configs.items():
            _check_same_config(out_dir / run.key, config)
        meta["checkpoint"] = {"file": ckpt.name, **json.loads(checkpoint_paths(ckpt)[1].read_text())}
        atomic_write_text(out_dir / STUDY_FILE, json.dumps(meta, indent=1))
    todo = [r for r in configs if rounds_done(out_dir / r.key) < study.rounds]
    failed_before = [r.key for r in configs if r not in todo and run_failed(out_dir / r.key)]
    if failed_before:
        log(f"[study] {len(failed_before)} runs failed in an earlier invocation and are left out "
            f"of the report: {', '.join(failed_before)} (their status.json says why); move their "
            "folders away to run them again")  # fmt: skip
    total_rounds = sum(study.rounds - rounds_done(out_dir / r.key) for r in todo)
    complete = len(configs) - len(todo) - len(failed_before)
    log(f"[study] {complete} of {len(configs)} runs complete in {out_dir}, "
        f"{len(todo)} to run ({total_rounds} rounds)")  # fmt: skip
    failed: list[str] = []
    progress = _Progress(total_rounds, log)
    groups = itertools.groupby(todo, key=lambda r: (r.seed, r.alpha))
    for (seed, alpha), runs in groups:
        pending = list(runs)
        log(f"[study] seed {seed}, alpha {alpha:g}: {', '.join(r.variant for r in pending)}")
        stalled = 0  # tries in a row that ran no round (the engine did not start: a loaded machine)
        while pending:
            before = {r: rounds_done(out_dir / r.key) for r in pending}
            specs = []
            for r in pending:
                run_dir = out_dir / r.key
                _record_commit(run_dir, meta["git"], before[r])
                resume = (run_dir / "checkpoint" / "LATEST").exists()
                specs.append(RunSpec(configs[r], run_dir, resume=resume, label=r.key))
            try:
                simulate(specs, command)  # an interruption prints the command that resumes
                error: BaseException | None = None
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001 - one failed run must not stop the study
                error = err
            finished = [r for r in pending if rounds_done(out_dir / r.key) >= study.rounds]
            for r in pending:
                progress.add(rounds_done(out_dir / r.key) - before[r], _wall_seconds(out_dir / r.key))
            for r in finished:
                _finish(out_dir / r.key)
                log(f"[study] {r.key} complete ({progress.line()})")
            if error is None:
                break
            if all(rounds_done(out_dir / r.key) == before[r] for r in pending) and stalled < RETRIES:
                stalled += 1
                log(f"[study] no round ran ({type(error).__name__}: {error}); trying again in "
                    f"{RETRY_WAIT_S:g} s ({stalled} of {RETRIES})")  # fmt: skip
                time.sleep(RETRY_WAIT_S)
                continue
            stalled = 0
            # the sequence stopped at its first failed run (one whose rounds all ran may have
            # failed too: status.json says so): record it, go on after it
            bad = next(r for r in pending if run_failed(out_dir / r.key) or r not in finished)
            failed.append(bad.key)
            log(f"[study] FAILED {bad.key}: {type(error).__name__}: {error}")
            pending = pending[pending.index(bad) + 1 :]
    invocation = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "commit": meta["git"]["commit"], "dirty": meta["git"]["dirty"],
        "seconds": round(time.time() - started, 1), "runs": len(todo), "failed": failed,
        "command": command,
    }  # fmt: skip
    with _study_lock(out_dir):  # the record as it is now: other processes' seeds and invocations kept
        meta = json.loads((out_dir / STUDY_FILE).read_text())
        meta["invocations"].append(invocation)
        atomic_write_text(out_dir / STUDY_FILE, json.dumps(meta, indent=1))
    return failed


@contextlib.contextmanager
def _study_lock(out_dir: Path) -> Iterator[None]:
    """Hold the folder's lock on study.json (released when the process dies)."""
    with open(out_dir / ".study.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run_complete(run_dir: Path, rounds: int) -> bool:
    """Whether ``run_dir`` holds a run of at least ``rounds`` rounds that did not fail (a run
    whose engine died records its remaining rounds as failed ones: present, not complete)."""
    return rounds_done(run_dir) >= rounds and not run_failed(run_dir)


def run_failed(run_dir: Path) -> bool:
    """Whether the run's status.json says it failed (:mod:`sims.server.run_status`)."""
    path = run_dir / STATUS_FILE
    return path.exists() and json.loads(path.read_text()).get("status") == "failed"


def _finish(run_dir: Path) -> None:
    """Note a complete run's wall seconds in its harness.json."""
    path = run_dir / HARNESS
    record = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    record["seconds"] = round(_wall_seconds(run_dir), 1)
    atomic_write_text(path, json.dumps(record, indent=1))


class _Progress:
    """Rounds done so far in this invocation, and the time left at their pace."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.done, self.started, self.log = total, 0, time.monotonic(), log

    def add(self, rounds: int, _seconds: float) -> None:
        self.done += max(rounds, 0)

    def line(self) -> str:
        spent = time.monotonic() - self.started
        left = spent / self.done * (self.total - self.done) if self.done else float("nan")
        return (f"{self.done}/{self.total} rounds of this invocation in {spent / 60:.1f} min, "
                f"about {left / 60:.0f} min left")  # fmt: skip


def _study_meta(study: Study, out_dir: Path) -> dict[str, Any]:
    """study.json's record, its earlier invocations kept.

    Raises ValueError when ``out_dir`` holds a study of other settings (more
    rounds, seeds or variants are allowed: the study grows). The record keeps
    every seed, alpha and variant of the folder's invocations, so an invocation
    that runs some of them (e.g. two processes on disjoint seeds) does not hide
    the others from a later report or resume.
    """
    path = out_dir / STUDY_FILE
    old = json.loads(path.read_text()) if path.exists() else {}
    new = study_dict(study)
    growable = {"seeds", "alphas", "variants", "rounds", "variant_definitions"}
    changed = sorted(k for k in new if k not in growable and k in old.get("study", {})
                     and old["study"][k] != new[k])  # fmt: skip
    if changed:
        raise ValueError(
            f"{out_dir} holds a study with other settings ({', '.join(changed)}); use another --out"
        )
    stored = old.get("study", {})
    for key in ("seeds", "alphas", "variants"):
        new[key] = list(dict.fromkeys([*stored.get(key, []), *new[key]]))
    new["variant_definitions"] = stored.get("variant_definitions", {}) | new["variant_definitions"]
    fleet = [{"name": p.name, "share": s, "budget": p.budget, "memory_fraction": p.memory_fraction,
              "batch_size": p.batch_size} for p, s in default_fleet().classes]  # fmt: skip
    return {
        "study": new, "fleet": fleet, "hardware": hardware(), "git": git_info(),
        "invocations": old.get("invocations", []),
    }  # fmt: skip


@dataclass(frozen=True)
class Measurement:
    """Seconds per round of each variant, and the study's projected wall time."""

    seconds_per_round: dict[str, float]  # variant -> median wall seconds of a round
    projected_hours: float  # every run of the study at those paces


def measure(
    study: Study, out_dir: Path, rounds: int, *, log: Callable[[str], None] = print
) -> Measurement:
    """Run every variant ``rounds`` rounds (first seed, first alpha) in ``<out_dir>/_measure``;
    the median round after the first, and the study's projected hours (all in one engine:
    Ray's start counts once)."""
    if rounds < 2:
        raise ValueError(f"rounds should be >= 2 (the first round is left out), got {rounds}")
    import dataclasses

    short = dataclasses.replace(study, seeds=study.seeds[:1], alphas=study.alphas[:1], rounds=rounds)
    scratch = Path(out_dir) / "_measure"
    ckpt = pretrained_checkpoint(study, Path(out_dir) / "_pretrained", log)
    configs = study_configs(short, scratch, ckpt.resolve())
    shutil.rmtree(scratch, ignore_errors=True)  # a fresh measurement, never a resumed one
    _simulate([RunSpec(c, scratch / r.key, label=r.key) for r, c in configs.items()], "--measure again")
    per_round = {}
    for run in configs:
        seconds = [float(r["seconds"]) for r in read_csv(scratch / run.key / "timing.csv")][1:]
        per_round[run.variant] = statistics.median(seconds)
    runs_per_variant = len(study.seeds) * len(study.alphas)
    hours = sum(per_round[v] for v in study.variants) * study.rounds * runs_per_variant / 3600
    return Measurement(per_round, hours)
