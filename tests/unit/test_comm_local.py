"""Single-process checks of the communicator layer: argument checks, launch detection."""

import os
import subprocess
import sys
from typing import Any, cast

import pytest
import torch

from mc2sim.comm import Backend, Launcher, ReduceOp, detect_launcher, init
from mc2sim.comm.base import check_reduce_rows, check_splits, reduce_op
from mc2sim.errors import ParamInvalidError
from mc2sim.runtime import world_position


def test_reduce_op_accepts_names_and_members() -> None:
    assert reduce_op("sum") is ReduceOp.SUM
    assert reduce_op(ReduceOp.MAX) is ReduceOp.MAX
    with pytest.raises(ParamInvalidError, match="op='mean': must be one of 'sum', 'prod'"):
        reduce_op("mean")


def test_check_splits_returns_ints() -> None:
    send, recv = check_splits(torch.zeros(3, 2), (1, 2), [cast(Any, torch.tensor(4)), 0], 2)
    assert send == [1, 2] and recv == [4, 0]
    assert all(type(v) is int for v in send + recv)


@pytest.mark.parametrize(
    ("t", "send", "recv", "match"),
    [
        (torch.tensor(1.0), [1], [1], "at least one dimension"),
        (torch.zeros(2), [2], [1, 1], "send_splits=\\[2\\]: must have one count per rank \\(2\\)"),
        (torch.zeros(2), [1, 1], [2, -1], "recv_splits=\\[2, -1\\]: counts must be >= 0"),
        (torch.zeros(2), [1, 2], [1, 1], "must sum to the rows of t \\(2\\), got 3"),
    ],
)
def test_check_splits_rejects(
    t: torch.Tensor, send: list[int], recv: list[int], match: str
) -> None:
    with pytest.raises(ParamInvalidError, match=match):
        check_splits(t, send, recv, 2)


def test_check_reduce_rows() -> None:
    assert check_reduce_rows(torch.zeros(6, 1), 3) == 2
    with pytest.raises(ParamInvalidError, match="multiple of the group size \\(4\\)"):
        check_reduce_rows(torch.zeros(6, 1), 4)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Launcher.SINGLE),
        ({"PMI_RANK": "0", "PMI_SIZE": "2"}, Launcher.MPIEXEC),
        ({"OMPI_COMM_WORLD_RANK": "1"}, Launcher.MPIEXEC),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            Launcher.TORCHRUN,
        ),
        ({"RANK": "0", "WORLD_SIZE": "2"}, Launcher.SINGLE),
    ],
)
def test_detect_launcher(env: dict[str, str], expected: Launcher) -> None:
    assert detect_launcher(env) is expected


def test_world_position_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "mpi4py.MPI", None)
    assert world_position() == (0, 1)
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("PMI_SIZE", "4")
    assert world_position() == (3, 4)


def test_init_rejects_unknown_backend() -> None:
    with pytest.raises(ParamInvalidError, match="backend='nccl': must be one of 'mpi', 'torch'"):
        init("nccl")
    assert Backend("torch") is Backend.TORCH


_FAULTS = """
import resource, sys
import numpy as np
from mc2sim.runtime import steady_allocator
applied = steady_allocator() if sys.argv[1] == "steady" else False
def step():  # an op's call: buffers alive at once, freed at the end
    # 20 MiB: below glibc's own 32 MiB cap on its threshold; 40 MiB: above it
    xs = [np.ones(mib << 17) for mib in (20, 20, 40)]
    return sum(x.sum() for x in xs)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steady_allocator_reuses_freed_blocks_instead_of_faulting_fresh_pages() -> None:
    def faults(mode: str, **env: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode],
            capture_output=True, text=True, check=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env,
        ).stdout.split()  # fmt: skip
        return out[0], int(out[1])

    applied, steady = faults("steady")
    assert applied == "True" and steady < 200, "repeated calls reuse their pages"
    _, default = faults("default")
    assert default > 1000, "glibc's default trims the heap and faults the pages in again"
    skipped, _ = faults("steady", MALLOC_TRIM_THRESHOLD_="131072")
    assert skipped == "False", "the user's MALLOC_* settings win"


# -- devices of the ranks, NCCL's one GPU per rank --------------------------------------------


def test_rank_device_on_a_host_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from mc2sim.comm import describe_device, rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("cpu") == torch.device("cpu")
    assert rank_device("auto") == torch.device("cpu")
    assert describe_device(rank_device("auto")) == "cpu"
    with pytest.raises(ParamInvalidError, match="--device='cuda': needs a CUDA GPU"):
        rank_device("cuda")
    with pytest.raises(ParamInvalidError, match="--device='tpu': must be one of 'cpu', 'cuda'"):
        rank_device("tpu")


def test_rank_device_takes_the_gpu_of_the_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    from mc2sim.comm import rank_device

    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for local, gpu in ((0, 0), (1, 1), (3, 1)):  # ranks share the GPUs in turn
        monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", str(local))
        for var in ("LOCAL_RANK", "MPI_LOCALRANKID"):
            monkeypatch.delenv(var, raising=False)
        assert rank_device("cuda") == torch.device("cuda", gpu)
        assert rank_device("auto") == torch.device("cuda", gpu)
    assert chosen == [torch.device("cuda", g) for g in (0, 0, 1, 1, 1, 1)]


def test_nccl_needs_a_gpu_per_rank_of_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from mc2sim.comm import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MPI_LOCALNRANKS", "4")
    assert launch._default_torch_backend() == "gloo"  # ranks sharing the GPU: not NCCL
    with pytest.raises(ParamInvalidError, match="needs one GPU per rank: 4 ranks share 1 GPU"):
        launch._one_gpu_per_rank()
    monkeypatch.setenv("MPI_LOCALNRANKS", "1")
    assert launch._default_torch_backend() == "nccl"
    launch._one_gpu_per_rank()  # one rank, one GPU: allowed
