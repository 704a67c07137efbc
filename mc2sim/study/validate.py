"""Validate the cost model: the validation scenarios run for real and simulated.

The cases are the tilings of the scenario files in ``scenarios/validation/`` (a user adds a
case by adding a file). The real side runs each case on the ranks at hand (under mpiexec)
through the one measurement protocol (:func:`mc2sim.study.measure.measure_rounds`); the
simulated side runs every rank's plan, built by the op's spec, on a topology. Both compare
the same thing: the span of the plan's execution on the slowest rank
(``Timeline.metrics().total_s``). The error of a case is ``max(sim, real) / min(sim, real) -
1``; the sweep's error is the geometric mean of those ratios, minus one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mc2sim._yaml import shipped_dir, shipped_names
from mc2sim.comm import Communicator
from mc2sim.model.accuracy import geomean_of, model_error, typical
from mc2sim.model.heterogeneity import Straggler
from mc2sim.model.simulator import simulate_waits
from mc2sim.scenario import Scenario, load
from mc2sim.study.measure import Case, cases_of, measure_rounds
from mc2sim.topology import Topology

__all__ = [
    "CaseResult",
    "default_cases",
    "geomean_error",
    "run_cases",
    "score_cases",
    "validation_dir",
    "validation_scenarios",
]


def validation_dir() -> Path:
    """Return the shipped ``scenarios/validation`` folder."""
    return shipped_dir("scenarios") / "validation"


def validation_scenarios(folder: Path | None = None) -> list[Scenario]:
    """Every scenario file of the validation sweep, by file name.

    Args:
        folder: where the files are (default :func:`validation_dir`).

    Returns:
        The scenarios, sorted by file name.
    """
    where = validation_dir() if folder is None else folder
    return [load(where / f"{name}.yaml") for name in shipped_names(where)]


@dataclass(frozen=True, kw_only=True, slots=True)
class CaseResult:
    """Measured and simulated span of one case."""

    name: str
    """The case."""
    measured_s: float
    """Measured span (slowest rank): the lower quartile of the rounds
    (:func:`mc2sim.model.accuracy.typical`)."""
    median_s: float = 0.0
    """The rounds' median span, for comparison (0: not known)."""
    simulated_s: float
    """Simulated span (slowest rank)."""

    @property
    def error(self) -> float:
        """``max / min - 1`` of the two spans."""
        return model_error(self.measured_s, self.simulated_s)

    @property
    def median_error(self) -> float:
        """``max / min - 1`` of the median measured span and the simulated one."""
        return model_error(self.median_s or self.measured_s, self.simulated_s)


def default_cases(comm: Communicator, folder: Path | None = None) -> list[Case]:
    """The validation sweep: every tiling of every validation scenario, on ``comm``'s ranks."""
    return [case for sc in validation_scenarios(folder) for case in cases_of(sc, comm)]


def run_cases(
    comm: Communicator,
    cases: Sequence[Case],
    topology: Topology,
    *,
    reps: int = 5,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[CaseResult]:
    """Run every case for real (``reps`` rounds: :func:`typical` of the spans) and simulated.

    Every rank calls it and gets the same results.
    """
    rounds = measure_rounds(comm, [c.run for c in cases], reps=reps, progress=progress)
    return score_cases(cases, [[t.metrics().total_s for t in mine] for mine in rounds], topology)


def score_cases(
    cases: Sequence[Case],
    spans: Sequence[Sequence[float]],
    topology: Topology,
    stragglers: Mapping[int, Straggler] | None = None,
) -> list[CaseResult]:
    """Each case's measured span (``spans[i]``: :func:`typical`) against its simulated span.

    ``stragglers``: the job's ranks that compute faster or slower than the topology says
    (:meth:`mc2sim.study.calibrate.Calibration.stragglers`).
    """
    return [
        CaseResult(
            name=case.name,
            measured_s=typical(mine),
            median_s=statistics.median(mine),
            simulated_s=simulate_waits(dict(enumerate(case.plans)), topology, stragglers)[0]
            .metrics()
            .total_s,
        )
        for case, mine in zip(cases, spans, strict=True)
    ]


def geomean_error(results: Sequence[CaseResult]) -> float:
    """Geometric mean of ``max/min`` over the cases, minus one."""
    return geomean_of(r.error for r in results)
