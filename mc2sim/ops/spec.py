"""What an operator is, in one place: the base of the per-family specs the op registry holds.

An :class:`OpSpec` owns everything about one fused operator that is not its arithmetic:

* its shape keys and their limits (the tables of :mod:`mc2sim.limits`, which the op's own
  parameter checks use too, so each aclnn rule is written once);
* the rules tying a shape to the world size and to a quantisation mode;
* the translation of a scenario into every rank's :class:`~mc2sim.schedule.Plan` under a
  tiling (what the simulator runs);
* the real-run case: each rank's inputs, the call of the op, and its float64 golden.

The specs live beside their ops (:mod:`mc2sim.ops.tp_spec`, :mod:`mc2sim.ops.moe_spec`,
:mod:`mc2sim.ops.attention_spec`) and are found by name through :mod:`mc2sim.ops.registry`;
nothing else branches on an op's name.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mc2sim._compat import StrEnum
from mc2sim.errors import ParamInvalidError
from mc2sim.limits import WORLD, Policy, integer

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mc2sim.comm.base import Communicator
    from mc2sim.scenario import Scenario
    from mc2sim.schedule.plan import Plan, PlanArrays
    from mc2sim.schedule.tiling import Tiling

__all__ = [
    "DTYPES",
    "OpName",
    "OpSpec",
    "OutputFormError",
    "QuantMode",
    "RealCase",
    "TilingSpec",
    "one_tensor",
    "placed",
    "returned",
]

DTYPES: tuple[str, ...] = ("float16", "bfloat16")
"""The activation/output dtypes a scenario may ask for."""

TilingSpec = None | str | int
"""A tiling as a scenario names it: ``"serial"``, ``"hardware"`` (or None), or N tiles."""


class OpName(StrEnum):
    """The fused multi-rank operators a scenario can study.

    Glossary:
        ``mm_all_reduce``: MatmulAllReduce (and its quantised variants): ``(m, k) x (k, n)``
            on each rank, then an AllReduce of the ``(m, n)`` partial results.
        ``gmm_alltoallv``: GroupedMatMulAlltoAllv, the MoE combine: expert matmuls, then the
            AlltoAllv back to the token owners (optionally a shared-expert matmul alongside).
        ``alltoallv_gmm``: AlltoAllvGroupedMatMul, the MoE dispatch: the AlltoAllv to the
            expert owners, then the expert matmuls (optionally a shared-expert matmul).
        ``all_gather_matmul``: AllGatherMatmul: gather every rank's ``(m, k)`` rows, then
            ``(world * m, k) x (k, n)``.
        ``matmul_reduce_scatter``: MatmulReduceScatter: ``(m, k) x (k, n)``, then a
            ReduceScatter leaving ``m / world`` rows on each rank.
        ``ifa``: IncreFlashAttention decode with page attention: every rank attends its own
            ``heads`` of each batch's token against a paged KV cache (the attention of a
            tensor-parallel decode layer; nothing crosses ranks). Tilings split the batch.
    """

    MM_ALL_REDUCE = "mm_all_reduce"
    GMM_ALLTOALLV = "gmm_alltoallv"
    ALLTOALLV_GMM = "alltoallv_gmm"
    ALL_GATHER_MATMUL = "all_gather_matmul"
    MATMUL_REDUCE_SCATTER = "matmul_reduce_scatter"
    IFA = "ifa"


class QuantMode(StrEnum):
    """Quantisation of a study (only ops whose spec lists the mode accept it).

    Glossary:
        ``none``: float x1 and x2 in ``dtype`` (MatmulAllReduce).
        ``weight_int8``: float x1, int8 x2 with per-channel antiquant scale and offset
            (WeightQuantMatmulAllReduce, seed 001).
        ``weight_int4``: float x1, int4 x2 (packed eight to an int32; ``n`` a multiple of 8)
            with per-channel antiquant scale and offset (WeightQuantMatmulAllReduce).
        ``w8a8``: int8 x1 and x2 with a dequant scale, output in ``dtype``
            (QuantMatmulAllReduce).
    """

    NONE = "none"
    WEIGHT_INT8 = "weight_int8"
    WEIGHT_INT4 = "weight_int4"
    W8A8 = "w8a8"


@dataclass(frozen=True, kw_only=True, slots=True)
class RealCase:
    """One rank's inputs of a real run: the op call as data, and the golden of its output.

    The call is ``op(*args, **kwargs)`` with the signature of the op's function in
    :mod:`mc2sim.ops` (torch_npu-style names); :meth:`run` makes it with mc2sim's own op
    under a tiling, :meth:`call` with any other implementation of that signature, and both
    hand the result to :attr:`output`, so each is checked against the same golden.
    """

    op: Callable[..., Any]
    """mc2sim's op, e.g. :func:`mc2sim.ops.mm_all_reduce` (it also takes ``tiling=``)."""

    args: tuple[Any, ...]
    """The positional arguments of the call on this rank (the communicator among them)."""

    kwargs: Mapping[str, Any]
    """The keyword arguments of the call on this rank."""

    output: Callable[[Any], torch.Tensor]
    """Picks what the golden covers from what the op returns: its output, flattened together
    with any second output the golden covers. Raises :class:`OutputFormError` naming the
    op's return form when given something else (a tensor for a tuple)."""

    expected: np.ndarray
    """This rank's float64 golden of what :attr:`output` returns."""

    k: int | None = None
    """The reduction length the precision standard scales its bound by (None: none)."""

    def run(self, tiling: TilingSpec | Tiling) -> torch.Tensor:
        """Call mc2sim's op on this rank's inputs under ``tiling`` (every rank calls it)."""
        return self.output(self.op(*self.args, tiling=tiling, **self.kwargs))

    def call(self, impl: Callable[..., Any]) -> torch.Tensor:
        """Call ``impl`` with the op's arguments on this rank; return what the golden covers."""
        return self.output(impl(*self.args, **self.kwargs))


class OutputFormError(TypeError):
    """An implementation returned something else than the op's form (a tensor for a tuple)."""


def returned(value: object, op: str, count: int, names: str) -> tuple[Any, ...]:
    """``value`` as the ``count``-tuple an op returns, or ``TypeError`` naming the form.

    Args:
        value: what an implementation returned.
        op: the op's name, for the message.
        count: how many outputs the op returns.
        names: their names, e.g. ``"(y, mm_y)"``.

    Returns:
        The outputs as a tuple.

    Raises:
        OutputFormError: ``value`` is not a tuple or list of ``count`` items.
    """
    if not isinstance(value, (tuple, list)) or len(value) != count:
        got = f"{type(value).__name__}" + (
            f" of {len(value)}" if isinstance(value, (tuple, list)) else ""
        )
        raise OutputFormError(f"{op} returns a tuple of {count} {names}; got a {got}")
    return tuple(value)


def one_tensor(value: object, op: str) -> torch.Tensor:
    """``value`` if it is a tensor, else :class:`OutputFormError` saying ``op`` returns one."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise OutputFormError(f"{op} returns one tensor; got a {type(value).__name__}")
    return value


def same_on_every_rank(plan: Plan, world: int) -> dict[int, Plan]:
    """Every rank's plan where they differ only in their rank: one task tuple, shared.

    What an op whose ranks all run the same tasks plans (MatmulAllReduce, attention): the
    simulator then reads the tasks once for all ranks.
    """
    return {r: plan if r == plan.rank else dataclasses.replace(plan, rank=r) for r in range(world)}


class OpSpec(ABC):
    """One fused operator: shape keys and limits, world-size rules, plans, real-run case."""

    op: ClassVar[OpName]
    """The name the registry finds this spec by."""

    required: ClassVar[tuple[str, ...]]
    """Keys a scenario's ``shape`` must give."""

    optional: ClassVar[tuple[str, ...]] = ()
    """Keys a scenario's ``shape`` may give."""

    quant_modes: ClassVar[tuple[QuantMode, ...]] = (QuantMode.NONE,)
    """The quantisation modes the op offers."""

    routed: ClassVar[bool] = False
    """Whether the op routes tokens to experts (a scenario's ``routing`` applies)."""

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key of ``shape``, required first, in the file format's order."""
        return self.required + self.optional

    def check_shape(
        self, shape: Mapping[str, object], where: str, policy: Policy | None = None
    ) -> dict[str, int]:
        """Check one shape's keys and the op's limits; errors name ``where.KEY``.

        Args:
            shape: dimension name to size, as a scenario gives it.
            where: the prefix errors name (``"shape"`` or ``"small"``).
            policy: the limit profile (None: strict); lifted limits are noted in it.

        Returns:
            The shape as plain ints, in :attr:`keys` order.

        Raises:
            ParamInvalidError: an unknown or missing key, or a limit broken.
        """
        for key in shape:
            if key not in self.keys:
                raise ParamInvalidError(
                    f"{where}.{key}",
                    shape[key],
                    f"unknown key for {self.op.value}; allowed: " + ", ".join(self.keys),
                )
        for key in self.required:
            if key not in shape:
                raise ParamInvalidError(
                    f"{where}.{key}",
                    None,
                    f"is required for {self.op.value} (required: {', '.join(self.required)})",
                )
        dims = {k: integer(f"{where}.{k}", shape[k]) for k in self.keys if k in shape}
        self._check_dims(dims, where, policy)
        return dims

    @abstractmethod
    def _check_dims(self, shape: Mapping[str, int], where: str, policy: Policy | None) -> None:
        """The op's limits on a shape whose keys are right; errors name ``where.KEY``."""

    def check_world(
        self, shape: Mapping[str, int], world: int, param: str, policy: Policy | None = None
    ) -> None:
        """Check the rules that tie a shape to the world size; errors name ``param``.

        Args:
            shape: a shape :meth:`check_shape` accepted.
            world: the world size.
            param: what errors call the world size (``"ranks"``, ``"world_size"``).
            policy: the limit profile (None: strict); lifted limits are noted in it.

        Raises:
            ParamInvalidError: a rule broken.
        """
        if integer(param, world) < 1:
            raise ParamInvalidError(param, world, "must be >= 1")
        WORLD.check(param, world)

    def check_quant(self, quant: QuantMode, shape: Mapping[str, int], where: str) -> None:
        """Check a quantisation mode against the op and a shape; errors name ``where.KEY``.

        Args:
            quant: the mode.
            shape: a shape :meth:`check_shape` accepted.
            where: the prefix errors name for shape keys.

        Raises:
            ParamInvalidError: the op does not offer ``quant``, or the shape does not fit it.
        """
        if quant not in self.quant_modes:
            allowed = ", ".join(repr(q.value) for q in self.quant_modes)
            raise ParamInvalidError("quant", quant.value, f"must be {allowed} for {self.op.value}")

    @abstractmethod
    def plans(self, scenario: Scenario, world: int, tiling: Tiling) -> dict[int, Plan]:
        """Every rank's plan of ``scenario`` (its effective shape) on ``world`` ranks.

        Args:
            scenario: the study.
            world: ranks to plan for (already checked with :meth:`check_world`).
            tiling: the tiling.

        Returns:
            rank -> plan.
        """

    def plan_arrays(
        self, scenario: Scenario, world: int, tiling: Tiling, dims: Sequence[int]
    ) -> PlanArrays | None:
        """Every rank's plan at once as arrays, where the op plans thousands of ranks so.

        Args:
            scenario: the study.
            world: ranks.
            tiling: the tiling.
            dims: the topology's ranks per network dimension, innermost first.

        Returns:
            The plans as arrays, or None: this op and world are planned by :meth:`plans`.
        """
        return None

    @abstractmethod
    def real_case(
        self,
        scenario: Scenario,
        comm: Communicator,
        gen: torch.Generator,
        device: torch.device | None = None,
    ) -> RealCase:
        """This rank's inputs of a real run of ``scenario``, the op call and its golden.

        Every rank calls it; inputs come from ``gen`` (seeded per rank by the caller), and
        the golden sees every rank's inputs (gathered through ``comm``). The inputs are drawn
        on the host (the same numbers whatever the device) and the op's are then moved to
        ``device`` (:func:`placed`), where the op computes and returns its output.

        Args:
            scenario: the study (its effective shape, dtype, quantisation, routing).
            comm: every rank of the job.
            gen: this rank's generator.
            device: where the op runs; None is the CPU.

        Returns:
            The case.
        """


def placed(device: torch.device | None, *tensors: torch.Tensor | None) -> list[Any]:
    """``tensors`` on ``device`` (None entries stay None; a None device leaves them be)."""
    if device is None:
        return list(tensors)
    return [None if t is None else t.to(device) for t in tensors]


def torch_dtype(name: str) -> Any:
    """Return the torch dtype of a scenario's dtype name (imports torch)."""
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]
