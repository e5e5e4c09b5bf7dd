"""sims.paper: run expansion, budgets, per-run summaries and tables by hand, the report, one tiny sweep."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

from fedneq.config import Config
from fedneq.models import get_model
from sims import single_device
from sims.paper.cli import main
from sims.paper.plan import (
    FULL,
    QUICK,
    Plan,
    Run,
    base_config,
    expand,
    override,
    run_config,
    tier_budgets,
)
from sims.paper.report import (
    READING_END,
    READING_START,
    device_table,
    invocation_lines,
    setting_bullets,
    write_report,
)
from sims.paper.summary import (
    CURVE_COLUMNS,
    SUMMARY_COLUMNS,
    aggregate,
    device_rows,
    mean_std,
    summarize_run,
    worst_drop,
)
from sims.paper.sweep import run_sweep
from sims.server.results import CLIENT_COLUMNS, ROUND_COLUMNS, atomic_write_text, csv_text, read_csv


def test_expand_full_plan_method_by_method() -> None:
    runs = expand(FULL)
    assert len(runs) == 108 and len({r.key for r in runs}) == 108
    assert [r.seed for r in runs[:36]] == [0] * 36  # seed by seed
    seed0 = [(r.setting, r.tier, r.method) for r in runs[:36]]
    budgeted = ["velocity", "velocity-per-param", "random", "static"]
    for setting, last in (("single", "full"), ("homogeneous", "fedavg")):
        mine = [(t, m) for s, t, m in seed0 if s == setting]
        tiers = [(t, m) for t in ("SU-1", "SU-3", "SU-5") for m in budgeted]
        assert mine == [*tiers, ("full", last)]
    hetero = [m for s, t, m in seed0 if s == "heterogeneous"]
    assert hetero == [
        "velocity", "velocity-per-param", "random", "static", "smallest", "fedavg-phones",
        "heterofl", "fjord", "fedrolex", "fiarse",
    ]  # fmt: skip
    quick = expand(QUICK)
    assert [r.key for r in quick[:5]] == [
        "single/SU-1/velocity/seed0", "single/SU-1/velocity-per-param/seed0",
        "single/SU-1/random/seed0", "single/SU-1/static/seed0", "single/full/full/seed0",
    ]  # fmt: skip
    assert len(quick) == 20


def test_plan_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="seeds should be a non-empty tuple"):
        Plan(seeds=())
    with pytest.raises(ValueError, match=r"tiers should be a non-empty subset of \('SU-1'"):
        Plan(tiers=("SU-2",))
    with pytest.raises(ValueError, match="strategy should be one of"):
        Plan(strategy="no-such-rule")
    with pytest.raises(ValueError, match="settings should be"):
        Plan(settings=("cloud",))
    with pytest.raises(ValueError, match="budget_basis should be one of"):
        Plan(budget_basis="conv")
    with pytest.raises(ValueError, match="epochs should be > 0, got 0"):
        Plan(epochs=0)
    with pytest.raises(ValueError, match="test_limit should be >= 0, got -1"):
        Plan(test_limit=-1)
    assert Plan(pretrain_train_limit=0).pretrain_train_limit == 0  # 0: all the samples
    with pytest.raises(ValueError, match="scheme must be one of"):
        Plan(hetero_scheme="SU-9")


def test_override_applies_typed_assignments_and_rejects_bad_ones() -> None:
    plan = override(FULL, ["alpha=0.5", "seeds=0, 1", "settings=homogeneous", "rounds=20"])
    assert plan == dataclasses.replace(
        FULL, alpha=0.5, seeds=(0, 1), settings=("homogeneous",), rounds=20
    )
    assert override(QUICK, []) == QUICK
    with pytest.raises(ValueError, match="KEY=VALUE with KEY one of"):
        override(FULL, ["alpah=0.5"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        override(FULL, ["name=mine"])  # the name tells full and quick plans apart
    with pytest.raises(ValueError, match="rounds: '2.5' is not of type int"):
        override(FULL, ["rounds=2.5"])
    with pytest.raises(ValueError, match="settings should be a non-empty subset"):
        override(FULL, ["settings=everything"])  # the plan's own validation still runs


def test_cli_needs_out_for_a_changed_plan(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--set", "alpha=0.5"])
    assert exit_info.value.code == 2
    assert "--set needs --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--set", "alpha=half", "--out", "unused"])
    assert "alpha: 'half' is not of type float" in capsys.readouterr().err


def test_tier_budgets_at_width_1_are_the_papers() -> None:
    model = get_model("mobilenet_v2", num_classes=5, in_channels=1, width_mult=1.0)
    tiers = tier_budgets(FULL, model)
    # DESIGN.md's table: 192 312 / 464 640 / 675 840 of 2 189 760 conv weights (3-channel stem;
    # a 1-channel stem has 32 * 2 * 9 = 576 fewer weights)
    assert {n: t.budget for n, t in tiers.items()} == {
        "SU-1": 192312,
        "SU-3": 464640,
        "SU-5": 675840,
    }
    assert all(t.conv_params == 2189760 - 576 for t in tiers.values())
    assert [round(100 * t.fraction, 1) for t in tiers.values()] == [8.8, 21.2, 30.9]
    paper = tier_budgets(dataclasses.replace(FULL, budget_basis="paper"), model)
    assert {n: t.budget for n, t in paper.items()} == {
        "SU-1": 192648,
        "SU-3": 464107,
        "SU-5": 674268,
    }
    assert paper["SU-1"].scheme_conv_params == 192312


def test_run_config_for_every_kind_of_run(tmp_path: Path) -> None:
    base = base_config(FULL, tmp_path)
    tiers = tier_budgets(
        FULL, get_model("mobilenet_v2", num_classes=5, in_channels=1, width_mult=0.5)
    )

    def cfg(setting: str, tier: str, method: str):
        return run_config(FULL, Run(setting, tier, method, 1), base, tiers)

    c = cfg("single", "SU-3", "velocity-per-param")
    assert (c.selection.selector, c.fleet.budget, c.data.train_limit) == (
        "velocity-per-param",
        tiers["SU-3"].budget,
        2010,
    )
    assert c.run.seed == 1 and c.run.name == "single-SU-3-velocity-per-param-seed1"
    assert (c.train.lr, base.train.lr) == (FULL.single_lr, FULL.fed_lr)
    c = cfg("homogeneous", "SU-1", "random")
    assert (c.fleet.preset, c.fleet.budget, c.data.train_limit, c.strategy.name) == (
        "homogeneous",
        tiers["SU-1"].budget,
        5000,
        FULL.strategy,
    )
    c = cfg("homogeneous", "SU-5", "static")
    assert (c.selection.selector, c.selection.scheme, c.fleet.budget) == ("static", "SU-5", 1.0)
    c = cfg("homogeneous", "full", "fedavg")
    assert (c.strategy.name, c.fleet.budget) == ("fedavg", 1.0)
    c = cfg("heterogeneous", "mixed", "static")
    assert (c.fleet.preset, c.selection.scheme) == ("default", "SU-5")
    c = cfg("heterogeneous", "mixed", "smallest")
    assert (c.fleet.preset, c.fleet.budget, c.selection.selector) == (
        "homogeneous",
        0.01,
        "velocity",
    )
    c = cfg("heterogeneous", "mixed", "fedavg-phones")
    assert c.run.participants == ("phone",) and c.strategy.name == "fedavg"
    assert c.run.clients_per_round == 5  # 10 % of 50 clients are phones
    assert {c.device(p).name for p in c.eligible_partitions()} == {"phone"}
    other = dataclasses.replace(FULL, strategy="sparse-fedavg")
    for method, expected in (("random", "sparse-fedavg"), ("fedavg", "fedavg")):
        c = run_config(other, Run("homogeneous", "SU-1", method, 0), base_config(other, tmp_path), tiers)
        assert c.strategy.name == expected
    # the stabilisers reach every federated run, not the single device
    plain = dataclasses.replace(FULL, prox_mu=0.0, clip_update_ratio=0.0)  # 0 turns each off
    c = run_config(plain, Run("homogeneous", "full", "fedavg", 0), base_config(plain, tmp_path), tiers)
    assert (c.train.prox_mu, c.strategy.options) == (0.0, {})
    stable = FULL  # the shipped plan: FedProx 1 for dense runs, clipping at 2x for all
    for setting, tier, method in (("homogeneous", "SU-1", "random"), ("homogeneous", "full", "fedavg"),
                                  ("heterogeneous", "mixed", "fedavg-phones")):  # fmt: skip
        c = run_config(stable, Run(setting, tier, method, 0), base_config(stable, tmp_path), tiers)
        dense = method.startswith("fedavg")  # the pull slows a budgeted run: dense runs only
        assert (c.train.prox_mu, c.strategy.options) == (
            1.0 if dense else 0.0, {"clip_update_ratio": 2.0}
        ), method
    c = run_config(stable, Run("single", "SU-1", "random", 0), base_config(stable, tmp_path), tiers)
    assert (c.train.prox_mu, c.strategy.options) == (0.0, {})
    assert "FedProx pull μ = 1" in setting_bullets(dataclasses.asdict(stable))[1]
    assert "Static: scheme SU-5 truncated" in setting_bullets(dataclasses.asdict(stable))[2]
    for method in ("heterofl", "fjord", "fedrolex", "fiarse"):  # sub-models: the strategy drives the client
        c = cfg("heterogeneous", "mixed", method)
        assert (c.fleet.preset, c.strategy.name) == ("default", method)
        assert c.strategy.options == {}  # not clipped: a width reply's change grows with its width
    c = cfg("heterogeneous", "mixed", "velocity-per-param")
    assert (c.fleet.preset, c.selection.selector) == ("default", "velocity-per-param")
    with pytest.raises(ValueError, match="heterogeneous method should be one of"):
        cfg("heterogeneous", "mixed", "full")
    with pytest.raises(ValueError, match="method 'smallest' is not part of setting 'single'"):
        cfg("single", "SU-1", "smallest")


def _single_rows() -> list[dict]:
    accs, flops, mem = [0.2, 0.6, 0.8, 0.78], ["", 0.5, 0.3, 0.4], ["", 3e6, 5e6, 4e6]
    return [
        {"selector": "velocity", "epoch": e, "accuracy": a, "trainable_fraction": 0.1 if e else "",
         "flops_saved": f, "memory_estimate_bytes": m}
        for e, (a, f, m) in enumerate(zip(accs, flops, mem, strict=True))
    ]  # fmt: skip


def test_summarize_single_device_run_by_hand(tmp_path: Path) -> None:
    atomic_write_text(
        tmp_path / "single_device.csv", csv_text(single_device.COLUMNS, _single_rows())
    )
    atomic_write_text(tmp_path / "harness.json", json.dumps({"seconds": 12.5}))
    s, curve = summarize_run(Run("single", "SU-1", "velocity", 2), tmp_path)
    assert (s["setting"], s["tier"], s["method"], s["seed"]) == ("single", "SU-1", "velocity", 2)
    assert s["final_accuracy"] == 0.78 and s["best_accuracy"] == 0.8
    assert s["steps_to_95"] == 2  # 0.76 = 95 % of 0.8 first reached at epoch 2 (epoch 0 is not one)
    assert s["flops_saved"] == pytest.approx(0.4) and s["trainable_fraction"] == pytest.approx(0.1)
    assert s["peak_memory_mb"] == 5.0 and s["seconds"] == 12.5 and s["failed_clients"] == 0
    assert math.isnan(s["upload_mb"]) and math.isnan(s["measured_memory_mb"])  # not in the file
    assert [(c["step"], c["accuracy"]) for c in curve] == [(0, 0.2), (1, 0.6), (2, 0.8), (3, 0.78)]


def test_summarize_federated_run_by_hand(tmp_path: Path) -> None:
    rounds = [
        {"round": 1, "accuracy": 0.5, "failed": 1, "rejected": 0, "cum_bytes_up": 2_000_000,
         "mean_trainable_fraction": 0.2, "mean_flops_saved": 0.6},
        {"round": 2, "accuracy": 0.9, "failed": 0, "rejected": 0, "cum_bytes_up": 5_000_000,
         "mean_trainable_fraction": 0.4, "mean_flops_saved": 0.2},
    ]  # fmt: skip
    clients = [
        {"round": 1, "partition_id": 0, "status": "ok", "memory_estimate_bytes": 7_000_000,
         "memory_measured_bytes": 6_900_000},
        {"round": 1, "partition_id": 3, "status": "failed", "memory_estimate_bytes": ""},
        {"round": 2, "partition_id": 1, "status": "ok", "memory_estimate_bytes": 9_500_000,
         "memory_measured_bytes": 9_000_000},
    ]
    atomic_write_text(tmp_path / "rounds.csv", csv_text(ROUND_COLUMNS, rounds))
    atomic_write_text(tmp_path / "clients.csv", csv_text(CLIENT_COLUMNS, clients))
    s, curve = summarize_run(Run("homogeneous", "SU-3", "random", 0), tmp_path)
    assert (s["final_accuracy"], s["best_accuracy"], s["steps_to_95"]) == (0.9, 0.9, 2)
    assert s["upload_mb"] == 5.0 and s["peak_memory_mb"] == 9.5 and s["failed_clients"] == 1
    assert s["measured_memory_mb"] == 9.0
    assert s["flops_saved"] == pytest.approx(0.4) and s["trainable_fraction"] == pytest.approx(0.3)
    assert math.isnan(s["seconds"])  # no harness.json
    assert [(c["step"], c["cum_bytes_up"]) for c in curve] == [(1, 2e6), (2, 5e6)]


def test_device_rows_and_table_per_class_by_hand(tmp_path: Path) -> None:
    """Per device class: means over accepted replies per seed, then over seeds; memory the largest."""
    def client(device, status, params, measured, bound):
        return {"round": 1, "partition_id": 0, "device": device, "status": status,
                "trainable_params": params, "train_flops": 2e9, "upload_bytes": 4000,
                "memory_estimate_bytes": measured + 1e6, "memory_measured_bytes": measured,
                "memory_bound": bound}  # fmt: skip

    devices = []
    for seed, extra in ((0, 0), (1, 200)):
        clients = [client("mcu", "ok", 100 + extra, 2e6, 1), client("mcu", "ok", 300 + extra, 3e6, 0),
                   client("mcu", "rejected", 10**6, 9e9, 1), client("phone", "ok", 5000, 30e6, 0)]  # fmt: skip
        run_dir = tmp_path / str(seed)
        run_dir.mkdir()
        atomic_write_text(run_dir / "clients.csv", csv_text(CLIENT_COLUMNS, clients))
        # a mask method's device runs the global model: its own accuracy is the final round's
        atomic_write_text(run_dir / "rounds.csv", csv_text(("round", "accuracy"),
                                                           [{"round": 1, "accuracy": 0.6 + seed / 10}]))  # fmt: skip
        devices += device_rows(Run("heterogeneous", "mixed", "velocity", seed), run_dir)
    mcu = [d for d in devices if d["device"] == "mcu"]
    assert [(d["seed"], d["replies"], d["trained_params"], d["measured_memory_kb"], d["memory_bound"])
            for d in mcu] == [(0, 2, 200, 3000, 0.5), (1, 2, 400, 3000, 0.5)]  # fmt: skip
    text = device_table(devices, "heterogeneous", {"plan": dataclasses.asdict(FULL)})
    # mcu before phone (the fleet's order); width — (a mask client has none)
    assert "| velocity | mcu | — | 300 | 2.00 | 4 | 4.0 | 3.0 | 50 | 65.0 | 2 |" in text
    assert text.index("| mcu |") < text.index("| phone |")
    assert device_table(devices, "homogeneous", {"plan": {}}) == ""


def _summary(method: str, seed: int, acc: float, **extra) -> dict:
    row = {"setting": "homogeneous", "tier": "SU-1", "method": method, "seed": seed,
           "final_accuracy": acc, "best_accuracy": acc, "worst_drop": 0.0, "steps_to_95": 3, "time_to_95_s": 90.0, "upload_mb": 2.0,
           "flops_saved": 0.25, "peak_memory_mb": 4.0, "measured_memory_mb": 3.5, "trainable_fraction": 0.05,
           "failed_clients": 0, "seconds": 60.0}  # fmt: skip
    return row | extra


def test_aggregate_mean_and_sample_std_over_seeds() -> None:
    rows = [
        _summary("velocity", s, a, steps_to_95=k)
        for s, a, k in ((0, 0.80, 2), (1, 0.82, 3), (2, 0.84, 7))
    ]
    rows.append(_summary("random", 0, 0.7))
    table = aggregate(rows)
    assert [(r["method"], r["seeds"]) for r in table] == [("velocity", 3), ("random", 1)]
    v = table[0]
    assert v["final_accuracy_mean"] == pytest.approx(0.82)
    assert v["final_accuracy_std"] == pytest.approx(0.02)  # sqrt((0.02² + 0 + 0.02²) / 2)
    assert v["steps_to_95_mean"] == pytest.approx(4.0) and v["steps_to_95_std"] == pytest.approx(
        math.sqrt(7)
    )
    assert math.isnan(table[1]["final_accuracy_std"])  # one seed: no spread
    assert mean_std(v["final_accuracy_mean"], v["final_accuracy_std"], scale=100) == "82.0 ± 2.0"
    assert mean_std(0.7, math.nan, scale=100) == "70.0"
    assert mean_std(math.nan, math.nan) == "—"
    assert mean_std(4.0, 2.6457, digits=2) == "4.00 ± 2.65"


def _sweep_meta() -> dict:
    return {
        "plan": json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(FULL, settings=("homogeneous",))))),
        "tiers": {"SU-1": {"name": "SU-1", "scheme_conv_params": 48348, "conv_params": 668848,
                           "budget": 48348, "fraction": 48348 / 668848}},
        "checkpoint": {"file": "x.safetensors", "upstream_test_accuracy": 0.9, "train_samples": 6000},
        "hardware": {"cpu": "Test CPU", "cores": 2, "memory_gib": 24.0, "python": "3.11",
                     "torch": "2", "flwr": "1.41"},
        "git": {"commit": "abc123", "dirty": True},
        "invocations": [{"started": "t", "seconds": 540.0, "runs": 4, "failed": [],
                         "command": "python -m sims.paper", "note": "stopped by hand"},
                        {"started": "t2", "seconds": 60.0, "runs": 0, "failed": [],
                         "command": "python -m sims.paper"}],
    }  # fmt: skip


def test_report_tables_plots_and_kept_reading(tmp_path: Path) -> None:
    res = tmp_path / "docs" / "results"
    res.mkdir(parents=True)
    summaries = [_summary("velocity", s, a) for s, a in ((0, 0.80), (1, 0.82), (2, 0.84))]
    summaries += [_summary("fedavg", 0, 0.9, tier="full", upload_mb=30.0)]
    curves = [
        {"setting": "homogeneous", "tier": s["tier"], "method": s["method"], "seed": s["seed"],
         "step": k, "accuracy": s["final_accuracy"] * k / 2, "cum_bytes_up": 1e6 * k}
        for s in summaries for k in (1, 2)
    ]  # fmt: skip
    atomic_write_text(res / "runs.csv", csv_text(SUMMARY_COLUMNS, summaries))
    atomic_write_text(res / "curves.csv", csv_text(CURVE_COLUMNS, curves))
    atomic_write_text(res / "sweep.json", json.dumps(_sweep_meta()))
    page = write_report(None, tmp_path / "docs")
    text = page.read_text()
    assert (
        "| SU-1 (7.2 %) | velocity | 82.0 ± 2.0 | 82.0 ± 2.0 | 0.0 ± 0.0 | 3.0 ± 0.0 | 1.5 ± 0.0 | 2.0 ± 0.0 | 25.0 ± 0.0 | 4.0 ± 0.0 | 3.5 ± 0.0 | 5.0 ± 0.0 | 3 |"
        in text
    )
    assert (
        "| 100 % | FedAvg (dense, full budget) | 90.0 | 90.0 | 0.0 | 3.0 | 1.5 | 30.0 | 25.0 | 4.0 | 3.5 | 5.0 | 1 |"
        in text
    )
    assert "| SU-1 | 48,348 | 7.2 % | 48,348 | 8.8 % |" in text
    assert "* Changed from the full plan: `settings = homogeneous`" in text
    assert "Mean wall time per run: 60 s." in text
    assert "Test CPU, 2 cores" in text and "`abc123` (with uncommitted changes)" in text
    assert "`python -m sims.paper`" in text and "10.0 min over 2 invocation(s)" in text
    assert "* Invocation of t: stopped by hand" in text and "Invocation of t2" not in text
    meta = _sweep_meta()
    meta["invocations"][1] |= {"commit": "def456", "runs": 9}  # a later invocation, another commit
    assert invocation_lines(meta) == [
        "* Invocation of t: stopped by hand", "* Invocation of t2: 9 runs at commit `def456`"
    ]
    for png in ("homogeneous_accuracy.png", "homogeneous_accuracy_vs_upload.png"):
        assert f"](results/{png})" in text and (res / png).stat().st_size > 0
    assert "## 1. Single device" not in text  # no runs of that setting
    assert "* **Federated**: 5000 images" in text and "**Single device**" not in text
    assert "**Heterogeneous fleet**" not in text  # setup only for the settings the plan ran
    mine = "\nVelocity wins at 8.8 %, by hand.\n"
    before, rest = text.split(READING_START)
    page.write_text(before + READING_START + mine + READING_END + rest.split(READING_END)[1])
    assert write_report(None, tmp_path / "docs").read_text().count(mine) == 1


@pytest.mark.slow
def test_tiny_sweep_end_to_end_resumes_and_reproduces(tmp_path: Path, capsys) -> None:
    plan = Plan(
        name="tiny", seeds=(0,), tiers=("SU-1",), settings=("single", "homogeneous"), epochs=1,
        rounds=1, dataset="digits", image_size=32, width_mult=0.25, single_train_limit=74,
        fed_train_limit=200, test_limit=100, num_clients=4, clients_per_round=2,
        min_partition_size=20, pretrain_epochs=1, pretrain_train_limit=200, pretrain_test_limit=100,
    )  # fmt: skip
    runs = [Run("single", "SU-1", "velocity", 0), Run("single", "SU-1", "static", 0),
            Run("homogeneous", "SU-1", "velocity", 0)]  # fmt: skip
    out = tmp_path / "out"
    assert run_sweep(plan, out, runs=runs, jobs=2, command="test") == []
    assert not (out / runs[2].key / "checkpoint").exists()  # pruned once complete
    capsys.readouterr()
    assert run_sweep(plan, out, runs=runs, command="test again") == []
    assert "3 of 3 runs complete" in capsys.readouterr().out
    meta = json.loads((out / "sweep.json").read_text())
    assert [i["command"] for i in meta["invocations"]] == ["test", "test again"]
    assert meta["tiers"]["SU-1"]["budget"] == meta["tiers"]["SU-1"]["scheme_conv_params"] > 0
    # same seed, same numbers: run one run again from scratch
    first = read_csv(out / runs[0].key / "single_device.csv")
    shutil.rmtree(out / runs[0].key)
    run_sweep(plan, out, runs=runs[:1], jobs=1)
    second = read_csv(out / runs[0].key / "single_device.csv")
    assert [r["accuracy"] for r in first] == [r["accuracy"] for r in second]
    page = write_report(out, tmp_path / "docs").read_text()
    assert "| SU-1 (5.4 %) | velocity |" in page and "| SU-1 (5.4 %) | static SU-1 |" in page
    assert "## 2. Federated, homogeneous fleet" in page and "## 3." not in page
    assert len(read_csv(tmp_path / "docs" / "results" / "runs.csv")) == 3


def test_a_sweep_stored_before_a_plan_field_existed_still_continues(tmp_path: Path) -> None:
    from sims.paper.plan import plan_dict
    from sims.paper.sweep import sweep_meta

    ckpt = tmp_path / "up.safetensors"
    ckpt.with_suffix(".json").write_text(json.dumps({"test_accuracy": 0.9, "train_samples": 10}))
    stored = plan_dict(FULL)
    del stored["strategy"]  # a sweep.json written before Plan.strategy existed
    (tmp_path / "sweep.json").write_text(json.dumps({"plan": stored, "invocations": [{"x": 1}]}))
    meta = sweep_meta(FULL, tmp_path, {}, ckpt, Config())  # the default is what that sweep ran
    assert meta["invocations"] == [{"x": 1}] and meta["plan"]["strategy"] == FULL.strategy
    with pytest.raises(ValueError, match="holds a sweep of another plan"):
        sweep_meta(dataclasses.replace(FULL, strategy="neuron-avg"), tmp_path, {}, ckpt, Config())


def test_methods_restricts_the_runs_of_a_plan() -> None:
    plan = override(FULL, ["methods=fedavg,velocity-per-param", "settings=homogeneous"])
    assert plan.methods == ("fedavg", "velocity-per-param")
    runs = expand(plan)
    assert {r.method for r in runs} == {"fedavg", "velocity-per-param"}
    assert len(runs) == len(plan.seeds) * (len(plan.tiers) + 1)  # one budgeted method per tier
    assert len(expand(FULL)) > len(expand(plan))  # () keeps every method
    with pytest.raises(ValueError, match="methods should be a subset of"):
        override(FULL, ["methods=velocty"])


def test_worst_drop_is_the_largest_fall_between_consecutive_steps() -> None:
    assert worst_drop([0.5, 0.7, 0.4, 0.6, 0.55]) == pytest.approx(0.3)
    assert worst_drop([0.5, 0.6, 0.7]) == 0.0 and worst_drop([0.5]) == 0.0
