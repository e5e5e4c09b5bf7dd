"""Scoring a model on a test set: loss and accuracy, and the accuracy of every label.

:func:`evaluate_by_label` keeps the correct count of each label, so that one
pass over the test set also scores the model on any other label mix
(:meth:`LabelEvaluation.reweighted`): the accuracy a device class would see on
data distributed like its own clients' (the test set reweighted to their
label shares). :func:`evaluate` is its loss and accuracy alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedneq.data.arrays import ArrayDataset

__all__ = ["LabelEvaluation", "evaluate", "evaluate_by_label"]


@dataclass(frozen=True)
class LabelEvaluation:
    """A model's mean loss and accuracy on a test set, and its correct count per label."""

    loss: float  # mean cross-entropy
    accuracy: float  # correct / samples
    correct: np.ndarray  # (num_labels,) correct predictions per true label
    total: np.ndarray  # (num_labels,) test samples per label

    def reweighted(self, weights: np.ndarray) -> float:
        """The accuracy on a label mix ``weights`` (one share per label, any scale).

        The per-label accuracies averaged with ``weights``; labels the test set
        lacks are left out and the other shares renormalised. NaN when no
        label of ``weights`` is in the test set.

        Raises
        ------
        ValueError
            If ``weights`` is not one non-negative number per label.
        """
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != self.total.shape or (w < 0).any() or not np.isfinite(w).all():
            raise ValueError(
                f"weights should be {self.total.shape[0]} finite numbers >= 0 (one per label), "
                f"got {weights!r}"
            )
        seen = self.total > 0
        mass = w[seen].sum()
        if mass == 0:
            return float("nan")
        per_label = self.correct[seen] / self.total[seen]
        return float((w[seen] * per_label).sum() / mass)


def evaluate_by_label(
    model: nn.Module, data: ArrayDataset, batch_size: int = 512
) -> LabelEvaluation:
    """Loss, accuracy and per-label correct counts of ``model`` on ``data`` (eval mode).

    The labels are ``0 .. C-1`` for a model with ``C`` outputs.
    """
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct: torch.Tensor | None = None
    total: torch.Tensor | None = None
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        logits = model(x)  # (B, C)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        hits = (logits.argmax(1) == y).long()
        labels = logits.shape[1]
        batch_correct = torch.bincount(y, weights=hits, minlength=labels).long()
        batch_total = torch.bincount(y, minlength=labels)
        correct = batch_correct if correct is None else correct + batch_correct
        total = batch_total if total is None else total + batch_total
    model.train(was_training)
    assert correct is not None and total is not None  # data is not empty
    return LabelEvaluation(
        loss=total_loss / len(data),
        accuracy=int(correct.sum()) / len(data),
        correct=correct.numpy(),
        total=total.numpy(),
    )


def evaluate(model: nn.Module, data: ArrayDataset, batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``data`` (eval mode)."""
    result = evaluate_by_label(model, data, batch_size)
    return result.loss, result.accuracy
