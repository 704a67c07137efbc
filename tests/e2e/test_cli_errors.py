"""Bad inputs under ``mpiexec -n 2``: one line from one rank, exit status 2, nobody left waiting."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import mpiexec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    t = tmp_path_factory.mktemp("mpi-inputs")
    (t / "afile").write_text("not a folder\n", encoding="utf-8")
    (t / "nonutf8.yaml").write_bytes(b"name: caf\xe9\n")
    return t


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["run", "{t}/nonutf8.yaml"], "mc2sim run: {t}/nonutf8.yaml='byte 9': is not UTF-8"),
        (
            ["run", "llama70b_tp8_decode", "--out", "{t}/afile"],
            "mc2sim run: --out='{t}/afile': is a file, not a folder",
        ),
        (
            ["run", "seed_gmm_alltoallv_ep4", "--set", "routing.seed=99999999999999999999"],
            "--set routing.seed=99999999999999999999: must be an integer in [0, 4294967295]",
        ),
        (
            ["run", "llama70b_tp8_decode", "--timeout", "0"],
            "mc2sim run: argument --timeout: '0': must be a finite number of seconds > 0",
        ),
        (
            ["calibrate", "--out", "{t}/afile", "--reps", "1"],
            "mc2sim calibrate: --out='{t}/afile': exists: pass --overwrite to replace it",
        ),
        (
            ["validate-model", "--topology", "{t}/absent.yaml"],
            "mc2sim validate-model: --topology='{t}/absent.yaml': no such file",
        ),
        (["exec", "{t}/absent.py"], "mc2sim exec: script='{t}/absent.py': no such file"),
        (
            [
                "sweep",
                "seed_gmm_alltoallv_ep4",
                "--what-if",
                "--set",
                "shape.top_k=9,2",
                "--ranks",
                "1",
                "--no-plots",
                "--out",
                "{t}/sweep",
            ],
            "mc2sim sweep: --ranks=1: top_k (9) must be <= experts_per_rank (4) * --ranks",
        ),
        (
            ["run", "seed_gmm_alltoallv_ep4", "--set", "limits=what-if"],
            "mc2sim run: limits='what-if': run executes the real operators",
        ),
    ],
    ids=[
        "not-utf8",
        "out-file",
        "seed",
        "timeout",
        "calibrate-out",
        "topology",
        "exec",
        "sweep-semantic",
        "run-what-if",
    ],
)
def test_one_line_from_rank_0_and_exit_status_2(inputs: Path, argv: list[str], line: str) -> None:
    args = [a.replace("{t}", str(inputs)) for a in argv]
    res = mpiexec(2, "-m", "mc2sim", *args, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [res.stderr.strip()], res.stderr
    assert line.replace("{t}", str(inputs)) in res.stderr
    assert "Traceback" not in res.stderr and "rank 1" not in res.stderr
    assert res.stdout == ""
    assert res.seconds < 30, f"took {res.seconds:.1f} s: somebody waited"
