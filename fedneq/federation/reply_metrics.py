"""What every training reply reports about its local training and its simulated time,
mask, width and element clients alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedneq.federation.devices import DeviceProfile
from fedneq.federation.protocol import EPOCHS_KEY, LOCAL_STEPS_KEY, NUM_EXAMPLES_KEY
from fedneq.federation.timing import round_flops, round_time_metrics
from fedneq.federation.wire import payload_nbytes
from fedneq.neurons import NeuronMap
from fedneq.training.loop import TrainResult

__all__ = ["filter_metrics", "training_metrics", "training_time_metrics"]


def training_metrics(
    result: TrainResult,
    *,
    num_examples: int,
    partition_id: int,
    num_params: int,
    arrays: Mapping[str, np.ndarray],
) -> dict[str, int | float]:
    """The reply metrics of one local training (``result``) whose upload is ``arrays``.

    The memory figures are the largest over the epochs: the cost model's
    estimate and the measured peak (``train_masked(measure_memory=True)``).
    ``local-epochs`` is the passes over the data the training took (the
    device's local epochs, or as many as ``[fleet] local_steps`` needed) and
    ``local-steps`` its optimizer steps; the server holds both to what it
    knows of the device and partition.
    """
    costs = [e.cost for e in result.epochs if e.cost is not None]
    measured = [e.measured.peak_bytes for e in result.epochs if e.measured is not None]
    return {
        NUM_EXAMPLES_KEY: int(num_examples),
        "partition-id": int(partition_id),
        "train-loss": float(result.loss),
        "smallest-batch": int(result.smallest_batch),
        "trainable-params": int(result.trainable_params),
        "trainable-fraction": result.trainable_params / num_params,
        "selected-neurons": int(result.mask.neurons.sum()),
        "upload-bytes": payload_nbytes(arrays),
        "memory-estimate-bytes": int(max(c.training_memory_bytes for c in costs)),
        "memory-measured-bytes": int(max(measured)),
        EPOCHS_KEY: len(result.epochs),
        LOCAL_STEPS_KEY: int(result.steps),
    }



def training_time_metrics(
    result: TrainResult,
    device: DeviceProfile,
    *,
    download: Mapping[str, torch.Tensor],
    upload_bytes: int,
    reference_gflops: float,
    probe_samples: int = 0,
    probe_measurements: int = 0,
    fwd_flops: int = 0,
) -> dict[str, int | float]:
    """:func:`~fedneq.federation.timing.round_time_metrics` of a round whose local training is
    ``result``: the cost model's FLOPs of every epoch (plus the velocity probe's, as
    :func:`~fedneq.federation.timing.round_flops` counts them) on ``device``."""
    flops = round_flops(
        [(e.examples, e.cost.total_flops) for e in result.epochs if e.cost is not None],
        probe_samples=probe_samples,
        probe_measurements=probe_measurements,
        fwd_flops=fwd_flops,
    )
    return round_time_metrics(
        device, flops, download=download, upload_bytes=upload_bytes,
        reference_gflops=reference_gflops,
    )  # fmt: skip

def filter_metrics(neuron_map: NeuronMap, filtered: Sequence[str]) -> dict[str, int | list[int]]:
    """``filtered-layers`` (how many convs ran gradient-filtered) and ``filtered-convs``.

    ``filtered-convs``: their indices among the neuron map's convs in module
    order (for torchvision's MobileNetV2 the conv index of docs/DESIGN: 0 the
    stem, 51 the last 1x1 conv), ascending.
    """
    index = {lay.name: i for i, lay in enumerate(x for x in neuron_map.layers if x.kind == "conv")}
    return {"filtered-layers": len(filtered), "filtered-convs": sorted(index[n] for n in filtered)}
