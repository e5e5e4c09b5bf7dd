"""The study's report: ``STUDY.md`` (a markdown section) and the CSVs it is made from.

From the complete runs of a study folder (``rounds.csv`` has every round, and the run did not fail):

* ``runs.csv``: per run, the final accuracy, the tail accuracy (mean of the
  evaluations in the last ``tail`` rounds), the slope over those rounds, the
  best accuracy, replies rejected and rounds skipped, wall seconds, commits;
* ``curves.csv``: every evaluated round of every run (round 0: the starting
  model), with the accuracy on each device class's label mix;
* ``classes.csv``: per run and device class, the final and tail accuracy on
  its label mix, and its replies accepted and rejected (clients.csv);
* ``summary.csv``: per alpha and variant, the mean, std and 95 % t-interval
  over seeds of the tail accuracy, the final accuracy and the slope;
* ``paired.csv``: the paired differences of :data:`PAIRS` (tail accuracy,
  seed by seed), each with its 95 % t-interval;
* ``coverage.csv``: per run and tensor, how many clients trained its elements
  (:mod:`sims.study.coverage`);
* ``curves_alpha<a>.png``: the mean curve over seeds of every variant.

The section opens with the answers to the study's three questions and its
target (:mod:`sims.study.answers`).

``best mixed`` in a pair is the mixed-fleet variant with the highest mean tail
accuracy at that alpha, chosen on the same seeds its difference is taken
over (the interval does not account for that choice).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sims.paper.plan import assignments
from sims.server.results import atomic_write_text, csv_text, read_csv
from sims.study.answers import REFERENCE, RULE_VARIANTS, answer_lines
from sims.study.coverage import COVERAGE_COLUMNS, coverage_lines, run_coverage, summarize_coverage
from sims.study.plan import STUDY, VARIANTS, Run, Study, expand
from sims.study.runner import STUDY_FILE, run_complete
from sims.study.stats import Interval, paired_difference, t_interval, tail_mean, tail_slope

__all__ = ["BEST_MIXED", "PAIRS", "collect", "render", "write_report"]

BEST_MIXED = "best mixed"
# the key paired differences: (minuend, subtrahend), each a variant name or BEST_MIXED;
# then every aggregation / local-work rule against velocity / param with sparse-fedavg
PAIRS: tuple[tuple[str, str], ...] = (
    (BEST_MIXED, "strong-only"),
    (REFERENCE, "strong-only"),
    (REFERENCE, "random"),
    (REFERENCE, "static"),
    (REFERENCE, "fiarse"),
    (BEST_MIXED, "drop-weak"),
    (BEST_MIXED, "dense"),
    ("dense", "strong-only"),  # the headroom: what training every device densely would add
    *((rule, REFERENCE) for rule in RULE_VARIANTS),
)
RUN_COLUMNS = (
    "alpha", "variant", "seed", "final_accuracy", "tail_accuracy", "slope_per_100_rounds",
    "best_accuracy", "rejected_replies", "skipped_rounds", "seconds", "seconds_per_round", "commits",
)  # fmt: skip
CLASS_COLUMNS = ("alpha", "variant", "seed", "device", "final_accuracy", "tail_accuracy",
                 "replies", "rejected")  # fmt: skip
SUMMARY_COLUMNS = (
    "alpha", "variant", "label", "seeds", "tail_mean", "tail_std", "tail_low", "tail_high",
    "final_mean", "final_std", "slope_mean", "slope_std", "seconds_per_round",
)  # fmt: skip
PAIRED_COLUMNS = ("alpha", "minuend", "subtrahend", "seeds", "mean", "low", "high", "std")
TABLES = ("runs.csv", "curves.csv", "classes.csv", "summary.csv", "paired.csv", "coverage.csv")


def _float(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def _run_tables(study: Study, run: Run, run_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    """``(runs.csv row, curve rows, classes.csv rows)`` of a complete run folder (coverage apart)."""
    ident = {"alpha": run.alpha, "variant": run.variant, "seed": run.seed}
    rows = read_csv(run_dir / "rounds.csv")
    evaluated = [r for r in rows if r["accuracy"] != ""]
    rounds = [int(r["round"]) for r in evaluated]
    acc = [float(r["accuracy"]) for r in evaluated]
    classes = [c.removeprefix("accuracy_") for c in rows[0] if c.startswith("accuracy_")]
    initial = json.loads((run_dir / "initial.json").read_text()) if (run_dir / "initial.json").exists() else {}
    curve = [ident | {"round": 0, "accuracy": initial["accuracy"]}] if initial else []
    curve += [ident | {"round": int(r["round"]), "accuracy": float(r["accuracy"])}
              | {c: _float(r[f"accuracy_{c}"]) for c in classes} for r in evaluated]  # fmt: skip
    timing = read_csv(run_dir / "timing.csv") if (run_dir / "timing.csv").exists() else []
    seconds = sum(float(t["seconds"]) for t in timing)
    # the median round after the first (whose time holds the engine's start), the pace
    pace = statistics.median(float(t["seconds"]) for t in timing[1:]) if len(timing) > 1 else math.nan
    harness = run_dir / "harness.json"
    commits = json.loads(harness.read_text()).get("commits", []) if harness.exists() else []
    clients = read_csv(run_dir / "clients.csv")
    summary = ident | {
        "final_accuracy": acc[-1],
        "tail_accuracy": tail_mean(rounds, acc, study.tail),
        "slope_per_100_rounds": tail_slope(rounds, acc, study.tail) * 100,  # accuracy (a fraction) per 100 rounds
        "best_accuracy": max(acc),
        "rejected_replies": sum(r["status"] == "rejected" for r in clients),
        "skipped_rounds": sum(int(r["skipped"]) for r in rows),
        "seconds": seconds,
        "seconds_per_round": pace,
        "commits": " ".join(c[:10] for c in commits),
    }
    per_class = []
    for c in classes:
        values = [_float(r[f"accuracy_{c}"]) for r in evaluated]
        mine = [r for r in clients if r["device"] == c]
        per_class.append(ident | {
            "device": c, "final_accuracy": values[-1], "tail_accuracy": tail_mean(rounds, values, study.tail),
            "replies": sum(r["status"] == "ok" for r in mine),
            "rejected": sum(r["status"] == "rejected" for r in mine),
        })  # fmt: skip
    return summary, curve, per_class


def collect(study: Study, out_dir: Path) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """``(runs, curves, classes, coverage)`` rows of the complete runs of ``study`` under ``out_dir``."""
    runs, curves, classes, coverage = [], [], [], []
    for run in expand(study):
        run_dir = Path(out_dir) / run.key
        if run_complete(run_dir, study.rounds):
            s, c, k = _run_tables(study, run, run_dir)
            runs.append(s)
            curves += c
            classes += k
            coverage += run_coverage(run_dir, {"alpha": run.alpha, "variant": run.variant, "seed": run.seed})
    return runs, curves, classes, coverage


def _by(rows: Sequence[dict], alpha: float, variant: str, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in rows if r["alpha"] == alpha and r["variant"] == variant}


def summarize(study: Study, runs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """``(summary rows, paired rows)`` of the runs."""
    summary, paired = [], []
    for alpha in study.alphas:
        present = [v for v in study.variants if _by(runs, alpha, v, "tail_accuracy")]
        for v in present:
            tail = t_interval(list(_by(runs, alpha, v, "tail_accuracy").values()))
            final = t_interval(list(_by(runs, alpha, v, "final_accuracy").values()))
            slope = t_interval(list(_by(runs, alpha, v, "slope_per_100_rounds").values()))
            pace = [r["seconds_per_round"] for r in runs if r["alpha"] == alpha and r["variant"] == v]
            summary.append({
                "alpha": alpha, "variant": v, "label": VARIANTS[v].label, "seeds": tail.n,
                "tail_mean": tail.mean, "tail_std": tail.std, "tail_low": tail.low,
                "tail_high": tail.high, "final_mean": final.mean, "final_std": final.std,
                "slope_mean": slope.mean, "slope_std": slope.std,
                "seconds_per_round": sum(pace) / len(pace),
            })  # fmt: skip
        mixed = [s for s in summary if s["alpha"] == alpha and VARIANTS[s["variant"]].fleet == "mixed"]
        best = max(mixed, key=lambda s: s["tail_mean"])["variant"] if mixed else ""
        for a, b in PAIRS:
            a_name, b_name = (best if x == BEST_MIXED else x for x in (a, b))
            if not (a_name and b_name and a_name != b_name):
                continue
            d = paired_difference(_by(runs, alpha, a_name, "tail_accuracy"),
                                  _by(runs, alpha, b_name, "tail_accuracy"))  # fmt: skip
            if d.n:
                paired.append(_pair_row(alpha, a, a_name, b_name, d))
    return summary, paired


def _pair_row(alpha: float, a: str, a_name: str, b_name: str, d: Interval) -> dict[str, Any]:
    minuend = f"{BEST_MIXED} ({a_name})" if a == BEST_MIXED else a_name
    return {"alpha": alpha, "minuend": minuend, "subtrahend": b_name, "seeds": d.n,
            "mean": d.mean, "low": d.low, "high": d.high, "std": d.std, "a": a, "a_name": a_name}  # fmt: skip


def _pts(x: float, digits: int = 1, sign: bool = False) -> str:
    if math.isnan(x):
        return "—"
    return f"{100 * x:+.{digits}f}" if sign else f"{100 * x:.{digits}f}"


def _num(x: float, fmt: str) -> str:
    return "—" if math.isnan(x) else format(x, fmt)


def command_line(study: Study) -> str:
    """The ``python -m sims.study`` command that runs ``study``: a ``--set`` per field that
    differs from :data:`~sims.study.plan.STUDY`."""
    return " ".join(["python -m sims.study", *(f"--set {a}" for a in assignments(study, STUDY))])


def render(study: Study, meta: dict[str, Any], runs: Sequence[dict], summary: Sequence[dict],
           paired: Sequence[dict], classes: Sequence[dict], coverage: Sequence[dict] = (),
           figures: str | None = None) -> str:  # fmt: skip
    """STUDY.md: the answers, the setup, the paired differences, the summary, per-class and coverage tables.

    ``figures``: a folder (relative to the page) to show the curves from; None names the files.
    """
    expected = len(expand(study))
    commits = sorted({c for r in runs for c in r["commits"].split()})
    hours = sum(r["seconds"] for r in runs) / 3600
    partial = ([f"> **In progress:** {len(runs)} of {expected} runs complete. Each difference below "
                "uses the seeds complete on both of its sides; `python -m sims.study` continues the "
                "study where it stopped.", ""] if len(runs) < expected else [])  # fmt: skip
    lines = [
        "## Heterogeneous fleet: long-horizon study",
        "",
        *partial,
        *answer_lines(study.alphas, paired),
        "",
        f"{study.num_clients} clients of the default device classes (their budgets and memory "
        f"limits), {study.clients_per_round} a round, Dirichlet α ∈ {{{', '.join(f'{a:g}' for a in study.alphas)}}}, "
        f"{study.rounds} rounds, seeds {', '.join(map(str, study.seeds))}; {study.model} (width "
        f"{study.width_mult:g}) on {study.dataset} (classes 5–9, image size "
        f"{study.image_size or 'native'}, training pool {study.train_limit or 'all'}, test set "
        f"{study.test_limit}), pretrained on classes 0–4 ({study.pretrain_epochs} epochs); "
        f"evaluated every {study.eval_every} rounds and at the last. Every round's clients are "
        "drawn from the seed alone: the same in every variant of a seed (strong-only draws from "
        "the full-budget devices; drop-weak is the mixed draw less the weak devices).",
        "",
        f"Re-run (resumes, and runs only what is missing): `{command_line(study)}`.",
        "",
        f"{len(runs)} of {expected} runs complete; their rounds took {hours:.1f} h summed over runs "
        f"on {meta.get('hardware', {}).get('cores', '?')} shared cores (Ray's start not counted); "
        f"commits: {', '.join(commits) or '—'}. Tail accuracy: the mean of the evaluations in the "
        f"last {study.tail} rounds; slope: least squares over those rounds, points per 100 rounds.",
        "",
        "### Paired differences (tail accuracy, points; 95 % t-interval over seeds)",
        "",
        "| α | difference | seeds | mean | 95 % CI |",
        "|---|---|---|---|---|",
    ]
    for p in paired:
        ci = f"[{_pts(p['low'], sign=True)}, {_pts(p['high'], sign=True)}]"
        lines.append(f"| {p['alpha']:g} | {p['minuend']} − {p['subtrahend']} | {p['seeds']} | "
                     f"{_pts(p['mean'], sign=True)} | {ci} |")  # fmt: skip
    lines += [
        "",
        f"`{BEST_MIXED}`: the mixed-fleet variant with the highest mean tail accuracy, chosen on "
        "the same seeds (the interval does not account for the choice).",
        "",
        "### Accuracy per variant (%, mean ± std over seeds)",
        "",
        f"| α | variant | seeds | tail acc. | 95 % CI | final acc. | slope, last {study.tail} "
        "(pts / 100 rounds) | s / round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['alpha']:g} | {s['label']} | {s['seeds']} | {_pts(s['tail_mean'])} ± "
            f"{_pts(s['tail_std'])} | [{_pts(s['tail_low'])}, {_pts(s['tail_high'])}] | "
            f"{_pts(s['final_mean'])} ± {_pts(s['final_std'])} | {_pts(s['slope_mean'], 2, sign=True)} ± "
            f"{_pts(s['slope_std'], 2)} | {_num(s['seconds_per_round'], '.2f')} |"
        )
    lines += _class_lines(study, classes)
    lines += coverage_lines(summarize_coverage(coverage))
    tables = ", ".join(f"`{name}`" for name in TABLES)
    if figures is None:
        lines += ["", "Curves (mean over seeds): " + ", ".join(
            f"`{name}`" for name in _curve_files(study)) + f"; tables: {tables}.", ""]  # fmt: skip
    else:
        lines += ["", f"Tables in `{figures}/`: {tables}.", "",
                  *(f"![curves, α = {a:g}]({figures}/{name})"
                    for a, name in zip(study.alphas, _curve_files(study), strict=True)), ""]  # fmt: skip
    return "\n".join(lines)


def _class_lines(study: Study, classes: Sequence[dict]) -> list[str]:
    """Per device class: the mean tail accuracy on its label mix and its rejected replies."""
    devices = list(dict.fromkeys(c["device"] for c in classes))
    if not devices:
        return []
    lines = ["", "### Per device class (tail accuracy on the class's label mix, %; replies "
             "rejected by the strategy / accepted, all seeds)", "",
             "| α | variant | " + " | ".join(devices) + " |",
             "|---|---|" + "---|" * len(devices)]  # fmt: skip
    for alpha in study.alphas:
        for v in study.variants:
            mine = [c for c in classes if c["alpha"] == alpha and c["variant"] == v]
            if not mine:
                continue
            cells = []
            for d in devices:
                rows = [c for c in mine if c["device"] == d]
                acc = t_interval([c["tail_accuracy"] for c in rows])
                cells.append(f"{_pts(acc.mean)} ({sum(c['rejected'] for c in rows)}/"
                             f"{sum(c['replies'] for c in rows)})")  # fmt: skip
            lines.append(f"| {alpha:g} | {VARIANTS[v].label} | " + " | ".join(cells) + " |")
    return lines


def _curve_files(study: Study) -> list[str]:
    """The plots :func:`_plot` writes, one per alpha."""
    return [f"curves_alpha{alpha:g}.png" for alpha in study.alphas]


def _plot(study: Study, curves: Sequence[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for alpha in study.alphas:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for v in study.variants:
            points: dict[int, list[float]] = {}
            for c in curves:
                if c["alpha"] == alpha and c["variant"] == v:
                    points.setdefault(c["round"], []).append(c["accuracy"])
            if points:
                xs = sorted(points)
                ax.plot(xs, [100 * sum(points[x]) / len(points[x]) for x in xs], label=VARIANTS[v].label)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.set_title(f"Dirichlet α = {alpha:g}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"curves_alpha{alpha:g}.png", dpi=110)  # _curve_files
        plt.close(fig)


def write_report(study: Study, out_dir: Path, docs: Path | None = None) -> Path:
    """Write STUDY.md, the CSVs and the plots into ``out_dir``; returns STUDY.md's path.

    With ``docs``, also publish them into ``<docs>/RESULTS.md`` and ``<docs>/results/study``
    (:func:`sims.study.publish.publish`).
    """
    out_dir = Path(out_dir)
    meta_path = out_dir / STUDY_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    runs, curves, classes, coverage = collect(study, out_dir)
    summary, paired = summarize(study, runs)
    class_names = list(dict.fromkeys(c["device"] for c in classes))
    atomic_write_text(out_dir / "runs.csv", csv_text(RUN_COLUMNS, runs))
    atomic_write_text(out_dir / "curves.csv",
                      csv_text(("alpha", "variant", "seed", "round", "accuracy", *class_names), curves))  # fmt: skip
    atomic_write_text(out_dir / "classes.csv", csv_text(CLASS_COLUMNS, classes))
    atomic_write_text(out_dir / "summary.csv", csv_text(SUMMARY_COLUMNS, summary))
    atomic_write_text(out_dir / "paired.csv", csv_text(PAIRED_COLUMNS, paired))
    atomic_write_text(out_dir / "coverage.csv", csv_text(COVERAGE_COLUMNS, coverage))
    _plot(study, curves, out_dir)
    page = out_dir / "STUDY.md"
    atomic_write_text(page, render(study, meta, runs, summary, paired, classes, coverage))
    if docs is not None:
        from sims.study.publish import FIGURES, publish

        section = render(study, meta, runs, summary, paired, classes, coverage, FIGURES)
        publish(out_dir, docs, section, [*TABLES, *_curve_files(study)])
    return page
