"""The sweep's report: RESULTS.md (setup, one table and plots per setting, per device class
tables, the hand-written reading kept) and its plots, from the compact tables."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedneq.federation.devices import default_fleet
from sims.paper.plan import HETERO_METHODS, PAPER_FRACTION, QUICK, Plan, plan_changes
from sims.paper.summary import aggregate, collect, mean_std, read_tables, write_tables
from sims.server.results import atomic_write_text

__all__ = [
    "READING_END",
    "READING_START",
    "STUDY_END",
    "STUDY_START",
    "device_table",
    "existing_block",
    "invocation_lines",
    "render_page",
    "setting_bullets",
    "write_report",
]

READING_START = "<!-- reading:start (hand-written; kept when the page is regenerated) -->"
READING_END = "<!-- reading:end -->"
# the long-horizon study's section (``python -m sims.study --docs``), kept when the page is regenerated
STUDY_START = "<!-- study:start (written by `python -m sims.study --docs`; kept when the page is regenerated) -->"
STUDY_END = "<!-- study:end -->"
NO_STUDY = "_The long-horizon study (`python -m sims.study`) writes its section here with `--docs docs`._"

METHOD_LABELS = {
    "velocity": "velocity",
    "velocity-per-param": "velocity / param",
    "random": "random",
    "full": "full training",
    "fedavg": "FedAvg (dense, full budget)",
    "smallest": "everyone at the smallest budget (velocity)",
    "fedavg-phones": "FedAvg, full-budget devices only",
    "heterofl": "HeteroFL (width sub-models)",
    "fjord": "FjORD (ordered dropout)",
    "fedrolex": "FedRolex (rolling sub-models)",
    "fiarse": "FIARSE (magnitude top-K sub-models)",
}
STEP_NAMES = {"single": "epoch", "homogeneous": "round", "heterogeneous": "round"}
TITLES = {
    "single": "1. Single device",
    "homogeneous": "2. Federated, homogeneous fleet",
    "heterogeneous": "3. Federated, heterogeneous fleet",
}


def method_label(setting: str, tier: str, method: str, plan: dict[str, Any]) -> str:
    if method == "static":
        if setting == "heterogeneous":
            return f"static {plan['hetero_scheme']} (truncated to each budget)"
        return f"static {tier}"
    return METHOD_LABELS.get(method, method)


def tier_label(tier: str, tiers: dict[str, dict[str, Any]]) -> str:
    if tier in tiers:
        return f"{tier} ({100 * tiers[tier]['fraction']:.1f} %)"
    return {"full": "100 %", "mixed": "mixed 1–100 %"}.get(tier, tier)


def markdown_table(table: Sequence[dict[str, Any]], setting: str, meta: dict[str, Any]) -> str:
    """The table of one setting: mean ± std over seeds of each metric."""
    step = STEP_NAMES[setting]
    columns: list[tuple[str, str, float, int]] = [  # header, metric, scale, digits
        ("final acc. (%)", "final_accuracy", 100, 1),
        ("best acc. (%)", "best_accuracy", 100, 1),
        ("worst one-step drop (pts)", "worst_drop", 100, 1),
        (f"{step}s to 95 % of best", "steps_to_95", 1, 1),
        ("simulated time to 95 % (min)", "time_to_95_s", 1 / 60, 1),
        ("upload (MB)", "upload_mb", 1, 1),
        ("FLOPs saved (%)", "flops_saved", 100, 1),
        ("peak memory, estimate (MB)", "peak_memory_mb", 1, 1),
        ("peak memory, measured (MB)", "measured_memory_mb", 1, 1),
        ("trained params (%)", "trainable_fraction", 100, 1),
    ]
    if setting == "single":
        columns = [c for c in columns if c[1] not in ("upload_mb", "time_to_95_s")]
    head = ["budget", "method", *(c[0] for c in columns), "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mine = [r for r in table if r["setting"] == setting]
    for row in mine:
        cells = [tier_label(row["tier"], meta["tiers"]),
                 method_label(setting, row["tier"], row["method"], meta["plan"])]  # fmt: skip
        cells += [
            mean_std(row[f"{m}_mean"], row[f"{m}_std"], scale=s, digits=d) for _, m, s, d in columns
        ]
        lines.append("| " + " | ".join([*cells, str(row["seeds"])]) + " |")
    seconds = [r["seconds_mean"] for r in mine if not math.isnan(r["seconds_mean"])]
    if seconds:
        lines.append(f"\nMean wall time per run: {np.mean(seconds):.0f} s.")
    failed = sum(r["failed_clients_mean"] * r["seeds"] for r in mine)
    if failed:
        lines.append(f"\nFailed or rejected client replies in this setting: {failed:.0f} in all "
                     "(see the runs' clients.csv).")  # fmt: skip
    return "\n".join(lines)


def device_table(devices: Sequence[dict[str, Any]], setting: str, meta: dict[str, Any]) -> str:
    """Per method and device class of ``setting``: means over seeds of what a client trained,
    computed, sent and used ("" when the setting has no device rows)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for d in devices:
        if d["setting"] == setting:
            groups.setdefault((d["tier"], d["method"], d["device"]), []).append(d)
    if not groups:
        return ""
    columns: list[tuple[str, str, float, str]] = [  # header, metric, scale, format
        ("width", "width", 1, ".3f"),
        ("trained params", "trained_params", 1, ",.0f"),
        ("training GFLOPs / round", "train_mflops", 1e3, ".2f"),
        ("upload (kB)", "upload_kb", 1, ",.0f"),
        ("memory, estimate (MB)", "memory_estimate_kb", 1e3, ".1f"),
        ("memory, measured (MB)", "measured_memory_kb", 1e3, ".1f"),
        ("memory-bound replies (%)", "memory_bound", 1e-2, ".0f"),
        # the model a device of the class runs: a width's own sub-model, else the global model
        ("own model's final acc. (%)", "own_accuracy", 1e-2, ".1f"),
    ]
    head = ["method", "device", *(c[0] for c in columns), "seeds"]
    lines = [
        "Per device class (each seed's means over its accepted replies, memory its largest; "
        "then the mean over seeds; — where a method does not have the quantity):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    order = {m: i for i, m in enumerate(HETERO_METHODS)}
    classes = {d.name: i for i, (d, _) in enumerate(default_fleet().classes)}
    for (tier, method, device), rows in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][1], 99), classes.get(kv[0][2], 99), kv[0])
    ):
        cells = [method_label(setting, tier, method, meta["plan"]), device]
        for _, metric, scale, fmt in columns:
            values = [float(r[metric]) for r in rows if not math.isnan(float(r[metric]))]
            cells.append(format(np.mean(values) / scale, fmt) if values else "—")
        lines.append("| " + " | ".join([*cells, str(len(rows))]) + " |")
    return "\n".join(lines)


def plot_setting(
    curves: Sequence[dict[str, Any]], setting: str, meta: dict[str, Any], out_dir: Path
) -> list[Path]:
    """Accuracy vs epoch/round (and vs cumulative upload), mean ± std over seeds, one panel per tier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [c for c in curves if c["setting"] == setting]
    tiers = [t for t in dict.fromkeys(c["tier"] for c in mine) if t not in ("full",)]
    shared = [c for c in mine if c["tier"] == "full"]  # drawn in every panel
    xs = [("step", STEP_NAMES[setting], "accuracy")]
    if setting != "single":
        xs.append(("cum_bytes_up", "cumulative upload (MB)", "accuracy_vs_upload"))
    paths = []
    for x_key, x_label, suffix in xs:
        fig, axes = plt.subplots(
            1, max(1, len(tiers)), figsize=(5 * max(1, len(tiers)), 3.8), squeeze=False
        )
        for ax, tier in zip(axes[0], tiers or ["full"], strict=False):
            panel = [c for c in mine if c["tier"] == tier] + (shared if tier != "full" else [])
            for (t, method), points in _by_method(panel).items():
                x, mean, std = _curve(points, x_key)
                label = method_label(setting, t, method, meta["plan"])
                ax.plot(x, 100 * mean, marker="o", ms=2.5, label=label)
                ax.fill_between(x, 100 * (mean - std), 100 * (mean + std), alpha=0.15)
            ax.set_title(tier_label(tier, meta["tiers"]), fontsize=9)
            ax.set_xlabel(x_label)
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"{setting}_{suffix}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _by_method(points: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["tier"], p["method"]), []).append(p)
    return groups


def _curve(points: Sequence[dict[str, Any]], x_key: str) -> tuple[np.ndarray, ...]:
    """Per step over seeds: x (step, or mean upload in MB), mean and std of the accuracy."""
    steps = sorted({p["step"] for p in points})
    at = [[p for p in points if p["step"] == k] for k in steps]
    acc = [np.array([p["accuracy"] for p in group]) for group in at]
    if x_key == "step":
        x = np.array(steps, dtype=float)
    else:
        x = np.array([np.mean([p["cum_bytes_up"] for p in group]) for group in at]) / 1e6
    return x, np.array([a.mean() for a in acc]), np.array([a.std() for a in acc])


BN_SENTENCES = {
    "frozen": "BatchNorm layers run in eval mode during fine-tuning (`bn_stats = \"frozen\"`): "
    "their running statistics stay the upstream ones and are never sent; their weight and bias "
    "train with their neuron.",
    "all": "Every BatchNorm re-estimates its running statistics on the new task "
    "(`bn_stats = \"all\"`), frozen channels included, and sends them whole.",
    "selected": "A BatchNorm's running statistics train and travel with their neuron "
    "(`bn_stats = \"selected\"`).",
}


LOSS_SENTENCES = {
    "cross-entropy": "Local loss: cross-entropy.",
    "balanced-softmax": "Local loss: the balanced softmax (`loss = \"balanced-softmax\"`, "
    "cross-entropy of the logits plus the log of the client's own class counts), so a client "
    "with label skew does not push down the classes it lacks; on balanced data it is "
    "cross-entropy.",
}


def bn_sentence(plan: dict[str, Any]) -> str:
    """What the runs did with BatchNorm (older sweeps ran ``"all"`` everywhere)."""
    fed, single = plan.get("bn_stats", "all"), plan.get("single_bn_stats", plan.get("bn_stats", "all"))
    if fed == single or set(plan["settings"]) <= {"single"} or "single" not in plan["settings"]:
        return BN_SENTENCES[single if set(plan["settings"]) <= {"single"} else fed]
    return f"Federated runs: {BN_SENTENCES[fed]} On one device: {BN_SENTENCES[single]}"


def velocity_sentence(velocity: dict[str, Any] | None) -> str:
    """How velocity was measured, from the sweep's metadata (absent in older sweeps)."""
    if not velocity:
        return "Velocity: fedneq's defaults of the time (not recorded)."
    mode = {"pooled": "pooled (each output averaged over space, cosine over the probe images)",
            "per-feature": "per-feature (cosine over the spatial positions, mean over probe images)"}
    return (
        f"Velocity mode {mode.get(velocity['mode'], velocity['mode'])}, μ = {velocity['mu']}, probe "
        f"outputs kept between rounds in {velocity['storage_dtype']}."
    )  # fmt: skip


def stabiliser_sentence(plan: dict[str, Any]) -> str:
    """The federated stabilisers a stored ``plan`` turned on ("" when none)."""
    parts = []
    if plan.get("prox_mu", 0.0) > 0:
        parts.append(f"FedProx pull μ = {plan['prox_mu']:g} in the dense FedAvg runs")
    if plan.get("clip_update_ratio", 0.0) > 0:
        parts.append(
            f"each reply's change clipped to {plan['clip_update_ratio']:g}× the round's median "
            "(not in the width sub-model runs, whose replies' size grows with their width)"
        )
    return f" Stabilisers: {'; '.join(parts)}." if parts else ""


def setting_bullets(plan: dict[str, Any]) -> list[str]:
    """The setup of each setting the stored ``plan`` ran, one Markdown bullet each."""
    single = (
        f"* **Single device**: {plan['single_train_limit'] - plan['probe_size']} training images, "
        f"{plan['probe_size']} probe images, {plan['epochs']} epochs, re-selection after every epoch."
    )
    federated = (
        f"* **Federated**: {plan['fed_train_limit']} images over {plan['num_clients']} clients "
        f"(Dirichlet α = {plan['alpha']}), {plan['clients_per_round']} clients per round, "
        f"{plan['rounds']} rounds, {plan['local_epochs']} local epochs, "
        f"`{plan.get('strategy', 'neuron-avg')}` aggregation, {plan['probe_size']} probe "
        "images per client; velocity state kept on each client between participations."
        + stabiliser_sentence(plan)
    )
    hetero = (
        "* **Heterogeneous fleet**: fedneq's default fleet, 30 % mcu (1 %), 40 % pi-zero (5 %), "
        "20 % pi-4 (20 %), 10 % phone (100 % of the selectable parameters), all at batch "
        f"{plan['batch_size']}; mcu and pi-zero also carry their memory limits "
        "(`memory_fraction` 0.25 / 0.5), which the mask methods honour and the width "
        "sub-models do not (their width comes from the budget; their memory is measured). "
        f"Static: scheme {plan['hetero_scheme']} truncated to each device's "
        "budget (its neurons in layer order, then by weight norm). FedAvg-phones: only the phones "
        "take part, so fewer clients per round. HeteroFL / FjORD / FedRolex: each device trains "
        "the widest sub-model (ceil(p·C) channels of every layer) whose selectable parameters fit "
        "its budget, averaged element by element (`strategies/width_avg.py`)."
    )
    settings = plan["settings"]
    return [
        *([single] if "single" in settings else []),
        *([federated] if set(settings) - {"single"} else []),
        *([hetero] if "heterogeneous" in settings else []),
    ]


def render_page(
    table: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    plots: dict[str, list[str]],
    reading: str,
    devices: Sequence[dict[str, Any]] = (),
    study: str = "",
) -> str:
    """RESULTS.md: setup, one section per setting (table + plots), the hand-written reading.

    The heterogeneous section opens with ``study``, the long-horizon study's
    block (:data:`STUDY_START`), and labels this sweep's rows a short run.
    """
    plan, hw, git = meta["plan"], meta["hardware"], meta["git"]
    quick = plan["name"] == QUICK.name
    changes = plan_changes(plan)
    total = sum(i["seconds"] for i in meta.get("invocations", []))
    commands = sorted({i["command"] for i in meta.get("invocations", [])}) or ["(unknown)"]
    lines = [
        "# Results: velocity-based selection vs random, static Sparse Update and full training",
        "",
        "<!-- Generated by `python -m sims.paper` (regenerate: `python -m sims.paper --report-only`). "
        "Edit only the reading section at the end. -->",
        "",
        *(["> **Preliminary:** these are `--quick` results (one seed, one budget tier, few epochs "
           "and rounds), not the full sweep.", ""] if quick else []),  # fmt: skip
        f"* Command: {', '.join(f'`{c}`' for c in commands)}",
        *invocation_lines(meta),
        f"* Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB; Python {hw['python']}, "
        f"torch {hw['torch']}, flwr {hw['flwr']}",
        f"* fedneq commit: `{git['commit']}`{' (with uncommitted changes)' if git['dirty'] else ''}",
        f"* Wall time of the sweep: {total / 60:.1f} min over {len(meta.get('invocations', []))} "
        "invocation(s), upstream pretraining included when it ran",
        f"* Seeds: {', '.join(map(str, plan['seeds']))}; mean ± std (ddof 1) over seeds.",
        *([f"* Changed from the {'quick' if quick else 'full'} plan: "
           + ", ".join(f"`{k} = {_plain(v)}`" for k, v in changes.items())] if changes else []),
        "",
        "## Setup",
        "",
        f"MobileNetV2 (torchvision, width {plan['width_mult']}, {plan['image_size']}×{plan['image_size']} "
        f"inputs) pretrained by fedneq on the upstream classes 0–4 of {plan['dataset']} "
        f"({plan['pretrain_epochs']} epochs on {meta['checkpoint']['train_samples']} images, upstream test "
        f"accuracy {100 * meta['checkpoint']['upstream_test_accuracy']:.1f} %), fine-tuned with a "
        f"fresh head on classes 5–9 (SGD with momentum 0.9, batch {plan['batch_size']}, lr "
        f"{plan['single_lr']} on one device, {plan['fed_lr']} in federated runs). "
        "One upstream checkpoint serves every seed and method; the seed sets the head, the data "
        f"subsets, the batch order and the selections. Test accuracy on {plan['test_limit']} held-out "
        f"downstream images. {velocity_sentence(meta.get('velocity'))} "
        f"{bn_sentence(plan)} {LOSS_SENTENCES[plan.get('loss', 'cross-entropy')]} Every epoch is "
        "cut into ⌈n / batch⌉ near-equal batches (no degenerate last batch).",
        "",
        *setting_bullets(plan),
        "",
        "Budget tiers (the paper's Sparse Update schemes). Static trains the scheme; velocity and "
        + ("random get the scheme's conv-weight parameter count (the paper's protocol)"
           if plan["budget_basis"] == "scheme" else "random get the paper's fraction of this model's conv weights")
        + ". fedneq counts a neuron's BatchNorm weight and bias in its cost, so at the same budget "
        "velocity and random train slightly fewer conv weights than that count; static also trains "
        "its BN neurons' parameters and the biases of the last convs outside the budget (the "
        "`trained params` column shows what each method actually trained). The classifier head "
        "is always trained, outside every budget.",
        "",
        "| tier | scheme's conv weights | of all conv weights | velocity / random budget (params) | paper |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for name, t in meta["tiers"].items():
        lines.append(
            f"| {name} | {t['scheme_conv_params']:,} | {100 * t['scheme_conv_params'] / t['conv_params']:.1f} % "
            f"| {t['budget']:,} | {100 * PAPER_FRACTION[name]:.1f} % |"
        )
    for setting in plan["settings"]:
        if not any(r["setting"] == setting for r in table):
            continue
        lines += ["", f"## {TITLES[setting]}", ""]
        if setting == "heterogeneous":
            lines += [STUDY_START, study.strip("\n") or NO_STUDY, STUDY_END, "",
                      f"### This sweep's MobileNetV2 fleet: a short run ({plan['rounds']} rounds)", "",
                      "> Every curve of this sweep still rises at its last round: its rows give the "
                      "MobileNetV2 setting's costs per device class, not where the methods end. The "
                      "long-horizon study above answers that.", ""]  # fmt: skip
        lines += [markdown_table(table, setting, meta), ""]
        per_device = device_table(devices, setting, meta)
        lines += [per_device, ""] if per_device else []
        lines += [
            f"![{setting}: {Path(p).stem}](results/{Path(p).name})" for p in plots.get(setting, [])
        ]
    lines += ["", "## Reading", "", READING_START, reading.strip("\n"), READING_END, ""]
    return "\n".join(lines)


def invocation_lines(meta: dict[str, Any]) -> list[str]:
    """A bullet for each invocation with a note or run at another commit than the page's."""
    lines = []
    for i in meta.get("invocations", []):
        commit = i.get("commit", "")
        other = bool(commit) and commit != meta["git"]["commit"]
        if not (i.get("note") or other):
            continue
        parts = [f"{i['runs']} runs at commit `{commit}`"] if other else []
        lines.append(f"* Invocation of {i['started']}: " + "; ".join([*parts, *filter(None, [i.get("note")])]))
    return lines


def _plain(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def existing_block(page: Path, start: str, end: str) -> str | None:
    """The text between the ``start`` and ``end`` markers of an existing page, or None."""
    text = page.read_text() if page.exists() else ""
    if start in text and end in text:
        return text.split(start, 1)[1].split(end, 1)[0]
    return None


def existing_reading(page: Path) -> str:
    """The hand-written reading section of an existing RESULTS.md (a placeholder if none)."""
    reading = existing_block(page, READING_START, READING_END)
    if reading is not None:
        return reading
    return ("\n_To be written by hand after the full sweep: where velocity wins, ties or loses "
            "against random, static SU and full training, compared with the paper's table._\n")  # fmt: skip


def write_report(out_dir: Path | None, docs_dir: Path) -> Path:
    """Rewrite ``<docs>/RESULTS.md`` and ``<docs>/results/`` from the runs under ``out_dir``.

    With ``out_dir`` None (or holding no sweep) the page is rebuilt from the
    compact ``runs.csv`` / ``curves.csv`` / ``sweep.json`` already in ``<docs>/results``.
    """
    res = Path(docs_dir) / "results"
    res.mkdir(parents=True, exist_ok=True)
    if out_dir is not None and (Path(out_dir) / "sweep.json").exists():
        meta = json.loads((Path(out_dir) / "sweep.json").read_text())
        plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["plan"].items()})
        write_tables(collect(plan, Path(out_dir)), res)
        atomic_write_text(res / "sweep.json", json.dumps(meta, indent=1))
    elif (res / "sweep.json").exists():
        meta = json.loads((res / "sweep.json").read_text())
    else:
        raise FileNotFoundError(f"no sweep.json in {out_dir} or {res}: run the sweep first")
    tables = read_tables(res)
    table = aggregate(tables.summaries)
    plots = {s: [str(p) for p in plot_setting(tables.curves, s, meta, res)]
             for s in meta["plan"]["settings"] if any(c["setting"] == s for c in tables.curves)}  # fmt: skip
    page = Path(docs_dir) / "RESULTS.md"
    study = existing_block(page, STUDY_START, STUDY_END) or ""
    atomic_write_text(page, render_page(table, meta, plots, existing_reading(page), tables.devices, study))
    return page
