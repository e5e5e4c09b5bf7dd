"""Reply metrics: their weighted mean over a round, and the checks of the declared ones.

:func:`aggregate_metrics` is the default ``train_metrics_aggr_fn`` /
``evaluate_metrics_aggr_fn`` of :class:`strategies.base.SparseStrategy`;
:func:`int_metric` and :func:`check_finite_metrics` read what a reply
declares (its weight, budget and epochs) without trusting it.
"""

from __future__ import annotations

import math
from logging import WARNING

from flwr.app import MetricRecord, RecordDict
from flwr.supercore import log

__all__ = ["aggregate_metrics", "check_finite_metrics", "int_metric"]


def aggregate_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Weighted mean of every metric over the replies that report it.

    Like Flower's ``aggregate_metricrecords`` when every reply has the same
    keys; unlike it, a key only some replies report is averaged over those
    (weights renormalized), and a key whose replies disagree on its shape
    (scalar vs list, or lists of different lengths) is dropped with a warning
    rather than failing the round. ``weighting_key`` itself is left out.
    """
    sums: dict[str, float | list[float]] = {}
    totals: dict[str, float] = {}
    dropped: set[str] = set()
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        weight = float(metrics[weighting_key])  # type: ignore[arg-type]
        for key, value in metrics.items():
            if key == weighting_key or key in dropped:
                continue
            prev = sums.get(key)
            if prev is None:
                sums[key] = (
                    [weight * v for v in value] if isinstance(value, list) else weight * value
                )
                totals[key] = weight
            elif isinstance(prev, list) and isinstance(value, list) and len(prev) == len(value):
                sums[key] = [p + weight * v for p, v in zip(prev, value, strict=True)]
                totals[key] += weight
            elif not isinstance(prev, list) and not isinstance(value, list):
                sums[key] = prev + weight * value
                totals[key] += weight
            else:
                dropped.add(key)
    for key in sorted(dropped):
        sums.pop(key, None)
        log(WARNING, "metric %r has different shapes across replies: not aggregated", key)
    return MetricRecord(
        {
            key: [v / totals[key] for v in value]
            if isinstance(value, list)
            else value / totals[key]
            for key, value in sums.items()
        }
    )


def int_metric(metrics: MetricRecord, key: str, *, low: int, high: int | None = None) -> int:
    """``metrics[key]`` as an int in ``[low, high]``; ValueError saying what is wrong."""
    if key not in metrics:
        raise ValueError(f"missing metric {key!r}")
    value = metrics[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ValueError(f"metric {key!r} must be {allowed}, got {value!r}")
    return value


def check_finite_metrics(metrics: MetricRecord) -> None:
    """Raise ``ValueError`` naming the first metric of ``metrics`` that is not finite."""
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"metric {key!r} is not finite: {value!r}")
