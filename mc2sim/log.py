"""Rank-aware logging: every record is prefixed ``[rank r/N]``; INFO on rank 0 only."""

from __future__ import annotations

import logging

from mc2sim.runtime import world_position

__all__ = ["get_logger", "setup_logging"]

_FORMAT = "[rank %(rank)d/%(world)d] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Adds ``rank`` and ``world`` to every record."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.rank, self.world = rank, world

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.world = self.rank, self.world
        return True


def setup_logging(level: int | None = None, *, all_ranks: bool = False) -> None:
    """Configure the ``mc2sim`` logger for this rank.

    Args:
        level: the level on the ranks that log; default INFO.
        all_ranks: log at ``level`` on every rank; by default ranks other than 0 log
            WARNING and above only.

    """
    rank, world = world_position()
    logger = logging.getLogger("mc2sim")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_RankFilter(rank, world))
    logger.addHandler(handler)
    chosen = logging.INFO if level is None else level
    logger.setLevel(chosen if (rank == 0 or all_ranks) else max(chosen, logging.WARNING))
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    """Return the logger for a module of mc2sim (a child of ``mc2sim``)."""
    return logging.getLogger(name if name.startswith("mc2sim") else f"mc2sim.{name}")
