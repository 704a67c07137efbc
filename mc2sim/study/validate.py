"""Validate the cost model: the validation scenarios run for real and simulated.

The cases are the tilings of the scenario files in ``scenarios/validation/`` (a user adds a
case by adding a file), or of the files a user names (``validate-model --cases``:
:func:`scenario_files`, :func:`held_out`), none of which may have the op, quantisation and
shape of a call ``calibrate`` fits on. The real side runs each case on the ranks at hand
(under mpiexec) through the one measurement protocol
(:func:`mc2sim.study.measure.measure_rounds`); the simulated side runs every rank's plan,
built by the op's spec, on a topology. Both compare the same thing: the span of the plan's
execution on the slowest rank (``Timeline.metrics().total_s``). The error of a case is
``max(sim, real) / min(sim, real) - 1``; the sweep's error is the geometric mean of those
ratios, minus one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mc2sim._yaml import shipped_dir, shipped_names
from mc2sim.comm import Communicator
from mc2sim.errors import ParamInvalidError
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
    "held_out",
    "held_out_cases",
    "run_cases",
    "runnable",
    "scenario_files",
    "score_cases",
    "validation_dir",
    "validation_files",
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
    return [load(file) for file in validation_files(folder)]


def validation_files(folder: Path | None = None) -> list[Path]:
    """The ``*.yaml`` files of ``folder`` (default :func:`validation_dir`), by name."""
    where = validation_dir() if folder is None else folder
    return [where / f"{name}.yaml" for name in shipped_names(where)]


def scenario_files(paths: Sequence[str], param: str = "--cases") -> list[Path]:
    """The scenario files ``paths`` name: each a ``*.yaml`` file, or a folder of them.

    A folder gives its ``*.yaml`` files by name; the files keep the order given.

    Raises:
        ParamInvalidError: a path is empty, missing, neither a ``*.yaml`` file nor a folder
            holding one, or names a file given already (also through its folder).
    """
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if not text.strip():
            raise ParamInvalidError(param, text, "must name a scenario file or a folder of them")
        if path.is_dir():
            found = validation_files(path)
            if not found:
                raise ParamInvalidError(param, text, "is a folder without scenario files (*.yaml)")
            files += found
        elif not path.exists():
            raise ParamInvalidError(param, text, "no such file or folder")
        elif path.suffix != ".yaml":
            raise ParamInvalidError(param, text, "must be a scenario file (*.yaml) or a folder")
        else:
            files.append(path)
    seen: dict[Path, Path] = {}
    for file in files:
        earlier = seen.setdefault(file.resolve(), file)
        if earlier is not file:
            raise ParamInvalidError(param, str(file), f"is given twice (also as {earlier})")
    return files


def _study(scenario: Scenario) -> tuple[str, str, tuple[tuple[str, int], ...]]:
    """What makes two scenarios' calls alike for the fit: op, quantisation and shape."""
    return str(scenario.op), str(scenario.quant), tuple(sorted(scenario.shape.items()))


def held_out(files: Sequence[Path], param: str = "--cases") -> list[tuple[Path, Scenario]]:
    """Each file's scenario, checked to be held out from the fit; pure (no MPI).

    Raises:
        ParamInvalidError: a file does not load (the loader's error, naming the file and key);
            two files hold scenarios of one name (their cases would share names); or a
            scenario has the op, quantisation and shape of a calibration scenario, whose
            calls ``calibrate`` fits on (``scenarios/calibration/``).
    """
    from mc2sim.study.calibrate import calibration_dir

    loaded = [(file, load(file)) for file in files]
    fitted = {_study(load(f)): f for f in sorted(calibration_dir().glob("*.yaml"))}
    names: dict[str, Path] = {}
    for file, scenario in loaded:
        other = names.setdefault(scenario.name, file)
        if other is not file:
            rule = f"holds scenario {scenario.name!r}, as {other} does: cases need distinct names"
            raise ParamInvalidError(param, str(file), rule)
        twin = fitted.get(_study(scenario))
        if twin is not None:
            rule = (
                f"has the op, quant and shape of {twin}, which calibrate fits on: "
                "not a held-out case"
            )
            raise ParamInvalidError(param, str(file), rule)
    return loaded


def runnable(
    scenarios: Sequence[tuple[Path, Scenario]], world: int, *, strict: bool, param: str = "--cases"
) -> tuple[list[Scenario], list[str]]:
    """The scenarios that run on ``world`` ranks, and a line for each one that cannot.

    ``strict`` (files the user named): one that cannot run is an error instead.

    Raises:
        ParamInvalidError: ``strict`` and a scenario breaks a rule at ``world`` ranks (its
            shape's, :meth:`Scenario.world_size`); or none of ``scenarios`` runs there.
    """
    kept, skipped = [], []
    for file, scenario in scenarios:
        try:
            scenario.world_size(world)
        except ParamInvalidError as err:
            if strict:
                rule = f"cannot run on {world} ranks: {err}"
                raise ParamInvalidError(param, str(file), rule) from None
            skipped.append(f"{scenario.name} ({err})")
        else:
            kept.append(scenario)
    if not kept:
        where = ", ".join(str(file) for file, _ in scenarios) or "none found"
        raise ParamInvalidError(param, where, f"no scenario of these runs on {world} ranks")
    return kept, skipped


def held_out_cases(comm: Communicator, scenarios: Sequence[Scenario]) -> list[Case]:
    """Every tiling of every scenario of ``scenarios``, on ``comm``'s ranks."""
    return [case for scenario in scenarios for case in cases_of(scenario, comm)]


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
    return held_out_cases(comm, validation_scenarios(folder))


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
