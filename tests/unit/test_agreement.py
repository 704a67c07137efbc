"""Agreement across ranks, on ranks that are threads: errors, what must match, the counts.

The group is :class:`ThreadGroup`: real collectives between threads that refuse, as MPI
cannot, a collective whose ranks passed different sizes. So a ragged gather is a test
failure here, where under MPI it would be a hang, a truncated message or garbage.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mc2sim.comm import MustMatch, agreed
from mc2sim.comm.agree import disagreement
from mc2sim.comm.watchdog import op_call
from mc2sim.errors import ParamInvalidError, ParamNullptrError
from mc2sim.invariants import check_counts, check_counts_local

from .thread_group import ThreadGroup, ThreadRank

WHY = "the ranks run one schedule together"


def entries(*per_rank: dict[str, object]) -> list[list[tuple[str, object, str]]]:
    return [[(name, value, WHY) for name, value in values.items()] for values in per_rank]


# -- which rank disagrees, and what the error says -------------------------------------------


def test_no_disagreement_when_every_rank_passes_the_same() -> None:
    same = {"op": "mm_all_reduce", "m": 8, "tiling": "hardware"}
    assert disagreement(entries(same, same, same)) is None
    assert disagreement([]) is None


def test_the_odd_rank_out_is_named_with_its_value_and_the_majority_value() -> None:
    base = {"m": 8, "tiling": "hardware"}
    error = disagreement(entries(base, base, base, {"m": 8, "tiling": "tiles=2"}))
    assert error is not None
    assert error.code == 161002
    assert error.param == "tiling"
    assert error.value == {3: "tiles=2"}
    assert error.rank == 3
    assert str(error) == (
        f"tiling={{3: 'tiles=2'}}: must be the same on every rank ('hardware' on ranks 0-2): {WHY}"
    )


def test_every_disagreeing_rank_is_named_with_its_own_value() -> None:
    error = disagreement(entries({"m": 8}, {"m": 4}, {"m": 8}, {"m": 2}, {"m": 8}))
    assert error is not None
    assert error.value == {1: 4, 3: 2}
    assert error.rank == 1
    assert "(8 on ranks 0, 2, 4)" in str(error)


def test_rank_zero_can_be_the_odd_one_out() -> None:
    error = disagreement(entries({"e": 3}, {"e": 2}, {"e": 2}))
    assert error is not None
    assert error.value == {0: 3}
    assert error.rank == 0
    assert "(2 on ranks 1, 2)" in str(error)


def test_a_tie_takes_the_lowest_ranks_value_as_the_reference() -> None:
    error = disagreement(entries({"dtype": "bfloat16"}, {"dtype": "float16"}))
    assert error is not None
    assert error.value == {1: "float16"}
    assert "('bfloat16' on rank 0)" in str(error)


def test_the_first_parameter_that_differs_is_named() -> None:
    error = disagreement(entries({"m": 8, "n": 4, "k": 16}, {"m": 8, "n": 5, "k": 32}))
    assert error is not None and error.param == "n"


def test_a_parameter_one_rank_did_not_name_counts_as_none_there() -> None:
    error = disagreement(entries({"op": "gmm_alltoallv", "e": 2}, {"op": "gmm_alltoallv"}))
    assert error is not None
    assert error.param == "e" and error.value == {1: None}


def test_values_of_different_types_differ() -> None:
    error = disagreement(entries({"validate_counts": True}, {"validate_counts": 1}))
    assert error is not None and error.value == {1: 1}


def test_the_error_travels_between_ranks_unchanged() -> None:
    import pickle

    error = disagreement(entries({"m": 8}, {"m": 4}))
    assert error is not None
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ParamInvalidError and str(again) == str(error)


def test_the_digest_is_of_names_and_values_and_includes_the_op() -> None:
    def digest(op: str | None, **values: object) -> int:
        with op_call(op) if op else contextlib.nullcontext():
            same = MustMatch()
        for name, value in values.items():
            same(name, value, WHY)
        return same.digest()

    assert digest("mm_all_reduce", m=8) == digest("mm_all_reduce", m=8)
    assert digest("mm_all_reduce", m=8) != digest("mm_all_reduce", m=9)
    assert digest("mm_all_reduce", m=8) != digest("all_gather_matmul", m=8)
    assert digest(None, m=8) != digest(None, n=8)
    assert 0 <= digest(None, m=8) < 2**62  # its negation fits in int64


# -- agreed() on a group of threads ----------------------------------------------------------


def outcomes(results: list[Any]) -> set[str]:
    """Each rank's outcome in words: the error's class and message, or 'ok'."""
    return {
        "ok" if not isinstance(r, BaseException) else f"{type(r).__name__}: {r}" for r in results
    }


@pytest.mark.parametrize("size", [2, 3, 4])
def test_a_mismatch_on_the_last_rank_raises_the_same_error_on_every_rank(size: int) -> None:
    group = ThreadGroup(size)

    def call(comm: ThreadRank) -> None:
        with op_call("mm_all_reduce"), agreed(comm) as same:
            same("m", 8, "every rank's (m, n) block is summed")
            same("tiling", "tiles=2" if comm.rank == size - 1 else "hardware", WHY)

    results = group.run(call)
    assert all(isinstance(r, ParamInvalidError) for r in results)
    holders = {2: "rank 0", 3: "ranks 0, 1", 4: "ranks 0-2"}[size]
    assert outcomes(results) == {
        f"ParamInvalidError: tiling={{{size - 1}: 'tiles=2'}}: must be the same on every rank "
        f"('hardware' on {holders}): {WHY}"
    }
    assert {r.rank for r in results if isinstance(r, ParamInvalidError)} == {size - 1}
    assert group.calls == 2, "one allreduce, then one gather of the values to name them"


def test_matching_ranks_pay_one_collective() -> None:
    group = ThreadGroup(3)

    def call(comm: ThreadRank) -> None:
        with agreed(comm) as same:
            same("m", 8, WHY)

    assert outcomes(group.run(call)) == {"ok"}
    assert group.calls == 1


def test_a_parameter_error_wins_over_a_mismatch() -> None:
    group = ThreadGroup(3)

    def call(comm: ThreadRank) -> None:
        with agreed(comm) as same:
            same("m", comm.rank, WHY)  # differs everywhere
            if comm.rank == 2:
                raise ParamNullptrError("x1", None, "is required")

    results = group.run(call)
    assert outcomes(results) == {"ParamNullptrError: x1=None: is required"}


# -- check_counts: ragged and malformed input never reaches the gather ------------------------


def consistent(world: int, e: int) -> tuple[list[list[int]], list[list[int]]]:
    send = [[(r + 2 * q + j) % 3 for q in range(world) for j in range(e)] for r in range(world)]
    recv = [[send[r][q * e + j] for r in range(world) for j in range(e)] for q in range(world)]
    return send, recv


def test_check_counts_on_threads_passes_consistent_counts() -> None:
    send, recv = consistent(3, 2)
    group = ThreadGroup(3)
    assert outcomes(group.run(lambda c: check_counts(c, send[c.rank], recv[c.rank], 2))) == {"ok"}


def test_a_different_expert_count_on_one_rank_is_named_not_gathered() -> None:
    # rank 2 has 3 experts and counts of length 3 * 3: valid alone, ragged across ranks
    send, recv = consistent(3, 2)
    send3, recv3 = consistent(3, 3)
    group = ThreadGroup(3)

    def call(comm: ThreadRank) -> None:
        e = 3 if comm.rank == 2 else 2
        mine = (send3, recv3) if comm.rank == 2 else (send, recv)
        check_counts(comm, mine[0][comm.rank], mine[1][comm.rank], e)

    results = group.run(call)
    assert outcomes(results) == {
        "ParamInvalidError: e={2: 3}: must be the same on every rank (2 on ranks 0, 1): "
        "every rank holds the same number of local experts"
    }


JUNK = st.one_of(
    st.integers(min_value=-3, max_value=5),
    st.integers(min_value=2**63 - 2, max_value=2**64),
    st.booleans(),
    st.floats(allow_nan=True),
    st.none(),
    st.text(max_size=2),
    st.lists(st.integers(0, 3), max_size=2),
)
COUNTS = st.one_of(
    st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=14),
    st.lists(JUNK, max_size=10),
    st.tuples(st.integers(0, 4), st.integers(0, 4)),
    st.builds(lambda xs: torch.tensor(xs, dtype=torch.int64), st.lists(st.integers(0, 4))),
    st.builds(lambda xs: np.asarray(xs, dtype=np.float64), st.lists(st.integers(0, 4))),
    st.builds(lambda n: torch.zeros(n, 2, dtype=torch.int64), st.integers(0, 3)),
    st.text(max_size=4),
    st.integers(),
    st.none(),
    st.sets(st.integers(0, 3)),
)
EXPERTS = st.one_of(st.integers(min_value=-1, max_value=3), st.booleans(), st.just(2.0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    world=st.integers(min_value=2, max_value=4),
    ranks=st.lists(st.tuples(COUNTS, COUNTS, EXPERTS), min_size=4, max_size=4),
    faithful=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_check_counts_on_any_input_raises_one_error_everywhere_or_passes_everywhere(
    world: int, ranks: list[tuple[Any, Any, Any]], faithful: list[bool]
) -> None:
    # each rank passes either consistent counts or junk of its own: lists of different
    # lengths, negative, bool, float, huge, nested, None; the outcome is the same on every
    # rank, never a ragged gather, never a hang
    good_send, good_recv = consistent(world, 2)
    group = ThreadGroup(world, timeout=5.0)

    def call(comm: ThreadRank) -> None:
        r = comm.rank
        if faithful[r]:
            check_counts(comm, good_send[r], good_recv[r], 2)
        else:
            send, recv, e = ranks[r]
            check_counts(comm, send, recv, e)

    results = group.run(call)
    kinds = {type(r) for r in results}
    assert kinds <= {type(None), ParamInvalidError}, results
    assert len(outcomes(results)) == 1, outcomes(results)
    if all(faithful[:world]):
        assert outcomes(results) == {"ok"}


@settings(max_examples=200, deadline=None)
@given(send=COUNTS, recv=COUNTS, e=EXPERTS, world=st.integers(1, 4))
def test_check_counts_local_accepts_or_raises_param_invalid_never_anything_else(
    send: Any, recv: Any, e: Any, world: int
) -> None:
    try:
        s, r = check_counts_local(send, recv, e, world)
    except ParamInvalidError:
        return
    assert isinstance(e, int) and not isinstance(e, bool) and e >= 1
    assert len(s) == len(r) == e * world
    assert all(type(v) is int and 0 <= v < 2**63 for v in s + r)


@pytest.mark.parametrize(
    ("send", "match"),
    [
        ([0, 1, True, 0], r"send_counts\[2\]=True: counts must be integers"),
        ([0, 1, 1.0, 0], r"send_counts\[2\]=1.0: counts must be integers"),
        ([0, -1, 0, 0], r"send_counts\[1\]=-1: counts must be >= 0"),
        ([0, 2**63, 0, 0], r"send_counts\[1\]=9223372036854775808: counts must fit in int64"),
        ([[0, 1], [0, 1]], r"send_counts\[0\]=\[0, 1\]: counts must be integers"),
        (torch.zeros(2, 2, dtype=torch.int64), r"send_counts.shape=\(2, 2\): must be 1-D"),
        ("0101", r"send_counts='str': must be a sequence of ints"),
        (4, r"send_counts='int': must be a sequence of ints"),
        ({0, 1}, r"send_counts='set': must be a sequence of ints"),
        ([0, 1, 0], r"len\(send_counts\)=3: must be e \* ep_world_size = 2 \* 2 = 4"),
    ],
)
def test_malformed_counts_are_named(send: Any, match: str) -> None:
    with pytest.raises(ParamInvalidError, match=match):
        check_counts_local(send, [0, 0, 0, 0], 2, 2)


def test_thread_group_refuses_a_ragged_collective() -> None:
    # the oracle itself: a gather of different sizes is caught, on every rank
    group = ThreadGroup(2)
    results = group.run(lambda c: c.allgather(torch.zeros(c.rank + 1)))
    assert all(type(r).__name__ == "RaggedCollective" for r in results)
