"""Reports of results folders: tables, predicted vs measured errors, PNG plots, broken folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from mc2sim.errors import ParamInvalidError
from mc2sim.report import load_results, report, tile_count, tiling_of_run

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


def _metrics(times: tuple[float, float, float, float], overlap: float, speedup: float) -> Any:
    total, compute, comm, exposed = times
    rank = {
        "rank": 0, "total_s": total, "compute_s": compute, "comm_s": comm,
        "exposed_comm_s": exposed, "pure_comm_s": comm, "overlap_pct": overlap,
        "flops": 0, "bytes": 0,
    }  # fmt: skip
    return {
        "per_rank": [rank],
        "critical_rank": 0,
        "total_s": total,
        "compute_s": compute,
        "comm_s": comm,
        "exposed_comm_s": exposed,
        "overlap_pct": overlap,
        "speedup": speedup,
    }


def _write_folder(
    path: Path,
    table: dict[str, Any],
    *,
    source: str = "measured",
    skew: float = 1.0,
    golden: dict[str, list[str]] | None = None,
    scenario: str = "toy",
) -> Path:
    """Write a small results folder by hand: manifest, summary and a two-rank tasks CSV."""
    path.mkdir(parents=True)
    manifest = {
        "scenario": scenario, "op": OP, "shape": {"m": 8}, "scale": "small",
        "tilings": list(table), "routing": {"kind": "balanced", "seed": 0, "skew": skew},
        "topology": "toy", "world_size": 2, "source": source, "hosts": ["vm"],
    }  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    runs = {f"{OP}/{tiling}#{i}": _metrics(*row) for i, (tiling, row) in enumerate(table.items())}
    summary: dict[str, Any] = {"meta": {"source": source}, "runs": runs}
    if golden is not None:
        summary["golden"] = golden
    (path / "summary.json").write_text(json.dumps(summary))
    with (path / "tasks.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["rank", "run", "task", "name", "stream", "kind", "start_s", "end_s", "flops",
             "bytes", "duration_s"]
        )  # fmt: skip
        for label, data in runs.items():
            total = data["total_s"]
            for rank in range(2):
                writer.writerow([rank, label, 0, "matmul[0]", "compute", "matmul", 0.0,
                                 total / 2, 10, 0, total / 2])  # fmt: skip
                writer.writerow([rank, label, 1, "allreduce[0]", "comm", "allreduce",
                                 total / 4, total, 0, 64, 0.75 * total])  # fmt: skip
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


def test_tiling_words_and_tile_counts() -> None:
    assert tiling_of_run("gmm_alltoallv/experts x 2#16") == "experts x 2"
    assert tiling_of_run("mm_all_reduce/hardware(tiles=3)#sim") == "hardware(tiles=3)"
    assert [tile_count(t) for t in ("serial", "tiles=4", "experts x 8", "ranks x 2")] == [
        1, 4, 8, 2,
    ]  # fmt: skip
    assert tile_count("hardware(tiles=3)") == 3
    assert tile_count("hardware(per expert)") is None
    with pytest.raises(ParamInvalidError):
        tiling_of_run("no-slash#0")


def test_tables_hold_the_summary_numbers_and_golden_verdicts(tmp_path: Path) -> None:
    golden = {
        "serial": ["rank 0: allclose (float16) PASS: 0/8 elements", "rank 1: x PASS: 0/8"],
        "hardware(tiles=3)": ["rank 0: allclose (float16) PASS: 0/8", "rank 1: y FAIL: 3/8"],
        "tiles=2": ["rank 0: allclose (float16) PASS: 0/8", "rank 1: z PASS: 0/8"],
    }
    folder = _write_folder(tmp_path / "run", MEASURED, golden=golden)
    result = report([folder], plots=False)
    assert result.plots == () and result.comparisons == ()
    assert not list(folder.glob("*.png"))
    summary = json.loads((folder / "summary.json").read_text())
    header = "# toy: mm_all_reduce, 2 ranks, measured, skew 1"
    assert header in result.tables
    expected_golden = {"serial": "pass", "hardware(tiles=3)": "FAIL", "tiles=2": "pass"}
    for label, m in summary["runs"].items():
        tiling = label.split("/")[1].split("#")[0]
        cells = _row(result.tables, header, tiling)
        assert [float(c) for c in cells[:6]] == pytest.approx(
            [
                m["total_s"] * 1e3, m["compute_s"] * 1e3, m["comm_s"] * 1e3,
                m["exposed_comm_s"] * 1e3, m["overlap_pct"], m["speedup"],
            ],
            abs=6e-3,
        )  # fmt: skip
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
    from mc2sim.scenario import builtin
    from mc2sim.study import simulate_study, write_results

    scenario = builtin("llama70b_tp8_decode", ["scale=small"])
    study = simulate_study(scenario, scenario.load_topology())
    write_results(study, tmp_path / "sim")
    folder = load_results(tmp_path / "sim")
    assert folder.source == "simulated" and folder.world_size == study.world
    assert folder.scenario == scenario.name
    expected = study.metrics()
    assert set(folder.metrics) == set(expected)
    for tiling, m in expected.items():
        assert folder.metrics[tiling].total_s == m.total_s
        assert folder.metrics[tiling].overlap_pct == m.overlap_pct
    assert len(folder.timeline.records) == len(study.timeline.records)
    result = report([tmp_path / "sim"], tmp_path / "out")
    gantts = [p for p in result.plots if p.name.startswith("gantt_")]
    assert len(gantts) == len(expected)
    for path in result.plots:
        _assert_png(path)


def _assert_broken(folder: Path, *words: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        load_results(folder)
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
    (folder / "manifest.json").write_text(json.dumps({"scenario": "toy", "source": "measured"}))
    _assert_broken(folder, "manifest.json", "'world_size'")

    folder = _write_folder(tmp_path / "badrun", MEASURED)
    (folder / "summary.json").write_text(json.dumps({"runs": {"op/serial#0": {"total_s": 1}}}))
    _assert_broken(folder, "summary.json", "op/serial#0")

    folder = _write_folder(tmp_path / "badtask", MEASURED)
    with (folder / "tasks.csv").open("a") as handle:
        handle.write("0,op/serial#0,2,x,disk,matmul,0.0,1.0,0,0,1.0\n")
    _assert_broken(folder, "tasks.csv line", "disk")

    folder = _write_folder(tmp_path / "notasks", MEASURED)
    (folder / "tasks.csv").unlink()
    _assert_broken(folder, "tasks.csv is missing")

    with pytest.raises(ParamInvalidError) as info:
        report([])
    assert info.value.code == 161002
