"""A real run executes the very plans its simulation runs.

For every shipped scenario (small scale) on thread ranks, the tasks the executor records
inside the real op (their ids, names, kinds, FLOPs and bytes) equal the tasks of the plans the
op's spec builds for the simulator: the two sides of a study describe the same work. On one
host, no byte is recorded as crossing to another node.
"""

from __future__ import annotations

import pytest

from mc2sim.comm import ThreadCommunicator, run_threads
from mc2sim.scenario import builtin, list_builtin
from mc2sim.study import plans_for
from mc2sim.study.measure import real_case
from mc2sim.timeline import Stream, Timeline, record

WORLD = 2


@pytest.mark.parametrize("name", list_builtin())
def test_the_real_op_runs_the_plans_the_simulator_runs(name: str) -> None:
    scenario = builtin(name, ["scale=small"])

    def body(comm: ThreadCommunicator) -> dict[str, Timeline]:
        real = real_case(scenario, comm)
        recorded = {}
        for tiling in scenario.tilings:
            with record() as rec:
                real.run(tiling)
            recorded[str(tiling)] = rec.timeline
        return recorded

    per_rank = run_threads(WORLD, body)
    for tiling in scenario.tilings:
        plans = plans_for(scenario, WORLD, tiling)
        for rank in range(WORLD):
            records = sorted(per_rank[rank][str(tiling)].records, key=lambda r: r.task)
            got = [(r.task, r.name, str(r.kind), r.flops, r.bytes) for r in records]
            want = [(t.id, t.name, str(t.kind), t.flops, t.bytes) for t in plans[rank].tasks]
            assert got == want, (tiling, rank)
            assert {(r.run.op, r.run.tiling) for r in records} == {
                (plans[rank].op, plans[rank].tiling)
            }
            # one host: every byte stays inside the node; an AlltoAllv's are the bytes it sends
            assert {r.inter_bytes for r in records} == {0}
            for r in records:
                if r.kind == "alltoallv":
                    assert r.intra_bytes == r.bytes, (tiling, rank, r.name)
                elif r.stream is Stream.COMPUTE:
                    assert r.intra_bytes == 0, (tiling, rank, r.name)
