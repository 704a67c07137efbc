"""Reports of results folders: tables, predicted vs measured errors, PNG plots, broken folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mc2sim.errors import ParamInvalidError
from mc2sim.report import gantt_ranks, ms_column, report, tile_count
from mc2sim.results import GoldenVerdict, read_results, write_results
from mc2sim.timeline import RunKey, Source, Stream, TaskRecord, Timeline

from .fakes import toy_manifest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OP = "mm_all_reduce"

# tiling -> (total, compute, comm, exposed) in seconds, overlap %, speedup
MEASURED = {
    "serial": ((2.0e-3, 1.2e-3, 0.8e-3, 0.8e-3), 0.0, 1.0),
    "hardware(tiles=3)": ((1.5e-3, 1.2e-3, 0.9e-3, 0.3e-3), 62.5, 2.0 / 1.5),
    "tiles=2": ((1.6e-3, 1.2e-3, 0.85e-3, 0.4e-3), 50.0, 2.0 / 1.6),
    "tiles=4": ((1.4e-3, 1.2e-3, 1.0e-3, 0.2e-3), 75.0, 2.0 / 1.4),
}
SIMULATED = {  # no "tiles=4": the comparison covers the tilings both ran
    "serial": ((2.2e-3, 1.3e-3, 0.9e-3, 0.9e-3), 0.0, 1.0),
    "hardware(tiles=3)": ((1.5e-3, 1.3e-3, 0.9e-3, 0.2e-3), 77.0, 2.2 / 1.5),
    "tiles=2": ((3.2e-3, 1.3e-3, 0.95e-3, 1.9e-3), 0.0, 2.2 / 3.2),
}


def _verdict(rank: int, passed: bool) -> GoldenVerdict:
    return GoldenVerdict(
        standard="allclose", passed=passed, dtype="float16", numel=8,
        mismatches=0 if passed else 3, mismatch_fraction=0.0 if passed else 3 / 8,
        allowed_fraction=0.0, max_abs_error=0.0 if passed else 1.0, max_rel_error=0.0,
        rank=rank,
    )  # fmt: skip


def _write_folder(
    path: Path,
    table: dict[str, Any],
    *,
    source: str = "measured",
    skew: float = 1.0,
    golden: dict[str, list[bool]] | None = None,
    scenario: str = "toy",
) -> Path:
    """Write a small results folder of two ranks: each tiling's run takes its table total.

    On each rank a run computes over [0, total/2] and communicates over [total/4, total].
    """
    records = []
    for i, (tiling, ((total, *_), *_)) in enumerate(table.items()):
        run = RunKey(op=OP, tiling=tiling, repetition=i)
        for rank in range(2):
            records.append(
                TaskRecord(
                    rank=rank, run=run, task=0, name="matmul[0]", stream=Stream.COMPUTE,
                    kind="matmul", start_s=0.0, end_s=total / 2, flops=10,
                )
            )  # fmt: skip
            records.append(
                TaskRecord(
                    rank=rank, run=run, task=1, name="allreduce[0]", stream=Stream.COMM,
                    kind="allreduce", start_s=total / 4, end_s=total, bytes=64,
                )
            )  # fmt: skip
    timeline = Timeline(records=tuple(records), source=Source(source))
    verdicts = {
        tiling: [_verdict(rank, ok) for rank, ok in enumerate(outcomes)]
        for tiling, outcomes in (golden or {}).items()
    }
    write_results(
        path, timeline=timeline, baseline=RunKey(op=OP, tiling="serial", repetition=0),
        manifest=toy_manifest(source=source, scenario=scenario, skew=skew, tilings=list(table)),
        verdicts=verdicts,
    )  # fmt: skip
    return path


def _row(tables: str, header: str, tiling: str) -> list[str]:
    """The cells of ``tiling``'s row in the table under the line starting with ``header``."""
    block = tables[tables.index(header) :].split("\n\n", 1)[0]
    for line in block.splitlines():
        if line.startswith(tiling + " "):
            return line[26:].split()
    raise AssertionError(f"no row {tiling!r} under {header!r}:\n{block}")


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.000059, "0.059"),
        (12.3456789, "12345.679"),
        (123.456789, "1.235e+05"),  # 123456.789 in .3f is 10 characters: no room for a space
        (3.414e16, "3.414e+19"),
    ],
)
def test_a_column_of_ms_keeps_its_width_for_any_size(seconds: float, text: str) -> None:
    column = ms_column(seconds)
    assert len(column) == 10 and column.strip() == text
    assert float(text) == pytest.approx(seconds * 1e3, rel=1e-3)


def test_tile_counts_of_tilings_in_words() -> None:
    assert [tile_count(t) for t in ("serial", "tiles=4", "experts x 8", "ranks x 2")] == [
        1, 4, 8, 2,
    ]  # fmt: skip
    assert tile_count("hardware(tiles=3)") == 3
    assert tile_count("hardware(per expert)") is None


def test_tables_hold_the_summary_numbers_and_golden_verdicts(tmp_path: Path) -> None:
    golden = {
        "serial": [True, True],
        "hardware(tiles=3)": [True, False],
        "tiles=2": [True, True],
    }
    folder = _write_folder(tmp_path / "run", MEASURED, golden=golden)
    result = report([folder], plots=False)
    assert result.plots == () and result.comparisons == ()
    assert not list(folder.glob("*.png"))
    summary = read_results(folder)
    header = "# toy: mm_all_reduce, 2 ranks, measured, skew 1"
    assert header in result.tables
    expected_golden = {"serial": "pass", "hardware(tiles=3)": "FAIL", "tiles=2": "pass"}
    assert set(summary.metrics) == set(MEASURED)
    for tiling, m in summary.metrics.items():
        cells = _row(result.tables, header, tiling)
        assert m.total_s == MEASURED[tiling][0][0]
        expected = [
            m.total_s * 1e3, m.compute_s * 1e3, m.comm_s * 1e3, m.exposed_comm_s * 1e3,
            m.overlap_pct, m.speedup,
        ]  # fmt: skip
        printed = [float(c) for c in cells[:6]]
        # ms to 3 decimals, overlap % to 1, speedup to 2
        for got, want, places in zip(printed, expected, (3, 3, 3, 3, 1, 2), strict=True):
            assert got == pytest.approx(want, abs=0.6 * 10.0**-places)
        assert cells[6] == expected_golden.get(tiling, "-")
    # rows come serial first, hardware next, then by tile count
    order = [line.split()[0] for line in result.tables.splitlines()[2:]]
    assert order == ["serial", "hardware(tiles=3)", "tiles=2", "tiles=4"]


def test_predicted_vs_measured_error_geomean_and_plots(tmp_path: Path) -> None:
    measured = _write_folder(tmp_path / "run", MEASURED)
    simulated = _write_folder(tmp_path / "sim", SIMULATED, source="simulated")
    out = tmp_path / "plots"
    result = report([measured, simulated], out)

    # errors by hand: max/min - 1 of the totals, over the tilings both folders ran
    errors = {"serial": 2.2 / 2.0 - 1, "hardware(tiles=3)": 0.0, "tiles=2": 3.2 / 1.6 - 1}
    geomean = (2.2 / 2.0 * 1.0 * 3.2 / 1.6) ** (1 / 3) - 1
    (pair,) = result.comparisons
    assert pair.measured.path == measured and pair.simulated.path == simulated
    assert {r.tiling: r.error for r in pair.rows} == pytest.approx(errors)
    assert pair.geomean_error == pytest.approx(geomean)
    header = "# predicted vs measured: toy, 2 ranks"
    for tiling, error in errors.items():
        cells = _row(result.tables, header, tiling)
        assert float(cells[0]) == pytest.approx(MEASURED[tiling][0][0] * 1e3, abs=1e-3)
        assert float(cells[1]) == pytest.approx(SIMULATED[tiling][0][0] * 1e3, abs=1e-3)
        assert cells[2] == f"{error:.1%}"
    with pytest.raises(AssertionError):
        _row(result.tables, header, "tiles=4")
    assert f"geomean error over 3 tilings: {geomean:.1%}" in result.tables
    assert f"{geomean:.1%}" == "30.1%"

    names = sorted(p.name for p in result.plots)
    assert names == sorted(
        ["gantt_serial.png", "gantt_hardware_tiles_3.png", "gantt_tiles_2.png",
         "gantt_tiles_4.png", "speedup.png", "predicted_vs_measured.png"]
    )  # fmt: skip
    for path in result.plots:
        assert path.parent == out
        _assert_png(path)
    assert not list(out.glob(".*")), "temporary files left behind"
    assert not (out / "overlap_vs_skew.png").exists()  # one skew only: skipped


def test_overlap_vs_skew_needs_two_skews_and_plots_go_to_the_first_folder(
    tmp_path: Path,
) -> None:
    low = _write_folder(tmp_path / "skew1", MEASURED, skew=1.0)
    high = _write_folder(tmp_path / "skew2", MEASURED, skew=2.0)
    result = report([low, high])
    assert low / "overlap_vs_skew.png" in result.plots
    _assert_png(low / "overlap_vs_skew.png")
    assert not list(high.glob("*.png"))
    assert result.comparisons == ()  # two measured folders: nothing to compare
    assert "predicted vs measured" not in result.tables


def test_report_of_a_simulated_study(tmp_path: Path) -> None:
    from mc2sim import study as studies
    from mc2sim.scenario import builtin

    scenario = builtin("llama70b_tp8_decode", ["scale=small"])
    study = studies.simulate_study(scenario, scenario.load_topology())
    studies.write_results(study, tmp_path / "sim")
    folder = read_results(tmp_path / "sim")
    manifest = folder.manifest
    assert manifest.source is Source.SIMULATED and manifest.world_size == study.world
    assert manifest.scenario == scenario.name
    expected = study.metrics()
    assert set(folder.metrics) == set(expected)
    for tiling, m in expected.items():
        assert folder.metrics[tiling].total_s == m.total_s
        assert folder.metrics[tiling].overlap_pct == m.overlap_pct
    assert folder.runs == study.runs and folder.baseline == study.baseline
    assert folder.timeline == study.timeline
    result = report([tmp_path / "sim"], tmp_path / "out")
    gantts = [p for p in result.plots if p.name.startswith("gantt_")]
    assert len(gantts) == len(expected)
    for path in result.plots:
        _assert_png(path)


def _assert_broken(folder: Path, *words: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        read_results(folder)
    assert info.value.code == 161002
    assert str(folder) in str(info.value)
    for word in words:
        assert word in str(info.value)
    with pytest.raises(ParamInvalidError):  # report() raises the same
        report([folder])


def test_folders_that_are_not_results_folders(tmp_path: Path) -> None:
    _assert_broken(tmp_path / "absent", "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_broken(empty, "not a results folder", "manifest.json is missing")

    folder = _write_folder(tmp_path / "run", MEASURED)
    (folder / "summary.json").unlink()
    _assert_broken(folder, "summary.json is missing")

    folder = _write_folder(tmp_path / "badjson", MEASURED)
    (folder / "summary.json").write_text("{not json")
    _assert_broken(folder, "summary.json is not valid JSON")

    folder = _write_folder(tmp_path / "nokey", MEASURED)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["world_size"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _assert_broken(folder, "manifest.json", "'world_size'")

    folder = _write_folder(tmp_path / "badrun", MEASURED)
    serial = {"op": "op", "tiling": "serial", "repetition": 0}
    broken = {"run": serial, "metrics": {"total_s": 1}}
    (folder / "summary.json").write_text(
        json.dumps({"baseline": serial, "runs": [broken], "golden": {}, "timeline_meta": {}})
    )
    _assert_broken(folder, "summary.json", "op/serial#0")

    folder = _write_folder(tmp_path / "badtask", MEASURED)
    with (folder / "tasks.csv").open("a") as handle:
        handle.write(f"0,{OP},serial,0,2,x,disk,matmul,0.0,1.0,0,0,1.0\n")
    _assert_broken(folder, "tasks.csv line", "disk")

    # without tasks.csv a folder still reports: tables, and every plot but the Gantt charts
    folder = _write_folder(tmp_path / "notasks", MEASURED)
    (folder / "tasks.csv").unlink()
    assert read_results(folder).timeline is None
    result = report([folder])
    assert "# toy: mm_all_reduce, 2 ranks, measured" in result.tables
    assert [p.name for p in result.plots] == ["speedup.png"]

    with pytest.raises(ParamInvalidError) as info:
        report([])
    assert info.value.code == 161002


def test_a_gantt_of_many_ranks_draws_the_ones_with_the_most_compute() -> None:
    run = RunKey(op="gmm_alltoallv", tiling="serial", repetition=0)

    def record(rank: int, task: int, stream: Stream, start: float, end: float) -> TaskRecord:
        return TaskRecord(rank=rank, run=run, task=task, name="t", stream=stream,
                          kind="k", start_s=start, end_s=end)  # fmt: skip

    # 40 ranks; rank r computes (r * 7) % 40 ms in two tasks, then every rank's collective
    # ends at 100 ms (its comm time does not count): the 16 with the most compute are the
    # ranks r with (r * 7) % 40 >= 24
    records = []
    for r in range(40):
        ms = ((r * 7) % 40) * 1e-3
        records += [
            record(r, 0, Stream.COMPUTE, 0.0, ms / 4),
            record(r, 1, Stream.COMPUTE, 0.05, 0.05 + ms * 3 / 4),
            record(r, 2, Stream.COMM, 0.0, 0.1),
        ]
    heavy = [r for r in range(40) if (r * 7) % 40 >= 24]
    assert len(heavy) == 16 and gantt_ranks(records) == heavy
    assert gantt_ranks(records, limit=40) == list(range(40))
    # equals: the lower rank first
    tied = [record(r, 0, Stream.COMPUTE, 0.0, 1.0) for r in range(20)]
    assert gantt_ranks(tied, limit=3) == [0, 1, 2]
