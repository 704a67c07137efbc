"""Stragglers and uneven hardware: per-rank slowdowns the simulator applies, and who waited.

A :class:`Straggler` describes one rank that is not like the others: its compute runs
``compute`` times slower, its links carry ``link`` of their bandwidth, and it starts its plan
``late_us`` microseconds after the others. A scenario names its stragglers by rank
(``stragglers:`` in the YAML file, ``--set stragglers.RANK.KEY=VALUE``); every other rank is
nominal. The simulator (:func:`mc2sim.model.simulator.simulate_waits`) applies them:

* compute: each compute task of the rank takes ``compute`` times its modelled time;
* links: the rank's links run at ``link`` of their bandwidth (latency unchanged). An
  AlltoAllv takes the slowest rank's time, the degraded rank's own traffic costed on its
  degraded links; a ring or tree collective (AllReduce, AllGather, ReduceScatter) passes
  every rank's data through every rank, so it runs at the slowest rank's bandwidth;
* late arrival: the rank's issuer starts at ``late_us``, not at 0.

The simulator also records when each rank queued each collective (:class:`Arrivals`), from
which :func:`rank_waits` tells, per rank, how long it waited at collectives for the last
rank to arrive, and for whom.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mc2sim.errors import ParamInvalidError

__all__ = ["Arrivals", "RankWaits", "Straggler", "check_stragglers", "rank_waits"]

STRAGGLER_KEYS = ("compute", "link", "late_us")
"""The keys of one straggler, in the file format's order."""

MAX_COMPUTE_FACTOR = 1000.0
"""The largest compute slowdown a straggler may have."""


def _number(param: str, value: object, low: float, high: float, *, open_low: bool) -> float:
    """Return ``value`` as a float in ``(low, high]`` (``open_low``) or ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ParamInvalidError(param, value, "must be a number")
    number = float(value)
    inside = (low < number if open_low else low <= number) and number <= high
    if not (math.isfinite(number) and inside):
        bound = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise ParamInvalidError(param, value, f"must be a finite number in {bound}")
    return number


@dataclass(frozen=True, kw_only=True, slots=True)
class Straggler:
    """One rank's deviation from the nominal hardware."""

    compute: float = 1.0
    """Its compute tasks take this many times their modelled time, in (0, 1000]
    (1.5: 50% slower; below 1: faster than the others)."""

    link: float = 1.0
    """Its links carry this fraction of their bandwidth, in (0, 1] (0.5: half)."""

    late_us: float = 0.0
    """Microseconds after the others it starts its plan, in [0, 1e9]."""

    def __post_init__(self) -> None:
        _number("compute", self.compute, 0.0, MAX_COMPUTE_FACTOR, open_low=True)
        _number("link", self.link, 0.0, 1.0, open_low=True)
        _number("late_us", self.late_us, 0.0, 1e9, open_low=False)
        for key in STRAGGLER_KEYS:
            object.__setattr__(self, key, float(getattr(self, key)))

    @classmethod
    def of(cls, param: str, data: object) -> Straggler:
        """A straggler from a mapping of :data:`STRAGGLER_KEYS`; errors name ``param.KEY``.

        Args:
            param: where the mapping was met, e.g. ``"stragglers.5"``.
            data: the mapping (a :class:`Straggler` is returned as is).

        Returns:
            The straggler.

        Raises:
            ParamInvalidError: not a mapping, an unknown key, or a value out of range.
        """
        if isinstance(data, Straggler):
            return data
        if not isinstance(data, Mapping) or not data:
            raise ParamInvalidError(
                param, data, "must be a mapping with some of the keys " + ", ".join(STRAGGLER_KEYS)
            )
        for key in data:
            if key not in STRAGGLER_KEYS:
                raise ParamInvalidError(
                    f"{param}.{key}",
                    data[key],
                    "unknown key; allowed: " + ", ".join(STRAGGLER_KEYS),
                )
        try:
            return cls(**data)
        except ParamInvalidError as err:
            raise ParamInvalidError(f"{param}.{err.param}", err.value, err.rule) from None


def check_stragglers(param: str, value: object) -> dict[int, Straggler]:
    """Return ``value`` (rank -> straggler, as a scenario gives it) checked, ranks sorted.

    Args:
        param: what errors call it (``"stragglers"``).
        value: a mapping of rank (an int >= 0) to a straggler's mapping.

    Returns:
        rank -> :class:`Straggler`, in rank order.

    Raises:
        ParamInvalidError: not a mapping, a rank that is not an int >= 0, or a bad straggler.
    """
    if not isinstance(value, Mapping):
        raise ParamInvalidError(
            param, value, "must be a mapping of rank to {compute, link, late_us}"
        )
    result: dict[int, Straggler] = {}
    for rank, data in value.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ParamInvalidError(f"{param}.{rank}", data, "the key must be a rank, an int >= 0")
        result[rank] = Straggler.of(f"{param}.{rank}", data)
    return dict(sorted(result.items()))


@dataclass(frozen=True, kw_only=True, slots=True)
class Arrivals:
    """When each rank queued each collective of one simulated run, and when it started."""

    queued_s: np.ndarray
    """(collectives, world): the time rank r handed its k-th collective to its queue."""

    started_s: np.ndarray
    """(collectives,): the time collective k started."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankWaits:
    """Per rank (index = rank), its waits at collectives for the last rank to arrive."""

    wait_s: np.ndarray
    """Seconds it waited, over all collectives, from its arrival to the last rank's."""

    waited_for: np.ndarray
    """The last rank to arrive at the collective where it waited longest (-1: it never
    waited: it was last, or all arrived together)."""

    last: np.ndarray
    """Collectives at which it arrived last while another rank waited for it."""


def rank_waits(arrivals: Arrivals) -> RankWaits:
    """Who waited for whom, from a run's arrivals.

    At collective k, rank r waits ``max_q queued[k, q] - queued[k, r]`` for the last rank
    to arrive (the lowest rank of those that arrived last, on a tie).

    Args:
        arrivals: the run's arrivals.

    Returns:
        Each rank's waits.
    """
    queued = arrivals.queued_s
    world = queued.shape[1] if queued.ndim == 2 else 0
    if queued.shape[0] == 0:
        zeros = np.zeros(world)
        return RankWaits(wait_s=zeros, waited_for=np.full(world, -1), last=np.zeros(world, int))
    latest = queued.max(axis=1)
    last_rank = queued.argmax(axis=1)  # the first (lowest) rank of the latest arrivals
    waits = latest[:, None] - queued  # (K, W) >= 0
    longest = waits.argmax(axis=0)
    waited = waits.max(axis=0) > 0
    waited_for = np.where(waited, last_rank[longest], -1)
    someone_waited = waits.max(axis=1) > 0
    last = np.bincount(last_rank[someone_waited], minlength=world)
    return RankWaits(wait_s=waits.sum(axis=0), waited_for=waited_for, last=last)
