"""Tests of the bounded first-in first-out caches the kernels keep (``put_bounded``)."""

from __future__ import annotations

from mc2sim.kernels._cache import put_bounded


def test_a_full_cache_forgets_its_oldest_entry_first() -> None:
    """Entries stay in insertion order; at the limit the first inserted goes first."""
    cache: dict[str, int] = {}
    put_bounded(cache, "a", 1, 3)
    put_bounded(cache, "b", 2, 3)
    put_bounded(cache, "c", 3, 3)
    assert list(cache.items()) == [("a", 1), ("b", 2), ("c", 3)]
    put_bounded(cache, "d", 4, 3)
    assert list(cache.items()) == [("b", 2), ("c", 3), ("d", 4)]
    put_bounded(cache, "e", 5, 3)
    assert list(cache.items()) == [("c", 3), ("d", 4), ("e", 5)]


def test_a_stored_key_keeps_its_place_unless_moved_to_newest() -> None:
    """A key stored again keeps its place; moved to newest, it goes last and frees its slot.

    Stored again in place, a full cache still drops its oldest entry first; moved to newest,
    the key is removed first, so it is the last to be forgotten and nothing else is.
    """
    cache = {"a": 1, "b": 2, "c": 3}
    put_bounded(cache, "b", 20, 4)
    assert list(cache.items()) == [("a", 1), ("b", 20), ("c", 3)]
    put_bounded(cache, "c", 30, 3)
    assert list(cache.items()) == [("b", 20), ("c", 30)]

    cache = {"a": 1, "b": 2, "c": 3}
    put_bounded(cache, "a", 10, 3, move_to_newest=True)
    assert list(cache.items()) == [("b", 2), ("c", 3), ("a", 10)]
    put_bounded(cache, "d", 4, 3, move_to_newest=True)
    assert list(cache.items()) == [("c", 3), ("a", 10), ("d", 4)]
    put_bounded(cache, "c", 30, 3, move_to_newest=True)
    assert list(cache.items()) == [("a", 10), ("d", 4), ("c", 30)]
