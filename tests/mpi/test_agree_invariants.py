"""Agreement on errors and the cross-rank counts invariant, on real ranks."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch

from mc2sim.comm import Communicator, MpiObjectCommunicator, agree, agreed
from mc2sim.errors import ParamInvalidError, ParamNullptrError
from mc2sim.invariants import check_counts

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(90)]


def test_agree_passes_when_nobody_failed(comm: Communicator) -> None:
    agree(comm, None)
    with agreed(comm):
        pass


def test_the_lowest_failing_rank_wins_on_every_rank(comm: Communicator) -> None:
    # ranks >= 1 fail, with different errors; rank 1's error is raised everywhere
    with pytest.raises(ParamInvalidError) as info:
        with agreed(comm):
            if comm.rank >= 1:
                raise ParamInvalidError("e", 30 + comm.rank, f"seen on rank {comm.rank}")
    assert str(info.value) == "e=31: seen on rank 1"
    assert info.value.code == 161002
    assert info.value.rank == 1


def test_error_class_and_code_travel(comm: Communicator) -> None:
    last = comm.size - 1
    with pytest.raises(ParamNullptrError) as info:
        agree(comm, ParamNullptrError("x1", None, "is required") if comm.rank == last else None)
    assert info.value.code == 161001
    assert info.value.rank == last
    comm.barrier()  # everyone is still in step after the error


def test_ranks_of_objects_alone_agree_on_errors_and_mismatches() -> None:
    """The same outcomes over a communicator with no tensor collectives (a simulated sweep's)."""
    group = MpiObjectCommunicator()
    assert not hasattr(group, "allreduce")
    agree(group, None)
    last = group.size - 1
    with pytest.raises(ParamNullptrError) as info:
        agree(group, ParamNullptrError("x1", None, "is required") if group.rank == last else None)
    assert (info.value.code, info.value.rank) == (161001, last)
    with pytest.raises(ParamInvalidError) as mismatch:
        with agreed(group) as same:
            same("tiling", "by-k-4" if group.rank == last else "by-m-2", "one schedule")
    assert mismatch.value.rank == last
    assert str(mismatch.value).startswith(f"tiling={{{last}: 'by-k-4'}}: must be the same")
    group.barrier()


def consistent_counts(world: int, e: int) -> tuple[list[list[int]], list[list[int]]]:
    """send[r][q*e+j] and recv[q][r*e+j] built by an explicit triple loop."""
    send = [[0] * (world * e) for _ in range(world)]
    recv = [[0] * (world * e) for _ in range(world)]
    for r in range(world):
        for q in range(world):
            for j in range(e):
                rows = (3 * r + 5 * q + 7 * j) % 6  # includes zeros
                send[r][q * e + j] = rows
                recv[q][r * e + j] = rows
    return send, recv


@pytest.mark.parametrize("e", [1, 3])
def test_consistent_counts_pass(comm: Communicator, e: int) -> None:
    send, recv = consistent_counts(comm.size, e)
    check_counts(comm, send[comm.rank], recv[comm.rank], e)
    # tensors are accepted too
    send_t, recv_t = torch.tensor(send[comm.rank]), torch.tensor(recv[comm.rank])
    check_counts(comm, cast(Any, send_t), cast(Any, recv_t), e)


def test_violation_is_named_on_every_rank(comm: Communicator) -> None:
    e = 2
    send, recv = consistent_counts(comm.size, e)
    q, r, j = comm.size - 1, 0, 1
    recv[q][r * e + j] += 4  # receiver q expects 4 rows more than r sends
    with pytest.raises(ParamInvalidError) as info:
        check_counts(comm, send[comm.rank], recv[comm.rank], e)
    sent = send[r][q * e + j]
    assert info.value.code == 161002
    assert info.value.param == f"recv_counts[{r * e + j}] on rank {q}"
    assert info.value.value == sent + 4
    assert f"must equal send_counts[{q * e + j}] on rank {r} ({sent})" in str(info.value)
    assert f"receiver q={q}, sender r={r}, expert j={j}" in str(info.value)


def test_first_violation_in_receiver_order(comm: Communicator) -> None:
    e = 1
    send, recv = consistent_counts(comm.size, e)
    send[1][0] += 1  # breaks (q=0, r=1, j=0)
    send[0][comm.size - 1] += 1  # breaks (q=W-1, r=0, j=0): later in (q, r, j) order
    with pytest.raises(ParamInvalidError, match=r"receiver q=0, sender r=1, expert j=0"):
        check_counts(comm, send[comm.rank], recv[comm.rank], e)


def test_malformed_counts_on_one_rank_raise_everywhere(comm: Communicator) -> None:
    e = 2
    send, recv = consistent_counts(comm.size, e)
    if comm.rank == 1:
        send[1] = send[1][:-1]
    with pytest.raises(ParamInvalidError, match=r"len\(send_counts\)") as info:
        check_counts(comm, send[comm.rank], recv[comm.rank], e)
    assert info.value.rank == 1
    if comm.rank == 0:
        recv[0][0] = -1
    with pytest.raises(ParamInvalidError, match=r"recv_counts\[0\]=-1: counts must be >= 0"):
        check_counts(comm, send[comm.rank], recv[comm.rank], e)
    with pytest.raises(ParamInvalidError, match="e=0"):
        check_counts(comm, send[comm.rank], recv[comm.rank], 0)
    with pytest.raises(ParamInvalidError, match="must be integers"):
        check_counts(comm, cast(Any, [0.5] * (comm.size * e)), recv[comm.rank], e)
