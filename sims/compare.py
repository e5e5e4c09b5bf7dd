"""Compare selectors and strategies on the same fleet and data.

    python -m sims.compare default --methods velocity,random,fedavg --rounds 10
    python -m sims.compare default --methods velocity,velocity@server-momentum

A method is ``<selector>[@<strategy>]`` (strategy defaults to the config's), or
``fedavg`` (dense FedAvg: every client at full budget). Each method runs as its
own simulation into ``<out>/<method>/``; a method whose results are already
complete there is not run again, so an interrupted comparison continues where
it stopped. Prints a table and writes ``comparison.csv`` and the accuracy plots
(vs round, vs cumulative upload and vs simulated device time) to ``<out>/``.
"Time to 95 %" is the simulated time (:mod:`fedneq.timing`) at the end of the
first round that reaches 95 % of the run's best accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedneq.config import Config, load_config
from fedneq.selection import list_selectors
from sims.results import atomic_write_text, csv_text, plot_runs, read_csv
from sims.run import simulate
from sims.server_app import config_path
from strategies import list_strategies

__all__ = ["compare", "method_config", "summarize"]

COLUMNS = (
    "method", "final_accuracy", "best_accuracy", "rounds_to_95pct_best", "upload_mb",
    "mean_trainable_fraction", "mean_flops_saved", "failed_clients", "time_to_95pct_best_s",
    "total_time_s",
)  # fmt: skip


def method_config(config: Config, method: str) -> Config:
    """The config of one method: ``fedavg`` or ``<selector>[@<strategy>]``."""
    if method == "fedavg":
        return config.replace(strategy={"name": "fedavg"})
    selector, _, strategy = method.partition("@")
    if selector not in list_selectors():
        raise ValueError(f"method {method!r}: selector {selector!r} is not one of {list_selectors()}")
    if strategy and strategy not in list_strategies():
        raise ValueError(f"method {method!r}: strategy {strategy!r} is not one of {list_strategies()}")
    changed = config.replace(selection={"selector": selector})
    return changed.replace(strategy={"name": strategy}) if strategy else changed


def summarize(method: str, rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """One comparison row from a run's rounds.csv rows."""
    acc = [float(r["accuracy"]) for r in rows]
    best = max(acc)
    reach = next(i + 1 for i, a in enumerate(acc) if a >= 0.95 * best)
    return {
        "method": method,
        "final_accuracy": acc[-1],
        "best_accuracy": best,
        "rounds_to_95pct_best": reach,
        "upload_mb": float(rows[-1]["cum_bytes_up"]) / 1e6,
        "mean_trainable_fraction": _mean(rows, "mean_trainable_fraction"),
        "mean_flops_saved": _mean(rows, "mean_flops_saved"),
        "failed_clients": sum(int(r["failed"]) + int(r["rejected"]) for r in rows),
        # simulated device time (fedneq.timing); nan for results without it
        "time_to_95pct_best_s": _float(rows[reach - 1].get("cum_time_s", "")),
        "total_time_s": _float(rows[-1].get("cum_time_s", "")),
    }


def _float(value: str | None) -> float:
    return float(value) if value not in ("", None) else float("nan")


def _fmt_time(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "-"
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def _mean(rows: Sequence[dict[str, str]], key: str) -> float:
    values = [float(r[key]) for r in rows if r[key] != ""]
    return sum(values) / len(values) if values else float("nan")


def compare(config: Config, methods: Sequence[str], out_dir: Path) -> list[dict[str, Any]]:
    configs = {m: method_config(config, m) for m in methods}  # validate all before running any
    out_dir = Path(out_dir)
    table = []
    for method, cfg in configs.items():
        run_dir = out_dir / method
        done = run_dir / "rounds.csv"
        if done.exists() and len(read_csv(done)) == cfg.run.rounds:
            print(f"[fedneq] {method}: complete in {run_dir}, not run again", flush=True)
            rows = read_csv(done)
        else:
            print(f"[fedneq] {method}: running into {run_dir}", flush=True)
            rows = simulate(cfg, run_dir, resume=run_dir.exists())
        table.append(summarize(method, rows))
    atomic_write_text(out_dir / "comparison.csv", csv_text(COLUMNS, table))
    plot_runs({m: out_dir / m / "rounds.csv" for m in methods}, out_dir)
    print(format_table(table), flush=True)
    return table


def format_table(table: Sequence[dict[str, Any]]) -> str:
    head = f"{'method':<28} {'final acc':>9} {'best acc':>9} {'rounds→95%':>10} {'time→95%':>10} {'upload MB':>10} {'trainable':>9} {'FLOPs saved':>11}"
    lines = [head, "-" * len(head)]
    for r in table:
        lines.append(
            f"{r['method']:<28} {r['final_accuracy']:>9.4f} {r['best_accuracy']:>9.4f} "
            f"{r['rounds_to_95pct_best']:>10d} {_fmt_time(r['time_to_95pct_best_s']):>10} "
            f"{r['upload_mb']:>10.3f} "
            f"{100 * r['mean_trainable_fraction']:>8.1f}% {100 * r['mean_flops_saved']:>10.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sims.compare", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="default")
    p.add_argument("--methods", default="velocity,random,fedavg")
    p.add_argument("--rounds", type=int, help="override [run] rounds")
    p.add_argument("--out", type=Path, help="output folder (default: <out_dir>/compare-<name>-<time>)")
    args = p.parse_args(argv)
    config = load_config(config_path(args.config))
    if args.rounds:
        config = config.replace(run={"rounds": args.rounds})
    out = args.out or Path(config.run.out_dir) / f"compare-{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    compare(config, args.methods.split(","), out)
    print(f"[fedneq] comparison in {out}/comparison.csv", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
