"""Process-level behaviour of a multi-rank job: abort everything when one rank fails."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Iterator

from mc2sim.comm.launch import Launcher, detect_launcher
from mc2sim.errors import AclnnError

__all__ = ["ABORT_GRACE_S", "abort_on_exception", "world_position"]


ABORT_GRACE_S = 0.3
"""Seconds between printing a failing rank's message and aborting the job."""


def world_position() -> tuple[int, int]:
    """Return ``(rank, size)`` of this process in the job, without initialising anything.

    Reads MPI when it is already initialised, else the launcher's environment variables;
    a lone process is ``(0, 1)``.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()
    env = os.environ
    for rank_var, size_var in (
        ("RANK", "WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMIX_RANK", "PMIX_SIZE"),
    ):
        if rank_var in env and size_var in env:
            return int(env[rank_var]), int(env[size_var])
    return 0, 1


def _abort_job(code: int) -> None:
    """End every process of the job with ``code``; returns only in a lone process."""
    rank, size = world_position()
    if size <= 1:
        return
    if detect_launcher() is Launcher.MPIEXEC:
        from mpi4py import MPI

        # The launcher forwards our stderr through a pipe; aborting at once can end the job
        # before the line naming this rank reaches the user (seen with MPICH's hydra).
        time.sleep(ABORT_GRACE_S)
        MPI.COMM_WORLD.Abort(code)
    # torchrun (or another launcher) ends the other workers once this one exits non-zero;
    # exit at once, skipping atexit handlers that could wait on the others.
    os._exit(code)


@contextlib.contextmanager
def abort_on_exception() -> Iterator[None]:
    """Run the body; if it raises on any rank, print one line naming the rank and abort the job.

    The line reads ``mc2sim: rank R/N: ErrorClass: message``. Errors of the operators'
    contract (``AclnnError``) print that line alone; anything else prints its traceback
    first. A ``SystemExit`` with a non-zero code aborts too, since the other ranks may be
    waiting for this one in a collective. In a lone process the exception propagates.
    """
    try:
        yield
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0:
            rank, size = world_position()
            if size > 1:
                _report(f"mc2sim: rank {rank}/{size}: exit status {code}")
                _abort_job(code)
        raise
    except BaseException as exc:
        rank, size = world_position()
        if size <= 1:
            raise
        if not isinstance(exc, AclnnError):
            traceback.print_exc()
        _report(f"mc2sim: rank {rank}/{size}: {type(exc).__name__}: {exc}")
        _abort_job(1)
        raise  # pragma: no cover - _abort_job does not return in a job of several ranks


def _report(line: str) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
