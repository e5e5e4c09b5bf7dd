"""The scale benchmark's configs: resized runs of the shipped scale configs (speed itself is
measured by ``python -m sims.benchmarks.scale``, not asserted in tests)."""

from __future__ import annotations

from pathlib import Path

from sims.benchmarks.scale import MODELS, scale_config


def test_scale_config_resizes_and_sets_cpus_per_client(tmp_path: Path) -> None:
    name, samples, per_round, _ = MODELS["mobilenet"]
    kept = scale_config(10_000, 3, str(tmp_path), model="mobilenet")
    assert (kept.run.num_clients, kept.run.clients_per_round, kept.run.rounds) == (10_000, per_round, 3)
    assert kept.data.train_limit == samples * 10_000  # the same images per client at every scale
    assert kept.simulation.cpus_per_client == 1.0  # the config's own
    halved = scale_config(100, 3, str(tmp_path), model="mobilenet", cpus_per_client=0.5)
    assert halved.simulation.cpus_per_client == 0.5 and halved.run.num_clients == 100
