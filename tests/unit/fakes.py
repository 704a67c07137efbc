"""Test doubles: a Communicator standing for any rank of a group whose ranks all pass the same."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mc2sim.comm.base import Communicator, ReduceOp


class SameOnEveryRank:
    """Rank 0 of a ``size``-rank group in which every rank holds the same data.

    Reductions over identical inputs are computable locally (sum = size x, min = max = x),
    and gathers repeat this rank's input, so the ops' local checks and their agreement can be
    unit-tested for any world size without MPI.
    """

    backend = "same-on-every-rank"

    def __init__(self, size: int) -> None:
        self.rank = 0
        self.size = size

    def allreduce(
        self, t: torch.Tensor, op: str | ReduceOp = "sum", *, out: Any = None
    ) -> torch.Tensor:
        result = t * self.size if op == "sum" else t.clone()
        return result if out is None else out.copy_(result)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.reshape(-1, *t.shape[1:]) if t.dim() else t.reshape(1)] * self.size)

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj] * self.size

    def alltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        *,
        out: Any = None,
    ) -> torch.Tensor:
        raise AssertionError("validation tests must fail before any data moves")

    def reduce_scatter(self, t: torch.Tensor, op: str | ReduceOp = "sum") -> torch.Tensor:
        raise AssertionError("validation tests must fail before any data moves")

    def ialltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        *,
        out: Any = None,
    ) -> Any:
        raise AssertionError("validation tests must fail before any data moves")

    def iallreduce(self, t: torch.Tensor, op: str | ReduceOp = "sum", *, out: Any = None) -> Any:
        raise AssertionError("validation tests must fail before any data moves")

    def split(self, color: int, key: int = 0) -> Communicator:
        raise AssertionError("a group whose ranks all hold the same data has no sub-groups")

    def barrier(self) -> None:
        pass


def toy_manifest(
    *,
    source: str = "measured",
    scenario: str = "toy",
    world_size: int = 2,
    skew: float = 1.0,
    tilings: Sequence[str] = ("serial", "hardware", "2"),
    scenario_path: Any = None,
) -> Any:
    """A results manifest of a small mm_all_reduce study, from plain values."""
    from mc2sim.results import collect_manifest

    return collect_manifest(
        scenario=scenario, scenario_path=scenario_path, op="mm_all_reduce",
        shape={"m": 8, "k": 16, "n": 32}, dtype="float16", quant="none", standard="allclose",
        repetitions=3, scale="small", tilings=tilings, routing_kind="balanced",
        routing_seed=7, routing_skew=skew, topology="toy", world_size=world_size,
        source=source, seeds={"routing": 7}, hosts=[f"host{r}" for r in range(world_size)],
        argv=["mc2sim", "run", scenario], overrides=["scale=small"],
    )  # fmt: skip
