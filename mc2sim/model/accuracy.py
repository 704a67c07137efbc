"""How far a simulated time is from a measured one: the one error measure of the project.

The error of one pair is ``max / min - 1`` (symmetric: 2x too fast and 2x too slow are both
100%); a set of pairs is summarised by the geometric mean of the ratios, minus one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["geomean_of", "model_error"]


def model_error(measured_s: float, simulated_s: float) -> float:
    """``max / min - 1`` of two positive times (0 when equal)."""
    return max(measured_s, simulated_s) / min(measured_s, simulated_s) - 1


def geomean_of(errors: Iterable[float]) -> float:
    """``exp(mean(log(1 + error))) - 1`` over ``errors``; 0.0 when there are none."""
    logs = [math.log1p(e) for e in errors]
    return math.exp(sum(logs) / len(logs)) - 1 if logs else 0.0
