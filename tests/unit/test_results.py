"""The results folder: each file written and read back as typed records, by mc2sim.results."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import types
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mc2sim import _atomic, results
from mc2sim.compare import Standard, check
from mc2sim.errors import ParamInvalidError
from mc2sim.results import (
    CSV_COLUMNS,
    GoldenVerdict,
    Manifest,
    WorstElement,
    chrome_trace,
    git_state,
    read_results,
    write_results,
)
from mc2sim.timeline import Clock, RunKey, Source, Stream, TaskRecord, Timeline

from .fakes import toy_manifest

OP = "mm_all_reduce"


def key(tiling: str, repetition: int = 0) -> RunKey:
    return RunKey(op=OP, tiling=tiling, repetition=repetition)


RUN = key("tiles=2")
SERIAL = key("serial", 3)


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
        rank=rank, run=run, task=task, name=f"{kind}[{task}]", stream=Stream(stream), kind=kind,
        start_s=start, end_s=end, flops=flops, bytes=nbytes,
    )  # fmt: skip


def two_rank_timeline(run: RunKey = RUN) -> Timeline:
    return Timeline(
        records=(
            rec("compute", 0.0, 0.5, rank=0, run=run, flops=100),
            rec("comm", 0.25, 1.0, rank=0, run=run, task=1, nbytes=64),
            rec("compute", 0.0, 0.75, rank=1, run=run, flops=100),
            rec("comm", 0.75, 1.0, rank=1, run=run, task=1, nbytes=64),
        ),
        meta={"world_size": 2, "op": OP},
    )


def serial_and_tiled(source: str = "measured") -> Timeline:
    """Rank 0 and 1 of a serial run (6 s) and a tiled one (5 s), timed from one epoch each."""
    serial = [rec("compute", 0, 4, run=SERIAL, rank=r) for r in (0, 1)] + [
        rec("comm", 4, 6, run=SERIAL, task=1, rank=r) for r in (0, 1)
    ]
    tiled = [rec("compute", 0, 4, rank=r) for r in (0, 1)] + [
        rec("comm", 2, 5, task=1, rank=r) for r in (0, 1)
    ]
    return Timeline(records=(*serial, *tiled), source=Source(source), meta={"scenario": "toy"})


def verdict(*, rank: int, fail: bool = False) -> Any:
    """A real verdict of mc2sim.compare on a 2 x 2 output; failing: element (1, 1) is 9, not 4."""
    golden = np.array([[1.0, 2.0], [3.0, 4.0]])
    actual = golden.copy()
    if fail:
        actual[1, 1] = 9.0
    return check(actual, golden, Standard.ALLCLOSE, dtype="float16", rank=rank)


# ----------------------------------------------------------------------------- round trips


def test_write_then_read_gives_equal_typed_records(tmp_path: Path) -> None:
    timeline = serial_and_tiled()
    manifest = toy_manifest(tilings=("serial", "2"))
    verdicts = {
        "serial": [verdict(rank=0), verdict(rank=1)],
        "tiles=2": [verdict(rank=0), verdict(rank=1, fail=True)],
    }
    paths = write_results(
        tmp_path / "out", timeline=timeline, baseline=SERIAL, manifest=manifest, verdicts=verdicts
    )
    assert paths == {
        "tasks": tmp_path / "out" / "tasks.csv",
        "trace": tmp_path / "out" / "trace.json",
        "summary": tmp_path / "out" / "summary.json",
        "manifest": tmp_path / "out" / "manifest.json",
        "complete": tmp_path / "out" / "complete.json",
    }
    folder = read_results(tmp_path / "out")
    assert folder.path == tmp_path / "out"
    assert folder.manifest == manifest
    assert dict(folder.runs) == {"serial": SERIAL, "tiles=2": RUN}
    assert list(folder.runs) == ["serial", "tiles=2"], "in the order written"
    assert folder.baseline == SERIAL
    base = timeline.for_run(SERIAL)
    assert folder.metrics["serial"] == base.metrics(baseline=base)
    assert folder.metrics["tiles=2"] == timeline.for_run(RUN).metrics(baseline=base)
    assert folder.timeline == timeline
    assert folder.timeline is not None and folder.timeline.source is Source.MEASURED
    expected = {t: tuple(GoldenVerdict.of(v) for v in vs) for t, vs in verdicts.items()}
    assert dict(folder.verdicts) == expected
    assert [v.rank for v in folder.verdicts["tiles=2"]] == [0, 1]
    assert folder.passed("serial") is True
    assert folder.passed("tiles=2") is False
    assert folder.passed("hardware") is None
    # worked out by hand: serial 6 s, tiled 5 s (speedup 1.2; overlap 100 * (1 - 1/2))
    assert folder.totals() == {"serial": 6.0, "tiles=2": 5.0}
    assert folder.metrics["tiles=2"].speedup == 1.2
    assert folder.metrics["tiles=2"].overlap_pct == 50.0
    assert folder.metrics["serial"].speedup == 1.0


def test_simulated_folder_without_verdicts_or_tasks(tmp_path: Path) -> None:
    timeline = serial_and_tiled("simulated")
    write_results(
        tmp_path, timeline=timeline, baseline=SERIAL, manifest=toy_manifest(source="simulated")
    )
    (tmp_path / "tasks.csv").unlink()
    folder = read_results(tmp_path)
    assert folder.manifest.source is Source.SIMULATED
    assert dict(folder.verdicts) == {} and folder.passed("serial") is None
    assert folder.timeline is None
    assert folder.totals() == {"serial": 6.0, "tiles=2": 5.0}


def test_tasks_csv_has_op_tiling_repetition_columns_and_reads_back_unparsed(
    tmp_path: Path,
) -> None:
    # a tiling in words holding "/" and "#", and a comma: nothing splits a label
    odd = RunKey(op=OP, tiling="a/b#2, c", repetition=7)
    timeline = two_rank_timeline(odd)
    write_results(tmp_path, timeline=timeline, baseline=odd, manifest=toy_manifest())
    with (tmp_path / "tasks.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "rank", "op", "tiling", "repetition", "task", "name", "stream", "kind", "start_s",
        "end_s", "flops", "bytes", "duration_s", "intra_bytes", "inter_bytes", "clock",
        "host_start_s", "host_end_s", "cpu_s",
    ]  # fmt: skip
    assert tuple(rows[0]) == CSV_COLUMNS
    assert "run" not in rows[0]
    assert len(rows) == 1 + len(timeline.records)
    assert rows[1] == [
        "0", OP, "a/b#2, c", "7", "0", "matmul[0]", "compute", "matmul", "0.0", "0.5", "100",
        "0", "0.5", "0", "0", "host", "0.0", "0.5", "",
    ]  # fmt: skip
    assert rows[2] == [
        "0", OP, "a/b#2, c", "7", "1", "allreduce[1]", "comm", "allreduce", "0.25", "1.0", "0",
        "64", "0.75", "0", "0", "host", "0.25", "1.0", "",
    ]  # fmt: skip
    assert rows[4][8:10] == ["0.75", "1.0"]
    folder = read_results(tmp_path)
    assert folder.timeline == timeline
    assert folder.timeline is not None and folder.timeline.runs() == [odd]
    assert dict(folder.runs) == {"a/b#2, c": odd}


def test_tasks_csv_is_what_csv_writer_writes_for_texts_that_need_quotes() -> None:
    """Names and tilings with commas, quotes, line breaks or nothing: the csv module's bytes."""
    odd = RunKey(op=OP, tiling='a "b", c', repetition=2)
    names = ["plain[0]", "with,comma", 'with "quotes"', "two\nlines", "", " padded "]
    records = [
        dataclasses.replace(rec("compute", 0.1 * i, 0.1 * i + 0.3, run=odd, task=i), name=name)
        for i, name in enumerate(names)
    ]
    timeline = Timeline(records=tuple(records))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        writer.writerow(
            (r.rank, r.run.op, r.run.tiling, r.run.repetition, r.task, r.name, "compute",
             r.kind, repr(r.start_s), repr(r.end_s), r.flops, r.bytes, repr(r.end_s - r.start_s),
             r.intra_bytes, r.inter_bytes, "host", repr(r.start_s), repr(r.end_s), "")
        )  # fmt: skip
    assert results._tasks_csv(timeline) == buf.getvalue()


def test_bytes_by_level_round_trip(tmp_path: Path) -> None:
    split = dataclasses.replace(rec("comm", 0.0, 1.0, task=1), intra_bytes=40, inter_bytes=24)
    timeline = Timeline(records=(rec("compute", 0.0, 0.5), split))
    write_results(tmp_path, timeline=timeline, baseline=RUN, manifest=toy_manifest())
    folder = read_results(tmp_path)
    assert folder.timeline == timeline
    assert folder.timeline is not None and folder.timeline.records[1].inter_bytes == 24
    with (tmp_path / "tasks.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert header[13:15] == ["intra_bytes", "inter_bytes"]


def test_device_clocks_round_trip_and_older_csv_reads_as_host_timed(tmp_path: Path) -> None:
    device = dataclasses.replace(
        rec("compute", 0.25, 0.5), clock=Clock.DEVICE, host_start_s=0.0, host_end_s=0.125
    )
    staged = dataclasses.replace(
        rec("comm", 0.5, 1.0, task=1), clock=Clock.STAGED, host_start_s=0.125, host_end_s=0.875
    )
    on_cpu = dataclasses.replace(rec("compute", 1.0, 1.5, task=2), cpu_s=0.375)
    timeline = Timeline(records=(device, staged, on_cpu))
    write_results(tmp_path, timeline=timeline, baseline=RUN, manifest=toy_manifest())
    folder = read_results(tmp_path)
    assert folder.timeline == timeline
    assert [r.clock for r in folder.timeline.records] == [Clock.DEVICE, Clock.STAGED, Clock.HOST]
    assert folder.timeline.records[1].host_span_s == (0.125, 0.875)
    assert [r.cpu_s for r in folder.timeline.records] == [None, None, 0.375]
    trace = json.loads((tmp_path / "trace.json").read_text())
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in trace["traceEvents"]
        if e["name"] == "thread_name"
    }
    assert threads == {(0, 0): "compute (device)", (0, 1): "comm (staged)", (0, 1000): "host"}
    issued = [e for e in trace["traceEvents"] if e.get("tid") == 1000 and e["ph"] == "X"]
    assert [(e["name"], e["ts"], e["dur"]) for e in issued] == [
        ("issue matmul[0]", 0.0, 125000.0),
        ("issue allreduce[1]", 125000.0, 750000.0),
    ]
    # a tasks.csv written before the clock and CPU columns existed: host-timed tasks
    path = tmp_path / "tasks.csv"
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    keep = len(rows[0]) - 4
    path.write_text("".join(",".join(row[:keep]) + "\n" for row in rows))
    marker = json.loads((tmp_path / "complete.json").read_text())
    body = path.read_bytes()  # certify the older file as that run's marker would have
    marker["files"]["tasks.csv"] = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (tmp_path / "complete.json").write_text(json.dumps(marker))
    older = read_results(tmp_path).timeline
    assert older is not None
    assert [r.clock for r in older.records] == [Clock.HOST] * 3
    assert older.records[1].host_span_s == (0.5, 1.0)
    assert [r.cpu_s for r in older.records] == [None] * 3


def test_floats_round_trip_exactly(tmp_path: Path) -> None:
    third = 1.0 / 3.0
    timeline = Timeline(
        records=(rec("compute", 0.1, 0.1 + third), rec("comm", 1e-9, 2.0 / 7.0, task=1))
    )
    write_results(tmp_path, timeline=timeline, baseline=RUN, manifest=toy_manifest())
    folder = read_results(tmp_path)
    assert folder.timeline == timeline
    assert folder.metrics["tiles=2"] == timeline.metrics(baseline=timeline)


# ----------------------------------------------------------------------------- golden verdicts


def test_a_failing_verdict_keeps_its_worst_element_and_rank(tmp_path: Path) -> None:
    failing = verdict(rank=1, fail=True)
    record = GoldenVerdict.of(failing)
    # by hand: one of 4 elements off, |9 - 4| = 5 > 0.005 + 0.005 * 4
    assert record == GoldenVerdict(
        standard="allclose", passed=False, dtype="float16", numel=4, mismatches=1,
        mismatch_fraction=0.25, allowed_fraction=0.0, max_abs_error=5.0, max_rel_error=1.25,
        worst=WorstElement(index=(1, 1), actual=9.0, golden=4.0, error=5.0), rank=1,
    )  # fmt: skip
    write_results(
        tmp_path, timeline=two_rank_timeline(), baseline=RUN, manifest=toy_manifest(),
        verdicts={"tiles=2": [verdict(rank=0), failing]},
    )  # fmt: skip
    back = read_results(tmp_path).verdicts["tiles=2"]
    assert back == (GoldenVerdict.of(verdict(rank=0)), record)
    assert back[1].worst == WorstElement(index=(1, 1), actual=9.0, golden=4.0, error=5.0)
    assert back[1].rank == 1 and back[1].passed is False
    assert back[0].worst is None and back[0].passed is True
    # stored as data: fields, not a sentence
    stored = json.loads((tmp_path / "summary.json").read_text())["golden"]["tiles=2"][1]
    assert stored["worst"] == {"index": [1, 1], "actual": 9.0, "golden": 4.0, "error": 5.0}
    assert stored["passed"] is False and stored["rank"] == 1


def test_non_finite_values_survive_json(tmp_path: Path) -> None:
    golden = np.array([1.0, 2.0, 3.0])
    actual = np.array([1.0, np.inf, 3.0])
    v = check(actual, golden, "double_thousandths", dtype="float16", rank=0)
    record = GoldenVerdict.of(v)
    assert record.worst == WorstElement(index=(1,), actual=np.inf, golden=2.0, error=np.inf)
    assert GoldenVerdict.from_json(json.loads(json.dumps(record.to_json()))) == record
    write_results(
        tmp_path, timeline=two_rank_timeline(), baseline=RUN, manifest=toy_manifest(),
        verdicts={"tiles=2": [v]},
    )  # fmt: skip
    assert read_results(tmp_path).verdicts["tiles=2"] == (record,)
    nan = dataclasses.replace(record, max_rel_error=float("nan"))
    back = GoldenVerdict.from_json(json.loads(json.dumps(nan.to_json(), allow_nan=False)))
    assert np.isnan(back.max_rel_error)


def test_error_balance_verdict_keeps_its_mean() -> None:
    golden = np.linspace(1.0, 2.0, 64).reshape(8, 8)
    v = check(golden * (1 + 2.0**-9), golden, "error_balance", dtype="float16", rank=3)
    record = GoldenVerdict.of(v)
    assert record.standard == "error_balance"
    assert record.mean_error == pytest.approx(2.0**-9)
    assert record.mean_limit == 2.0**-10
    assert record.passed is False and record.rank == 3
    assert GoldenVerdict.from_json(record.to_json()) == record


def test_verdicts_must_be_in_rank_order_of_known_tilings(tmp_path: Path) -> None:
    common: dict[str, Any] = {
        "timeline": two_rank_timeline(), "baseline": RUN, "manifest": toy_manifest(),
    }  # fmt: skip
    with pytest.raises(ParamInvalidError, match="rank") as info:
        write_results(tmp_path / "a", verdicts={"tiles=2": [verdict(rank=1)]}, **common)
    assert info.value.code == 161002
    with pytest.raises(ParamInvalidError, match="tiling"):
        write_results(tmp_path / "b", verdicts={"serial": [verdict(rank=0)]}, **common)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # a verdict of no rank takes its index
    unranked = check(np.ones(2), np.ones(2), "allclose", dtype="float16")
    write_results(tmp_path / "c", verdicts={"tiles=2": [verdict(rank=0), unranked]}, **common)
    assert [v.rank for v in read_results(tmp_path / "c").verdicts["tiles=2"]] == [0, 1]


# ----------------------------------------------------------------------------- manifest


MANIFEST_KEYS = {
    "format", "argv", "overrides", "scenario", "scenario_path", "scenario_sha256", "op",
    "shape", "dtype", "quant", "standard", "repetitions", "scale", "tilings", "routing",
    "topology", "world_size", "source", "hosts", "seeds", "versions", "mpi_library", "python",
    "created", "git_revision", "git_dirty", "devices", "backend", "probe_tflops",
}  # fmt: skip


def test_manifest_fields_are_all_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = tmp_path / "toy.yaml"
    scenario.write_bytes(b"name: toy\n")
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    manifest = toy_manifest(scenario_path=scenario)
    data = manifest.to_json()
    assert set(data) == MANIFEST_KEYS
    assert data["format"] == results.FORMAT
    assert data["scenario_path"] == str(scenario.resolve())
    assert data["scenario_sha256"] == hashlib.sha256(b"name: toy\n").hexdigest()
    assert data["routing"] == {"kind": "balanced", "seed": 7, "skew": 1.0}
    assert data["seeds"] == {"routing": 7}
    assert data["tilings"] == ["serial", "hardware", "2"]
    assert data["hosts"] == ["host0", "host1"]
    assert data["argv"] == ["mc2sim", "run", "toy"] and data["overrides"] == ["scale=small"]
    assert set(data["versions"]) == {"mc2sim", "torch", "numpy", "mpi4py", "mpich"}
    assert data["versions"]["numpy"] == np.__version__
    assert data["mpi_library"] is None, "mpi4py.MPI not loaded: not imported for the manifest"
    assert "mpi4py.MPI" not in sys.modules
    assert data["python"] == ".".join(str(v) for v in sys.version_info[:3])
    created = datetime.fromisoformat(data["created"])
    assert created.tzinfo is not None
    assert Manifest.from_json(json.loads(json.dumps(data))) == manifest
    no_file = toy_manifest()
    assert no_file.scenario_path is None and no_file.scenario_sha256 is None


def test_manifest_names_the_mpi_library_when_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("mpi4py.MPI")
    fake.Get_library_version = lambda: "MPICH Version:  4.3.0\nMPICH Release date: x\n"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", fake)
    assert toy_manifest().mpi_library == "MPICH Version: 4.3.0"


def test_manifest_validation() -> None:
    good = toy_manifest()
    with pytest.raises(ParamInvalidError, match="scenario_sha256"):
        dataclasses.replace(good, scenario_path="x.yaml", scenario_sha256="nothex")
    with pytest.raises(ParamInvalidError, match="scenario_sha256"):
        dataclasses.replace(good, scenario_path="x.yaml")
    with pytest.raises(ParamInvalidError, match="git_dirty"):
        dataclasses.replace(good, git_revision=None, git_dirty=True)
    with pytest.raises(ParamInvalidError, match="world_size"):
        dataclasses.replace(good, world_size=0)
    with pytest.raises(ParamInvalidError, match="source"):
        dataclasses.replace(good, source="guessed")
    with pytest.raises(ParamInvalidError, match="shape"):
        dataclasses.replace(good, shape={"m": "eight"})
    with pytest.raises(ParamInvalidError, match="scenario_path"):
        toy_manifest(scenario_path="/no/such/scenario.yaml")
    data = good.to_json()
    data["format"] = 0
    with pytest.raises(ParamInvalidError, match="format"):
        Manifest.from_json(data)
    del data["format"], data["world_size"]
    data["format"] = results.FORMAT
    with pytest.raises(ParamInvalidError, match="'world_size'"):
        Manifest.from_json(data)


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def _checkout(root: Path, name: str) -> Path:
    """A git repository whose pyproject names the project ``name``, with a mc2sim folder."""
    (root / "mc2sim").mkdir(parents=True)
    (root / "mc2sim" / "__init__.py").write_text('"""x."""\n')
    (root / "pyproject.toml").write_text(
        f'[build-system]\nname = "setuptools"\n\n[project]\nname = "{name}"\n'
    )
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "first")
    return root / "mc2sim"


def test_manifest_keeps_a_runs_speed_probe_and_reads_older_folders_without_one() -> None:
    probed = dataclasses.replace(toy_manifest(), probe_tflops=0.1234)
    data = json.loads(json.dumps(probed.to_json()))
    assert data["probe_tflops"] == 0.1234
    assert Manifest.from_json(data).probe_tflops == 0.1234
    del data["probe_tflops"]  # a folder written before runs kept their probe
    assert Manifest.from_json(data).probe_tflops is None
    assert toy_manifest().probe_tflops is None
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "fast"):
        with pytest.raises(ParamInvalidError, match="probe_tflops"):
            dataclasses.replace(probed, probe_tflops=bad)


def test_git_revision_and_dirty_flag_only_in_our_own_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = _checkout(tmp_path / "own", "mc2sim")
    head = _git(own.parent, "rev-parse", "HEAD")
    monkeypatch.setattr(results, "_PACKAGE_DIR", own)
    manifest = toy_manifest()
    assert (manifest.git_revision, manifest.git_dirty) == (head, False)
    (own.parent / "untracked.txt").write_text("new")
    assert git_state() == (head, False), "untracked files are not changes"
    (own / "__init__.py").write_text('"""changed."""\n')
    manifest = toy_manifest()
    assert (manifest.git_revision, manifest.git_dirty) == (head, True)
    assert Manifest.from_json(manifest.to_json()) == manifest

    other = _checkout(tmp_path / "other", "someone_else")
    monkeypatch.setattr(results, "_PACKAGE_DIR", other)
    manifest = toy_manifest()
    assert (manifest.git_revision, manifest.git_dirty) == (None, None)

    # an installed copy inside our checkout (a virtual environment) is not the checkout
    installed = own.parent / ".venv" / "site-packages" / "mc2sim"
    installed.mkdir(parents=True)
    assert git_state(installed) == (None, None)

    outside = tmp_path / "plain" / "mc2sim"
    outside.mkdir(parents=True)
    assert git_state(outside) == (None, None)
    monkeypatch.setattr(results, "_PACKAGE_DIR", outside)
    assert toy_manifest().git_revision is None


# ----------------------------------------------------------------------------- writer rules


def test_write_results_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    timeline = serial_and_tiled()
    with pytest.raises(ParamInvalidError, match="baseline") as info:
        write_results(
            tmp_path / "a", timeline=timeline, baseline=key("serial"), manifest=toy_manifest()
        )
    assert info.value.code == 161002
    with pytest.raises(ParamInvalidError, match="source"):
        write_results(
            tmp_path / "b", timeline=timeline, baseline=SERIAL,
            manifest=toy_manifest(source="simulated"),
        )  # fmt: skip
    twice = Timeline.merge(timeline, two_rank_timeline(key("tiles=2", 1)), meta={})
    with pytest.raises(ParamInvalidError, match="one run per tiling"):
        write_results(tmp_path / "c", timeline=twice, baseline=SERIAL, manifest=toy_manifest())
    with pytest.raises(ParamInvalidError, match="empty"):
        write_results(tmp_path / "d", timeline=Timeline(), baseline=SERIAL, manifest=toy_manifest())
    lacking = Timeline.merge(timeline, Timeline(records=(rec("compute", 0, 1, rank=2),)))
    with pytest.raises(ParamInvalidError, match="rank 2"):
        write_results(tmp_path / "e", timeline=lacking, baseline=SERIAL, manifest=toy_manifest())
    assert not list(tmp_path.iterdir()), "nothing written"


def test_writes_leave_no_temp_files_and_overwrite(tmp_path: Path) -> None:
    write_results(tmp_path, timeline=serial_and_tiled(), baseline=SERIAL, manifest=toy_manifest())
    (tmp_path / "gantt_serial.png").write_bytes(b"stale plot of the first run")
    with pytest.raises(ParamInvalidError, match="is not empty"):
        write_results(tmp_path, timeline=two_rank_timeline(), baseline=RUN, manifest=toy_manifest())
    write_results(
        tmp_path, timeline=two_rank_timeline(), baseline=RUN, manifest=toy_manifest(),
        overwrite=True,
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "complete.json", "manifest.json", "summary.json", "tasks.csv", "trace.json",
    ], "the stale plot went with the old results"  # fmt: skip
    folder = read_results(tmp_path)
    assert dict(folder.runs) == {"tiles=2": RUN}
    assert len((tmp_path / "tasks.csv").read_text().splitlines()) == 5


# ----------------------------------------------------------------------------- reader rules


def _written(path: Path) -> Path:
    write_results(path, timeline=serial_and_tiled(), baseline=SERIAL, manifest=toy_manifest())
    return path


def _assert_broken(folder: Path, *words: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        read_results(folder)
    assert info.value.code == 161002
    assert str(folder) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_folders_written_otherwise_are_refused_naming_file_and_key(tmp_path: Path) -> None:
    old = _written(tmp_path / "old")
    data = json.loads((old / "manifest.json").read_text())
    del data["format"]
    (old / "manifest.json").write_text(json.dumps(data))
    _assert_broken(old, "manifest.json", "format", "another version")

    label_csv = _written(tmp_path / "labels")
    text = (label_csv / "tasks.csv").read_text().splitlines()
    text[0] = text[0].replace("op,tiling,repetition", "run")
    (label_csv / "tasks.csv").write_text("\n".join(text) + "\n")
    _assert_broken(label_csv, "tasks.csv", "lacks the columns", "'op'", "'tiling'")

    cases: list[tuple[str, Callable[[dict[str, Any]], object], tuple[str, ...]]] = [
        ("nobase", lambda s: s.pop("baseline"), ("summary.json", "'baseline'")),
        (
            "badbase",
            lambda s: s.__setitem__("baseline", {"op": OP, "tiling": "x", "repetition": 0}),
            ("summary.json", "not one of the runs"),
        ),
        (
            "badgolden",
            lambda s: s.__setitem__("golden", {"tiles=9": []}),
            ("summary.json", "tiles=9"),
        ),
        (
            "badverdict",
            lambda s: s.__setitem__("golden", {"serial": [{"standard": "allclose"}]}),
            ("summary.json", "golden['serial'][0]", "'passed'"),
        ),
        (
            "badrep",
            lambda s: s["runs"][0]["run"].__setitem__("repetition", "3"),
            ("summary.json", "runs[0].run.repetition", "integer"),
        ),
    ]
    for name, change, words in cases:
        folder = _written(tmp_path / name)
        summary = json.loads((folder / "summary.json").read_text())
        change(summary)
        (folder / "summary.json").write_text(json.dumps(summary))
        _assert_broken(folder, *words)

    mixed = _written(tmp_path / "mixed")
    with (mixed / "tasks.csv").open("a") as handle:
        handle.write(f"0,{OP},tiles=9,0,5,x,compute,matmul,0.0,1.0,0,0,1.0,0,0\n")
    _assert_broken(mixed, "tasks.csv holds the runs", "tiles=9")


# ----------------------------------------------------------------------------- Chrome trace


def test_chrome_trace_fields(tmp_path: Path) -> None:
    t = two_rank_timeline()
    write_results(tmp_path / "deep", timeline=t, baseline=RUN, manifest=toy_manifest())
    trace = json.loads((tmp_path / "deep" / "trace.json").read_text())
    assert trace == chrome_trace(t)
    assert trace["displayTimeUnit"] == "ms"
    assert trace["otherData"]["world_size"] == 2
    assert trace["otherData"]["mc2sim.source"] == "measured"
    events = trace["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    names = {(e["name"], e["pid"], e["tid"]): e["args"] for e in meta}
    assert names[("process_name", 0, 0)] == {"name": "rank 0"}
    assert names[("process_name", 1, 0)] == {"name": "rank 1"}
    for pid in (0, 1):
        assert names[("thread_name", pid, 0)] == {"name": "compute"}
        assert names[("thread_name", pid, 1)] == {"name": "comm"}
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 4
    comm0 = next(e for e in complete if e["pid"] == 0 and e["tid"] == 1)
    assert comm0["name"] == "allreduce[1]"
    assert comm0["cat"] == "allreduce"
    assert comm0["ts"] == pytest.approx(250_000.0)
    assert comm0["dur"] == pytest.approx(750_000.0)
    # the run's display label, for viewers only
    assert comm0["args"] == {
        "flops": 0, "bytes": 64, "run": "mm_all_reduce/tiles=2#0", "task": 1, "clock": "host"
    }  # fmt: skip
    comp1 = next(e for e in complete if e["pid"] == 1 and e["tid"] == 0)
    assert (comp1["ts"], comp1["dur"], comp1["args"]["flops"]) == (0.0, 750_000.0, 100)


def test_chrome_trace_lanes_and_runs() -> None:
    # two comm chunks in flight at once; a second run timed from its own epoch.
    second = key("second")
    t = Timeline(
        records=(
            rec("comm", 0, 2),
            rec("comm", 1, 3, task=1),
            rec("comm", 2, 4, task=2),
            rec("compute", 0, 1, run=second),
        )
    )
    trace = chrome_trace(t)
    x = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["args"]["task"], e["tid"]) for e in x if e["cat"] == "allreduce"] == [
        (0, 1),
        (1, 3),  # overlaps task 0: second comm lane
        (2, 1),  # starts when task 0 ends: back on the first lane
    ]
    threads = {
        e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"
    }
    assert threads == {0: "compute", 1: "comm", 3: "comm #2"}
    # the second run overlapped [0, 4]: moved to 4 + 0.1 * 4 = 4.4 s
    offsets = trace["otherData"]["mc2sim.run_offsets_s"]
    assert offsets == {str(RUN): 0.0, str(second): pytest.approx(4.4)}
    moved = next(e for e in x if e["args"]["run"] == str(second))
    assert moved["ts"] == pytest.approx(4.4e6)
    # runs already one after another keep their times
    seq = Timeline(records=(rec("compute", 0, 1), rec("compute", 1.5, 2, run=second)))
    assert chrome_trace(seq)["otherData"]["mc2sim.run_offsets_s"] == {
        str(RUN): 0.0,
        str(second): 0.0,
    }


def test_trace_json_is_what_json_writes_of_the_chrome_trace() -> None:
    """Lanes, two runs, a device-timed task (host lane) and texts JSON must escape."""
    odd = RunKey(op=OP, tiling='tiles "4"\\ é', repetition=1)
    device = dataclasses.replace(
        rec("compute", 0.25, 0.5, rank=1), clock=Clock.DEVICE, host_start_s=0.0, host_end_s=0.125
    )
    named = dataclasses.replace(rec("comm", 0.1, 0.7, task=3, run=odd), name='a "b"\n\tc ü')
    t = Timeline(
        records=(rec("comm", 0, 2), rec("comm", 1, 3, task=1), device, named),
        meta={"world_size": 2, "note": "ünï"},
    )
    assert results._trace_json(t) == json.dumps(chrome_trace(t), allow_nan=False)


def test_plot_file_names() -> None:
    assert results.gantt_png("serial") == "gantt_serial.png"
    assert results.gantt_png("hardware(tiles=3)") == "gantt_hardware_tiles_3.png"
    assert results.gantt_png("experts x 2") == "gantt_experts_x_2.png"
    assert results.gantt_png("()") == "gantt_tiling.png"


# ----------------------------------------------------------------------------- complete folders


def test_complete_json_is_written_last_and_certifies_every_file(tmp_path: Path) -> None:
    folder = _written(tmp_path / "done")
    marker = json.loads((folder / "complete.json").read_text())
    assert marker["format"] == results.FORMAT == 2 and marker["kind"] == "results"
    for name in ("manifest.json", "summary.json", "tasks.csv", "trace.json"):
        data = (folder / name).read_bytes()
        assert marker["files"][name] == {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    times = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert times["complete.json"] == max(times.values())


def test_a_folder_without_its_marker_is_incomplete(tmp_path: Path) -> None:
    folder = _written(tmp_path / "cut")
    (folder / "complete.json").unlink()
    _assert_broken(folder, "is incomplete", "complete.json", "did not finish")
    for name in ("manifest.json", "summary.json"):  # a run that died half-way through writing
        (folder / name).unlink()
        _assert_broken(folder, "is incomplete")


def test_a_crash_while_writing_leaves_no_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _atomic.write_atomic  # the function results imports as its write_atomic

    def dies_at_the_manifest(path: Path, data: Any, **kwargs: Any) -> Path:
        if Path(path).name == "manifest.json":
            raise OSError(28, "No space left on device")
        return real(path, data, **kwargs)

    monkeypatch.setattr(results, "write_atomic", dies_at_the_manifest)
    with pytest.raises(OSError, match="No space"):
        _written(tmp_path / "died")
    assert (tmp_path / "died" / "summary.json").exists()
    assert not (tmp_path / "died" / "complete.json").exists()
    _assert_broken(tmp_path / "died", "is incomplete")


@pytest.mark.parametrize("cut", [1, 7, "row"])
def test_a_tasks_csv_cut_short_is_refused(tmp_path: Path, cut: int | str) -> None:
    folder = _written(tmp_path / "cut")
    data = (folder / "tasks.csv").read_bytes()
    if cut == "row":  # at a row's end: only the marker's size and digest tell
        kept = data[: data.rstrip(b"\n").rindex(b"\n") + 1]
        (folder / "tasks.csv").write_bytes(kept)
        _assert_broken(folder, "tasks.csv is not the file its run wrote", "cut short")
    else:
        assert isinstance(cut, int)
        (folder / "tasks.csv").write_bytes(data[:-cut])
        _assert_broken(folder, "tasks.csv ends in the middle of a row")


def test_a_summary_of_another_run_is_refused(tmp_path: Path) -> None:
    first = _written(tmp_path / "first")
    second = tmp_path / "second"
    write_results(
        second, timeline=two_rank_timeline(key("tiles=2", 1)), baseline=key("tiles=2", 1),
        manifest=toy_manifest(),
    )  # fmt: skip
    (first / "summary.json").write_bytes((second / "summary.json").read_bytes())
    with pytest.raises(ParamInvalidError) as info:
        read_results(first)
    assert "summary.json" in str(info.value) or "tasks.csv" in str(info.value)
    # a summary that reads well with the other files, but is not the one its run wrote
    data = json.loads((second / "summary.json").read_text())
    data["runs"][0]["metrics"]["total_s"] = 0.5
    (second / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
    _assert_broken(second, "summary.json is not the file its run wrote")


def test_a_summary_for_another_world_size_is_refused(tmp_path: Path) -> None:
    folder = _written(tmp_path / "w")
    summary = json.loads((folder / "summary.json").read_text())
    summary["timeline_meta"]["world_size"] = 4
    (folder / "summary.json").write_text(json.dumps(summary))
    _assert_broken(folder, "timeline_meta.world_size=4", "manifest's (2)")
    with pytest.raises(ParamInvalidError, match="rank 1'.* below the world size 1"):
        write_results(
            tmp_path / "x", timeline=two_rank_timeline(), baseline=RUN,
            manifest=toy_manifest(world_size=1),
        )  # fmt: skip


def test_strings_for_numbers_in_the_summary_are_refused(tmp_path: Path) -> None:
    folder = _written(tmp_path / "s")
    summary = json.loads((folder / "summary.json").read_text())
    summary["runs"][0]["metrics"]["per_rank"][0]["flops"] = "many"
    (folder / "summary.json").write_text(json.dumps(summary))
    _assert_broken(folder, "per_rank[0].flops='many'", "integer")


def test_tasks_and_trace_may_be_deleted_but_not_replaced(tmp_path: Path) -> None:
    folder = _written(tmp_path / "slim")
    (folder / "tasks.csv").unlink()
    (folder / "trace.json").unlink()
    assert read_results(folder).timeline is None
    (folder / "trace.json").write_text("{}")
    _assert_broken(folder, "trace.json is not the file its run wrote")


def test_a_fresh_folder_is_needed_and_overwrite_clears_only_results(tmp_path: Path) -> None:
    assert results.check_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists(), "checking creates nothing"
    (tmp_path / "empty").mkdir()
    results.check_folder(tmp_path / "empty")
    old = _written(tmp_path / "old")
    (old / "gantt_serial.png").write_bytes(b"png")
    (old / ".summary.json.0123456789abcdef.tmp").write_text("left by a killed write")
    with pytest.raises(ParamInvalidError, match="is not empty: .* pass --overwrite") as info:
        results.check_folder(old, param="--out", hint="--overwrite")
    assert info.value.param == "--out"
    results.check_folder(old, overwrite=True)
    results.clear_folder(old)
    assert old.is_dir() and not list(old.iterdir())

    mine = _written(tmp_path / "mine")
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ParamInvalidError, match="'notes.txt', which mc2sim did not write"):
        results.check_folder(mine, overwrite=True)
    with pytest.raises(ParamInvalidError, match="did not write"):
        results.clear_folder(mine)
    assert (mine / "complete.json").exists(), "nothing deleted"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ParamInvalidError, match="is a file, not a folder"):
        results.check_folder(tmp_path / "afile")
    with pytest.raises(ParamInvalidError, match="afile is not a folder"):
        results.check_folder(tmp_path / "afile" / "sub")


def test_a_sweep_folder_lists_its_points_last(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for name in ("skew=0", "skew=1"):
        _written(sweep / name)
    with pytest.raises(ParamInvalidError, match="complete results folder"):
        results.write_sweep(sweep, {"skew=2": "skew=2"})
    results.write_sweep(sweep, {"skew=0": "skew=0", "skew=1": "skew=1"})
    assert results.read_sweep(sweep) == {"skew=0": sweep / "skew=0", "skew=1": sweep / "skew=1"}
    assert results.read_sweep(sweep / "skew=0") is None
    _assert_broken(sweep, "is a sweep's folder")
    with pytest.raises(ParamInvalidError, match="is not empty"):
        results.check_folder(sweep)
    results.clear_folder(sweep)
    assert not list(sweep.iterdir())


def test_a_link_to_a_results_folder_is_that_folder(tmp_path: Path) -> None:
    old = _written(tmp_path / "old")
    link = tmp_path / "latest"
    link.symlink_to(old, target_is_directory=True)
    with pytest.raises(ParamInvalidError, match="is not empty"):
        results.check_folder(link)
    paths = write_results(
        link, timeline=two_rank_timeline(), baseline=RUN, manifest=toy_manifest(), overwrite=True
    )
    assert paths["complete"].parent == link and link.is_symlink()
    assert dict(read_results(old).runs) == {"tiles=2": RUN}
    (old / "elsewhere").symlink_to(tmp_path)
    with pytest.raises(ParamInvalidError, match="'elsewhere', which mc2sim did not write"):
        results.check_folder(old, overwrite=True)
