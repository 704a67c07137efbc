"""Fixtures of the multi-node tier: small clusters of network namespaces on this host.

Every test here needs root (network namespaces, veth pairs, tc); elsewhere the fixtures skip
with the reason. A session first removes what a crashed earlier run left behind
(:func:`mc2sim.cluster.cleanup_stale`), and every cluster is torn down when the session
ends, whatever happened in it (a fixture finalizer; processes a failed launch left in a
namespace are killed by their ids).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from mc2sim.cluster import Cluster, cleanup_stale, unavailable

ROOT = Path(__file__).resolve().parents[2]
"""The repository: where the ranks run (tests/ and mc2sim/ importable from there)."""


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def usable() -> None:
    """Skip unless clusters can be built here; remove what crashed runs left behind.

    A ``timeout`` that ends the session with SIGTERM interrupts it instead, so the
    clusters' finalizers still run.
    """
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"multi-node tier skipped: {reason}")
    signal.signal(signal.SIGTERM, _interrupted)
    cleanup_stale()


def _cluster(nodes: int, per_node: int) -> Iterator[Cluster]:
    cluster = Cluster(nodes=nodes, ranks_per_node=per_node).up()
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def cluster_2x2(usable: None) -> Iterator[Cluster]:
    """2 nodes of 2 ranks each."""
    yield from _cluster(2, 2)


@pytest.fixture(scope="session")
def cluster_3x1(usable: None) -> Iterator[Cluster]:
    """3 nodes of 1 rank each."""
    yield from _cluster(3, 1)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def launch(argv: Sequence[str], cluster: Cluster, *, timeout: float) -> Result:
    """Run ``argv`` from the repository with the cluster's environment; never hangs."""
    env = {
        **os.environ,
        **cluster.env(),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    start = time.monotonic()
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False
    )
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def mpiexec(cluster: Cluster, *args: str, timeout: float = 300) -> Result:
    """``python args...`` on every rank of the cluster, through its mpiexec."""
    return launch(cluster.mpiexec([sys.executable, *args]), cluster, timeout=timeout)
