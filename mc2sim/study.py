"""A study of one scenario: its plans for every tiling, simulated, written to a results folder.

Data flows one way: scenario -> plans (one per rank and tiling, from shapes alone) ->
simulation on a topology -> one Timeline -> writers. ``mc2sim simulate`` is this module.
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
from mc2sim.routing import route
from mc2sim.scenario import OpName, QuantMode, Scenario
from mc2sim.schedule import (
    Plan,
    TaskKind,
    plan_all_gather_matmul,
    plan_alltoallv_gmm,
    plan_gmm_alltoallv,
    plan_matmul_reduce_scatter,
    plan_mm_all_reduce,
    tiling_of,
)
from mc2sim.schedule.builders import IfaShape, MatmulShape, MoeShape, plan_ifa
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

DENSE_ROUTING_LIMIT = 64
"""Above this many ranks MoE counts are kept sparse (``route(..., sparse=True)``) to save
memory; the counts are the same draw either way, so crossing it never changes a workload."""

_ELEM = {"float16": 2, "bfloat16": 2}


def load_topology(name_or_path: str) -> Topology:
    """A builtin topology by name, or a topology file by path."""
    if name_or_path in list_builtin():
        return builtin(name_or_path)
    return load(name_or_path)


def _moe_shape(scenario: Scenario, send: Any, recv: Any) -> MoeShape:
    shape = scenario.effective_shape()
    shared = None
    if "h2" in shape and "n2" in shape:
        shared = (shape["tokens"], shape["h2"], shape["n2"])
    return MoeShape(
        e=shape["experts_per_rank"],
        send=send,
        recv=recv,
        h1=shape["h1"],
        n1=shape["n1"],
        elem_bytes=_ELEM[scenario.dtype],
        shared=shared,
        dtype=scenario.dtype,
    )


def plans_for(scenario: Scenario, world: int, tiling: None | str | int) -> dict[int, Plan]:
    """Every rank's plan of ``scenario`` on ``world`` ranks under ``tiling``.

    Args:
        scenario: the study.
        world: ranks to plan for.
        tiling: one of the scenario's tilings.

    Returns:
        rank -> plan.
    """
    shape = scenario.effective_shape()
    chosen = tiling_of(tiling)
    op = scenario.op
    if op in (OpName.GMM_ALLTOALLV, OpName.ALLTOALLV_GMM):
        direction = "combine" if op is OpName.GMM_ALLTOALLV else "dispatch"
        sizes = {
            "world_size": world,
            "experts_per_rank": shape["experts_per_rank"],
            "tokens_per_rank": shape["tokens"],
            "top_k": shape["top_k"],
        }
        builder = plan_gmm_alltoallv if op is OpName.GMM_ALLTOALLV else plan_alltoallv_gmm
        if world > DENSE_ROUTING_LIMIT:
            sparse = route(scenario.routing, **sizes, sparse=True)
            return {
                r: builder(
                    shape=_moe_shape(
                        scenario,
                        sparse.send_counts(r, direction),
                        sparse.recv_counts(r, direction),
                    ),
                    tiling=chosen,
                    rank=r,
                )
                for r in range(world)
            }
        table = route(scenario.routing, **sizes, sparse=False)
        return {
            r: builder(
                shape=_moe_shape(
                    scenario,
                    tuple(table.send_counts(r, direction)),
                    tuple(table.recv_counts(r, direction)),
                ),
                tiling=chosen,
                rank=r,
            )
            for r in range(world)
        }
    elem = _ELEM[scenario.dtype]
    if op is OpName.IFA:
        attention = IfaShape(
            heads=shape["heads"],
            kv_heads=shape["kv_heads"],
            head_dim=shape["head_dim"],
            kv_len=shape["kv_len"],
            elem_bytes=elem,
            dtype=scenario.dtype,
        )
        batch = shape["batch"]
        return {
            r: plan_ifa(batch=batch, shape=attention, tiling=chosen, rank=r, world_size=world)
            for r in range(world)
        }
    quant = scenario.quant
    in_bytes = 1 if quant is QuantMode.W8A8 else elem
    w_bytes = {QuantMode.WEIGHT_INT4: 0.5, QuantMode.WEIGHT_INT8: 1.0, QuantMode.W8A8: 1.0}.get(
        quant, float(elem)
    )
    dense = MatmulShape(
        k=shape["k"],
        n=shape["n"],
        in_bytes=in_bytes,
        w_bytes=w_bytes,
        out_bytes=elem,
        dtype=scenario.dtype,
    )
    if op is OpName.MM_ALL_REDUCE:
        kind = {
            QuantMode.NONE: TaskKind.MATMUL,
            QuantMode.W8A8: TaskKind.QUANT_MATMUL,
        }.get(quant, TaskKind.WEIGHT_QUANT_MATMUL)
        return {
            r: plan_mm_all_reduce(
                m=shape["m"], shape=dense, kind=kind, tiling=chosen, rank=r, world_size=world
            )
            for r in range(world)
        }
    pair = plan_all_gather_matmul if op is OpName.ALL_GATHER_MATMUL else plan_matmul_reduce_scatter
    return {
        r: pair(m=shape["m"], shape=dense, tiling=chosen, rank=r, world_size=world)
        for r in range(world)
    }


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
