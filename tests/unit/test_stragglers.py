"""Stragglers and uneven hardware in the simulator, against answers worked on paper.

The machine of :mod:`tests.unit.test_simulator_by_hand`: a matmul of ``1e6 * t`` FLOPs takes
t s, links carry 1000 B/s, launches and latencies cost nothing. No expected figure comes from
the simulator: each is derived in the comments.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mc2sim.cli import main
from mc2sim.errors import ParamInvalidError
from mc2sim.model.heterogeneity import Straggler, rank_waits
from mc2sim.model.simulator import simulate_waits
from mc2sim.results import read_results
from mc2sim.scenario import OpName, Scenario, builtin, dump, load

from .test_simulator_by_hand import allreduce, alltoallv, machine, mm, plan, spans

TOPOLOGY = """\
name: paper64
description: round numbers, 64 ranks on one switch
source: tests
device:
  name: paper
  matrix_tflops: {float16: 1.0e-6}
  vector_tflops: 1.0
  memory_gbps: 1.0e+6
  launch_us: 0.0
  reduce_gbps: 0.0
  efficiency: {small_util: 1.0, large_util: 1.0, half_flops: 0.0}
network:
  - {name: switch, kind: switch, ranks: 64, bandwidth_gbps: 1.0e-6, latency_us: 0.0}
contention: {compute_slowdown: 1.0, comm_slowdown: 1.0, source: tests}
"""


def test_a_compute_straggler_of_64_shows_as_that_rank_with_the_others_added_wait(
    tmp_path: Path,
) -> None:
    # MatmulAllReduce, serial: every rank multiplies (m, k) x (k, n), 2 m k n = 2000 FLOPs,
    # 2 ms on this machine, then all reduce. Rank 17 computes 1.5 times slower: 3 ms. The
    # AllReduce starts when the last rank queues it, at 3 ms instead of 2, so each of the 63
    # other ranks waits 1 ms for rank 17, and its exposed communication (total - compute)
    # grows by that 1 ms; rank 17's own exposed communication is unchanged, and it is the
    # last to arrive at the one collective.
    (tmp_path / "paper64.yaml").write_text(TOPOLOGY, encoding="utf-8")
    sc = Scenario(
        name="paper64", description="", op=OpName.MM_ALL_REDUCE, ranks=64, dtype="float16",
        shape={"m": 10, "k": 10, "n": 10}, tilings=("serial",),
        topology=str(tmp_path / "paper64.yaml"),
    )  # fmt: skip
    dump(sc, tmp_path / "sc.yaml")
    out = tmp_path / "out"
    argv = ["simulate", str(tmp_path / "sc.yaml"), "--set", "stragglers.17.compute=1.5",
            "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    with (out / "ranks.csv").open(newline="") as handle:
        rows = {int(r["rank"]): r for r in csv.DictReader(handle)}
    assert sorted(rows) == list(range(64))
    slow = rows[17]
    assert float(slow["compute"]) == 1.5
    assert int(slow["last"]) == 1 and int(slow["waited_for"]) == -1
    assert float(slow["wait_s"]) == 0.0
    assert float(slow["added_exposed_s"]) == pytest.approx(0.0, abs=1e-12)
    for rank, row in rows.items():
        if rank == 17:
            continue
        assert int(row["waited_for"]) == 17, rank
        assert float(row["wait_s"]) == pytest.approx(1e-3, rel=1e-9), rank
        assert float(row["nominal_wait_s"]) == 0.0
        assert float(row["added_exposed_s"]) == pytest.approx(1e-3, rel=1e-9), rank
        assert int(row["last"]) == 0
    # read back typed, and the report shows the straggler first
    folder = read_results(out)
    assert {r.rank for r in folder.ranks if r.compute != 1.0} == {17}
    assert main(["report", str(out), "--out", str(tmp_path / "plots")]) == 0


def test_a_late_rank_delays_the_collective_by_its_offset() -> None:
    # rank 1 starts 0.5 s late: its 1 s matmul runs [0.5, 1.5]; the 2 s AllReduce (2000 B at
    # 1000 B/s on 2 ranks) starts when rank 1 queues it, at 1.5, and ends at 3.5. Rank 0,
    # done computing at 1, waits 0.5 s for rank 1.
    plans = {r: plan(r, 2, mm(1), allreduce(2, 0)) for r in range(2)}
    timeline, arrivals = simulate_waits(plans, machine(2), {1: Straggler(late_us=5e5)})
    got = spans(timeline)
    assert got[(1, "mm0")] == pytest.approx((0.5, 1.5))
    assert got[(0, "ar1")] == pytest.approx((1.5, 3.5))
    waits = rank_waits(arrivals)
    assert list(waits.wait_s) == pytest.approx([0.5, 0.0])
    assert list(waits.waited_for) == [1, -1]
    assert list(waits.last) == [0, 1]


def test_a_narrow_link_slows_the_collectives_through_it() -> None:
    # rank 1's links carry half their bandwidth. An AllReduce passes every rank's data
    # through every rank: 2000 B at 500 B/s, 4 s instead of 2.
    plans = {r: plan(r, 2, allreduce(2)) for r in range(2)}
    timeline, _ = simulate_waits(plans, machine(2), {1: Straggler(link=0.5)})
    assert spans(timeline)[(0, "ar0")] == pytest.approx((0.0, 4.0))
    # AlltoAllv on 3 ranks of a full mesh: each rank sends 2 rows (2000 B) to each peer, 2 s
    # per link; rank 2's links at a quarter take 8 s, and the collective ends with it
    table = [[0, 2, 2], [2, 0, 2], [2, 2, 0]]
    plans = {r: plan(r, 3, alltoallv(table[r], [row[r] for row in table], r)) for r in range(3)}
    mesh = machine(3, kind="full_mesh")
    assert spans(simulate_waits(plans, mesh)[0])[(0, "a2a0")] == pytest.approx((0.0, 2.0))
    slowed = simulate_waits(plans, mesh, {2: Straggler(link=0.25)})[0]
    assert spans(slowed)[(0, "a2a0")] == pytest.approx((0.0, 8.0))


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        (
            "stragglers.3.compute=0",
            "--set stragglers.3.compute=0.0: must be a finite number in (0, 1000]",
        ),
        ("stragglers.3.link=1.5", "--set stragglers.3.link=1.5: must be a finite number in (0, 1]"),
        (
            "stragglers.3.late_us=-1",
            "--set stragglers.3.late_us=-1.0: must be a finite number in [0",
        ),
        ("stragglers.3.late_us=nan", "--set stragglers.3.late_us=nan: must be a finite number"),
        ("stragglers.3.speed=2", "--set stragglers.3.speed='2': unknown key"),
        ("stragglers.x.compute=2", "--set stragglers.x.compute='x': must be an integer"),
        (  # the rank is what breaks the rule, not the override's value (2)
            "stragglers.8.compute=2",
            "stragglers.8=8: must be a rank < ranks (8) (with --set stragglers.8.compute)",
        ),
    ],
)
def test_a_bad_straggler_is_one_line_naming_it(
    setting: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "llama70b_tp8_decode", "--set", setting, "--no-plots"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_stragglers_round_trip_through_a_file_and_bound_the_world(tmp_path: Path) -> None:
    sc = builtin("llama70b_tp8_decode", ["stragglers.5.compute=2", "stragglers.5.late_us=3"])
    assert sc.stragglers == {5: Straggler(compute=2.0, late_us=3.0)}
    dump(sc, tmp_path / "s.yaml")
    assert load(tmp_path / "s.yaml") == sc
    with pytest.raises(ParamInvalidError, match=r"stragglers.5=5: must be a rank < --ranks \(4\)"):
        sc.world_size(4, "--ranks")
