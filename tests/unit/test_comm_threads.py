"""ThreadCommunicator: every collective against results written out by hand, and its failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mc2sim.comm import Communicator, ThreadCommunicator, Work, agreed, run_threads
from mc2sim.comm.threads import GroupAborted
from mc2sim.errors import ParamInvalidError


def test_it_is_a_communicator_and_knows_its_place() -> None:
    def body(comm: ThreadCommunicator) -> tuple[int, int, str, bool]:
        return comm.rank, comm.size, comm.backend, isinstance(comm, Communicator)

    assert run_threads(3, body) == [(r, 3, "threads", True) for r in range(3)]


def test_allreduce_sums_every_rank_and_writes_into_out() -> None:
    def body(comm: ThreadCommunicator) -> tuple[torch.Tensor, ...]:
        mine = torch.tensor([comm.rank + 1.0, 10.0 * comm.rank])
        out = torch.empty(2)
        written = comm.allreduce(mine, out=out)
        assert written is out
        peak = comm.allreduce(mine, "max")
        low = comm.allreduce(torch.tensor([comm.rank + 2]), "min")
        prod = comm.allreduce(torch.tensor([comm.rank + 2]), "prod")
        return out, peak, low, prod, mine

    for r, (out, peak, low, prod, mine) in enumerate(run_threads(3, body)):
        assert out.tolist() == [6.0, 30.0]  # 1 + 2 + 3, 0 + 10 + 20
        assert peak.tolist() == [3.0, 20.0]
        assert low.tolist() == [2] and prod.tolist() == [2 * 3 * 4]
        assert mine.tolist() == [r + 1.0, 10.0 * r], "inputs are never modified"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_16_bit_sum_is_rounded_once_not_at_every_addition(dtype: torch.dtype) -> None:
    # numbers 2 apart near ``big``: big + 1 rounds back to big (to even), big + 2 is exact
    big = 2048.0 if dtype == torch.float16 else 256.0
    values = [big, 1.0, 1.0]

    def body(comm: ThreadCommunicator) -> torch.Tensor:
        return comm.allreduce(torch.tensor([values[comm.rank]], dtype=dtype))

    chained = torch.tensor([big], dtype=dtype) + torch.tensor([1.0], dtype=dtype)
    assert chained.item() == big, "one 16-bit addition at a time would lose both ones"
    for total in run_threads(3, body):
        assert total.dtype == dtype and total.item() == big + 2


def test_integer_sums_wrap_around_as_the_c_types_do() -> None:
    def body(comm: ThreadCommunicator) -> torch.Tensor:
        return comm.allreduce(torch.tensor([100], dtype=torch.int8))

    assert [t.item() for t in run_threads(2, body)] == [-56, -56]  # 200 - 256


def test_alltoallv_delivers_rows_by_source_rank_with_empty_splits() -> None:
    # rank s sends to rank r the rows [100 s + r] repeated (s + r) % 3 times
    def counts(s: int, r: int) -> int:
        return (s + r) % 3

    def body(comm: ThreadCommunicator) -> torch.Tensor:
        s, world = comm.rank, comm.size
        rows = [float(100 * s + r) for r in range(world) for _ in range(counts(s, r))]
        send = [counts(s, r) for r in range(world)]
        recv = [counts(r, s) for r in range(world)]
        t = torch.tensor(rows).reshape(-1, 1).repeat(1, 2)
        return comm.alltoallv(t, send, recv)

    got = run_threads(3, body)
    for r in range(3):
        expected = [float(100 * s + r) for s in range(3) for _ in range(counts(s, r))]
        assert got[r][:, 0].tolist() == expected and got[r].shape == (len(expected), 2)


def test_nonblocking_collective_completes_only_when_the_last_rank_joins() -> None:
    joined = threading.Event()
    tests: list[bool] = []

    def body(comm: ThreadCommunicator) -> list[float]:
        if comm.rank == 0:
            work = comm.ialltoallv(torch.tensor([[1.0], [2.0]]), [1, 1], [1, 1])
            assert isinstance(work, Work)
            tests.append(work.test())  # rank 1 has not started it yet
            joined.set()
            while not work.test():
                time.sleep(1e-4)
            result = work.wait()
            assert work.wait() is result, "wait() again returns the same tensor"
            return result.flatten().tolist()
        joined.wait(10)
        out = torch.zeros(2, 1)
        res = comm.ialltoallv(torch.tensor([[3.0], [4.0]]), [1, 1], [1, 1], out=out).wait()
        assert res is out
        return out.flatten().tolist()

    assert run_threads(2, body) == [[1.0, 3.0], [2.0, 4.0]]
    assert tests == [False]


def test_ranks_calling_different_collectives_abort_the_group() -> None:
    def body(comm: ThreadCommunicator) -> None:
        if comm.rank == 0:
            comm.allreduce(torch.ones(1))
        else:
            comm.barrier()

    with pytest.raises(GroupAborted, match="collective mismatch: rank . calls"):
        run_threads(2, body)


def test_reduce_scatter_allgather_and_objects() -> None:
    def body(comm: ThreadCommunicator) -> tuple[list[float], list[float], list[object], object]:
        rows = torch.arange(6.0).reshape(6, 1) * (comm.rank + 1)  # sum over 3 ranks: 6 x
        block = comm.reduce_scatter(rows)
        gathered = comm.allgather(torch.tensor(float(comm.rank)))  # 0-d becomes one row
        mine = {"rank": comm.rank}
        objs = comm.allgather_object(mine)
        objs[comm.rank]["rank"] = -1  # a copy: nobody else sees this
        comm.barrier()
        return block.flatten().tolist(), gathered.tolist(), objs, mine

    got = run_threads(3, body)
    for r, (block, gathered, objs, mine) in enumerate(got):
        assert block == [6.0 * (2 * r), 6.0 * (2 * r + 1)]
        assert gathered == [0.0, 1.0, 2.0]
        assert objs == [{"rank": q} if q != r else {"rank": -1} for q in range(3)]
        assert mine == {"rank": r}


def test_split_groups_by_color_and_orders_by_key() -> None:
    def body(comm: ThreadCommunicator) -> tuple[int, int, float]:
        sub = comm.split(comm.rank % 2, key=-comm.rank)  # reversed order inside each color
        total = sub.allreduce(torch.tensor([float(comm.rank)])).item()
        return sub.rank, sub.size, total

    assert run_threads(4, body) == [(1, 2, 2.0), (1, 2, 4.0), (0, 2, 2.0), (0, 2, 4.0)]


def test_a_rank_that_raises_ends_the_others_waits_at_once() -> None:
    def body(comm: ThreadCommunicator) -> None:
        if comm.rank == 2:
            raise KeyError("rank 2 broke")
        comm.barrier()  # would wait forever for rank 2

    start = time.perf_counter()
    with pytest.raises(KeyError, match="rank 2 broke"):
        run_threads(3, body, timeout_s=30)
    assert time.perf_counter() - start < 5


def test_a_collective_nobody_else_joins_times_out_naming_the_missing_ranks() -> None:
    def body(comm: ThreadCommunicator) -> None:
        if comm.rank == 0:
            comm.allgather_object("alone")

    with pytest.raises(GroupAborted, match=r"waited 0.2 s in allgather_object .* for ranks \[1\]"):
        run_threads(2, body, timeout_s=0.2)


def test_mismatched_splits_abort_every_rank_with_the_reason() -> None:
    def body(comm: ThreadCommunicator) -> torch.Tensor:
        recv = [1, 1] if comm.rank == 0 else [2, 1]  # rank 0 sends rank 1 one row, not two
        return comm.alltoallv(torch.zeros(2, 1), [1, 1], recv)

    with pytest.raises(GroupAborted, match=r"recv_splits\[0\] on rank 1=2: must equal"):
        run_threads(2, body)


def test_bad_arguments_are_rejected_before_anything_is_posted() -> None:
    def body(comm: ThreadCommunicator) -> str:
        with pytest.raises(ParamInvalidError, match="multiple of the group size"):
            comm.reduce_scatter(torch.zeros(3, 1))
        with pytest.raises(ParamInvalidError, match="op='mean'"):
            comm.allreduce(torch.zeros(1), "mean")
        with pytest.raises(ParamInvalidError, match="out"):
            comm.allreduce(torch.zeros(2), out=torch.zeros(3))
        with pytest.raises(ParamInvalidError, match="color"):
            comm.split(-1)
        return "ok"

    assert run_threads(2, body) == ["ok", "ok"]
    with pytest.raises(ParamInvalidError, match="size"):
        run_threads(0, lambda comm: None)


def test_agreement_raises_the_lowest_failing_ranks_error_everywhere() -> None:
    def body(comm: ThreadCommunicator) -> tuple[int, str]:
        try:
            with agreed(comm):
                if comm.rank in (1, 2):
                    raise ParamInvalidError("x", comm.rank, "must be 0")
        except ParamInvalidError as exc:
            return exc.rank, str(exc)  # type: ignore[return-value]
        return -1, "no error"

    got = run_threads(3, body)
    assert [rank for rank, _ in got] == [1, 1, 1]
    assert all("x=1: must be 0" in message for _, message in got)
