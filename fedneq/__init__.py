"""fedneq: federated on-device learning with velocity-based budgeted neuron selection."""

from fedneq.config import Config, load_config
from fedneq.neurons import NeuronMap, TrainMask, enumerate_neurons
from fedneq.selection import Budget, get_selector, list_selectors
from fedneq.selection.velocity import VelocityTracker
from fedneq.training.loop import OptimizerConfig, train_masked

__all__ = [
    "Budget",
    "Config",
    "NeuronMap",
    "OptimizerConfig",
    "TrainMask",
    "VelocityTracker",
    "enumerate_neurons",
    "get_selector",
    "list_selectors",
    "load_config",
    "train_masked",
]
