"""Run a federated simulation on Flower's simulation engine (Ray backend).

    python -m sims.run sims/configs/default.toml
    python -m sims.run default --rounds 3 --out results/try
    python -m sims.run default --resume results/default-20261121-101500
    python -m sims.run default --resume results/default-20261121-101500 --rounds 20   # extend
    python -m sims.run default --ray-address 127.0.0.1:6379   # an existing Ray cluster

Writes the results folder described in sims/results.py and prints one line per
round. ``RAY_ADDRESS`` in the environment attaches to a running cluster too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fedneq.config import Config, load_config
from fedneq.task import check_partitions
from sims.federation import STATUS_FILE, RunFailed
from sims.results import read_csv
from sims.server_app import config_path, default_out_dir, make_server_app

__all__ = ["main", "simulate"]


def backend_config(config: Config) -> dict:
    """Ray backend settings: 1 CPU per client actor by default, local or attached."""
    address = config.simulation.ray_address or os.environ.get("RAY_ADDRESS", "")
    init_args: dict = {"address": address} if address else {"address": "local"}
    init_args["include_dashboard"] = False
    return {
        "client_resources": {"num_cpus": config.simulation.cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }


def simulate(config: Config, out_dir: Path, *, resume: bool = False, verbose: bool = False) -> list[dict[str, str]]:
    """Run ``config`` to completion; returns rounds.csv's rows. Raises if rounds are missing."""
    from flwr.simulation import run_simulation

    from fedneq.client_app import app as client_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray FutureWarning
    out_dir = Path(out_dir)
    check_partitions(config)  # fail on bad data before Ray starts
    run_simulation(
        server_app=make_server_app(config, out_dir, resume=resume),
        client_app=client_app,
        num_supernodes=config.run.num_clients,
        backend_config=backend_config(config),
        verbose_logging=verbose,
    )
    status_json = out_dir / STATUS_FILE
    status = json.loads(status_json.read_text()) if status_json.exists() else {}
    if status.get("status") == "failed":
        raise RunFailed(f"the run in {out_dir} failed: {status['reason']}")
    rounds_csv = out_dir / "rounds.csv"
    rows = read_csv(rounds_csv) if rounds_csv.exists() else []
    if len(rows) != config.run.rounds:
        raise RuntimeError(
            f"the simulation stopped after {len(rows)} of {config.run.rounds} rounds; see the log "
            f"above. Continue it with: python -m sims.run <config> --resume {out_dir}"
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sims.run", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="default", help="TOML file or a name in sims/configs/")
    p.add_argument("--out", type=Path, help="results folder (default: <out_dir>/<name>-<time>)")
    p.add_argument("--resume", type=Path, help="continue the run in this results folder")
    p.add_argument("--rounds", type=int, help="override [run] rounds")
    p.add_argument("--seed", type=int, help="override [run] seed")
    p.add_argument("--ray-address", help="attach to a running Ray cluster (or set RAY_ADDRESS)")
    p.add_argument("--verbose", action="store_true", help="show Flower's own log")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resume is not None:
        saved = args.resume / "config.json"
        if not saved.is_file():
            raise SystemExit(f"--resume {args.resume}: no config.json there, not a results folder")
        config = Config.from_dict(json.loads(saved.read_text()))
        if args.rounds is not None:  # extending a run: the one change a resume accepts
            config = config.replace(run={"rounds": args.rounds})
        out_dir = args.resume
    else:
        config = load_config(config_path(args.config))
        run = {k: v for k, v in (("rounds", args.rounds), ("seed", args.seed)) if v is not None}
        if run:
            config = config.replace(run=run)
        if args.ray_address:
            config = config.replace(simulation={"ray_address": args.ray_address})
        out_dir = args.out or default_out_dir(config)
    print(f"[fedneq] {config.run.name}: {config.run.rounds} rounds, {config.run.num_clients} clients "
          f"({config.run.clients_per_round}/round), results in {out_dir}", flush=True)
    try:
        simulate(config, out_dir, resume=args.resume is not None, verbose=args.verbose)
    except RunFailed as err:
        print(f"[fedneq] FAILED: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"[fedneq] done: {out_dir}/rounds.csv, clients.csv, accuracy_vs_round.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
