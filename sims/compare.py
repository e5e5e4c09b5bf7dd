"""Compare selectors and strategies on the same fleet and data.

    python -m sims.compare default --methods velocity,random,fedavg --rounds 10
    python -m sims.compare default --methods velocity,velocity@server-momentum

A method is ``<selector>[@<strategy>]`` (strategy defaults to the config's),
``fedavg`` (dense FedAvg: every client at full budget), a width sub-model
baseline ``heterofl``, ``fjord``, ``fedrolex`` (each device trains the
sub-network its budget allows, :mod:`strategies.width_avg`), or ``fiarse``
(each device trains the global model's largest-magnitude elements its budget
and memory allow, :mod:`strategies.fiarse`). All methods run one
after the other in one simulation engine (Ray and the client actors start
once), each into ``<out>/<method>/``; a method whose results are already
complete there (same config) is not run again, so an interrupted comparison
continues where it stopped when run again with the same ``--out``. Prints a
table and a per-device-class cost table (trained parameters, FLOPs, upload,
memory; ``device_costs.csv``) and writes ``comparison.csv`` and the accuracy plots (vs round, vs
cumulative upload and vs simulated device time) to ``<out>/``. "Time to 95 %"
is the simulated time (:mod:`fedneq.federation.timing`) at the end of the first round
that reaches 95 % of the run's best accuracy.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedneq._validate import did_you_mean
from fedneq.config import Config
from fedneq.federation.protocol import ELEMENT_METHODS, WIDTH_METHODS
from fedneq.selection import list_selectors
from sims.cli import (
    Parser,
    UserError,
    add_common_arguments,
    exit_now,
    positive_int,
    run_command,
    unique_dir,
)
from sims.run import check_runnable, simulate_many
from sims.server import RunSpec, load_cli_config
from sims.server.capacity import capacity_column
from sims.server.results import atomic_write_text, csv_text, plot_runs, read_csv
from strategies import list_strategies

__all__ = ["SUBMODEL_METHODS", "compare", "device_costs", "method_config", "method_names", "summarize"]

# methods whose strategy has the client train a sub-model (a width, or FIARSE's elements)
SUBMODEL_METHODS = (*WIDTH_METHODS, *ELEMENT_METHODS)

COLUMNS = (
    "method", "final_accuracy", "best_accuracy", "rounds_to_95pct_best", "upload_mb",
    "mean_trainable_fraction", "mean_flops_saved", "failed_clients", "time_to_95pct_best_s",
    "total_time_s",
)  # fmt: skip


def method_names() -> list[str]:
    """Every method :func:`method_config` takes (a selector also as ``<selector>@<strategy>``):
    the registered selectors, ``fedavg`` and the sub-models (widths, FIARSE)."""
    return [*list_selectors(), "fedavg", *SUBMODEL_METHODS]


def method_config(config: Config, method: str) -> Config:
    """The config of one method: ``fedavg``, a sub-model method or ``<selector>[@<strategy>]``."""
    if method == "fedavg":
        return config.replace(strategy={"name": "fedavg"})
    if method in SUBMODEL_METHODS:  # a sub-model per device: the strategy drives the client
        return config.replace(strategy={"name": method})
    selector, _, strategy = method.partition("@")
    if selector in ("fedavg", *SUBMODEL_METHODS):
        raise ValueError(f"method {method!r}: {selector!r} sets its own strategy, not @<strategy>")
    if selector not in list_selectors():
        raise ValueError(
            f"method {method!r}: selector {selector!r} is not known; a method is a selector "
            f"{list_selectors()} (optionally @<strategy>), 'fedavg', or a sub-model "
            f"{list(SUBMODEL_METHODS)}" + did_you_mean(selector, method_names())
        )
    if strategy and strategy not in list_strategies():
        raise ValueError(
            f"method {method!r}: strategy {strategy!r} is not one of {list_strategies()}"
            + did_you_mean(strategy, list_strategies())
        )
    changed = config.replace(selection={"selector": selector})
    return changed.replace(strategy={"name": strategy}) if strategy else changed


def summarize(method: str, rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """One comparison row from a run's rounds.csv rows (accuracy: of the rounds evaluated)."""
    evaluated = [(i, r) for i, r in enumerate(rows) if r["accuracy"] != ""]  # [run] eval_every
    acc = [float(r["accuracy"]) for _, r in evaluated]
    best = max(acc)
    at = next(i for (i, _), a in zip(evaluated, acc, strict=True) if a >= 0.95 * best)
    reach = int(rows[at].get("round", at + 1))  # a single device's epochs count as rounds
    return {
        "method": method,
        "final_accuracy": acc[-1],
        "best_accuracy": best,
        "rounds_to_95pct_best": reach,
        "upload_mb": float(rows[-1]["cum_bytes_up"]) / 1e6,
        "mean_trainable_fraction": _mean(rows, "mean_trainable_fraction"),
        "mean_flops_saved": _mean(rows, "mean_flops_saved"),
        "failed_clients": sum(int(r["failed"]) + int(r["rejected"]) for r in rows),
        # simulated device time (fedneq.federation.timing); nan for results without it
        "time_to_95pct_best_s": _float(rows[at].get("cum_time_s", "")),
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


def _complete(run_dir: Path, config: Config) -> bool:
    """``run_dir`` holds every round of exactly ``config``; a different run there is refused."""
    saved, done = run_dir / "config.json", run_dir / "rounds.csv"
    if not saved.exists():
        return False
    if Config.from_dict(json.loads(saved.read_text())).replace(run={"rounds": config.run.rounds}) != config:
        raise UserError(
            f"{run_dir} holds a run of another config; use another --out (or --overwrite)"
        )
    return done.exists() and len(read_csv(done)) == config.run.rounds


def compare(
    config: Config,
    methods: Sequence[str],
    out_dir: Path,
    *,
    verbose: bool = False,
    resume_command: str = "",
    tensorboard: Path | None = None,
) -> list[dict[str, Any]]:
    """Run every method (those not complete in ``out_dir`` yet) in one engine; the table."""
    if len(set(methods)) != len(methods) or not methods:
        raise ValueError(f"--methods should name each method once, got {list(methods)}")
    configs = {m: method_config(config, m) for m in methods}  # validate all before running any
    for cfg in configs.values():
        check_runnable(cfg)
    out_dir = Path(out_dir)
    todo = []
    for method, cfg in configs.items():
        run_dir = out_dir / method
        if _complete(run_dir, cfg):
            print(f"[fedneq] {method}: complete in {run_dir}, not run again", flush=True)
        else:
            todo.append(RunSpec(cfg, run_dir, resume=run_dir.exists(), label=method))
    if todo:
        simulate_many(
            todo, verbose=verbose, check=False, resume_command=resume_command, tensorboard=tensorboard
        )
    table = [summarize(m, read_csv(out_dir / m / "rounds.csv")) for m in methods]
    atomic_write_text(out_dir / "comparison.csv", csv_text(COLUMNS, table))
    costs = [
        row for m in methods
        for row in device_costs(m, read_csv(out_dir / m / "clients.csv"),
                                read_csv(out_dir / m / "rounds.csv")[-1])
    ]  # fmt: skip
    atomic_write_text(out_dir / "device_costs.csv", csv_text(COST_COLUMNS, costs))
    plot_runs({label(m, configs[m]): out_dir / m / "rounds.csv" for m in methods}, out_dir)
    print(format_table(table), flush=True)
    print(format_costs(costs), flush=True)
    return table


COST_COLUMNS = (
    "method", "device", "replies", "width", "trained_params", "train_mflops", "upload_kb",
    "memory_estimate_kb", "measured_memory_kb", "memory_bound", "own_accuracy",
)  # fmt: skip


def device_costs(
    method: str, rows: Sequence[dict[str, str]], final: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Per device class, the accepted replies' mean trained parameters, training MFLOPs of a
    round, upload, largest memory estimate and measured memory, and the share of replies whose
    memory limit (not the parameter budget) bound the selection, from clients.csv.

    ``own_accuracy``: the test accuracy of the model a device of the class runs after the
    last round, from ``final`` (the last rounds.csv row): a width method's sub-model at the
    class's width (its ``accuracy_w<width>`` column, :mod:`sims.server.capacity`), for
    every other method the global model, which each device runs whole; NaN without
    ``final`` or a width run scored without ``capacity_accuracy``.
    """
    groups: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault(r["device"], []).append(r)

    def mean(g: Sequence[dict[str, str]], key: str, scale: float = 1.0) -> float:
        values = [float(r[key]) for r in g if r.get(key, "") != ""]
        return sum(values) / len(values) / scale if values else float("nan")

    def most(g: Sequence[dict[str, str]], key: str) -> float:
        values = [float(r[key]) for r in g if r.get(key, "") != ""]
        return max(values) / 1e3 if values else float("nan")

    def own(g: Sequence[dict[str, str]]) -> float:
        if final is None:
            return float("nan")
        widths = {r["width"] for r in g if r.get("width", "") != ""}
        if not widths:  # not a width method: the device runs the global model
            return _float(final.get("accuracy"))
        if len(widths) > 1:  # a class whose devices differ (a per-device table)
            return float("nan")
        return _float(final.get(capacity_column(float(widths.pop()))))

    return [
        {"method": method, "device": device, "replies": len(g), "width": mean(g, "width"),
         "trained_params": mean(g, "trainable_params"), "train_mflops": mean(g, "train_flops", 1e6),
         "upload_kb": mean(g, "upload_bytes", 1e3), "memory_estimate_kb": most(g, "memory_estimate_bytes"),
         "measured_memory_kb": most(g, "memory_measured_bytes"), "memory_bound": mean(g, "memory_bound"),
         "own_accuracy": own(g)}
        for device, g in sorted(groups.items())
    ]  # fmt: skip


def format_costs(costs: Sequence[dict[str, Any]]) -> str:
    """The per-device-class cost table (what each method asks of each device)."""
    head = (f"{'method':<28} {'device':<10} {'width':>5} {'params':>8} {'MFLOPs':>9} {'up kB':>8} "
            f"{'mem est kB':>10} {'mem meas kB':>11} {'mem-bound %':>11} {'own acc %':>9}")  # fmt: skip
    lines = ["", "per device class (means over accepted replies; memory: the largest)", head, "-" * len(head)]

    def num(value: float, fmt: str) -> str:
        return "-" if value != value else format(value, fmt)

    for r in costs:
        lines.append(
            f"{r['method']:<28} {r['device']:<10} {num(r['width'], '.3f'):>5} "
            f"{num(r['trained_params'], '.0f'):>8} {num(r['train_mflops'], '.1f'):>9} "
            f"{num(r['upload_kb'], '.1f'):>8} {num(r['memory_estimate_kb'], '.0f'):>10} "
            f"{num(r['measured_memory_kb'], '.0f'):>11} {num(100 * r['memory_bound'], '.0f'):>11} "
            f"{num(100 * r['own_accuracy'], '.1f'):>9}"
        )
    return "\n".join(lines)


def label(method: str, config: Config) -> str:
    """A plot legend: the method and its budget ("velocity, default fleet (1-100 %)")."""
    if method == "fedavg":
        return "fedavg (full budget)"
    if config.fleet.preset == "homogeneous":
        budget = config.fleet.budget
        return f"{method}, budget {budget:.0%}" if budget <= 1 else f"{method}, budget {budget:g} params"
    fleet = config.fleet.fleet()
    budgets = sorted({float(d.budget) for d, _ in fleet.classes if isinstance(d.budget, float)})
    span = f"{budgets[0]:.0%}-{budgets[-1]:.0%}" if budgets else "per class"
    return f"{method}, {config.fleet.preset} fleet ({span})"


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
    p = Parser(prog="python -m sims.compare", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="default")
    p.add_argument("--methods", default="velocity,random,fedavg")
    p.add_argument("--rounds", type=positive_int, help="override [run] rounds")
    p.add_argument(
        "--out", type=Path,
        help="output folder (default: <out_dir>/compare-<name>-<time>); an existing one "
        "continues the comparison there if its config is the same",
    )  # fmt: skip
    p.add_argument(
        "--tensorboard", type=Path, metavar="LOG_DIR",
        help="also log each method's per-round metrics to TensorBoard in LOG_DIR/<method>",
    )  # fmt: skip
    add_common_arguments(p)
    args = p.parse_args(argv)
    if args.tensorboard is not None:
        from sims.tracking import check_tensorboard

        check_tensorboard()
    assignments = [*args.assignments, *([f"run.rounds={args.rounds}"] if args.rounds is not None else [])]
    config = load_cli_config(args.config, assignments)
    if args.out is not None:
        out = args.out
        if args.overwrite and out.exists():
            from sims.server.results import claim_out_dir

            claim_out_dir(out, overwrite=True)
    else:
        out = unique_dir(
            Path(config.run.out_dir) / f"compare-{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    command = " ".join(["python -m sims.compare", *(argv if argv is not None else sys.argv[1:])])
    if args.out is None:
        command += f" --out {out}"
    compare(
        config, args.methods.split(","), out, verbose=args.verbose,
        resume_command=command.replace(" --overwrite", ""), tensorboard=args.tensorboard,
    )  # fmt: skip
    print(f"[fedneq] comparison in {out}/comparison.csv", flush=True)
    return 0


if __name__ == "__main__":
    exit_now(run_command(main, None, "sims.compare"))
