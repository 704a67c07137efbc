"""Tilings: how a fused op is cut into tiles, and the hardware's default policy.

``tiling=`` on every fused op takes ``None`` (the hardware's default), ``"serial"`` (one
tile, not pipelined: the baseline every study compares against; the MoE ops' shared-expert
matmul still overlaps their AlltoAllv), an int (that many tiles) or a :class:`Tiling`. What
a tile is depends on the op: rows of M for MatmulAllReduce, an expert (times sub-tiles) for
the MoE ops, a peer rank's chunk (times sub-tiles) for AllGatherMatmul and
MatmulReduceScatter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mc2sim._compat import StrEnum
from mc2sim.errors import ParamInvalidError

__all__ = [
    "A2_TIME_MODEL",
    "AscendTimeModel",
    "MAX_TILES",
    "Tiling",
    "TilingMode",
    "even_split",
    "hardware_mm_all_reduce_tiles",
    "tile_lengths",
    "tiling_of",
]

MAX_TILES = 16
"""The hardware's queue depth: at most 16 tiles (OPS.md section 2)."""


class TilingMode(StrEnum):
    """How to cut an op.

    Glossary: ``hardware`` reproduces what the fused kernel does by default; ``serial`` is one
    tile (compute everything, then communicate everything); ``tiles`` asks for ``count``
    tiles (M tiles, or sub-tiles per expert / per rank chunk).
    """

    HARDWARE = "hardware"
    SERIAL = "serial"
    TILES = "tiles"


@dataclass(frozen=True, kw_only=True, slots=True)
class Tiling:
    """A tiling request."""

    mode: TilingMode = TilingMode.HARDWARE
    """Which policy."""
    count: int = 1
    """With ``tiles``: how many tiles (1 to 16)."""

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or isinstance(self.count, bool):
            raise ParamInvalidError("tiling.count", self.count, "must be an int")
        if self.mode is TilingMode.TILES and not 1 <= self.count <= MAX_TILES:
            raise ParamInvalidError("tiling", self.count, f"tile count must be in [1, {MAX_TILES}]")

    def describe(self) -> str:
        """Return the tiling in words: ``hardware``, ``serial`` or ``tiles=N``."""
        return f"tiles={self.count}" if self.mode is TilingMode.TILES else str(self.mode)


def tiling_of(spec: None | str | int | Tiling) -> Tiling:
    """Return the :class:`Tiling` a ``tiling=`` argument asks for.

    Args:
        spec: ``None`` or ``"hardware"`` (the hardware's default), ``"serial"``, an int in
            [1, 16], or a ``Tiling``.

    Returns:
        The tiling.

    Raises:
        ParamInvalidError: anything else.
    """
    if spec is None:
        return Tiling()
    if isinstance(spec, Tiling):
        return spec
    if isinstance(spec, bool):
        raise ParamInvalidError(
            "tiling", spec, "must be None, 'serial', 'hardware', an int or a Tiling"
        )
    if isinstance(spec, int):
        return Tiling(mode=TilingMode.TILES, count=spec)
    if spec in (TilingMode.SERIAL, TilingMode.HARDWARE):
        return Tiling(mode=TilingMode(spec))
    raise ParamInvalidError(
        "tiling", spec, "must be None, 'serial', 'hardware', an int in [1, 16] or a Tiling"
    )


def even_split(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` non-negative integers differing by at most one.

    The larger parts come first. Both sides of an exchange split a count the same way, so a
    sub-tile's send and receive counts agree across ranks.
    """
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def tile_lengths(total: int, parts: int) -> list[int]:
    """Cut ``total`` rows into at most ``parts`` non-empty tiles of :func:`even_split` sizes.

    Fewer tiles than ``parts`` when there are fewer rows; ``total`` must be >= 1.
    """
    return [n for n in even_split(total, min(parts, total)) if n > 0]


@dataclass(frozen=True, kw_only=True, slots=True)
class AscendTimeModel:
    """The fitted time models MatmulAllReduce's tiling inverts (OPS.md section 2).

    Matrix time: ``rows * k * n`` multiply-adds at ``macs_per_cycle * clock_hz * cube_util``.
    AllReduce time in its linear regime (messages of at least ``linear_from_bytes``):
    ``us_per_mb`` per MiB plus ``fixed_us``.
    """

    macs_per_cycle: int = 4096
    """Cube unit throughput: multiply-adds per cycle."""
    clock_hz: float = 1.8e9
    """Cube clock."""
    cube_util: float = 0.75
    """Utilisation, between the fit's 0.65 and 0.85 (the midpoint)."""
    us_per_mb: float = 13.58
    """AllReduce microseconds per MiB."""
    fixed_us: float = 61.5
    """AllReduce fixed cost, microseconds."""
    linear_from_bytes: int = 8 * 1024 * 1024
    """Message size from which the AllReduce time is linear."""
    row_align: int = 16
    """Tile lengths are multiples of this many rows (a cube fractal)."""

    def matmul_s(self, rows: int, k: int, n: int) -> float:
        """Seconds of a ``rows x k x n`` matmul."""
        return rows * k * n / (self.macs_per_cycle * self.clock_hz * self.cube_util)

    def allreduce_s(self, nbytes: int) -> float:
        """Seconds of an AllReduce of ``nbytes`` (the linear fit)."""
        return (self.us_per_mb * nbytes / (1024 * 1024) + self.fixed_us) * 1e-6


A2_TIME_MODEL = AscendTimeModel()
"""Atlas A2 (910B) figures of OPS.md."""


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def hardware_mm_all_reduce_tiles(
    m: int, k: int, n: int, out_bytes: int, model: AscendTimeModel = A2_TIME_MODEL
) -> list[int]:
    """Tile lengths MatmulAllReduce's default tiling gives M, in issue order.

    A model of the policy OPS.md describes, not a bit-exact copy of CANN's tiling code:

    * The short tile is the minimum tile: the rows whose AllReduce reaches the linear regime
      (``linear_from_bytes``), aligned up to ``row_align``. No split when ``m`` is less than
      twice that.
    * When the whole matmul takes at least as long as the whole AllReduce (compute-bound),
      the short tile goes last, so the one exposed AllReduce is short; otherwise
      (communication-bound) it goes first, so the one exposed matmul is short.
    * Long tiles: compute-bound, the shortest length whose AllReduce (with its fixed cost)
      hides behind the next long tile's matmul; communication-bound, the shortest length whose
      fixed cost is at most a tenth of its AllReduce. At most 16 tiles in all; the rows left
      over are spread over the long tiles.

    Args:
        m: rows of the output (``m`` of ``x1``, batch dims flattened).
        k: reduction dim.
        n: output columns.
        out_bytes: bytes per output element (what the AllReduce moves).
        model: the time models.

    Returns:
        Positive tile lengths summing to ``m``.
    """
    row_bytes = n * out_bytes
    short = _align_up(max(1, math.ceil(model.linear_from_bytes / row_bytes)), model.row_align)
    if m < 2 * short:
        return [m]
    per_row_mm = model.matmul_s(1, k, n)
    per_row_comm = model.allreduce_s(row_bytes) - model.fixed_us * 1e-6
    fixed = model.fixed_us * 1e-6
    compute_bound = model.matmul_s(m, k, n) >= model.allreduce_s(m * row_bytes)
    if compute_bound and per_row_mm > per_row_comm:
        long_len = math.ceil(fixed / (per_row_mm - per_row_comm))
    else:
        long_len = math.ceil(9 * fixed / per_row_comm) if per_row_comm > 0 else m
    long_len = _align_up(max(long_len, short), model.row_align)
    rest = m - short
    count = max(1, min(rest // long_len, MAX_TILES - 1))
    longs = even_split(rest, count)
    return [*longs, short] if compute_bound else [short, *longs]
