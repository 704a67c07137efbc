"""The documented limits of the MC2 operators, each written once (OPS.md; the aclnn constraints).

A limit here is checked in two places that must agree: by the operator itself on each rank
(:mod:`mc2sim.ops`, :mod:`mc2sim.kernels`) and by scenario validation before anything runs
(:mod:`mc2sim.scenario`, through the op registry). Both call the same :class:`Range` (or the
same rule function below), so an out-of-range value is refused with the same error class,
code, value and rule wherever it is met; only the parameter's name says where it was met
(``H1`` in an op call, ``shape.h1`` in a scenario file)::

    H1.check("shape.h1", 70000)
    # ParamInvalidError: shape.h1=70000: H1 must be in [1, 65535]

This module is the bottom layer of the package: it imports nothing but :mod:`mc2sim.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mc2sim.errors import ParamInvalidError

__all__ = [
    "A3_EP_WORLD_SIZES",
    "A3_PEER_BYTES",
    "ALLREDUCE_WORLD_SIZES",
    "BSK",
    "E",
    "EXPERTS",
    "H1",
    "H2",
    "IFA_BATCH",
    "IFA_BLOCK_ALIGN",
    "IFA_BLOCK_SIZE",
    "IFA_GROUP",
    "IFA_HEADS",
    "IFA_HEAD_DIM",
    "IFA_LIST_BATCH",
    "IFA_PAGED_HIDDEN",
    "MM_K",
    "MM_M",
    "MM_N",
    "N1",
    "N2",
    "TOP_K",
    "TP_K",
    "TP_WORLD_SIZES",
    "Range",
    "integer",
    "require_multiple",
]


def integer(param: str, value: object) -> int:
    """Return ``value`` if it is an integer (a bool is not), else raise.

    Args:
        param: the parameter's name where it was met.
        value: the value seen.

    Returns:
        ``value`` as a plain ``int``.

    Raises:
        ParamInvalidError: ``value`` is not an integer.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        index = getattr(value, "__index__", None)
        if isinstance(value, bool) or index is None:
            raise ParamInvalidError(param, value, "must be an integer")
        return int(index())
    return int(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class Range:
    """An integer that must lie in ``[low, high]``, with the operator's name for it."""

    name: str
    """The operator's name of the quantity, e.g. ``"H1"`` or ``"e * ep_world_size"``."""

    low: int
    """The smallest allowed value."""

    high: int
    """The largest allowed value (inclusive; OPS.md's ``(0, 65536)`` is ``[1, 65535]``)."""

    @property
    def rule(self) -> str:
        """The rule in words, the same wherever it is checked."""
        return f"{self.name} must be in [{self.low}, {self.high}]"

    def check(self, param: str, value: object) -> int:
        """Return ``value`` if it is an integer in range.

        Args:
            param: the parameter's name where it was met (``"H1"``, ``"shape.h1"``).
            value: the value seen.

        Returns:
            ``value`` as an ``int``.

        Raises:
            ParamInvalidError: not an integer, or out of range.
        """
        number = integer(param, value)
        if not self.low <= number <= self.high:
            raise ParamInvalidError(param, value, self.rule)
        return number


def require_multiple(param: str, value: int, of: int, what: str) -> None:
    """Raise unless ``value`` is a multiple of ``of`` (``what`` names ``of`` in the rule).

    Args:
        param: the parameter's name where it was met.
        value: the value seen.
        of: what it must be a multiple of.
        what: ``of`` in words, e.g. ``"world_size (4)"``.

    Raises:
        ParamInvalidError: ``value % of != 0``.
    """
    if of <= 0 or value % of:
        raise ParamInvalidError(param, value, f"must be a multiple of {what}")


# ------------------------------------------------------------------ MatmulAllReduce (OPS.md 2)
MM_M = Range(name="m", low=1, high=2147483647)
"""Rows of x1 (all leading dimensions together)."""
MM_K = Range(name="k", low=1, high=65535)
"""The contracted dimension."""
MM_N = Range(name="n", low=1, high=65535)
"""Columns of x2."""
ALLREDUCE_WORLD_SIZES = (1, 2, 4, 8)
"""World sizes MatmulAllReduce allows on the hardware (HCCS full mesh; ``strict=`` only)."""

# ------------------------------------------- AllGatherMatmul, MatmulReduceScatter (OPS.md 4)
TP_K = Range(name="k", low=256, high=65534)
"""x1's k for AllGatherMatmul and MatmulReduceScatter: ``[256, 65535)``."""
TP_WORLD_SIZES = {"A2": (2, 4, 8), "A3": (2, 4, 8, 16, 32)}
"""World sizes per hardware profile (``strict=`` only)."""

# ------------------------------------ GroupedMatMulAlltoAllv and its dispatch pair (OPS.md 3)
E = Range(name="e", low=1, high=32)
"""Local experts per rank (gmm_weight.shape[0])."""
EXPERTS = Range(name="e * ep_world_size", low=1, high=256)
"""Experts over the whole expert-parallel group."""
BSK = Range(name="BSK", low=1, high=52428799)
"""Rows of the routed side, ``BS * K``: ``(0, 52428800)``."""
H1 = Range(name="H1", low=1, high=65535)
"""Hidden size of the routed experts' input: ``(0, 65536)``."""
H2 = Range(name="H2", low=1, high=12288)
"""Hidden size of the shared expert's input: ``(0, 12288]``."""
N1 = Range(name="N1", low=1, high=65535)
"""Output size of the routed experts: ``(0, 65536)``."""
N2 = Range(name="N2", low=1, high=65535)
"""Output size of the shared expert: ``(0, 65536)``."""
TOP_K = Range(name="top-K", low=2, high=8)
"""Experts each token picks, ``K = BSK / BS``."""
A3_EP_WORLD_SIZES = (8, 16, 32, 64)
"""Expert-parallel world sizes on A3 (``strict='A3'`` only)."""
A3_PEER_BYTES = Range(name="traffic to one peer (rows x H1 x 2 bytes)", low=2 << 20, high=100 << 20)
"""Bytes each rank sends each peer on A3 (``strict='A3'`` only): 2 MB to 100 MB."""

# --------------------------------------------------- IncreFlashAttention (OPS.md 6, A2 line)
IFA_BATCH = Range(name="B", low=1, high=65536)
"""Batch size."""
IFA_LIST_BATCH = Range(name="B of a tensor-list KV", low=1, high=256)
"""Batch size when key and value are lists, one tensor per batch."""
IFA_HEADS = Range(name="numHeads", low=1, high=256)
"""Query heads (the document's N axis)."""
IFA_HEAD_DIM = Range(name="D", low=1, high=512)
"""Head dimension."""
IFA_GROUP = Range(name="numHeads / numKeyValueHeads", low=1, high=64)
"""Query heads per KV head."""
IFA_BLOCK_SIZE = Range(name="blockSize", low=1, high=512)
"""Page-attention block size (also a multiple of :data:`IFA_BLOCK_ALIGN`)."""
IFA_BLOCK_ALIGN = {"float": 16, "int8": 32}
"""What blockSize must be a multiple of, by KV dtype family."""
IFA_PAGED_HIDDEN = Range(name="numKeyValueHeads * D", low=1, high=65535)
"""KV hidden size of a ``(blocknum, blockSize, H)`` page-attention cache."""
