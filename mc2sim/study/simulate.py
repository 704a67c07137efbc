"""The simulated side of a study: a scenario's plans for every tiling, run on the cost model.

Data flows one way: scenario -> plans (one per rank and tiling, from shapes alone, by the
op's spec in the registry) -> simulation on a topology -> one Timeline -> writers.
``mc2sim simulate`` and ``mc2sim sweep`` are this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mc2sim import results
from mc2sim.model.heterogeneity import Arrivals, Straggler, rank_waits
from mc2sim.model.simulator import lockstep_applies, simulate_arrays, simulate_run
from mc2sim.results import RankRow
from mc2sim.scenario import Scenario
from mc2sim.schedule import Plan, tiling_of
from mc2sim.schedule.plan import PlanArrays
from mc2sim.timeline import Metrics, Outline, RunColumns, RunKey, Source, Timeline
from mc2sim.topology import Topology

__all__ = [
    "PER_TASK_RECORDS",
    "StudyResult",
    "arrays_for",
    "manifest_of",
    "plans_for",
    "encode_study",
    "simulate_study",
    "write_results",
]


def arrays_for(
    scenario: Scenario, topology: Topology, tiling: None | str | int
) -> PlanArrays | None:
    """Every rank's plan of ``scenario`` at once as arrays, where its op plans this world so.

    Only where the ranks run in lockstep on ``topology`` (:func:`lockstep_applies`); None
    where the plans are made one per rank (:func:`plans_for`).
    """
    if not lockstep_applies(topology):
        return None
    dims = [d.ranks for d in topology.network]
    return scenario.spec.plan_arrays(scenario, topology.world_size, tiling_of(tiling), dims)


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


PER_TASK_RECORDS = 200_000
"""``--per-task auto`` writes ``tasks.csv`` and ``trace.json`` up to this many task records
(about 1024 ranks of an MoE study's four tilings); past it a study of thousands of ranks
would spend most of its time, and hundreds of MiB, on them."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StudyResult:
    """A scenario simulated under each of its tilings."""

    scenario: Scenario
    """The study."""
    topology: Topology
    """The machine, resized to ``world`` ranks."""
    world: int
    """Ranks simulated."""
    expected_routing: bool = False
    """Whether the MoE routing was read in expectation rather than drawn token by token
    (above :data:`mc2sim.ops.moe_spec.EXPECTED_ROUTING_RANKS` ranks)."""
    parts: tuple[RunColumns | Timeline, ...]
    """Each tiling's run, in order: as columns where the ranks ran in lockstep
    (:func:`mc2sim.model.simulator.simulate_run`), else as a timeline."""
    runs: Mapping[str, RunKey]
    """Tiling, in words -> its run."""
    baseline: RunKey
    """The serial plan's run."""
    by_run: Mapping[RunKey, Metrics]
    """Each run's metrics against the serial plan's, computed once (the table and the files
    both use them)."""
    ranks: tuple[RankRow, ...] = ()
    """With stragglers: every rank of every tiling, against the study without them."""

    @property
    def meta(self) -> dict[str, object]:
        """The timeline's meta (``routing: expected`` where the routing was read so)."""
        meta: dict[str, object] = {"scenario": self.scenario.name, "world_size": self.world}
        if self.expected_routing:
            meta["routing"] = "expected"
        return meta

    @property
    def records(self) -> int:
        """How many task records the runs hold."""
        return sum(
            p.start_s.size if isinstance(p, RunColumns) else len(p.records) for p in self.parts
        )

    @property
    def timeline(self) -> Timeline:
        """Every tiling's runs, all ranks (source ``simulated``), as records (made on demand)."""
        return Timeline.merge(*(_timeline(p) for p in self.parts), meta=self.meta)

    def outline(self) -> Outline:
        """The runs and ranks of :attr:`timeline`, without its records."""
        return Outline(
            source=Source.SIMULATED,
            run_keys=tuple(self.runs.values()),
            world=self.world,
            meta=self.meta,
        )

    def metrics(self) -> dict[str, Metrics]:
        """Tiling, in words -> its metrics against the serial plan."""
        return {tiling: self.by_run[run] for tiling, run in self.runs.items()}


def _timeline(part: RunColumns | Timeline) -> Timeline:
    return part.timeline() if isinstance(part, RunColumns) else part


def _metrics_by_run(
    parts: Sequence[RunColumns | Timeline], baseline: RunKey
) -> dict[RunKey, Metrics]:
    """Each run's metrics against the baseline run (columns where every run has them)."""
    if all(isinstance(p, RunColumns) for p in parts):
        columns = {p.run: p for p in parts if isinstance(p, RunColumns)}
        base = columns[baseline].baseline()  # read once for every run
        return {run: c.metrics(baseline=base) for run, c in columns.items()}
    merged = Timeline.merge(*(_timeline(p) for p in parts), meta={})
    return merged.metrics_by_run(baseline)


def _run_of(part: RunColumns | Timeline) -> RunKey:
    return part.run if isinstance(part, RunColumns) else part.runs()[0]


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
    parts: list[RunColumns | Timeline] = []
    runs: dict[str, RunKey] = {}
    rows: list[RankRow] = []
    expected = False
    for tiling in scenario.tilings:
        arrays = arrays_for(scenario, sized, tiling)
        plans: PlanArrays | dict[int, Plan]
        if arrays is None:
            plans = plans_for(scenario, ranks, tiling)
            described = plans[0].tiling
        else:
            plans, described, expected = arrays, arrays.template.tiling, True
        if described in runs:  # e.g. None and "hardware": the same plan, simulated once
            continue
        part, arrivals = _simulated(plans, sized, scenario.stragglers)
        runs[described] = _run_of(part)
        parts.append(part)
        if scenario.stragglers:
            rows += _rank_rows(scenario, described, (part, arrivals), _simulated(plans, sized))
    baseline = runs["serial"]  # every scenario has the serial baseline
    return StudyResult(
        scenario=scenario,
        topology=sized,
        world=ranks,
        expected_routing=expected,
        parts=tuple(parts),
        runs=runs,
        baseline=baseline,
        by_run=_metrics_by_run(parts, baseline),
        ranks=tuple(rows),
    )


def _simulated(
    plans: PlanArrays | dict[int, Plan],
    topology: Topology,
    stragglers: Mapping[int, Straggler] | None = None,
) -> tuple[RunColumns | Timeline, Arrivals]:
    """One tiling's run, from its plans as arrays or one per rank."""
    if isinstance(plans, PlanArrays):
        return simulate_arrays(plans, topology, stragglers)
    return simulate_run(plans, topology, stragglers)


def _rank_rows(
    scenario: Scenario,
    tiling: str,
    straggling: tuple[RunColumns | Timeline, Arrivals],
    nominal: tuple[RunColumns | Timeline, Arrivals],
) -> list[RankRow]:
    """Every rank's row of one tiling: its slowdowns, exposed comm and waits, both ways."""
    (run, arrivals), (base_run, base_arrivals) = straggling, nominal
    per_rank = run.metrics().per_rank
    base_per_rank = base_run.metrics().per_rank
    waits, base_waits = rank_waits(arrivals), rank_waits(base_arrivals)
    rows = []
    for m, base in zip(per_rank, base_per_rank, strict=True):
        r = m.rank
        s = scenario.stragglers.get(r)
        rows.append(
            RankRow(
                tiling=tiling,
                rank=r,
                compute=s.compute if s else 1.0,
                link=s.link if s else 1.0,
                late_us=s.late_us if s else 0.0,
                total_s=m.total_s,
                exposed_comm_s=m.exposed_comm_s,
                nominal_exposed_comm_s=base.exposed_comm_s,
                added_exposed_s=m.exposed_comm_s - base.exposed_comm_s,
                wait_s=float(waits.wait_s[r]),
                nominal_wait_s=float(base_waits.wait_s[r]),
                waited_for=int(waits.waited_for[r]),
                last=int(waits.last[r]),
            )
        )
    return rows


def manifest_of(
    scenario: Scenario,
    *,
    topology: str,
    world: int,
    source: str,
    hosts: Sequence[str] | None = None,
    scenario_path: str | os.PathLike[str] | None = None,
    argv: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    devices: Sequence[str] = (),
    backend: str | None = None,
    probe_tflops: float | None = None,
) -> results.Manifest:
    """The manifest of a results folder of ``scenario`` (:func:`mc2sim.results.collect_manifest`).

    Args:
        scenario: the study.
        topology: the topology's name (``"measured"`` for a real run).
        world: ranks.
        source: ``"measured"`` or ``"simulated"``.
        hosts: every rank's host; default this host.
        scenario_path: the scenario file read, if any.
        argv: the command line; default ``sys.argv``.
        overrides: the ``--set`` strings applied.
        devices: every rank's device (a measured run).
        backend: the collectives' transport (a measured run).
        probe_tflops: the machine's speed probe after a measured run's rounds.

    Returns:
        The manifest.
    """
    routing = scenario.routing
    return results.collect_manifest(
        scenario=scenario.name, scenario_path=scenario_path, op=scenario.op,
        shape=scenario.effective_shape(), dtype=scenario.dtype, quant=scenario.quant,
        standard=scenario.standard, repetitions=scenario.repetitions, scale=scenario.scale,
        tilings=scenario.tilings, routing_kind=routing.kind, routing_seed=routing.seed,
        routing_skew=routing.skew, topology=topology, world_size=world, source=source,
        seeds={"routing": routing.seed}, hosts=hosts, argv=argv, overrides=overrides,
        devices=devices, backend=backend, probe_tflops=probe_tflops,
    )  # fmt: skip


def encode_study(
    result: StudyResult,
    *,
    scenario_path: str | os.PathLike[str] | None = None,
    argv: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    per_task: bool | None = None,
) -> dict[str, bytes]:
    """The results folder of a simulated study as bytes (:func:`mc2sim.results.encode_results`).

    Args:
        result: the study simulated.
        scenario_path: the scenario file read, if any.
        argv: the command line; default ``sys.argv``.
        overrides: the ``--set`` strings applied.
        per_task: write ``tasks.csv`` and ``trace.json`` (a record per task and rank);
            without them the folder has the summary, the manifest and any ``ranks.csv``.
            None (a sweep's points): up to :data:`PER_TASK_RECORDS` task records.

    Returns:
        File name -> bytes, ready for :func:`mc2sim.results.write_encoded`.
    """
    manifest = manifest_of(
        result.scenario, topology=result.topology.name, world=result.world, source="simulated",
        scenario_path=scenario_path, argv=argv, overrides=overrides,
    )  # fmt: skip
    if per_task is None:
        per_task = result.records <= PER_TASK_RECORDS
    return results.encode_results(
        timeline=result.timeline if per_task else result.outline(), baseline=result.baseline,
        manifest=manifest, ranks=result.ranks, metrics=result.by_run,
    )  # fmt: skip


def write_results(
    result: StudyResult,
    directory: Path,
    *,
    scenario_path: str | os.PathLike[str] | None = None,
    argv: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    per_task: bool | None = None,
) -> dict[str, Path]:
    """Write the results folder of a simulated study (see :func:`mc2sim.results.write_results`).

    ``per_task``: as :func:`encode_study`.
    """
    files = encode_study(
        result, scenario_path=scenario_path, argv=argv, overrides=overrides, per_task=per_task
    )
    return results.write_encoded(directory, files)
