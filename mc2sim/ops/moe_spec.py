"""Specs of the expert-parallel MoE ops: GroupedMatMulAlltoAllv and AlltoAllvGroupedMatMul.

Shape keys: ``tokens`` (BS per rank), ``top_k``, ``experts_per_rank``, ``h1``, ``n1`` and,
for a shared expert, ``h2`` and ``n2``. Tokens pick experts by the scenario's routing
(:mod:`mc2sim.routing`), the same draw for plans and real runs. The limits are
:mod:`mc2sim.limits`' (the ones :mod:`mc2sim.ops.moe` checks).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from mc2sim import limits
from mc2sim.limits import Policy
from mc2sim.ops.spec import (
    OpName,
    OpSpec,
    RealCase,
    one_tensor,
    placed,
    returned,
    torch_dtype,
)
from mc2sim.ops.tp_spec import uniform
from mc2sim.routing import (
    Direction,
    ExpectedRouting,
    RoutingConfig,
    RoutingKind,
    RoutingTable,
    SparseRouting,
    expect,
    route,
)
from mc2sim.schedule.builders import MoeShape, moe_arrays, plan_alltoallv_gmm, plan_gmm_alltoallv
from mc2sim.schedule.plan import Plan, PlanArrays, SparseCounts

if TYPE_CHECKING:
    import torch

    from mc2sim.comm.base import Communicator
    from mc2sim.scenario import Scenario
    from mc2sim.schedule.tiling import Tiling

__all__ = ["EXPECTED_ROUTING_RANKS", "AlltoAllvGmmSpec", "GmmAlltoAllvSpec", "routing_of"]

_ELEM_BYTES = {"float16": 2, "bfloat16": 2}

EXPECTED_ROUTING_RANKS = 1024
"""Above this many ranks a simulation reads the routing's law in expectation instead of
drawing every token's picks (:meth:`_MoeSpec.plan_arrays`): at 8192 ranks of DeepSeek-V3's
combine the draw alone is 268 million picks. The expectation keeps what decides an
AlltoAllv's time at that scale, which experts are hot and by how much; a sum over thousands
of peers is close to its mean."""

DENSE_ROUTING_LIMIT = 64
"""Above this many ranks MoE counts are kept sparse (``route(..., sparse=True)``) to save
memory; the counts are the same draw either way, so crossing it never changes a workload."""


def routing_of(scenario: Scenario, world: int) -> RoutingTable | SparseRouting:
    """The routing of ``scenario``'s tokens on ``world`` ranks (every rank gets the same).

    Args:
        scenario: an MoE study.
        world: ranks in the expert-parallel group.

    Returns:
        The routing; ``send_counts(rank, direction)`` and ``recv_counts`` give each rank's.
    """
    shape = scenario.effective_shape()
    draw = _routing.__wrapped__ if scenario.routing.kind is RoutingKind.MATRIX else _routing
    return draw(  # a matrix file is read anew each time: it may have changed
        scenario.routing, world, shape["experts_per_rank"], shape["tokens"], shape["top_k"]
    )


@functools.lru_cache(maxsize=2)
def _routing(
    config: RoutingConfig, world: int, experts: int, tokens: int, top_k: int
) -> RoutingTable | SparseRouting:
    """:func:`routing_of`, drawn once per config and sizes.

    A study plans every tiling from the same draw; the tables are never changed once made.
    """
    return route(
        config, world_size=world, experts_per_rank=experts, tokens_per_rank=tokens,
        top_k=top_k, sparse=world > DENSE_ROUTING_LIMIT,
    )  # fmt: skip


@functools.lru_cache(maxsize=2)
def _expected(
    config: RoutingConfig, world: int, experts: int, tokens: int, top_k: int
) -> ExpectedRouting:
    """The routing's law (:func:`mc2sim.routing.expect`), read once per config and sizes.

    A study plans every tiling from the same law, as it plans them from one draw
    (:func:`_routing`); the law is never changed once made.
    """
    return expect(
        config, world_size=world, experts_per_rank=experts, tokens_per_rank=tokens, top_k=top_k
    )


class _MoeSpec(OpSpec):
    """What both MoE ops share: keys, limits, world-size rules, plans from the routing."""

    required: ClassVar[tuple[str, ...]] = ("tokens", "top_k", "experts_per_rank", "h1", "n1")
    optional: ClassVar[tuple[str, ...]] = ("h2", "n2")
    routed: ClassVar[bool] = True
    direction: ClassVar[Direction]
    """Which way the op's AlltoAllv sends the rows."""

    def _check_dims(self, shape: Mapping[str, int], where: str, policy: Policy | None) -> None:
        limits.TOP_K.check(f"{where}.top_k", shape["top_k"], policy)
        limits.E.check(f"{where}.experts_per_rank", shape["experts_per_rank"], policy)
        limits.H1.check(f"{where}.h1", shape["h1"], policy)
        limits.N1.check(f"{where}.n1", shape["n1"], policy)
        limits.BSK.check(f"{where}.tokens * top_k", shape["tokens"] * shape["top_k"], policy)
        if ("h2" in shape) != ("n2" in shape):
            given = "h2" if "h2" in shape else "n2"
            limits.SHARED_PAIR.check(f"{where}.{given}", shape[given], False)
        if "h2" in shape:
            limits.H2.check(f"{where}.h2", shape["h2"], policy)
            limits.N2.check(f"{where}.n2", shape["n2"], policy)

    def check_world(
        self, shape: Mapping[str, int], world: int, param: str, policy: Policy | None = None
    ) -> None:
        """As :meth:`OpSpec.check_world`; the experts over all ranks must fit top-K."""
        super().check_world(shape, world, param, policy)
        e = shape["experts_per_rank"]
        limits.enforce(
            limits.EXPERTS,
            param,
            world,
            limits.EXPERTS.low <= e * world <= limits.EXPERTS.high,
            f"experts_per_rank ({e}) * {param}: {limits.EXPERTS.rule}",
            policy,
        )
        limits.TOP_K_FITS.check(
            param,
            world,
            shape["top_k"] <= e * world,
            f"top_k ({shape['top_k']}) must be <= experts_per_rank ({e}) * {param}",
        )

    def plan_arrays(
        self, scenario: Scenario, world: int, tiling: Tiling, dims: Sequence[int]
    ) -> PlanArrays | None:
        """Above :data:`EXPECTED_ROUTING_RANKS` ranks, the plans from the routing in expectation.

        :func:`mc2sim.routing.expect` and :func:`~mc2sim.schedule.builders.moe_arrays`; None
        at or below it, and for a ``matrix`` routing (its counts are given).
        """
        if world <= EXPECTED_ROUTING_RANKS or scenario.routing.kind is RoutingKind.MATRIX:
            return None
        shape = scenario.effective_shape()
        expected = _expected(
            scenario.routing, world, shape["experts_per_rank"], shape["tokens"], shape["top_k"]
        )
        return moe_arrays(
            op=self.op.value, expected=expected, shape=self._shape(scenario),
            tiling=tiling, dims=dims,
        )  # fmt: skip

    def _shape(self, scenario: Scenario) -> MoeShape:
        """The :class:`MoeShape` of ``scenario``, without counts (a rank's are put in)."""
        shape = scenario.effective_shape()
        e = shape["experts_per_rank"]
        shared = (shape["tokens"], shape["h2"], shape["n2"]) if "h2" in shape else None
        return MoeShape(
            e=e,
            send=(),
            recv=(),
            h1=shape["h1"],
            n1=shape["n1"],
            elem_bytes=_ELEM_BYTES[scenario.dtype],
            shared=shared,
            dtype=scenario.dtype,
        )

    def plans(self, scenario: Scenario, world: int, tiling: Tiling) -> dict[int, Plan]:
        """Every rank's plan, its counts from the scenario's routing."""
        table = routing_of(scenario, world)
        blank = self._shape(scenario)
        builder = plan_gmm_alltoallv if self.direction is Direction.COMBINE else plan_alltoallv_gmm

        def counts(rank: int) -> tuple[tuple[int, ...] | SparseCounts, ...]:
            if isinstance(table, SparseRouting):
                return table.send_counts(rank, self.direction), table.recv_counts(
                    rank, self.direction
                )
            send = table.send_counts(rank, self.direction)
            return tuple(send), tuple(table.recv_counts(rank, self.direction))

        plans = {}
        for r in range(world):
            send, recv = counts(r)
            shape = dataclasses.replace(blank, send=send, recv=recv)
            plans[r] = builder(shape=shape, tiling=tiling, rank=r)
        return plans

    def real_case(
        self,
        scenario: Scenario,
        comm: Communicator,
        gen: torch.Generator,
        device: torch.device | None = None,
    ) -> RealCase:
        """Routed rows and expert weights (and the shared expert's); golden in float64.

        The output checked is the routed experts' and, after it, the shared expert's
        (flattened), against the float64 golden of both under the stricter bound of the two.
        """
        import numpy as np

        from mc2sim import golden, ops

        shape = scenario.effective_shape()
        e, h1, n1 = shape["experts_per_rank"], shape["h1"], shape["n1"]
        dtype = torch_dtype(scenario.dtype)
        table = route(
            scenario.routing,
            world_size=comm.size,
            experts_per_rank=e,
            tokens_per_rank=shape["tokens"],
            top_k=shape["top_k"],
            sparse=False,
        )
        send = table.send_counts(comm.rank, self.direction)
        recv = table.recv_counts(comm.rank, self.direction)
        x = uniform(gen, sum(send), h1, dtype=dtype, scale=1.0)
        w = uniform(gen, e, h1, n1, dtype=dtype, scale=1.0 / h1**0.5)
        mm_x = mm_w = None
        k = h1
        if "h2" in shape:  # the shared expert runs alongside, as in the simulated plans
            h2, n2 = shape["h2"], shape["n2"]
            mm_x = uniform(gen, shape["tokens"], h2, dtype=dtype, scale=1.0)
            mm_w = uniform(gen, h2, n2, dtype=dtype, scale=1.0 / h2**0.5)
            k = min(h1, h2)  # one check of both outputs: the stricter bound of the two
        everyone = golden.gather_inputs(comm, x=x, w=w, send=send)
        on_host = (x, w, mm_x, mm_w)
        x, w, mm_x, mm_w = placed(device, *on_host)
        shared = mm_x is not None
        op: Callable[..., Any]
        if self.direction is Direction.COMBINE:
            expected, mm_expected = golden.gmm_alltoallv(
                comm.rank, everyone["x"], everyone["w"], everyone["send"],
                mm_x=on_host[2], mm_weight=on_host[3],
            )  # fmt: skip
            op, names = ops.gmm_alltoallv, "(y, mm_y)"
        else:
            expected, mm_expected, _ = golden.alltoallv_gmm(
                comm.rank, everyone["x"], on_host[1], everyone["send"],
                mm_x=on_host[2], mm_weight=on_host[3],
            )  # fmt: skip
            op, names = ops.alltoallv_gmm, "(gmm_y, mm_y, permute_out)"
        name = self.op.value

        def output(value: object) -> torch.Tensor:
            outs = returned(value, name, len(names.split(",")), names)
            y = one_tensor(outs[0], f"{name} (its first output)")
            mm_y = one_tensor(outs[1], f"{name} (its mm_y)") if shared else None
            return _with_shared(y, mm_y)

        if mm_expected is not None:
            expected = np.concatenate([expected.ravel(), mm_expected.ravel()])
        return RealCase(
            op=op,
            args=(x, w, comm, comm.size, send, recv),
            kwargs={"mm_x": mm_x, "mm_weight": mm_w},
            output=output,
            expected=expected,
            k=k,
        )


def _with_shared(y: torch.Tensor, mm_y: torch.Tensor | None) -> torch.Tensor:
    """The routed experts' output, and the shared expert's after it (flattened) if any."""
    import torch

    if mm_y is None:
        return y
    return torch.cat([y.reshape(-1), mm_y.reshape(-1)])


class GmmAlltoAllvSpec(_MoeSpec):
    """GroupedMatMulAlltoAllv, the MoE combine: expert matmuls, then the AlltoAllv home."""

    op: ClassVar[OpName] = OpName.GMM_ALLTOALLV
    direction: ClassVar[Direction] = Direction.COMBINE


class AlltoAllvGmmSpec(_MoeSpec):
    """AlltoAllvGroupedMatMul, the MoE dispatch: the AlltoAllv to the experts, then matmuls."""

    op: ClassVar[OpName] = OpName.ALLTOALLV_GMM
    direction: ClassVar[Direction] = Direction.DISPATCH
