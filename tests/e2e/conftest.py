"""Helpers of the end-to-end tier: launch mc2sim as a user would, under mpiexec or torchrun."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found")
    return path


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(argv: list[str], *, timeout: float = 120, interruptible: bool = False) -> Result:
    """Run ``argv`` and return its status, output and wall time; never hangs past ``timeout``.

    ``interruptible``: start it with SIGINT's default action, as from a terminal, whatever
    this test run inherited (a shell script's background job starts with SIGINT ignored, and
    Python then raises no ``KeyboardInterrupt``).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # Open MPI's mpiexec refuses root without these (CI and the GPU host run as root); MPICH
    # ignores them
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    start = time.monotonic()
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
        preexec_fn=_sigint_default if interruptible else None,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def mpiexec(n: int, *args: str, timeout: float = 120) -> Result:
    return launch([tool("mpiexec"), "-n", str(n), sys.executable, *args], timeout=timeout)


def torchrun(n: int, *args: str, timeout: float = 120) -> Result:
    return launch(
        [tool("torchrun"), "--nproc_per_node", str(n), "--monitor_interval", "0.2", *args],
        timeout=timeout,
    )
