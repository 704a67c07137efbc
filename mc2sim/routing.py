"""MoE routing tables: per-rank send and receive counts that every rank derives from one seed."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mc2sim._compat import StrEnum
from mc2sim.errors import ParamInvalidError
from mc2sim.schedule.plan import SparseCounts

__all__ = [
    "Direction",
    "RoutingConfig",
    "RoutingKind",
    "MAX_SEED",
    "RoutingTable",
    "SparseRouting",
    "check_matrix",
    "load_matrix",
    "route",
    "route_sparse",
]

#: Most key elements (tokens x experts) drawn at once; bounds memory for large batches.
_CHUNK_ELEMENTS = 1 << 20

MAX_SEED = 2**32 - 1
"""The largest routing seed. A real run seeds each rank's inputs with
``1000 * seed + rank``, which must stay within ``torch.manual_seed``'s 64 bits."""

#: Stream tags of the seed sequences, so global draws never reuse a rank's stream.
_GLOBAL_STREAM = 0
_RANK_STREAM = 1


class RoutingKind(StrEnum):
    """How tokens pick their experts.

    Glossary:
        ``balanced``: deterministic; rank r's picks run round-robin over the global experts
            from offset ``r * tokens * top_k``, so every rank-expert count and every expert
            load differs from the others by at most one.
        ``uniform``: each token draws ``top_k`` distinct experts uniformly at random.
        ``zipf``: each token draws ``top_k`` distinct experts by successive sampling with
            weight ``1 / (p + 1) ** skew`` for the expert of popularity rank ``p`` (a seeded
            permutation says which expert has which popularity rank); skew 0 is ``uniform``.
        ``hot``: a seeded set of ``hot_experts`` experts receives the fraction
            ``hot_fraction`` of all picks in expectation; each token takes
            ``floor(top_k * f)`` or ``ceil(top_k * f)`` distinct hot experts (randomly
            rounded so the mean is ``top_k * f``) and fills up with distinct cold experts,
            both uniformly.
        ``matrix``: an explicit (ranks, ranks * experts_per_rank) matrix read from a file;
            it overrides ``tokens_per_rank`` and ``top_k``.
    """

    BALANCED = "balanced"
    UNIFORM = "uniform"
    ZIPF = "zipf"
    HOT = "hot"
    MATRIX = "matrix"


class Direction(StrEnum):
    """Which way rows travel in an expert-parallel all-to-all.

    Glossary:
        ``dispatch``: from the ranks that own the tokens to the ranks that own the experts
            (AlltoAllvGroupedMatMul). The sender's ``send_counts[q*e + j]`` are its rows for
            rank q's local expert j.
        ``combine``: the way back, from the expert ranks to the token owners
            (GroupedMatMulAlltoAllv). The sender's ``send_counts[r*e + j]`` are the rows its
            local expert j returns to rank r; these are the dispatch ``recv_counts``.
    """

    DISPATCH = "dispatch"
    COMBINE = "combine"


def _as_int(value: object) -> int | None:
    """Return an integer (Python or NumPy, not a bool) as an int, anything else as None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int, raising ``ParamInvalidError`` unless it is an int >= minimum."""
    number = _as_int(value)
    if number is None or number < minimum:
        raise ParamInvalidError(name, value, f"must be an integer >= {minimum}")
    return number


def _check_float(name: str, value: object, low: float, high: float) -> float:
    """Return ``value`` as a float, raising ``ParamInvalidError`` unless it lies in [low, high]."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        raise ParamInvalidError(name, value, "must be a real number")
    number = float(value)
    if not (math.isfinite(number) and low <= number <= high):
        raise ParamInvalidError(name, value, f"must be a finite number in [{low}, {high}]")
    return number


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingConfig:
    """How to generate a routing table; the same config gives the same table on every rank."""

    kind: RoutingKind = RoutingKind.UNIFORM
    """The routing model (a ``RoutingKind`` or its string value)."""

    seed: int = 0
    """Seed of every random draw, in [0, :data:`MAX_SEED`]; tables for different seeds differ
    (except ``balanced``)."""

    skew: float = 1.0
    """Zipf exponent, >= 0; used by ``zipf`` only. 0 is uniform, larger is more skewed."""

    hot_fraction: float = 0.5
    """Expected fraction of all picks that land on the hot experts, in [0, 1]; ``hot`` only."""

    hot_experts: int = 1
    """How many experts are hot, >= 1 (and at most the number of experts); ``hot`` only."""

    matrix_path: str | None = None
    """File of the rank-by-expert matrix (.npy, .csv or .json); required by ``matrix`` only."""

    def __post_init__(self) -> None:
        try:
            kind = RoutingKind(self.kind)
        except ValueError:
            allowed = ", ".join(repr(k.value) for k in RoutingKind)
            raise ParamInvalidError("kind", self.kind, f"must be one of {allowed}") from None
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "seed", _check_int_range("seed", self.seed, 0, MAX_SEED))
        object.__setattr__(self, "skew", _check_float("skew", self.skew, 0.0, math.inf))
        object.__setattr__(
            self, "hot_fraction", _check_float("hot_fraction", self.hot_fraction, 0.0, 1.0)
        )
        object.__setattr__(self, "hot_experts", _check_int("hot_experts", self.hot_experts, 1))
        path: object = self.matrix_path
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                raise ParamInvalidError("matrix_path", path, "must be a path or None")
            object.__setattr__(self, "matrix_path", os.fspath(path))
        if kind is RoutingKind.MATRIX and self.matrix_path is None:
            raise ParamInvalidError("matrix_path", None, "is required when kind='matrix'")
        if kind is not RoutingKind.MATRIX and self.matrix_path is not None:
            raise ParamInvalidError(
                "matrix_path", self.matrix_path, f"only applies to kind='matrix', not {kind!r}"
            )


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class RoutingTable:
    """Rows every rank sends to every expert of an expert-parallel group.

    ``counts[r, q, j]`` is the number of rows rank r sends to local expert j of rank q
    (global expert ``q * e + j``) in the dispatch direction. Every per-rank count list is a
    view of this one table, so the cross-rank invariant of GroupedMatMulAlltoAllv,
    ``recv_counts(q)[r*e + j] == send_counts(r)[q*e + j]``, holds by construction.
    """

    counts: npt.NDArray[np.int64]
    """The (world_size, world_size, experts_per_rank) table of non-negative int64 counts."""

    def __post_init__(self) -> None:
        table = np.asarray(self.counts)
        if table.ndim != 3 or table.shape[0] != table.shape[1] or 0 in table.shape:
            raise ParamInvalidError(
                "counts.shape",
                tuple(table.shape),
                "must be (world_size, world_size, experts_per_rank), all >= 1",
            )
        if not np.issubdtype(table.dtype, np.integer):
            raise ParamInvalidError("counts.dtype", str(table.dtype), "must be an integer dtype")
        if table.min() < 0:
            raise ParamInvalidError("counts", int(table.min()), "counts must be >= 0")
        frozen = table.astype(np.int64, copy=True)
        frozen.setflags(write=False)
        object.__setattr__(self, "counts", frozen)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTable):
            return NotImplemented
        return bool(np.array_equal(self.counts, other.counts))

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_matrix(cls, matrix: npt.ArrayLike, experts_per_rank: int) -> RoutingTable:
        """Build a table from a rank-by-global-expert matrix.

        Args:
            matrix: (W, W * experts_per_rank) non-negative integers; ``matrix[r, g]`` rows
                go from rank r to global expert g (rank ``g // e``, local expert ``g % e``).
            experts_per_rank: local experts per rank, e >= 1.

        Returns:
            The table with ``counts[r, q, j] == matrix[r, q * e + j]``.

        """
        e = _check_int("experts_per_rank", experts_per_rank, 1)
        m = _as_count_matrix("matrix", np.asarray(matrix), "matrix")
        world = m.shape[0]
        if m.shape != (world, world * e):
            raise ParamInvalidError(
                "matrix.shape",
                tuple(m.shape),
                f"must be (W, W * experts_per_rank) = ({world}, {world * e})",
            )
        return cls(counts=m.reshape(world, world, e))

    @property
    def world_size(self) -> int:
        """Ranks in the expert-parallel group, W."""
        return int(self.counts.shape[0])

    @property
    def experts_per_rank(self) -> int:
        """Local experts per rank, e."""
        return int(self.counts.shape[2])

    @property
    def num_experts(self) -> int:
        """Global experts, W * e."""
        return self.world_size * self.experts_per_rank

    def matrix(self) -> npt.NDArray[np.int64]:
        """Return the (W, W * e) rank-by-global-expert matrix (a copy)."""
        matrix: npt.NDArray[np.int64] = self.counts.reshape(self.world_size, -1).copy()
        return matrix

    def _rank(self, rank: int) -> int:
        return _check_int_range("rank", rank, 0, self.world_size - 1)

    def send_counts(self, rank: int, direction: str | Direction = Direction.DISPATCH) -> list[int]:
        """Return the rows ``rank`` sends, one count per (peer, expert), peer-major.

        Args:
            rank: the sending rank, 0 <= rank < W.
            direction: ``dispatch`` (index ``q*e + j``: rows for rank q's expert j) or
                ``combine`` (index ``r*e + j``: rows this rank's expert j returns to rank r).

        Returns:
            ``W * e`` Python ints.

        """
        r = self._rank(rank)
        if _direction(direction) is Direction.COMBINE:
            return [int(c) for c in self.counts[:, r, :].reshape(-1)]
        return [int(c) for c in self.counts[r].reshape(-1)]

    def recv_counts(self, rank: int, direction: str | Direction = Direction.DISPATCH) -> list[int]:
        """Return the rows ``rank`` receives, one count per (source rank, expert), source-major.

        Args:
            rank: the receiving rank, 0 <= rank < W.
            direction: ``dispatch`` (index ``r*e + j``: rows from rank r for this rank's
                expert j) or ``combine`` (index ``q*e + j``: rows rank q's expert j returns).

        Returns:
            ``W * e`` Python ints; ``recv_counts(q)[r*e + j] == send_counts(r)[q*e + j]``.

        """
        q = self._rank(rank)
        if _direction(direction) is Direction.COMBINE:
            return [int(c) for c in self.counts[q].reshape(-1)]
        return [int(c) for c in self.counts[:, q, :].reshape(-1)]

    def expert_load(self) -> npt.NDArray[np.int64]:
        """Return the rows each global expert receives from all ranks (length W * e)."""
        load: npt.NDArray[np.int64] = self.counts.sum(axis=0).reshape(-1)
        return load

    def imbalance(self) -> float:
        """Return max / mean of :meth:`expert_load`; 1.0 is perfect, and an empty table is 1.0."""
        load = self.expert_load()
        total = int(load.sum())
        if total == 0:
            return 1.0
        return float(load.max()) * load.size / total


def _check_int_range(name: str, value: object, low: int, high: int) -> int:
    """Return ``value`` as an int, raising ``ParamInvalidError`` unless low <= value <= high."""
    number = _as_int(value)
    if number is None or not low <= number <= high:
        raise ParamInvalidError(name, value, f"must be an integer in [{low}, {high}]")
    return number


def _direction(direction: str | Direction) -> Direction:
    """Return ``direction`` as a ``Direction``, raising ``ParamInvalidError`` if unknown."""
    try:
        return Direction(direction)
    except ValueError:
        allowed = ", ".join(repr(d.value) for d in Direction)
        raise ParamInvalidError("direction", direction, f"must be one of {allowed}") from None


def _as_count_matrix(param: str, value: npt.NDArray[Any], what: str) -> npt.NDArray[np.int64]:
    """Check that ``value`` is a 2-D matrix of non-negative integral numbers; return int64."""
    if value.ndim != 2 or 0 in value.shape:
        raise ParamInvalidError(
            param, f"{what} of shape {tuple(value.shape)}", "must be a non-empty 2-D matrix"
        )
    if value.dtype == np.bool_ or not (
        np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)
    ):
        raise ParamInvalidError(param, f"{what} of dtype {value.dtype}", "must hold numbers")
    if np.issubdtype(value.dtype, np.floating):
        if not np.all(np.isfinite(value)):
            raise ParamInvalidError(param, what, "entries must be finite")
        if not np.all(value == np.round(value)):
            raise ParamInvalidError(param, what, "entries must be whole numbers of rows")
        if np.any(np.abs(value) >= 2.0**62):
            raise ParamInvalidError(param, what, "entries must be below 2**62")
    if np.any(value < 0):
        raise ParamInvalidError(param, f"{what} with minimum {value.min()}", "entries must be >= 0")
    return value.astype(np.int64)


def load_matrix(path: str | os.PathLike[str]) -> npt.NDArray[np.int64]:
    """Read a rank-by-global-expert count matrix from a .npy, .csv or .json file.

    CSV: one row per rank, comma-separated, no header (``#`` starts a comment). JSON: a list
    of rows, or an object whose ``"matrix"`` key holds one. Entries must be non-negative
    whole numbers.

    Args:
        path: the file; its suffix picks the format.

    Returns:
        The matrix as a 2-D int64 array.

    Raises:
        ParamInvalidError: ``matrix_path`` names the file and what is wrong with it.

    """
    file = Path(path)
    name = str(file)
    suffix = file.suffix.lower()
    if suffix not in (".npy", ".csv", ".json"):
        raise ParamInvalidError("matrix_path", name, "must end in .npy, .csv or .json")
    if not file.is_file():
        raise ParamInvalidError("matrix_path", name, "no such file")
    try:
        if suffix == ".npy":
            raw = np.load(file, allow_pickle=False)
        elif suffix == ".csv":
            raw = np.loadtxt(file, delimiter=",", ndmin=2, dtype=np.float64)
        else:
            doc = json.loads(file.read_text(encoding="utf-8"))
            if isinstance(doc, dict):
                if "matrix" not in doc:
                    raise ParamInvalidError("matrix_path", name, 'JSON object needs a "matrix" key')
                doc = doc["matrix"]
            if not (isinstance(doc, list) and all(isinstance(row, list) for row in doc)):
                raise ParamInvalidError("matrix_path", name, "JSON must be a list of rows")
            if len({len(row) for row in doc}) > 1:
                raise ParamInvalidError("matrix_path", name, "JSON rows differ in length")
            if not all(_is_json_number(x) for row in doc for x in row):
                raise ParamInvalidError("matrix_path", name, "JSON entries must be numbers")
            raw = np.asarray(doc, dtype=np.float64)
    except ParamInvalidError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise ParamInvalidError("matrix_path", name, f"cannot be read: {exc}") from None
    return _as_count_matrix("matrix_path", np.asarray(raw), f"matrix in {name}")


def check_matrix(
    config: RoutingConfig, *, world_size: int, experts_per_rank: int
) -> npt.NDArray[np.int64]:
    """Read a ``matrix`` routing's file and check its shape against the group.

    Args:
        config: a routing of kind ``matrix``.
        world_size: ranks in the group.
        experts_per_rank: local experts per rank.

    Returns:
        The (world_size, world_size * experts_per_rank) matrix.

    Raises:
        ParamInvalidError: the config is not of kind ``matrix``, or its file cannot be read,
            is malformed or holds a matrix of another shape (``matrix_path`` names it).

    """
    if config.kind is not RoutingKind.MATRIX or config.matrix_path is None:
        raise ParamInvalidError("kind", config.kind.value, "must be 'matrix' with a matrix_path")
    matrix = load_matrix(config.matrix_path)
    experts = world_size * experts_per_rank
    if matrix.shape != (world_size, experts):
        raise ParamInvalidError(
            "matrix_path",
            config.matrix_path,
            f"holds a matrix of shape {tuple(matrix.shape)}; expected "
            f"(world_size, world_size * experts_per_rank) = ({world_size}, {experts})",
        )
    return matrix


def _is_json_number(value: object) -> bool:
    """Whether a decoded JSON value is a number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def route(
    config: RoutingConfig,
    *,
    world_size: int,
    experts_per_rank: int,
    tokens_per_rank: int | None = None,
    top_k: int | None = None,
) -> RoutingTable:
    """Generate the routing table of a whole expert-parallel group, on any rank alike.

    Nothing is communicated: every rank draws every rank's tokens from generators seeded
    by ``(config.seed, rank)``, so each rank gets the same table. Each token picks
    ``top_k`` distinct experts, so every rank sends ``tokens_per_rank * top_k`` rows in the
    dispatch direction (``matrix`` excepted: the file's counts rule).

    Args:
        config: the routing model and its parameters.
        world_size: ranks in the group, W >= 1.
        experts_per_rank: local experts per rank, e >= 1.
        tokens_per_rank: tokens (BS) on each rank, >= 1; optional for ``matrix``.
        top_k: distinct experts per token, 1 <= K <= W * e; optional for ``matrix``.

    Returns:
        The (W, W, e) table.

    Raises:
        ParamInvalidError: a size out of range, a ``hot`` config that cannot reach its
            fraction with these sizes, or a matrix file of the wrong shape.

    """
    if not isinstance(config, RoutingConfig):
        raise ParamInvalidError("config", type(config).__name__, "must be a RoutingConfig")
    world = _check_int("world_size", world_size, 1)
    e = _check_int("experts_per_rank", experts_per_rank, 1)
    num_experts = world * e
    if config.kind is RoutingKind.MATRIX:
        if tokens_per_rank is not None:
            _check_int("tokens_per_rank", tokens_per_rank, 1)
        if top_k is not None:
            _check_int("top_k", top_k, 1)
        matrix = check_matrix(config, world_size=world, experts_per_rank=e)
        return RoutingTable(counts=matrix.reshape(world, world, e))

    if tokens_per_rank is None:
        raise ParamInvalidError("tokens_per_rank", None, f"is required by kind={config.kind!r}")
    if top_k is None:
        raise ParamInvalidError("top_k", None, f"is required by kind={config.kind!r}")
    tokens = _check_int("tokens_per_rank", tokens_per_rank, 1)
    k = _check_int_range("top_k", top_k, 1, num_experts)

    rows = np.empty((world, num_experts), dtype=np.int64)
    if config.kind is RoutingKind.BALANCED:
        for r in range(world):
            rows[r] = _balanced_row(r, tokens, k, num_experts)
    elif config.kind is RoutingKind.HOT:
        hot = _hot_experts(config, num_experts)
        target = _hot_target(config, k, num_experts)
        for r in range(world):
            rows[r] = _hot_row(_rank_rng(config.seed, r), hot, num_experts, tokens, k, target)
    else:
        scales = _key_scales(config, num_experts)
        for r in range(world):
            rows[r] = _sampled_row(_rank_rng(config.seed, r), scales, num_experts, tokens, k)
    return RoutingTable(counts=rows.reshape(world, world, e))


def _rank_rng(seed: int, rank: int) -> np.random.Generator:
    """Return rank ``rank``'s generator: independent of world size and of the other ranks."""
    return np.random.default_rng([seed, _RANK_STREAM, rank])


def _global_rng(seed: int) -> np.random.Generator:
    """Return the generator of draws every rank shares, such as the popularity order."""
    return np.random.default_rng([seed, _GLOBAL_STREAM])


def _balanced_row(rank: int, tokens: int, k: int, num_experts: int) -> npt.NDArray[np.int64]:
    """Rows rank ``rank`` sends to each expert under ``balanced`` routing.

    Token t of rank r picks experts ``(offset + t*k + i) mod G`` for i < k with
    ``offset = r * tokens * k``: k consecutive experts, distinct because k <= G. The picks of
    all ranks together are one contiguous round-robin run, so both each rank's counts and
    the global loads are floor or ceil of their mean.
    """
    picks = tokens * k
    offset = (rank * picks) % num_experts
    position = (np.arange(num_experts, dtype=np.int64) - offset) % num_experts
    return picks // num_experts + (position < picks % num_experts).astype(np.int64)


def _key_scales(config: RoutingConfig, num_experts: int) -> npt.NDArray[np.float64] | None:
    """Inverse sampling weight of each expert: None (all equal) or Zipf's ``(p + 1) ** skew``."""
    if config.kind is RoutingKind.UNIFORM or config.skew == 0.0:
        return None
    popularity = np.empty(num_experts, dtype=np.int64)
    popularity[_global_rng(config.seed).permutation(num_experts)] = np.arange(num_experts)
    scales: npt.NDArray[np.float64] = np.power(popularity + 1.0, config.skew, dtype=np.float64)
    return scales


def _sampled_row(
    rng: np.random.Generator,
    scales: npt.NDArray[np.float64] | None,
    num_experts: int,
    tokens: int,
    k: int,
) -> npt.NDArray[np.int64]:
    """Rows per expert when each token draws ``k`` distinct experts by weight.

    Efraimidis-Spirakis: with ``E`` standard exponential, the k smallest keys ``E / w`` are a
    sample without replacement with the successive-sampling probabilities of weights ``w``
    (the same law as Gumbel top-k); ``scales`` holds ``1 / w``.
    """
    counts = np.zeros(num_experts, dtype=np.int64)
    chunk = max(1, _CHUNK_ELEMENTS // num_experts)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        keys = rng.standard_exponential(size=(n, num_experts))
        if scales is not None:
            keys *= scales
        picked = _smallest_k(keys, k)
        counts += np.bincount(picked.ravel(), minlength=num_experts)
    return counts


def _smallest_k(keys: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.intp]:
    """Column indices of the ``k`` smallest keys of each row (distinct within a row)."""
    if k == keys.shape[1]:
        return np.broadcast_to(np.arange(k), keys.shape)
    return np.argpartition(keys, k - 1, axis=1)[:, :k]


def _hot_experts(config: RoutingConfig, num_experts: int) -> npt.NDArray[np.int64]:
    """Return the seeded set of hot experts (global ids, sorted)."""
    if config.hot_experts > num_experts:
        raise ParamInvalidError(
            "hot_experts",
            config.hot_experts,
            f"must be at most the number of experts W * e = {num_experts}",
        )
    order = _global_rng(config.seed).permutation(num_experts)
    return np.sort(order[: config.hot_experts]).astype(np.int64)


def _hot_target(config: RoutingConfig, k: int, num_experts: int) -> float:
    """Check ``hot_fraction`` is reachable; return the mean number of hot picks per token.

    Each token takes between ``max(0, k - cold)`` and ``min(k, hot)`` distinct hot experts,
    so the reachable fractions are that range divided by k.
    """
    hot = config.hot_experts
    low, high = max(0, k - (num_experts - hot)), min(k, hot)
    target = config.hot_fraction * k
    if abs(target - round(target)) < 1e-9:  # 0.7 * 10 is 7.000000000000001
        target = float(round(target))
    if not low <= target <= high:
        raise ParamInvalidError(
            "hot_fraction",
            config.hot_fraction,
            f"must be in [{low / k:g}, {high / k:g}] with hot_experts={hot}, top_k={k} "
            f"and {num_experts} experts (each token picks distinct experts)",
        )
    return target


def _hot_row(
    rng: np.random.Generator,
    hot: npt.NDArray[np.int64],
    num_experts: int,
    tokens: int,
    k: int,
    target: float,
) -> npt.NDArray[np.int64]:
    """Rows per expert under ``hot`` routing (see :class:`RoutingKind`).

    Token t takes ``h_t = floor(target) + Bernoulli(frac(target))`` hot experts, the first
    ``h_t`` of a random permutation of the hot set, and ``k - h_t`` cold experts likewise.
    """
    cold = np.setdiff1d(np.arange(num_experts, dtype=np.int64), hot)
    base = math.floor(target)
    frac = target - base
    counts = np.zeros(num_experts, dtype=np.int64)
    chunk = max(1, _CHUNK_ELEMENTS // num_experts)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        n_hot = base + (rng.random(n) < frac).astype(np.int64)
        for group, take in ((hot, n_hot), (cold, k - n_hot)):
            if group.size == 0:
                continue
            order = np.argsort(rng.random((n, group.size)), axis=1)
            chosen = order[np.arange(group.size)[None, :] < take[:, None]]
            counts += np.bincount(group[chosen], minlength=num_experts)
    return counts


class SparseRouting:
    """A routing of thousands of ranks kept sparse: only (source, expert) pairs that carry rows.

    Built by :func:`route_sparse`; gives each rank's counts as ``SparseCounts`` in either
    direction, for plans the simulator runs at scale (a dense ``RoutingTable`` has W * W * e
    entries: 537 million at 8192 ranks of 8 experts).
    """

    def __init__(
        self, world_size: int, experts_per_rank: int, src: npt.NDArray[np.int64],
        expert: npt.NDArray[np.int64], rows: npt.NDArray[np.int64],
    ) -> None:  # fmt: skip
        self.world_size = world_size
        self.experts_per_rank = experts_per_rank
        e = experts_per_rank
        size = world_size * e
        # dispatch send of rank r: index = global expert; sorted by (src, expert) already
        self._send = (src, expert, rows, np.searchsorted(src, np.arange(world_size + 1)))
        # dispatch recv of rank q: index = src * e + local expert, grouped by owner q
        owner = expert // e
        order = np.lexsort((expert % e, src, owner))
        self._recv = (
            owner[order],
            src[order] * e + expert[order] % e,
            rows[order],
            np.searchsorted(owner[order], np.arange(world_size + 1)),
        )
        self._size = size

    def _slice(self, view: tuple[npt.NDArray[np.int64], ...], rank: int) -> SparseCounts:
        _, index, rows, bounds = view
        lo, hi = int(bounds[rank]), int(bounds[rank + 1])
        order = np.argsort(index[lo:hi], kind="stable")
        return SparseCounts(self._size, index[lo:hi][order], rows[lo:hi][order])

    def send_counts(
        self, rank: int, direction: str | Direction = Direction.DISPATCH
    ) -> SparseCounts:
        """Rows ``rank`` sends, as ``RoutingTable.send_counts`` but sparse."""
        if _direction(direction) is Direction.COMBINE:
            return self._slice(self._recv, rank)
        return self._slice(self._send, rank)

    def recv_counts(
        self, rank: int, direction: str | Direction = Direction.DISPATCH
    ) -> SparseCounts:
        """Rows ``rank`` receives, as ``RoutingTable.recv_counts`` but sparse."""
        if _direction(direction) is Direction.COMBINE:
            return self._slice(self._send, rank)
        return self._slice(self._recv, rank)


def route_sparse(
    config: RoutingConfig,
    *,
    world_size: int,
    experts_per_rank: int,
    tokens_per_rank: int,
    top_k: int,
) -> SparseRouting:
    """Generate a routing of many ranks quickly, for simulation at scale.

    Each rank's ``tokens_per_rank * top_k`` picks are drawn at once from the experts'
    popularity (``uniform``, ``zipf`` with the same popularity order as :func:`route`, or
    ``hot``), with replacement: a token may pick one expert twice, which :func:`route`
    forbids. With W * e experts much larger than top_k this changes the counts very little;
    use :func:`route` where exact top-K semantics matter (real runs). ``balanced`` and
    ``matrix`` are not offered here.

    Raises:
        ParamInvalidError: a kind other than uniform, zipf or hot, or bad sizes.
    """
    world = _check_int("world_size", world_size, 1)
    e = _check_int("experts_per_rank", experts_per_rank, 1)
    tokens = _check_int("tokens_per_rank", tokens_per_rank, 1)
    k = _check_int("top_k", top_k, 1)
    num_experts = world * e
    if config.kind not in (RoutingKind.UNIFORM, RoutingKind.ZIPF, RoutingKind.HOT):
        raise ParamInvalidError(
            "kind", config.kind, "route_sparse offers 'uniform', 'zipf' and 'hot'; use route()"
        )
    weights = np.ones(num_experts, dtype=np.float64)
    scales = _key_scales(config, num_experts) if config.kind is RoutingKind.ZIPF else None
    if scales is not None:
        weights = 1.0 / scales
    if config.kind is RoutingKind.HOT:
        hot = _hot_experts(config, num_experts)
        cold = num_experts - len(hot)
        weights[:] = (1 - config.hot_fraction) / max(cold, 1)
        weights[hot] = config.hot_fraction / len(hot)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    rng = np.random.default_rng([config.seed, 3])
    picks = world * tokens * k
    expert = np.minimum(np.searchsorted(cdf, rng.random(picks), side="right"), num_experts - 1)
    src = np.repeat(np.arange(world, dtype=np.int64), tokens * k)
    keys, rows = np.unique(src * num_experts + expert, return_counts=True)
    return SparseRouting(world, e, keys // num_experts, keys % num_experts, rows.astype(np.int64))
