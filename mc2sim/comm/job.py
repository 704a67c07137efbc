"""The processes of a job: which launcher started them, where this one is, how they all end.

``end_job`` ends every process of the job with one line and an exit status, whichever
launcher started them; the watchdog, the SIGINT handler and ``abort_on_exception`` all end a
job through it, so a process prints at most one such line.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import NoReturn

from mc2sim._compat import StrEnum

__all__ = [
    "ABORT_GRACE_S",
    "Launcher",
    "abort_job",
    "detect_launcher",
    "end_job",
    "world_position",
]

# Environment variables each launcher sets in every process it starts.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


class Launcher(StrEnum):
    """How the processes of a job were started.

    Glossary: ``mpiexec`` (MPICH hydra, Open MPI, PMIx launchers), ``torchrun`` (or any
    launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), ``single`` (one
    process started by hand).
    """

    MPIEXEC = "mpiexec"
    TORCHRUN = "torchrun"
    SINGLE = "single"


def detect_launcher(environ: dict[str, str] | None = None) -> Launcher:
    """Say which launcher started this process, from its environment.

    Args:
        environ: the environment to inspect; ``None`` means ``os.environ``.

    Returns:
        The launcher. torchrun's variables win when both kinds are present.

    """
    env = os.environ if environ is None else environ
    if all(v in env for v in _TORCHRUN_VARS):
        return Launcher.TORCHRUN
    if any(v in env for v in _MPI_RANK_VARS):
        return Launcher.MPIEXEC
    return Launcher.SINGLE


ABORT_GRACE_S = 0.3
"""Seconds between printing the line that ends a job and aborting it."""

_ENDING = threading.Lock()
"""Held by the first thread of this process that ends the job; the others wait for the end."""


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


def abort_job(code: int) -> None:
    """End every process of the job with exit status ``code``; returns only in a lone process.

    Under mpiexec with MPI initialised this is ``MPI_Abort``: the launcher ends the others
    and exits with ``code``. MPICH prints a line of its own when it aborts; our line has said
    why already, so that one goes to ``/dev/null``. Under torchrun (or MPI not initialised
    yet) the process exits at once and the launcher ends the other workers.
    """
    _, size = world_position()
    if size <= 1:
        return
    mpi = sys.modules.get("mpi4py.MPI")
    initialised = mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized()
    if mpi is not None and initialised and detect_launcher() is Launcher.MPIEXEC:
        # The launcher forwards our stderr through a pipe; aborting at once can end the job
        # before the line naming this rank reaches the user (seen with MPICH's hydra).
        time.sleep(ABORT_GRACE_S)
        _silence_stderr()
        mpi.COMM_WORLD.Abort(code)
    # torchrun (or another launcher) ends the other workers once this one exits non-zero;
    # exit at once, skipping atexit handlers that could wait on the others.
    os._exit(code)


def end_job(line: str | None, code: int) -> NoReturn:
    """Print ``line`` on stderr, then end every process of the job with exit status ``code``.

    Safe from any thread: the first caller in this process prints and aborts; a later caller
    (another thread ending the job for another reason) prints nothing and waits for the end.
    In a lone process it exits with ``code``.

    Args:
        line: one line saying why, or ``None`` to print nothing.
        code: the job's exit status.

    """
    if not _ENDING.acquire(blocking=False):
        while True:  # the first caller is ending the job, this process with it
            time.sleep(3600)
    if line is not None:
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
    abort_job(code)
    os._exit(code)


def _silence_stderr() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    except OSError:  # pragma: no cover - keep stderr rather than fail to abort
        pass
