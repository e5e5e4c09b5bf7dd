"""Faults: crashing clients, stragglers past the round timeout, a retried and a skipped round."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_sim import tiny_config

from fedneq.config import Config, load_config
from fedneq.federation.client import InjectedFault, client_round, draw_faults
from fedneq.task import build_model, derive_seed, load_task
from sims.run import simulate
from sims.server.config_files import config_path
from sims.server.exchange import sample_partitions
from sims.server.results import read_csv

SEED = 211  # its draws cover every case in 3 rounds (checked in the test)


def fault_config(tmp_path: Path) -> Config:
    """sims/configs/faults.toml (crash 0.3, stragglers 0.1) shrunk, with a 30 s round timeout.

    The timeout must exceed a normal round on a loaded 2-core machine (the first
    round imports and loads data in the Ray actors: ~12 s under load), so only
    the straggler misses it.
    """
    return tiny_config(
        tmp_path,
        load_config(config_path("faults")),
        run={"seed": SEED, "min_replies": 2, "round_timeout_s": 30.0},
        faults={"straggler_delay_s": 31.0},
    )


def predicted(config: Config, pid: int, rnd: int, attempt: int) -> str:
    """The seeded draw, recomputed: two uniforms from derive_seed(seed, pid, round, attempt, 7)."""
    crash, straggle = np.random.default_rng(
        derive_seed(config.run.seed, pid, rnd, attempt, 7)
    ).random(2)
    if crash < config.faults.crash_prob:
        return "crash"
    return "straggler" if straggle < config.faults.straggler_prob else "ok"


def expected_rounds(config: Config) -> list[tuple[int, dict[int, str], int]]:
    """Per round ``(last attempt, {partition: draw}, skipped)``: retried once below min_replies."""
    out = []
    for rnd in range(1, config.run.rounds + 1):
        for attempt in range(2):
            draws = {
                pid: predicted(config, pid, rnd, attempt) for pid in sample_partitions(config, rnd)
            }
            ok = sum(d == "ok" for d in draws.values())
            if ok >= config.run.min_replies:
                break
        out.append((attempt, draws, int(ok < config.run.min_replies)))
    return out


@pytest.mark.slow
def test_failed_clients_per_round_are_the_seeded_draws_and_the_run_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = fault_config(tmp_path)
    expected = expected_rounds(config)
    # the seed shows: a crash without retry, a straggler, a retry that recovers, a skipped round
    kinds = [set(draws.values()) for _, draws, _ in expected]
    assert expected[0][0] == 0 and "crash" in kinds[0]
    assert any("straggler" in predicted(config, p, 2, 0) for p in sample_partitions(config, 2))
    assert [(attempt, skipped) for attempt, _, skipped in expected] == [(0, 0), (1, 1), (1, 0)]

    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="fedneq"):
        rows = simulate(config, out)
    assert [int(r["round"]) for r in rows] == [1, 2, 3]  # the run completes
    clients = read_csv(out / "clients.csv")
    for row, (attempt, draws, skipped) in zip(rows, expected, strict=True):
        rnd = int(row["round"])
        failed = {p: d for p, d in draws.items() if d != "ok"}
        assert (int(row["failed"]), int(row["replied"]), int(row["skipped"])) == (
            len(failed),
            3 - len(failed),
            skipped,
        )
        got = {int(c["partition_id"]): c for c in clients if int(c["round"]) == rnd}
        assert sorted(got) == sorted(draws)
        for pid, draw in draws.items():
            assert got[pid]["status"] == ("ok" if draw == "ok" else "failed")
            if draw == "crash":
                assert (
                    got[pid]["reason"]
                    == f"injected crash: client {pid}, round {rnd}, attempt {attempt}"
                )
            elif draw == "straggler":
                assert got[pid]["reason"] == "no reply before the round timeout"
    # a skipped round leaves the global model as it was: the same evaluation as the round before
    assert (rows[1]["accuracy"], rows[1]["loss"]) == (rows[0]["accuracy"], rows[0]["loss"])
    messages = [r.getMessage() for r in caplog.records if r.name == "fedneq"]
    assert any("round 2, attempt 1 of 2" in m and "sending it again" in m for m in messages), (
        messages
    )
    assert any("round 2, attempt 2 of 2" in m and "skipping the round" in m for m in messages), (
        messages
    )
    assert any("round 3, attempt 1 of 2" in m and "sending it again" in m for m in messages), (
        messages
    )


# --- the client's side of fault injection --------------------------------------------------


def test_fault_draws_are_seeded_by_round_and_attempt(tmp_path: Path) -> None:
    config = fault_config(tmp_path)
    draws = {
        (p, r, a): draw_faults(config, p, r, a) for p in range(6) for r in (1, 2, 3) for a in (0, 1)
    }
    for (p, r, a), draw in draws.items():
        kind = "crash" if draw.crash else "straggler" if draw.delay_s else "ok"
        assert kind == predicted(config, p, r, a)
        assert draw == draw_faults(config, p, r, a)  # the same on every call
        assert draw.gives_up == bool(draw.delay_s)  # 7 s delay >= 6 s timeout
    # the retry draws anew: it does not fail the same way by construction
    assert any(draws[p, r, 0] != draws[p, r, 1] for p in range(6) for r in (1, 2, 3))
    none = config.replace(faults={"crash_prob": 0.0, "straggler_prob": 0.0})
    assert {
        draw_faults(none, p, 1, 0).crash or draw_faults(none, p, 1, 0).delay_s > 0 for p in range(6)
    } == {False}


@pytest.fixture(scope="module")
def global_state() -> dict[str, torch.Tensor]:
    config = tiny_config(Path("unused"))
    torch.manual_seed(0)
    model, _ = build_model(config, load_task(config))
    return model.state_dict()


def test_a_crashing_client_raises_after_training(global_state: dict[str, torch.Tensor]) -> None:
    config = tiny_config(Path("unused"), faults={"crash_prob": 1.0})
    with pytest.raises(InjectedFault, match="injected crash: client 2, round 4, attempt 1"):
        client_round(config, 2, 4, global_state, None, attempt=1)


def test_a_straggler_past_the_timeout_gives_up_a_shorter_one_replies(
    global_state: dict[str, torch.Tensor],
) -> None:
    slow = tiny_config(
        Path("unused"),
        run={"round_timeout_s": 0.2},
        faults={"straggler_prob": 1.0, "straggler_delay_s": 0.3},
    )
    start = time.monotonic()
    with pytest.raises(
        InjectedFault,
        match=r"injected straggler: client 0, round 1, attempt 0, 0.3 s >= round timeout 0.2 s",
    ):
        client_round(slow, 0, 1, global_state, None)
    assert time.monotonic() - start >= 0.3  # it slept its delay first
    late_but_in_time = slow.replace(run={"round_timeout_s": 0.5})
    start = time.monotonic()
    reply = client_round(late_but_in_time, 0, 1, global_state, None)
    assert time.monotonic() - start >= 0.3 and reply.metrics["num-examples"] > 0
