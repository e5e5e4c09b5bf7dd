"""What training a :class:`~fedneq.neurons.TrainMask` costs: FLOPs, memory, upload.

Kept apart from training, like MIT tiny-training's memory cost model: one
forward pass with hooks (:func:`profile_model`) records the shapes, the
execution order and the activations of a model; :func:`mask_cost` then prices
any mask with plain arithmetic.

Conventions
-----------
* **FLOPs** are ``2 x`` multiply-accumulates of ``Conv2d`` and ``Linear``
  layers, per sample. One output neuron of a conv costs
  ``(C_in / groups * kh * kw) * H_out * W_out`` MACs (depthwise:
  ``kh * kw * H_out * W_out``), one of a linear ``in_features``. BatchNorm,
  activations, pooling and biases are not counted.
* The backward pass of a layer costs its forward twice: once for the weight
  gradient (only the rows of trained neurons) and once for the input
  gradient. The input gradient is needed by every Conv2d/Linear *strictly
  after*, in execution order, the earliest module with a trained parameter;
  nothing at or below it is differentiated. The model is treated as a chain
  in execution order, so for branches (a ResNet shortcut) this is an upper
  bound.
* **Memory** assumes what :class:`~fedneq.training.masking.RowFreezer` does: a
  parameter with no trainable row has ``requires_grad=False``, so autograd
  records nothing below the earliest trained module. Gradients and optimizer
  state are counted for the trained parameters only (a sparse-update
  implementation; PyTorch's dense ``.grad`` holds whole tensors).
"""

from fedneq.costs.pricing import (
    OPTIMIZER_STATES,
    FilterPricing,
    MaskCost,
    mask_cost,
    neuron_memory_costs,
    upload_nbytes,
)
from fedneq.costs.profile import (
    CostProfile,
    LayerProfile,
    SavedActivation,
    measure_saved_bytes,
    profile_model,
)

__all__ = [
    "OPTIMIZER_STATES",
    "CostProfile",
    "FilterPricing",
    "LayerProfile",
    "MaskCost",
    "SavedActivation",
    "mask_cost",
    "measure_saved_bytes",
    "neuron_memory_costs",
    "profile_model",
    "upload_nbytes",
]
