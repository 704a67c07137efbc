"""Metrics pinned to exact values, on timelines built by hand and on the demo's simulation.

Every expected number below is worked out on paper in the comments (times are multiples of
1/4 s, so the float arithmetic is exact and ``==`` is the right comparison). The baselines
here overlap their communication with compute (as the MoE ops' serial plans do while the
shared expert runs), so t_pure = the baseline's comm time differs from its exposed comm.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mc2sim.scenario import builtin
from mc2sim.study import simulate_study
from mc2sim.timeline import Metrics, RunKey, Stream, TaskRecord, Timeline
from mc2sim.topology import CoreSharing, load


def rec(rank: int, stream: str, start: float, end: float, run: RunKey, task: int) -> TaskRecord:
    kind = "matmul" if stream == "compute" else "alltoallv"
    return TaskRecord(
        rank=rank, run=run, task=task, name=f"{kind}[{task}]", stream=Stream(stream),
        kind=kind, start_s=start, end_s=end,
    )  # fmt: skip


def timeline(run: RunKey, *spans: tuple[int, str, float, float]) -> Timeline:
    return Timeline(records=tuple(rec(r, s, a, b, run, i) for i, (r, s, a, b) in enumerate(spans)))


# A serial baseline whose AlltoAllv overlaps the shared expert's matmul, on two ranks:
#   rank 0: compute [0, 3], comm [2, 6]      -> total 6, compute 3, comm 4, exposed 3
#   rank 1: compute [0, 2], comm [1, 5.5]    -> total 5.5, compute 2, comm 4.5, exposed 3.5
SERIAL = timeline(
    RunKey(op="gmm_alltoallv", tiling="serial"),
    (0, "compute", 0, 3), (0, "comm", 2, 6),
    (1, "compute", 0, 2), (1, "comm", 1, 5.5),
)  # fmt: skip

# The tiled run of the same op:
#   rank 0: compute [0, 1.5] u [1.5, 3], comm [1, 2.5] u [2.5, 4]
#           -> total 4, compute 3, comm 3, exposed 1
#   rank 1: compute [0, 1] u [2, 3], comm [0.5, 2.5], idle [3, 3.25], comm [3.25, 4.5]
#           -> total 4.5, compute 2, comm 3.25, exposed 2.5 (the idle quarter included)
TILED = timeline(
    RunKey(op="gmm_alltoallv", tiling="tiles=2"),
    (0, "compute", 0, 1.5), (0, "compute", 1.5, 3), (0, "comm", 1, 2.5), (0, "comm", 2.5, 4),
    (1, "compute", 0, 1), (1, "compute", 2, 3), (1, "comm", 0.5, 2.5), (1, "comm", 3.25, 4.5),
)  # fmt: skip


def test_overlap_is_measured_against_the_baselines_comm_time_not_its_exposed_comm() -> None:
    m = TILED.metrics(baseline=SERIAL)
    zero, one = m.per_rank
    # t_pure is the baseline rank's comm time: 4 and 4.5 (its exposed comm is 3 and 3.5)
    assert (zero.pure_comm_s, one.pure_comm_s) == (4.0, 4.5)
    # rank 0: 100 * (1 - (4 - 3) / 4) = 75; against exposed comm it would be 66.67
    assert zero.overlap_pct == 75.0
    # rank 1: 100 * (1 - (4.5 - 2) / 4.5) = 100 * 2 / 4.5 = 44.44...
    assert one.overlap_pct == pytest.approx(400 / 9, abs=1e-12)
    # the job's figures are the critical (slowest) rank's: rank 1
    assert m.critical_rank == 1
    assert m.overlap_pct == one.overlap_pct


def test_exposed_comm_counts_idle_gaps_and_overlapping_tasks_once() -> None:
    m = TILED.metrics(baseline=SERIAL)
    zero, one = m.per_rank
    assert (zero.total_s, zero.compute_s, zero.comm_s, zero.exposed_comm_s) == (4, 3, 3, 1)
    assert (one.total_s, one.compute_s, one.comm_s, one.exposed_comm_s) == (4.5, 2, 3.25, 2.5)
    assert (m.total_s, m.compute_s, m.comm_s, m.exposed_comm_s) == (4.5, 2, 3.25, 2.5)
    # without a baseline each rank's own comm time is t_pure: 100 * (1 - 1/3), 100 * (1 - 2.5/3.25)
    alone = TILED.metrics()
    assert alone.per_rank[0].overlap_pct == pytest.approx(200 / 3, abs=1e-12)
    assert alone.per_rank[1].overlap_pct == pytest.approx(100 * 0.75 / 3.25, abs=1e-12)


def test_speedup_divides_the_slowest_baseline_rank_by_the_slowest_tiled_rank() -> None:
    # baseline: rank 0 is the slower (6 > 5.5); tiled: rank 1 (4.5 > 4). 6 / 4.5 = 4/3
    assert TILED.metrics(baseline=SERIAL).speedup == pytest.approx(4 / 3, abs=1e-15)
    assert SERIAL.metrics(baseline=SERIAL).speedup == 1.0
    assert TILED.metrics().speedup is None


def test_fused_over_ideal_is_the_total_over_perfect_overlap_of_compute_and_pure_comm() -> None:
    # the ideal fused op hides the shorter of compute and the pure comm behind the longer:
    # rank 0: 4 / max(3, 4) = 1.0 (ideal); rank 1: 4.5 / max(2, 4.5) = 1.0 as well
    def fused_over_ideal(m: Metrics, rank: int) -> float:
        r = m.per_rank[rank]
        return r.total_s / max(r.compute_s, r.pure_comm_s)

    m = TILED.metrics(baseline=SERIAL)
    assert [fused_over_ideal(m, r) for r in (0, 1)] == [1.0, 1.0]
    # the serial run against itself: rank 0 6 / max(3, 4) = 1.5, rank 1 5.5 / 4.5
    s = SERIAL.metrics(baseline=SERIAL)
    assert fused_over_ideal(s, 0) == 1.5
    assert fused_over_ideal(s, 1) == pytest.approx(11 / 9, abs=1e-15)
    # and its overlap: 100 * (1 - 3/4) = 25 and 100 * (1 - 3.5/4.5) = 22.2...
    assert s.per_rank[0].overlap_pct == 25.0
    assert s.per_rank[1].overlap_pct == pytest.approx(200 / 9, abs=1e-12)


# -- the demo's simulation ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]

# the demo's simulated table on the stored fit (README: `make demo
# DEMO_TOPOLOGY=topologies/this_machine_4ranks.yaml`), as mc2sim prints it: tiling -> total,
# compute, comm, exposed (ms), overlap %, speedup. The scenario's float16 tasks take the fit's
# bfloat16 points' ratios (mc2sim.model.cost.profiled_dtype; the roofline alone before: serial
# 0.963, hardware(per expert) 1.381, experts x 2 2.251, experts x 4 4.013)
DEMO = {
    "serial": "1.274 1.010 0.367 0.264 28.1 1.00",
    "hardware(per expert)": "1.923 1.562 1.340 0.362 1.4 0.66",
    "experts x 2": "3.222 2.693 2.650 0.529 0.0 0.40",
    "experts x 4": "5.847 4.964 5.280 0.883 0.0 0.22",
}


def printed(m: Metrics) -> str:
    """The figures of one table row, formatted as mc2sim's tables print them."""
    ms = [m.total_s, m.compute_s, m.comm_s, m.exposed_comm_s]
    return " ".join([*(f"{v * 1e3:.3f}" for v in ms), f"{m.overlap_pct:.1f}", f"{m.speedup:.2f}"])


def test_the_demo_simulation_prints_the_readmes_figures() -> None:
    scenario = builtin("seed_gmm_alltoallv_ep4", ["scale=small"])
    topology = load(ROOT / "topologies" / "this_machine_4ranks.yaml")
    result = simulate_study(scenario, topology, world=4)
    got = {tiling: printed(m) for tiling, m in result.metrics().items()}
    assert got == DEMO
    # the ranks share the 2 cores by processor sharing (calibrate measured a busy rank at
    # about half a core while the others waited): every rank computes at its share at once,
    # and the serial AlltoAllv runs beside the shared expert's matmul, so less than the
    # exchange is exposed. Every tiling's t_pure is the serial comm of its rank.
    assert topology.device.core_sharing is CoreSharing.PROCESSOR
    metrics = result.metrics()
    serial = metrics["serial"]
    assert serial.exposed_comm_s < serial.comm_s
    for m in metrics.values():
        assert [r.pure_comm_s for r in m.per_rank] == [r.comm_s for r in serial.per_rank]
