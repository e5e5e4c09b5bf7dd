"""The server's round loop: discover the nodes, then play, record and checkpoint every round.

:func:`run_federation` is what the ServerApp's ``main`` does; it owns the round
loop (rather than ``Strategy.start``) so that it can sample clients from a
seed, record every client's reply, checkpoint after every round and resume.
The strategy is used through Flower's strategy API: ``configure_train`` builds
the messages, ``aggregate_train`` turns the replies into the next global model.
:func:`play_round` is one round, up to its outcome (:class:`RoundOutcome`);
:func:`record_round` writes that outcome to the tables.

Failures a run survives:

* a client that raises: its error reply is recorded as ``failed`` with the
  reason, the round goes on with the others;
* a client with no reply after ``[run] round_timeout_s``: ``failed``, "no reply
  before the round timeout" (its late reply is never read);
* a lost node (a SuperNode killed, a device gone): the SuperLink answers for it
  with an error reply from its *own* node id; replies are attributed to the
  node each message was sent to (``reply_to_message_id``), so the loss is a
  ``failed`` row with Flower's reason. A sampled partition whose node the
  SuperLink no longer lists is not sent and is ``failed`` ("no live node");
* a restarted SuperNode (a new node id): before every round the server asks
  the nodes it does not know yet who they are
  (:func:`sims.server.discovery.rediscover_nodes`); a partition stays bound to
  its node while the SuperLink lists it, then the first live claimant takes
  it over (a second live claimant is refused);
* a malformed, over-budget or exploded reply: ``rejected`` by the strategy
  (:meth:`strategies.SparseStrategy.check_replies`), the others aggregated;
  every node is held to what the *server* knows of it, never to what it
  declares (:mod:`sims.server.knowledge`): its device's budget and local
  epochs (the seeded fleet assignment, or the operator's table in deployment,
  :mod:`sims.server.device_table`), its device class, and at most its
  partition's size as ``num-examples``;
* an aggregate whose evaluation loss is not finite: the round is not
  committed (``committed`` 0 in rounds.csv), the global model and the
  strategy's state stay as they were;
* a reply whose simulated time on its device exceeds ``[run] round_deadline_s``
  (:mod:`fedneq.federation.timing`, :mod:`sims.server.sim_time`): ``dropped``,
  not aggregated;
* fewer than ``[run] min_replies`` replies: the round is sent again once
  (:func:`sims.server.exchange.send_round`), then skipped, the global model
  unchanged (a reply counts here even if the strategy then rejects it: it is
  recorded as ``rejected``);
* a run in which no round was committed, or in which every sampled client of
  some round failed or was rejected: it still runs every round and writes
  every table, then writes ``status.json`` saying so and raises
  :class:`sims.server.run_status.RunFailed` (a non-zero exit status);
* the server itself stopping: every round ends with a checkpoint
  (:mod:`sims.server.checkpoint`) and ``resume=True`` continues after the last
  one. :func:`sims.server.run_status.request_stop` (``sims.run``'s Ctrl-C)
  ends the run early and cleanly: the round in flight is abandoned (neither
  recorded nor checkpointed), the last committed round's checkpoint stays, and
  ``run_federation`` returns. The clients' velocity state survives through
  ``<results>/client_state/`` (:func:`fedneq.federation.client.save_client_state`),
  rolled back to the checkpoint's round, so a resumed run gives the same
  results as an uninterrupted one.

Determinism: replies are handled in partition order whatever their arrival
order, and everything random derives from (seed, round, partition, attempt),
so the same config gives the same rounds.csv.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedneq.config import Config
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.wire import model_nbytes, unpack_model
from sims.server.capacity import SUBMODEL_COLUMN, capacity_column
from sims.server.checkpoint import save_run_checkpoint
from sims.server.device_table import DeviceTable
from sims.server.discovery import Nodes, discover_nodes, rediscover_nodes
from sims.server.evaluation import GlobalEvaluation, all_finite, evaluation_round
from sims.server.exchange import attribute_replies, sample_partitions, send_round
from sims.server.knowledge import set_round_inputs
from sims.server.records import (
    class_rows,
    client_row,
    format_eta,
    format_percent,
    format_seconds,
    mean,
    numbers,
    unanswered_rows,
)
from sims.server.run_state import RunState, start_run
from sims.server.run_status import finish_run, stop_requested
from sims.server.sim_time import (
    add_seconds,
    apply_deadline,
    reachable_partitions,
    round_seconds,
    time_row,
)
from strategies.coverage import TensorCoverage

__all__ = ["RoundOutcome", "play_round", "record_round", "run_federation"]

log = logging.getLogger("fedneq")


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did: its clients.csv rows and the global model after it."""

    round: int
    sampled: list[int]  # the partitions drawn for the round
    client_rows: list[dict[str, Any]]  # one per sampled partition, in partition order
    rejected: int  # replies the strategy rejected
    dropped: int  # replies that missed the round deadline
    skipped: bool  # too few replies: not aggregated
    committed: bool  # the aggregate became the global model
    note: str  # why it was not committed ("" if it was)
    arrays: ArrayRecord  # the global model after the round (the previous one unless committed)
    accuracy: float | None  # the test accuracy and loss of that model (None: not evaluated)
    loss: float | None
    seconds: float  # the round's simulated duration
    # per parameter tensor, how many aggregated replies trained it (committed rounds; else empty)
    coverage: tuple[TensorCoverage, ...] = ()
    capacity: dict[float, float] = field(default_factory=dict)  # width -> its sub-model's accuracy
    # device class -> accuracy on its clients' label mix ([run] class_accuracy)
    class_accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> list[dict[str, Any]]:
        """The ``ok`` rows: the clients whose update was aggregated."""
        return [r for r in self.client_rows if r["status"] == "ok"]


@dataclass(frozen=True)
class _Aggregate:
    """The strategy's verdict on a round's on-time replies."""

    arrays: ArrayRecord  # the global model after the round
    committed: bool
    note: str
    rejected_nodes: dict[int, str]  # node id -> why the strategy rejected its reply
    evaluation: GlobalEvaluation | None  # of a committed aggregate, in an evaluation round


def _aggregate(run: RunState, server_round: int, replies: list[Message], skipped: bool) -> _Aggregate:
    """Aggregate (or, for a skipped round, only check) the replies; commit a finite aggregate."""
    strategy = run.strategy
    if skipped:  # not aggregated, but still checked: an invalid reply is recorded as such
        _, rejected_nodes = strategy.check_replies(server_round, replies)
        return _Aggregate(run.arrays, False, "skipped: too few replies", rejected_nodes, None)
    before = {k: v.clone() for k, v in strategy.state_dict().items()}
    new_arrays, _ = strategy.aggregate_train(server_round, replies)
    rejected_nodes = strategy.last_rejected
    if new_arrays is None:
        return _Aggregate(run.arrays, False, "no reply accepted", rejected_nodes, None)
    if not evaluation_round(run.config, server_round):  # no test loss: its values must be finite
        if all_finite(unpack_model(new_arrays)):
            return _Aggregate(new_arrays, True, "", rejected_nodes, None)
        note = "the aggregate holds non-finite values: not committed"
        log.warning("round %d: %s, the global model stays as it was", server_round, note)
        strategy.load_state_dict(before)
        return _Aggregate(run.arrays, False, note, rejected_nodes, None)
    run.model.load_state_dict(unpack_model(new_arrays))
    evaluation = run.evaluate_global()
    if math.isfinite(evaluation.loss):
        return _Aggregate(new_arrays, True, "", rejected_nodes, evaluation)
    # the previous global model and strategy state stay
    note = f"the aggregate's test loss is {evaluation.loss}: not committed"
    log.warning("round %d: %s, the global model stays as it was", server_round, note)
    strategy.load_state_dict(before)
    return _Aggregate(run.arrays, False, note, rejected_nodes, None)


def play_round(grid: Grid, run: RunState, nodes: Nodes, server_round: int) -> RoundOutcome | None:
    """Sample, send, aggregate and evaluate one round; None if a stop request abandoned it.

    Updates ``nodes`` (rediscovery), the strategy's state and ``run.model``;
    the caller records the outcome and takes its global model.
    """
    config, strategy, devices = run.config, run.strategy, run.knowledge.devices
    deadline = config.run.round_deadline_s
    live = rediscover_nodes(grid, config, nodes, timeout_s=config.run.round_timeout_s)
    sampled = sample_partitions(config, server_round)
    gone = {p for p in sampled if nodes.node_of[p] not in live}  # not sent: recorded as failed
    send_to = [nodes.node_of[p] for p in sampled if p not in gone]
    set_round_inputs(strategy, config, server_round, send_to, nodes.node_of, run.knowledge)
    sent = send_round(grid, strategy, config, server_round, run.arrays, run.state_dir)
    if stop_requested():  # interrupted: this round is not committed
        return None
    pairs = attribute_replies(sent.replies, sent.sent_to, nodes.partition_of)
    # an error reply from another node id than the one sent to: the SuperLink answered for a
    # lost node, which then no longer holds its partition against a restarted one
    nodes.unreachable |= {n for m, n in pairs if m.has_error() and m.metadata.src_node_id != n}
    pid_of = {id(m): nodes.partition_of[n] for m, n in pairs}
    split = apply_deadline(server_round, [m for m, _ in pairs], nodes.partition_of, devices, deadline)
    replies = split.on_time  # the dropped ones are neither aggregated nor checked
    skipped = sent.skipped
    if not skipped and sum(not r.has_error() for r in replies) < config.run.min_replies:
        skipped = True  # a retry would miss the deadline again: same simulated times
        log.warning(
            "round %d: %d replies missed the %g s round deadline, fewer than [run] "
            "min_replies=%d left; skipping the round", server_round, len(split.dropped), deadline,
            config.run.min_replies,
        )  # fmt: skip
    agg = _aggregate(run, server_round, replies, skipped)
    sizes, clips = strategy.last_update_rms, strategy.last_clip
    rejected = {nodes.partition_of[n]: why for n, why in agg.rejected_nodes.items()}
    rows = [
        client_row(server_round, m, pid_of[id(m)], devices[pid_of[id(m)]], rejected,
                   sizes.get(m.metadata.src_node_id), clips.get(m.metadata.src_node_id))
        for m in replies
    ]  # fmt: skip
    answered = {r["partition_id"] for r in rows + split.dropped}
    rows += unanswered_rows(server_round, sampled, answered, gone, devices)
    rows = [time_row(r) for r in rows] + split.dropped
    rows.sort(key=lambda r: r["partition_id"])
    seconds = round_seconds(rows, deadline)
    evaluation = agg.evaluation
    if evaluation is None and evaluation_round(run.config, server_round):
        run.model.load_state_dict(unpack_model(agg.arrays))  # the global model that stays
        evaluation = run.evaluate_global()
    capacity = {} if evaluation is None else _capacity_accuracy(run, server_round, rows)
    return RoundOutcome(
        round=server_round, sampled=sampled, client_rows=rows, rejected=len(rejected),
        dropped=len(split.dropped), skipped=skipped, committed=agg.committed, note=agg.note,
        arrays=agg.arrays, accuracy=None if evaluation is None else evaluation.accuracy,
        loss=None if evaluation is None else evaluation.loss, seconds=seconds, capacity=capacity,
        class_accuracy={} if evaluation is None else evaluation.classes,
        coverage=strategy.last_coverage if agg.committed else (),
    )  # fmt: skip


def _capacity_accuracy(run: RunState, server_round: int, rows: list[dict[str, Any]]) -> dict[float, float]:
    """A width method's ``{width: sub-model accuracy}`` of the global model after the round
    (:mod:`sims.server.capacity`); each ``ok`` row gets its width's in ``submodel_accuracy``."""
    if run.width_eval is None or not run.width_eval.widths:
        return {}
    widths = {float(r["width"]) for r in rows if r["status"] == "ok" and r.get("width") != ""}
    capacity = run.width_eval.width_accuracy(run.model, run.task.test, server_round, widths)
    for r in rows:
        if r["status"] == "ok" and r.get("width") != "":
            r[SUBMODEL_COLUMN] = capacity[float(r["width"])]
    return {w: capacity[w] for w in run.width_eval.widths}


def record_round(run: RunState, outcome: RoundOutcome) -> dict[str, Any]:
    """Add the round's rows to clients.csv, device_classes.csv, rounds.csv and coverage.csv (not yet
    written: :meth:`~sims.server.results.Recorder.flush`); returns its rounds.csv row."""
    rnd, accepted, rows = outcome.round, outcome.accepted, outcome.client_rows
    run.cum_time = add_seconds(run.cum_time, outcome.seconds)
    bytes_up = int(sum(numbers(accepted, "upload_bytes")))
    run.cum_up += bytes_up
    row = {
        "round": rnd,
        "accuracy": "" if outcome.accuracy is None else outcome.accuracy,  # "": not evaluated
        "loss": "" if outcome.loss is None else outcome.loss,
        "sampled": len(outcome.sampled),
        "replied": len(accepted),
        "failed": sum(r["status"] == "failed" for r in rows),
        "rejected": outcome.rejected,
        "skipped": int(outcome.skipped),
        "committed": int(outcome.committed),
        "note": outcome.note,
        "bytes_down": len(outcome.sampled) * model_nbytes(outcome.arrays),
        "bytes_up": bytes_up,
        "cum_bytes_up": int(run.cum_up),
        "mean_trainable_fraction": mean(accepted, "trainable_fraction"),
        "mean_flops_saved": mean(accepted, "flops_saved"),
        "mean_train_loss": mean(accepted, "train_loss"),
        "mean_state_bytes": mean(accepted, "state_bytes"),
        "available": len(reachable_partitions(run.config, rnd)),
        "dropped": outcome.dropped,
        "round_time_s": outcome.seconds,
        "cum_time_s": repr(run.cum_time),  # exact: a resumed run continues from it
    }
    row |= {capacity_column(w): acc for w, acc in outcome.capacity.items()}
    row |= {f"accuracy_{name}": acc for name, acc in outcome.class_accuracy.items()}
    run.recorder.add("clients.csv", rows)
    run.recorder.add("device_classes.csv", class_rows(rnd, accepted))
    run.recorder.add("rounds.csv", [row])
    run.recorder.add("coverage.csv", [{"round": rnd, **dataclasses.asdict(c)} for c in outcome.coverage])
    return row


def _progress_line(outcome: RoundOutcome, total: int, seconds: float, eta_s: float) -> str:
    """The line printed after each round."""
    accepted = outcome.accepted
    failed = len(outcome.client_rows) - len(accepted)
    bytes_up = sum(numbers(accepted, "upload_bytes"))
    not_committed = "" if outcome.committed else f"  NOT COMMITTED ({outcome.note})"
    evaluated = (
        f"acc {outcome.accuracy:.4f}  loss {outcome.loss:.4f}"
        if outcome.accuracy is not None and outcome.loss is not None
        else "acc -  loss -"
    )
    return (
        f"[fedneq] round {outcome.round}/{total}  {evaluated}  clients {len(accepted)}/{len(outcome.sampled)} ok, {failed} "
        f"failed/rejected/dropped{not_committed}  up {int(bytes_up) / 1e3:.1f} kB  "
        f"trainable {format_percent(mean(accepted, 'trainable_fraction'))}  "
        f"sim {format_seconds(outcome.seconds)}  {seconds:.1f}s  eta {format_eta(eta_s)}"
    )


def run_federation(
    grid: Grid,
    config: Config,
    out_dir: Path,
    *,
    resume: bool = False,
    devices: DeviceTable | Mapping[int, DeviceProfile] | None = None,
) -> list[dict[str, Any]]:
    """Run all rounds of ``config`` on ``grid``; returns the rows of rounds.csv.

    ``resume=True`` continues after the last checkpoint in ``out_dir`` (from
    round 1 if there is none); the checkpoint's config must equal ``config``
    except for ``[run] rounds``. ``devices`` is the operator's table
    (:func:`sims.server.device_table.read_device_table`, or just
    ``{partition id: device}``); by default the seeded fleet assignment, as in
    simulation. A node is held to that device, whatever it declares.
    """
    run = start_run(config, Path(out_dir), resume=resume, devices=devices)
    if stop_requested():
        return run.recorder.rounds
    nodes = discover_nodes(
        grid, config, allowed=run.knowledge.allowed, devices=run.knowledge.devices
    )
    _play_rounds(grid, run, nodes)
    return finish_run(run.recorder, run.out_dir, config)


def _play_rounds(grid: Grid, run: RunState, nodes: Nodes) -> None:
    """Every round from ``run.first_round`` on, each recorded and checkpointed, until a stop."""
    total = run.config.run.rounds
    loop_t0 = t0 = time.monotonic()  # a round's seconds run from the previous round's row
    for rnd in range(run.first_round, total + 1):
        if stop_requested():
            return
        outcome = play_round(grid, run, nodes, rnd)
        if outcome is None:
            print(f"[fedneq] round {rnd} abandoned (interrupted)", flush=True)
            return
        run.arrays = outcome.arrays
        record_round(run, outcome)
        now = time.monotonic()  # the previous round's tables and checkpoint count in this one
        seconds, t0 = now - t0, now
        run.recorder.add("timing.csv", [{"round": rnd, "seconds": seconds}])
        run.recorder.flush()
        save_run_checkpoint(
            run.out_dir, run.config, rnd, unpack_model(run.arrays), run.strategy.state_dict()
        )
        eta_s = (time.monotonic() - loop_t0) / (rnd - run.first_round + 1) * (total - rnd)
        print(_progress_line(outcome, total, seconds, eta_s), flush=True)
