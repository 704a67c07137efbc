"""The simulated side of a study: a scenario's plans for every tiling, run on the cost model.

Data flows one way: scenario -> plans (one per rank and tiling, from shapes alone, by the
op's spec in the registry) -> simulation on a topology -> one Timeline -> writers.
``mc2sim simulate`` and ``mc2sim sweep`` are this module.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mc2sim._atomic import write_atomic
from mc2sim.model import simulate
from mc2sim.scenario import Scenario
from mc2sim.schedule import Plan, tiling_of
from mc2sim.timeline import Metrics, Timeline, write_all
from mc2sim.topology import Topology, builtin, list_builtin, load

__all__ = [
    "StudyResult",
    "add_verdicts",
    "load_topology",
    "plans_for",
    "simulate_study",
    "write_manifest",
    "write_results",
]


def load_topology(name_or_path: str) -> Topology:
    """A builtin topology by name, or a topology file by path."""
    if name_or_path in list_builtin():
        return builtin(name_or_path)
    return load(name_or_path)


def plans_for(scenario: Scenario, world: int, tiling: None | str | int) -> dict[int, Plan]:
    """Every rank's plan of ``scenario`` on ``world`` ranks under ``tiling`` (its op's spec).

    Args:
        scenario: the study.
        world: ranks to plan for.
        tiling: one of the scenario's tilings.

    Returns:
        rank -> plan.
    """
    return scenario.spec.plans(scenario, world, tiling_of(tiling))


@dataclass(frozen=True, kw_only=True, slots=True)
class StudyResult:
    """A scenario simulated under each of its tilings."""

    scenario: Scenario
    """The study."""
    topology: Topology
    """The machine, resized to ``world`` ranks."""
    world: int
    """Ranks simulated."""
    timeline: Timeline
    """Every tiling's runs, all ranks (source ``simulated``)."""
    runs: Mapping[str, str]
    """Tiling, in words -> its run label in ``timeline``."""
    baseline: str
    """Run label of the serial plan."""

    def metrics(self) -> dict[str, Metrics]:
        """Tiling, in words -> its metrics against the serial plan."""
        base = self.timeline.for_run(self.baseline)
        return {
            tiling: self.timeline.for_run(run).metrics(baseline=base)
            for tiling, run in self.runs.items()
        }


def simulate_study(scenario: Scenario, topology: Topology, world: int | None = None) -> StudyResult:
    """Simulate ``scenario`` under each of its tilings on ``topology``.

    Args:
        scenario: the study.
        topology: the machine (resized to the world size if needed).
        world: ranks; default the scenario's.

    Returns:
        The timelines and metrics of every tiling.
    """
    ranks = scenario.world_size(world)
    sized = topology if topology.world_size == ranks else topology.with_world(ranks)
    timelines = []
    runs: dict[str, str] = {}
    baseline = ""
    for tiling in scenario.tilings:
        plans = plans_for(scenario, ranks, tiling)
        described = plans[0].tiling
        if described in runs:  # e.g. None and "hardware": the same plan, simulated once
            continue
        timeline = simulate(plans, sized)
        runs[described] = timeline.runs()[0]
        if described == "serial":
            baseline = runs[described]
        timelines.append(timeline)
    merged = Timeline.merge(*timelines, meta={"scenario": scenario.name, "world_size": ranks})
    return StudyResult(
        scenario=scenario,
        topology=sized,
        world=ranks,
        timeline=merged,
        runs=runs,
        baseline=baseline,
    )


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _version_of(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def write_manifest(
    directory: Path,
    scenario: Scenario,
    *,
    topology: str,
    world: int,
    source: str,
    hosts: list[str] | None = None,
) -> Path:
    """Write ``manifest.json``: scenario, topology, seeds, versions, revision, world, hosts."""
    manifest = {
        "scenario": scenario.name,
        "op": str(scenario.op),
        "shape": scenario.effective_shape(),
        "scale": scenario.scale,
        "tilings": [str(t) for t in scenario.tilings],
        "routing": {"kind": str(scenario.routing.kind), "seed": scenario.routing.seed,
                    "skew": scenario.routing.skew},
        "topology": topology,
        "world_size": world,
        "source": source,
        "hosts": hosts or [socket.gethostname()],
        "git_revision": _git_revision(),
        "versions": {p: _version_of(p) for p in ("mc2sim", "torch", "numpy", "mpi4py")},
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    return _write_json(directory / "manifest.json", manifest)


def _write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", parents=True)


def write_results(result: StudyResult, directory: Path) -> dict[str, Path]:
    """Write manifest, summary, tasks CSV and Chrome trace of a simulated study."""
    paths = write_all(result.timeline, directory, baseline_run=result.baseline)
    paths["manifest"] = write_manifest(
        directory,
        result.scenario,
        topology=result.topology.name,
        world=result.world,
        source="simulated",
    )
    return paths


def add_verdicts(summary: Path, verdicts: Mapping[str, Any]) -> Path:
    """Add each run's golden verdicts to a ``summary.json`` (rewritten atomically)."""
    data = json.loads(summary.read_text())
    data["golden"] = verdicts
    return _write_json(summary, data)
