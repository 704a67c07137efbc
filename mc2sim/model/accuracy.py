"""How far a simulated time is from a measured one: the one error measure of the project.

The error of one pair is ``max / min - 1`` (symmetric: 2x too fast and 2x too slow are both
100%); a set of pairs is summarised by the geometric mean of the ratios, minus one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["QUIET_QUANTILE", "geomean_of", "model_error", "typical"]

QUIET_QUANTILE = 0.25
"""The quantile of a call's rounds that stands for its time (:func:`typical`)."""


def typical(values: Sequence[float]) -> float:
    """A call's time over its rounds: their lower quartile (linear between order statistics).

    The machine's other users only ever add time to a round (a stolen time slice, a cache
    flushed by another job), so the quiet end of the rounds is the call's own time; the
    lower quartile rather than the minimum, so one lucky round does not set it. The fit and
    the validation both take it; ``validate-model`` prints the medians' error too.

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("typical() of no values")
    ordered = sorted(values)
    at = QUIET_QUANTILE * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def model_error(measured_s: float, simulated_s: float) -> float:
    """``max / min - 1`` of two positive times (0 when equal)."""
    return max(measured_s, simulated_s) / min(measured_s, simulated_s) - 1


def geomean_of(errors: Iterable[float]) -> float:
    """``exp(mean(log(1 + error))) - 1`` over ``errors``; 0.0 when there are none."""
    logs = [math.log1p(e) for e in errors]
    return math.exp(sum(logs) / len(logs)) - 1 if logs else 0.0
