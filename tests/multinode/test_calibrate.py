"""``mc2sim calibrate`` on a cluster fits both network levels: shared memory and TCP.

One round (the fit's quality is the benchmark's business, docs/BENCHMARKS.md); the oracle
is the structure of the written topology: a node of 2 ranks on shared memory, 2 nodes
joined by a switch, the CPU MPI's float32 reductions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mc2sim.cluster import Cluster
from mc2sim.topology import LinkKind, load

from .conftest import mpiexec

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(600)]


def test_calibrate_fits_both_levels(cluster_2x2: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "cluster.yaml"
    res = mpiexec(cluster_2x2, "-m", "mc2sim", "calibrate", "--reps", "1", "--out", str(out),
                  timeout=500)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    topology = load(out)
    assert [(d.name, d.ranks) for d in topology.network] == [
        ("shared-memory", 2),
        ("inter-node", 2),
    ]
    assert topology.network[1].kind is LinkKind.SWITCH
    assert topology.ranks_per_node == 2 and topology.world_size == 4
    assert topology.device.reductions_in_float32
    assert "4 ranks on 2 hosts" in topology.description
    for dim in topology.network:
        assert 0 < dim.bandwidth_gbps < 1e3 and dim.latency_us >= 0
