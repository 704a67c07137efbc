"""Process-level behaviour of a multi-rank job.

Abort everything when one rank fails or the user interrupts; keep freed memory in the process
so repeated calls time alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from mc2sim.comm.job import ABORT_GRACE_S, end_job, world_position
from mc2sim.errors import AclnnError, ParamInvalidError, ParamNullptrError

__all__ = [
    "ABORT_GRACE_S",
    "INTERRUPTED_STATUS",
    "abort_on_exception",
    "available_memory",
    "machine_id",
    "steady_allocator",
    "world_position",
]

INTERRUPTED_STATUS = 130
"""Exit status of a job ended by SIGINT (128 + 2, as shells report it)."""

LEAD_S = 1.0
"""How long a rank other than 0 leaves rank 0 to end the job with its line, when every rank
has the same reason to end it (SIGINT, or an error the ranks agreed on)."""


@contextlib.contextmanager
def abort_on_exception() -> Iterator[None]:
    """Run the body; if it raises on any rank, print one line naming the rank and abort the job.

    The line reads ``mc2sim: rank R/N: ErrorClass: message``. Errors of the operators'
    contract (``AclnnError``) print that line alone; anything else prints its traceback
    first. An error the ranks agreed on (``AclnnError.rank`` set: every rank raises it) is
    printed by rank 0 alone, R naming the rank that failed; another rank prints it only if
    still running after ``LEAD_S``. Exit status 1, but 2 for an agreed parameter error
    (``ParamInvalidError``, ``ParamNullptrError``: the caller's input, which every rank
    checked and agreed on: an op's arguments, or the counts invariant). A ``SystemExit``
    with a non-zero code aborts too, since the other ranks may be waiting for this one in a
    collective. In a lone process the exception propagates.

    SIGINT (Ctrl-C) ends the job with exit status 130 and one line, ``mc2sim: interrupted``,
    from rank 0 (a rank that alone got the signal says which it is), and no traceback. In a
    job of several ranks a helper thread takes the signal, since the main thread may be
    blocked inside MPI where Python never sees it; in a lone process ``KeyboardInterrupt``
    becomes that line and ``SystemExit(130)``.
    """
    with _interrupt_ends_the_job():
        try:
            yield
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if code != 0:
                rank, size = world_position()
                if size > 1:
                    end_job(f"mc2sim: rank {rank}/{size}: exit status {code}", code)
            raise
        except KeyboardInterrupt:
            _interrupted()
        except BaseException as exc:
            rank, size = world_position()
            if size <= 1:
                raise
            failed = exc.rank if isinstance(exc, AclnnError) else None  # set where agreed
            agreed = failed is not None
            if not isinstance(exc, AclnnError):
                traceback.print_exc()
            elif agreed and rank != 0:  # agreed: rank 0 has the same line
                time.sleep(LEAD_S)
            # an agreed error names the rank that failed; a parameter error is the user's
            who = failed if failed is not None else rank
            user = agreed and isinstance(exc, (ParamInvalidError, ParamNullptrError))
            end_job(f"mc2sim: rank {who}/{size}: {type(exc).__name__}: {exc}", 2 if user else 1)


def _interrupted() -> None:
    """End the job after SIGINT: one line, exit status 130 (``SystemExit`` in a lone process)."""
    rank, size = world_position()
    if size <= 1:
        sys.stdout.flush()
        print("mc2sim: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_STATUS) from None
    if rank != 0:  # rank 0 got it too when Ctrl-C reached the job: it speaks for all
        time.sleep(LEAD_S)
    where = "" if rank == 0 else f" (rank {rank}/{size})"
    end_job(f"mc2sim: interrupted{where}", INTERRUPTED_STATUS)


@contextlib.contextmanager
def _interrupt_ends_the_job() -> Iterator[None]:
    """In a job of several ranks, let a helper thread end the job on SIGINT.

    Python runs a signal handler only between bytecodes of the main thread, and the main
    thread may be blocked inside MPI for ever. The C-level handler still writes the signal's
    number to the wakeup fd (``signal.set_wakeup_fd``), which the helper thread reads.
    """
    _, size = world_position()
    if size <= 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = signal.signal(signal.SIGINT, _taken_by_the_helper)
    threading.Thread(
        target=_wait_for_interrupt, args=(read_fd,), name="mc2sim-interrupt", daemon=True
    ).start()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the helper reads end-of-file and returns


def _taken_by_the_helper(signum: int, frame: FrameType | None) -> None:
    """SIGINT's Python handler: nothing; the helper thread ends the job."""


def _wait_for_interrupt(read_fd: int) -> None:
    try:
        while True:
            data = os.read(read_fd, 64)
            if not data:
                return
            if signal.SIGINT in data:
                _interrupted()
    finally:
        os.close(read_fd)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30
"""Blocks below 1 GiB come from the heap and stay there when freed."""
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""The largest threshold glibc moves to by itself (``DEFAULT_MMAP_THRESHOLD_MAX``, 64-bit)."""
_TRIM_THRESHOLD = 1 << 30


def steady_allocator() -> bool:
    """Keep freed blocks in the process instead of returning them to the OS.

    glibc maps a block above its mmap threshold afresh on every allocation and unmaps it when
    freed, so each call of an op touches new pages and pays a fault per page, more in a VM,
    and whether a call pays depends on what ran before it. Its own threshold moves up to 32
    MiB (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit) and no further, so a call whose buffers
    are larger (a grouped matmul's 8192 x 2048 bfloat16 output, the float32 copy of a 16 MiB
    bfloat16 AllReduce) faulted on every call: 42.8 against 28.8 ms for that grouped matmul
    on this project's host (docs/BENCHMARKS.md, issue 17). Fixing the threshold at
    ``_MMAP_THRESHOLD`` (glibc 2.36 takes it; a glibc that refuses a threshold above 32 MiB
    gets 32 MiB) and raising the trim threshold makes repeated calls reuse their memory, as
    a caching allocator (PyTorch's on accelerators, jemalloc or tcmalloc on CPUs) does. Set
    by ``mc2sim`` commands at start; the user's ``MALLOC_MMAP_THRESHOLD_`` or
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
    threshold = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) or bool(
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
    )
    return threshold and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


@functools.cache
def machine_id() -> str:
    """This machine's identity: its kernel's boot id, else its host name (read once).

    Processes with one boot id share the kernel's clocks and cores (the network namespaces
    of one host, which emulate several, too).
    """
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def available_memory() -> int | None:
    """Bytes of memory this machine can still give processes, or None where unknown.

    ``MemAvailable`` of ``/proc/meminfo``; None where that cannot be read (not Linux).
    """
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemAvailable":
                return int(value.split()[0]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        return None
    return None
