"""MoE routing tables: per-rank send and receive counts that every rank derives from one seed."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from mc2sim._compat import StrEnum
from mc2sim.errors import ParamInvalidError
from mc2sim.schedule.plan import SparseCounts

__all__ = [
    "Direction",
    "ExpectedRouting",
    "RoutingConfig",
    "RoutingKind",
    "MAX_SEED",
    "RoutingTable",
    "SparseRouting",
    "check_hot",
    "check_matrix",
    "expect",
    "load_matrix",
    "route",
]

#: Most picks (ranks x tokens x top_k) drawn in one block: bounds memory and keeps the work
#: arrays in cache (blocks of 2**19 picks run four times faster than blocks of 2**22 here);
#: never changes a count.
_CHUNK_ELEMENTS = 1 << 16

#: Redraw rounds of a token whose candidates repeat an expert, before the picks it still
#: misses are drawn by inversion; the law is the same, the rounds are faster.
_ROUNDS = 8

MAX_SEED = 2**32 - 1
"""The largest routing seed. A real run seeds each rank's inputs with
``1000 * seed + rank``, which must stay within ``torch.manual_seed``'s 64 bits."""

#: Stream tags of the seed sequences, so global draws never reuse a rank's stream.
_GLOBAL_STREAM = 0
_RANK_STREAM = 1
_LAW_STREAM = 2


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
                "matrix_path",
                self.matrix_path,
                f"only applies to kind='matrix', not {kind.value!r}",
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
    if np.any(value < 0):
        raise ParamInvalidError(param, f"{what} with minimum {value.min()}", "entries must be >= 0")
    # as floats: an unsigned or huge integer compares without wrapping; a rank's rows are a
    # row's sum, which must fit the int64 counts too
    if value.astype(np.float64).sum(axis=1).max() >= 2.0**62:
        raise ParamInvalidError(
            param, f"{what} with maximum {value.max()}", "entries and row sums must be below 2**62"
        )
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
    if not file.is_file():  # a folder, FIFO or device would block or never end
        rule = "must be a regular file" if file.exists() else "no such file"
        raise ParamInvalidError("matrix_path", name, rule)
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
        # one line, the same on every rank: no object's address (numpy's header parser)
        said = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(exc).split()))
        raise ParamInvalidError("matrix_path", name, f"cannot be read: {said}") from None
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


@overload
def route(
    config: RoutingConfig,
    *,
    world_size: int,
    experts_per_rank: int,
    tokens_per_rank: int | None = None,
    top_k: int | None = None,
    sparse: Literal[False] = False,
) -> RoutingTable: ...


@overload
def route(
    config: RoutingConfig,
    *,
    world_size: int,
    experts_per_rank: int,
    tokens_per_rank: int | None = None,
    top_k: int | None = None,
    sparse: Literal[True],
) -> SparseRouting: ...


@overload
def route(
    config: RoutingConfig,
    *,
    world_size: int,
    experts_per_rank: int,
    tokens_per_rank: int | None = None,
    top_k: int | None = None,
    sparse: bool,
) -> RoutingTable | SparseRouting: ...


def route(
    config: RoutingConfig,
    *,
    world_size: int,
    experts_per_rank: int,
    tokens_per_rank: int | None = None,
    top_k: int | None = None,
    sparse: bool = False,
) -> RoutingTable | SparseRouting:
    """Generate the routing of a whole expert-parallel group, on any rank alike.

    Nothing is communicated: rank r's tokens are drawn from a generator seeded by
    ``(config.seed, r)`` alone, so every rank gets the same routing, and rank r's row
    (its counts per global expert) depends only on the config, r, the number of experts
    W * e, ``tokens_per_rank`` and ``top_k``. Each token picks ``top_k`` distinct experts,
    so every rank sends ``tokens_per_rank * top_k`` rows in the dispatch direction
    (``matrix`` excepted: the file's counts rule).

    The representation is the caller's explicit choice and never changes a count:
    ``sparse=False`` gives the dense (W, W, e) :class:`RoutingTable`, ``sparse=True`` a
    :class:`SparseRouting` that keeps only the non-zero counts (537 million entries at 8192
    ranks of 8 experts dense; about 200 million non-zero ones sparse at 4096 tokens of top-8,
    fewer with fewer tokens). Both are built from the same rows, block of ranks by block.

    How a token's picks are drawn (``uniform``, ``zipf``, ``hot``): it draws ``top_k``
    candidates independently from the law of its kind and keeps the distinct ones; while it
    is short, it draws one more candidate a round and keeps it if new. That is successive
    sampling: each pick by weight among the experts the token has not picked. A token whose
    picks already hold half of the weight, or that is still short after ``_ROUNDS`` rounds,
    draws its missing picks from that restricted law directly (by inversion of the
    cumulative weights) instead: the law is the same. :func:`_sampled_picks` lists the
    draws of each rank's generator in order.

    Time and memory at 8192 ranks of 8 experts, top-8, ``sparse=True``, one core of the
    project's shared 2-core machine (CPU seconds; ``docs/BENCHMARKS.md``): 2.0 to 2.2 s at
    256 tokens per rank; at 4096 tokens, 28 to 34 s and 0.6 to 2.5 GiB (uniform 28.5 s with
    211 million non-zero counts, zipf 1.2 28 s, hot 34 s). The generator it replaces, which
    drew with replacement from one global stream, took 4.4 to 10 s at 256 tokens and 74 to
    177 s with 9 to 22 GiB at 4096.

    Args:
        config: the routing model and its parameters.
        world_size: ranks in the group, W >= 1.
        experts_per_rank: local experts per rank, e >= 1.
        tokens_per_rank: tokens (BS) on each rank, >= 1; optional for ``matrix``.
        top_k: distinct experts per token, 1 <= K <= W * e; optional for ``matrix``.
        sparse: whether to return a :class:`SparseRouting` instead of a :class:`RoutingTable`.

    Returns:
        The (W, W, e) table, or the same counts kept sparse.

    Raises:
        ParamInvalidError: a size out of range, a ``hot`` config that cannot reach its
            fraction with these sizes, or a matrix file of the wrong shape.

    """
    if not isinstance(config, RoutingConfig):
        raise ParamInvalidError("config", type(config).__name__, "must be a RoutingConfig")
    if not isinstance(sparse, (bool, np.bool_)):
        raise ParamInvalidError("sparse", sparse, "must be True or False")
    world = _check_int("world_size", world_size, 1)
    e = _check_int("experts_per_rank", experts_per_rank, 1)
    num_experts = world * e
    if config.kind is RoutingKind.MATRIX:
        if tokens_per_rank is not None:
            _check_int("tokens_per_rank", tokens_per_rank, 1)
        if top_k is not None:
            _check_int("top_k", top_k, 1)
        matrix = check_matrix(config, world_size=world, experts_per_rank=e)
        if sparse:
            return SparseRouting.from_matrix(matrix, e)
        return RoutingTable(counts=matrix.reshape(world, world, e))

    if tokens_per_rank is None:
        raise ParamInvalidError("tokens_per_rank", None, f"is required by kind={config.kind!r}")
    if top_k is None:
        raise ParamInvalidError("top_k", None, f"is required by kind={config.kind!r}")
    tokens = _check_int("tokens_per_rank", tokens_per_rank, 1)
    k = _check_int_range("top_k", top_k, 1, num_experts)
    blocks = _pick_blocks(config, world, num_experts, tokens, k)
    if sparse:
        return SparseRouting._from_picks(world, e, blocks, most=tokens)
    rows = np.empty((world, num_experts), dtype=np.int64)
    for first, count, picks in blocks:
        bins = count * num_experts
        rows[first : first + count] = np.bincount(picks, minlength=bins)[:bins].reshape(count, -1)
    return RoutingTable(counts=rows.reshape(world, world, e))


#: Experts whose expected rows from one rank are at most this take their split parts from
#: the count's law itself (its first :data:`_PMF_TERMS` probabilities); above it, a count's
#: remainder modulo the parts is taken as uniform and its tail as normal.
_PMF_MEAN = 16.0
_PMF_TERMS = 64


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class ExpectedRouting:
    """The routing law in expectation: what one rank sends each expert, on average.

    Every rank's tokens follow the same law, so rank r's count for global expert g has the
    same law for every r: ``Binomial(tokens, pi_g)``, ``pi_g`` the probability that a token
    picks g (a token picks each expert at most once), or, for ``balanced``, ``floor(mean_g)``
    or ``ceil(mean_g)``. Simulating thousands of ranks reads this law instead of drawing
    every token's picks (:func:`expect`): what a rank sends or receives over thousands of
    peers is drawn from its normal approximation, seeded by :meth:`rng`.
    """

    world_size: int
    """Ranks, W."""
    experts_per_rank: int
    """Local experts per rank, e."""
    tokens: int
    """Tokens per rank."""
    seed: int
    """The routing's seed, which the loads drawn from this law use
    (:func:`mc2sim.schedule.builders.moe_arrays`)."""
    mean: np.ndarray
    """(W * e,) float64: rows one rank sends global expert g, on average (``tokens * pi_g``)."""
    binomial: bool
    """True: a count is ``Binomial(tokens, mean / tokens)``; False: ``floor`` or ``ceil`` of
    ``mean`` (``balanced``)."""

    def parts(self, parts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One rank's count for each expert cut in ``parts`` sub-tiles (the larger first).

        Returns:
            ``(mean, var, nonzero)``, each (parts, W * e): sub-tile p's expected rows, their
            variance, and the probability that it has any.
        """
        mean = np.empty((parts, self.mean.size))
        var = np.empty((parts, self.mean.size))
        nonzero = np.empty((parts, self.mean.size))
        if not self.binomial:  # two points: floor (weight 1 - f) and ceil (weight f)
            low = np.floor(self.mean)
            frac = self.mean - low
            for p in range(parts):
                at_low, at_high = _part(low, p, parts), _part(low + 1, p, parts)
                mean[p] = (1 - frac) * at_low + frac * at_high
                var[p] = (1 - frac) * at_low**2 + frac * at_high**2 - mean[p] ** 2
                nonzero[p] = (1 - frac) * (at_low > 0) + frac * (at_high > 0)
            return mean, np.maximum(var, 0.0), nonzero
        spread = self.mean * (1 - self.mean / self.tokens)  # a count's variance
        sd = np.sqrt(spread)
        small = self.mean <= _PMF_MEAN
        # a remainder modulo parts spread over many of its values is uniform
        uniform = ~small & (sd >= 2 * parts)
        # a count that cannot vary (every token picks the expert): its parts are fixed
        fixed = ~small & (sd == 0.0)
        uniform &= ~fixed
        for p in range(parts):
            at = _part(self.mean[fixed], p, parts)
            mean[p, fixed], var[p, fixed], nonzero[p, fixed] = at, 0.0, at > 0
        mid = ~small & ~uniform & ~fixed  # a few hot experts at most: their windows are wide
        for chosen in [*_chunks(np.flatnonzero(small), 1 << 16), *_chunks(np.flatnonzero(mid))]:
            counts, weights = self._law_of(chosen, sd[chosen])
            for p in range(parts):
                cut = _part(counts, p, parts)  # (terms,) shared, or (terms, experts)
                if cut.ndim == 1:
                    mean[p, chosen] = cut @ weights
                    var[p, chosen] = cut**2 @ weights - mean[p, chosen] ** 2
                    nonzero[p, chosen] = (cut > 0).astype(np.float64) @ weights
                else:
                    mean[p, chosen] = (weights * cut).sum(axis=0)
                    var[p, chosen] = (weights * cut**2).sum(axis=0) - mean[p, chosen] ** 2
                    nonzero[p, chosen] = (weights * (cut > 0)).sum(axis=0)
        big, big_sd = self.mean[uniform], sd[uniform]
        for p in range(parts):
            # the remainder as uniform: E[c // P] = (mean - (P - 1) / 2) / P
            mean[p, uniform] = (big - (parts - 1) / 2) / parts + (parts - 1 - p) / parts
            var[p, uniform] = spread[uniform] / parts**2
            z = (p + 0.5 - big) / (big_sd * math.sqrt(2.0))
            nonzero[p, uniform] = 0.5 * np.array([math.erfc(v) for v in z.tolist()])
        return np.maximum(mean, 0.0), np.maximum(var, 0.0), np.clip(nonzero, 0.0, 1.0)

    def _law_of(self, experts: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(counts, weights): where each expert's law puts weight, (terms, len(experts)).

        Experts whose mean is at most :data:`_PMF_MEAN` (all of them or none): the
        binomial's first :data:`_PMF_TERMS` terms, ``counts`` then (terms,), every expert's
        the same; above, its normal approximation on the integers within 8 standard
        deviations of the mean, normalised.
        """
        mean = self.mean[experts]
        if np.all(mean <= _PMF_MEAN):
            counts = np.arange(_PMF_TERMS, dtype=np.float64)
            return counts, _binomial_pmf(self.tokens, mean / self.tokens, _PMF_TERMS)
        terms = int(np.ceil(16 * sd.max())) + 2
        start = np.maximum(0.0, np.floor(mean - 8 * sd))
        window = start + np.arange(terms, dtype=np.float64)[:, None]
        normal = np.exp(-0.5 * ((window - mean) / sd) ** 2)
        return window, normal / normal.sum(axis=0)

    def rng(self, *keys: int) -> np.random.Generator:
        """A generator of draws from this law, keyed by ``keys`` (its own stream of the seed)."""
        return np.random.default_rng([self.seed, _LAW_STREAM, *keys])

    def none_of(self) -> np.ndarray:
        """(W,) the probability that one rank sends nothing to any expert of rank q."""
        e = self.experts_per_rank
        if self.binomial:
            with np.errstate(divide="ignore"):  # an expert every token picks: never zero
                zero = np.exp(self.tokens * np.log1p(-np.minimum(self.mean / self.tokens, 1.0)))
        else:
            zero = np.where(self.mean < 1.0, 1.0 - self.mean, 0.0)
        out: np.ndarray = zero.reshape(self.world_size, e).prod(axis=1)
        return out


def _chunks(indices: np.ndarray, size: int = 4096) -> Iterator[np.ndarray]:
    """``indices`` in pieces of at most ``size`` (bounds the work arrays' memory)."""
    for start in range(0, indices.size, size):
        yield indices[start : start + size]


def _part(counts: np.ndarray, p: int, parts: int) -> np.ndarray:
    """Sub-tile p's rows of each count cut in ``parts`` (``tiling.even_split``'s rule)."""
    return counts // parts + (p < counts % parts)


def _binomial_pmf(n: int, prob: np.ndarray, terms: int) -> np.ndarray:
    """(terms, len(prob)): ``P(Binomial(n, prob) = c)`` for c = 0 .. terms - 1."""
    out = np.zeros((terms, prob.size))
    q = 1.0 - prob
    with np.errstate(divide="ignore", invalid="ignore"):
        out[0] = np.exp(n * np.log1p(-prob))
        ratio = np.where(q > 0, prob / q, 0.0)
        for c in range(terms - 1):
            out[c + 1] = out[c] * (n - c) / (c + 1) * ratio if c < n else 0.0
    return out


def expect(
    config: RoutingConfig,
    *,
    world_size: int,
    experts_per_rank: int,
    tokens_per_rank: int,
    top_k: int,
) -> ExpectedRouting:
    """The law of ``config``'s routing in expectation (:class:`ExpectedRouting`).

    A token picks expert g with probability ``pi_g``: ``top_k / (W * e)`` for ``uniform``,
    ``balanced`` and ``zipf`` of skew 0; for ``hot``, a hot expert ``top_k *
    hot_fraction / hot_experts`` and a cold one the rest spread evenly; for ``zipf``, whose
    tokens draw ``top_k`` distinct experts by successive sampling with weights ``w_g`` (the
    popularity order of :func:`route`, the same seed), ``1 - exp(-t * w_g)`` with t such that
    the probabilities add up to ``top_k`` (successive sampling keeps the experts whose
    exponential keys ``E_g / w_g`` are the ``top_k`` smallest; with many experts the k-th
    smallest key concentrates at t).

    Raises:
        ParamInvalidError: as :func:`route`; ``matrix`` has no law to expect.
    """
    if config.kind is RoutingKind.MATRIX:
        raise ParamInvalidError("routing.kind", "matrix", "has no law to expect: its counts rule")
    world = _check_int("world_size", world_size, 1)
    e = _check_int("experts_per_rank", experts_per_rank, 1)
    tokens = _check_int("tokens_per_rank", tokens_per_rank, 1)
    num_experts = world * e
    k = _check_int_range("top_k", top_k, 1, num_experts)
    if config.kind is RoutingKind.HOT:
        hot = _hot_experts(config, num_experts)
        target = _hot_target(config, k, num_experts)
        cold = num_experts - len(hot)
        pi = np.full(num_experts, (k - target) / cold if cold else 0.0)
        pi[hot] = target / len(hot)
    elif config.kind is RoutingKind.ZIPF and config.skew > 0.0:
        _, popularity, by_popularity = _zipf_order(config, num_experts)
        pi = _inclusion(by_popularity[popularity], k)  # the heaviest weighs 1
    else:
        pi = np.full(num_experts, k / num_experts)
    return ExpectedRouting(
        world_size=world,
        experts_per_rank=e,
        tokens=tokens,
        seed=config.seed,
        mean=tokens * pi,
        binomial=config.kind is not RoutingKind.BALANCED,
    )


def _inclusion(weights: np.ndarray, k: int) -> np.ndarray:
    """``1 - exp(-t * w)`` with t > 0 such that the sum is k (bisection on log t)."""
    if k >= weights.size:
        return np.ones(weights.size)
    low, high = -60.0, 60.0
    for _ in range(200):
        mid = (low + high) / 2
        total = float(-np.expm1(-math.exp(mid) * weights).sum())
        low, high = (mid, high) if total < k else (low, mid)
    return -np.expm1(-math.exp((low + high) / 2) * weights)


def _rank_rng(seed: int, rank: int) -> np.random.Generator:
    """Return rank ``rank``'s generator: independent of world size and of the other ranks."""
    return np.random.default_rng([seed, _RANK_STREAM, rank])


def _global_rng(seed: int) -> np.random.Generator:
    """Return the generator of draws every rank shares, such as the popularity order."""
    return np.random.default_rng([seed, _GLOBAL_STREAM])


def _pick_blocks(
    config: RoutingConfig, world: int, num_experts: int, tokens: int, k: int
) -> Iterator[tuple[int, int, npt.NDArray[np.int64]]]:
    """Yield ``(first, count, picks)``: every pick of ranks ``first .. first + count - 1``.

    A pick is ``(r - first) * G + g`` for a token of rank r that picked global expert g;
    entries ``>= count * G`` stand for no pick and are to be ignored. How many ranks a block
    holds only bounds memory (``_CHUNK_ELEMENTS``); it never changes a pick, because each
    rank draws from its own generator, in the same calls whatever its block.
    """
    per_block = max(1, _CHUNK_ELEMENTS // (tokens * k))
    law = None if config.kind is RoutingKind.BALANCED else _law(config, num_experts, k)
    for first in range(0, world, per_block):
        count = min(per_block, world - first)
        if law is None:
            yield first, count, _balanced_picks(first, count, tokens, k, num_experts)
            continue
        picks = _sampled_picks(law, config.seed, first, count, tokens, k)
        if law.experts is not None:
            value = picks % num_experts
            picks += law.experts[value] - value
        yield first, count, picks


def _balanced_picks(
    first: int, count: int, tokens: int, k: int, num_experts: int
) -> npt.NDArray[np.int64]:
    """The picks of ranks ``first .. first + count - 1`` under ``balanced`` routing.

    Token t of rank r picks experts ``(offset + t*k + i) mod G`` for i < k with
    ``offset = r * tokens * k``: k consecutive experts, distinct because k <= G. The picks of
    all ranks together are one contiguous round-robin run, so both each rank's counts and
    the global loads are floor or ceil of their mean.
    """
    picks = tokens * k
    ranks = np.arange(first, first + count, dtype=np.int64)
    offset = (ranks * picks) % num_experts
    expert = (offset[:, None] + np.arange(picks, dtype=np.int64)[None, :]) % num_experts
    local: npt.NDArray[np.int64] = (expert + (ranks - first)[:, None] * num_experts).ravel()
    return local


@dataclass(frozen=True, kw_only=True, slots=True)
class _Law:
    """How one token's candidate experts are drawn, in an internal order of the experts.

    Internal value v stands for global expert ``experts[v]``. Values ``[0, cut)`` form the
    first group (``hot``'s hot experts) and ``[cut, G)`` the second; one-group laws have
    ``cut == G``. A candidate is one uniform integer in ``[0, span)``, mapped by :meth:`values`.
    """

    size: int
    """Experts, G."""
    experts: npt.NDArray[np.int64] | None
    """Global expert of each internal value (a permutation of ``range(G)``); None: itself."""
    weight: npt.NDArray[np.float64]
    """Weight of each internal value (in each group its share of candidates)."""
    rank_of: npt.NDArray[np.int64] | None
    """Place of each internal value in the order of decreasing weight (each group's values
    together, the first group first); None: the internal order is that order already."""
    by_rank: npt.NDArray[np.int64] | None
    """The internal value at each place of that order (the inverse of :attr:`rank_of`)."""
    survival: npt.NDArray[np.float64]
    """``survival[r]``: the weight of places r, r + 1, ..., G - 1 (``G + 1`` entries, the last
    0), summed from the lightest up so that the weight left after heavy picks keeps its
    precision."""
    span: int
    """Candidates are drawn as uniform integers in ``[0, span)``."""
    cut: int
    """Start of the second group; ``G`` for laws of one group."""
    table: npt.NDArray[np.int64] | None
    """Alias table of a weighted law (``zipf``), or None when all weights are equal: column
    j's threshold (out of ``2 ** shift``) above ``alias_bits`` bits of its alias."""
    shift: int
    """Fraction bits of a weighted candidate (its low bits; the high bits pick a column)."""
    alias_bits: int
    """Bits of an alias in :attr:`table`."""
    hot_base: int
    """Hot picks every ``hot`` token takes at least (0 for other kinds)."""
    hot_frac: float | None
    """Probability of one more hot pick (``hot`` only; None for other kinds)."""

    def values(
        self, raw: npt.NDArray[np.int64], second: npt.NDArray[np.bool_] | None
    ) -> npt.NDArray[np.int64]:
        """Map uniform integers in ``[0, span)`` to candidates (internal values); reuses ``raw``.

        ``second`` says which candidates belong to the second group (``hot`` only): one
        integer ``a + cut * b`` gives the independent uniforms ``a`` (a hot expert) and ``b``
        (a cold one). A weighted candidate takes column ``raw >> shift`` unless its low bits
        reach the column's threshold, and then the column's alias (Walker's alias method).
        """
        if second is not None:
            cold, hot = np.divmod(raw, self.cut)
            cold += self.cut
            np.copyto(hot, cold, where=second)
            return hot
        if self.table is None:
            return raw
        column = raw >> self.shift
        entry: npt.NDArray[np.int64] = self.table[column]
        raw &= (1 << self.shift) - 1
        keep = raw < (entry >> self.alias_bits)
        entry &= (1 << self.alias_bits) - 1
        np.copyto(entry, column, where=keep)
        return entry


def _law(config: RoutingConfig, num_experts: int, k: int) -> _Law:
    """The candidate law of ``config`` (``uniform``, ``zipf`` or ``hot``) over G experts."""
    identity = np.arange(num_experts, dtype=np.int64)
    flat = np.arange(num_experts, -1, -1, dtype=np.float64)  # survival of equal weights
    if config.kind is RoutingKind.HOT:
        hot = _hot_experts(config, num_experts)
        target = _hot_target(config, k, num_experts)
        cut = len(hot)
        cold = np.setdiff1d(identity, hot)
        base = math.floor(target)
        return _Law(
            size=num_experts,
            experts=np.concatenate([hot, cold]),
            weight=np.ones(num_experts),
            rank_of=None,
            by_rank=None,
            survival=flat,
            span=cut * max(1, num_experts - cut),
            cut=cut,
            table=None,
            shift=0,
            alias_bits=0,
            hot_base=base,
            hot_frac=target - base,
        )
    if config.kind is RoutingKind.UNIFORM or config.skew == 0.0:
        return _Law(
            size=num_experts,
            experts=None,
            weight=np.ones(num_experts),
            rank_of=None,
            by_rank=None,
            survival=flat,
            span=num_experts,
            cut=num_experts,
            table=None,
            shift=0,
            alias_bits=0,
            hot_base=0,
            hot_frac=None,
        )
    # zipf: expert g of popularity rank p (a seeded permutation) has weight 1 / (p + 1) ** skew
    shift = 62 - num_experts.bit_length()
    if shift < 24:
        raise ParamInvalidError(
            "world_size * experts_per_rank", num_experts, "must be below 2**38 for zipf"
        )
    order, popularity, by_popularity = _zipf_order(config, num_experts)
    weights = by_popularity[popularity]
    alias, probability = _alias_table(weights)
    threshold = np.round(probability * float(1 << shift)).astype(np.int64)
    alias_bits = (num_experts - 1).bit_length()  # threshold <= 2**shift: all fits in 63 bits
    return _Law(
        size=num_experts,
        experts=None,
        weight=weights,
        rank_of=popularity,
        by_rank=order,
        survival=np.append(np.cumsum(by_popularity[::-1])[::-1], 0.0),
        span=num_experts << shift,
        cut=num_experts,
        table=(threshold << alias_bits) | alias,
        shift=shift,
        alias_bits=alias_bits,
        hot_base=0,
        hot_frac=None,
    )


def _zipf_order(
    config: RoutingConfig, num_experts: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """``zipf``'s seeded popularity order: ``(order, popularity, by_popularity)``.

    ``order[p]`` is the expert of popularity rank p, ``popularity`` its inverse, and
    ``by_popularity[p] = 1 / (p + 1) ** skew`` the weight of rank p.
    """
    identity = np.arange(num_experts, dtype=np.int64)
    order = _global_rng(config.seed).permutation(num_experts).astype(np.int64)
    popularity = np.empty(num_experts, dtype=np.int64)
    popularity[order] = identity
    return order, popularity, np.power(identity + 1.0, -config.skew)


def _alias_table(
    weights: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Walker's alias table (Vose's construction) of non-negative weights.

    Column j, drawn uniformly, keeps j with probability ``probability[j]`` and otherwise
    gives ``alias[j]``; then value v comes out with probability ``weights[v] / sum``.

    Returns:
        ``(alias, probability)``.

    """
    size = len(weights)
    scaled = (weights * (size / weights.sum())).tolist()
    alias = list(range(size))
    probability = [1.0] * size
    small = [j for j, q in enumerate(scaled) if q < 1.0]
    large = [j for j, q in enumerate(scaled) if q >= 1.0]
    while small and large:
        s, g = small.pop(), large[-1]
        probability[s] = scaled[s]
        alias[s] = g
        scaled[g] -= 1.0 - scaled[s]
        if scaled[g] < 1.0:
            small.append(large.pop())
    return np.asarray(alias, dtype=np.int64), np.asarray(probability, dtype=np.float64)


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


def check_hot(config: RoutingConfig, *, top_k: int, num_experts: int) -> None:
    """Refuse a ``hot`` routing whose ``hot_fraction`` no token's picks can reach.

    Each token picks ``top_k`` distinct experts of ``num_experts``, between ``max(0, top_k -
    cold)`` and ``min(top_k, hot_experts)`` of them hot. Nothing to check for other kinds.

    Raises:
        ParamInvalidError: ``hot_fraction`` out of that range, over ``top_k``.
    """
    if config.kind is RoutingKind.HOT:
        _hot_target(config, top_k, num_experts)


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


def _sampled_picks(
    law: _Law, seed: int, first: int, count: int, tokens: int, k: int
) -> npt.NDArray[np.int64]:
    """The picks of ranks ``first .. first + count - 1``, as ``local_rank * G + value``.

    Values are internal (see :class:`_Law`); entries ``>= count * G`` are no pick. Rank r's
    generator gives, in this order:

    1. (``hot`` only) ``tokens`` uniforms that round each token's number of hot picks;
    2. ``tokens * k`` candidates, k per token (a ``hot`` token's first ones hot): a token's
       picks are its distinct candidates;
    3. for the tokens still short, a reserve of candidates (:class:`_Reserve`) used round
       by round, one per token still short, token by token (see :func:`_redraw`);
    4. one uniform per pick still missing, token by token, inverted (:func:`_invert_rest`).

    The ranks of a block are handled together, but each draws only from its own generator
    and only as much as its own tokens need, so its picks never depend on the block.
    """
    size = law.size
    empty = count * size
    rngs = [_rank_rng(seed, r) for r in range(first, first + count)]
    hot_picks = None
    if law.hot_frac is not None:
        frac = law.hot_frac
        hot_picks = law.hot_base + np.concatenate(
            [(rng.random(tokens) < frac).astype(np.int64) for rng in rngs]
        )
    raw = np.concatenate([rng.integers(0, law.span, size=tokens * k) for rng in rngs])
    raw = raw.reshape(count * tokens, k)
    second = None if hot_picks is None else np.arange(k)[None, :] >= hot_picks[:, None]
    picks = law.values(raw, second)
    del raw, second
    token_offset = np.repeat(np.arange(count, dtype=np.int64) * size, tokens)
    picks += token_offset[:, None]
    picks.sort(axis=1)
    token, column = np.divmod(np.flatnonzero(picks[:, 1:] == picks[:, :-1]), k - 1)
    if not len(token):
        return picks.ravel()
    picks[token, column + 1] = empty
    kept = [picks.ravel()]
    ids = token[np.concatenate([[True], token[1:] != token[:-1]])]  # ascending already
    rows = np.sort(picks[ids], axis=1)  # each short token's picks, then its empty slots
    kept.extend(_redraw(law, rngs, rows, ids, token_offset, hot_picks, tokens, empty))
    return np.concatenate(kept)


def _redraw(
    law: _Law,
    rngs: list[np.random.Generator],
    rows: npt.NDArray[np.int64],
    ids: npt.NDArray[np.intp],
    token_offset: npt.NDArray[np.int64],
    hot_picks: npt.NDArray[np.int64] | None,
    tokens: int,
    empty: int,
) -> list[npt.NDArray[np.int64]]:
    """Complete the tokens that are short of picks; return the picks they add.

    Round by round, each short token draws one candidate, kept if new to it. A token whose
    next candidate would be new with probability below one half at the start (its picks
    hold half of its group's weight), and every token still short after ``_ROUNDS`` rounds,
    gets its missing picks by inversion instead (:func:`_invert_rest`): fewer draws, the
    same law, since which way a pick is drawn depends only on the picks made so far.

    Args:
        law: the candidate law.
        rngs: the block's generators, one per rank.
        rows: (short tokens, k) their picks as ``local_rank * G + value``, sorted, followed
            by ``empty`` entries for the missing ones.
        ids: the short tokens' indices in the block, ascending.
        token_offset: ``local_rank * G`` of each token of the block.
        hot_picks: hot picks of each token of the block (``hot`` only).
        tokens: tokens per rank.
        empty: the entry that marks a missing pick.

    Returns:
        Arrays of new picks, as ``local_rank * G + value``.

    """
    size, k = law.size, rows.shape[1]
    local = rows - token_offset[ids][:, None]
    valid = local < size
    have = valid.sum(axis=1)
    first_have = (local < law.cut).sum(axis=1)  # missing picks are >= size >= cut
    if hot_picks is not None:  # equal weights within each group
        second = first_have >= hot_picks[ids]
        group_size = np.where(second, size - law.cut, law.cut)
        fast = 2 * (group_size - np.where(second, have - first_have, first_have)) >= group_size
    elif law.table is None:  # equal weights
        fast = 2 * (size - have) >= size
    else:
        total = law.survival[0]
        mass = np.where(valid, law.weight[np.minimum(local, size - 1)], 0.0).sum(axis=1)
        fast = 2.0 * (total - mass) >= total
    del local, valid
    slow = [(rows[~fast], ids[~fast])]
    rows, ids, have, first_have = (a[fast] for a in (rows, ids, have, first_have))
    kept: list[npt.NDArray[np.int64]] = []
    reserve = _Reserve(rngs, law.span, np.bincount(ids // tokens, k - have, len(rngs)))
    for _ in range(_ROUNDS):
        if not len(ids):
            break
        second = None
        if hot_picks is not None:
            second = first_have >= hot_picks[ids]
        draws = reserve.take(np.bincount(ids // tokens, minlength=len(rngs)))
        candidate = law.values(draws, second) + token_offset[ids]
        taken = np.flatnonzero(~_row_any(rows == candidate[:, None]))
        rows[taken, have[taken]] = candidate[taken]
        kept.append(candidate[taken])
        have[taken] += 1
        if second is not None:
            first_have[taken] += ~second[taken]
        short = have < k
        if not short.all():
            rows, ids, have, first_have = (a[short] for a in (rows, ids, have, first_have))
    slow.append((rows, ids))
    if sum(len(i) for _, i in slow):
        rows = np.concatenate([r for r, _ in slow])
        ids = np.concatenate([i for _, i in slow])
        order = np.argsort(ids, kind="stable")
        kept.append(
            _invert_rest(law, rngs, rows[order], ids[order], token_offset, hot_picks, tokens, empty)
        )
    return kept


def _row_any(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``mask.any(axis=1)`` for short rows, column by column (many times faster)."""
    out: npt.NDArray[np.bool_] = mask[:, 0].copy()
    for column in range(1, mask.shape[1]):
        out |= mask[:, column]
    return out


class _Reserve:
    """Candidates drawn ahead for the redraw rounds: few generator calls per rank.

    Rank r draws ``2 * wanted[r] + 4`` uniform integers at once; each round takes the next
    ones, in token order; a rank that runs out draws ``2 * needed + 4`` more.
    """

    def __init__(
        self, rngs: list[np.random.Generator], span: int, wanted: npt.NDArray[np.integer[Any]]
    ) -> None:
        self._rngs = rngs
        self._span = span
        self._left = [
            rng.integers(0, span, size=2 * int(n) + 4) if n else np.empty(0, dtype=np.int64)
            for rng, n in zip(rngs, wanted, strict=True)
        ]

    def take(self, per_rank: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int64]:
        """The next ``per_rank[r]`` candidates of each rank r, rank by rank."""
        parts = []
        for rank in np.flatnonzero(per_rank):
            n, left = int(per_rank[rank]), self._left[rank]
            if len(left) < n:
                more = self._rngs[rank].integers(0, self._span, size=2 * n + 4)
                left = np.concatenate([left, more])
            parts.append(left[:n])
            self._left[rank] = left[n:]
        if not parts:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(parts)


def _uniforms_per_rank(
    rngs: list[np.random.Generator],
    rank_of_token: npt.NDArray[np.int64],
    per_token: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """Draw ``per_token[i]`` uniforms in [0, 1) for each token i from its own rank's generator.

    Tokens are in rank order, so one call per rank draws that rank's uniforms, token by token.
    """
    needed = np.bincount(rank_of_token, weights=per_token, minlength=len(rngs)).astype(np.int64)
    parts = [rngs[rank].random(int(needed[rank])) for rank in np.flatnonzero(needed)]
    return np.concatenate(parts) if parts else np.empty(0)


def _invert_rest(
    law: _Law,
    rngs: list[np.random.Generator],
    rows: npt.NDArray[np.int64],
    ids: npt.NDArray[np.intp],
    token_offset: npt.NDArray[np.int64],
    hot_picks: npt.NDArray[np.int64] | None,
    tokens: int,
    empty: int,
) -> npt.NDArray[np.int64]:
    """Draw every pick still missing from the law restricted to the experts not yet picked.

    One uniform per missing pick, from the token's rank, token by token. The experts are
    placed by decreasing weight (each ``hot`` group on its own: the hot ones until the token
    has its hot picks, then the cold ones). From the first place not picked, the head, ``x``
    uniform on the weight left is stepped past each picked place at or below it, and the pick
    is the place whose interval then holds ``x``: the inverse of the cumulative weights with
    the picked experts cut out. Weights are summed from the head on (``survival``), so the
    few heaviest experts being picked loses no precision. Only floating-point rounding can
    push ``x`` past the end of the group onto a picked expert; such a pick moves to the next
    unpicked place of its group (or the last one).

    Returns:
        The new picks as ``local_rank * G + value``.

    """
    size, k = law.size, rows.shape[1]
    survival = law.survival
    rising = -survival  # ascending, for searchsorted
    offset = token_offset[ids]
    values = np.where(rows == empty, size, rows - offset[:, None])
    if law.rank_of is not None:
        values = np.where(values < size, law.rank_of[np.minimum(values, size - 1)], size)
    values.sort(axis=1)
    want = (values == size).sum(axis=1)
    uniforms = _uniforms_per_rank(rngs, ids // tokens, want)
    start = np.concatenate([[0], np.cumsum(want)[:-1]])
    new: list[npt.NDArray[np.int64]] = []
    for step in range(int(want.max())):
        live = np.flatnonzero(want > step)
        picked = values[live]
        second = np.zeros(len(live), dtype=bool)
        if hot_picks is not None:
            second = (picked < law.cut).sum(axis=1) >= hot_picks[ids[live]]
        low = np.where(second, law.cut, 0)
        high = np.where(second, size, law.cut)
        head = low.copy()  # the first place of the group not picked
        for column in range(k):  # picked places ascend along a row
            head += picked[:, column] == head
        inside = (picked > head[:, None]) & (picked < high[:, None])
        capped = np.minimum(picked, size - 1)
        base = survival[head]
        begin = base[:, None] - survival[capped]  # a picked place's interval, from the head
        end = base[:, None] - survival[capped + 1]
        weight = np.where(inside, end - begin, 0.0)
        left = base - survival[high] - weight.sum(axis=1)
        x = uniforms[start[live] + step] * np.maximum(left, 0.0)
        for column in range(k):
            step_over = inside[:, column] & (x >= begin[:, column])
            x = np.where(step_over, np.maximum(x + weight[:, column], end[:, column]), x)
        # the place v with survival[v] >= base - x > survival[v + 1]
        place = np.searchsorted(rising, x - base, side="right") - 1
        value = np.clip(place, head, high - 1)
        for _ in range(k + 1):  # rounding: step off picked places, upwards then downwards
            taken = _row_any(picked == value[:, None])
            if not taken.any():
                break
            up = np.where(taken, value + 1, value)
            value = np.where(up < high, up, _highest_free(picked, low, high))
        values[live, k - 1] = value
        values[live] = np.sort(values[live], axis=1)
        if law.by_rank is not None:
            value = law.by_rank[value]
        new.append(value + offset[live])
    return np.concatenate(new)


def _highest_free(
    picked: npt.NDArray[np.int64], low: npt.NDArray[np.int64], high: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """The highest value of each row's group ``[low, high)`` not among its ``picked``."""
    value = high - 1
    for _ in range(picked.shape[1] + 1):
        taken = _row_any(picked == value[:, None])
        if not taken.any():
            break
        value = np.where(taken, value - 1, value)
    return np.maximum(value, low)


class SparseRouting:
    """The counts of a routing kept sparse: only (rank, expert) pairs that carry rows.

    Built by ``route(..., sparse=True)`` from the same picks as the dense
    :class:`RoutingTable`: ``send_counts`` and ``recv_counts`` give the same counts in
    either direction, as ``SparseCounts``, for plans the simulator runs at scale (a dense
    table has W * W * e entries: 537 million at 8192 ranks of 8 experts).
    """

    __slots__ = ("_recv", "_send", "experts_per_rank", "world_size")

    def __init__(
        self,
        *,
        world_size: int,
        experts_per_rank: int,
        bounds: npt.NDArray[np.int64],
        expert: npt.NDArray[np.integer[Any]],
        rows: npt.NDArray[np.integer[Any]],
    ) -> None:
        """Keep the non-zero counts of each rank, and index them by receiver too.

        Args:
            world_size: ranks, W >= 1.
            experts_per_rank: local experts per rank, e >= 1.
            bounds: W + 1 offsets; rank r's counts are entries ``bounds[r]:bounds[r + 1]``.
            expert: each entry's global expert, ascending within a rank.
            rows: each entry's count, > 0.

        """
        self.world_size = _check_int("world_size", world_size, 1)
        self.experts_per_rank = _check_int("experts_per_rank", experts_per_rank, 1)
        bounds = np.asarray(bounds, dtype=np.int64)
        if bounds.shape != (self.world_size + 1,):
            raise ParamInvalidError("bounds.shape", bounds.shape, "must be (world_size + 1,)")
        self._send = (bounds, expert, rows)
        self._recv = _receiver_view(self.world_size, self.experts_per_rank, bounds, expert, rows)

    @classmethod
    def from_matrix(cls, matrix: npt.ArrayLike, experts_per_rank: int) -> SparseRouting:
        """Keep a rank-by-global-expert matrix sparse (see :meth:`RoutingTable.from_matrix`).

        Args:
            matrix: (W, W * experts_per_rank) non-negative integers.
            experts_per_rank: local experts per rank, e >= 1.

        Returns:
            The routing whose counts are the matrix's.

        """
        dense = RoutingTable.from_matrix(matrix, experts_per_rank).matrix()
        source, expert = np.nonzero(dense)
        bounds = np.searchsorted(source, np.arange(len(dense) + 1))
        return cls(
            world_size=len(dense),
            experts_per_rank=experts_per_rank,
            bounds=bounds,
            expert=expert.astype(_index_dtype(dense.shape[1])),
            rows=dense[source, expert],
        )

    @classmethod
    def _from_picks(
        cls,
        world_size: int,
        experts_per_rank: int,
        blocks: Iterable[tuple[int, int, npt.NDArray[np.int64]]],
        most: int,
    ) -> SparseRouting:
        """Count the picks of blocks that cover ranks 0..W-1 in order (see ``_pick_blocks``).

        ``most`` bounds every count (the tokens per rank), which sets the counts' dtype.
        """
        size = world_size * experts_per_rank
        count_dtype = _index_dtype(most + 1)
        per_rank = np.zeros(world_size, dtype=np.int64)
        experts, counts = [], []
        for first, count, picks in blocks:
            picks.sort()
            picks = picks[: np.searchsorted(picks, count * size)]
            starts = np.concatenate([[0], np.flatnonzero(picks[1:] != picks[:-1]) + 1])
            keys = picks[starts]
            rows = np.diff(np.append(starts, len(picks)))
            source = keys // size
            per_rank[first : first + count] = np.bincount(source, minlength=count)
            experts.append((keys - source * size).astype(_index_dtype(size)))
            counts.append(rows.astype(count_dtype))
        return cls(
            world_size=world_size,
            experts_per_rank=experts_per_rank,
            bounds=np.concatenate([[0], np.cumsum(per_rank)]),
            expert=np.concatenate(experts),
            rows=np.concatenate(counts),
        )

    @property
    def num_experts(self) -> int:
        """Global experts, W * e."""
        return self.world_size * self.experts_per_rank

    def _slice(self, view: tuple[npt.NDArray[Any], ...], rank: object) -> SparseCounts:
        r = _check_int_range("rank", rank, 0, self.world_size - 1)
        bounds, index, rows = view
        lo, hi = int(bounds[r]), int(bounds[r + 1])
        return SparseCounts(
            self.num_experts, index[lo:hi].astype(np.int64), rows[lo:hi].astype(np.int64)
        )

    def send_counts(
        self, rank: int, direction: str | Direction = Direction.DISPATCH
    ) -> SparseCounts:
        """Rows ``rank`` sends, as ``RoutingTable.send_counts`` but sparse.

        Args:
            rank: the sending rank, 0 <= rank < W.
            direction: ``dispatch`` or ``combine``, as for ``RoutingTable.send_counts``.

        Returns:
            The non-zero counts, indexed ``peer * e + expert``.

        """
        if _direction(direction) is Direction.COMBINE:
            return self._slice(self._recv, rank)
        return self._slice(self._send, rank)

    def recv_counts(
        self, rank: int, direction: str | Direction = Direction.DISPATCH
    ) -> SparseCounts:
        """Rows ``rank`` receives, as ``RoutingTable.recv_counts`` but sparse.

        Args:
            rank: the receiving rank, 0 <= rank < W.
            direction: ``dispatch`` or ``combine``, as for ``RoutingTable.recv_counts``.

        Returns:
            The non-zero counts, indexed ``peer * e + expert``.

        """
        if _direction(direction) is Direction.COMBINE:
            return self._slice(self._send, rank)
        return self._slice(self._recv, rank)

    def matrix(self) -> npt.NDArray[np.int64]:
        """Return the dense (W, W * e) rank-by-global-expert matrix, as ``RoutingTable.matrix``."""
        bounds, expert, rows = self._send
        out = np.zeros((self.world_size, self.num_experts), dtype=np.int64)
        out[np.repeat(np.arange(self.world_size), np.diff(bounds)), expert] = rows
        return out


def _receiver_view(
    world: int,
    e: int,
    bounds: npt.NDArray[np.int64],
    expert: npt.NDArray[np.integer[Any]],
    rows: npt.NDArray[np.integer[Any]],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.integer[Any]], npt.NDArray[np.integer[Any]]]:
    """Index the counts by the rank that owns the expert: the dispatch receivers' view.

    A counting sort by owner, a chunk of source ranks at a time (memory stays that of the
    result): within a chunk, entry (source r, global expert q*e + j) sorts by the key
    ``q * G + r * e + j`` (its count riding in the low bits where both fit in 63 bits), and
    the chunk's entries of owner q go next in q's part of the result, so each owner's entries
    ascend in ``r * e + j``.

    Returns:
        ``(bounds, index, rows)``: owner q's entries are ``bounds[q]:bounds[q + 1]``, with
        index ``r * e + j``.

    """
    size = world * e
    total = len(expert)
    row_bits = max(1, int(rows.max(initial=0)).bit_length())
    packed = (world * size - 1).bit_length() + row_bits <= 63
    step = max(1, world * _CHUNK_ELEMENTS // max(1, total))
    chunks = [(a, min(world, a + step)) for a in range(0, world, step)]
    per_owner = np.zeros(world, dtype=np.int64)
    for a, b in chunks:
        per_owner += np.bincount(expert[bounds[a] : bounds[b]] // e, minlength=world)
    owner_bounds = np.concatenate([[0], np.cumsum(per_owner)])
    cursor = owner_bounds[:-1].copy()
    index = np.empty(total, dtype=_index_dtype(size))
    recv_rows = np.empty(total, dtype=rows.dtype)
    for a, b in chunks:
        lo, hi = int(bounds[a]), int(bounds[b])
        owner, local = np.divmod(expert[lo:hi].astype(np.int64), e)
        key = np.repeat(np.arange(a, b, dtype=np.int64) * e, np.diff(bounds[a : b + 1]))
        key += local
        owner *= size
        key += owner
        if packed:
            key <<= row_bits
            key |= rows[lo:hi]
            key.sort()
            count: npt.NDArray[np.integer[Any]] = key & ((1 << row_bits) - 1)
            key >>= row_bits
        else:
            order = np.argsort(key)
            key, count = key[order], rows[lo:hi][order]
        owner, key = np.divmod(key, size)
        per_chunk = np.bincount(owner, minlength=world)
        place = (cursor - np.cumsum(per_chunk) + per_chunk)[owner]
        place += np.arange(len(key))
        index[place] = key
        recv_rows[place] = count
        cursor += per_chunk
    return owner_bounds, index, recv_rows


def _index_dtype(size: int) -> type[np.integer[Any]]:
    """The narrowest of uint16, int32 and int64 that holds 0..size-1 (memory at scale)."""
    if size <= 1 << 16:
        return np.uint16
    return np.int32 if size <= 1 << 31 else np.int64
