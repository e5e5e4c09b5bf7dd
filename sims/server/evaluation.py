"""The server's evaluation of the global model: which rounds, and on which label mixes.

* :func:`evaluation_round`: ``[run] eval_every = k`` evaluates every k-th
  round and always the last one (k = 1, the default: every round). A round
  that is not evaluated leaves ``accuracy`` and ``loss`` empty in rounds.csv,
  and its aggregate is committed when every value of it is finite (an
  evaluated round asks for a finite test loss).
* :func:`class_label_mix` and :func:`evaluate_global`: with ``[run]
  class_accuracy = true`` every evaluation also scores the global model on
  each device class's own label mix: the test set reweighted to the label
  shares of that class's clients' training data (one pass over the test set,
  :meth:`fedneq.training.evaluation.LabelEvaluation.reweighted`), written to
  rounds.csv as ``accuracy_<class>`` (:func:`class_columns`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedneq.config import Config
from fedneq.task import Task, client_split
from fedneq.training.evaluation import evaluate, evaluate_by_label

__all__ = [
    "GlobalEvaluation",
    "all_finite",
    "class_columns",
    "class_label_mix",
    "evaluate_global",
    "evaluation_round",
]


def evaluation_round(config: Config, server_round: int) -> bool:
    """Whether the global model is evaluated after ``server_round``."""
    return server_round % config.run.eval_every == 0 or server_round >= config.run.rounds


def class_columns(config: Config) -> tuple[str, ...]:
    """The rounds.csv columns of the per-device-class accuracy (none unless asked for)."""
    if not config.run.class_accuracy:
        return ()
    return tuple(f"accuracy_{name}" for name in config.fleet.fleet().names)


def class_label_mix(config: Config, task: Task, devices: Mapping[int, str]) -> dict[str, np.ndarray]:
    """Per device class (in fleet order), the label counts of its clients' training data.

    ``devices`` maps each partition id to its device class (the server's
    knowledge of the fleet); a class with no client gets no entry.
    """
    labels = task.train.labels_numpy()
    mix: dict[str, np.ndarray] = {}
    for pid in range(config.run.num_clients):
        counts = np.bincount(labels[client_split(config, pid).train], minlength=task.num_classes)
        name = devices[pid]
        mix[name] = mix[name] + counts if name in mix else counts
    return {name: mix[name] for name in config.fleet.fleet().names if name in mix}


@dataclass(frozen=True)
class GlobalEvaluation:
    """The global model's test loss and accuracy, and its accuracy per device class."""

    loss: float
    accuracy: float
    classes: dict[str, float] = field(default_factory=dict)  # class -> accuracy on its label mix


def evaluate_global(
    model: nn.Module, task: Task, label_mix: Mapping[str, np.ndarray]
) -> GlobalEvaluation:
    """Evaluate ``model`` on the test set; per class of ``label_mix`` too (when it has any)."""
    if not label_mix:
        loss, accuracy = evaluate(model, task.test)
        return GlobalEvaluation(loss, accuracy)
    result = evaluate_by_label(model, task.test)
    return GlobalEvaluation(
        result.loss,
        result.accuracy,
        {name: result.reweighted(weights) for name, weights in label_mix.items()},
    )


def all_finite(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every floating-point value of ``state`` is finite."""
    return all(
        bool(torch.isfinite(t).all()) for t in state.values() if torch.is_floating_point(t)
    )
