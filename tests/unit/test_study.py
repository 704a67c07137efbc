"""Scenario studies simulated end to end: plans, simulation, results folder, command line."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from mc2sim.cli import main
from mc2sim.results import read_results
from mc2sim.scenario import Scenario, builtin, list_builtin, load
from mc2sim.schedule import Plan, TaskKind
from mc2sim.study import plans_for, simulate_study, write_results
from mc2sim.timeline import Source


@pytest.mark.parametrize("name", list_builtin())
def test_every_shipped_scenario_simulates(name: str) -> None:
    scenario = builtin(name, ["scale=small"])
    result = simulate_study(scenario, scenario.load_topology())
    metrics = result.metrics()
    assert "serial" in metrics and metrics["serial"].speedup == pytest.approx(1.0)
    serial = metrics["serial"]
    for m in metrics.values():
        assert m.total_s > 0
        assert len(m.per_rank) == scenario.ranks
        # OSU overlap against the serial run's comm time on the critical rank (t_pure)
        pure = serial.per_rank[m.critical_rank].comm_s
        overlap = 100 * (1 - (m.total_s - m.compute_s) / pure) if pure else 0.0
        assert m.overlap_pct == pytest.approx(min(100.0, max(0.0, overlap)), abs=1e-9)

    # every tiling's plans carry the same matrix work as the serial one (the per-rank
    # MatmulReduceScatter adds a reduce task where the serial plan's collective reduces)
    def matrix_flops(plan: Plan) -> int:
        return sum(t.flops for t in plan.tasks if t.kind is not TaskKind.REDUCE)

    serial_plan = plans_for(scenario, scenario.ranks, "serial")[0]
    for tiling in scenario.tilings:
        assert matrix_flops(plans_for(scenario, scenario.ranks, tiling)[0]) == matrix_flops(
            serial_plan
        )


def test_study_at_another_world_size_and_its_results_folder(tmp_path: Path) -> None:
    scenario = builtin("llama70b_tp8_decode", ["tilings=serial,hardware,2", "scale=small"])
    result = simulate_study(scenario, scenario.load_topology(), world=4)
    assert result.world == 4
    tilings = list(result.runs)
    assert len(tilings) == 3
    assert tilings[0] == "serial" and tilings[1].startswith("hardware(") and tilings[2] == "tiles=2"
    paths = write_results(result, tmp_path)
    folder = read_results(tmp_path)
    manifest = folder.manifest
    assert manifest.scenario == "llama70b_tp8_decode" and manifest.world_size == 4
    assert manifest.source is Source.SIMULATED and manifest.topology == result.topology.name
    assert manifest.tilings == ("serial", "hardware", "2")
    assert manifest.shape == scenario.effective_shape() and manifest.scale == "small"
    assert folder.runs == result.runs and folder.baseline == result.runs["serial"]
    assert folder.metrics == result.metrics()
    trace = json.loads(paths["trace"].read_text())
    assert {e["pid"] for e in trace["traceEvents"] if e.get("ph") == "X"} == set(range(4))
    with paths["tasks"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.timeline.records)


def test_a_studys_metrics_are_computed_once_and_are_the_timelines() -> None:
    """The metrics the study keeps (the table's and the files') are those of its timeline."""
    from mc2sim.errors import ParamInvalidError
    from mc2sim.results import encode_results
    from mc2sim.study.simulate import encode_study, manifest_of

    scenario = builtin("seed_gmm_alltoallv_ep4", ["scale=small"])
    result = simulate_study(scenario, scenario.load_topology())
    per_run = result.timeline.by_run()
    base = per_run[result.baseline]
    for tiling, run in result.runs.items():
        assert result.metrics()[tiling] == per_run[run].metrics(baseline=base)
    files = encode_study(result, argv=["x"])
    manifest = manifest_of(
        scenario, topology=result.topology.name, world=result.world, source="simulated",
        argv=["x"],
    )  # fmt: skip
    computed = encode_results(timeline=result.timeline, baseline=result.baseline, manifest=manifest)
    assert computed["summary.json"] == files["summary.json"]
    runs = list(result.by_run)
    with pytest.raises(ParamInvalidError, match="metrics") as info:
        encode_results(
            timeline=result.timeline, baseline=result.baseline, manifest=manifest,
            metrics={run: result.by_run[run] for run in runs[1:]},
        )  # fmt: skip
    assert info.value.code == 161002


def test_command_line_simulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    status = main(
        [
            "simulate",
            "seed_gmm_alltoallv_ep4",
            "--set",
            "scale=small",
            "--ranks",
            "4",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "serial" in printed and f"results: {out}" in printed
    data = {"manifest.json", "summary.json", "tasks.csv", "trace.json", "complete.json"}
    plots = {
        "gantt_serial.png",
        "gantt_hardware_per_expert.png",
        "gantt_experts_x_2.png",
        "gantt_experts_x_4.png",
        "speedup.png",
    }
    assert {p.name for p in out.iterdir()} == data | plots
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plots: 5 PNG in" in printed
    quick = tmp_path / "quick"
    status = main(
        ["simulate", "seed_gmm_alltoallv_ep4", "--set", "scale=small", "--no-plots",
         "--out", str(quick)]
    )  # fmt: skip
    assert status == 0
    assert {p.name for p in quick.iterdir()} == data
    # the manifest records the command line, the overrides and the scenario file read
    manifest = read_results(quick).manifest
    assert manifest.argv == (
        "mc2sim", "simulate", "seed_gmm_alltoallv_ep4", "--set", "scale=small", "--no-plots",
        "--out", str(quick),
    )  # fmt: skip
    assert manifest.overrides == ("scale=small",)
    shipped = Path(__file__).parents[2] / "scenarios" / "seed_gmm_alltoallv_ep4.yaml"
    assert manifest.scenario_path is not None
    assert Path(manifest.scenario_path).name == shipped.name
    assert manifest.scenario_sha256 == hashlib.sha256(shipped.read_bytes()).hexdigest()
    # a measured folder's totals, compared tiling by tiling (here a twin: error 0)
    import dataclasses

    from mc2sim.results import write_results as write_folder

    done = read_results(quick)
    assert done.timeline is not None
    ran = tmp_path / "ran"
    write_folder(
        ran, timeline=dataclasses.replace(done.timeline, source=Source.MEASURED),
        baseline=done.baseline,
        manifest=dataclasses.replace(done.manifest, source=Source.MEASURED),
    )  # fmt: skip
    capsys.readouterr()
    again = tmp_path / "again"
    status = main(
        ["simulate", "seed_gmm_alltoallv_ep4", "--set", "scale=small", "--no-plots",
         "--measured", str(ran), "--out", str(again)]
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    totals = read_results(ran).totals()
    for tiling, total in totals.items():
        row = next(line for line in printed.splitlines() if line.startswith(tiling + " "))
        assert row.endswith(f"{total * 1e3:>10.3f}{0.0:>8.1%}")
    # a run of another call, or a simulation, is refused: one line, nothing written
    for argv, rule in (
        (["--set", "scale=small", "--ranks", "2"], "ranks 4 there, 2 here"),
        ([], "shape {'tokens': 64,"),
        (["--set", "scale=small", "--measured", str(quick)], "(it holds a simulation)"),
    ):
        out = tmp_path / f"refused{len(argv)}"
        given = ["simulate", "seed_gmm_alltoallv_ep4", "--measured", str(ran), *argv]
        assert main([*given, "--no-plots", "--out", str(out)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("mc2sim simulate: --measured='") and rule in line, line
        assert not out.exists()


def test_a_fit_compared_with_a_run_runs_at_the_runs_speed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses

    from mc2sim.results import write_results
    from mc2sim.topology import builtin as topology_of
    from mc2sim.topology import dump

    fit = topology_of("this_machine_4ranks")
    probed = tmp_path / "fit.yaml"
    dump(dataclasses.replace(fit, device=dataclasses.replace(fit.device, probe_tflops=0.2)), probed)
    args = ["simulate", "seed_gmm_alltoallv_ep4", "--set", "scale=small", "--ranks", "4"]
    base = tmp_path / "base"
    assert main([*args, "--topology", str(probed), "--no-plots", "--out", str(base)]) == 0
    # a run of the same plans whose probe read half the fit's: the machine ran half as fast
    done = read_results(base)
    assert done.timeline is not None
    run = tmp_path / "run"
    measured = dataclasses.replace(done.timeline, source=Source.MEASURED)
    write_results(
        run, timeline=measured, baseline=done.baseline,
        manifest=dataclasses.replace(done.manifest, probe_tflops=0.1, source=Source.MEASURED),
    )  # fmt: skip
    totals = done.totals()
    for extra, factor in (([], 1.0), (["--at-run-speed"], 2.0)):
        capsys.readouterr()
        out = tmp_path / f"sim{len(extra)}"
        argv = [*args, "--topology", str(probed), "--measured", str(run), "--no-plots"]
        assert main([*argv, *extra, "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        (said,) = [line for line in printed.splitlines() if line.startswith("# ")][1:]
        read = "its probe (a float32 1024^3 matmul on a core) read 0.1 TFLOP/s, the fit's 0.2"
        if extra:
            assert said == f"# at the run's speed: {read}: the fit's times x2.00"
        else:  # as fitted, but said: the probes differ by more than SPEED_NOTE
            assert (
                said
                == f"# the run ran at x0.50 the fit's pace: {read} (--at-run-speed runs the fit at it)"
            )
        for tiling, total in read_results(out).totals().items():
            assert total == pytest.approx(totals[tiling] * factor, rel=1e-9)
    # within SPEED_NOTE of the fit's probe: nothing to say
    near = tmp_path / "near"
    write_results(
        near, timeline=measured, baseline=done.baseline,
        manifest=dataclasses.replace(done.manifest, probe_tflops=0.21, source=Source.MEASURED),
    )  # fmt: skip
    capsys.readouterr()
    argv = [*args, "--topology", str(probed), "--measured", str(near), "--no-plots"]
    assert main([*argv, "--out", str(tmp_path / "sim_near")]) == 0
    assert "pace" not in capsys.readouterr().out
    # a topology without a probe (described on paper, or fitted before probes) is as it is
    capsys.readouterr()
    out = tmp_path / "plain"
    plain = [*args, "--topology", "atlas_a2_8p", "--measured", str(run), "--no-plots"]
    assert main([*plain, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pace" not in printed and "# at the run's speed" not in printed
    err = main([*plain, "--at-run-speed", "--out", str(tmp_path / "never")])
    assert err == 2 and "the topology has no speed probe" in capsys.readouterr().err


def test_broken_scenario_exits_2_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = (Path(__file__).parents[2] / "scenarios" / "llama70b_tp8_decode.yaml").read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text(good.replace("op: mm_all_reduce", "op: mm_allreduce"))
    status = main(["simulate", str(broken), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{broken}: op=" in err and "mm_all_reduce" in err
    assert not (tmp_path / "never").exists()
    status = main(["simulate", "llama70b_tp8_decode", "--set", "shape.q=1"])
    assert status == 2
    assert "--set shape.q" in capsys.readouterr().err


def test_load_path_and_builtin_agree() -> None:
    path = Path(__file__).parents[2] / "scenarios" / "mixtral_8x7b_combine.yaml"
    assert load(path) == builtin("mixtral_8x7b_combine")


def test_sweep_simulates_every_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    status = main(
        [
            "sweep", "qwen3_moe_combine",
            "--set", "scale=small", "--set", "routing.skew=0.0,2.0", "--set", "tilings=serial,2",
            "--out", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["routing.skew=0.0", "routing.skew=2.0"]
    assert {"speedup.png", "overlap_vs_skew.png"} <= {p.name for p in out.iterdir()}
    for folder, skew in zip(folders, (0.0, 2.0), strict=True):
        manifest = read_results(out / folder).manifest
        assert manifest.routing.skew == skew
        assert manifest.tilings == ("serial", "2")
    assert printed.count("experts x 2") == 2
    # the sweep's folder is complete once every point is; report reads all of its points
    marker = json.loads((out / "complete.json").read_text())
    assert marker["kind"] == "sweep" and list(marker["points"]) == folders
    manifest = read_results(out / folders[1]).manifest
    assert manifest.overrides == ("scale=small", "tilings=serial,2", "routing.skew=2.0")
    assert manifest.argv[:3] == ("mc2sim", "sweep", "qwen3_moe_combine")
    assert manifest.scenario_path is not None and manifest.scenario_sha256 is not None
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.count("# qwen3_moe_combine") == 2


def test_out_must_be_fresh_and_overwrite_replaces_old_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    small = ["simulate", "llama70b_tp8_decode", "--set", "scale=small", "--out", str(out)]
    assert main(small) == 0
    assert (out / "gantt_tiles_2.png").exists()
    capsys.readouterr()
    again = [*small, "--set", "tilings=serial,4", "--no-plots"]
    assert main(again) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert read_results(out).manifest.tilings != ("serial", "4"), "the old results are kept"
    assert main([*again, "--overwrite"]) == 0
    assert read_results(out).manifest.tilings == ("serial", "4")
    assert not list(out.glob("*.png")), "no stale plot of the earlier run is left beside it"


def test_a_crash_mid_run_leaves_no_complete_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mc2sim import _atomic, results

    out = tmp_path / "study"
    small = ["simulate", "llama70b_tp8_decode", "--set", "scale=small", "--no-plots"]
    assert main([*small, "--out", str(out)]) == 0

    write = _atomic.write_atomic  # the function results imports as its write_atomic

    def crash(path: Path, data: str | bytes, **kwargs: Any) -> Path:
        if Path(path).name == "manifest.json":
            raise RuntimeError("killed while writing")
        return write(path, data, **kwargs)

    monkeypatch.setattr(results, "write_atomic", crash)
    with pytest.raises(RuntimeError, match="killed"):
        main([*small, "--out", str(out), "--overwrite"])
    assert (out / "summary.json").exists() and not (out / "complete.json").exists()
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is incomplete" in err and "Traceback" not in err


def test_check_counts_on_a_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "counts.json"
    # 2 ranks, 2 experts: send[r][q*2+j], recv[q][r*2+j] built by hand to agree
    send = [[1, 0, 2, 3], [4, 5, 0, 6]]
    recv = [[1, 0, 4, 5], [2, 3, 0, 6]]
    dump.write_text(json.dumps({"experts_per_rank": 2, "send_counts": send, "recv_counts": recv}))
    assert main(["check-counts", str(dump)]) == 0
    assert "consistent: 2 ranks, 2 experts per rank, 21 rows" in capsys.readouterr().out
    recv[1][1] = 9  # receiver 1 expects 9 rows of expert 1 from rank 0, which sends 3
    dump.write_text(json.dumps({"experts_per_rank": 2, "send_counts": send, "recv_counts": recv}))
    assert main(["check-counts", str(dump)]) == 1
    err = capsys.readouterr().err
    assert "recv_counts[1] on rank 1 = 9 but send_counts[3] on rank 0 = 3" in err
    assert "(receiver q=1, sender r=0, expert j=1)" in err
    dump.write_text(
        json.dumps({"experts_per_rank": 2, "send_counts": [[1, 2, 3]], "recv_counts": [[1, 2]]})
    )
    assert main(["check-counts", str(dump)]) == 2
    assert capsys.readouterr().err == (
        f"mc2sim check-counts: {dump}: len(send_counts[0])=3: must be e * ep_world_size = "
        "2 * 1 = 2\n"
    )
    assert main(["check-counts", str(tmp_path / "missing.json")]) == 2


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "study"
    assert (
        main(["simulate", "llama70b_tp8_decode", "--set", "scale=small", "--out", str(study)]) == 0
    )
    capsys.readouterr()
    assert main(["report", str(study), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert "serial" in printed and "plot: " in printed
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "gantt_serial.png" in pngs and "speedup.png" in pngs
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "is not a results folder" in capsys.readouterr().err


def test_ifa_decode_is_memory_bound_on_the_a2() -> None:
    """At full size the simulated decode attention is the KV cache read at HBM bandwidth."""
    scenario = builtin("llama70b_tp8_ifa_decode")
    topology = scenario.load_topology()
    shape = scenario.shape
    cache = 2 * shape["batch"] * shape["kv_len"] * shape["kv_heads"] * shape["head_dim"] * 2
    io = 2 * shape["batch"] * shape["heads"] * shape["head_dim"] * 2
    hbm_s = (cache + io) / (topology.device.memory_gbps * 1e9)
    launch_s = topology.device.launch_us * 1e-6
    metrics = simulate_study(scenario, topology).metrics()
    assert metrics["serial"].total_s == pytest.approx(hbm_s + launch_s, rel=1e-9)
    assert metrics["serial"].comm_s == 0.0 and metrics["serial"].exposed_comm_s == 0.0
    # four launches of a quarter of the batches: the same bytes, three more launch overheads
    assert metrics["tiles=4"].total_s == pytest.approx(hbm_s + 4 * launch_s, rel=1e-9)


def test_validation_cases_cover_every_op_quant_size_routing_and_tiling_held_out() -> None:
    from mc2sim.ops.spec import OpName
    from mc2sim.study.calibrate import calibration_dir
    from mc2sim.study.simulate import plans_for
    from mc2sim.study.validate import validation_scenarios

    scenarios = validation_scenarios()
    assert len(scenarios) == 13
    assert sum(len(s.tilings) for s in scenarios) == 36  # the held-out sweep's cases
    assert {s.op for s in scenarios} == set(OpName)  # IFA too
    assert {str(s.quant) for s in scenarios} == {"none", "w8a8", "weight_int8"}
    assert {s.routing.kind for s in scenarios if s.routed} == {"uniform", "zipf"}
    kinds = {
        "serial" if t == "serial" else "hardware" if t == "hardware" else "tiles"
        for s in scenarios
        for t in s.tilings
    }
    assert kinds == {"serial", "hardware", "tiles"}
    for s in scenarios:
        assert s.name == s.name.strip() and "serial" in s.tilings
    # two decades of FLOPs and of bytes moved among the MatmulAllReduce cases (2 ranks)
    flops, moved = [], []
    for s in scenarios:
        if s.op == OpName.MM_ALL_REDUCE:
            tasks = plans_for(s, 2, "serial")[0].tasks
            flops.append(sum(t.flops for t in tasks))
            moved.append(sum(t.bytes for t in tasks if t.resource.value == "comm"))
    assert max(flops) / min(flops) >= 100 and max(moved) / min(moved) >= 30
    # held out: no validation case has the op, quantisation and shape of a calibration call
    fitted = {
        (c.op, str(c.quant), tuple(sorted(c.shape.items())))
        for c in (load(f) for f in sorted(calibration_dir().glob("*.yaml")))
    }
    for s in scenarios:
        assert (s.op, str(s.quant), tuple(sorted(s.shape.items()))) not in fitted, s.name


def test_a_new_validation_file_is_a_new_case(tmp_path: Path) -> None:
    from mc2sim.scenario import dump
    from mc2sim.study.validate import validation_scenarios

    dump(builtin("llama70b_tp8_decode", ["scale=small", "tilings=serial,2"]), tmp_path / "a.yaml")
    (found,) = validation_scenarios(tmp_path)
    assert found.op == "mm_all_reduce" and found.tilings == ("serial", 2)


def test_held_out_files_run_where_they_fit_the_world_and_the_named_ones_must() -> None:
    from mc2sim.errors import ParamInvalidError
    from mc2sim.study.validate import held_out, runnable, scenario_files, validation_dir

    folder = validation_dir()
    pairs = held_out(scenario_files([str(folder)]))
    assert [f.name for f, _ in pairs] == sorted(p.name for p in folder.glob("*.yaml"))
    # 3 ranks cannot split the ReduceScatter's 1024 rows; every other file runs there
    kept, skipped = runnable(pairs, 3, strict=False)
    assert [s.name for s in kept] == [s.name for _, s in pairs if s.name != "val_reduce_scatter"]
    (line,) = skipped
    assert line.startswith("val_reduce_scatter (world_size=3: shape m (1024) must be a multiple")
    kept, skipped = runnable(pairs, 4, strict=False)
    assert len(kept) == len(pairs) and skipped == []
    with pytest.raises(
        ParamInvalidError, match=r"val_reduce_scatter.yaml'?: cannot run on 3 ranks"
    ):
        runnable(pairs, 3, strict=True)
    lone = [(f, s) for f, s in pairs if s.name == "val_reduce_scatter"]
    with pytest.raises(ParamInvalidError, match="no scenario of these runs on 3 ranks"):
        runnable(lone, 3, strict=False)


def test_validate_model_measures_the_named_cases_in_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mc2sim.comm
    import mc2sim.study.validate

    from .fakes import SameOnEveryRank

    seen: list[list[str]] = []

    class _Stop(Exception):
        pass

    def stop(comm: object, scenarios: list[Scenario]) -> None:
        seen.append([s.name for s in scenarios])
        raise _Stop

    monkeypatch.setattr(mc2sim.comm, "init", lambda *a, **k: SameOnEveryRank(2))
    monkeypatch.setattr(mc2sim.study.validate, "held_out_cases", stop)
    from mc2sim.scenario import dump

    (tmp_path / "cases").mkdir()
    for name, m in (("b_first", 16), ("a_second", 24)):
        small = builtin("llama70b_tp8_decode", ["scale=small", f"small.m={m}", f"name={name}"])
        dump(small, tmp_path / "cases" / f"{name}.yaml")
    with pytest.raises(_Stop):
        main(["validate-model", "--calibrate", "--cases", str(tmp_path / "cases")])
    assert seen == [["a_second", "b_first"]]  # a folder's files by name
    with pytest.raises(_Stop):
        files = [str(tmp_path / "cases" / f"{n}.yaml") for n in ("b_first", "a_second")]
        main(["validate-model", "--calibrate", "--cases", *files])
    assert seen[-1] == ["b_first", "a_second"]  # files in the order given


def test_calibration_pairs_name_shipped_files_and_their_tilings() -> None:
    from mc2sim.schedule import tiling_of
    from mc2sim.study.calibrate import CONTENTION, SAMPLED, WARMED, calibration_dir

    assert len(SAMPLED) == 25 and len(CONTENTION) == 6
    warmed = [(w, t) for w in WARMED for t in ("serial", 2)]  # two calls, or two tiles
    for name, tiling in (*SAMPLED, *CONTENTION, *warmed):
        scenario = load(calibration_dir() / f"{name}.yaml")
        assert tiling_of(tiling) in {tiling_of(t) for t in scenario.tilings}, (name, tiling)
    # the contention fit sees tiled calls only; the samples are serial but for one
    assert all(tiling != "serial" for _, tiling in CONTENTION)
    assert [t for _, t in SAMPLED if t != "serial"] == [4]


def test_plans_come_from_the_ops_spec_as_the_builders_make_them() -> None:
    # an oracle built by hand from the builders, not through the registry
    from mc2sim.schedule import plan_mm_all_reduce, tiling_of
    from mc2sim.schedule.builders import MatmulShape

    scenario = builtin("llama70b_tp8_w8a8", ["scale=small"])
    shape = scenario.effective_shape()
    dense = MatmulShape(
        k=shape["k"], n=shape["n"], in_bytes=1, w_bytes=1.0, out_bytes=2, dtype=scenario.dtype
    )
    for tiling in scenario.tilings:
        expected = plan_mm_all_reduce(
            m=shape["m"], shape=dense, kind=TaskKind.QUANT_MATMUL, tiling=tiling_of(tiling),
            rank=3, world_size=8,
        )  # fmt: skip
        assert plans_for(scenario, 8, tiling)[3] == expected
