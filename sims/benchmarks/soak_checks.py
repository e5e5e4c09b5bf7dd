"""What a chaos soak (:mod:`sims.benchmarks.soak`) must have left behind, checked.

:func:`check_soak` reads the soak's results folder, logs and what it saw of
the processes, and returns the report with its one-line verdict.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedneq.task import build_model, load_task
from fedneq.training.evaluation import evaluate
from sims.server.exchange import sample_partitions
from sims.server.results import read_csv

Soak = Any  # a sims.benchmarks.soak.Soak (not imported: that module imports this one)

__all__ = ["check_soak"]

STATUSES = ("ok", "failed", "rejected", "dropped")


def _rounds_checks(soak: Soak) -> tuple[list[tuple[str, bool, str]], list[dict[str, str]]]:
    path = soak.run_dir / "rounds.csv"
    rounds = read_csv(path) if path.exists() else []
    numbers = [int(r["round"]) for r in rounds]
    expected = list(range(1, soak.spec.rounds + 1))
    unresolved = [
        int(r["round"]) for r in rounds
        if r["committed"] != "1" and not (r["note"] or int(r["failed"]) or int(r["skipped"]))
    ]  # fmt: skip
    return [
        ("every round exactly once in rounds.csv", numbers == expected,
         f"rounds {numbers}" if numbers != expected else f"{len(numbers)} rounds"),
        ("every round committed or recorded failed", not unresolved and bool(rounds),
         f"neither: {unresolved}" if unresolved else
         f"{sum(r['committed'] == '1' for r in rounds)} committed, "
         f"{sum(r['committed'] != '1' for r in rounds)} recorded failed"),
    ], rounds  # fmt: skip


def _clients_checks(soak: Soak) -> tuple[list[tuple[str, bool, str]], int]:
    path = soak.run_dir / "clients.csv"
    clients = read_csv(path) if path.exists() else []
    pairs = [(int(c["round"]), int(c["partition_id"])) for c in clients]
    expected = {(r, p) for r in range(1, soak.spec.rounds + 1) for p in sample_partitions(soak.config, r)}
    duplicated = sorted(k for k, n in Counter(pairs).items() if n > 1)
    missing, extra = sorted(expected - set(pairs)), sorted(set(pairs) - expected)
    bad = [c for c in clients if c["status"] not in STATUSES or (c["status"] != "ok" and not c["reason"])]
    failed = sum(c["status"] != "ok" for c in clients)
    return [
        ("clients.csv: one row per sampled client per round", not (duplicated or missing or extra),
         f"duplicated {duplicated[:5]}, missing {missing[:5]}, not sampled {extra[:5]}"
         if duplicated or missing or extra else f"{len(clients)} rows, {failed} not ok"),
        ("clients.csv: every row ok or not ok with its reason", not bad, f"{bad[:2]}" if bad else ""),
    ], len(clients)  # fmt: skip


def _model_check(soak: Soak, rounds: list[dict[str, str]]) -> tuple[str, bool, str]:
    what = "final model = checkpoint of the last committed round"
    committed = [int(r["round"]) for r in rounds if r["committed"] == "1"]
    latest = soak.run_dir / "checkpoint" / "LATEST"
    if not committed or not latest.exists():
        return what, False, "no committed round or no checkpoint"
    final = load_file(soak.run_dir / "checkpoint" / latest.read_text().strip() / "global.safetensors")
    last = committed[-1]
    kept = soak.log.snapshots.get(last)
    if kept is None:
        return what, False, f"no copy of round {last}'s checkpoint was taken"
    snap = load_file(kept)
    same = set(final) == set(snap) and all(torch.equal(final[k], snap[k]) for k in snap)
    # the final model evaluates to the loss recorded for the last committed round
    model, _ = build_model(soak.config, task := load_task(soak.config))
    model.load_state_dict(final)
    loss, _ = evaluate(model, task.test)
    recorded = float(next(r for r in rounds if int(r["round"]) == last)["loss"])
    close = abs(loss - recorded) <= 1e-5 * max(1.0, abs(recorded))  # rounds.csv keeps 6 digits
    return what, same and close, f"round {last}: tensors equal {same}, loss {loss:.6g} vs {recorded:.6g}"


def _server_log(soak: Soak) -> str:
    return "\n".join(Path(r["log"]).read_text(errors="replace") for r in soak.log.runs)


def _refusal_checks(soak: Soak, listed: set[int]) -> list[tuple[str, bool, str]]:
    refused, impostor = soak.refused, soak.impostor
    registered = {d.node_id for d in soak.fleet.devices.values() if d.node_id}
    logs = "".join(p.read_text(errors="replace") for p in sorted(soak.fleet.logs.glob("unregistered-*.log")))
    refused_ok = (
        refused.starts > 0 and soak.refused_exit not in (None, 0)
        and "Failed to activate SuperNode" in logs and not refused.state_dir.exists()
        and listed <= registered
    )  # fmt: skip
    target = next(f.target for f in soak.faults if f.kind == "impostor")
    owner = soak.fleet.devices[f"node-{target}"].node_id
    pattern = rf"node {impostor.node_id} claims partition-id {target}, which the operator's table gives node {owner}: ignored"
    claimed = re.search(pattern, _server_log(soak)) is not None
    owner_down = any(
        f["fault"]["kind"] == "node-kill" and f["fault"]["target"] == target and "skipped" not in f
        for f in soak.log.fired
    )
    return [
        ("the unregistered node never served", refused_ok,
         f"SuperNode exit {soak.refused_exit}, listed nodes all registered {listed <= registered}, "
         f"state-dir made {refused.state_dir.exists()}"),
        ("the impostor never trained another's partition",
         impostor.starts > 0 and claimed and not impostor.state_dir.exists(),
         f"claim of partition {target} refused in the log {claimed}, its state-dir made "
         f"{impostor.state_dir.exists()}, the owner killed meanwhile {owner_down}"),
    ]  # fmt: skip


def _process_checks(soak: Soak, left: list[int], bound: list[int]) -> list[tuple[str, bool, str]]:
    kills = soak.log.group_kills
    leaked = [k for k in kills if k["left"] or k["processes"] < 2]
    links = [f for f in soak.log.fired if f["fault"]["kind"] == "superlink-kill"]
    link_leaks = [f for f in links if f["left"]]
    return [
        ("a device's process-group kill takes its children", bool(kills) and not leaked,
         f"{len(kills)} kills, {sum(k['processes'] for k in kills)} processes ended, "
         f"{sum(k['clientapp'] for k in kills)} with a ClientApp running; left: {leaked}"),
        ("a SuperLink kill takes its ServerApp", not link_leaks, f"{len(links)} kills; left: {link_leaks}"),
        ("no orphan process left", not left, f"{left}"),
        ("no port left bound", not bound, f"{bound}"),
    ]  # fmt: skip


def check_soak(
    soak: Soak, statuses: dict[int, str], left: list[int], bound: list[int], error: str
) -> dict[str, Any]:
    """Every check of the soak, and its verdict line.

    * every round in ``rounds.csv`` exactly once, committed or recorded failed;
    * ``clients.csv``: one row per sampled partition per round (the seeded draw
      of :func:`sims.server.exchange.sample_partitions`), none duplicated or missing;
    * the final checkpoint's model equals the copy of the last committed
      round's, and evaluates to that round's recorded loss;
    * the unregistered key's SuperNode was refused (it exited, its node was
      never listed, it never trained: no state-dir);
    * the impostor's claim was refused in the ServerApp's log and it never
      trained (no state-dir), though the owner was killed meanwhile;
    * each process-group kill left nothing of the device, each SuperLink kill
      nothing of its group; after the soak no process of it is left and no
      port of it is bound;
    * the last ``flwr run`` ended ``finished:completed``.
    """
    rounds_checks, rounds = _rounds_checks(soak)
    client_checks, client_rows = _clients_checks(soak)
    checks = rounds_checks + client_checks + [_model_check(soak, rounds)]
    checks += _refusal_checks(soak, soak.listed_nodes)
    checks += _process_checks(soak, left, bound)
    last = soak.log.runs[-1] if soak.log.runs else {}
    final_status = statuses.get(last.get("run_id") or -1, "unknown")
    checks.append(("the last flwr run finished:completed", final_status == "finished:completed",
                   f"run {last.get('run_id')}: {final_status}"))  # fmt: skip
    if error:
        checks.append(("the soak ran to its end", False, error))
    passed = all(ok for _, ok, _ in checks)
    fired = soak.log.fired
    kinds = Counter(f["fault"]["kind"] for f in fired if "skipped" not in f)
    injected = sum(kinds.values())
    done = len(rounds)
    survived = injected if passed else sum(1 for f in fired if f["round_in_flight"] <= done and "skipped" not in f)
    mid = sum(1 for f in fired if f["fault"]["kind"] == "node-kill" and f.get("clientapp_running"))
    restarts = soak.log.supervisor_restarts + kinds["node-kill"]
    peak = soak.log.memory_peak
    verdict = (
        f"soak {'PASS' if passed else 'FAIL'}: seed {soak.spec.seed}, {soak.spec.nodes} nodes, "
        f"{soak.spec.rounds} rounds; faults injected {injected} (node kills {kinds['node-kill']}, "
        f"{mid} mid-training; SuperLink kills {kinds['superlink-kill']}; unregistered "
        f"{kinds['unregistered']}; impostor {kinds['impostor']}), survived {survived}; device "
        f"restarts {restarts} ({soak.log.supervisor_restarts} by the supervisor); rows checked: "
        f"rounds.csv {len(rounds)}, clients.csv {client_rows}; peak RSS "
        f"{peak.get('rss_kib', 0) / 2**20:.1f} GiB, PSS {peak.get('pss_kib', 0) / 2**20:.1f} GiB"
    )
    return {
        "passed": passed,
        "verdict": verdict,
        "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in checks],
        "faults": fired,
        "group_kills": soak.log.group_kills,
        "runs": soak.log.runs,
        "memory_peak_kib": peak,
        "spec": {k: str(v) for k, v in vars(soak.spec).items()},
    }
