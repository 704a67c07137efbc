"""Single-process checks of the communicator layer: argument checks, launch detection."""

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
    send, recv = check_splits(torch.zeros(3, 2), (1, 2), [torch.tensor(4), 0], 2)
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
def test_check_splits_rejects(t, send, recv, match) -> None:
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
def test_detect_launcher(env, expected) -> None:
    assert detect_launcher(env) is expected


def test_world_position_from_environment(monkeypatch) -> None:
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
