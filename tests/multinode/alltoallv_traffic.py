"""Run under a cluster's mpiexec (2 ranks per node): one recorded AlltoAllv; rank 0 prints JSON.

Each rank sends 8 MiB to the other rank of its node and 2 MiB to each rank of other nodes
(bfloat16 rows of 1024), through the executor, so the timeline records the bytes by level.
"""

from __future__ import annotations

import json

import torch

from mc2sim.comm import Communicator, Work, init
from mc2sim.schedule import Plan, Task, TaskKind
from mc2sim.schedule.executor import execute
from mc2sim.timeline import gather, record

ROW = 1024 * 2
INTRA_ROWS, INTER_ROWS = (8 << 20) // ROW, (2 << 20) // ROW


class Runner:
    """The TileRunner of a one-task AlltoAllv plan."""

    def __init__(self, comm: Communicator, x: torch.Tensor) -> None:
        self.comm, self.x = comm, x

    def compute(self, task: Task) -> None:
        raise RuntimeError("no compute task")

    def start(self, task: Task) -> Work:
        return self.comm.ialltoallv(self.x, task.send_splits, task.recv_splits)

    def land(self, task: Task, result: torch.Tensor) -> None:
        assert result.shape[0] == sum(task.recv_splits)


def main() -> None:
    comm = init("mpi")
    me = comm.rank // 2
    splits = tuple(
        0 if q == comm.rank else INTRA_ROWS if q // 2 == me else INTER_ROWS
        for q in range(comm.size)
    )
    task = Task(
        id=0, name="alltoallv", kind=TaskKind.ALLTOALLV, bytes=sum(splits) * ROW,
        send_splits=splits, recv_splits=splits, row_bytes=ROW,
    )  # fmt: skip
    plan = Plan(
        op="alltoallv", tiling="serial", rank=comm.rank, world_size=comm.size, tasks=(task,)
    )
    x = torch.zeros(sum(splits), 1024, dtype=torch.bfloat16)
    with record() as rec:
        execute(plan, comm, Runner(comm, x))
    timeline = gather(comm, rec.timeline)
    if comm.rank == 0:
        rows = [(r.rank, r.bytes, r.intra_bytes, r.inter_bytes) for r in timeline.records]
        print(json.dumps(sorted(rows)), flush=True)


if __name__ == "__main__":
    main()
