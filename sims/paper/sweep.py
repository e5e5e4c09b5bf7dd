"""Running a sweep: training runs into their own folders, resumable, in parallel where it pays.

:func:`run_jobs` is the generic part: it takes :class:`Job` s (a folder name,
a fedneq :class:`~fedneq.config.Config`, and for a single-device run what
:func:`sims.single_device.run_single_device` needs), runs every one that is not
complete in its folder yet, single-device runs in worker processes and
federated runs one after another (an interrupted federated run resumes from
its checkpoint), and returns what it ran and what failed. :func:`run_sweep`
runs a :class:`~sims.paper.plan.Plan` with it: the upstream checkpoint, the
plan's jobs, and the sweep's record ``sweep.json``.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedneq.config import Config
from fedneq.task import build_model, load_task
from fedneq.training.pretrain import cached_pretrain, checkpoint_paths
from sims.paper.plan import (
    Plan,
    Run,
    Tier,
    base_config,
    expand,
    plan_dict,
    run_budget,
    run_config,
    tier_budgets,
)
from sims.server.results import atomic_write_text, read_csv

__all__ = [
    "Job",
    "JobsOutcome",
    "SingleDevice",
    "is_complete",
    "plan_jobs",
    "pretrained_checkpoint",
    "run_jobs",
    "run_sweep",
    "steps_done",
]

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SingleDevice:
    """What a single-device run trains (:func:`sims.single_device.run_single_device`)."""

    selector: str
    budget: int | float  # the selection budget (1.0: the selector's own)
    epochs: int


@dataclass(frozen=True)
class Job:
    """One training run: its folder under the sweep's, its config, and how it trains.

    ``single`` None: a federated run of ``config.run.rounds`` rounds
    (:func:`sims.run.simulate`), resumed from its checkpoint when interrupted.
    """

    key: str
    config: Config
    single: SingleDevice | None = None

    @property
    def federated(self) -> bool:
        return self.single is None

    @property
    def steps(self) -> int:
        """Rows of its per-step table once complete (a single device's includes epoch 0)."""
        return self.config.run.rounds if self.single is None else self.single.epochs + 1


@dataclass(frozen=True)
class JobsOutcome:
    """What :func:`run_jobs` did: the keys of the jobs it ran and of those that failed."""

    ran: tuple[str, ...]
    failed: tuple[str, ...]


def steps_done(run_dir: Path, federated: bool) -> int:
    """Rows of a run folder's per-step table (``rounds.csv``, or ``single_device.csv``)."""
    path = Path(run_dir) / ("rounds.csv" if federated else "single_device.csv")
    return len(read_csv(path)) if path.exists() else 0


def is_complete(plan: Plan, run: Run, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds all epochs / rounds of ``run``."""
    expected = plan.rounds if run.federated else plan.epochs + 1  # + epoch 0
    return steps_done(run_dir, run.federated) == expected


def _single_job(
    config_json: str, selector: str, budget: int | float, epochs: int, run_dir: str
) -> float:
    """A single-device run in a worker process (1 torch thread); returns its wall seconds."""
    from sims.single_device import run_single_device

    torch.set_num_threads(1)
    t0 = time.monotonic()
    run_single_device(
        Config.from_json(config_json), selectors=[selector], budget=budget, epochs=epochs,
        out_dir=Path(run_dir),
    )  # fmt: skip
    return time.monotonic() - t0


def _federated_job(config: Config, run_dir: Path) -> float:
    from sims.run import simulate

    t0 = time.monotonic()
    simulate(config, run_dir, resume=run_dir.exists())
    for bulky in ("checkpoint", "client_state"):  # only needed to resume; the run is complete
        shutil.rmtree(run_dir / bulky, ignore_errors=True)
    return time.monotonic() - t0


def run_jobs(
    jobs: Sequence[Job],
    out_dir: Path,
    *,
    workers: int = 2,
    tag: str = "[sweep]",
    started: float | None = None,
    log: Callable[[str], None] = print,
) -> JobsOutcome:
    """Run every job not complete in ``<out_dir>/<key>``; a failed one does not stop the rest.

    Single-device jobs go to ``workers`` spawned processes (1 torch thread
    each); federated jobs then run one after another in this process (each
    uses Ray with 1 CPU per client). A finished job gets ``harness.json`` with
    its wall seconds. Log lines start with ``tag``; ``started`` (``time.time()``)
    is what "min so far" counts from (default: now).
    """
    if workers < 1:
        raise ValueError(f"workers should be >= 1, got {workers}")
    out_dir = Path(out_dir)
    started = time.time() if started is None else started
    todo = [j for j in jobs if steps_done(out_dir / j.key, j.federated) != j.steps]
    log(f"{tag} {len(jobs) - len(todo)} of {len(jobs)} runs complete in {out_dir}, "
        f"{len(todo)} to run")  # fmt: skip
    failed: list[str] = []
    done = 0

    def finished(job: Job, seconds: float | None, error: BaseException | None = None) -> None:
        nonlocal done
        done += 1
        if error is not None:
            failed.append(job.key)
            log(f"{tag} FAILED {job.key}: {type(error).__name__}: {error}")
            return
        atomic_write_text(out_dir / job.key / "harness.json", json.dumps({"seconds": seconds}))
        log(f"{tag} {done}/{len(todo)} {job.key} done in {seconds:.0f} s "
            f"({(time.time() - started) / 60:.1f} min so far)")  # fmt: skip

    singles = [(j, j.single) for j in todo if j.single is not None]
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(
                _single_job, j.config.to_json(), s.selector, s.budget, s.epochs, str(out_dir / j.key)
            ): j
            for j, s in singles
        }
        for future in cf.as_completed(futures):
            error = future.exception()
            finished(futures[future], None if error else future.result(), error)
    for job in (j for j in todo if j.federated):
        log(f"{tag} running {job.key}")
        try:
            finished(job, _federated_job(job.config, out_dir / job.key))
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
            finished(job, None, error)
    return JobsOutcome(tuple(j.key for j in todo), tuple(failed))


# --------------------------------------------------------------------------- the paper's sweep


def pretrained_checkpoint(plan: Plan, cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Pretrain MobileNetV2 on the upstream classes once; later sweeps reuse the file."""
    key = {
        "dataset": plan.dataset, "image_size": plan.image_size, "width_mult": plan.width_mult,
        "epochs": plan.pretrain_epochs, "train_limit": plan.pretrain_train_limit,
        "test_limit": plan.pretrain_test_limit, "seed": 0,
    }  # fmt: skip
    return cached_pretrain(
        "mobilenet_v2", plan.dataset, cache_dir=cache_dir, key=key, epochs=plan.pretrain_epochs,
        seed=0, image_size=plan.image_size, width_mult=plan.width_mult,
        train_limit=plan.pretrain_train_limit, test_limit=plan.pretrain_test_limit,
        log=lambda line: log(f"[paper] {line}"),
    )  # fmt: skip


def plan_jobs(
    plan: Plan, runs: Sequence[Run], base: Config, tiers: dict[str, Tier]
) -> list[Job]:
    """The :class:`Job` of each of ``plan``'s ``runs`` (``base`` from ``base_config``)."""
    return [
        Job(run.key, run_config(plan, run, base, tiers),
            None if run.federated else SingleDevice(run.method, run_budget(run, tiers), plan.epochs))
        for run in runs
    ]  # fmt: skip


def run_sweep(
    plan: Plan,
    out_dir: Path,
    *,
    runs: Sequence[Run] | None = None,
    jobs: int = 2,
    command: str = "run_sweep()",
    pretrained_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run every incomplete run of ``plan`` (or of ``runs``); returns the keys of failed runs.

    Single-device runs go to ``jobs`` worker processes (1 torch thread each);
    federated runs run one after another (each uses Ray with 1 CPU per client).
    The upstream checkpoint is cached in ``pretrained_dir`` (default
    ``<out_dir>/../_pretrained``, shared by the sweeps next to each other).
    """
    if jobs < 1:
        raise ValueError(f"jobs should be >= 1, got {jobs}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started = time.time()
    ckpt = pretrained_checkpoint(plan, pretrained_dir or out_dir.parent / "_pretrained", log)
    base = base_config(plan, out_dir, ckpt.resolve())
    tiers = tier_budgets(plan, build_model(base, load_task(base))[0])
    meta = sweep_meta(plan, out_dir, tiers, ckpt, base)
    atomic_write_text(out_dir / "sweep.json", json.dumps(meta, indent=1))  # report-only works now
    todo = plan_jobs(plan, list(expand(plan) if runs is None else runs), base, tiers)
    outcome = run_jobs(todo, out_dir, workers=jobs, tag="[paper]", started=started, log=log)
    meta["invocations"].append({
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "commit": meta["git"]["commit"],
        "seconds": round(time.time() - started, 1), "runs": len(outcome.ran),
        "failed": list(outcome.failed), "command": command,
    })  # fmt: skip
    atomic_write_text(out_dir / "sweep.json", json.dumps(meta, indent=1))
    return list(outcome.failed)


def sweep_meta(
    plan: Plan, out_dir: Path, tiers: dict[str, Tier], ckpt: Path, base: Config
) -> dict[str, Any]:
    """The sweep's record for ``sweep.json``, its earlier invocations kept.

    Raises ValueError when ``out_dir`` holds a sweep of another plan.
    """
    path = out_dir / "sweep.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    # a field added since the sweep started had its default value then
    if old and plan_dict(plan) != plan_dict(Plan()) | old.get("plan", {}):
        raise ValueError(
            f"{out_dir} holds a sweep of another plan ({old.get('plan')}); use another --out"
        )
    ck_meta = json.loads(checkpoint_paths(ckpt)[1].read_text())
    return {
        "plan": plan_dict(plan),
        "tiers": {n: dataclasses.asdict(t) | {"fraction": t.fraction} for n, t in tiers.items()},
        "checkpoint": {"file": ckpt.name, "upstream_test_accuracy": ck_meta["test_accuracy"],
                       "train_samples": ck_meta.get("train_samples")},
        "velocity": {"mode": base.selection.velocity_mode, "mu": base.selection.mu,
                     "storage_dtype": base.selection.storage_dtype},
        "hardware": hardware(),
        "git": git_info(),
        "invocations": old.get("invocations", []),
    }  # fmt: skip


def hardware() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), cores, memory and library versions of this machine."""
    cpu, mem = platform.processor() or "unknown", None
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    if Path("/proc/meminfo").exists():
        line = next(
            ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
        )
        mem = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
        "torch": torch.__version__, "flwr": metadata.version("flwr"),
    }  # fmt: skip


def git_info() -> dict[str, Any]:
    """The fedneq commit and whether tracked files outside ``docs/`` (the report) differ from it."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"))}  # fmt: skip
