"""Bounded first-in first-out caches: plain dicts that forget their oldest entry when full."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["put_bounded"]

K = TypeVar("K")
V = TypeVar("V")


def put_bounded(
    cache: dict[K, V], key: K, value: V, limit: int, *, move_to_newest: bool = False
) -> None:
    """Store ``value`` under ``key``, first forgetting the oldest entry if ``cache`` is full.

    A dict keeps its keys in insertion order, so the first key is the oldest. An entry is
    dropped whenever ``cache`` holds ``limit`` or more, even if ``key`` is among them; a
    ``key`` already present keeps its place, unless ``move_to_newest`` removes it first so
    that it is stored as the newest (and no longer counts against ``limit``).

    Args:
        cache: the cache, changed in place.
        key: the entry's key.
        value: the entry's value.
        limit: at most this many entries are kept (>= 1).
        move_to_newest: remove ``key`` before checking the limit and storing it.
    """
    if move_to_newest:
        cache.pop(key, None)
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value
