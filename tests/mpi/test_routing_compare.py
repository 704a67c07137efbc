"""Routing tables agree across ranks and with a real exchange; verdicts are gathered everywhere."""

from __future__ import annotations

import pytest
import torch

from mc2sim.comm import Communicator
from mc2sim.compare import GoldenMismatchError, check_all, raise_if_failed
from mc2sim.errors import ParamInvalidError
from mc2sim.routing import RoutingConfig, RoutingKind, route

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(90)]

CONFIGS = [
    RoutingConfig(kind=RoutingKind.BALANCED),
    RoutingConfig(kind=RoutingKind.UNIFORM, seed=21),
    RoutingConfig(kind=RoutingKind.ZIPF, seed=22, skew=1.5),
    RoutingConfig(kind=RoutingKind.HOT, seed=23, hot_experts=2, hot_fraction=0.4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.kind) for c in CONFIGS])
def test_every_rank_builds_the_same_table(comm: Communicator, config: RoutingConfig) -> None:
    e = 3
    table = route(config, world_size=comm.size, experts_per_rank=e, tokens_per_rank=40, top_k=5)
    tables = comm.allgather_object(table.counts.tolist())
    assert all(t == tables[0] for t in tables)
    assert sum(table.send_counts(comm.rank)) == 40 * 5


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.kind) for c in CONFIGS])
@pytest.mark.parametrize("direction", ["dispatch", "combine"])
def test_recv_counts_equal_an_exchange_of_send_counts(
    comm: Communicator, config: RoutingConfig, direction: str
) -> None:
    e = 2
    table = route(config, world_size=comm.size, experts_per_rank=e, tokens_per_rank=30, top_k=3)
    send = table.send_counts(comm.rank, direction)
    # block q of e counts goes to rank q; rank q gets the blocks ordered by source rank
    rows = torch.tensor(send, dtype=torch.int64).reshape(-1, 1)
    got = comm.alltoallv(rows, [e] * comm.size, [e] * comm.size)
    assert got.reshape(-1).tolist() == table.recv_counts(comm.rank, direction)


def test_check_all_gathers_every_verdict_and_raises_everywhere(comm: Communicator) -> None:
    golden = torch.arange(12, dtype=torch.float32).reshape(3, 4) + comm.rank
    actual = golden.to(torch.bfloat16)
    if comm.rank == 1:
        actual[1, 2] += 1.0
    verdicts = check_all(comm, actual, golden, "allclose")
    assert [v.rank for v in verdicts] == list(range(comm.size))
    assert [v.passed for v in verdicts] == [r != 1 for r in range(comm.size)]
    assert verdicts[1].worst[0].index == (1, 2)
    assert verdicts[1].mismatches == 1
    summaries = comm.allgather_object([v.summary() for v in verdicts])
    assert all(s == summaries[0] for s in summaries)
    with pytest.raises(GoldenMismatchError, match=r"on rank 1; first: rank 1: .*\(1, 2\)") as info:
        raise_if_failed(verdicts)
    assert [v.rank for v in info.value.verdicts] == [1]


def test_check_all_passes_keywords_through(comm: Communicator) -> None:
    golden = torch.ones(2048, dtype=torch.float32)
    actual = golden.clone()
    actual[comm.rank] += 2.0**-7  # above fp16's 2^-8, within its k >= 2048 bound 2^-7
    strict = check_all(comm, actual, golden, "error_balance", dtype=torch.float16)
    loose = check_all(comm, actual, golden, "error_balance", dtype=torch.float16, k=4096)
    assert not any(v.passed for v in strict)
    assert all(v.passed for v in loose)
    raise_if_failed(loose)


def test_a_parameter_error_on_one_rank_is_raised_on_every_rank(comm: Communicator) -> None:
    golden = torch.zeros(2, 3)
    actual = torch.zeros(3, 2) if comm.rank == comm.size - 1 else torch.zeros(2, 3)
    with pytest.raises(ParamInvalidError, match=r"golden.shape") as info:
        check_all(comm, actual, golden)
    assert info.value.code == 161002
    assert getattr(info.value, "rank", None) == comm.size - 1
