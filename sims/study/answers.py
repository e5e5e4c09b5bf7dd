"""The study's answers: the three questions its section opens with, and its target.

Each answer is read off the paired differences (:func:`sims.study.report.summarize`),
never off means alone:

1. Do the weak devices help over strong-only FedAvg? ``best mixed - strong-only``
   and ``velocity-per-param - strong-only``.
2. Which aggregation rule does it? Each rule variant of :data:`RULE_VARIANTS`
   against velocity / param with ``sparse-fedavg`` (:data:`REFERENCE`).
3. Does velocity / param beat random and static in the fleet?

A verdict is "yes" when the 95 % interval lies above 0 at every alpha, "no"
when it lies below 0 at every alpha, and "not resolved" otherwise.

The target: the best mixed-fleet method beats strong-only by at least
:data:`TARGET_OVER_STRONG` (interval above 0) at every alpha, and comes within
:data:`TARGET_TO_DENSE` of the all-dense reference (mean difference). Next to
it, the headroom: what the all-dense reference itself gains over strong-only
(``dense - strong-only``), and the share of it the best mixed method recovers.
A target over strong-only above the headroom cannot be met by any mixed fleet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sims.study.plan import VARIANTS

__all__ = [
    "REFERENCE", "RULE_VARIANTS", "TARGET_OVER_STRONG", "TARGET_TO_DENSE", "answer_lines", "target_lines",
    "verdict",
]  # fmt: skip

REFERENCE = "velocity-per-param"
# the aggregation and local-work rules, each compared with REFERENCE on the same seeds
RULE_VARIANTS = (
    "velocity", "vpp-fednova", "vpp-fedadam", "vpp-fedyogi", "vpp-label-split", "vpp-equal-steps",
    "velocity-per-param-keep-all",
)  # fmt: skip
TARGET_OVER_STRONG = 0.05  # accuracy, as a fraction
TARGET_TO_DENSE = 0.02


def _pts(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:+.1f}"


def _find(paired: Sequence[dict[str, Any]], alpha: float, a: str, b: str) -> dict[str, Any] | None:
    return next((p for p in paired if p["alpha"] == alpha and p["a"] == a and p["subtrahend"] == b), None)


def _cell(p: dict[str, Any] | None, alpha: float) -> str:
    if p is None:
        return f"α = {alpha:g}: not run"
    ci = f"[{_pts(p['low'])}, {_pts(p['high'])}]" if not math.isnan(p["low"]) else "[—, —]"
    return f"α = {alpha:g}: {_pts(p['mean'])} {ci} ({p['seeds']} seeds)"


def verdict(rows: Sequence[dict[str, Any] | None]) -> str:
    """"yes" / "no" / "not resolved" / "not run" for one comparison at every alpha."""
    if not rows or any(r is None for r in rows):
        return "not run"
    if all(r["low"] > 0 for r in rows):
        return "yes"
    if all(r["high"] < 0 for r in rows):
        return "no"
    return "not resolved"


def _comparison(paired: Sequence[dict], alphas: Sequence[float], a: str, b: str) -> tuple[str, str]:
    rows = [_find(paired, alpha, a, b) for alpha in alphas]
    return verdict(rows), "; ".join(_cell(r, alpha) for r, alpha in zip(rows, alphas, strict=True))


def answer_lines(alphas: Sequence[float], paired: Sequence[dict[str, Any]]) -> list[str]:
    """The section's first lines: three questions, each with its intervals, then the target."""
    best = {p["alpha"]: p["a_name"] for p in paired if p["a"] == "best mixed"}
    lines = ["**The three questions** (tail accuracy, points, paired over seeds; 95 % t-interval):", ""]
    v, cells = _comparison(paired, alphas, "best mixed", "strong-only")
    v2, cells2 = _comparison(paired, alphas, REFERENCE, "strong-only")
    names = ", ".join(f"α = {a:g}: {best[a]}" for a in alphas if a in best) or "—"
    lines += [
        f"1. **Do the weak devices help over strong-only FedAvg?** {v}. Best mixed method ({names}) "
        f"− strong-only: {cells}. Velocity / param − strong-only: {v2}, {cells2}.",
    ]
    rules = []
    for rule in RULE_VARIANTS:
        if any(_find(paired, alpha, rule, REFERENCE) for alpha in alphas):
            rules.append((rule, *_comparison(paired, alphas, rule, REFERENCE)))
    helping = [r for r, rv, _ in rules if rv == "yes"]
    if not rules:
        rule_text = "not measured yet: no rule variant has complete runs"
    else:
        head = (f"{', '.join(VARIANTS[r].label for r in helping)} beat{'s' if len(helping) == 1 else ''} "
                "sparse-fedavg at every α" if helping else
                "no rule beats velocity / param with sparse-fedavg at every α")  # fmt: skip
        rule_text = head + ". " + " ".join(f"{VARIANTS[r].label} − velocity / param: {rv}, {c}."
                                          for r, rv, c in rules)  # fmt: skip
    lines.append(f"2. **Which aggregation rule does it?** {rule_text}")
    vr, cr = _comparison(paired, alphas, REFERENCE, "random")
    vs, cs = _comparison(paired, alphas, REFERENCE, "static")
    lines.append(f"3. **Does velocity / param beat random and static in the fleet?** Random: {vr}, "
                 f"{cr}. Static: {vs}, {cs}.")  # fmt: skip
    lines += ["", *target_lines(alphas, paired)]
    return lines


def target_lines(alphas: Sequence[float], paired: Sequence[dict[str, Any]]) -> list[str]:
    """Whether the best mixed method is >= 5 points over strong-only and within 2 of dense."""
    over = [_find(paired, a, "best mixed", "strong-only") for a in alphas]
    dense = [_find(paired, a, "best mixed", "dense") for a in alphas]
    if any(r is None for r in over + dense):
        return ["**Target** (best mixed ≥ strong-only + 5 points, within 2 of dense): not all runs are complete."]
    met_over = all(r["mean"] >= TARGET_OVER_STRONG and r["low"] > 0 for r in over)
    met_dense = all(r["mean"] >= -TARGET_TO_DENSE for r in dense)
    return [
        f"**Target:** best mixed ≥ strong-only + {100 * TARGET_OVER_STRONG:.0f} points with the interval "
        f"above 0 at every α: {'met' if met_over else 'not met'} ("
        + "; ".join(f"α = {a:g}: {_pts(r['mean'])}" for a, r in zip(alphas, over, strict=True))
        + f"); within {100 * TARGET_TO_DENSE:.0f} points of all-dense FedAvg: "
        f"{'met' if met_dense else 'not met'} ("
        + "; ".join(f"α = {a:g}: {_pts(r['mean'])}" for a, r in zip(alphas, dense, strict=True)) + ")."
    ] + _headroom_lines(alphas, paired, over)


def _headroom_lines(alphas: Sequence[float], paired: Sequence[dict[str, Any]], over: Sequence[dict]) -> list[str]:
    """The all-dense reference's own gain over strong-only, and the share the best mixed recovers."""
    room = [_find(paired, a, "dense", "strong-only") for a in alphas]
    if any(r is None for r in room):
        return []
    cells = "; ".join(
        f"α = {a:g}: {_pts(r['mean'])} [{_pts(r['low'])}, {_pts(r['high'])}], of which the best mixed "
        f"recovers {100 * o['mean'] / r['mean']:.0f} %" if r["mean"] > 0 else f"α = {a:g}: {_pts(r['mean'])}"
        for a, r, o in zip(alphas, room, over, strict=True)
    )  # fmt: skip
    return [f"**Headroom:** all-dense FedAvg − strong-only (no mixed fleet can gain more): {cells}."]
