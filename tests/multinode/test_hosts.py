"""Every rank knows its host: ``mc2sim info`` under the cluster's mpiexec, a host file, torchrun.

The launches the README gives for real clusters (``mpiexec -hosts``, ``mpiexec -f``,
``torchrun --nnodes``), run on the namespaces; the oracle is the node each rank was placed
on (consecutive ranks per node).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mc2sim.cluster import Cluster

from .conftest import ROOT, launch, mpiexec

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]


def hosts_of(stdout: str) -> list[str]:
    """The host of each rank, in rank order, from ``mc2sim info``'s table."""
    rows = re.findall(r"rank\s+(\d+)\s+host (\S+)", stdout)
    assert [int(r) for r, _ in rows] == list(range(len(rows)))
    return [host for _, host in rows]


def placed(cluster: Cluster) -> list[str]:
    return [n.name for n in cluster.nodes for _ in range(cluster.ranks_per_node)]


@pytest.mark.parametrize("backend", ["mpi", "torch"], ids=["backend=mpi", "backend=torch"])
def test_info_shows_every_ranks_host(cluster_2x2: Cluster, backend: str) -> None:
    res = mpiexec(cluster_2x2, "-m", "mc2sim", "info", "--backend", backend, timeout=180)
    assert res.returncode == 0, res.stderr
    assert "world size:  4" in res.stdout
    assert ("backend:     gloo" if backend == "torch" else "backend:     mpi") in res.stdout
    assert hosts_of(res.stdout) == placed(cluster_2x2)


def test_a_host_file_places_ranks_as_hosts_does(cluster_3x1: Cluster) -> None:
    argv = cluster_3x1.mpiexec([sys.executable, "-m", "mc2sim", "info"])
    at = argv.index("-hosts")
    argv[at : at + 2] = ["-f", str(cluster_3x1.hostfile)]  # the README's mpiexec -f hosts
    res = launch(argv, cluster_3x1, timeout=180)
    assert res.returncode == 0, res.stderr
    assert hosts_of(res.stdout) == placed(cluster_3x1)


def test_torchrun_across_nodes(cluster_2x2: Cluster) -> None:
    """``torchrun --nnodes 2 --node_rank i`` on each node, as on two real hosts."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, **cluster_2x2.env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    master = cluster_2x2.nodes[0].address
    procs = [
        subprocess.Popen(
            cluster_2x2.on(
                i,
                [
                    torchrun,
                    "--nnodes",
                    "2",
                    "--node_rank",
                    str(i),
                    "--nproc_per_node",
                    "2",
                    "--master_addr",
                    master,
                    "--master_port",
                    "29500",
                    "-m",
                    "mc2sim",
                    "info",
                    "--backend",
                    "torch",
                ],
            ),  # fmt: skip
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=180))
    finally:
        for proc in procs:
            proc.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
    first = outs[0][0]
    assert "launcher:    torchrun" in first and "world size:  4" in first
    assert hosts_of(first) == placed(cluster_2x2)
