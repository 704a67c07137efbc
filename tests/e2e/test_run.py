"""``mc2sim run`` under mpiexec, as a user launches it: results folder, golden verdict, errors."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from mc2sim.results import comparable_files, read_results
from mc2sim.study.calibrate import CONTENTION, SAMPLED, WARMED, _cgroup_cores
from mc2sim.timeline import Clock, Source

from .conftest import launch, mpiexec, tool

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize(
    "scenario", ["llama70b_tp8_decode", "seed_gmm_alltoallv_ep4", "llama70b_tp8_ifa_decode"]
)
def test_run_a_small_scenario(tmp_path: Path, ranks: int, scenario: str) -> None:
    out = tmp_path / "results"
    res = mpiexec(
        ranks, "-m", "mc2sim", "run", scenario, "--set", "scale=small",
        "--set", "repetitions=1", "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("# " + scenario) == 1, "rank 0 prints"
    assert f"results: {out}" in res.stdout
    folder = read_results(out)
    manifest = folder.manifest
    assert manifest.world_size == ranks and len(manifest.hosts) == ranks
    assert manifest.scenario == scenario and manifest.source is Source.MEASURED
    assert manifest.overrides == ("scale=small", "repetitions=1") and manifest.repetitions == 1
    assert manifest.mpi_library is not None, "mc2sim run loads MPI: its library is recorded"
    assert manifest.devices == ("cpu",) * ranks and manifest.backend == "mpi"
    # the machine's speed after the rounds: a 1024^3 float32 matmul of a core, 0.01 to 10 TFLOP/s
    assert manifest.probe_tflops is not None and 0.01 < manifest.probe_tflops < 10
    assert {r.clock for r in folder.timeline.records} == {Clock.HOST}  # type: ignore[union-attr]
    assert set(folder.verdicts) == set(folder.runs) >= {"serial"}
    for verdicts in folder.verdicts.values():
        assert len(verdicts) == ranks and all(v.passed for v in verdicts)
        assert [v.rank for v in verdicts] == list(range(ranks))
    assert folder.baseline == folder.runs["serial"]
    assert (out / "trace.json").exists() and folder.timeline is not None
    assert folder.timeline.ranks() == list(range(ranks))
    assert set(folder.timeline.runs()) == set(folder.runs.values())
    if scenario == "seed_gmm_alltoallv_ep4":  # with its shared expert, as the simulation plans
        shared = [r for r in folder.timeline.records if r.name == "matmul[shared]"]
        assert sorted(r.rank for r in shared) == sorted(list(range(ranks)) * 4)
        # checked against the golden too: 64 tokens x top-2 rows of N1=64, and 64 x N2=64
        for verdicts in folder.verdicts.values():
            assert all(v.numel == 64 * 2 * 64 + 64 * 64 for v in verdicts)
    assert (out / "gantt_serial.png").read_bytes()[:4] == b"\x89PNG"


def test_run_a_broken_scenario_exits_2(tmp_path: Path) -> None:
    scenario = tmp_path / "broken.yaml"
    good = (Path(__file__).parents[2] / "scenarios" / "llama70b_tp8_decode.yaml").read_text()
    scenario.write_text(good.replace("repetitions: 5", "repetitions: 0"))
    res = mpiexec(2, "-m", "mc2sim", "run", str(scenario))
    assert res.returncode == 2
    assert f"{scenario}: repetitions=0" in res.stderr
    assert res.stderr.count("mc2sim run:") == 1, "one message, from rank 0"


def test_real_sweep_runs_every_point(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    res = mpiexec(
        2, "-m", "mc2sim", "sweep", "llama70b_tp8_decode", "--real",
        "--set", "scale=small", "--set", "repetitions=1", "--set", "tilings=serial,2",
        "--set", "small.m=16,32", "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["small.m=16", "small.m=32"]
    assert (out / "speedup.png").exists(), "the sweep's plots, over every point"
    for m in (16, 32):
        manifest = read_results(out / f"small.m={m}").manifest
        assert manifest.shape["m"] == m and manifest.world_size == 2


_IMPORTS_PROBE = """
import os
import sys
from pathlib import Path
from mc2sim.cli import main
status = main(sys.argv[2:])
probed = f"{status} {'torch' in sys.modules} {'mpi4py' in sys.modules}"
Path(sys.argv[1], str(os.getpid())).write_text(probed)
"""
# Runs the CLI on argv[2:], then writes its exit status and whether torch and mpi4py were
# imported to a file of its own in the folder argv[1]: the ranks' stdout lines can run into
# each other (a print is several writes where output is unbuffered).


def test_a_simulated_sweep_under_mpiexec_starts_without_torch(tmp_path: Path) -> None:
    """Its ranks move objects alone (MpiObjectCommunicator): mpi4py, but no torch."""
    out = tmp_path / "sweep"
    probed = tmp_path / "probed"
    probed.mkdir()
    res = mpiexec(
        2, "-c", _IMPORTS_PROBE, str(probed), "sweep", "seed_gmm_alltoallv_ep4", "--set",
        "scale=small", "--set", "small.tokens=8,16,24", "--no-plots", "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [p.read_text() for p in probed.iterdir()] == ["0 False True"] * 2, res.stdout
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        f"small.tokens={t}" for t in (16, 24, 8)
    ]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_a_sweep_whose_ranks_do_not_share_a_disk_is_written_by_rank_0(tmp_path: Path) -> None:
    """A sweep over ranks that do not share a disk: rank 0 writes every point's folder.

    Rank 1 runs in a mount namespace of its own with an empty tmpfs over the sweep's parent
    folder, as on a host without rank 0's disk, so it does not see rank 0's folder. The
    folder is the lone sweep's.
    """
    disk = tmp_path / "disk"
    disk.mkdir()
    argv = [
        "-m", "mc2sim", "sweep", "seed_gmm_alltoallv_ep4", "--set", "scale=small",
        "--set", "small.tokens=8,16,24", "--no-plots", "--out", str(disk / "sweep"),
    ]  # fmt: skip
    alone = launch([sys.executable, *argv])
    assert alone.returncode == 0, alone.stderr
    (disk / "sweep").rename(tmp_path / "alone")
    command = " ".join(shlex.quote(a) for a in [sys.executable, *argv])
    own_disk = f"mount -t tmpfs none {shlex.quote(str(disk))} && exec {command}"
    script = (
        f'if [ "$PMI_RANK" = 1 ]; then exec unshare --mount sh -c {shlex.quote(own_disk)}; '
        f"else exec {command}; fi"
    )
    res = launch([tool("mpiexec"), "-n", "2", "sh", "-c", script])
    assert res.returncode == 0, res.stderr
    assert comparable_files(disk / "sweep") == comparable_files(tmp_path / "alone")


def test_run_calibrate_times_the_tilings_in_a_fit_the_simulator_loads(tmp_path: Path) -> None:
    out, fit = tmp_path / "results", tmp_path / "fit.yaml"
    res = mpiexec(
        2, "-m", "mc2sim", "run", "seed_gmm_alltoallv_ep4", "--set", "scale=small",
        "--out", str(out), "--no-plots", "--calibrate", str(fit), "--reps", "1",
        "--name", "demo_fit",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    # the run's table, then the fit rank 0 wrote
    table = res.stdout.index("# seed_gmm_alltoallv_ep4: gmm_alltoallv, 2 ranks")
    assert table < res.stdout.index(f"wrote {fit}") < res.stdout.index("contention: compute x")
    assert res.stdout.count(f"wrote {fit}") == 1, "rank 0 writes"
    from mc2sim.topology import load

    # a topology the simulator loads, of every figure calibrate fits (the calibrate command
    # makes the same fit: tests/unit/test_cli.py, and on one rank below)
    topology = load(fit)
    assert topology.name == "demo_fit" and topology.world_size == 2
    assert topology.contention.source.startswith("fitted by mc2sim calibrate")
    assert set(topology.device.matrix_tflops) == {"bfloat16", "float16", "float32", "int8"}
    # MPICH advances a nonblocking collective only inside its calls: measured, not fitted
    assert topology.contention.polled and "progress polled, measured" in topology.contention.source
    assert set(topology.device.issue_extra_us) == {"alltoallv", "allreduce", "reduce_scatter"}
    assert set(topology.device.warm_us) == {
        "matmul", "grouped_matmul", "pack", "attention", "quant_matmul", "weight_quant_matmul",
    }  # fmt: skip
    # the fit keeps its speed probe: the independent matmul calibrate prints
    (row,) = [x for x in res.stdout.splitlines() if "float32 matmul 1024^3" in x]
    assert row.split()[-2] == f"{topology.device.probe_tflops:.4g}"
    folder = read_results(out)
    # the tilings were timed in the fit's 1 round (not the scenario's 5): the results say so
    assert folder.manifest.repetitions == 1
    assert set(folder.runs) == {"serial", "hardware(per expert)", "experts x 2", "experts x 4"}
    assert all(v.passed for verdicts in folder.verdicts.values() for v in verdicts)
    # and a comparison of the two runs as make demo's does
    sim = tmp_path / "sim"
    res = launch(
        [sys.executable, "-m", "mc2sim", "simulate", "seed_gmm_alltoallv_ep4", "--set",
         "scale=small", "--ranks", "2", "--topology", str(fit), "--measured", str(out),
         "--out", str(sim), "--no-plots"]
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("%") >= 4


def test_validate_model_calibrates_in_the_same_rounds(tmp_path: Path) -> None:
    out = tmp_path / "fit.yaml"
    res = mpiexec(
        2, "-m", "mc2sim", "validate-model", "--calibrate", "--reps", "1", "--out", str(out),
        "--name", "fit_2ranks",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("contention: compute x") == 1, "rank 0 prints the fit"
    assert res.stdout.count("collectives in flight progress ") == 1
    lines = res.stdout.splitlines()
    header = lines.index(
        "# validate-model: 2 ranks, calibrated in the same rounds, lower quartile of 1 rounds"
    )
    assert lines[header + 1].startswith("# split: held out: scenarios/validation/")
    assert lines[header + 2].startswith("held out: case")
    held = lines[header + 3 : header + 39]
    assert len(held) == 36 and all(row.endswith("%") for row in held)
    assert lines[header + 39].startswith("in sample: case")
    # every calibration call the fit is made on: the serial samples, the tiled calls, the
    # collectives posted at once (:func:`mc2sim.study.calibrate.together_cases`) and, where
    # the 2 ranks share a core, the small calls in two tiles the warm savings are read from
    # (:func:`mc2sim.study.calibrate.warm_cases`)
    names = [name for name, _ in (*SAMPLED, *CONTENTION)] + ["allreduce", "alltoallv"]
    cores = float(len(os.sched_getaffinity(0)))
    if _cgroup_cores() > 0:
        cores = min(cores, _cgroup_cores())
    if cores < 2:
        names += list(WARMED)
    calls = len(names)
    inside = lines[header + 40 : header + 40 + calls]
    assert len(inside) == calls and all(row.endswith("%") for row in inside)
    assert [row.split()[0] for row in inside] == names
    together = inside[len(SAMPLED) + len(CONTENTION) :][:2]
    assert [row.split("  ")[0] for row in together] == [
        "allreduce of 65536 bytes, 4 posted at once",
        "alltoallv of 65536 bytes, 4 posted at once",
    ]
    assert lines[header + 40 + calls].startswith("held-out geomean error over 36 cases: ")
    assert lines[header + 41 + calls].startswith(f"in-sample geomean error over {calls} cases: ")
    # the fitted figures beside the independent ones
    assert res.stdout.count("fitted against independent") == 1
    # each rank's compute time over the slowest's, in this job: 2 figures, the slowest at 1
    (speeds,) = [x for x in res.stdout.splitlines() if x.startswith("ranks' compute time over")]
    figures = [float(v) for v in speeds.split(":")[-1].split()]
    assert len(figures) == 2 and max(figures) == 1.0 and min(figures) > 0.0
    for row in (
        "float32 matmul 1024^3, TFLOP/s",
        "memory GB/s vs bf16->f32 (read + write)",
        "memory GB/s vs memcpy (read + write)",
        "4-byte exchange us, the others asleep",
        "4-byte exchange us, every pair at once",
        "posting's float32 copy GB/s vs bf16->f32",  # MPI sums bfloat16 in float32 copies
        "posting's copy GB/s vs bf16->f32, all ranks",
    ):
        (line,) = [x for x in lines if x.strip().startswith(row)]
        fitted, measured, ratio = line.split()[-3:]
        assert float(fitted) > 0 and float(measured) > 0 and ratio.startswith("x"), line
    from mc2sim.topology import load

    assert load(out).world_size == 2
    assert load(out).name == "fit_2ranks"
    # the stored fit validates again, measured anew, at this job's speed (its probe after the
    # rounds over the fit's)
    res = mpiexec(
        2, "-m", "mc2sim", "validate-model", "--topology", str(out), "--reps", "1",
        "--at-run-speed",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (header_again,) = [x for x in res.stdout.splitlines() if x.startswith("# validate-model:")]
    assert re.fullmatch(
        rf"# validate-model: 2 ranks, {re.escape(str(out))} at this job's speed "
        r"\(x\d+\.\d\d the fit's times\), lower quartile of 1 rounds",
        header_again,
    ), header_again
    assert re.search(r"^# at the job's speed: its probe ", res.stdout, re.M)
    assert res.stdout.count("held-out geomean error at the fit's own speed: ") == 1
    assert f"in-sample geomean error over {calls} cases: " in res.stdout


def test_validate_model_holds_out_the_named_files_on_a_resized_fit(tmp_path: Path) -> None:
    from mc2sim.scenario import builtin, dump

    mine = tmp_path / "mine"
    mine.mkdir()
    small = builtin("llama70b_tp8_decode", ["scale=small", "tilings=serial,2", "name=my_tp"])
    dump(small, mine / "my_tp.yaml")
    four = Path(__file__).parents[2] / "topologies" / "this_machine_4ranks.yaml"
    res = mpiexec(
        2, "-m", "mc2sim", "validate-model", "--topology", str(four), "--cases", str(mine),
        "--reps", "1",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    (header,) = [i for i, x in enumerate(lines) if x.startswith("# validate-model:")]
    assert lines[header].startswith(
        f"# validate-model: 2 ranks, {four} (fitted on 4 ranks, resized to 2)"
    )
    assert lines[header].endswith(", lower quartile of 1 rounds")
    assert lines[header + 1].startswith(f"# split: held out: {mine} (never fitted on)")
    held = lines[header + 3 : header + 5]
    assert [row.split()[:2] for row in held] == [["my_tp", "serial"], ["my_tp", "tiles=2"]]
    assert lines[header + 5].startswith("in sample: case")
    assert "held-out geomean error over 2 cases: " in res.stdout
    # the shipped fit keeps its speed probe: the job's pace is said, the fit kept as it is
    assert re.search(r"^# the job ran at x\d+\.\d\d the fit's pace: ", res.stdout, re.M)
    assert res.stdout.count("held-out geomean error at the job's speed (--at-run-speed): ") == 1


def test_calibrate_on_one_rank_fits_every_dtype_and_prints_its_side_by_side(
    tmp_path: Path,
) -> None:
    # one rank, one round: the bare float32 matmuls are faster than the launch the reference
    # kernels' fit holds; the fit keeps a float32 peak all the same (it once dropped it, and
    # the side-by-side then ended in a traceback)
    out = tmp_path / "one.yaml"
    res = launch([sys.executable, "-m", "mc2sim", "calibrate", "--reps", "1", "--out", str(out)])
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    from mc2sim.topology import load

    device = load(out).device
    assert set(device.matrix_tflops) == {"bfloat16", "float16", "float32", "int8"}
    assert all(v > 0 for v in device.matrix_tflops.values())
    (row,) = [x for x in res.stdout.splitlines() if "float32 matmul 1024^3" in x]
    assert row.split()[-1].startswith("x")
    (peer,) = [x for x in res.stdout.splitlines() if "exchange us, the others asleep" in x]
    assert peer.split()[-2:] == ["-", "-"]  # one rank has no peer to exchange with
