"""``timeline.gather``: every rank gets every rank's records, the same on all ranks."""

from __future__ import annotations

import pytest

from mc2sim.comm import Communicator
from mc2sim.errors import ParamInvalidError
from mc2sim.timeline import RunKey, Source, Stream, TaskRecord, Timeline, gather, record

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(90)]

RUN = RunKey(op="mm_all_reduce", tiling="tiles=2", repetition=0)


def records_of(rank: int) -> tuple[TaskRecord, ...]:
    """Rank ``rank``'s records: rank + 1 compute tiles, then one comm chunk."""
    tiles = tuple(
        TaskRecord(
            rank=rank,
            run=RUN,
            task=i,
            name=f"matmul[{i}]",
            stream=Stream.COMPUTE,
            kind="matmul",
            start_s=float(i),
            end_s=i + 1.0,
            flops=1000 * rank + i,
        )
        for i in range(rank + 1)
    )
    chunk = TaskRecord(
        rank=rank,
        run=RUN,
        task=rank + 1,
        name="allreduce[0]",
        stream=Stream.COMM,
        kind="allreduce",
        start_s=0.5,
        end_s=rank + 2.0,
        bytes=64 * (rank + 1),
    )
    return (*tiles, chunk)


def test_gather_returns_every_ranks_records(comm: Communicator) -> None:
    with record(meta={"world_size": comm.size}) as rec:
        for r in records_of(comm.rank):
            rec.add(r)
    merged = gather(comm, rec.timeline)
    expected = tuple(r for rank in range(comm.size) for r in records_of(rank))
    assert merged.records == expected
    assert merged.source is Source.MEASURED
    assert merged.meta == {"world_size": comm.size}
    assert merged.ranks() == list(range(comm.size))
    # the same timeline on every rank: compare against rank 0's copy
    assert comm.allgather_object(merged) == [merged] * comm.size
    # the slowest rank is the last one: comm ends at size + 1
    metrics = merged.metrics()
    assert metrics.critical_rank == comm.size - 1
    assert metrics.total_s == comm.size + 1.0


def test_gather_disagreeing_meta_raises_on_every_rank(comm: Communicator) -> None:
    mine = Timeline(records=records_of(comm.rank), meta={"host": f"node{comm.rank}"})
    with pytest.raises(ParamInvalidError, match="host"):
        gather(comm, mine)
    comm.barrier()  # every rank got here: nobody was left waiting
