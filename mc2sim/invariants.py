"""Cross-rank invariants that the Ascend operators never check, checked on real ranks.

GroupedMatMulAlltoAllv and AlltoAllvGroupedMatMul take, on every rank, ``send_counts`` and
``recv_counts`` of length ``e * ep_world_size``: ``send_counts[q*e + j]`` rows of local expert
``j`` go to rank ``q``, and ``recv_counts[r*e + j]`` rows of expert ``j`` come from rank ``r``.
They are consistent only if

    recv_counts on rank q, at r*e + j  ==  send_counts on rank r, at q*e + j

for every receiver q, sender r and expert j. Nothing on one rank can verify it, and the
hardware operator does not: a violation gives garbage or a hang. :func:`check_counts` checks
it and raises the same error on every rank: one allreduce agrees on the local checks and on
``e`` and the lengths of the counts (so that the allgather that follows moves equal sizes from
every rank), then one allgather of the counts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import numpy as np

from mc2sim.comm.watchdog import in_op
from mc2sim.errors import ParamInvalidError

if TYPE_CHECKING:
    from mc2sim.comm import Communicator

__all__ = [
    "check_counts",
    "check_counts_local",
    "check_counts_table",
    "counts_invariant",
    "counts_mismatch",
]

_INT64_MAX = 2**63 - 1


def check_counts_local(
    send_counts: Sequence[int], recv_counts: Sequence[int], e: int, world_size: int
) -> tuple[list[int], list[int]]:
    """Check what one rank can check alone: lengths, integer values, signs.

    Args:
        send_counts: rows this rank sends, indexed ``dest_rank * e + local_expert``.
        recv_counts: rows this rank receives, indexed ``src_rank * e + local_expert``.
        e: local experts per rank.
        world_size: ranks in the expert-parallel group.

    Returns:
        ``(send, recv)`` as lists of Python ints.

    Raises:
        ParamInvalidError: ``e`` < 1, counts that are not a flat sequence of integers, a
            length other than ``e * world_size``, a count < 0 or beyond int64.

    """
    if not isinstance(e, int) or isinstance(e, bool) or e < 1:
        raise ParamInvalidError("e", e, "local experts per rank must be an int >= 1")
    out: list[list[int]] = []
    for name, counts in (("send_counts", send_counts), ("recv_counts", recv_counts)):
        values = _ints(name, counts)
        if len(values) != e * world_size:
            raise ParamInvalidError(
                f"len({name})",
                len(values),
                f"must be e * ep_world_size = {e} * {world_size} = {e * world_size}",
            )
        for i, v in enumerate(values):
            if v < 0:
                raise ParamInvalidError(f"{name}[{i}]", v, "counts must be >= 0")
            if v > _INT64_MAX:
                raise ParamInvalidError(f"{name}[{i}]", v, "counts must fit in int64")
        out.append(values)
    return out[0], out[1]


def _ints(name: str, counts: Sequence[int]) -> list[int]:
    """``counts`` as Python ints: a list, tuple, 1-D tensor or 1-D array of integers."""
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if isinstance(counts, np.ndarray) or (torch is not None and isinstance(counts, torch.Tensor)):
        if counts.ndim != 1:
            raise ParamInvalidError(
                f"{name}.shape", tuple(counts.shape), "must be 1-D: one count per (rank, expert)"
            )
        counts = counts.tolist()
    elif isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
        raise ParamInvalidError(
            name, type(counts).__name__, "must be a sequence of ints (list, tuple, 1-D tensor)"
        )
    values = []
    for i, v in enumerate(counts):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ParamInvalidError(f"{name}[{i}]", v, "counts must be integers")
        values.append(int(v))
    return values


def check_counts_table(
    send_counts: object, recv_counts: object, experts_per_rank: object
) -> tuple[np.ndarray, np.ndarray]:
    """Check every rank's counts, given together (a row per rank), without a communicator.

    Each row must pass :func:`check_counts_local` (the rules every rank applies to its own
    counts in :func:`check_counts`, int64 bound included), and the tables must have one row
    per rank. ``mc2sim check-counts`` reads a dump through this.

    Args:
        send_counts: a list per rank of its send counts, ``dest_rank * e + local_expert``.
        recv_counts: a list per rank of its receive counts, ``src_rank * e + local_expert``.
        experts_per_rank: local experts per rank, ``e``.

    Returns:
        ``(send, recv)`` as int64 arrays of shape ``(ranks, ranks * e)``, ready for
        :func:`counts_mismatch`.

    Raises:
        ParamInvalidError: naming the table, rank and index, e.g. ``send_counts[1][3]=-1:
            counts must be >= 0``.

    """
    tables: list[Sequence[object]] = []
    for name, table in (("send_counts", send_counts), ("recv_counts", recv_counts)):
        if isinstance(table, (str, bytes)) or not isinstance(table, Sequence) or not table:
            raise ParamInvalidError(
                name, table, "must be a non-empty list holding a list of counts per rank"
            )
        tables.append(table)
    world = len(tables[0])
    if len(tables[1]) != world:
        raise ParamInvalidError(
            "len(recv_counts)", len(tables[1]), f"must be the ranks of send_counts ({world})"
        )
    rows: tuple[list[list[int]], list[list[int]]] = ([], [])
    for r in range(world):
        for name, table in zip(("send_counts", "recv_counts"), tables, strict=True):
            row = table[r]
            if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
                raise ParamInvalidError(f"{name}[{r}]", row, "must be a list of counts")
        try:
            send, recv = check_counts_local(
                cast("Sequence[int]", tables[0][r]),
                cast("Sequence[int]", tables[1][r]),
                cast(int, experts_per_rank),
                world,
            )
        except ParamInvalidError as err:
            param = "experts_per_rank" if err.param == "e" else _of_rank(err.param, r)
            raise ParamInvalidError(param, err.value, err.rule) from None
        rows[0].append(send)
        rows[1].append(recv)
    return np.array(rows[0], dtype=np.int64), np.array(rows[1], dtype=np.int64)


def _of_rank(param: str, rank: int) -> str:
    """``send_counts[3]`` -> ``send_counts[rank][3]``; ``len(send_counts)`` likewise."""
    for name in ("send_counts", "recv_counts"):
        if name in param:
            return param.replace(name, f"{name}[{rank}]", 1)
    return param


def counts_mismatch(send: np.ndarray, recv: np.ndarray, e: int) -> tuple[int, int, int] | None:
    """Return the first ``(receiver q, sender r, expert j)`` that breaks the invariant, or None.

    Args:
        send: every rank's send_counts, shape (W, W*e): ``send[r, q*e + j]``.
        recv: every rank's recv_counts, shape (W, W*e): ``recv[q, r*e + j]``.
        e: local experts per rank.

    Returns:
        The first offending triple in (q, r, j) order, or ``None`` when all agree.

    """
    world = send.shape[0]
    sent = send.reshape(world, world, e)  # [r, q, j]
    received = recv.reshape(world, world, e).transpose(1, 0, 2)  # [q, r, j] -> [r, q, j]
    bad = np.argwhere((sent != received).transpose(1, 0, 2))  # rows of (q, r, j), sorted
    if len(bad) == 0:
        return None
    q, r, j = (int(v) for v in bad[0])
    return q, r, j


@in_op("check_counts")
def check_counts(
    comm: Communicator, send_counts: Sequence[int], recv_counts: Sequence[int], e: int
) -> None:
    """Check the counts invariant across all ranks of ``comm``; raise alike on every rank.

    Every rank of ``comm`` (the expert-parallel group) must call it. Usable on counts from
    the user's own router as well as mc2sim's.

    Args:
        comm: the expert-parallel group; its size is ``ep_world_size``.
        send_counts: this rank's send counts, ``dest_rank * e + local_expert``.
        recv_counts: this rank's receive counts, ``src_rank * e + local_expert``.
        e: local experts per rank.

    Raises:
        ParamInvalidError: on every rank, naming the first offending receiver q, sender r
            and expert j with both values; or the first rank's malformed counts; or ``e``
            or a length that differs between ranks, with each rank's value.

    """
    from mc2sim.comm.agree import agreed

    with agreed(comm) as same:
        send, recv = check_counts_local(send_counts, recv_counts, e, comm.size)
        same("e", e, "every rank holds the same number of local experts")
        same("len(send_counts)", len(send), "the counts of every rank are gathered together")
        same("len(recv_counts)", len(recv), "the counts of every rank are gathered together")
    counts_invariant(comm, send, recv, e)


def counts_invariant(comm: Communicator, send: list[int], recv: list[int], e: int) -> None:
    """Check the counts invariant, for ranks that already agreed on ``e`` and valid counts.

    :func:`check_counts` without its agreement: for an op whose own agreement covered
    :func:`check_counts_local` and ``e``, so every rank gathers ``2 * e * size`` counts.

    Args:
        comm: the expert-parallel group.
        send: this rank's send counts, checked by :func:`check_counts_local`.
        recv: this rank's receive counts, likewise.
        e: local experts per rank, the same on every rank.

    Raises:
        ParamInvalidError: on every rank, naming the first offending receiver q, sender r
            and expert j with both values.

    """
    import torch

    both = comm.allgather(torch.tensor([send + recv], dtype=torch.int64)).numpy()
    width = e * comm.size
    first = counts_mismatch(both[:, :width], both[:, width:], e)
    if first is None:
        return
    q, r, j = first
    got = int(both[q, width + r * e + j])
    sent = int(both[r, q * e + j])
    error = ParamInvalidError(
        f"recv_counts[{r * e + j}] on rank {q}",
        got,
        f"must equal send_counts[{q * e + j}] on rank {r} ({sent}): rows of local expert {j} "
        f"that rank {r} sends to rank {q} (receiver q={q}, sender r={r}, expert j={j})",
    )
    error.rank = q  # every rank raises it alike (the gathered counts): rank 0 alone says so
    raise error
