"""The lockstep simulator against the event engine, its oracle.

Where overlapped compute and transfers do not slow each other, :func:`simulate_run` advances
every rank at once (numpy over ranks) and returns the run as columns. The event engine runs
the same plans one event at a time (``lockstep=False``); every record, every arrival and every
metric must come out the same, to the last bit, on every op and tiling, on a stream and with
concurrent collectives, on capped wires, with stragglers of every kind.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mc2sim.cli import main
from mc2sim.model.heterogeneity import Straggler
from mc2sim.model.simulator import lockstep_applies, simulate_run
from mc2sim.results import read_results
from mc2sim.schedule import Plan
from mc2sim.study import simulate as study_simulate
from mc2sim.timeline import RunColumns, Timeline, busy_time, busy_times
from mc2sim.topology import Contention, Topology, builtin

from .test_model import (
    MOE_OPS,
    OPS,
    dense_plans,
    dim,
    machine,
    moe_plans,
    sparse_routing,
    two_level,
)

CASES = [
    *[(op, tiling) for op in OPS for tiling in (None, "serial", 3)],
    *[(op, tiling) for op in MOE_OPS for tiling in (None, "serial", 2)],
]


def plans_of(op: str, tiling: str | int | None) -> dict[int, Plan]:
    if op in OPS:
        return dense_plans(op, tiling, 8, m=64)
    return moe_plans(op, tiling, sparse_routing(8, 3, seed=2))


def both(
    plans: dict[int, Plan], topology: Topology, stragglers: dict[int, Straggler] | None = None
) -> tuple[RunColumns, Timeline, np.ndarray, np.ndarray]:
    """The lockstep run and the event engine's, and both engines' arrivals (queued, started)."""
    columns, arrivals = simulate_run(plans, topology, stragglers)
    events, oracle = simulate_run(plans, topology, stragglers, lockstep=False)
    assert isinstance(columns, RunColumns) and isinstance(events, Timeline)
    np.testing.assert_array_equal(arrivals.queued_s, oracle.queued_s)
    np.testing.assert_array_equal(arrivals.started_s, oracle.started_s)
    return columns, events, arrivals.queued_s, oracle.queued_s


def same_records(columns: RunColumns, events: Timeline) -> None:
    mine = columns.timeline(meta=dict(events.meta))
    key = lambda r: (r.rank, r.task)  # noqa: E731
    assert sorted(mine.records, key=key) == sorted(events.records, key=key)
    assert [r.end_s for r in mine.records] == sorted(r.end_s for r in mine.records)


def concurrent_capped() -> Topology:
    """Two levels, MPI-like concurrent collectives, the outer wire capped below its ranks'."""
    inner, outer = dim("full_mesh", 4, 100.0, 1.0), dim("switch", 2, 10.0, 10.0)
    return machine(inner, replace(outer, link_gbps=4.0), concurrent=True)


def reductions_alone() -> Topology:
    """:func:`concurrent_capped`, its reductions and gathers one at a time."""
    topology = concurrent_capped()
    alone = ("allgather", "allreduce", "reduce_scatter")
    return replace(topology, device=replace(topology.device, one_at_a_time=alone))


def warm() -> Topology:
    """Two levels, a call's later tasks of a kind faster (one kind saving more than it takes)."""
    topology = two_level()
    saved = {"matmul": 3.0, "grouped_matmul": 1e9, "pack": 0.5, "reduce": 1.0}
    return replace(topology, device=replace(topology.device, warm_us=saved, launch_us=2.0))


TOPOLOGIES: dict[str, Callable[[], Topology]] = {
    "warm": warm,
    "stream": two_level,
    "concurrent-capped": concurrent_capped,
    "reductions-alone": reductions_alone,
    "ring": lambda: machine(dim("ring", 8, 50.0, 2.0)),
}


@pytest.mark.parametrize("where", sorted(TOPOLOGIES))
@pytest.mark.parametrize(("op", "tiling"), CASES, ids=lambda v: str(v))
def test_lockstep_is_the_event_engine_to_the_bit(
    where: str, op: str, tiling: str | int | None
) -> None:
    plans = plans_of(op, tiling)
    topology = TOPOLOGIES[where]()
    columns, events, *_ = both(plans, topology)
    same_records(columns, events)
    base_columns, base_events, *_ = both(plans_of(op, "serial"), topology)
    assert columns.metrics(baseline=base_columns) == events.metrics(baseline=base_events)
    assert columns.metrics() == events.metrics()


@pytest.mark.parametrize(
    "stragglers",
    [
        {3: Straggler(compute=1.5)},
        {0: Straggler(late_us=7.0), 5: Straggler(compute=2.0, late_us=3.0)},
        {6: Straggler(link=0.25)},
        {1: Straggler(compute=1.25, link=0.5, late_us=1.0), 4: Straggler(link=0.75)},
    ],
    ids=["compute", "late", "link", "all"],
)
@pytest.mark.parametrize(("op", "tiling"), CASES[::2], ids=lambda v: str(v))
def test_lockstep_stragglers_are_the_event_engines(
    stragglers: dict[int, Straggler], op: str, tiling: str | int | None
) -> None:
    columns, events, *_ = both(plans_of(op, tiling), two_level(), stragglers)
    same_records(columns, events)
    assert columns.metrics() == events.metrics()


def test_shipped_topologies_run_in_lockstep_only_without_contention() -> None:
    for name in ("atlas_a3_superpod_384", "atlas_a2_8p", "h200_8x_nvlink"):
        assert lockstep_applies(builtin(name))
    slowed = replace(two_level(), contention=Contention(compute_slowdown=1.5))
    polled = replace(two_level(), contention=Contention(polled=True))
    assert not lockstep_applies(slowed) and not lockstep_applies(polled)
    part, _ = simulate_run(plans_of("gmm_alltoallv", 2), slowed)
    assert isinstance(part, Timeline)  # the event engine ran it


def test_busy_times_is_busy_time_row_by_row() -> None:
    rng = random.Random(5)
    rows, width = 40, 9
    start = np.empty((rows, width))
    end = np.empty((rows, width))
    for r in range(rows):
        for i in range(width):
            s = rng.choice([0.0, 0.5, 1.0, rng.random() * 3])  # ties and touching ends too
            start[r, i], end[r, i] = s, s + rng.choice([0.0, 0.5, rng.random()])
    got = busy_times(start, end)
    for r in range(rows):
        assert got[r] == busy_time(zip(start[r], end[r], strict=True))
    assert busy_times(start[:, :0], end[:, :0]).tolist() == [0.0] * rows


def test_per_task_files_are_optional_and_the_summary_is_the_same(tmp_path: Path) -> None:
    args = ["simulate", "seed_gmm_alltoallv_ep8", "--set", "scale=small", "--no-plots"]
    assert main([*args, "--out", str(tmp_path / "all"), "--per-task", "yes"]) == 0
    assert main([*args, "--out", str(tmp_path / "none"), "--per-task", "no"]) == 0
    full, bare = read_results(tmp_path / "all"), read_results(tmp_path / "none")
    assert (tmp_path / "all" / "tasks.csv").exists() and (tmp_path / "all" / "trace.json").exists()
    assert not (tmp_path / "none" / "tasks.csv").exists()
    assert not (tmp_path / "none" / "trace.json").exists()
    assert bare.timeline is None and full.timeline is not None
    summary = (tmp_path / "all" / "summary.json").read_bytes()
    assert summary == (tmp_path / "none" / "summary.json").read_bytes()


def test_auto_leaves_the_per_task_files_out_past_its_limit_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(study_simulate, "PER_TASK_RECORDS", 10)
    out = tmp_path / "auto"
    args = ["simulate", "seed_gmm_alltoallv_ep8", "--set", "scale=small", "--no-plots"]
    assert main([*args, "--out", str(out)]) == 0
    assert not (out / "tasks.csv").exists()
    printed = capsys.readouterr().out
    assert "per-task files left out:" in printed and "--per-task yes" in printed


def test_ranks_running_the_same_tasks_share_one_plan() -> None:
    from mc2sim.scenario import builtin
    from mc2sim.schedule import tiling_of

    scenario = builtin("llama70b_tp8_prefill")
    plans = scenario.spec.plans(scenario, 16, tiling_of(4))
    assert [p.rank for p in plans.values()] == list(range(16))
    assert all(p.tasks is plans[0].tasks for p in plans.values())


def test_sparse_ring_steps_simulate_as_dense_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from mc2sim.schedule import builders

    world = builders.DENSE_SHIFT_LIMIT + 8
    topology = machine(dim("full_mesh", 8, 100.0, 1.0), dim("switch", world // 8, 10.0, 10.0))
    sparse = dense_plans("all_gather_matmul", 2, world, m=64)
    monkeypatch.setattr(builders, "DENSE_SHIFT_LIMIT", world)
    dense = dense_plans("all_gather_matmul", 2, world, m=64)
    assert isinstance(dense[0].tasks[1].send_splits, tuple)
    assert not isinstance(sparse[0].tasks[1].send_splits, tuple)
    a, _ = simulate_run(sparse, topology)
    b, _ = simulate_run(dense, topology)
    assert isinstance(a, RunColumns) and isinstance(b, RunColumns)
    assert a.metrics() == b.metrics()
    np.testing.assert_array_equal(a.intra_bytes, b.intra_bytes)
    np.testing.assert_array_equal(a.inter_bytes, b.inter_bytes)


def test_a_ring_too_long_to_simulate_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["simulate", "llama70b_tp8_allgather", "--what-if", "--ranks", "1024", "--no-plots"]
    assert main([*args, "--set", "tilings=serial,4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ranks=1024" in err[0] and "tasks a rank" in err[0]
    assert "4,000,000" in err[0]
