"""The long-horizon study: pairing of the client samples, the exclusive baselines as config,
the per-device-class accuracy, evaluate-every-k, the statistics, and a tiny study end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedneq.config import Config
from fedneq.data.arrays import ArrayDataset
from fedneq.federation.devices import default_fleet
from fedneq.task import client_split
from fedneq.training.evaluation import evaluate, evaluate_by_label
from sims.server.evaluation import class_columns, evaluation_round
from sims.server.exchange import sample_partitions
from sims.server.results import read_csv
from sims.server.run_status import run_failure
from sims.study.plan import STUDY, VARIANTS, Run, Variant, override, run_config
from sims.study.stats import paired_difference, t_interval, tail_mean, tail_slope

ROUNDS = range(1, 61)  # the draw depends on (seed, round) alone: 60 rounds make the point


def study_configs(seed: int, alpha: float = 0.3) -> dict[str, Config]:
    return {v: run_config(STUDY, Run(alpha, v, seed), Path("unused")) for v in VARIANTS}


@pytest.mark.parametrize("seed", [3])
def test_every_round_samples_the_same_clients_in_every_method_of_a_seed(seed: int) -> None:
    configs = study_configs(seed)
    mixed = {rnd: sample_partitions(configs["velocity-per-param"], rnd) for rnd in ROUNDS}
    assert all(len(s) == STUDY.clients_per_round for s in mixed.values())
    assert len({tuple(s) for s in mixed.values()}) > len(ROUNDS) // 2  # a new draw each round
    devices = configs["velocity-per-param"].fleet.fleet().assign(STUDY.num_clients, seed)
    weak = {p for p, d in enumerate(devices) if d.budget != 1.0}
    for name, config in configs.items():
        # every fleet places the same device class on every partition
        placed = config.fleet.fleet().assign(STUDY.num_clients, seed)
        assert [d.name for d in placed] == [d.name for d in devices]
        fleet = VARIANTS[name].fleet
        if fleet == "strong-only":  # its own pool: the full-budget devices, all of them
            assert all(sample_partitions(config, rnd) == sorted(set(range(100)) - weak) for rnd in ROUNDS)
        elif fleet == "drop-weak":  # the mixed draw, less the weak devices
            assert all(sample_partitions(config, rnd) == [p for p in mixed[rnd] if p not in weak]
                       for rnd in ROUNDS)  # fmt: skip
        else:
            assert all(sample_partitions(config, rnd) == mixed[rnd] for rnd in ROUNDS), name
    # another seed draws other clients
    other = study_configs(seed + 1)["velocity-per-param"]
    assert [sample_partitions(other, rnd) for rnd in ROUNDS] != list(mixed.values())


def test_every_method_of_a_seed_gives_each_client_the_same_data() -> None:
    tiny = override(STUDY, ["dataset=digits", "image_size=0", "num_clients=10", "clients_per_round=3"])
    fleets = {v.fleet: name for name, v in reversed(VARIANTS.items())}  # a variant per fleet
    configs = {v: run_config(tiny, Run(1.0, v, 2), Path("unused")) for v in fleets.values()}
    splits = {v: [client_split(c, p).train.tolist() for p in range(10)] for v, c in configs.items()}
    assert all(s == splits["velocity-per-param"] for s in splits.values())


def test_the_exclusive_baselines_are_the_fleets_depthfl_reports() -> None:
    configs = study_configs(0)
    mcu = min((p for p, _ in default_fleet().classes), key=lambda p: float(p.budget))
    strong = configs["strong-only"]  # (a) only the full-budget devices, all 10 of them a round
    assert strong.run.participants == ("phone",) and strong.run.clients_per_round == 10
    assert (strong.selection.selector, strong.strategy.name) == ("full", "fedavg")
    few = run_config(override(STUDY, ["num_clients=30"]), Run(0.3, "strong-only", 0), Path("unused"))
    assert few.run.clients_per_round == 3  # all the 3 phones of 30 clients
    drop = configs["drop-weak"]  # (b) the mixed samples, weak ones left out
    assert set(drop.run.excluded) == {"mcu", "pi-zero", "pi-4"} and drop.fleet.preset == "default"
    for name in ("smallest", "dense"):  # (c), (d): each class keeps its batch size and speed
        classes = configs[name].fleet.fleet().classes
        assert [(p.name, p.batch_size, p.speed, s) for p, s in classes] == [
            (p.name, p.batch_size, p.speed, s) for p, s in default_fleet().classes
        ]
    small = configs["smallest"].fleet.fleet().classes  # (c) every device at the mcu's limits
    assert all((p.budget, p.memory_fraction, p.memory_limit_bytes) ==
               (mcu.budget, mcu.memory_fraction, mcu.memory_limit_bytes) for p, _ in small)  # fmt: skip
    assert mcu.memory_fraction is not None  # the limit is really carried over
    dense = configs["dense"]  # (d) everyone dense, no memory limit
    assert all((p.budget, p.memory_fraction, p.memory_limit_bytes) == (1.0, None, None)
               for p, _ in dense.fleet.fleet().classes)  # fmt: skip
    assert (dense.selection.selector, dense.strategy.name) == ("full", "fedavg")
    mixed = configs["velocity-per-param"].fleet.fleet().classes  # and the mixed fleet is intact
    assert [p for p, _ in mixed] == [p for p, _ in default_fleet().classes]


def test_a_variant_is_one_line_and_its_assignments_apply() -> None:
    v = Variant("vpp, two local epochs", set=("fleet.local_epochs=2",), options={"max_update_ratio": None})
    VARIANTS["one-line"] = v
    try:
        c = run_config(STUDY, Run(1.0, "one-line", 0), Path("unused"))
    finally:
        del VARIANTS["one-line"]
    assert c.fleet.local_epochs == 2 and c.strategy.options == {"max_update_ratio": None}
    assert c.selection.selector == "velocity-per-param" and c.strategy.name == "sparse-fedavg"
    with pytest.raises(ValueError, match="fleet should be one of"):
        Variant("x", fleet="weak-only")
    with pytest.raises(ValueError, match="variants should be"):
        override(STUDY, ["variants=velocity-per-param,velocty"])


def test_excluded_classes_are_validated_and_an_empty_round_is_no_failure() -> None:
    with pytest.raises(ValueError, match="excluded .* leaves no device class"):
        Config.from_dict({"run": {"excluded": ["mcu", "pi-zero", "pi-4", "phone"]}})
    with pytest.raises(ValueError, match=r"excluded \['tv'\] are not fleet classes"):
        Config.from_dict({"run": {"excluded": ["tv"]}})
    row = {"round": "1", "committed": "1", "skipped": "0", "replied": "3", "sampled": "3"}
    nobody = row | {"round": "2", "committed": "0", "skipped": "1", "replied": "0", "sampled": "0"}
    assert run_failure([row, nobody]) is None
    assert "round(s) [2]" in run_failure([row, nobody | {"sampled": "2"}])
    assert run_failure([nobody, nobody]) is None  # never sent a round: nothing to commit
    assert "no round" in run_failure([nobody, nobody | {"sampled": "2", "replied": "2"}])


def test_evaluation_rounds_every_k_and_the_last() -> None:
    config = Config.from_dict({"run": {"rounds": 7, "eval_every": 3}})
    assert [r for r in range(1, 8) if evaluation_round(config, r)] == [3, 6, 7]
    assert all(evaluation_round(Config(), r) for r in range(1, 11))  # default: every round
    with pytest.raises(ValueError, match="eval_every"):
        Config.from_dict({"run": {"eval_every": 0}})


def test_the_accuracy_on_a_label_mix_is_the_reweighted_per_label_accuracy() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(40, 1, 2, 2)
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 10)
    data = ArrayDataset(x, y)
    result = evaluate_by_label(model, data, batch_size=7)
    pred = model(x).argmax(1)
    per_label = [float((pred[y == k] == k).float().mean()) for k in range(3)]
    assert result.total.tolist() == [10, 20, 10]
    assert result.correct.tolist() == [int((pred[y == k] == k).sum()) for k in range(3)]
    assert (result.loss, result.accuracy) == evaluate(model, data, batch_size=7)
    assert result.reweighted(np.array([1, 0, 3])) == pytest.approx((per_label[0] + 3 * per_label[2]) / 4)
    # the test set's own mix gives the plain accuracy
    assert result.reweighted(result.total) == pytest.approx(result.accuracy)
    with pytest.raises(ValueError, match="one per label"):
        result.reweighted(np.array([1.0, 2.0]))


def test_class_columns_only_when_asked() -> None:
    assert class_columns(Config()) == ()
    on = Config.from_dict({"run": {"class_accuracy": True}})
    assert class_columns(on) == ("accuracy_mcu", "accuracy_pi-zero", "accuracy_pi-4", "accuracy_phone")


def test_tail_statistics_and_t_intervals_by_hand() -> None:
    rounds = [10, 20, 30, 40, 50, 60]
    acc = [0.1, 0.2, 0.5, 0.6, 0.7, 0.8]  # the last 30 rounds: 40, 50, 60 (> 60 - 30)
    assert tail_mean(rounds, acc, 30) == pytest.approx(0.7)
    assert tail_slope(rounds, acc, 30) == pytest.approx(0.01)
    assert math.isnan(tail_slope(rounds, acc, 5))  # one point
    d = t_interval([1.0, 2.0, 6.0])  # mean 3, s = sqrt(7), t(0.975, 2) = 4.302653
    half = 4.302653 * math.sqrt(7) / math.sqrt(3)
    assert (d.n, d.mean) == (3, 3.0) and d.low == pytest.approx(3 - half) and d.high == pytest.approx(3 + half)
    pair = paired_difference({0: 0.9, 1: 0.8, 2: 0.7, 3: 0.5}, {0: 0.7, 1: 0.7, 2: 0.6})  # seeds 0-2
    assert pair.n == 3 and pair.mean == pytest.approx(0.4 / 3) and not pair.excludes_zero
    assert t_interval([0.1, 0.1, 0.1]).excludes_zero


TINY = [
    "dataset=digits", "image_size=0", "num_clients=10", "clients_per_round=3", "rounds=3",
    "eval_every=2", "tail=2", "seeds=0", "alphas=1.0", "pretrain_epochs=1",
    "variants=velocity-per-param,random,strong-only,drop-weak",
]  # fmt: skip


@pytest.mark.slow
def test_a_tiny_study_runs_resumes_and_reports(tmp_path: Path) -> None:
    from sims.study.cli import main

    out = tmp_path / "study"
    assert main(["--out", str(out), *[a for s in TINY for a in ("--set", s)]]) == 0
    study = override(STUDY, TINY)
    mixed = out / "alpha1/velocity-per-param/seed0"
    rows = read_csv(mixed / "rounds.csv")
    assert [r["accuracy"] != "" for r in rows] == [False, True, True]  # rounds 2 and 3 (the last)
    assert all(r["accuracy_phone"] != "" for r in rows[1:])
    # the same clients in every method of a seed; drop-weak trains only the phones among them
    clients = {v: read_csv(out / f"alpha1/{v}/seed0/clients.csv") for v in study.variants}
    drawn = [(r["round"], r["partition_id"]) for r in clients["velocity-per-param"]]
    assert [(r["round"], r["partition_id"]) for r in clients["random"]] == drawn
    phones = [(r["round"], r["partition_id"]) for r in clients["velocity-per-param"] if r["device"] == "phone"]
    assert [(r["round"], r["partition_id"]) for r in clients["drop-weak"]] == phones
    assert {r["device"] for r in clients["strong-only"]} == {"phone"}
    harness = json.loads((mixed / "harness.json").read_text())
    assert len(harness["commits"]) == 1 and len(harness["commits"][0]) == 40
    report = (out / "STUDY.md").read_text()
    assert "velocity-per-param − random" in report and "best mixed" in report
    assert len(read_csv(out / "runs.csv")) == 4 and read_csv(out / "paired.csv")
    # a second invocation runs nothing; a longer study resumes every run from its checkpoint
    before = (mixed / "rounds.csv").read_text()
    assert main(["--out", str(out)]) == 0
    assert (mixed / "rounds.csv").read_text() == before
    assert main(["--out", str(out), "--set", "rounds=4"]) == 0
    longer = read_csv(mixed / "rounds.csv")
    assert len(longer) == 4 and (mixed / "rounds.csv").read_text().startswith(before)
    assert json.loads((mixed / "harness.json").read_text())["invocations"][-1]["from_round"] == 4
    assert dataclasses.replace(study, rounds=4) == override(STUDY, [*TINY, "rounds=4"])


@pytest.mark.slow
def test_every_variant_builds_its_strategy_with_its_options() -> None:
    from sims.run import check_runnable

    tiny = override(STUDY, ["dataset=digits", "image_size=0", "num_clients=10", "clients_per_round=3"])
    for name in VARIANTS:
        check_runnable(run_config(tiny, Run(1.0, name, 0), Path("unused")))  # raises on a bad one
