"""Ranks that take turns on the cores they share (``CoreSharing.TURNS``), worked on paper.

The machine of :mod:`tests.unit.test_simulator_by_hand` (a matmul of ``1e6 * t`` FLOPs takes
t s on a whole core, links carry 1000 B/s, no launch or latency) with 4 ranks on 2 cores: a
rank's share is 1/2, so a matmul of t s on a whole core takes ``2 t`` sharing the cores by
processor sharing, and ``t`` on a core while its rank holds one, taking turns
(:func:`~mc2sim.model.cost.core_time`). Every expected time is derived in the comments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import pytest

from mc2sim.errors import ParamInvalidError
from mc2sim.model.cost import compute_time, core_time, schedule_wait
from mc2sim.model.fit import TURNS_US, fit_contention
from mc2sim.model.simulator import lockstep_applies, simulate
from mc2sim.study.calibrate import waiting_weight_of
from mc2sim.study.measure import Case
from mc2sim.topology import Contention, CoreSharing, Topology, dump, load
from tests.unit.test_simulator_by_hand import Spans, allreduce, assert_spans, machine, mm, plan


def on_two_cores(turn_s: float, sharing: CoreSharing = CoreSharing.TURNS) -> Topology:
    """4 ranks on one node of 2 cores, sharing them as ``sharing`` with turns of ``turn_s``."""
    topo = machine(4)
    return dataclasses.replace(
        topo,
        device=dataclasses.replace(
            topo.device, cores_per_node=2, slice_us=turn_s * 1e6, core_sharing=sharing
        ),
    )


def test_a_rank_taking_turns_runs_a_whole_cores_time() -> None:
    task = mm(3)
    turns = on_two_cores(1.0)
    assert compute_time(task, turns, "float16") == pytest.approx(6.0)  # at the share
    assert core_time(turns, 6.0) == pytest.approx(3.0)  # on a core while it holds one
    assert core_time(on_two_cores(1.0, CoreSharing.PROCESSOR), 6.0) == 6.0


def test_ranks_take_turns_until_they_wait() -> None:
    # a matmul of 1 s on a whole core each, within a 10 s turn. Ranks 0 and 1 take the two
    # cores [0, 1], then are done and yield; ranks 2 and 3 have waited for a core: [1, 2].
    plans = {r: plan(r, 4, mm(1)) for r in range(4)}
    assert_spans(
        simulate(plans, on_two_cores(10.0)),
        {(0, "mm0"): (0, 1), (1, "mm0"): (0, 1), (2, "mm0"): (1, 2), (3, "mm0"): (1, 2)},
    )


def test_a_turn_ends_after_its_length_while_others_wait() -> None:
    # a matmul of 3 s on a whole core, 1 s turns. Ranks 0, 1 run [0, 1], 2, 3 [1, 2], 0, 1
    # [2, 3], 2, 3 [3, 4], 0, 1 [4, 5]: done as their turn ends, they yield; 2, 3 [5, 6].
    # Each took 5 s, its 3 s of work at 3 / 5 of a core (processor sharing's 1/2 over a long
    # task, the first turn's wait spared).
    plans = {r: plan(r, 4, mm(3)) for r in range(4)}
    assert_spans(
        simulate(plans, on_two_cores(1.0)),
        {(0, "mm0"): (0, 5), (1, "mm0"): (0, 5), (2, "mm0"): (1, 6), (3, "mm0"): (1, 6)},
    )


def test_a_collective_starts_when_the_last_turn_has_posted_it() -> None:
    # a matmul of 0.5 s on a whole core (within the 10 s turn), then a 1000-byte AllReduce
    # that needs it: on a 4-rank switch 2 (p - 1) / p * 1000 / 1000 = 1.5 s. Ranks 0, 1
    # compute [0, 0.5], post it and wait: they yield; 2, 3 compute [0.5, 1] and post it, so
    # it starts at 1 for every rank and ends at 2.5. Processor sharing (no wait for peers
    # off their cores: slice 0) runs all four at once at half a core: [0, 1], the AllReduce
    # [1, 2.5].
    plans = {r: plan(r, 4, mm(0.5), allreduce(1, 0)) for r in range(4)}
    turns: Spans = {(r, "mm0"): (0, 0.5) if r < 2 else (0.5, 1) for r in range(4)}
    turns |= {(r, "ar1"): (1, 2.5) for r in range(4)}
    assert_spans(simulate(plans, on_two_cores(10.0)), turns)
    sharing: Spans = {(r, "mm0"): (0, 1) for r in range(4)}
    sharing |= {(r, "ar1"): (1, 2.5) for r in range(4)}
    processor = dataclasses.replace(
        on_two_cores(10.0),
        device=dataclasses.replace(
            on_two_cores(10.0).device, core_sharing=CoreSharing.PROCESSOR, slice_us=0.0
        ),
    )
    assert_spans(simulate(plans, processor), sharing)


def test_a_rank_waiting_for_its_collective_yields_its_core() -> None:
    # as above, then a second 0.5 s matmul that needs the AllReduce: ranks 0, 1 post it at
    # 0.5 and wait for it (yielding their cores), 2, 3 compute [0.5, 1] and post it: [1, 2.5].
    # Then all four want a core: 0 and 1, first in line, [2.5, 3]; 2 and 3 [3, 3.5]. A rank
    # that kept its core while it waited would hold it to its turn's end (10 s).
    plans = {r: plan(r, 4, mm(0.5), allreduce(1, 0), mm(0.5, 1)) for r in range(4)}
    expected: Spans = {(r, "mm0"): (0, 0.5) if r < 2 else (0.5, 1) for r in range(4)}
    expected |= {(r, "ar1"): (1, 2.5) for r in range(4)}
    expected |= {(r, "mm2"): (2.5, 3) if r < 2 else (3, 3.5) for r in range(4)}
    assert_spans(simulate(plans, on_two_cores(10.0)), expected)


def test_turns_wait_for_peers_in_the_simulation_not_as_latency() -> None:
    assert schedule_wait(on_two_cores(1.0)) == 0.0
    assert schedule_wait(on_two_cores(1.0, CoreSharing.PROCESSOR)) == pytest.approx(0.5)
    assert not lockstep_applies(on_two_cores(1.0))


def test_core_sharing_survives_a_file_and_is_checked(tmp_path: object) -> None:
    path = f"{tmp_path}/t.yaml"
    dump(on_two_cores(0.002), path)
    back = load(path)
    assert back.device.core_sharing is CoreSharing.TURNS
    assert back.device.slice_us == pytest.approx(2000.0)
    dump(on_two_cores(0.002, CoreSharing.PROCESSOR), path)
    assert "core_sharing" not in open(path).read()  # the default is left out
    assert load(path).device.core_sharing is CoreSharing.PROCESSOR
    device = on_two_cores(1.0).device
    with pytest.raises(ParamInvalidError, match="core_sharing.*'processor', 'turns'"):
        dataclasses.replace(device, core_sharing=cast(Any, "round_robin"))
    with pytest.raises(ParamInvalidError, match="slice_us.*> 0 where core_sharing is 'turns'"):
        dataclasses.replace(device, slice_us=0.0)


def turn_cases() -> tuple[list[Case], list[list[float]]]:
    """Tiled calls and their spans, made by ranks taking 1 s turns (in the grid), no slowdowns."""
    turns = dataclasses.replace(
        on_two_cores(TURNS_US[2] * 1e-6),
        contention=Contention(polled=True),
    )

    def case(name: str, *tasks: object) -> Case:
        plans = tuple(plan(r, 4, *tasks) for r in range(4))  # type: ignore[arg-type]
        return Case(name=name, tiling="tiles=2", run=lambda: None, plans=plans)

    cases = [  # tasks of 0.8 ms run in one 1 ms turn, but not in 0.5 ms; 1.6 ms in two
        case("one turn", mm(0.0008), allreduce(0.001, 0), mm(0.0008), allreduce(0.001, 2)),
        case("two turns", mm(0.0016), allreduce(0.002, 0), mm(0.0016), allreduce(0.002, 2)),
        case("long", mm(0.003), allreduce(0.004), mm(0.0004, 1)),
    ]
    return cases, [[simulate(dict(enumerate(c.plans)), turns).metrics().total_s] for c in cases]


def test_fit_contention_finds_ranks_taking_turns() -> None:
    # the fit, starting from processor sharing, finds the turns and their length
    cases, spans = turn_cases()
    base = on_two_cores(1.0, CoreSharing.PROCESSOR)
    base = dataclasses.replace(base, device=dataclasses.replace(base.device, slice_us=0.0))
    fitted = fit_contention(base, cases, spans, polled=True)
    assert fitted.device.core_sharing is CoreSharing.TURNS
    assert fitted.device.slice_us == TURNS_US[2]


def test_a_measured_sharing_keeps_the_grid_to_it() -> None:
    # the turns' spans, but calibrate measured that a waiting rank keeps its share of the
    # core: the grid keeps to processor sharing
    cases, spans = turn_cases()
    base = on_two_cores(0.0, CoreSharing.PROCESSOR)
    kept = fit_contention(base, cases, spans, polled=True, sharing=CoreSharing.PROCESSOR)
    assert kept.device.core_sharing is CoreSharing.PROCESSOR
    both = fit_contention(base, cases, spans, polled=True, sharing=None)
    assert both.device.core_sharing is CoreSharing.TURNS


def test_serial_calls_join_the_grids_error() -> None:
    # no tiled call at all: the serial ones alone decide. A 1 ms AllReduce after 0.8 ms of
    # compute, measured with a 0.5 ms wait for peers off their cores (processor sharing,
    # slice 1 ms at share 1/2: a SLICES_US point): the fit finds that slice
    measured = dataclasses.replace(
        on_two_cores(1e-3, CoreSharing.PROCESSOR), contention=Contention(polled=True)
    )
    plans = tuple(plan(r, 4, mm(0.0008), allreduce(0.001, 0)) for r in range(4))
    serial = [Case(name="serial", tiling="serial", run=lambda: None, plans=plans)]
    spans = [[simulate(dict(enumerate(plans)), measured).metrics().total_s]]
    base = on_two_cores(0.0, CoreSharing.PROCESSOR)
    fitted = fit_contention(
        base, [], [], polled=True, sharing=CoreSharing.PROCESSOR, serial=serial, serial_spans=spans
    )
    assert fitted.device.slice_us == 1000.0


def weighted(weight: float) -> Topology:
    """4 ranks on 2 cores by processor sharing, a waiting rank taking ``weight`` of a share."""
    topo = on_two_cores(0.0, CoreSharing.PROCESSOR)
    return dataclasses.replace(topo, device=dataclasses.replace(topo.device, waiting_weight=weight))


def test_a_busy_rank_runs_faster_the_less_its_waiting_peers_take() -> None:
    # rank 0 computes 1 s of a whole core's work while ranks 1 to 3 have nothing to do (they
    # wait): a busy rank gets min(1, 2 / (1 + w * 3)) of a core. w = 1: 0.5, 2 s (every rank
    # holds its share); w = 0.5: 0.8, 1.25 s; w = 0: the whole core, 1 s
    plans = {0: plan(0, 4, mm(1.0)), **{r: plan(r, 4) for r in (1, 2, 3)}}
    for weight, seconds in ((1.0, 2.0), (0.5, 1.25), (0.0, 1.0)):
        assert_spans(simulate(plans, weighted(weight)), {(0, "mm0"): (0.0, seconds)})


def test_when_peers_finish_the_busy_ranks_speed_up() -> None:
    # w = 0.5; ranks 0 and 1 compute 1 s of work, ranks 2 and 3 0.5 s. All four busy: half a
    # core each, so 2 and 3 end at 1.0, with 0 and 1 halfway. Then 2 busy, 2 waiting: each
    # busy one gets 2 / (2 + 0.5 * 2) = 2/3 of a core, 0.5 s of work left: 0.75 s, to 1.75
    plans = {r: plan(r, 4, mm(1.0 if r < 2 else 0.5)) for r in range(4)}
    assert_spans(
        simulate(plans, weighted(0.5)),
        {(0, "mm0"): (0.0, 1.75), (1, "mm0"): (0.0, 1.75), (2, "mm0"): (0.0, 1.0), (3, "mm0"): (0.0, 1.0)},
    )  # fmt: skip
    # a weight below 1 changes rates as ranks start and stop: not lockstep
    assert not lockstep_applies(weighted(0.5))
    assert lockstep_applies(dataclasses.replace(weighted(1.0), contention=Contention()))


def test_waiting_weight_survives_a_file_and_is_checked(tmp_path: object) -> None:
    path = f"{tmp_path}/t.yaml"
    dump(weighted(0.87), path)
    assert load(path).device.waiting_weight == pytest.approx(0.87)
    dump(weighted(1.0), path)
    assert "waiting_weight" not in open(path).read()  # the default is left out
    for bad in (-0.1, 1.5):
        with pytest.raises(ParamInvalidError, match="waiting_weight"):
            weighted(bad)


@pytest.mark.parametrize(
    ("got", "share", "weight"),
    [(0.535, 0.5, 2 * 0.5 / 0.535 - 1), (0.5, 0.5, 1.0), (1.0, 0.5, 0.0), (0.45, 0.5, 1.0)],
)
def test_the_waiting_weight_is_read_from_a_busy_ranks_share(
    got: float, share: float, weight: float
) -> None:
    # half the ranks busy, half waiting at w: a busy one gets share / ((1 + w) / 2)
    assert waiting_weight_of(got, share) == pytest.approx(weight)
