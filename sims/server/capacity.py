"""How the server scores a width method: static BatchNorm's query pass, and every width's sub-model.

A width strategy (:class:`strategies.width_avg.WidthAvg`) trains nested or
rolling sub-models; the global model is the full-width one. The server scores

* the global model, as for every method; with HeteroFL's static BatchNorm
  (``static_bn``) after a query pass that computes its BatchNorm statistics
  on the query data (:func:`fedneq.training.static_bn.query_statistics`);
* with ``capacity_accuracy``, each fleet width's own sub-model of the global
  model (``local`` accuracy in HeteroFL's and FIARSE's papers: what a device
  of that width runs), each after its own query pass under static BatchNorm.
  The widths are those the server's devices train at
  (:func:`fedneq.federation.width_client.fleet_width`, from the device table
  the server holds every node to), one rounds.csv column each
  (:func:`capacity_column`); a clients.csv row's ``submodel_accuracy`` is the
  sub-model of that client's width. FedRolex's sub-model at a round is the
  window the devices trained in that round.

Mask methods and FIARSE need none of this: their devices run the global model
whole, so its accuracy is every device's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from torch import nn

from fedneq.config import Config
from fedneq.costs import profile_model
from fedneq.data.arrays import ArrayDataset
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.width_client import WidthOptions, fleet_width, width_plan
from fedneq.models import model_head
from fedneq.neurons import NeuronMap
from fedneq.task import Task
from fedneq.training.evaluation import evaluate
from fedneq.training.static_bn import query_statistics
from fedneq.training.submodel import extract_submodel
from strategies import SparseStrategy
from strategies.width_avg import WidthAvg

__all__ = ["SUBMODEL_COLUMN", "WidthEvaluator", "capacity_column", "width_evaluator"]

SUBMODEL_COLUMN = "submodel_accuracy"  # clients.csv: the sub-model of the client's width


def capacity_column(width: float) -> str:
    """rounds.csv's column of the width-``width`` sub-model's test accuracy."""
    return f"accuracy_w{width:g}"


@dataclass(frozen=True, eq=False)
class WidthEvaluator:
    """Scores a width method's global model and sub-models (module notes)."""

    method: str
    options: WidthOptions
    widths: tuple[float, ...]  # the fleet's widths, widest first; () without capacity_accuracy
    query: ArrayDataset | None  # static BatchNorm's query data; None: plain evaluation
    head: str | None  # the classifier a sub-model keeps whole

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(capacity_column(w) for w in self.widths)

    def _prepared(self, model: nn.Module) -> nn.Module:
        return model if self.query is None else query_statistics(model, self.query)

    def evaluate(self, model: nn.Module, test: ArrayDataset) -> tuple[float, float]:
        """``(loss, accuracy)`` of the global model (after the query pass under static BatchNorm)."""
        return evaluate(self._prepared(model), test)

    def width_accuracy(
        self, model: nn.Module, test: ArrayDataset, server_round: int, widths: Iterable[float] = ()
    ) -> dict[float, float]:
        """``{width: accuracy}`` of the sub-models at the fleet's widths and ``widths``."""
        out: dict[float, float] = {}
        for width in sorted({*self.widths, *widths}, reverse=True):
            if width >= 1.0:  # the whole model (FedRolex's full window only permutes it)
                out[width] = self.evaluate(model, test)[1]
                continue
            plan = width_plan(model, self.method, width, server_round, head=self.head,
                              roll_step=self.options.roll_step)  # fmt: skip
            out[width] = self.evaluate(extract_submodel(model, plan), test)[1]
        return out


def _query_data(task: Task, examples: int, seed: int) -> ArrayDataset:
    """``examples`` seeded examples of the training pool (0: all of it), in pool order."""
    n = len(task.train)
    if examples == 0 or examples >= n:
        return task.train.materialize()
    rows = np.sort(np.random.default_rng([seed, 7919]).choice(n, size=examples, replace=False))
    return task.train.subset(rows)


def width_evaluator(
    config: Config,
    strategy: SparseStrategy,
    task: Task,
    model: nn.Module,
    neuron_map: NeuronMap,
    profiles: Mapping[int, DeviceProfile],
) -> WidthEvaluator | None:
    """The evaluator of a width strategy that asks for one; None for any other run.

    ``profiles``: the device of every partition the server knows of.
    """
    if not isinstance(strategy, WidthAvg):
        return None
    options = strategy.options
    if not (options.static_bn or strategy.capacity_accuracy):
        return None
    widths: tuple[float, ...] = ()
    if strategy.capacity_accuracy:
        shape = tuple(task.train.image_shape)
        full = profile_model(model, neuron_map, shape)
        statistics = config.train.bn_stats != "frozen" and not options.static_bn
        found = {
            fleet_width(config, model, neuron_map, full, device, shape, statistics=statistics).width
            for device in set(profiles.values())
        }
        widths = tuple(sorted(found, reverse=True))
    query = _query_data(task, strategy.query_examples, config.run.seed) if options.static_bn else None
    return WidthEvaluator(strategy.method, options, widths, query, model_head(config.model.name))
