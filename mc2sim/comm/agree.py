"""Agreement across ranks: on parameter checks, and on what every rank must pass alike.

A rank that raised alone while the others entered a collective would leave them waiting
forever. Every multi-rank operator therefore checks its parameters locally, then calls
:func:`agree`, and only then moves data. Arguments valid on each rank can still differ
between ranks where they must not (a tiling, a dtype, a dimension): each op names those,
with the rule, in a :class:`MustMatch` during its checks, and :func:`agree` compares them in
the same collective. The fast path (nobody failed, everyone matches) costs one allreduce of
three int64: the lowest failing rank, and the minimum of a digest of what must match and of
its negation (one allgather of the three numbers over a communicator of objects alone,
:class:`~mc2sim.comm.objects.ObjectCommunicator`). After a failure the lowest failing rank's
error is sent to everyone; after a mismatch every rank's values are gathered and every rank
raises the same error naming the parameter, the value on each disagreeing rank and the rule.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from mc2sim.comm.watchdog import collectives_named, current_op
from mc2sim.errors import AclnnError, ParamInvalidError

if TYPE_CHECKING:
    from mc2sim.comm.objects import ObjectCommunicator

__all__ = ["MustMatch", "agree", "agreed", "disagreement"]

#: One rank's entry: (parameter, its value there, why every rank must pass the same).
Entry = tuple[str, object, str]


class MustMatch:
    """What every rank of a group must pass alike, gathered during an op's checks.

    Values are plain data (str, int, float, bool, None and tuples of them) whose ``repr``
    is the same on every rank for the same value. The op's name, from
    :func:`mc2sim.comm.watchdog.current_op`, comes first.

    Example::

        with agreed(comm) as same:
            ...
            same("tiling", tiling.describe(), "the ranks run one schedule of collectives")
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        op = current_op()
        self.entries: list[Entry] = (
            [] if op is None else [("op", op, "every rank of the group calls the same op")]
        )

    def __call__(self, name: str, value: object, why: str) -> None:
        """Require ``value`` of parameter ``name`` to be the same on every rank, because ``why``."""
        self.entries.append((name, value, why))

    def digest(self) -> int:
        """A 62-bit digest of the names and values (the same on every rank for the same ones)."""
        text = repr([(name, value) for name, value, _ in self.entries]).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 2


def agree(
    comm: ObjectCommunicator, error: AclnnError | None, same: MustMatch | None = None
) -> None:
    """Raise, on every rank, the error of the lowest failing rank, or of a mismatch across ranks.

    Every rank of ``comm`` must call this, passing the error its own checks found (or
    ``None``) and what must match. An error raised everywhere has the class, code and
    message of the lowest failing rank's error, and its ``rank`` attribute names that rank.
    When no rank failed but ``same`` differs between ranks, every rank raises the
    :func:`disagreement` error.

    Args:
        comm: the group whose ranks must agree.
        error: this rank's error, or ``None`` when its checks passed.
        same: what every rank must pass alike (``None``: nothing).

    Raises:
        AclnnError: on every rank, when any rank passed an error.
        ParamInvalidError: on every rank, when a value that must match differs.

    """
    mine = comm.size if error is None else comm.rank
    digest = 0 if same is None else same.digest()
    with collectives_named("agree"):
        first, low, minus_high = _minima(comm, (mine, digest, -digest))
        if first == comm.size:
            if low == -minus_high:
                return
            entries = comm.allgather_object([] if same is None else same.entries)
            mismatch = disagreement(entries)
            if mismatch is None:  # pragma: no cover - equal values give equal digests
                return
            raise mismatch
        errors = comm.allgather_object(error if comm.rank == first else None)
    chosen: AclnnError = error if (comm.rank == first and error is not None) else errors[first]
    chosen.rank = first
    raise chosen


def _minima(comm: ObjectCommunicator, values: tuple[int, ...]) -> tuple[int, ...]:
    """Each of ``values``' minimum over the ranks.

    One allreduce of int64 on a communicator of tensors; one allgather of the numbers on a
    communicator of objects alone (which has no ``allreduce``).
    """
    allreduce = getattr(comm, "allreduce", None)
    if allreduce is None:
        return tuple(min(column) for column in zip(*comm.allgather_object(values), strict=True))
    import torch  # here, so that importing mc2sim.comm needs no torch

    return tuple(int(v) for v in allreduce(torch.tensor(values, dtype=torch.int64), op="min"))


def disagreement(entries: Sequence[Sequence[Entry]]) -> ParamInvalidError | None:
    """The error naming the first parameter whose value differs between ranks, or ``None``.

    The reference value of a parameter is the one most ranks hold (ties: the lowest rank's);
    the error's value maps each other rank to its value, and its ``rank`` is the lowest of
    them. A parameter one rank did not name at all counts as ``None`` there.

    Args:
        entries: every rank's :class:`MustMatch` entries, in rank order.

    Returns:
        The ``ParamInvalidError`` (161002) every rank raises, or ``None`` when all match.

    """
    names: dict[str, str] = {}
    for rank_entries in entries:
        for name, _, why in rank_entries:
            names.setdefault(name, why)
    values = [{name: value for name, value, _ in rank_entries} for rank_entries in entries]
    for name, why in names.items():
        seen = [rank_values.get(name) for rank_values in values]
        keys = [repr(v) for v in seen]
        if len(set(keys)) == 1:
            continue
        counts = Counter(keys)
        top = max(counts.values())
        reference = next(k for k in keys if counts[k] == top)  # the lowest rank among ties
        holders = [r for r, k in enumerate(keys) if k == reference]
        others = {r: v for r, v in enumerate(seen) if keys[r] != reference}
        error = ParamInvalidError(
            name,
            others,
            f"must be the same on every rank ({seen[holders[0]]!r} on {_ranks(holders)}): {why}",
        )
        error.rank = min(others)
        return error
    return None


def _ranks(ranks: list[int]) -> str:
    """``rank 0``, ``ranks 0, 2``, ``ranks 0-3``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(str(r) for r in ranks)


@contextlib.contextmanager
def agreed(comm: ObjectCommunicator) -> Iterator[MustMatch]:
    """Run parameter checks in the body, then :func:`agree` on their outcome.

    An ``AclnnError`` raised in the body is held back until every rank has finished its
    checks; then every rank raises the lowest failing rank's error. What the body names in
    the yielded :class:`MustMatch` must be the same on every rank, or every rank raises the
    same error naming it. Other exceptions are bugs, not parameter errors, and propagate at
    once (``mc2sim.runtime`` aborts the job).

    Example::

        with agreed(comm) as same:
            check_gmm_shapes(...)
            same("e", e, "every rank holds the same number of local experts")
        # every rank gets here, or every rank raised the same error
    """
    same = MustMatch()
    error: AclnnError | None = None
    try:
        yield same
    except AclnnError as exc:
        error = exc
    agree(comm, error, same)
