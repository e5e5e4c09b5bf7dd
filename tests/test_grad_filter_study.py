"""The gradient-filtering study: its block masks, resumable tables, and a smoke run."""

from __future__ import annotations

import csv

import pytest
import torch

from fedneq.costs import profile_model
from fedneq.models import get_model
from fedneq.neurons import enumerate_neurons
from sims.benchmarks import grad_filter_study as study


def test_block_masks_train_the_last_k_blocks_and_applicable_convs_follow_the_maps() -> None:
    model = get_model("mobilenet_v2", num_classes=5, in_channels=1, width_mult=0.5, seed=0)
    nmap = enumerate_neurons(model, always_trained=("classifier.1",))
    one = study._trained_convs(nmap, study._block_mask(nmap, "1"))
    assert one == ["features.18.0"]
    two = study._trained_convs(nmap, study._block_mask(nmap, "2"))
    assert two == ["features.17.conv.0.0", "features.17.conv.1.0", "features.17.conv.2", "features.18.0"]
    every = study._trained_convs(nmap, study._block_mask(nmap, "all"))
    assert len(every) == 52
    profile = profile_model(model, nmap, (1, 64, 64))
    # at 64x64 the last blocks run on 2x2 maps: r=2 fits them, r=4 does not
    assert study._applicable(model, profile, two, 2) == two
    assert study._applicable(model, profile, two, 4) == []
    assert "features.13.conv.1.0" in study._applicable(model, profile, every, 4)  # a 4x4 map


def test_table_resumes_from_its_csv(tmp_path) -> None:
    path = tmp_path / "t.csv"
    table = study.Table(path, ("k", "r", "value"), ("k", "r"))
    table.add({"k": "all", "r": 2, "value": 0.5})
    again = study.Table(path, ("k", "r", "value"), ("k", "r"))
    assert again.has(k="all", r=2) and not again.has(k="all", r=4)
    with path.open() as f:
        assert list(csv.DictReader(f)) == [{"k": "all", "r": "2", "value": "0.5"}]


@pytest.mark.slow
def test_quick_study_writes_every_table_and_resumes(tmp_path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "study"
    assert study.main(["--quick", "--out", str(out)]) == 0
    rows = {name: list(csv.DictReader((out / f"{name}.csv").open()))
            for name in ("finetune", "timing", "probe", "velocity")}  # fmt: skip
    assert {(r["k"], r["r"]) for r in rows["finetune"]} >= {("1", "1"), ("all", "2"), ("all", "4")}
    filtered = [r for r in rows["finetune"] if r["r"] != "1"]
    assert all(int(r["filtered_layers"]) > 0 for r in filtered)
    exact_all = next(r for r in rows["finetune"] if r["k"] == "all" and r["r"] == "1")
    r2_all = next(r for r in rows["finetune"] if r["k"] == "all" and r["r"] == "2")
    # filtering shrinks what the step keeps and the backward FLOPs, measured and estimated
    assert int(r2_all["bwd_flops"]) < int(exact_all["bwd_flops"])
    assert int(r2_all["saved_activation_estimate_bytes"]) < int(exact_all["saved_activation_estimate_bytes"])
    assert {r["fallback"] for r in rows["timing"]} == {"", "off", "probe"}
    assert {r["budget"] for r in rows["velocity"]} == {"SU-1", "SU-3"}
    sizes = {name: (out / f"{name}.csv").stat().st_size for name in rows}
    assert study.main(["--quick", "--out", str(out)]) == 0  # resumed: nothing runs again
    assert {name: (out / f"{name}.csv").stat().st_size for name in rows} == sizes
