"""sims.fidelity: the from-scratch fidelity check's configuration and its table."""

from __future__ import annotations

import pytest

from sims.fidelity import CAPACITIES, VARIANTS, fidelity_config, markdown


def test_fidelity_config_is_fiarses_protocol() -> None:
    config = fidelity_config(1, 7)
    fleet = config.fleet.fleet()
    assert sorted(d.budget for d, _ in fleet.classes) == sorted(CAPACITIES)
    assert all(share == 0.25 for _, share in fleet.classes)
    assert all(d.batch_size == 20 and d.local_epochs == 1 and d.memory_limit_bytes is None
               for d, _ in fleet.classes)  # fmt: skip
    assert (config.run.num_clients, config.run.clients_per_round, config.run.rounds) == (100, 10, 7)
    assert (config.data.dataset, config.data.classes, config.data.alpha) == ("fashion-mnist", "all", 0.3)
    assert config.model.pretrain_epochs == 0 and not config.model.checkpoint  # from scratch
    assert VARIANTS["published"]["fedrolex"] == {"static_bn": True, "roll_step": -1}


def test_fidelity_table_orders_methods_and_cites_the_paper() -> None:
    def row(method, acc, seed):
        return {"variant": "published", "method": method, "seed": seed, "rounds": 5,
                "final_accuracy": acc, "best_accuracy": acc + 0.01,
                **{f"size_{c:g}": acc - 0.1 for c in CAPACITIES}}  # fmt: skip

    text = markdown([row("heterofl", 0.6, 0), row("heterofl", 0.7, 1), row("fiarse", 0.5, 0)])
    assert "| published | heterofl | 65.0 ± 7.1 | 66.0 ± 7.1 |" in text
    assert "66.05 / 60.24" in text and "73.75 / 73.12" in text
    assert "Ours, published, final global: heterofl (65.0) > fiarse (50.0)." in text
    with pytest.raises(ValueError, match="variants"):
        from sims.fidelity import run_fidelity

        run_fidelity(__import__("pathlib").Path("unused"), variants=["nope"])
