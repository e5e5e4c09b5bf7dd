"""Gradient filtering in fine-tuning: accuracy, step time, memory and FLOPs, alone and with velocity masks.

    python -m sims.benchmarks.grad_filter_study --out results/grad_filter_study
    python -m sims.benchmarks.grad_filter_study --quick --out /tmp/gfs   # a smoke run, ~1 min

Setting: MobileNetV2 x0.5 (torchvision), pretrained by fedneq on Fashion-MNIST
classes 0-4 (a ``--pretrain-limit`` subset, ``--pretrain-epochs``, one
checkpoint for every seed), fine-tuned on classes 5-9 upsampled to
``--image-size`` (default 64: the last blocks then run on 2x2 and 4x4 maps)
for ``--epochs`` on a ``--train-limit`` subset, evaluated on ``--test-limit``
test images. A seed draws the fresh head, the subsets and the batch order;
every variant of a seed starts from the same weights and sees the same batches.

Parts (``--parts``, comma-separated), each a CSV in ``--out``; every CSV is
appended row by row and a row already there is not run again (resumable):

* ``finetune`` -> ``finetune.csv``: train the last k blocks (``features.*`` of
  torchvision's MobileNetV2; ``all``: the whole network) plus the head, exact
  (r = 1) or with every conv of those blocks that filtering can handle
  filtered at r (forced: the fallback off, so the accuracy is filtering's).
  Per row: test accuracy, the filtered convs, measured training memory of a
  step (:mod:`fedneq.training.memory`) next to the cost model's estimate
  (:func:`fedneq.costs.mask_cost` with the filter's pricing), backward FLOPs.
* ``timing`` -> ``timing.csv``: CPU seconds of one whole training step (forward,
  backward, SGD step) per variant, median of ``--timing-steps``, interleaved round-robin in one process (the
  ratios are what to read on a shared machine): exact, forced filtering, and
  the automatic fallback (``fallback="probe"``); ``probe.csv``: the probe's
  per-conv timings and choices.
* ``gradients`` -> ``gradients.csv``: per filtered conv, how far its filtered
  weight gradient is from the exact one, and why
  (:mod:`sims.benchmarks.grad_filter_error`).
* ``velocity`` -> ``velocity.csv``: velocity selection at the SU-1 / SU-3
  budgets (8.8 % / 21.2 % of the selectable parameters), each epoch's mask
  trained exact or with every conv it trains filtered at r = 2 (forced);
  accuracy, measured and estimated memory, earliest trained conv.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedneq.config import Config
from fedneq.costs import mask_cost, profile_model
from fedneq.neurons import NeuronMap, TrainMask
from fedneq.selection import get_selector
from fedneq.selection.velocity import VelocityTracker
from fedneq.task import build_model, generator, load_task
from fedneq.training.evaluation import evaluate
from fedneq.training.filter_probe import FilterChoice
from fedneq.training.grad_filter import GradFilterConfig, filter_geometry, filter_pricing
from fedneq.training.loop import OptimizerConfig, train_masked, train_step
from fedneq.training.masking import RowFreezer
from fedneq.training.pretrain import cached_pretrain
from sims.benchmarks.grad_filter_error import ERROR_COLUMNS, gradient_errors
from sims.server.initial import initial_state

__all__ = ["main", "run_study"]

BLOCKS = ("1", "2", "4", "all")
RS = (2, 4)
SU_BUDGETS = {"SU-1": 0.088, "SU-3": 0.212}
FINETUNE_COLUMNS = (
    "variant", "k", "r", "seed", "accuracy", "test_loss", "train_loss", "filtered_convs",
    "filtered_layers", "trained_convs", "memory_measured_bytes", "memory_estimate_bytes",
    "saved_activation_measured_bytes", "saved_activation_estimate_bytes", "bwd_flops",
    "total_flops", "flops_saved", "seconds",
)  # fmt: skip
TIMING_COLUMNS = ("variant", "k", "r", "fallback", "filtered_layers", "step_s", "ratio_to_exact")
PROBE_COLUMNS = ("r", "conv", "name", "in_shape", "groups", "filtered", "reason", "dense_ms",
                 "filtered_ms", "speedup")  # fmt: skip
VELOCITY_COLUMNS = (
    "budget", "r", "seed", "accuracy", "earliest_conv", "trained_convs", "filtered_layers",
    "memory_measured_bytes", "memory_estimate_bytes", "saved_activation_measured_bytes",
    "bwd_flops", "seconds",
)  # fmt: skip


# --------------------------------------------------------------------------- csv


class Table:
    """A CSV appended row by row; :meth:`has` says whether a key's row is already there."""

    def __init__(self, path: Path, columns: Sequence[str], key: Sequence[str]) -> None:
        self.path, self.columns, self.key = path, tuple(columns), tuple(key)
        self.rows: list[dict[str, str]] = []
        if path.exists():
            with path.open() as f:
                self.rows = list(csv.DictReader(f))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                csv.DictWriter(f, self.columns).writeheader()

    def has(self, **key: Any) -> bool:
        want = tuple(str(key[k]) for k in self.key)
        return any(tuple(r[k] for k in self.key) == want for r in self.rows)

    def add(self, row: dict[str, Any]) -> None:
        row = {c: (f"{v:.6g}" if isinstance(v, float) else v) for c, v in row.items()}
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({c: row.get(c, "") for c in self.columns})
        self.rows.append({c: str(row.get(c, "")) for c in self.columns})


# --------------------------------------------------------------------------- setup


def _config(args: argparse.Namespace, seed: int, checkpoint: Path) -> Config:
    return Config.from_dict({
        "run": {"name": "grad-filter-study", "seed": seed, "out_dir": str(args.out)},
        "data": {"dataset": "fashion-mnist", "image_size": args.image_size,
                 "classes": "downstream", "train_limit": args.train_limit + args.probe,
                 "test_limit": args.test_limit, "probe_size": args.probe},
        "model": {"name": "mobilenet_v2", "width_mult": 0.5, "checkpoint": str(checkpoint)},
        "train": {"lr": args.lr, "loss": "cross-entropy"},
        "fleet": {"preset": "homogeneous", "batch_size": args.batch_size},
    })  # fmt: skip


def _pretrained(args: argparse.Namespace) -> Path:
    """The upstream checkpoint, pretrained once per setting (``fedneq.training.pretrain.cached_pretrain``)."""
    key = {"model": "mobilenet_v2", "width_mult": 0.5, "dataset": "fashion-mnist", "image_size": args.image_size,
           "train_limit": args.pretrain_limit, "epochs": args.pretrain_epochs, "seed": 0}  # fmt: skip
    return cached_pretrain(
        "mobilenet_v2", "fashion-mnist", cache_dir=args.out / "_pretrained", key=key,
        epochs=args.pretrain_epochs, image_size=args.image_size, width_mult=0.5,
        train_limit=args.pretrain_limit, test_limit=args.test_limit, seed=0,
        log=lambda s: print(f"[study] {s}", flush=True),
    )  # fmt: skip


def _convs(nmap: NeuronMap) -> list[str]:
    return [lay.name for lay in nmap.layers if lay.kind == "conv"]


def _block_mask(nmap: NeuronMap, k: str) -> TrainMask:
    """Every neuron of the last ``k`` ``features`` blocks (``all``: of the network) + the head."""
    neurons = nmap.empty_mask()
    first = 0 if k == "all" else 19 - int(k)  # features.1 .. features.18
    for lay in nmap.layers:
        parts = lay.name.split(".")
        if parts[0] == "features" and int(parts[1]) >= first:
            neurons[lay.slice] = True
    return nmap.train_mask(neurons)


def _trained_convs(nmap: NeuronMap, mask: TrainMask) -> list[str]:
    return [lay.name for lay in nmap.layers if lay.kind == "conv" and bool(mask.neurons[lay.slice].any())]


def _applicable(model: torch.nn.Module, profile, names: Sequence[str], r: int) -> list[str]:
    """The convs of ``names`` whose shape filtering with ``r`` can handle."""
    shapes = {lay.name: lay for lay in profile.layers}
    modules = dict(model.named_modules())
    ok = []
    for name in names:
        conv, lay = modules[name], shapes[name]
        try:
            filter_geometry(kernel=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                            dilation=conv.dilation, r=r, in_hw=lay.in_shape[-2:],
                            out_hw=lay.out_shape[-2:], name=name)  # fmt: skip
        except ValueError:
            continue
        ok.append(name)
    return ok


class Setup:
    """One seed's data, model, neuron map, profile and starting weights."""

    def __init__(self, args: argparse.Namespace, seed: int, checkpoint: Path) -> None:
        self.config = _config(args, seed, checkpoint)
        task = load_task(self.config)
        torch.manual_seed(seed)
        self.model, self.nmap = build_model(self.config, task)
        self.start = initial_state(self.config, task, self.model, args.out / "_pretrained")
        pool = task.train.materialize()
        order = torch.randperm(len(pool), generator=generator(seed, 0))
        self.probe, self.train = pool.subset(order[: args.probe]), pool.subset(order[args.probe :])
        self.test = task.test
        self.profile = profile_model(self.model, self.nmap, tuple(self.train.x.shape[1:]))
        self.seed, self.args = seed, args
        self.opt = OptimizerConfig(lr=args.lr)

    def filter_for(self, names: Sequence[str], r: int) -> GradFilterConfig | None:
        return GradFilterConfig(r=r, layers=tuple(names)) if names and r > 1 else None

    def costs(self, mask: TrainMask, filtered: Sequence[str], r: int):
        prices = filter_pricing(self.model, filtered, r) if filtered else None
        return mask_cost(self.profile, mask, self.model.state_dict(), batch_size=self.args.batch_size,
                         optimizer=self.opt.cost_name, dense_grads=True, grad_filter=prices)  # fmt: skip

    def finetune(self, masks, grad_filter: GradFilterConfig | None):
        self.model.load_state_dict(self.start)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            result = train_masked(
                self.model, self.train, neuron_map=self.nmap, masks=masks, epochs=self.args.epochs,
                batch_size=self.args.batch_size, optimizer=self.opt,
                generator=generator(self.seed, 1), cost_profile=self.profile,
                bn_stats=self.config.train.bn_stats, loss="cross-entropy",
                grad_filter=grad_filter, measure_memory=True,
            )  # fmt: skip
        test_loss, acc = evaluate(self.model, self.test)
        return result, acc, test_loss, time.perf_counter() - t0


# --------------------------------------------------------------------------- parts


def finetune_part(setup: Setup, table: Table) -> None:
    convs = _convs(setup.nmap)
    for k in setup.args.blocks:
        mask = _block_mask(setup.nmap, k)
        trained = _trained_convs(setup.nmap, mask)
        for r in (1, *RS):
            if table.has(k=k, r=r, seed=setup.seed):
                continue
            names = _applicable(setup.model, setup.profile, trained, r) if r > 1 else []
            if r > 1 and not names:
                print(f"[study] seed {setup.seed} k={k} r={r}: no trained conv accepts r", flush=True)
                continue
            result, acc, test_loss, seconds = setup.finetune(mask, setup.filter_for(names, r))
            cost = setup.costs(mask, result.filtered, r)
            measured = max((e.measured for e in result.epochs), key=lambda m: m.peak_bytes)
            table.add({
                "variant": "exact" if r == 1 else "filtered", "k": k, "r": r, "seed": setup.seed,
                "accuracy": acc, "test_loss": test_loss, "train_loss": result.loss,
                "filtered_convs": " ".join(str(convs.index(n)) for n in result.filtered),
                "filtered_layers": len(result.filtered), "trained_convs": len(trained),
                "memory_measured_bytes": measured.peak_bytes,
                "memory_estimate_bytes": cost.training_memory_bytes,
                "saved_activation_measured_bytes": measured.saved_activation_bytes,
                "saved_activation_estimate_bytes": cost.saved_activation_bytes,
                "bwd_flops": cost.bwd_weight_flops + cost.bwd_input_flops,
                "total_flops": cost.total_flops, "flops_saved": cost.flops_saved,
                "seconds": seconds,
            })  # fmt: skip
            print(f"[study] finetune seed {setup.seed} k={k:>3} r={r}: acc {acc:.4f}, "
                  f"{len(result.filtered)} convs filtered, {seconds:.0f} s", flush=True)  # fmt: skip


def timing_part(setup: Setup, timing: Table, probe: Table, steps: int) -> None:
    """Whole training steps, every variant interleaved round-robin (ratios within one run)."""
    if timing.rows:
        return
    convs = _convs(setup.nmap)
    variants: list[tuple[str, str, int, str, TrainMask, GradFilterConfig | None]] = []
    for k in BLOCKS:
        mask = _block_mask(setup.nmap, k)
        trained = _trained_convs(setup.nmap, mask)
        variants.append(("exact", k, 1, "", mask, None))
        for r in RS:
            names = _applicable(setup.model, setup.profile, trained, r)
            if names:
                variants.append(("filtered", k, r, "off", mask, GradFilterConfig(r=r, layers=tuple(names))))
                variants.append(("filtered", k, r, "probe", mask,
                                 GradFilterConfig(r=r, layers=tuple(trained), fallback="probe")))  # fmt: skip
    bs = setup.args.batch_size
    x, y = setup.train.x[:bs], setup.train.y[:bs]
    times: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    filtered: dict[int, int] = {}
    for step in range(steps + 1):
        for i, (_, _, r, _, mask, gf) in enumerate(variants):
            setup.model.load_state_dict(setup.start)
            setup.model.train()
            opt = setup.opt.build(list(setup.model.parameters()))
            with RowFreezer(setup.model, setup.nmap, mask, grad_filter=gf, profile=setup.profile,
                            batch_size=bs) as freezer:  # fmt: skip
                t0 = time.process_time()
                train_step(setup.model, x, y, opt, freezer)
                seconds = time.process_time() - t0
                filtered[i] = len(freezer.ops.filtered) if freezer.ops is not None else 0
                if step == 0 and gf is not None and gf.fallback == "probe" and freezer.ops:
                    _probe_rows(probe, r, freezer.ops.choices, setup, convs)
            if step:  # step 0 warms up (and runs the probe)
                times[i].append(seconds)
        print(f"[study] timing round {step}/{steps}", flush=True)
    exact = {v[1]: statistics.median(times[i]) for i, v in enumerate(variants) if v[0] == "exact"}
    for i, (variant, k, r, fallback, _, _) in enumerate(variants):
        med = statistics.median(times[i])
        timing.add({"variant": variant, "k": k, "r": r, "fallback": fallback,
                    "filtered_layers": filtered[i], "step_s": med, "ratio_to_exact": med / exact[k]})  # fmt: skip


def _probe_rows(probe: Table, r: int, choices: Sequence[FilterChoice], setup: Setup, convs) -> None:
    shapes = {lay.name: lay for lay in setup.profile.layers}
    modules = dict(setup.model.named_modules())
    for c in choices:
        if probe.has(r=r, name=c.name):
            continue
        probe.add({
            "r": r, "conv": convs.index(c.name), "name": c.name,
            "in_shape": "x".join(map(str, shapes[c.name].in_shape)),
            "groups": modules[c.name].groups, "filtered": int(c.filtered), "reason": c.reason[:80],
            "dense_ms": "" if c.dense_s is None else 1e3 * c.dense_s,
            "filtered_ms": "" if c.filtered_s is None else 1e3 * c.filtered_s,
            "speedup": "" if c.speedup is None else c.speedup,
        })  # fmt: skip


def velocity_part(setup: Setup, table: Table) -> None:
    convs = _convs(setup.nmap)
    for budget_name, budget in SU_BUDGETS.items():
        for r in (1, 2):
            if table.has(budget=budget_name, r=r, seed=setup.seed):
                continue
            setup.model.load_state_dict(setup.start)
            selector = get_selector(
                "velocity", neuron_map=setup.nmap, model=setup.model, budget=budget,
                cost_profile=setup.profile, batch_size=setup.args.batch_size,
                optimizer=setup.opt.cost_name, dense_grads=True,
            )  # fmt: skip
            gen = generator(setup.seed, 2)
            masks: list[TrainMask] = []
            with VelocityTracker(setup.model, setup.nmap, mode="pooled") as tracker:

                def mask_for(epoch: int, tracker=tracker, selector=selector, gen=gen, masks=masks):
                    velocity = tracker.measure(setup.probe.x) if epoch else None
                    masks.append(selector.select(velocity, gen))
                    return masks[-1]

                gf = GradFilterConfig(r=2, trained=True, fallback="shape") if r > 1 else None
                result, acc, _, seconds = _finetune_from_current(setup, mask_for, gf)
            trained = sorted({convs.index(n) for m in masks for n in _trained_convs(setup.nmap, m)})
            cost = setup.costs(masks[-1], result.epochs[-1].filtered, 2)
            measured = max((e.measured for e in result.epochs), key=lambda m: m.peak_bytes)
            table.add({
                "budget": budget_name, "r": r, "seed": setup.seed, "accuracy": acc,
                "earliest_conv": trained[0] if trained else "", "trained_convs": len(trained),
                "filtered_layers": len(result.filtered),
                "memory_measured_bytes": measured.peak_bytes,
                "memory_estimate_bytes": cost.training_memory_bytes,
                "saved_activation_measured_bytes": measured.saved_activation_bytes,
                "bwd_flops": cost.bwd_weight_flops + cost.bwd_input_flops, "seconds": seconds,
            })  # fmt: skip
            print(f"[study] velocity seed {setup.seed} {budget_name} r={r}: acc {acc:.4f}, "
                  f"{len(result.filtered)} convs filtered, {seconds:.0f} s", flush=True)  # fmt: skip


def _finetune_from_current(setup: Setup, masks, gf):
    """:meth:`Setup.finetune` without reloading (the selector has read the start weights)."""
    start = setup.start
    setup.start = {k: v.clone() for k, v in setup.model.state_dict().items()}
    try:
        return setup.finetune(masks, gf)
    finally:
        setup.start = start


def gradients_part(setup: Setup, table: Table, batches: int) -> None:
    """Per-conv gradient error of the filtered regions (:mod:`sims.benchmarks.grad_filter_error`)."""
    bs = setup.args.batch_size
    data = [(setup.train.x[i * bs:(i + 1) * bs], setup.train.y[i * bs:(i + 1) * bs])
            for i in range(batches)]  # fmt: skip
    for k, r in (("2", 2), ("4", 2), ("all", 2), ("all", 4)):
        if table.has(seed=setup.seed, k=k, r=r):
            continue
        mask = _block_mask(setup.nmap, k)
        names = _applicable(setup.model, setup.profile, _trained_convs(setup.nmap, mask), r)
        if not names:
            continue
        setup.model.load_state_dict(setup.start)
        for row in gradient_errors(setup.model, setup.nmap, mask, names, r, data):
            table.add(row | {"seed": setup.seed, "k": k})
        print(f"[study] gradients seed {setup.seed} k={k} r={r}: {len(names)} convs", flush=True)


# --------------------------------------------------------------------------- report

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t, two-sided 95 %


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def _paired(diffs: Sequence[float]) -> str:
    """Mean paired difference in points, with its 95 % t interval (n >= 2)."""
    if not diffs:
        return ""
    mean = 100 * statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.2f} (n=1)"
    half = 100 * _T975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def _ratio(a: str, b: str) -> str:
    return f"{float(a) / float(b):.3f}" if a and b and float(b) else ""


def report(out: Path) -> str:
    """Markdown tables of the study's CSVs in ``out`` (what ran, paired against exact)."""
    lines: list[str] = []
    fine = Table(out / "finetune.csv", FINETUNE_COLUMNS, ("k", "r", "seed")).rows
    if fine:
        lines += ["| blocks k | r | seeds | accuracy % (mean ± std) | Δ vs exact, points [95 % CI] | "
                  "filtered convs | memory measured / exact | estimate / exact | saved act. measured / exact | "
                  "backward FLOPs / exact |", "|" + "---|" * 10]  # fmt: skip
        for k in BLOCKS:
            exact = {r["seed"]: r for r in fine if r["k"] == k and r["r"] == "1"}
            for rr in ("1", *map(str, RS)):
                rows = [r for r in fine if r["k"] == k and r["r"] == rr]
                if not rows:
                    continue
                paired = [r for r in rows if r["seed"] in exact]
                diffs = [float(r["accuracy"]) - float(exact[r["seed"]]["accuracy"]) for r in paired]
                e0, r0 = exact.get(rows[0]["seed"], {}), rows[0]
                lines.append(
                    f"| {k} | {rr} | {len(rows)} | {_mean_std([float(r['accuracy']) for r in rows])} | "
                    f"{'' if rr == '1' else _paired(diffs)} | {r0['filtered_layers']} | "
                    f"{_ratio(r0['memory_measured_bytes'], e0.get('memory_measured_bytes', ''))} | "
                    f"{_ratio(r0['memory_estimate_bytes'], e0.get('memory_estimate_bytes', ''))} | "
                    f"{_ratio(r0['saved_activation_measured_bytes'], e0.get('saved_activation_measured_bytes', ''))} | "
                    f"{_ratio(r0['bwd_flops'], e0.get('bwd_flops', ''))} |"
                )  # fmt: skip
    timing = Table(out / "timing.csv", TIMING_COLUMNS, ("variant", "k", "r", "fallback")).rows
    if timing:
        lines += ["", "| blocks k | r | fallback | filtered convs | step s (median) | step / exact |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['k']} | {r['r']} | {r['fallback'] or '—'} | {r['filtered_layers']} | "
                  f"{float(r['step_s']):.3f} | {float(r['ratio_to_exact']):.3f} |" for r in timing]  # fmt: skip
    vel = Table(out / "velocity.csv", VELOCITY_COLUMNS, ("budget", "r", "seed")).rows
    if vel:
        lines += ["", "| budget | r | seeds | accuracy % | Δ vs exact [95 % CI] | filtered convs | "
                  "earliest conv | memory measured (MB) | saved act. measured (MB) |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for b in SU_BUDGETS:
            exact = {r["seed"]: r for r in vel if r["budget"] == b and r["r"] == "1"}
            for rr in ("1", "2"):
                rows = [r for r in vel if r["budget"] == b and r["r"] == rr]
                if not rows:
                    continue
                diffs = [float(r["accuracy"]) - float(exact[r["seed"]]["accuracy"])
                         for r in rows if r["seed"] in exact]  # fmt: skip
                mb = statistics.mean(float(r["memory_measured_bytes"]) for r in rows) / 2**20
                act = statistics.mean(float(r["saved_activation_measured_bytes"]) for r in rows) / 2**20
                lines.append(
                    f"| {b} | {rr} | {len(rows)} | {_mean_std([float(r['accuracy']) for r in rows])} | "
                    f"{'' if rr == '1' else _paired(diffs)} | {rows[0]['filtered_layers']} | "
                    f"{rows[0]['earliest_conv']} | {mb:.2f} | {act:.2f} |"
                )  # fmt: skip
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def run_study(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    checkpoint = _pretrained(args)
    parts = set(args.parts.split(","))
    finetune = Table(args.out / "finetune.csv", FINETUNE_COLUMNS, ("k", "r", "seed"))
    timing = Table(args.out / "timing.csv", TIMING_COLUMNS, ("variant", "k", "r", "fallback"))
    probe = Table(args.out / "probe.csv", PROBE_COLUMNS, ("r", "name"))
    velocity = Table(args.out / "velocity.csv", VELOCITY_COLUMNS, ("budget", "r", "seed"))
    errors = Table(args.out / "gradients.csv", ERROR_COLUMNS, ("seed", "k", "r"))
    for seed in args.seeds:
        setup = Setup(args, seed, checkpoint)
        if "finetune" in parts:
            finetune_part(setup, finetune)
        if "timing" in parts and seed == args.seeds[0]:
            timing_part(setup, timing, probe, args.timing_steps)
        if "velocity" in parts:
            velocity_part(setup, velocity)
        if "gradients" in parts:
            gradients_part(setup, errors, args.gradient_batches)
    (args.out / "summary.md").write_text(report(args.out))
    print(f"[study] done: {args.out} (tables in summary.md)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sims.benchmarks.grad_filter_study",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("results/grad_filter_study"))
    p.add_argument("--parts", default="finetune,timing,velocity,gradients")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--blocks", type=lambda s: s.split(","), default=list(BLOCKS),
                   help="the finetune part's k values (comma-separated; 'all': the whole network)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=1000)
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--probe", type=int, default=10, help="velocity probe images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-limit", type=int, default=3000)
    p.add_argument("--timing-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gradient-batches", type=int, default=4)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 32 px, 1 seed, 1 epoch, 64 images, pretraining 1 epoch on 128")
    p.add_argument("--report", action="store_true", help="only print the tables of --out's CSVs")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.out), end="")
        return 0
    if args.quick:
        args.image_size, args.seeds, args.epochs = 32, [0], 1
        args.train_limit, args.test_limit, args.pretrain_limit, args.pretrain_epochs = 64, 64, 128, 1
        args.timing_steps = 1
    run_study(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
