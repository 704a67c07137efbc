"""The command line launched as users launch it: mpiexec and torchrun, healthy and failing."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

from .conftest import mpiexec, torchrun

pytestmark = pytest.mark.timeout(180)


def test_info_on_four_ranks() -> None:
    res = mpiexec(4, "-m", "mc2sim", "info")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("mc2sim ") == 1, "only rank 0 prints"
    assert "world size:  4" in res.stdout
    assert "launcher:    mpiexec" in res.stdout
    assert "backend:     mpi" in res.stdout
    assert "MPI library: MPICH" in res.stdout
    assert [int(r) for r in re.findall(r"rank\s+(\d+)\s+host", res.stdout)] == [0, 1, 2, 3]
    # no GPU here: --device auto (the default of info) is the CPU, MPI carries host memory
    assert res.stdout.count("device cpu via mpi") == 4


def test_run_on_a_gpu_where_there_is_none_is_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    res = mpiexec(2, "-m", "mc2sim", "run", "seed_gmm_alltoallv_ep4", "--device", "cuda")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == ["mc2sim run: --device='cuda': needs a CUDA GPU, and this host has none"], (
        res.stderr
    )


def test_info_with_torch_backend_under_mpiexec() -> None:
    res = mpiexec(2, "-m", "mc2sim", "info", "--backend", "torch")
    assert res.returncode == 0, res.stderr
    assert "backend:     gloo" in res.stdout
    assert "world size:  2" in res.stdout


def test_info_under_torchrun() -> None:
    res = torchrun(2, "-m", "mc2sim", "info", "--backend", "torch")
    assert res.returncode == 0, res.stderr
    assert "launcher:    torchrun" in res.stdout
    assert "world size:  2" in res.stdout


ABORTED_WITHIN_S = 45
"""A failed rank ends the job within this (start-up of 2 ranks under load included), far
below the collective deadline the survivors would otherwise wait out (``DEADLINE_S``)."""
DEADLINE_S = "600"


FAILING = """
    import sys
    from mc2sim.comm import init
    comm = init(sys.argv[1])
    comm.barrier()
    if comm.rank == 1:
        {fail}
    comm.barrier()  # rank 0 waits here for a rank that will never come
    print("unreachable", flush=True)
"""


@pytest.mark.parametrize("backend", ["mpi", "torch"])
@pytest.mark.parametrize(
    ("fail", "line"),
    [
        (
            "raise RuntimeError('boom on purpose')",
            "mc2sim: rank 1/2: RuntimeError: boom on purpose",
        ),
        (
            "from mc2sim.errors import ParamInvalidError; "
            "raise ParamInvalidError('e', 40, 'must be <= 32')",
            "mc2sim: rank 1/2: ParamInvalidError: e=40: must be <= 32",
        ),
        ("raise SystemExit(3)", "mc2sim: rank 1/2: exit status 3"),
    ],
    ids=["exception", "aclnn-error", "exit-status"],
)
def test_a_failing_rank_aborts_the_job_quickly(
    tmp_path: Path, backend: str, fail: str, line: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MC2SIM_TIMEOUT", DEADLINE_S)
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(FAILING).format(fail=fail))
    res = mpiexec(2, "-m", "mc2sim", "exec", str(script), backend, timeout=60)
    assert res.returncode != 0
    assert res.seconds < ABORTED_WITHIN_S, f"took {res.seconds:.1f} s"
    assert line in res.stderr
    assert "unreachable" not in res.stdout
    if "ParamInvalidError" in line:
        assert "Traceback" not in res.stderr, "contract errors print one line, no traceback"


def test_a_failing_rank_under_torchrun_ends_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MC2SIM_TIMEOUT", DEADLINE_S)
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(FAILING).format(fail="raise RuntimeError('boom')"))
    res = torchrun(2, "-m", "mc2sim", "exec", str(script), "torch", timeout=60)
    assert res.returncode != 0
    assert res.seconds < ABORTED_WITHIN_S, f"took {res.seconds:.1f} s"
    assert "mc2sim: rank 1/2: RuntimeError: boom" in res.stderr


def test_exec_passes_arguments_and_runs_as_main(tmp_path: Path) -> None:
    script = tmp_path / "ok.py"
    # one write per rank: print() writes its items apart, and under PYTHONUNBUFFERED the two
    # ranks' pieces interleaved on the shared pipe ("argsargs [...]" once failed this)
    script.write_text(
        "import sys\nif __name__ == '__main__':\n"
        "    sys.stdout.write(f'args {sys.argv[1:]}\\n')\n    sys.stdout.flush()\n"
    )
    res = mpiexec(2, "-m", "mc2sim", "exec", str(script), "--flag", "v")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("args ['--flag', 'v']") == 2
