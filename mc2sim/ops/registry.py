"""The op registry: every fused operator's spec, found by its name.

Scenario validation, plans, real runs, calibration and validation ask here for what an
operator is; no other module branches on an op's name. Adding an operator means writing its
op (``mc2sim/ops/<family>.py``) and its spec (``mc2sim/ops/<family>_spec.py``, a subclass of
:class:`~mc2sim.ops.spec.OpSpec`) and listing the spec below.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from mc2sim.errors import ParamInvalidError
from mc2sim.ops.attention_spec import IfaSpec
from mc2sim.ops.moe_spec import AlltoAllvGmmSpec, GmmAlltoAllvSpec
from mc2sim.ops.spec import OpName, OpSpec
from mc2sim.ops.tp_spec import AllGatherMatmulSpec, MatmulAllReduceSpec, MatmulReduceScatterSpec

__all__ = ["SPECS", "spec_of"]

SPECS: Mapping[OpName, OpSpec] = MappingProxyType(
    {
        spec.op: spec
        for spec in (
            MatmulAllReduceSpec(),
            GmmAlltoAllvSpec(),
            AlltoAllvGmmSpec(),
            AllGatherMatmulSpec(),
            MatmulReduceScatterSpec(),
            IfaSpec(),
        )
    }
)
"""Every operator's spec, by name, in :class:`OpName` order."""


def spec_of(op: str | OpName) -> OpSpec:
    """Return the spec of the operator ``op``.

    Args:
        op: an :class:`OpName` or its value, e.g. ``"gmm_alltoallv"``.

    Returns:
        Its spec.

    Raises:
        ParamInvalidError: no operator has that name.
    """
    try:
        return SPECS[OpName(op)]
    except ValueError:
        allowed = ", ".join(repr(o.value) for o in OpName)
        raise ParamInvalidError("op", op, f"must be one of {allowed}") from None
