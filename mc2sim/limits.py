"""The documented limits of the MC2 operators, each written once (OPS.md; the aclnn constraints).

A limit here is checked in two places that must agree: by the operator itself on each rank
(:mod:`mc2sim.ops`, :mod:`mc2sim.kernels`) and by scenario validation before anything runs
(:mod:`mc2sim.scenario`, through the op registry). Both call the same :class:`Range` (or the
same rule function below), so an out-of-range value is refused with the same error class,
code, value and rule wherever it is met; only the parameter's name says where it was met
(``H1`` in an op call, ``shape.h1`` in a scenario file)::

    H1.check("shape.h1", 70000)
    # ParamInvalidError: shape.h1=70000: H1 must be in [1, 65535]

Every limit is of one of two kinds (:class:`LimitKind`): **semantic** limits define the
operator and always apply; **hardware** limits describe today's hardware or implementation
(the aclnn ranges of sizes, ``e * ep_world_size <= 256``, the allowed world sizes, the
per-peer traffic window). Scenario validation checks them under a :class:`LimitProfile`:
``strict`` (the default; every limit raises) or ``what-if`` (``simulate`` and ``sweep`` with
``--what-if``: hardware limits are lifted, each one met noted once in a :class:`Policy`;
semantic limits still raise). :data:`TABLE` lists every limit with its kind, once; the docs
render it (:func:`table_markdown`). The ops themselves always check strictly.

This module is the bottom layer of the package: it imports nothing but :mod:`mc2sim.errors`
and :mod:`mc2sim._compat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mc2sim._compat import StrEnum
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
    "IFA_BLOCK_ALIGNMENT",
    "IFA_BLOCK_SIZE",
    "ANTIQUANT_GROUP",
    "IFA_GROUP",
    "IFA_HEADS",
    "IFA_HEAD_DIM",
    "IFA_LIST_BATCH",
    "IFA_PAGED_HIDDEN",
    "INT4_N",
    "KV_HEADS_DIVIDE",
    "LimitKind",
    "LimitProfile",
    "Lifted",
    "MM_K",
    "MM_M",
    "MM_N",
    "N1",
    "N2",
    "POSITIVE",
    "Policy",
    "RS_ROWS",
    "Rule",
    "SHARED_PAIR",
    "TABLE",
    "TOP_K",
    "TOP_K_FITS",
    "TP_K",
    "TP_WORLD_SIZES",
    "Range",
    "WORLD",
    "enforce",
    "integer",
    "require_multiple",
    "table_markdown",
]


class LimitKind(StrEnum):
    """What a limit describes.

    Glossary:
        ``semantic``: the operator's definition (a size is positive, top-K distinct experts
            exist, a reduce-scatter splits its rows evenly); always enforced.
        ``hardware``: today's hardware or implementation (aclnn's ranges of sizes,
            ``e * ep_world_size <= 256``, the allowed world sizes, the per-peer traffic
            window); enforced by ``strict``, lifted by ``what-if``.
    """

    SEMANTIC = "semantic"
    HARDWARE = "hardware"


class LimitProfile(StrEnum):
    """Which limits a study keeps.

    Glossary:
        ``strict``: every limit of :data:`TABLE` (the default; ``run`` always).
        ``what-if``: hardware limits lifted (each one met reported once as a warning);
            semantic limits still raise (``simulate`` and ``sweep`` with ``--what-if``).
    """

    STRICT = "strict"
    WHAT_IF = "what-if"


@dataclass(frozen=True, kw_only=True, slots=True)
class Lifted:
    """A hardware limit a what-if study went past."""

    limit: str
    """The limit's name in :data:`TABLE` (one warning per limit)."""
    rule: str
    """The limit's rule in words (as strict would have raised it)."""
    param: str
    """Where it was met, e.g. ``"ranks"`` or ``"shape.h1"``."""
    value: object
    """The value seen."""

    def warning(self) -> str:
        """The warning line: what was lifted, where and with which value."""
        return f"what-if lifts a hardware limit: {self.param}={self.value!r}: {self.rule}"


@dataclass(kw_only=True, slots=True)
class Policy:
    """A profile applied to a series of checks; notes the hardware limits it lifts, once each."""

    profile: LimitProfile = LimitProfile.STRICT
    """The profile."""
    lifted: list[Lifted] = field(default_factory=list)
    """Every hardware limit lifted so far, the first time each rule was met."""

    def lifts(self, kind: LimitKind) -> bool:
        """Whether a limit of ``kind`` is lifted under this profile."""
        return kind is LimitKind.HARDWARE and self.profile is LimitProfile.WHAT_IF

    def note(self, limit: str, rule: str, param: str, value: object) -> None:
        """Record a lifted limit (a limit already noted is not noted again)."""
        if all(seen.limit != limit for seen in self.lifted):
            self.lifted.append(Lifted(limit=limit, rule=rule, param=param, value=value))


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

    kind: LimitKind = LimitKind.HARDWARE
    """Whether the range is today's hardware's (lifted by what-if down to :data:`POSITIVE`)
    or the operator's definition."""

    @property
    def rule(self) -> str:
        """The rule in words, the same wherever it is checked."""
        return f"{self.name} must be in [{self.low}, {self.high}]"

    def check(self, param: str, value: object, policy: Policy | None = None) -> int:
        """Return ``value`` if it is an integer in range.

        Args:
            param: the parameter's name where it was met (``"H1"``, ``"shape.h1"``).
            value: the value seen.
            policy: the profile checked under (None: strict); a lifted range still needs a
                positive value below 2**62 (:data:`POSITIVE`) and is noted in ``policy``.

        Returns:
            ``value`` as an ``int``.

        Raises:
            ParamInvalidError: not an integer, or out of range.
        """
        number = integer(param, value)
        if not self.low <= number <= self.high:
            if policy is None or not policy.lifts(self.kind):
                raise ParamInvalidError(param, value, self.rule)
            if not 1 <= number < SIZE_CEILING:
                raise ParamInvalidError(param, value, POSITIVE.rule)
            policy.note(self.name, self.rule, param, value)
        return number


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    """A limit that is not a range: a relation between values, or a list of allowed ones."""

    name: str
    """What it constrains, e.g. ``"top_k"``."""
    rule: str
    """The rule in words, the same wherever it is checked."""
    kind: LimitKind
    """Semantic or hardware."""

    def check(
        self, param: str, value: object, ok: bool, detail: str = "", policy: Policy | None = None
    ) -> None:
        """Raise unless ``ok`` (a lifted hardware rule is noted instead).

        Args:
            param: the parameter's name where it was met.
            value: the value seen.
            ok: whether the rule holds.
            detail: the rule with this case's values in words (default :attr:`rule`).
            policy: the profile checked under (None: strict).

        Raises:
            ParamInvalidError: the rule broken and not lifted.
        """
        enforce(self, param, value, ok, detail, policy)


def enforce(
    limit: Range | Rule,
    param: str,
    value: object,
    ok: bool,
    detail: str = "",
    policy: Policy | None = None,
) -> None:
    """Raise ``limit`` broken unless ``ok``; a lifted hardware limit is noted instead.

    Args:
        limit: the limit checked (its kind says whether ``policy`` lifts it).
        param: the parameter's name where it was met.
        value: the value seen.
        ok: whether the limit holds.
        detail: the rule with this case's values in words (default the limit's rule).
        policy: the profile checked under (None: strict).

    Raises:
        ParamInvalidError: the limit broken and not lifted.
    """
    if ok:
        return
    text = detail or limit.rule
    if policy is not None and policy.lifts(limit.kind):
        policy.note(limit.name, text, param, value)
        return
    raise ParamInvalidError(param, value, text)


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

# ----------------------------------------------------------- rules that are not ranges
POSITIVE = Rule(name="every size", rule="must be in [1, 2**62)", kind=LimitKind.SEMANTIC)
"""A size, count or world size is positive, and below 2**62 (the simulator's 64-bit
integers): what a lifted range still asks."""

SIZE_CEILING = 2**62
"""The bound :data:`POSITIVE` puts on a lifted size (a what-if dimension of hundreds of digits
would overflow the planners' floating-point arithmetic before any figure is checked)."""
WORLD = Range(name="world size", low=1, high=65536, kind=LimitKind.SEMANTIC)
"""Ranks a study plans for: at least one, at most the largest machine mc2sim models."""
TOP_K_FITS = Rule(
    name="top_k",
    rule="top_k must be <= experts_per_rank * world size (distinct experts per token)",
    kind=LimitKind.SEMANTIC,
)
"""Each token picks top-K distinct experts, so there must be that many."""
SHARED_PAIR = Rule(
    name="h2, n2", rule="shared expert needs both h2 and n2, or neither", kind=LimitKind.SEMANTIC
)
"""The shared expert's matmul is ``(BS, H2) x (H2, N2)``: both sizes or no shared expert."""
RS_ROWS = Rule(
    name="m (MatmulReduceScatter)",
    rule="m must be a multiple of the world size",
    kind=LimitKind.SEMANTIC,
)
"""MatmulReduceScatter leaves ``m / world`` rows on each rank."""
ANTIQUANT_GROUP = Rule(
    name="antiquantGroupSize",
    rule="antiquant_group_size must be 0 or a multiple of 32 in [32, k-1]",
    kind=LimitKind.HARDWARE,
)
"""Per-group antiquant (WeightQuantBatchMatmul, WeightQuantMatmulAllReduce): the group length
along k; 0 means per-tensor or per-channel."""

INT4_N = Rule(
    name="n (weight_int4)", rule="n must be a multiple of 8 for weight_int4",
    kind=LimitKind.SEMANTIC,
)  # fmt: skip
"""Int4 weights are packed eight to an int32."""
KV_HEADS_DIVIDE = Rule(name="kv_heads", rule="kv_heads must divide heads", kind=LimitKind.SEMANTIC)
"""Grouped-query attention: every KV head serves the same number of query heads."""
_WORLD_SIZE_RULES = (
    Rule(
        name="MatmulAllReduce world size (A2)",
        rule=f"world size in {list(ALLREDUCE_WORLD_SIZES)} (HCCS full mesh; the ops' strict='A2')",
        kind=LimitKind.HARDWARE,
    ),
    Rule(
        name="AllGatherMatmul, MatmulReduceScatter world size",
        rule=f"world size in {list(TP_WORLD_SIZES['A2'])} on A2, "
        f"{list(TP_WORLD_SIZES['A3'])} on A3 (the ops' strict=)",
        kind=LimitKind.HARDWARE,
    ),
    Rule(
        name="MoE ep_world_size (A3)",
        rule=f"ep_world_size in {list(A3_EP_WORLD_SIZES)} (the ops' strict='A3')",
        kind=LimitKind.HARDWARE,
    ),
)
IFA_BLOCK_ALIGNMENT = Rule(
    name="blockSize alignment",
    rule=f"blockSize must be a multiple of {IFA_BLOCK_ALIGN['float']} (float KV) or "
    f"{IFA_BLOCK_ALIGN['int8']} (int8 KV)",
    kind=LimitKind.HARDWARE,
)
"""Page-attention blocks are aligned to the hardware's vector width."""

TABLE: tuple[Range | Rule, ...] = (
    MM_M, MM_K, MM_N, TP_K, E, EXPERTS, BSK, H1, H2, N1, N2, TOP_K, A3_PEER_BYTES,
    IFA_BATCH, IFA_LIST_BATCH, IFA_HEADS, IFA_HEAD_DIM, IFA_GROUP, IFA_BLOCK_SIZE,
    IFA_PAGED_HIDDEN, IFA_BLOCK_ALIGNMENT, *_WORLD_SIZE_RULES,
    POSITIVE, WORLD, TOP_K_FITS, SHARED_PAIR, RS_ROWS, INT4_N, ANTIQUANT_GROUP, KV_HEADS_DIVIDE,
)  # fmt: skip
"""Every limit, once, with its kind: the table the docs render (:func:`table_markdown`)."""


def table_markdown() -> str:
    """:data:`TABLE` as a Markdown table (docs/LIMITS.md holds this text).

    Returns:
        The table, one row per limit: its name, its rule and its kind.
    """
    rows = ["| limit | rule | kind |", "| --- | --- | --- |"]
    for limit in TABLE:
        rows.append(f"| `{limit.name}` | {limit.rule} | {limit.kind.value} |")
    return "\n".join(rows) + "\n"
