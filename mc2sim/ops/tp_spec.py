"""Specs of the tensor-parallel ops: MatmulAllReduce, AllGatherMatmul, MatmulReduceScatter.

Shape keys ``m, k, n``: each rank's x1 is ``(m, k)`` and x2 ``(k, n)``. The limits are
:mod:`mc2sim.limits`' (the ones :mod:`mc2sim.ops.tp` checks); plans come from
:mod:`mc2sim.schedule.builders`; real runs call :mod:`mc2sim.ops.tp` and check against
:mod:`mc2sim.golden`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from mc2sim import limits
from mc2sim.errors import ParamInvalidError
from mc2sim.limits import Policy
from mc2sim.ops.spec import (
    OpName,
    OpSpec,
    QuantMode,
    RealCase,
    one_tensor,
    placed,
    returned,
    same_on_every_rank,
    torch_dtype,
)
from mc2sim.schedule.builders import (
    MatmulShape,
    plan_all_gather_matmul,
    plan_matmul_reduce_scatter,
    plan_mm_all_reduce,
)
from mc2sim.schedule.plan import Plan, TaskKind

if TYPE_CHECKING:
    import torch

    from mc2sim.comm.base import Communicator
    from mc2sim.scenario import Scenario
    from mc2sim.schedule.tiling import Tiling

__all__ = [
    "RING_RECORDS_LIMIT",
    "AllGatherMatmulSpec",
    "MatmulAllReduceSpec",
    "MatmulReduceScatterSpec",
]

RING_RECORDS_LIMIT = 4_000_000
"""The most tasks (over all ranks) a simulation of AllGatherMatmul or MatmulReduceScatter
plans: tiled, each rank takes a step per peer, so the tasks grow as the square of the ranks
(8.4 million at 1024 ranks of ``ranks x 4``); past this a run is refused at once, in one
line, rather than filling the memory."""

_ELEM_BYTES = {"float16": 2, "bfloat16": 2}

_WEIGHT_BYTES = {QuantMode.WEIGHT_INT4: 0.5, QuantMode.WEIGHT_INT8: 1.0, QuantMode.W8A8: 1.0}
"""Bytes per element of x2 in each quantised mode (float x2: the dtype's)."""

_KIND = {QuantMode.NONE: TaskKind.MATMUL, QuantMode.W8A8: TaskKind.QUANT_MATMUL}
"""The compute task of each mode (the weight-quant modes: ``WEIGHT_QUANT_MATMUL``)."""


def _dense_shape(scenario: Scenario) -> MatmulShape:
    """The per-rank matmul of a tensor-parallel scenario, bytes as the mode stores them."""
    shape = scenario.effective_shape()
    elem = _ELEM_BYTES[scenario.dtype]
    return MatmulShape(
        k=shape["k"],
        n=shape["n"],
        in_bytes=1 if scenario.quant is QuantMode.W8A8 else elem,
        w_bytes=_WEIGHT_BYTES.get(scenario.quant, float(elem)),
        out_bytes=elem,
        dtype=scenario.dtype,
    )


def uniform(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Values uniform in ``[-scale, scale)`` from ``gen``, rounded to ``dtype``."""
    import torch

    return ((torch.rand(*shape, generator=gen) * 2 - 1) * scale).to(dtype)


class _TpSpec(OpSpec):
    """What the three tensor-parallel ops share: the keys ``m, k, n``."""

    required: ClassVar[tuple[str, ...]] = ("m", "k", "n")

    def _check_dims(self, shape: Mapping[str, int], where: str, policy: Policy | None) -> None:
        limits.MM_M.check(f"{where}.m", shape["m"], policy)
        limits.MM_N.check(f"{where}.n", shape["n"], policy)
        self._check_k(shape["k"], f"{where}.k", policy)

    def _check_k(self, k: int, param: str, policy: Policy | None) -> None:
        limits.TP_K.check(param, k, policy)


class MatmulAllReduceSpec(_TpSpec):
    """MatmulAllReduce and its quantised variants (weight int8/int4, w8a8).

    The optional shape key ``group_size`` gives the weight-quant modes per-group antiquant
    scales and offsets (``antiquant_group_size``: a ``(ceil(k/g), n)`` scale, row ``kk`` of
    the weight in group ``kk // g``); without it they are per channel. The plans do not
    depend on it.
    """

    op: ClassVar[OpName] = OpName.MM_ALL_REDUCE
    quant_modes: ClassVar[tuple[QuantMode, ...]] = tuple(QuantMode)
    optional: ClassVar[tuple[str, ...]] = ("group_size",)

    def _check_dims(self, shape: Mapping[str, int], where: str, policy: Policy | None) -> None:
        super()._check_dims(shape, where, policy)
        if "group_size" in shape:
            g, k = shape["group_size"], shape["k"]
            limits.ANTIQUANT_GROUP.check(
                f"{where}.group_size",
                g,
                g % 32 == 0 and 32 <= g <= k - 1,
                f"must be a multiple of 32 in [32, k-1] (k={k})",
                policy,
            )

    def _check_k(self, k: int, param: str, policy: Policy | None) -> None:
        limits.MM_K.check(param, k, policy)

    def check_quant(self, quant: QuantMode, shape: Mapping[str, int], where: str) -> None:
        """As :meth:`OpSpec.check_quant`; int4 weights also need ``n`` a multiple of 8."""
        super().check_quant(quant, shape, where)
        if "group_size" in shape and quant not in (QuantMode.WEIGHT_INT8, QuantMode.WEIGHT_INT4):
            raise ParamInvalidError(
                f"{where}.group_size",
                shape["group_size"],
                f"is for quant 'weight_int8' or 'weight_int4' (per-group antiquant), not "
                f"{quant.value!r}",
            )
        if quant is QuantMode.WEIGHT_INT4:
            limits.INT4_N.check(f"{where}.n", shape["n"], shape["n"] % 8 == 0)

    def plans(self, scenario: Scenario, world: int, tiling: Tiling) -> dict[int, Plan]:
        """Every rank's plan: the same ``(m, k) x (k, n)`` and AllReduce on each."""
        m = scenario.effective_shape()["m"]
        dense = _dense_shape(scenario)
        kind = _KIND.get(scenario.quant, TaskKind.WEIGHT_QUANT_MATMUL)
        first = plan_mm_all_reduce(
            m=m, shape=dense, kind=kind, tiling=tiling, rank=0, world_size=world
        )
        return same_on_every_rank(first, world)

    def real_case(
        self,
        scenario: Scenario,
        comm: Communicator,
        gen: torch.Generator,
        device: torch.device | None = None,
    ) -> RealCase:
        """Random x1, x2 (and the mode's scales); golden: the float64 sum of every rank's."""
        import torch

        from mc2sim import golden, ops
        from mc2sim.kernels import convert_weight_to_int4pack

        shape = scenario.effective_shape()
        m, k, n = shape["m"], shape["k"], shape["n"]
        dtype = torch_dtype(scenario.dtype)
        quant = scenario.quant
        kwargs: dict[str, Any] = {}
        if quant is QuantMode.W8A8:
            x1 = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
            x2 = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
            scale = (torch.rand(n, generator=gen) * 2e-4 + 1e-5).to(torch.bfloat16)
            kwargs = {"dequant_scale": scale}
            out_dtype = torch.bfloat16
        else:
            x1 = uniform(gen, m, k, dtype=dtype, scale=1.0)
            out_dtype = dtype
            if quant is QuantMode.NONE:
                x2 = uniform(gen, k, n, dtype=dtype, scale=1.0 / k**0.5)
            else:
                low, high = (-8, 8) if quant is QuantMode.WEIGHT_INT4 else (-128, 128)
                values = torch.randint(low, high, (k, n), generator=gen, dtype=torch.int32)
                x2 = (
                    convert_weight_to_int4pack(values)
                    if quant is QuantMode.WEIGHT_INT4
                    else values.to(torch.int8)
                )
                g = shape.get("group_size", 0)
                rows = -(-k // g) if g else None
                params = (n,) if rows is None else (rows, n)
                scale = (torch.rand(*params, generator=gen) * 0.02 / k**0.5 + 1e-3).to(dtype)
                offset = uniform(gen, *params, dtype=dtype, scale=1.0)
                kwargs = {"antiquant_scale": scale, "antiquant_offset": offset}
                if g:
                    kwargs["antiquant_group_size"] = g
        tensors = {key: v for key, v in kwargs.items() if key != "antiquant_group_size"}
        everyone = golden.gather_inputs(comm, x1=x1, x2=x2, **tensors)
        scales: dict[str, Any] = {key: everyone[key] for key in kwargs if key in everyone}
        if "antiquant_group_size" in kwargs:
            scales["antiquant_group_size"] = kwargs["antiquant_group_size"]
        expected = golden.mm_all_reduce(
            everyone["x1"], everyone["x2"], local_dtype=out_dtype, **scales
        )
        x1, x2 = placed(device, x1, x2)
        kwargs = {
            key: placed(device, v)[0] if isinstance(v, torch.Tensor) else v  # not the group size
            for key, v in kwargs.items()
        }
        return RealCase(
            op=ops.mm_all_reduce,
            args=(x1, x2, comm),
            kwargs=kwargs,
            output=lambda out: one_tensor(out, "mm_all_reduce"),
            expected=expected,
            k=k,
        )


class _TpPairSpec(_TpSpec):
    """AllGatherMatmul and MatmulReduceScatter: one builder of every rank's plan each."""

    builder: ClassVar[Callable[..., Plan]]
    """Builds one rank's plan from ``m``, the matmul's shape, the tiling, rank and world."""

    def plans(self, scenario: Scenario, world: int, tiling: Tiling) -> dict[int, Plan]:
        """Every rank's plan of the collective and the matmul, tiled alike on every rank."""
        m = scenario.effective_shape()["m"]
        dense = _dense_shape(scenario)
        build = type(self).builder
        first = build(m=m, shape=dense, tiling=tiling, rank=0, world_size=world)
        records = len(first.tasks) * world
        if records > RING_RECORDS_LIMIT:
            raise ParamInvalidError(
                "ranks",
                world,
                f"{self.op.value} tiled as {first.tiling!r} takes {len(first.tasks):,} tasks a "
                f"rank (a step per peer), {records:,} in all: a simulation holds at most "
                f"{RING_RECORDS_LIMIT:,}; use fewer ranks or the serial tiling",
            )
        return {first.rank: first} | {
            r: build(m=m, shape=dense, tiling=tiling, rank=r, world_size=world)
            for r in range(1, world)
        }


class AllGatherMatmulSpec(_TpPairSpec):
    """AllGatherMatmul: gather every rank's ``(m, k)`` rows, then multiply by ``(k, n)``."""

    op: ClassVar[OpName] = OpName.ALL_GATHER_MATMUL
    builder = staticmethod(plan_all_gather_matmul)

    def real_case(
        self,
        scenario: Scenario,
        comm: Communicator,
        gen: torch.Generator,
        device: torch.device | None = None,
    ) -> RealCase:
        """Random x1 per rank and x2; golden: the gathered rows times x2, in float64."""
        from mc2sim import golden, ops

        x1, x2, k = _tp_inputs(scenario, gen)
        everyone = golden.gather_inputs(comm, x1=x1, x2=x2)
        expected, _ = golden.all_gather_matmul(everyone["x1"], x2)
        x1, x2 = placed(device, x1, x2)

        def output(value: object) -> torch.Tensor:
            out, _ = returned(value, "all_gather_matmul", 2, "(out, gather_out)")
            return one_tensor(out, "all_gather_matmul (its out)")

        return RealCase(
            op=ops.all_gather_matmul,
            args=(x1, x2, comm, comm.size),
            kwargs={},
            output=output,
            expected=expected,
            k=k,
        )


class MatmulReduceScatterSpec(_TpPairSpec):
    """MatmulReduceScatter: ``(m, k) x (k, n)``, then ``m / world`` reduced rows per rank."""

    op: ClassVar[OpName] = OpName.MATMUL_REDUCE_SCATTER
    builder = staticmethod(plan_matmul_reduce_scatter)

    def check_world(
        self, shape: Mapping[str, int], world: int, param: str, policy: Policy | None = None
    ) -> None:
        """As :meth:`OpSpec.check_world`; ``m`` must also be a multiple of the world size."""
        super().check_world(shape, world, param, policy)
        limits.RS_ROWS.check(
            param,
            world,
            shape["m"] % world == 0,
            f"shape m ({shape['m']}) must be a multiple of {param} for {self.op}",
        )

    def real_case(
        self,
        scenario: Scenario,
        comm: Communicator,
        gen: torch.Generator,
        device: torch.device | None = None,
    ) -> RealCase:
        """Random x1, x2 per rank; golden: this rank's rows of the float64 sum of products."""
        from mc2sim import golden, ops

        x1, x2, k = _tp_inputs(scenario, gen)
        everyone = golden.gather_inputs(comm, x1=x1, x2=x2)
        expected = golden.matmul_reduce_scatter(
            comm.rank, everyone["x1"], everyone["x2"], local_dtype=x1.dtype
        )
        x1, x2 = placed(device, x1, x2)
        return RealCase(
            op=ops.matmul_reduce_scatter,
            args=(x1, x2, comm, comm.size),
            kwargs={},
            output=lambda out: one_tensor(out, "matmul_reduce_scatter"),
            expected=expected,
            k=k,
        )


def _tp_inputs(scenario: Scenario, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Float x1 ``(m, k)`` and x2 ``(k, n)`` of a tensor-parallel pair; and ``k``."""
    shape = scenario.effective_shape()
    m, k, n = shape["m"], shape["k"], shape["n"]
    dtype = torch_dtype(scenario.dtype)
    x1 = uniform(gen, m, k, dtype=dtype, scale=1.0)
    x2 = uniform(gen, k, n, dtype=dtype, scale=1.0 / k**0.5)
    return x1, x2, k
