"""The namespace cluster's parts that need no root: refusals, names, the payload rate.

Building a cluster is tested in ``tests/multinode`` (root only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from mc2sim import cluster
from mc2sim.cluster import Cluster, ClusterError, tcp_payload_rate, token_bucket_bytes


def test_a_bucket_of_one_gigabit_passes_the_payload_of_full_frames() -> None:
    # 1448 bytes of payload in each 1514-byte frame the bucket counts
    assert tcp_payload_rate(1e9) == pytest.approx(125e6 * 1448 / 1514)
    assert tcp_payload_rate(4e9, mtu=9000) == pytest.approx(500e6 * 8948 / 9014)


def test_a_bucket_outlasts_two_packets_and_the_late_wake_ups_of_its_timer() -> None:
    # high-resolution timers: 1 ms of tokens, at least two 64 KiB packets
    assert token_bucket_bytes(4e9, tick_s=1e-9) == int(4e9 / 8 * (1e-3 + 2e-9))
    assert token_bucket_bytes(200e6, tick_s=1e-9) == 2 * 65536
    # a 4 ms tick (HZ=250, no high-resolution timers): 1 ms and two ticks of tokens
    assert token_bucket_bytes(200e6, tick_s=4e-3) == 225_000  # 25 MB/s for 9 ms
    assert token_bucket_bytes(1e9) >= 2 * 65536


@pytest.mark.parametrize(
    ("nodes", "per_node", "rule"),
    [(0, 2, "nodes=0"), (2, 0, "ranks_per_node=0"), (True, 2, "nodes=True"), (2, 1.5, "1.5")],
)
def test_bad_sizes_are_refused_before_anything_is_made(
    nodes: object, per_node: object, rule: str
) -> None:
    with pytest.raises(ClusterError, match=rule):
        Cluster(nodes=nodes, ranks_per_node=per_node)  # type: ignore[arg-type]


def test_a_cluster_that_is_not_up_has_no_names_and_downs_to_nothing() -> None:
    idle = Cluster(nodes=2, ranks_per_node=2)
    assert idle.world_size == 4 and idle.nodes == ()
    with pytest.raises(ClusterError, match="not up"):
        _ = idle.bridge
    assert idle.down() == []


def test_without_root_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "platform", "linux")
    reason = cluster.unavailable()
    assert reason is not None and "root" in reason
    with pytest.raises(ClusterError, match="no cluster on this machine: needs root"):
        Cluster(nodes=2, ranks_per_node=1).up()


def test_without_iproute2_it_names_the_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "tc" else tool)
    assert cluster.unavailable() == "needs tc (iproute2: ip and tc; util-linux: unshare)"


def test_the_command_line_needs_a_command() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "mc2sim.cluster", "run", "--nodes", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2
    assert "give the command to run after --" in res.stderr
