"""The accuracy-memory frontier command, end to end on a tiny plan (digits, MobileNetV2 x0.25)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sims.frontier import FleetLevel, _fleet_config, memory_span, run_frontier
from sims.paper.plan import Plan, base_config
from sims.paper.sweep import pretrained_checkpoint
from sims.server.results import read_csv

TINY = Plan(
    name="tiny", seeds=(0,), tiers=("SU-1",), epochs=1, rounds=1, dataset="digits",
    image_size=32, width_mult=0.25, single_train_limit=74, fed_train_limit=200, test_limit=100,
    num_clients=4, clients_per_round=2, min_partition_size=20, pretrain_epochs=1,
    pretrain_train_limit=200, pretrain_test_limit=100,
)  # fmt: skip


@pytest.mark.slow
def test_frontier_runs_at_equal_memory_and_measures_it(tmp_path: Path) -> None:
    out = tmp_path / "frontier"
    methods = {"single": ["velocity-region", "random", "static:SU-1"],
               "fleet": ["velocity-per-byte", "heterofl", "fiarse"]}  # fmt: skip
    rows = run_frontier(
        out, plan=TINY, levels=[0.0, 0.5], methods=methods, fleet=FleetLevel(1, 4, 2),
    )  # fmt: skip
    assert len(rows) == 2 * 3 + 2 * 3
    base = base_config(TINY, out, pretrained_checkpoint(TINY, tmp_path / "_pretrained"))
    su1, full = memory_span(base)
    assert 0 < su1 < full
    for r in rows:
        limit = r["limit_bytes"]
        assert limit == su1 + int(r["level"] * (full - su1))
        assert r["estimated_peak_bytes"] <= limit  # both limits kept, by the cost model
        assert abs(r["measured_peak_bytes"] / r["estimated_peak_bytes"] - 1) <= 0.1
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["narrowest_accuracy"] <= 1
        if r["method"] != "heterofl":  # a mask or FIARSE device runs the global model whole
            assert r["local_accuracy"] == r["narrowest_accuracy"] == r["accuracy"]
    # SU-1 at SU-1's own memory is the whole scheme
    (static,) = [r for r in rows if r["method"] == "static:SU-1" and r["level"] == 0.0]
    assert static["estimated_peak_bytes"] == su1
    assert len(read_csv(out / "frontier.csv")) == len(rows)
    for setting in ("single", "fleet"):
        assert (out / f"frontier_{setting}.png").stat().st_size > 0
    # the fleet ran with the level's limit on every device
    clients = read_csv(out / "fleet" / "level0.5" / "seed0" / "dynamic" / "velocity-per-byte"
                       / "clients.csv")  # fmt: skip
    assert {int(c["memory_limit_bytes"]) for c in clients} == {su1 + int(0.5 * (full - su1))}
    # and so did the width sub-models: narrower where the limit binds
    width = read_csv(out / "fleet" / "level0" / "seed0" / "width" / "heterofl" / "clients.csv")
    assert {int(c["memory_limit_bytes"]) for c in width} == {su1}
    assert all(int(c["memory_estimate_bytes"]) <= su1 for c in width)
    # replies clipped as in sims.paper, the width sub-models' not
    def options(group: str, method: str) -> dict:
        saved = out / "fleet" / "level0" / "seed0" / group / method / "config.json"
        return json.loads(saved.read_text())["strategy"]["options"]

    assert options("dynamic", "velocity-per-byte") == {"clip_update_ratio": TINY.clip_update_ratio}
    assert TINY.clip_update_ratio > 0 and options("width", "heterofl") == {}
    assert options("width", "fiarse") == {}  # FIARSE runs with the width methods, unclipped
    # a width device is scored by its own sub-model too (sims.server.capacity)
    final = read_csv(out / "fleet" / "level0" / "seed0" / "width" / "heterofl" / "rounds.csv")[-1]
    (hetero,) = [r for r in rows if r["method"] == "heterofl" and r["level"] == 0.0]
    narrowest = min(float(c["width"]) for c in width)
    assert hetero["narrowest_accuracy"] == float(final[f"accuracy_w{narrowest:g}"])
    # a second call reuses every run
    again = run_frontier(out, plan=TINY, levels=[0.0, 0.5], methods=methods,
                         fleet=FleetLevel(1, 4, 2))  # fmt: skip
    assert again == rows


def test_fleet_config_gives_every_class_the_limit() -> None:
    base = base_config(TINY, Path("unused"))
    config = _fleet_config(base, FleetLevel(3, 10, 5), seed=1, limit=123_456)
    classes = config.fleet.classes
    assert [c["memory_limit_bytes"] for c in classes] == [123_456] * 4
    assert all("memory_fraction" not in c for c in classes)
    assert config.run.rounds == 3 and config.run.num_clients == 10 and config.run.seed == 1
    unlimited = _fleet_config(base, FleetLevel(), seed=0, limit=None)
    assert all("memory_limit_bytes" not in c for c in unlimited.fleet.classes)
    with pytest.raises(ValueError, match="levels"):
        run_frontier(Path("unused"), plan=dataclasses.replace(TINY), levels=[1.5])
