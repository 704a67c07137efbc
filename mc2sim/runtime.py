"""Process-level behaviour of a multi-rank job.

Abort everything when one rank fails; keep freed memory in the process so repeated calls
time alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
import traceback
from collections.abc import Iterator

from mc2sim.comm.launch import Launcher, detect_launcher
from mc2sim.errors import AclnnError

__all__ = ["ABORT_GRACE_S", "abort_on_exception", "steady_allocator", "world_position"]


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


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's largest mmap threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit)."""
_TRIM_THRESHOLD = 1 << 30


def steady_allocator() -> bool:
    """Keep freed blocks of up to 32 MiB in the process instead of returning them to the OS.

    glibc maps a block above its (moving) mmap threshold afresh on every allocation and unmaps
    it when freed, so each call of an op touches new pages and pays a fault per page, more in
    a VM, and whether a call pays depends on what ran before it. Fixing the threshold at its
    maximum and raising the trim threshold makes repeated calls reuse their memory, as a
    caching allocator (PyTorch's on accelerators, jemalloc or tcmalloc on CPUs) does. Set by
    ``mc2sim`` commands at start; the user's ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` win.

    Returns:
        Whether the settings were applied (False off glibc, or when the user set them).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
