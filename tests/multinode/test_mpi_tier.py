"""The MPI test tier across hosts: ranks in separate namespaces, talking TCP between them.

The communicator and fused-op tests of ``tests/mpi`` (golden-checked against the float64
goldens, on both backends: MPI and torch.distributed gloo) run unchanged under the cluster's
mpiexec, on 2 nodes of 2 ranks and on 3 nodes of 1; the nodes' link counters show that the
traffic crossed the veths.
"""

from __future__ import annotations

import re

import pytest

from mc2sim.cluster import Cluster

from .conftest import mpiexec

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(900)]

TIER = ("tests/mpi/test_comm.py", "tests/mpi/test_ops.py")
PYTEST = (
    "-m", "pytest", "-m", "mpi", "--with-mpi", "-q", "-p", "no:cacheprovider",
    "--timeout=120", "--timeout-method=thread",
)  # fmt: skip


@pytest.mark.parametrize("shape", ["2x2", "3x1"])
def test_the_mpi_tier_passes_across_hosts(shape: str, request: pytest.FixtureRequest) -> None:
    cluster: Cluster = request.getfixturevalue(f"cluster_{shape}")
    before = cluster.link_bytes()
    res = mpiexec(cluster, *PYTEST, *TIER, timeout=800)
    after = cluster.link_bytes()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = re.search(r"(\d+) passed", res.stdout)
    assert summary is not None and int(summary.group(1)) > 200, res.stdout[-1000:]
    assert " failed" not in res.stdout and " error" not in res.stdout
    for node, was, now in zip(cluster.nodes, before, after, strict=True):
        # the collectives moved megabytes between the nodes, both ways
        assert now.sent - was.sent > 1_000_000, node.name
        assert now.received - was.received > 1_000_000, node.name
