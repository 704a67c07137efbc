"""A stuck, exited or interrupted rank ends the job with one line, as users launch it.

Each test runs ``mc2sim exec`` of a tiny script under ``mpiexec -n 2`` with
``MC2SIM_TIMEOUT=5``. A rank that never reaches a collective ends the job with exit status 3
within the timeout plus 10 s, and one line naming the op, the collective and that rank; SIGINT
ends it with status 130 and the one line ``mc2sim: interrupted``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import Result, launch, mpiexec, tool

pytestmark = pytest.mark.timeout(180)

TIMEOUT_S = 5.0

SCRIPT = r"""
    import sys, time
    import torch
    from mc2sim import ops
    from mc2sim.comm import init

    comm = init(sys.argv[1])
    mode = sys.argv[2]
    last = comm.rank == comm.size - 1
    counts = [1] * (comm.size * 2)
    args = dict(
        gmm_x=torch.ones(sum(counts), 8, dtype=torch.bfloat16),
        gmm_weight=torch.ones(2, 8, 4, dtype=torch.bfloat16),
        comm=comm, ep_world_size=comm.size, send_counts=counts, recv_counts=list(counts),
    )
    ops.gmm_alltoallv(**args)  # every rank is up and in step
    if last and mode == "sleep":  # stuck in Python before the op's first collective
        time.sleep(120)
    if last and mode == "exit":  # leaves quietly, as a crashed script with status 0 would
        sys.exit(0)
    if last and mode == "mid":  # stuck inside the op, before its second AlltoAllv chunk
        started = comm.ialltoallv
        calls = []
        def slow(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                time.sleep(120)
            return started(*a, **k)
        comm.ialltoallv = slow
    if not last:
        sys.stdout.write(f"waiting since {time.time()}\n")  # one write, not interleaved
        sys.stdout.flush()
    ops.gmm_alltoallv(**args)
    print("unreachable", flush=True)
"""


def run_stuck(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, mode: str) -> Result:
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent(SCRIPT))
    monkeypatch.setenv("MC2SIM_TIMEOUT", str(TIMEOUT_S))
    res = mpiexec(2, "-m", "mc2sim", "exec", str(script), backend, mode, timeout=120)
    ended = time.time()
    assert res.returncode == 3, res.stderr
    assert "unreachable" not in res.stdout
    since = [float(s) for s in re.findall(r"waiting since ([\d.]+)", res.stdout)]
    assert since, res.stdout
    assert ended - since[0] < TIMEOUT_S + 10, f"ended {ended - since[0]:.1f} s after the wait"
    lines = [line for line in res.stderr.splitlines() if line.startswith("mc2sim:")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return res


# ids other than the bare "mpi": pytest-mpi takes a test with the keyword "mpi" for an MPI test
@pytest.mark.parametrize("backend", ["mpi", "torch"], ids=["mpi4py", "torch.distributed"])
def test_a_rank_stuck_before_an_op_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    res = run_stuck(tmp_path, monkeypatch, backend, "sleep")
    line = next(x for x in res.stderr.splitlines() if x.startswith("mc2sim:"))
    assert re.match(
        r"mc2sim: timeout: gmm_alltoallv: agree\[0\] waited 5\.\d s; ranks not arrived: 1 "
        r"\(rank 1: last issued gmm_alltoallv: alltoallv\[\d\] [\d.]+ s ago\)$",
        line,
    ), line


def test_a_rank_stuck_inside_an_op_is_named_at_the_collective_it_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # agree[0], allgather[1] (the counts), alltoallv[2], alltoallv[3]: rank 1 never issues [3]
    res = run_stuck(tmp_path, monkeypatch, "mpi", "mid")
    assert re.search(
        r"^mc2sim: timeout: gmm_alltoallv: alltoallv\[3\] waited 5\.\d s; ranks not arrived: 1 "
        r"\(rank 1: last issued gmm_alltoallv: alltoallv\[2\]",
        res.stderr,
        re.MULTILINE,
    ), res.stderr


def test_a_rank_that_exited_is_named_as_not_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = run_stuck(tmp_path, monkeypatch, "mpi", "exit")
    assert re.search(
        r"^mc2sim: timeout: gmm_alltoallv: agree\[0\] waited 5\.\d s; ranks not arrived: 1 "
        r"\(rank 1: no answer",
        res.stderr,
        re.MULTILINE,
    ), res.stderr


INTERRUPTED = r"""
    import sys, time
    from mc2sim.comm import init

    comm = init(sys.argv[1])
    comm.barrier()
    sys.stdout.write(f"ready {comm.rank}\n")  # one write: the ranks' output interleaves
    sys.stdout.flush()
    if comm.rank == comm.size - 1:
        time.sleep(120)  # this rank is in Python
    comm.barrier()  # the other is blocked inside MPI
    print("unreachable", flush=True)
"""


# ids other than the bare "mpi": pytest-mpi takes a test with the keyword "mpi" for an MPI test
@pytest.mark.parametrize("backend", ["mpi", "torch"], ids=["mpi4py", "torch.distributed"])
def test_sigint_ends_the_job_with_status_130_and_one_line(tmp_path: Path, backend: str) -> None:
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent(INTERRUPTED))
    argv = [tool("mpiexec"), "-n", "2", sys.executable, "-m", "mc2sim", "exec", str(script)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*argv, backend], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        seen = ""
        while seen.count("ready") < 2:  # both ranks at their waits
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        if seen.count("ready") < 2:
            proc.kill()
            pytest.fail(f"the ranks did not get ready: {proc.communicate()}")
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: mpiexec forwards it to the ranks
        _, stderr = proc.communicate(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert seconds < 10
    lines = [x for x in stderr.splitlines() if x.startswith("mc2sim:")]
    assert lines == ["mc2sim: interrupted"], stderr
    assert "Traceback" not in stderr


def test_sigint_in_a_lone_process_is_one_line_and_status_130(tmp_path: Path) -> None:
    script = tmp_path / "lone.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")
    res = launch(
        [sys.executable, "-m", "mc2sim", "exec", str(script)], timeout=60, interruptible=True
    )
    assert res.returncode == 130, res.stderr
    assert res.stderr == "mc2sim: interrupted\n"


MISMATCH = r"""
    import sys
    import torch
    from mc2sim import ops
    from mc2sim.comm import init

    comm = init("mpi")
    x1 = torch.ones(2, 16, dtype=torch.bfloat16)
    x2 = torch.ones(16, 4, dtype=torch.bfloat16)
    ops.mm_all_reduce(x1, x2, comm, tiling=2 if comm.rank == comm.size - 1 else None)
"""


def test_a_mismatch_across_ranks_ends_the_job_with_one_line_from_rank_zero(
    tmp_path: Path,
) -> None:
    script = tmp_path / "mismatch.py"
    script.write_text(textwrap.dedent(MISMATCH))
    res = mpiexec(3, "-m", "mc2sim", "exec", str(script), timeout=120)
    assert res.returncode == 2, res.stderr  # the caller's parameter: a user error
    lines = [x for x in res.stderr.splitlines() if x.startswith("mc2sim:")]
    assert lines == [  # from rank 0, naming rank 2, whose tiling differs
        "mc2sim: rank 2/3: ParamInvalidError: tiling={2: 'tiles=2'}: must be the same on every "
        "rank ('hardware' on ranks 0, 1): the ranks issue one schedule of collectives together"
    ], res.stderr
    assert "Traceback" not in res.stderr


CROSS_RANK = r"""
    import sys
    import torch
    from mc2sim import ops
    from mc2sim.comm import init
    from mc2sim.errors import AclnnError

    comm = init("mpi")
    r, w = comm.rank, comm.size
    bf16 = torch.bfloat16
    case = sys.argv[1]
    if case == "progress":  # one rank's bad mode, caught: every rank raises, the group goes on
        x1, x2 = torch.ones(4, 16, dtype=bf16), torch.ones(16, 8, dtype=bf16)
        try:
            ops.mm_all_reduce(x1, x2, comm, progress="bogus" if r == 1 else "poll")
            said = [f"rank {r} returned"]
        except AclnnError as exc:
            said = [f"rank {r} raised {exc}"]
        said.append(f"rank {r} then {ops.mm_all_reduce(x1, x2, comm)[0, 0].item():g}")
        every = comm.allgather_object(said)  # printed by rank 0 alone: no lines interleaved
        if r == 0:
            print("\n".join(line for lines in every for line in lines), flush=True)
    else:  # rank 0 sends 2 rows of its expert 0 to rank 1, which expects 1: the counts invariant
        send = [1] * (2 * w)
        if r == 0:
            send[2] = 2
        ops.gmm_alltoallv(
            gmm_x=torch.ones(sum(send), 8, dtype=bf16), gmm_weight=torch.ones(2, 8, 4, dtype=bf16),
            comm=comm, ep_world_size=w, send_counts=send, recv_counts=[1] * (2 * w),
        )
"""


def test_a_bad_progress_mode_on_one_rank_fails_every_rank_alike(tmp_path: Path) -> None:
    script = tmp_path / "cross.py"
    script.write_text(textwrap.dedent(CROSS_RANK))
    res = mpiexec(2, "-m", "mc2sim", "exec", str(script), "progress", timeout=120)
    assert res.returncode == 0, res.stderr
    said = [line for line in res.stdout.splitlines() if line.startswith("rank ")]
    raised = "raised progress='bogus': must be 'poll' or 'thread'"
    # 16 columns of ones, summed over 2 ranks
    assert said == [f"rank 0 {raised}", "rank 0 then 32", f"rank 1 {raised}", "rank 1 then 32"]


@pytest.mark.parametrize("n", [2, 3])
def test_the_counts_invariant_ends_the_job_with_one_line(tmp_path: Path, n: int) -> None:
    script = tmp_path / "cross.py"
    script.write_text(textwrap.dedent(CROSS_RANK))
    res = mpiexec(n, "-m", "mc2sim", "exec", str(script), "counts", timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.splitlines() if "mc2sim" in x]
    assert lines == [
        f"mc2sim: rank 1/{n}: ParamInvalidError: recv_counts[0] on rank 1=1: must equal "
        "send_counts[2] on rank 0 (2): rows of local expert 0 that rank 0 sends to rank 1 "
        "(receiver q=1, sender r=0, expert j=0)"
    ], res.stderr
    assert "Traceback" not in res.stderr
