"""Timeline records, run keys, metrics and recording, against answers worked out by hand.

The files written from timelines are tested with their writer and reader, in test_results.py.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mc2sim.errors import ParamInvalidError
from mc2sim.timeline import (
    Metrics,
    RunKey,
    Source,
    Stream,
    TaskRecord,
    Timeline,
    busy_time,
    current_recorder,
    record,
)


def key(tiling: str, repetition: int = 0) -> RunKey:
    return RunKey(op="mm_all_reduce", tiling=tiling, repetition=repetition)


RUN = key("tiles=2")


def rec(
    stream: str,
    start: float,
    end: float,
    *,
    rank: int = 0,
    run: RunKey = RUN,
    task: int = 0,
    flops: int = 0,
    nbytes: int = 0,
) -> TaskRecord:
    kind = "matmul" if stream == "compute" else "allreduce"
    return TaskRecord(
        rank=rank,
        run=run,
        task=task,
        name=f"{kind}[{task}]",
        stream=Stream(stream),
        kind=kind,
        start_s=start,
        end_s=end,
        flops=flops,
        bytes=nbytes,
    )


def tl(*records: TaskRecord, **kw: object) -> Timeline:
    return Timeline(records=records, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- busy time


@pytest.mark.parametrize(
    ("intervals", "expected"),
    [
        ([], 0.0),
        ([(1.0, 1.0)], 0.0),
        ([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)], 4.0),
        ([(5.0, 6.0), (0.0, 1.0), (1.0, 2.0)], 3.0),  # touching, unsorted
        ([(0.0, 10.0), (2.0, 3.0), (9.0, 10.0)], 10.0),  # nested
    ],
)
def test_busy_time_is_the_union_length(
    intervals: list[tuple[float, float]], expected: float
) -> None:
    assert busy_time(intervals) == expected


# ----------------------------------------------------------------------------- metrics


def test_overlapping_compute_merged_and_hidden_comm() -> None:
    # compute [0,2] u [1,4] = [0,4]: 4 s; comm [1,3] lies inside it.
    m = tl(rec("compute", 0, 2), rec("compute", 1, 4, task=1), rec("comm", 1, 3, task=2)).metrics()
    r = m.per_rank[0]
    assert (r.total_s, r.compute_s, r.comm_s) == (4.0, 4.0, 2.0)
    assert r.exposed_comm_s == 0.0
    assert r.pure_comm_s == 2.0
    assert r.overlap_pct == 100.0
    assert m.speedup is None


def test_no_overlap_exposes_all_comm() -> None:
    m = tl(rec("compute", 0, 4), rec("comm", 4, 6, task=1)).metrics()
    assert (m.total_s, m.compute_s, m.comm_s) == (6.0, 4.0, 2.0)
    assert m.exposed_comm_s == 2.0
    assert m.overlap_pct == 0.0


def test_partial_overlap_exact_numbers() -> None:
    # total 7, compute 4, comm 4: exposed 3; overlap = 100 * (1 - 3/4) = 25.
    m = tl(rec("compute", 0, 4), rec("comm", 3, 7, task=1)).metrics()
    assert (m.total_s, m.compute_s, m.comm_s, m.exposed_comm_s) == (7.0, 4.0, 4.0, 3.0)
    assert m.overlap_pct == 25.0


def test_idle_gap_counts_as_exposed() -> None:
    # compute [0,2], nothing [2,3], comm [3,4]: exposed = 4 - 2 = 2 (gap included).
    m = tl(rec("compute", 0, 2), rec("comm", 3, 4, task=1)).metrics()
    assert m.exposed_comm_s == 2.0
    assert m.overlap_pct == 0.0  # 100 * (1 - 2/1) clipped


def test_baseline_gives_t_pure_and_speedup() -> None:
    serial = tl(
        rec("compute", 0, 4, run=key("serial")), rec("comm", 4, 6, task=1, run=key("serial"))
    )
    # fused: comm slowed to 3 s by contention; total 5, compute 4, exposed 1.
    fused = tl(rec("compute", 0, 4), rec("comm", 2, 5, task=1))
    alone = fused.metrics()
    assert alone.per_rank[0].pure_comm_s == 3.0
    assert alone.overlap_pct == pytest.approx(100 * (1 - 1 / 3))
    m = fused.metrics(baseline=serial)
    assert m.per_rank[0].pure_comm_s == 2.0  # the serial run's comm, measured alone
    assert m.comm_s == 3.0
    assert m.overlap_pct == 50.0  # 100 * (1 - 1/2)
    assert m.speedup == 1.2  # 6 / 5
    assert serial.metrics(baseline=serial).speedup == 1.0


def test_metrics_by_run_is_each_run_against_the_baseline() -> None:
    # the runs of test_baseline_gives_t_pure_and_speedup, interleaved in one timeline
    serial = key("serial")
    both = tl(
        rec("compute", 0, 4, run=serial), rec("compute", 0, 4),
        rec("comm", 4, 6, task=1, run=serial), rec("comm", 2, 5, task=1),
    )  # fmt: skip
    by_run = both.metrics_by_run(serial)
    assert list(by_run) == [serial, RUN]
    assert by_run[serial].speedup == 1.0
    assert by_run[RUN].speedup == 1.2  # 6 / 5
    assert by_run[RUN].overlap_pct == 50.0  # 100 * (1 - 1/2): the serial comm is t_pure
    with pytest.raises(KeyError):
        both.metrics_by_run(key("tiles=4"))


def test_critical_rank_is_the_slowest() -> None:
    t = tl(
        rec("compute", 0, 4, rank=0),
        rec("comm", 4, 5, rank=0, task=1),  # rank 0: total 5
        # rank 1 started at 1 (say, waiting for a core): its total counts from the run's
        # first start, 0: total 8, compute 4, comm 5
        rec("compute", 1, 5, rank=1),
        rec("comm", 3, 8, rank=1, task=1),
        rec("compute", 0, 2, rank=2, flops=10, nbytes=3),
        rec("compute", 2, 3, rank=2, flops=5),  # rank 2: total 3
    )
    m = t.metrics()
    assert [r.rank for r in m.per_rank] == [0, 1, 2]
    assert m.critical_rank == 1
    assert (m.total_s, m.compute_s, m.comm_s, m.exposed_comm_s) == (8.0, 4.0, 5.0, 4.0)
    assert m.overlap_pct == pytest.approx(20.0)  # 100 * (1 - 4/5)
    assert (m.per_rank[2].flops, m.per_rank[2].bytes) == (15, 3)
    # baseline speedup uses the slowest baseline rank: 14 / 8
    base = tl(rec("compute", 0, 14, rank=0, run=key("s")), rec("comm", 0, 1, rank=1, run=key("s")))
    base = Timeline.merge(base, tl(rec("comm", 0, 1, rank=2, run=key("s"))))
    assert t.metrics(baseline=base).speedup == 1.75
    # one run's records from a later start: every total counts from the run's first start
    late = tl(rec("compute", 10, 12, rank=0), rec("compute", 11, 15, rank=1))
    assert [r.total_s for r in late.metrics().per_rank] == [2.0, 5.0]


def test_critical_rank_tie_goes_to_lowest() -> None:
    t = tl(rec("compute", 0, 3, rank=3), rec("compute", 1, 4, rank=1))
    assert t.metrics().critical_rank == 1


def test_no_comm_gives_zero_overlap() -> None:
    m = tl(rec("compute", 0, 2), rec("compute", 2, 3, task=1)).metrics()
    assert (m.comm_s, m.exposed_comm_s, m.overlap_pct) == (0.0, 0.0, 0.0)
    # a baseline without communication: t_pure = 0 too
    base = tl(rec("compute", 0, 1, run=key("s")))
    fused = tl(rec("compute", 0, 1), rec("comm", 0, 2, task=1))
    assert fused.metrics(baseline=base).overlap_pct == 0.0


def test_metrics_refuses_ambiguous_timelines() -> None:
    two = tl(rec("compute", 0, 1), rec("compute", 0, 1, run=key("other")))
    with pytest.raises(ParamInvalidError, match="for_run") as info:
        two.metrics()
    assert info.value.code == 161002
    with pytest.raises(ParamInvalidError, match="empty"):
        Timeline().metrics()
    one = two.for_run(RUN)
    with pytest.raises(ParamInvalidError, match="baseline"):
        one.metrics(baseline=two)
    with pytest.raises(ParamInvalidError, match="rank 5"):
        tl(rec("compute", 0, 1, rank=5)).metrics(baseline=one)


def test_metrics_as_dict_round_trips_through_json() -> None:
    t = tl(rec("compute", 0, 4), rec("comm", 3, 7, task=1), rec("comm", 0, 1, rank=1))
    m = t.metrics(baseline=t)
    d = json.loads(json.dumps(m.as_dict()))
    assert d["critical_rank"] == 0
    assert d["per_rank"][1]["comm_s"] == 1.0
    assert d["speedup"] == 1.0
    assert Metrics.from_dict(d) == m


# ----------------------------------------------------------------------------- records


def test_task_record_validation() -> None:
    r = rec("comm", 1.5, 2.0)
    assert r.stream is Stream.COMM
    assert r.duration_s == 0.5
    with pytest.raises(ParamInvalidError, match="end_s") as info:
        rec("compute", 2.0, 1.0)
    assert info.value.code == 161002
    with pytest.raises(ParamInvalidError, match="stream"):
        TaskRecord(rank=0, run=RUN, task=0, name="x", stream="disk", kind="k", start_s=0, end_s=1)  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match="RunKey"):
        TaskRecord(
            rank=0,
            run=cast(Any, "op/tiles=2#0"),
            task=0,
            name="x",
            stream=cast(Any, "comm"),
            kind="k",
            start_s=0,
            end_s=1,
        )
    as_str = TaskRecord(
        rank=0,
        run=RUN,
        task=0,
        name="x",
        stream=cast(Any, "comm"),
        kind="k",
        start_s=0,
        end_s=1,
    )
    assert as_str.stream is Stream.COMM
    coerced = TaskRecord(
        rank=np.int64(1),
        run=RUN,
        task=0,
        name="x",
        stream=Stream.COMPUTE,
        kind="k",
        start_s=0,
        end_s=np.float32(0.5),
        flops=np.int32(7),
    )
    assert [type(coerced.rank), type(coerced.flops)] == [int, int]
    assert [type(coerced.start_s), type(coerced.end_s)] == [float, float]
    assert (coerced.rank, coerced.flops, coerced.start_s, coerced.end_s) == (1, 7, 0.0, 0.5)
    with pytest.raises(ParamInvalidError, match="rank"):
        rec("compute", 0, 1, rank=-1)
    with pytest.raises(ParamInvalidError, match="task"):
        rec("compute", 0, 1, task=1.5)  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match="start_s"):
        rec("compute", "soon", 1)  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match="flops"):
        rec("compute", 0, 1, flops=-3)
    with pytest.raises(ParamInvalidError, match="finite"):
        rec("compute", 0, float("nan"))
    with pytest.raises(ParamInvalidError, match="finite"):
        rec("compute", float("-inf"), 0)


def test_timeline_filters_merge_and_validation() -> None:
    a = tl(rec("compute", 0, 1, rank=1), rec("comm", 0, 1, rank=0, run=key("b")), meta={"op": "mm"})
    assert a.ranks() == [0, 1]
    assert a.runs() == [RUN, key("b")]
    assert [r.rank for r in a.for_rank(1).records] == [1]
    assert a.for_run(key("b")).records == (a.records[1],)
    assert a.for_run(key("nope")).records == ()
    assert a.for_run(key("b", repetition=1)).records == ()
    assert a.for_run(key("b")).meta == {"op": "mm"}
    assert a.source is Source.MEASURED

    b = tl(rec("compute", 0, 1, rank=2), meta={"op": "mm", "world": 3})
    merged = Timeline.merge(a, b)
    assert merged.records == a.records + b.records
    assert dict(merged.meta) == {"op": "mm", "world": 3}
    with pytest.raises(ParamInvalidError, match="op"):
        Timeline.merge(a, tl(meta={"op": "gmm"}))
    assert Timeline.merge(a, tl(meta={"op": "gmm"}), meta={"x": 1}).meta == {"x": 1}
    with pytest.raises(ParamInvalidError, match="source"):
        Timeline.merge(a, tl(source="simulated"))
    with pytest.raises(ParamInvalidError):
        Timeline.merge()

    with pytest.raises(ParamInvalidError, match="source"):
        tl(source="guessed")
    with pytest.raises(ParamInvalidError, match="JSON"):
        tl(meta={"f": object()})
    with pytest.raises(ParamInvalidError, match="TaskRecord"):
        Timeline(records=cast(Any, [("not", "a record")]))
    with pytest.raises(TypeError):
        a.meta["op"] = "other"  # type: ignore[index]
    listed = Timeline(records=cast(Any, list(a.records)))
    assert isinstance(listed.records, tuple)


def test_timeline_pickles_and_hashes() -> None:
    t = tl(rec("compute", 0, 1), source="simulated", meta={"tiles": [1, 2]})
    back = pickle.loads(pickle.dumps(t))
    assert back == t
    assert back.source is Source.SIMULATED
    assert back.meta == {"tiles": [1, 2]}
    assert hash(back) == hash(t)


# ----------------------------------------------------------------------------- recording


def test_record_collects_and_nests() -> None:
    assert current_recorder() is None
    r1, r2, r3 = rec("compute", 0, 1), rec("comm", 1, 2, task=1), rec("compute", 2, 3, task=2)
    with record(meta={"op": "mm"}) as outer:
        assert current_recorder() is outer
        recorder = current_recorder()
        assert recorder is not None
        recorder.add(r1)
        with record() as inner:
            assert current_recorder() is inner
            assert inner.parent is outer
            current_recorder().add(r2)  # type: ignore[union-attr]
        assert current_recorder() is outer
        outer.add(r3)
    assert current_recorder() is None
    assert inner.timeline.records == (r2,)
    assert outer.timeline.records == (r1, r2, r3)
    assert outer.timeline.source is Source.MEASURED
    assert outer.timeline.meta == {"op": "mm"}
    with pytest.raises(ParamInvalidError, match="TaskRecord"):
        outer.add("record")  # type: ignore[arg-type]


def test_record_resets_after_an_exception() -> None:
    with pytest.raises(RuntimeError), record():
        raise RuntimeError("boom")
    assert current_recorder() is None


# ----------------------------------------------------------------------------- run keys


def test_run_key_is_data_and_its_label_is_for_display() -> None:
    k = RunKey(op="gmm_alltoallv", tiling="experts x 2", repetition=16)
    assert (k.op, k.tiling, k.repetition) == ("gmm_alltoallv", "experts x 2", 16)
    assert str(k) == "gmm_alltoallv/experts x 2#16"
    assert RunKey(op="mm", tiling="serial") == RunKey(op="mm", tiling="serial", repetition=0)
    assert len({k, RunKey(op="gmm_alltoallv", tiling="experts x 2", repetition=16)}) == 1
    assert k != RunKey(op="gmm_alltoallv", tiling="experts x 2", repetition=15)
    coerced = RunKey(op="mm", tiling="serial", repetition=np.int64(3))
    assert type(coerced.repetition) is int and coerced.repetition == 3
    # a tiling in words may hold the characters a label would use: nothing is parsed
    odd = RunKey(op="mm", tiling="a/b#c", repetition=1)
    assert tl(rec("compute", 0, 1, run=odd)).runs() == [odd]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"op": "", "tiling": "serial"}, "op"),
        ({"op": "mm", "tiling": None}, "tiling"),
        ({"op": "mm", "tiling": "serial", "repetition": -1}, "repetition"),
        ({"op": "mm", "tiling": "serial", "repetition": 1.5}, "repetition"),
    ],
)
def test_run_key_validation(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        RunKey(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param
    assert info.value.code == 161002


# ----------------------------------------------------------------------------- properties

_interval = st.tuples(st.integers(0, 60), st.integers(0, 20)).map(lambda p: (p[0], p[0] + p[1]))


@settings(max_examples=150, deadline=None)
@given(st.lists(_interval, min_size=1, max_size=12), st.lists(_interval, max_size=12))
def test_busy_time_and_exposure_properties(
    compute: list[tuple[int, int]], comm: list[tuple[int, int]]
) -> None:
    merged = busy_time([(float(a), float(b)) for a, b in compute])
    # independent oracle: integer endpoints, so count the unit cells covered
    assert merged == len({cell for a, b in compute for cell in range(a, b)})
    assert merged <= sum(b - a for a, b in compute)
    assert merged >= max(b - a for a, b in compute)
    t = tl(
        *[rec("compute", a, b, task=i) for i, (a, b) in enumerate(compute)],
        *[rec("comm", a, b, task=100 + i) for i, (a, b) in enumerate(comm)],
    )
    m = t.metrics()
    everything = compute + comm
    assert m.total_s == max(b for _, b in everything) - min(a for a, _ in everything)
    # the same cell-counting oracle for every stream: exposed and overlap follow exactly
    cells = {name: {c for a, b in spans for c in range(a, b)} for name, spans in
             (("compute", compute), ("comm", comm))}  # fmt: skip
    assert m.compute_s == len(cells["compute"]) and m.comm_s == len(cells["comm"])
    assert m.exposed_comm_s == m.total_s - len(cells["compute"])
    pure = len(cells["comm"])
    overlap = 100 * (1 - m.exposed_comm_s / pure) if pure else 0.0
    assert m.overlap_pct == pytest.approx(min(100.0, max(0.0, overlap)), abs=1e-9)


# -- clocks and the host's interval -------------------------------------------------------------


def test_a_record_without_host_times_is_host_timed_over_its_own_interval() -> None:
    from mc2sim.timeline import Clock

    rec = TaskRecord(
        rank=0, run=RunKey(op="x", tiling="serial"), task=0, name="a", stream=Stream.COMPUTE,
        kind="matmul", start_s=0.25, end_s=0.5,
    )  # fmt: skip
    assert rec.clock is Clock.HOST
    assert (rec.host_start_s, rec.host_end_s) == rec.host_span_s == (0.25, 0.5)
    device = dataclasses.replace(rec, clock=cast(Any, "device"), host_start_s=0, host_end_s=0.125)
    assert device.clock is Clock.DEVICE and device.host_span_s == (0.0, 0.125)
    assert type(device.host_start_s) is float


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"clock": "wall"}, "clock='wall': must be one of 'host', 'device', 'staged'"),
        ({"host_start_s": 0.5, "host_end_s": 0.25}, "host_end_s=0.25: must be >= host_start_s"),
        ({"host_start_s": float("nan")}, "host_start_s=nan: must be a finite number"),
        ({"host_end_s": "soon"}, "host_end_s='soon': must be a number or None"),
        ({"cpu_s": -0.5}, "cpu_s=-0.5: must be a finite number >= 0"),
        ({"cpu_s": float("inf")}, "cpu_s=inf: must be a finite number >= 0"),
        ({"cpu_s": "lots"}, "cpu_s='lots': must be a number or None"),
    ],
)
def test_bad_clocks_and_host_times_are_refused(changes: dict[str, object], match: str) -> None:
    base = dict(
        rank=0, run=RunKey(op="x", tiling="serial"), task=0, name="a", stream="compute",
        kind="matmul", start_s=0.25, end_s=0.5,
    )  # fmt: skip
    with pytest.raises(ParamInvalidError, match=match):
        TaskRecord(**{**base, **changes})  # type: ignore[arg-type]


def test_add_raw_takes_the_host_timed_fields_or_all_of_them() -> None:
    from mc2sim.timeline import Clock, Recorder

    run = RunKey(op="x", tiling="serial")
    rec = Recorder()
    rec.add_raw((0, run, 0, "a", "compute", "matmul", 0.0, 1.0, 0, 0, 0, 0))
    rec.add_raw(
        (0, run, 1, "b", "comm", "allreduce", 0.5, 2.0, 0, 8, 8, 0, "staged", 0.25, 1.5, None)
    )
    rec.add_raw(
        (0, run, 2, "c", "compute", "matmul", 2.0, 3.0, 0, 0, 0, 0, "host", None, None, 0.5)
    )
    first, second, third = rec.records
    assert first.clock is Clock.HOST and first.host_span_s == (0.0, 1.0) and first.cpu_s is None
    assert second.clock is Clock.STAGED and second.host_span_s == (0.25, 1.5)
    assert third.cpu_s == 0.5 and third.host_span_s == (2.0, 3.0)
    with pytest.raises(ParamInvalidError, match="fields=13: must hold 12 or 16 values"):
        rec.add_raw((0, run, 3, "c", "comm", "allreduce", 0.5, 2.0, 0, 8, 8, 0, "staged"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1)), min_size=0, max_size=30))
def test_grouping_by_run_keeps_each_runs_records_in_order(picks: list[tuple[int, int]]) -> None:
    """Equal runs held by distinct objects, interleaved: grouped as equality alone groups."""
    tilings = ["serial", "tiles=2", "tiles=4"]
    records = [  # a fresh RunKey for each record, as equal as its tiling says
        rec("compute", float(i), float(i) + 1.0, rank=rank, run=key(tilings[t]), task=i)
        for i, (t, rank) in enumerate(picks)
    ]
    timeline = tl(*records)
    expected_runs = []
    for r in records:
        if r.run not in expected_runs:
            expected_runs.append(r.run)
    runs, positions = timeline.run_positions()
    assert runs == timeline.runs() == expected_runs
    assert [runs[p] for p in positions] == [r.run for r in records]
    grouped = timeline.by_run()
    assert list(grouped) == expected_runs
    for run in expected_runs:
        alone = tuple(r for r in records if r.run == run)
        assert grouped[run].records == alone == timeline.for_run(run).records
    assert timeline.for_run(key("tiles=8")).records == ()
