"""Bytes crossed the veths: what the timeline records as inter-node is what the links carried.

An AlltoAllv sends 8 MiB to the node peer and 2 MiB to each rank of the other node; the
recorded split is checked by hand, and each node's link counters (Ethernet frames, headers
included) must show the inter-node bytes its ranks sent, and not the 16 MiB that stayed
inside the node.
"""

from __future__ import annotations

import json

import pytest

from mc2sim.cluster import Cluster

from .conftest import ROOT, mpiexec

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]

MIB = 1 << 20


def test_inter_node_bytes_cross_the_veths_and_intra_node_bytes_do_not(
    cluster_2x2: Cluster,
) -> None:
    before = cluster_2x2.link_bytes()
    res = mpiexec(cluster_2x2, str(ROOT / "tests" / "multinode" / "alltoallv_traffic.py"))
    after = cluster_2x2.link_bytes()
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    # every rank: 8 MiB to its node peer, 2 x 2 MiB to the other node
    assert [tuple(r) for r in rows] == [(r, 12 * MIB, 8 * MIB, 4 * MIB) for r in range(4)]
    for node, was, now in zip(range(2), before, after, strict=True):
        inter = sum(r[3] for r in rows if r[0] // 2 == node)  # 8 MiB per node
        sent, received = now.sent - was.sent, now.received - was.received
        # the payload plus headers and the job's own small traffic (launch, gather), far
        # below the 16 MiB the node's ranks exchanged between themselves
        assert inter <= sent <= 1.05 * inter + 2 * MIB, (node, sent)
        assert inter <= received <= 1.05 * inter + 2 * MIB, (node, received)
