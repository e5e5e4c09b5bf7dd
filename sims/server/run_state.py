"""A federated run's state between rounds, and how a run starts: fresh or resumed.

:func:`start_run` loads the task, builds the model and the strategy, and
either resumes after the last checkpoint in the results folder (the global
model, the strategy's state, the torch RNG state, the tables' rows up to that
round, the clients' kept state rolled back to it) or starts from round 1 in a
folder cleared of an earlier run's checkpoint and client state. The
:class:`RunState` it returns is what the round loop carries from one round to
the next.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedneq.config import Config
from fedneq.federation.client import rollback_client_state
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.wire import pack_model, tensor_table
from fedneq.task import Task, build_model, check_partitions, load_task
from fedneq.training.evaluation import evaluate
from sims.server.capacity import SUBMODEL_COLUMN, WidthEvaluator, width_evaluator
from sims.server.checkpoint import load_run_checkpoint
from sims.server.device_table import DeviceTable
from sims.server.evaluation import GlobalEvaluation, class_columns, class_label_mix, evaluate_global
from sims.server.initial import initial_state
from sims.server.knowledge import ServerKnowledge, server_knowledge, set_run_inputs
from sims.server.results import Recorder, write_initial
from sims.server.run_status import STATUS_FILE
from strategies import SparseStrategy, get_strategy

__all__ = ["RunState", "build_strategy", "start_run"]

log = logging.getLogger("fedneq")


def build_strategy(config: Config, neuron_map, state: dict[str, torch.Tensor]) -> SparseStrategy:
    """``[strategy] name`` with its options, for the model whose ``state_dict`` is ``state``."""
    return get_strategy(
        config.strategy.name,
        neuron_map=neuron_map,
        table=tensor_table(state),
        reference_state=state,
        **config.strategy.options,
    )


@dataclass
class RunState:
    """What a run carries from round to round (updated in place by the round loop)."""

    config: Config
    out_dir: Path
    task: Task
    model: nn.Module  # evaluates the global model (its weights: the last one evaluated)
    strategy: SparseStrategy
    knowledge: ServerKnowledge
    recorder: Recorder
    state_dir: Path  # the clients' kept state (<out_dir>/client_state)
    arrays: ArrayRecord  # the global model, packed once per round for every message
    first_round: int  # 1, or the round after the checkpoint resumed from
    cum_up: float  # bytes uploaded by accepted clients so far
    cum_time: float  # simulated seconds so far
    # a width method's scoring (static BatchNorm, per-capacity accuracy); None: plain evaluate
    width_eval: WidthEvaluator | None = None
    # device class -> its clients' label counts ([run] class_accuracy; empty: not asked for)
    label_mix: dict[str, np.ndarray] = field(default_factory=dict)

    def evaluate_global(self) -> GlobalEvaluation:
        """The global :attr:`model` on the test set, as the method scores it (per device class
        too when ``[run] class_accuracy`` asks for it; width methods score the global model only)."""
        if self.width_eval is None:
            return evaluate_global(self.model, self.task, self.label_mix)
        return GlobalEvaluation(*self.width_eval.evaluate(self.model, self.task.test))


def start_run(
    config: Config,
    out_dir: Path,
    *,
    resume: bool = False,
    devices: DeviceTable | Mapping[int, DeviceProfile] | None = None,
) -> RunState:
    """Set up a run of ``config`` in ``out_dir`` (see the module docstring).

    Raises
    ------
    ValueError
        If ``resume`` and the checkpoint belongs to another config or model
        (:func:`sims.server.checkpoint.load_run_checkpoint`).
    """
    out_dir = Path(out_dir)
    task = load_task(config)
    check_partitions(config)  # bad partitions fail here, before any round
    knowledge = server_knowledge(config, devices)
    torch.manual_seed(config.run.seed)
    model, neuron_map = build_model(config, task)
    state = initial_state(config, task, model, cache_dir=Path(config.run.out_dir) / "_pretrained")
    model.load_state_dict(state)
    strategy = build_strategy(config, neuron_map, state)
    set_run_inputs(strategy, config, neuron_map)
    ckpt = load_run_checkpoint(out_dir, config) if resume else None  # before writing anything
    width_eval = width_evaluator(config, strategy, task, model, neuron_map, knowledge.profiles)
    extra: dict[str, tuple[str, ...]] = {"rounds.csv": class_columns(config)}
    if width_eval is not None and width_eval.widths:
        extra = {
            "rounds.csv": (*width_eval.columns, *extra["rounds.csv"]),
            "clients.csv": (SUBMODEL_COLUMN,),
        }
    recorder = Recorder(out_dir, config.to_dict(), extra)
    (out_dir / STATUS_FILE).unlink(missing_ok=True)  # written again when this run ends
    state_dir = (out_dir / "client_state").resolve()
    arrays = pack_model(state)
    first_round = 1
    if ckpt is not None:
        if set(ckpt.global_state) != set(state):
            raise ValueError(f"cannot resume {out_dir}: its checkpoint does not match the model")
        arrays = pack_model({k: ckpt.global_state[k] for k in state})  # state_dict order
        strategy.load_state_dict(ckpt.strategy_state)
        torch.set_rng_state(ckpt.rng_state)
        first_round = ckpt.round + 1
        recorder.resume(ckpt.round)
        removed = rollback_client_state(state_dir, ckpt.round)
        print(
            f"[fedneq] resuming {out_dir} after round {ckpt.round} "
            f"({removed} client state files from later rounds removed)",
            flush=True,
        )
    else:
        if resume:
            log.warning("no checkpoint in %s: starting from round 1", out_dir)
        for stale in (state_dir, out_dir / "checkpoint"):  # nothing left from an earlier run here
            shutil.rmtree(stale, ignore_errors=True)
        loss0, acc0 = (evaluate if width_eval is None else width_eval.evaluate)(model, task.test)
        write_initial(out_dir, acc0, loss0)  # the plots' round-0 point
    state_dir.mkdir(parents=True, exist_ok=True)
    last = recorder.rounds[-1] if recorder.rounds else None
    return RunState(
        config=config,
        out_dir=out_dir,
        task=task,
        model=model,
        strategy=strategy,
        knowledge=knowledge,
        recorder=recorder,
        state_dir=state_dir,
        arrays=arrays,
        first_round=first_round,
        cum_up=float(last["cum_bytes_up"]) if last else 0.0,
        cum_time=float(last.get("cum_time_s") or 0.0) if last else 0.0,
        width_eval=width_eval,
        label_mix=class_label_mix(config, task, knowledge.devices) if config.run.class_accuracy else {},
    )
