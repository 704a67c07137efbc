"""Options of the command line that are not about its errors: --timeout, --help."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mc2sim.cli import TIMEOUT_ENV, main

from .fakes import SameOnEveryRank

if TYPE_CHECKING:
    from mc2sim.study.calibrate import Calibration, Independent


class _Stop(Exception):
    """Raised by the stand-in work, once the environment has been seen."""


@pytest.mark.parametrize("command", ["run", "calibrate", "validate-model", "sweep"])
def test_timeout_is_in_the_environment_when_the_communicator_starts(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import mc2sim.comm
    import mc2sim.study.calibrate
    import mc2sim.study.measure
    import mc2sim.study.validate

    seen: list[str | None] = []

    def init(*args: object, **kwargs: object) -> SameOnEveryRank:
        import os

        seen.append(os.environ.get(TIMEOUT_ENV))
        return SameOnEveryRank(1)

    def stop(*args: object, **kwargs: object) -> None:
        raise _Stop

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    monkeypatch.setattr(mc2sim.comm, "init", init)
    for module, name in [
        (mc2sim.study.measure, "measure_study"),
        (mc2sim.study.calibrate, "calibrate"),
        (mc2sim.study.validate, "held_out_cases"),
    ]:
        monkeypatch.setattr(module, name, stop)
    argv = {
        "run": ["run", "llama70b_tp8_decode", "--no-plots", "--out", str(tmp_path / "out")],
        "calibrate": ["calibrate", "--out", str(tmp_path / "fit.yaml")],
        "validate-model": ["validate-model", "--calibrate"],
        "sweep": ["sweep", "llama70b_tp8_decode", "--real", "--out", str(tmp_path / "out")],
    }[command]
    with pytest.raises(_Stop):
        main([*argv, "--timeout", "12.5"])
    assert seen == ["12.5"]


FITS_CASES = [
    # the probe moved x0.5, then x1.2 (both over 15%), then x0.8: three fits, the second kept
    (3, [(0.1, 0.05), (0.1, 0.12), (0.1, 0.08)], 3, 1),
    # the second fit is steady (x1.1): no third
    (3, [(0.1, 0.05), (0.1, 0.11), (0.1, 0.1)], 2, 1),
    # one fit by default, however far its probe moved
    (1, [(0.1, 0.05), (0.1, 0.1)], 1, 0),
    # equally unsteady fits (x2 and x0.5): the first is kept
    (2, [(0.1, 0.2), (0.2, 0.1)], 2, 0),
]


def _stand_in_fits(
    probes: list[tuple[float, float]], monkeypatch: pytest.MonkeyPatch
) -> list[Calibration]:
    """A stand-in ``calibrate`` on 4 ranks; returns the fits it made, in order.

    Fit ``i`` is named ``fit{i}``; its probe moved from ``probes[i][0]`` before its rounds to
    ``probes[i][1]`` after.
    """
    import dataclasses

    import mc2sim.comm
    import mc2sim.study.calibrate
    from mc2sim.study.calibrate import Calibration, Independent
    from mc2sim.topology import resolve

    shipped = resolve("this_machine_4ranks")
    independent = Independent(
        matmul_tflops=0.1,
        memcpy_gbps=20.0,
        upcast_gbps=7.0,
        pingpong_us=10.0,
        pingpong_loaded_us=20.0,
        upcast_loaded_gbps=6.0,
    )
    fitted: list[Calibration] = []

    def calibrate(*args: object, **kwargs: Any) -> Calibration:
        before, after = probes[len(fitted)]
        device = dataclasses.replace(shipped.device, probe_tflops=after)
        topology = dataclasses.replace(shipped, name=f"fit{len(fitted)}", device=device)
        calls = kwargs.get("alongside", ())
        fitted.append(
            Calibration(
                topology=topology,
                # each call's rounds, marked by the fit they were timed in
                alongside=[[f"fit{len(fitted)} call {i}"] for i in range(len(calls))],  # type: ignore[list-item]
                fitted_cases=[],
                fitted_spans=[],
                independent=independent,
                probe_before=before,
            )
        )
        return fitted[-1]

    monkeypatch.setattr(mc2sim.comm, "init", lambda *a, **k: SameOnEveryRank(4))
    monkeypatch.setattr(mc2sim.study.calibrate, "calibrate", calibrate)
    return fitted


def _check_fits_said(printed: str, fits: int, made: int, kept: tuple[float, float]) -> None:
    """What a command printed of its fits: one line per fit again, the pace of the kept one."""
    assert printed.count("fitting again") == made - 1
    if made > 1:
        assert f"fitting again (2 of at most {fits}, the steadiest kept)" in printed
    steady = 1 / 1.15 <= kept[1] / kept[0] <= 1.15
    assert ("pace changed during the fit" in printed) is not steady


@pytest.mark.parametrize("command", ["calibrate", "validate-model"])
@pytest.mark.parametrize(("fits", "probes", "made", "kept"), FITS_CASES)
def test_fits_again_while_the_machines_pace_moves_and_keeps_the_steadiest(
    command: str,
    fits: int,
    probes: list[tuple[float, float]],
    made: int,
    kept: int,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import mc2sim.study.validate
    from mc2sim.study.validate import CaseResult
    from mc2sim.topology import Topology, load

    fitted = _stand_in_fits(probes, monkeypatch)
    scored: list[str] = []

    def score_cases(
        cases: object, spans: object, topology: Topology, *a: object
    ) -> list[CaseResult]:
        scored.append(topology.name)
        return [CaseResult(name=f"scored on {topology.name}", measured_s=1e-3, simulated_s=1e-3)]

    monkeypatch.setattr(mc2sim.study.validate, "held_out_cases", lambda *a, **k: [])
    monkeypatch.setattr(mc2sim.study.validate, "score_cases", score_cases)
    out = tmp_path / "fit.yaml"
    argv = {
        "calibrate": ["calibrate"],
        "validate-model": ["validate-model", "--calibrate"],
    }[command]
    assert main([*argv, "--reps", "1", "--out", str(out), "--fits", str(fits)]) == 0
    assert len(fitted) == made
    written = load(out)  # the kept fit, written
    assert written.name == f"fit{kept}"
    assert written.device.probe_tflops == probes[kept][1]
    printed = capsys.readouterr().out
    if command == "validate-model":  # both case sets scored on the kept fit alone
        assert scored == [f"fit{kept}", f"fit{kept}"]
        assert f"scored on fit{kept}" in printed
    _check_fits_said(printed, fits, made, probes[kept])


@pytest.mark.parametrize("case", FITS_CASES)
def test_run_calibrate_times_the_tilings_in_the_kept_fits_rounds(
    case: tuple[int, list[tuple[float, float]], int, int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import mc2sim.study.measure

    fits, probes, made, kept = case
    fitted = _stand_in_fits(probes, monkeypatch)
    timed: list[object] = []

    def measure_study(*args: object, timing: Any = None, **kwargs: object) -> None:
        # the tilings' calls, as measure_study hands them over: 4 of them
        timed.append(timing([lambda: None] * 4))
        raise _Stop

    monkeypatch.setattr(mc2sim.study.measure, "measure_study", measure_study)
    fit = tmp_path / "fit.yaml"
    argv = ["run", "seed_gmm_alltoallv_ep4", "--set", "scale=small", "--no-plots"]
    argv += ["--out", str(tmp_path / "out"), "--calibrate", str(fit), "--fits", str(fits)]
    with pytest.raises(_Stop):
        main([*argv, "--reps", "3"])
    assert len(fitted) == made
    # every fit timed the 4 calls in its rounds; the run's are the kept fit's
    assert timed == [[[f"fit{kept} call {i}"] for i in range(4)]]


def test_run_calibrate_is_for_runs_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import torch

    import mc2sim.comm

    monkeypatch.setattr(mc2sim.comm, "init", lambda *a, **k: SameOnEveryRank(4))
    monkeypatch.setattr(mc2sim.comm, "rank_device", lambda *a: torch.device("cuda", 0))
    argv = ["run", "seed_gmm_alltoallv_ep4", "--out", str(tmp_path / "out")]
    assert main([*argv, "--calibrate", str(tmp_path / "fit.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--calibrate=" in err and "not cuda:0" in err, err


def test_exec_passes_the_timeout_to_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    script = tmp_path / "show.py"
    script.write_text(f"import os\nprint('timeout', os.environ['{TIMEOUT_ENV}'])\n")
    assert main(["exec", "--timeout", "1e3", str(script)]) == 0
    assert capsys.readouterr().out == "timeout 1000.0\n"
    monkeypatch.setenv(TIMEOUT_ENV, "42")
    assert main(["exec", str(script)]) == 0
    assert capsys.readouterr().out == "timeout 42\n", "without --timeout the variable is kept"


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--timeout SECONDS" in out and "--overwrite" in out and "MC2SIM_TIMEOUT" in out


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("first, count", [(0, 16), (32, 29), (8, 1)])
def test_sweep_batches_deal_each_point_to_one_rank_in_snake_order(
    size: int, first: int, count: int
) -> None:
    """Every point of a batch goes to exactly one rank; rounds alternate direction."""
    from mc2sim.cli import _dealt

    owners: dict[int, int] = {}
    for rank in range(size):
        for i in _dealt(first, first + count, rank, [2.5] * size):  # equal speeds
            assert i not in owners, f"point {i} dealt twice"
            owners[i] = rank
    assert sorted(owners) == list(range(first, first + count))
    for i, rank in owners.items():  # round j of `size` points: forwards when j is even
        j, k = divmod(i - first, size)
        assert rank == (k if j % 2 == 0 else size - 1 - k)
    if size == 2 and count == 16:  # costs rising with the point's place in its round
        cost = {i: (i - first) % size for i in owners}  # the later point of a round is dearer
        per_rank = [sum(cost[i] for i, r in owners.items() if r == rank) for rank in range(2)]
        assert per_rank == [4, 4]  # i mod 2 would give [0, 8]


@pytest.mark.parametrize("speeds", [[2.0, 1.0], [1.0, 3.0, 1.5], [0.4, 0.4, 0.4, 1.6]])
def test_sweep_batches_deal_points_in_proportion_to_the_ranks_speeds(speeds: list[float]) -> None:
    """A rank twice as fast gets twice the points, every point once.

    Each rank's share of 48 points is 48 x its speed / the sum, within one.
    """
    from mc2sim.cli import _dealt

    shares = [_dealt(10, 58, rank, speeds) for rank in range(len(speeds))]
    assert sorted(i for share in shares for i in share) == list(range(10, 58))
    for share, speed in zip(shares, speeds, strict=True):
        assert abs(len(share) - 48 * speed / sum(speeds)) <= 1
    # the same finishing time within one point's: (points) / speed nearly equal
    finish = [len(share) / speed for share, speed in zip(shares, speeds, strict=True)]
    assert max(finish) - min(finish) <= max(1 / speed for speed in speeds)


def test_sweep_speeds_are_points_a_second_and_the_mean_where_unmeasured() -> None:
    from mc2sim.cli import _speeds

    assert _speeds([(0, 0.0), (0, 0.0)]) == [1.0, 1.0]
    assert _speeds([(8, 2.0), (8, 4.0), (0, 0.0)]) == [4.0, 2.0, 3.0]


def test_a_sweep_point_folder_name_too_long_for_a_file_system_is_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """256 bytes of folder name (NAME_MAX is 255): one line before any point is simulated."""
    long = "a" * 229  # 256 bytes with the point's other value
    status = main([
        "sweep", "seed_gmm_alltoallv_ep4", "--set", "scale=small", "--set", "small.tokens=8,16",
        "--set", f"description=x,{long}", "--no-plots", "--out", str(tmp_path / "s"),
    ])  # fmt: skip
    assert status == 2
    line = capsys.readouterr().err.strip()  # one line, the long value shortened in it
    assert "\n" not in line and line.startswith(
        "mc2sim sweep: --set='small.tokens=8,description=aaa"
    )
    assert line.endswith(
        ": names a point folder of 256 bytes: a file system takes at most 255 (shorten the values)"
    )
    assert not (tmp_path / "s").exists()


def _independent(pingpong_us: float, loaded_us: float) -> Independent:
    """Independent figures with the given exchanges (0: one rank, no peer to exchange with)."""
    from mc2sim.study.calibrate import Independent

    return Independent(
        matmul_tflops=0.2, memcpy_gbps=12.0, upcast_gbps=4.0, pingpong_us=pingpong_us,
        pingpong_loaded_us=loaded_us, upcast_loaded_gbps=2.5,
    )  # fmt: skip


def test_the_fit_prints_its_posts_warm_tasks_and_polled_progress_and_a_missing_peer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import dataclasses

    from mc2sim.cli import _print_fit, _print_independent
    from mc2sim.topology import Contention, builtin

    base = builtin("this_machine")
    device = dataclasses.replace(
        base.device,
        issue_us=6.5,
        issue_extra_us={"alltoallv": 2.5},
        warm_us={"matmul": 30.0},
    )
    topology = dataclasses.replace(base, device=device, contention=Contention(polled=True))
    _print_fit(topology)
    out = capsys.readouterr().out.splitlines()
    assert "posting a collective: 6.5 us, alltoallv +2.5" in out
    together = dataclasses.replace(device, concurrent_collectives=True)
    for alone, text in (
        ((), "together"),
        (("allreduce", "reduce_scatter"), "together, but allreduce, reduce_scatter one at a time"),
    ):
        mixed = dataclasses.replace(together, one_at_a_time=alone)
        _print_fit(dataclasses.replace(topology, device=mixed))
        assert f"collectives in flight progress {text}" in capsys.readouterr().out.splitlines()
    assert "a call's task after its first saves (us), by kind: matmul 30" in out
    assert "contention: compute x1.0, comm polled (a transfer waits while its ranks compute)" in out
    # a spread and a lone memory speedup of 1: no line; above 1, one line each
    for changed, line in (
        (
            dataclasses.replace(device, rank_spread=1.125),
            "a round's slowest rank computes x1.125 the slowest rank's own (a rank alone at "
            "the top of a task's load at its own pace)",
        ),
        (
            dataclasses.replace(device, lone_memory_speedup=1.66),
            "a pack or reduction alone on its node runs x1.66 its speed beside every rank (the "
            "node's memory shared: one rank's bf16->f32 conversion over every rank's at once)",
        ),
    ):
        assert not any(line.split(" x")[0] in printed for printed in out), line
        _print_fit(dataclasses.replace(topology, device=changed))
        assert line in capsys.readouterr().out.splitlines()
    # one rank: nothing to exchange with, so no ratio (not x inf)
    _print_independent(topology, _independent(0.0, 0.0))
    rows = capsys.readouterr().out.splitlines()
    (exchange,) = [r for r in rows if "4-byte exchange us, the others asleep" in r]
    assert exchange.split()[-2:] == ["-", "-"]
    (memcpy,) = [r for r in rows if "memory GB/s vs memcpy" in r]
    assert memcpy.split()[-1] == f"x{device.memory_gbps / 12.0:.2f}"
    assert "inf" not in "\n".join(rows)
    # the posts' copy against the conversion alone and on every rank at once, in one column
    assert device.issue_gbps > 0
    (lone,) = [r for r in rows if "posting's float32 copy GB/s vs bf16->f32" in r]
    (loaded,) = [r for r in rows if "posting's copy GB/s vs bf16->f32, all ranks" in r]
    assert lone.split()[-2:] == ["4", f"x{device.issue_gbps / 4.0:.2f}"]
    assert loaded.split()[-2:] == ["2.5", f"x{device.issue_gbps / 2.5:.2f}"]
    assert len(lone) == len(loaded) == len(memcpy)


def test_the_exchange_rows_set_own_core_figures_and_the_jobs_share_beside_their_measures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import dataclasses

    from mc2sim.cli import _print_fit, _print_independent
    from mc2sim.topology import CoreSharing, builtin

    # 4 ranks on 2 cores (share 1/2): a message 10 us on cores of their own and 30 more for
    # sharing, a post 15 us of a whole core and 20 more, a 200 us slice
    base = builtin("this_machine_4ranks")
    assert base.core_share == 0.5
    device = dataclasses.replace(
        base.device,
        issue_us=15.0,
        shared_issue_us=20.0,
        shared_latency_us=30.0,
        slice_us=200.0,
        cores_per_node=2,
    )
    inner = dataclasses.replace(base.network[0], latency_us=10.0)
    topology = dataclasses.replace(base, device=device, network=(inner,))
    _print_independent(topology, _independent(20.0, 105.0))
    rows = capsys.readouterr().out.splitlines()
    # the others asleep, each rank on a core of its own: 10 + 15 = 25 us
    (asleep,) = [r for r in rows if "4-byte exchange us, the others asleep" in r]
    assert asleep.split()[-3:] == ["25", "20", "x1.25"]
    # every pair at once, at the job's share: a message 10 + 30, the post (15 + 20) / 0.5 =
    # 70, the wait for peers off their cores 200 x (1 - 0.5) = 100: 210 us
    (loaded,) = [r for r in rows if "4-byte exchange us, every pair at once" in r]
    assert loaded.split()[-3:] == ["210", "105", "x2.00"]
    # where ranks take turns, the simulator runs a post on a whole core, 15 + 20 = 35 us, and
    # holds the waits for turns itself (no slice wait as latency): 40 + 35 = 75 us
    turns = dataclasses.replace(device, core_sharing=CoreSharing.TURNS)
    _print_independent(dataclasses.replace(topology, device=turns), _independent(20.0, 105.0))
    rows = capsys.readouterr().out.splitlines()
    (loaded,) = [r for r in rows if "4-byte exchange us, every pair at once" in r]
    assert loaded.split()[-3:] == ["75", "105", "x0.71"]
    _print_fit(topology)
    assert (
        "sharing a core adds 20.0 us of CPU time to a post and 30.0 us to every message's latency"
    ) in capsys.readouterr().out.splitlines()


def test_validate_model_takes_the_shipped_fit_made_on_as_many_ranks(tmp_path: Path) -> None:
    from mc2sim.cli import _topology_file
    from mc2sim.errors import ParamInvalidError
    from mc2sim.topology import builtin, dump

    four, on, name = _topology_file(None, 4)
    assert (name, on, four) == ("this_machine_4ranks", 4, builtin("this_machine_4ranks"))
    two, on, name = _topology_file(None, 2)
    assert (name, on, two) == ("this_machine", 2, builtin("this_machine"))
    three, on, name = _topology_file(None, 3)  # none made on 3: the 2-rank fit, resized
    assert (name, on, three.world_size) == ("this_machine", 2, 3)
    by_name, on, _ = _topology_file("this_machine_4ranks", 2)  # a shipped one by name
    assert on == 4 and by_name == builtin("this_machine_4ranks").with_world(2)
    dump(builtin("this_machine"), tmp_path / "fit.yaml")
    from_file, on, name = _topology_file(str(tmp_path / "fit.yaml"), 4)
    assert (on, name, from_file.world_size) == (2, str(tmp_path / "fit.yaml"), 4)
    with pytest.raises(ParamInvalidError, match="no such file or shipped topology"):
        _topology_file("no_such_fit", 2)


def test_a_fit_says_when_the_machines_pace_moved_during_its_rounds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mc2sim.cli import SPEED_NOTE, _print_pace

    _print_pace(0.2, 0.2 * (1 + SPEED_NOTE) * 0.99)  # within the probe's spread: nothing
    _print_pace(0.0, 0.1)  # not measured
    assert capsys.readouterr().out == ""
    _print_pace(0.2, 0.13)
    assert capsys.readouterr().out == (
        "the machine's pace changed during the fit: its speed probe read 0.2 TFLOP/s before "
        "the rounds and 0.13 after (x0.65); the fit holds a mix of the two: refit in a "
        "steadier period\n"
    )


def _matmul_bytes(m: int, k: int, n: int) -> int:
    """A bfloat16 matmul's bytes read and written, (m, k) x (k, n) -> (m, n), by hand."""
    return 2 * (m * k + k * n + m * n)


@pytest.mark.parametrize(
    ("hosts", "refused"),
    [
        (["a"] * 8, True),  # 8 ranks' kernels at once: 4x the free memory
        (["a", "a"] + [f"h{i}" for i in range(6)], False),  # 2 ranks a host: exactly free
        (["a", "a", "a"] + [f"h{i}" for i in range(5)], True),  # 3 on rank 0's host
        ([f"h{i}" for i in range(8)], False),  # a rank a host
    ],
)
def test_a_run_is_refused_where_the_ranks_of_one_host_need_more_than_it_has_free(
    monkeypatch: pytest.MonkeyPatch, hosts: list[str], refused: bool
) -> None:
    import mc2sim.runtime
    from mc2sim.cli import _check_fits, _load_scenario
    from mc2sim.errors import ParamInvalidError

    m, k, n = 4096, 3584, 8192
    scenario = _load_scenario(
        "llama70b_tp8_decode", [f"shape.m={m}", f"shape.k={k}", f"shape.n={n}"]
    )
    one = _matmul_bytes(m, k, n)  # every rank's one serial matmul: the same shape
    monkeypatch.setattr(mc2sim.runtime, "available_memory", lambda: 2 * one)
    if not refused:
        _check_fits(scenario, 8, hosts, 0)
        return
    with pytest.raises(ParamInvalidError) as caught:
        _check_fits(scenario, 8, hosts, 0)
    message = str(caught.value)
    on_host = hosts.count("a")
    assert caught.value.param == "shape"
    assert f"its {on_host} ranks on this host move {on_host * one / 2**30:.4g} GiB" in message
    assert f"alone moves {one / 2**30:.4g} GiB" in message
    assert f"this host has {2 * one / 2**30:.4g} GiB free" in message


def test_a_rank_alone_on_its_host_is_refused_by_its_own_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mc2sim.runtime
    from mc2sim.cli import _check_fits, _load_scenario
    from mc2sim.errors import ParamInvalidError

    scenario = _load_scenario("llama70b_tp8_decode", [])
    one = _matmul_bytes(64, 3584, 8192)
    monkeypatch.setattr(mc2sim.runtime, "available_memory", lambda: one)
    hosts = [f"h{i}" for i in range(8)]
    _check_fits(scenario, 8, hosts, 3)  # exactly free: runs
    monkeypatch.setattr(mc2sim.runtime, "available_memory", lambda: one - 1)
    with pytest.raises(ParamInvalidError, match=r"rank 3's matmul\[0\] alone moves"):
        _check_fits(scenario, 8, hosts, 3)
