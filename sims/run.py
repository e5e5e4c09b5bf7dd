"""Run a federated simulation on Flower's simulation engine (Ray backend).

    python -m sims.run sims/configs/default.toml
    python -m sims.run default --rounds 3 --out results/try
    python -m sims.run default --set train.lr=0.003 --set fleet.local_epochs=1
    python -m sims.run --resume results/default-20261121-101500
    python -m sims.run --resume results/default-20261121-101500 --rounds 20   # extend
    python -m sims.run default --ray-address 127.0.0.1:6379   # an existing Ray cluster

Writes the results folder described in sims/server/results.py and prints one line per
round. ``RAY_ADDRESS`` in the environment attaches to a running cluster too.
Every name and value is checked before Ray starts; an existing ``--out`` is
refused unless ``--overwrite``; the first Ctrl-C abandons the round in flight,
keeps the last round's checkpoint and prints the command that resumes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from fedneq.config import Config
from fedneq.federation.client_app import NO_DYNAMO_ENV
from fedneq.task import build_model, check_partitions, load_task
from sims.cli import (
    Parser,
    UserError,
    add_common_arguments,
    exit_now,
    positive_int,
    run_command,
    unique_dir,
)
from sims.server import (
    STATUS_FILE,
    RunFailed,
    RunSpec,
    build_strategy,
    default_out_dir,
    load_cli_config,
    make_sequence_app,
    request_stop,
    stop_requested,
)
from sims.server.checkpoint import load_run_checkpoint
from sims.server.results import claim_out_dir, read_csv

__all__ = ["RunInterrupted", "check_runnable", "main", "simulate", "simulate_many"]


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by Ctrl-C after its last committed round; it can be resumed."""

    def __init__(self, out_dir: Path, rounds_done: int, rounds: int, resume_command: str = "") -> None:
        self.out_dir, self.rounds_done, self.rounds = Path(out_dir), rounds_done, rounds
        command = resume_command or f"python -m sims.run --resume {out_dir}"
        super().__init__(
            f"interrupted after round {rounds_done} of {rounds}; results and checkpoint in "
            f"{out_dir}. Resume with: {command}"
        )


def backend_config(config: Config, *, verbose: bool = False) -> dict:
    """Ray backend settings: 1 CPU per client actor by default, local or attached.

    A local Ray instance starts its workers at this process's niceness. Ray's
    default (``worker_niceness`` 15) puts the client actors, which do the
    simulation's work, below the driver and Ray's own daemons (niceness 0) and
    below any other job of the machine niced to less than 15: every moment the
    driver or another job computes is then taken out of the clients' rounds
    (docs/SCALE.md). ``nice python -m sims.run ...`` lowers all of them together.
    An attached cluster keeps the settings it was started with.
    """
    address = config.simulation.ray_address or os.environ.get("RAY_ADDRESS", "")
    init_args: dict = {"address": address} if address else {"address": "local"}
    if not address:
        init_args["_system_config"] = {"worker_niceness": 0}
    init_args["include_dashboard"] = False
    if not verbose:  # the actors' own log lines ("Manually terminating ClientAppActor") stay there
        init_args["log_to_driver"] = False
        init_args["logging_level"] = logging.ERROR
    return {
        "client_resources": {"num_cpus": config.simulation.cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }


def check_runnable(config: Config) -> None:
    """Everything a run needs that can fail, checked before Ray starts: every client's
    data split, the model and the strategy built with the config's options."""
    import torch

    if config.model.checkpoint and not Path(config.model.checkpoint).is_file():
        raise FileNotFoundError(f"[model] checkpoint {config.model.checkpoint!r} does not exist")
    check_partitions(config)
    task = load_task(config)
    with torch.random.fork_rng():
        model, neuron_map = build_model(config, task)
    try:
        build_strategy(config, neuron_map, model.state_dict())
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"[strategy] {config.strategy.name!r} with options {config.strategy.options}: {err}"
        ) from err


class _DropRunSimulationDeprecation(logging.Filter):
    """Flower 1.41 warns on every ``run_simulation`` call; its replacement, ``flwr run``,
    cannot take an in-process ServerApp, so fedneq keeps the call and drops that one banner."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith("DEPRECATED FEATURE")
            and "run_simulation" in " ".join(map(str, record.args or ()))
        )


@contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Flower's INFO log and Ray's warnings off unless ``verbose``."""
    flwr_log = logging.getLogger("flwr")
    banner = _DropRunSimulationDeprecation()
    flwr_log.addFilter(banner)
    level = flwr_log.level
    if not verbose:
        flwr_log.setLevel(logging.ERROR)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # a Ray FutureWarning
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        flwr_log.removeFilter(banner)
        flwr_log.setLevel(level)


@contextmanager
def _actors_skip_dynamo() -> Iterator[None]:
    """The client actors Ray starts meanwhile use the device stub for ``torch._dynamo``
    (``FEDNEQ_NO_DYNAMO=1``, :func:`fedneq.federation.client_app.skip_torch_dynamo`).

    ``torch.optim`` imports the real one on a client's first step only to call
    no-ops (~140 MB per actor with sympy and triton); the actors never compile.
    A local Ray's workers inherit this process's environment; this process
    keeps the real one. ``FEDNEQ_NO_DYNAMO=0`` in the environment keeps it in
    the actors too.
    """
    if NO_DYNAMO_ENV in os.environ:
        yield
        return
    os.environ[NO_DYNAMO_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(NO_DYNAMO_ENV, None)


STOP_GRACE_S = 5.0  # after the first Ctrl-C: longer than this in the round in flight -> leave


def _leave_now(resume_command: str) -> None:
    """Exit at once, Ray's processes shut down first (for 5 s at most). Safe for the results:
    a round is committed before its checkpoint is written, each file atomically."""
    print(f"\n[fedneq] stopped. Resume with: {resume_command}", file=sys.stderr, flush=True)

    def shutdown() -> None:
        try:
            import ray

            ray.shutdown()
        except Exception:  # leaving anyway
            pass

    closing = threading.Thread(target=shutdown, daemon=True)
    closing.start()
    closing.join(timeout=5.0)
    os._exit(130)


@contextmanager
def _stop_on_ctrl_c(resume_command: str) -> Iterator[None]:
    """First SIGINT: ask the round loop to stop (the round in flight is abandoned), and leave
    anyway if that takes more than :data:`STOP_GRACE_S`; a second SIGINT: leave at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    timer: list[threading.Timer] = []

    def on_sigint(signum, frame) -> None:
        if stop_requested():
            _leave_now(resume_command)
        request_stop()
        print(
            "\n[fedneq] Ctrl-C: abandoning the round in flight, keeping the last checkpoint "
            "(Ctrl-C again to quit at once)",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        timer.append(threading.Timer(STOP_GRACE_S, _leave_now, args=(resume_command,)))
        timer[-1].daemon = True
        timer[-1].start()

    request_stop(False)
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for t in timer:
            t.cancel()


def simulate(
    config: Config,
    out_dir: Path,
    *,
    resume: bool = False,
    verbose: bool = False,
    check: bool = True,
    tensorboard: Path | None = None,
) -> list[dict[str, str]]:
    """Run ``config`` to completion; returns rounds.csv's rows.

    ``check=False`` skips :func:`check_runnable` (the caller ran it);
    ``tensorboard``: see :func:`simulate_many`.

    Raises
    ------
    RunInterrupted
        If Ctrl-C stopped the run (its last round's checkpoint is kept).
    RuntimeError
        If rounds are missing at the end.
    """
    return simulate_many(
        [RunSpec(config, Path(out_dir), resume)], verbose=verbose, check=check, tensorboard=tensorboard
    )[0]


def simulate_many(
    runs: Sequence[RunSpec],
    *,
    verbose: bool = False,
    check: bool = True,
    resume_command: str = "",
    tensorboard: Path | None = None,
) -> list[list[dict[str, str]]]:
    """Run several configs one after the other in one simulation engine (Ray starts once).

    They must have the same ``[run] num_clients`` and ``[simulation]`` table;
    Ray's settings are the first one's. Returns each run's rounds.csv rows.
    ``resume_command`` is what an interruption tells the user to run (default:
    ``sims.run --resume`` of the interrupted folder). ``tensorboard``: a log folder
    that receives every run's per-round metrics as they come (:mod:`sims.tracking`).
    Raises as :func:`simulate`.
    """
    from flwr.simulation import run_simulation

    from fedneq.federation.client_app import app as client_app
    from sims.engine import vce_actors, vce_sweep
    from sims.engine.ray_node import without_unused_daemons

    vce_sweep.install()  # Flower's delivery loop costs nodes x messages per sweep (sims/engine/vce_sweep.py)
    # the next client queued at each actor, unless a straggler's sleep would hold it (sims/engine/vce_actors.py)
    vce_actors.install(vce_actors.slots_for(spec.config for spec in runs))

    first = runs[0].config
    for spec in runs[1:]:
        if (spec.config.run.num_clients, spec.config.simulation) != (first.run.num_clients, first.simulation):
            raise ValueError(
                "runs sharing one engine need the same [run] num_clients and [simulation] table"
            )
    if check:
        for spec in runs:  # bad data, model or strategy options fail before Ray starts
            check_runnable(spec.config)
    tracking: AbstractContextManager = nullcontext()
    if tensorboard is not None:
        from sims.tracking import TensorBoardLog, check_tensorboard

        check_tensorboard()
        tracking = TensorBoardLog(tensorboard, {s.label or s.out_dir.name: s.out_dir for s in runs})
    resume = resume_command or f"python -m sims.run --resume {runs[0].out_dir}"
    with (
        _quiet(verbose), _stop_on_ctrl_c(resume), tracking, _actors_skip_dynamo(),
        without_unused_daemons(keep_all=verbose),  # ~170 MB of Ray's (sims/engine/ray_node.py)
    ):
        run_simulation(
            server_app=make_sequence_app(runs),
            client_app=client_app,
            num_supernodes=first.run.num_clients,
            backend_config=backend_config(first, verbose=verbose),
            verbose_logging=verbose,
        )
        interrupted = stop_requested()
    results = []
    for spec in runs:
        status_json = spec.out_dir / STATUS_FILE
        status = json.loads(status_json.read_text()) if status_json.exists() else {}
        if status.get("status") == "failed":  # all its rounds ran, and say why it failed
            raise RunFailed(f"the run in {spec.out_dir} failed: {status['reason']}")
        rounds_csv = spec.out_dir / "rounds.csv"
        rows = read_csv(rounds_csv) if rounds_csv.exists() else []
        if len(rows) != spec.config.run.rounds:
            if interrupted:
                raise RunInterrupted(spec.out_dir, len(rows), spec.config.run.rounds, resume_command)
            raise RuntimeError(
                f"the simulation of {spec.out_dir} stopped after {len(rows)} of "
                f"{spec.config.run.rounds} rounds; see the log above. Continue it with: "
                f"{resume_command or f'python -m sims.run --resume {spec.out_dir}'}"
            )
        results.append(rows)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m sims.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "config", nargs="?", help="TOML file or a name in sims/configs/ (default: default)"
    )
    p.add_argument("--out", type=Path, help="results folder (default: <out_dir>/<name>-<time>)")
    p.add_argument("--resume", type=Path, help="continue the run in this results folder")
    p.add_argument("--rounds", type=positive_int, help="override [run] rounds (with --resume: extend)")
    p.add_argument("--seed", type=int, help="override [run] seed")
    p.add_argument("--ray-address", help="attach to a running Ray cluster (or set RAY_ADDRESS)")
    p.add_argument(
        "--tensorboard", type=Path, metavar="LOG_DIR",
        help="also log the per-round metrics to TensorBoard in LOG_DIR/<results folder name>",
    )  # fmt: skip
    add_common_arguments(p)
    return p.parse_args(argv)


def _resumed_config(args: argparse.Namespace) -> Config:
    """The saved config of ``--resume DIR``; arguments that would change it are refused."""
    conflicts = [
        flag for flag, given in (
            (f"config {args.config!r}", args.config is not None), ("--seed", args.seed is not None),
            ("--set", bool(args.assignments)), ("--out", args.out is not None),
            ("--overwrite", args.overwrite),
        ) if given
    ]  # fmt: skip
    if conflicts:
        raise UserError(
            f"--resume {args.resume} continues that run with its own config.json; it cannot take "
            f"{', '.join(conflicts)} (only --rounds, to extend it). Start a new run with --out instead"
        )
    saved = args.resume / "config.json"
    if not saved.is_file():
        raise UserError(f"--resume {args.resume}: no config.json there, not a results folder")
    config = Config.from_dict(json.loads(saved.read_text()))
    if args.rounds is not None:  # extending a run: the one change a resume accepts
        config = config.replace(run={"rounds": args.rounds})
    return config


def _rounds_done(out_dir: Path) -> int:
    """The last round both recorded and checkpointed in a results folder (0: none)."""
    latest = out_dir / "checkpoint" / "LATEST"
    rounds_csv = out_dir / "rounds.csv"
    if not (latest.exists() and rounds_csv.exists()):
        return 0
    return min(int(latest.read_text().strip().removeprefix("round-")), len(read_csv(rounds_csv)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resume = args.resume is not None
    if resume:
        config = _resumed_config(args)
        out_dir = args.resume
        load_run_checkpoint(out_dir, config)  # refuses a checkpoint past --rounds, before Ray
        done = _rounds_done(out_dir)
        if done >= config.run.rounds:
            print(
                f"[fedneq] {out_dir} is already complete ({done} of {config.run.rounds} rounds); "
                f"nothing to run. Extend it with --rounds N",
                flush=True,
            )
            return 0
        if args.ray_address:
            os.environ["RAY_ADDRESS"] = args.ray_address
    else:
        assignments = list(args.assignments)
        assignments += [f"run.{k}={v}" for k, v in (("rounds", args.rounds), ("seed", args.seed)) if v is not None]
        if args.ray_address:
            assignments.append(f"simulation.ray_address={json.dumps(args.ray_address)}")
        config = load_cli_config(args.config or "default", assignments)
        if args.out is not None:
            out_dir = claim_out_dir(args.out, overwrite=args.overwrite)
        else:
            out_dir = unique_dir(default_out_dir(config))
    check_runnable(config)
    if args.tensorboard is not None:
        from sims.tracking import check_tensorboard

        check_tensorboard()
    print(
        f"[fedneq] {config.run.name}: {config.run.rounds} rounds, {config.run.num_clients} clients "
        f"({config.run.clients_per_round}/round), results in {out_dir}",
        flush=True,
    )
    simulate(  # Ctrl-C: RunInterrupted
        config, out_dir, resume=resume, verbose=args.verbose, check=False, tensorboard=args.tensorboard
    )
    print(f"[fedneq] done: {out_dir}/rounds.csv, clients.csv, accuracy_vs_round.png", flush=True)
    return 0


if __name__ == "__main__":
    exit_now(run_command(main, None, "sims.run"))
