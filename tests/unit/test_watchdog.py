"""The watchdog in one process: deadlines, labels, the roll call and its line.

Ranks here are Watches joined by an in-memory side channel; the watchdog's ``end`` is a
recorder, so a timeout is observed instead of ending the test run.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

from mc2sim.comm.watchdog import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_STATUS,
    Answer,
    Collective,
    Watch,
    Watchdog,
    collectives_named,
    in_op,
    not_arrived,
    op_call,
    timeout_from_env,
    timeout_line,
)
from mc2sim.errors import ParamInvalidError


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(None, DEFAULT_TIMEOUT_S), ("", DEFAULT_TIMEOUT_S), ("5", 5.0), ("0.5", 0.5), ("inf", 1e999)],
)
def test_timeout_from_env(raw: str | None, seconds: float) -> None:
    env = {} if raw is None else {"MC2SIM_TIMEOUT": raw}
    assert timeout_from_env(env) == seconds


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "nan", "5s"])
def test_a_bad_timeout_is_named(raw: str) -> None:
    with pytest.raises(ParamInvalidError, match=r"MC2SIM_TIMEOUT=.*must be a number of seconds"):
        timeout_from_env({"MC2SIM_TIMEOUT": raw})


def test_collectives_are_numbered_per_communicator_and_labelled_per_op_call() -> None:
    watch = Watch(timeout=1.0)
    assert watch.issue("barrier").label() == "barrier[0]"  # outside any op: its number
    with op_call("gmm_alltoallv"):
        with collectives_named("agree"):
            first = watch.issue("allreduce")
        second = watch.issue("allgather")
        third = watch.issue("alltoallv")
    assert [first.label(), second.label(), third.label()] == [
        "gmm_alltoallv: agree[0]",
        "gmm_alltoallv: allgather[1]",
        "gmm_alltoallv: alltoallv[2]",
    ]
    assert [c.seq for c in (first, second, third)] == [2, 3, 4]
    with op_call("gmm_alltoallv"):  # a new call counts from 0 again
        assert watch.issue("allreduce").label() == "gmm_alltoallv: allreduce[0]"
    assert watch.issued == 5


def test_in_op_labels_every_call_and_keeps_the_signature() -> None:
    watch = Watch(timeout=1.0)

    @in_op("mm_all_reduce")
    def op(x: int) -> Collective:
        """Doc."""
        return watch.issue("allreduce")

    assert op(1).label() == "mm_all_reduce: allreduce[0]"
    assert op(2).label() == "mm_all_reduce: allreduce[0]"
    assert op.__name__ == "op" and op.__doc__ == "Doc."


@pytest.mark.parametrize(
    "name",
    [
        "mm_all_reduce", "all_gather_matmul", "matmul_reduce_scatter", "gmm_alltoallv",
        "alltoallv_gmm", "ifa_decode",
    ],
)  # fmt: skip
def test_every_op_runs_inside_an_op_call_of_its_name(name: str) -> None:
    # a timeout's line names the op through this (a helper placed above it once took it)
    from mc2sim import ops

    fn = getattr(ops, name)
    assert fn.__name__ == name and hasattr(fn, "__wrapped__")
    assert name in [cell.cell_contents for cell in fn.__closure__ or ()]


def test_enter_and_done_mark_the_wait() -> None:
    watch = Watch(timeout=1.0)
    c = watch.enter("barrier")
    assert watch.waiting is not None and watch.waiting[0] == c
    watch.done()
    assert watch.waiting is None
    assert watch.where() == Answer(1, "barrier[0]", pytest.approx(0.0, abs=1.0))


def test_not_arrived_is_who_did_not_answer_or_is_behind() -> None:
    answers = {1: Answer(7, "x", 0.1), 2: Answer(6, "y", 2.0)}
    assert not_arrived(4, 0, 7, answers) == {2: answers[2], 3: None}
    assert not_arrived(2, 1, 3, {0: Answer(9, "z", 0.0)}) == {}


def test_the_line_names_the_op_the_collective_and_the_ranks() -> None:
    c = Collective(seq=9, op="gmm_alltoallv", kind="alltoallv", nth=3, issued_at=0.0)
    line = timeout_line(c, 5.04, {3: None, 1: Answer(5, "gmm_alltoallv: agree[0]", 5.2)})
    assert line.startswith(
        "mc2sim: timeout: gmm_alltoallv: alltoallv[3] waited 5.0 s; ranks not arrived: 3, 1 ("
    )
    assert "rank 3: no answer" in line
    assert "rank 1: last issued gmm_alltoallv: agree[0] 5.2 s ago" in line
    assert "\n" not in line
    assert timeout_line(c, 5.0, {}).endswith(
        "ranks not arrived: none (every rank issued it; it did not complete)"
    )
    assert "ranks not arrived: unknown" in timeout_line(c, 5.0, None)
    assert "ranks not arrived: 12 (rank 12: issued no collective yet)" in timeout_line(
        c, 5.0, {1: Answer(0, None, 0.0)}, world_ranks=[10, 12]
    )


class Channels:
    """In-memory side channels between the Watches of one group."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.asks: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self.answers: dict[int, list[tuple[int, int, Answer]]] = defaultdict(list)

    def of(self, rank: int) -> Channel:
        return Channel(self, rank)


class Channel:
    def __init__(self, hub: Channels, rank: int) -> None:
        self.hub, self.rank, self.size = hub, rank, hub.size
        self.world_ranks = list(range(hub.size))

    def ask(self, seq: int) -> None:
        for r in range(self.size):
            if r != self.rank:
                self.hub.asks[r].append((self.rank, seq))

    def answer(self, dest: int, seq: int, answer: Answer) -> None:
        self.hub.answers[dest].append((self.rank, seq, answer))

    def receive(self) -> tuple[list[tuple[int, int]], list[tuple[int, int, Answer]]]:
        asks, answers = self.hub.asks.pop(self.rank, []), self.hub.answers.pop(self.rank, [])
        return asks, answers


def group(size: int, timeout: float) -> list[Watch]:
    hub = Channels(size)
    return [Watch(timeout=timeout, channel=hub.of(r)) for r in range(size)]


def test_a_rank_behind_and_a_silent_rank_are_named_past_the_deadline() -> None:
    watches = group(4, timeout=0.05)
    ended: list[tuple[str, int]] = []
    for r, w in enumerate(watches[:3]):
        with op_call("gmm_alltoallv"):
            w.issue("allreduce")
            if r < 2:  # ranks 0 and 1 reach the second collective and wait
                w.enter("alltoallv")
    # rank 2 is behind (still computing); rank 3 never answers (exited): nothing serves it
    detector = Watchdog(end=lambda line, code: ended.append((line, code)), grace=0.3)
    detector.add(watches[0])
    time.sleep(0.1)  # past the deadline
    stop = threading.Event()

    def serve_peers() -> None:  # the other ranks' watchdogs answer meanwhile
        while not stop.is_set():
            for w in watches[1:3]:
                Watchdog._serve(w)
            time.sleep(0.01)

    helper = threading.Thread(target=serve_peers)
    helper.start()
    try:
        detector.check()
    finally:
        stop.set()
        helper.join()
    assert len(ended) == 1
    line, code = ended[0]
    assert code == TIMEOUT_STATUS == 3
    assert line.startswith(
        "mc2sim: timeout: gmm_alltoallv: alltoallv[1] waited 0.1 s; ranks not arrived: 2, 3 ("
    )
    assert "rank 2: last issued gmm_alltoallv: allreduce[0]" in line
    assert "rank 3: no answer" in line


def test_no_line_before_the_deadline() -> None:
    watches = group(2, timeout=60.0)
    ended: list[tuple[str, int]] = []
    watches[0].enter("barrier")
    dog = Watchdog(end=lambda line, code: ended.append((line, code)))
    dog.add(watches[0])
    dog.check()
    assert ended == []


def test_a_rank_that_was_asked_first_leaves_the_line_to_the_asker() -> None:
    watches = group(2, timeout=0.01)
    ended: list[tuple[str, int]] = []
    for w in watches:
        w.enter("barrier")  # both wait on collective 1, past the deadline
    watches[1].channel.ask(1)  # type: ignore[union-attr]  # rank 1 called the roll first
    dog = Watchdog(end=lambda line, code: ended.append((line, code)), grace=0.05, defer=0.2)
    dog.add(watches[0])
    time.sleep(0.02)
    start = time.monotonic()
    dog.check()
    assert time.monotonic() - start >= 0.2, "rank 0 waited for rank 1 to end the job"
    assert len(ended) == 1  # and, still alive, ended it itself


def test_without_a_side_channel_the_ranks_are_unknown() -> None:
    watch = Watch(timeout=0.01)
    with op_call("mm_all_reduce"):
        watch.enter("allreduce")
    ended: list[tuple[str, int]] = []
    dog = Watchdog(end=lambda line, code: ended.append((line, code)))
    dog.add(watch)
    time.sleep(0.02)
    dog.check()
    assert len(ended) == 1 and ended[0][1] == 3
    assert "mm_all_reduce: allreduce[0]" in ended[0][0]
    assert "ranks not arrived: unknown" in ended[0][0]
