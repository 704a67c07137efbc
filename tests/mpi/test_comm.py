"""Every collective of both backends against an oracle that needs no communication.

Each rank's input is drawn from a generator seeded by (test seed, rank), so every rank can
rebuild every other rank's input locally and compute the expected result with NumPy in
float64. Float inputs are multiples of 1/8 in [-16, 16): every partial sum over a few ranks
is exact in float32, so the expected result is exact too and compared bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from mc2sim.comm import Communicator, ReduceOp
from mc2sim.errors import ParamInvalidError

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(90)]

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
]


def data(seed: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s input for a test: reproducible on any rank, exactly summable."""
    gen = np.random.default_rng([seed, rank])
    values: np.ndarray
    if dtype.is_floating_point:
        values = gen.integers(-128, 128, size=shape) / 8.0
    elif dtype == torch.uint8:
        values = gen.integers(0, 60, size=shape)
    else:
        values = gen.integers(-30, 30, size=shape)
    return torch.from_numpy(np.asarray(values)).to(dtype)


def as_f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def reduce_np(arrays: list[np.ndarray], op: ReduceOp) -> np.ndarray:
    stacked = np.stack(arrays)
    reduced: np.ndarray = {
        ReduceOp.SUM: stacked.sum(axis=0),
        ReduceOp.PROD: stacked.prod(axis=0),
        ReduceOp.MAX: stacked.max(axis=0),
        ReduceOp.MIN: stacked.min(axis=0),
    }[op]
    return reduced


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected), (actual, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_allreduce_sum_every_dtype(comm: Communicator, dtype: torch.dtype) -> None:
    shape = (5, 3)
    mine = data(1, comm.rank, shape, dtype)
    out = comm.allreduce(mine)
    everyone = [as_f64(data(1, r, shape, dtype)) for r in range(comm.size)]
    expected = torch.from_numpy(reduce_np(everyone, ReduceOp.SUM)).to(dtype)
    assert_same(out, expected)
    assert torch.equal(mine, data(1, comm.rank, shape, dtype)), "input must not change"


@pytest.mark.parametrize("op", [ReduceOp.PROD, ReduceOp.MAX, ReduceOp.MIN])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32], ids=str)
def test_allreduce_other_ops(comm: Communicator, op: ReduceOp, dtype: torch.dtype) -> None:
    def small(rank: int) -> torch.Tensor:
        gen = np.random.default_rng([2, rank])
        return torch.from_numpy(gen.choice([-2.0, -1.0, 1.0, 2.0], size=(7,))).to(dtype)

    out = comm.allreduce(small(comm.rank), op=op.value)
    everyone = [as_f64(small(r)) for r in range(comm.size)]
    assert_same(out, torch.from_numpy(reduce_np(everyone, op)).to(dtype))


def test_half_sums_are_rounded_once_from_float32(comm: Communicator) -> None:
    # bfloat16 spacing at 256 is 2: adding 1s one at a time in bfloat16 would stay at 256;
    # the float32 sum 256 + (size - 1) rounds once, to nearest even.
    mine = torch.tensor([256.0 if comm.rank == 0 else 1.0], dtype=torch.bfloat16)
    out = comm.allreduce(mine)
    expected = torch.tensor([256.0 + comm.size - 1]).to(torch.bfloat16)
    assert_same(out, expected)


def test_allreduce_non_contiguous_input(comm: Communicator) -> None:
    base = data(3, comm.rank, (4, 6), torch.float32)
    view = base.t()[::2]  # (3, 4), strided
    assert not view.is_contiguous()
    out = comm.allreduce(view)
    everyone = [as_f64(data(3, r, (4, 6), torch.float32).t()[::2]) for r in range(comm.size)]
    assert_same(out, torch.from_numpy(reduce_np(everyone, ReduceOp.SUM)).float())


def send_matrix(size: int, rows_of: int) -> list[list[int]]:
    """S[r][q] = rows rank r sends to rank q: uneven, with zeros."""
    return [[((r + 1) * (q + 2) + rows_of) % 4 for q in range(size)] for r in range(size)]


def expected_alltoallv(
    comm: Communicator,
    matrix: list[list[int]],
    seed: int,
    row_shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    pieces = []
    for r in range(comm.size):
        theirs = data(seed, r, (sum(matrix[r]), *row_shape), dtype)
        start = sum(matrix[r][: comm.rank])
        pieces.append(theirs[start : start + matrix[r][comm.rank]])
    return torch.cat(pieces)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_shape", [(), (3,), (2, 5)], ids=["1d", "2d", "3d"])
def test_alltoallv_uneven_and_zero_splits(
    comm: Communicator, dtype: torch.dtype, row_shape: tuple[int, ...]
) -> None:
    matrix = send_matrix(comm.size, rows_of=1)
    assert any(0 in row for row in matrix)
    send = matrix[comm.rank]
    recv = [matrix[r][comm.rank] for r in range(comm.size)]
    mine = data(4, comm.rank, (sum(send), *row_shape), dtype)
    out = comm.alltoallv(mine, send, recv)
    assert_same(out, expected_alltoallv(comm, matrix, 4, row_shape, dtype))


def test_alltoallv_peer_that_receives_nothing(comm: Communicator) -> None:
    matrix = [[0 if q == comm.size - 1 else 2 for q in range(comm.size)] for _ in range(comm.size)]
    send = matrix[comm.rank]
    recv = [matrix[r][comm.rank] for r in range(comm.size)]
    mine = data(5, comm.rank, (sum(send), 4), torch.bfloat16)
    out = comm.alltoallv(mine, send, recv)
    assert out.shape == (sum(recv), 4)
    assert_same(out, expected_alltoallv(comm, matrix, 5, (4,), torch.bfloat16))


def test_alltoallv_non_contiguous_rows(comm: Communicator) -> None:
    matrix = send_matrix(comm.size, rows_of=2)
    send = matrix[comm.rank]
    recv = [matrix[r][comm.rank] for r in range(comm.size)]
    mine = data(6, comm.rank, (3, sum(send)), torch.float16).t()
    out = comm.alltoallv(mine, send, recv)
    pieces = []
    for r in range(comm.size):
        theirs = data(6, r, (3, sum(matrix[r])), torch.float16).t()
        start = sum(matrix[r][: comm.rank])
        pieces.append(theirs[start : start + matrix[r][comm.rank]])
    assert_same(out, torch.cat(pieces).contiguous())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_allgather_every_dtype(comm: Communicator, dtype: torch.dtype) -> None:
    out = comm.allgather(data(7, comm.rank, (2, 3), dtype))
    expected = torch.cat([data(7, r, (2, 3), dtype) for r in range(comm.size)])
    assert_same(out, expected)


def test_allgather_non_contiguous(comm: Communicator) -> None:
    out = comm.allgather(data(8, comm.rank, (3, 2), torch.int32).t())
    expected = torch.cat([data(8, r, (3, 2), torch.int32).t() for r in range(comm.size)])
    assert_same(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_scatter_every_dtype(comm: Communicator, dtype: torch.dtype) -> None:
    shape = (2 * comm.size, 3)
    out = comm.reduce_scatter(data(9, comm.rank, shape, dtype))
    total = reduce_np([as_f64(data(9, r, shape, dtype)) for r in range(comm.size)], ReduceOp.SUM)
    expected = torch.from_numpy(total[2 * comm.rank : 2 * comm.rank + 2]).to(dtype)
    assert_same(out, expected)


def test_iallreduce_and_ialltoallv_in_flight_together(comm: Communicator) -> None:
    shape = (64, 8)
    reductions = [comm.iallreduce(data(10 + i, comm.rank, shape, torch.float32)) for i in range(3)]
    matrix = send_matrix(comm.size, rows_of=3)
    send = matrix[comm.rank]
    recv = [matrix[r][comm.rank] for r in range(comm.size)]
    exchange = comm.ialltoallv(data(13, comm.rank, (sum(send), 5), torch.bfloat16), send, recv)
    deadline = time.monotonic() + 30
    while not exchange.test():
        assert time.monotonic() < deadline, "ialltoallv never completed"
    got = exchange.wait()
    assert got is exchange.wait(), "wait() must return the same result every time"
    assert_same(got, expected_alltoallv(comm, matrix, 13, (5,), torch.bfloat16))
    for i, work in reversed(list(enumerate(reductions))):
        everyone = [as_f64(data(10 + i, r, shape, torch.float32)) for r in range(comm.size)]
        assert_same(work.wait(), torch.from_numpy(reduce_np(everyone, ReduceOp.SUM)).float())
        assert work.test()


def test_iallreduce_half_precision(comm: Communicator) -> None:
    work = comm.iallreduce(data(14, comm.rank, (9,), torch.float16))
    everyone = [as_f64(data(14, r, (9,), torch.float16)) for r in range(comm.size)]
    assert_same(work.wait(), torch.from_numpy(reduce_np(everyone, ReduceOp.SUM)).half())


def test_allgather_object(comm: Communicator) -> None:
    got = comm.allgather_object({"rank": comm.rank, "tag": f"r{comm.rank}"})
    assert got == [{"rank": r, "tag": f"r{r}"} for r in range(comm.size)]


def test_barrier_waits_for_the_last_rank(comm: Communicator) -> None:
    comm.barrier()
    entered = time.time()
    time.sleep(0.05 * comm.rank)
    comm.barrier()
    left = time.time()
    latest_entry = entered + 0.05 * (comm.size - 1)
    assert left >= latest_entry - 0.01


def test_split_into_subgroups(comm: Communicator) -> None:
    color = comm.rank % 2
    # MPI honours any key order: reverse it. torch.distributed keeps the parent's order.
    reverse = comm.backend == "mpi"
    sub = comm.split(color, key=-comm.rank if reverse else comm.rank)
    members = sorted((r for r in range(comm.size) if r % 2 == color), reverse=reverse)
    assert sub.size == len(members)
    assert sub.rank == members.index(comm.rank)
    assert sub.backend == comm.backend

    out = sub.allreduce(data(15, comm.rank, (4,), torch.int64))
    expected = sum(
        (data(15, r, (4,), torch.int64) for r in members), torch.zeros(4, dtype=torch.int64)
    )
    assert_same(out, expected)

    gathered = sub.allgather(torch.tensor([comm.rank]))
    assert gathered.tolist() == members

    # alltoallv inside the sub-group: sub rank i sends i + j rows to sub rank j
    send = [sub.rank + j for j in range(sub.size)]
    recv = [i + sub.rank for i in range(sub.size)]
    out2 = sub.alltoallv(torch.full((sum(send), 2), float(comm.rank)), send, recv)
    expected_rows = [float(members[i]) for i in range(sub.size) for _ in range(recv[i])]
    assert out2[:, 0].tolist() == expected_rows


def test_split_keeps_parent_order_on_equal_keys(comm: Communicator) -> None:
    whole = comm.split(0, key=0)
    assert (whole.rank, whole.size) == (comm.rank, comm.size)
    assert whole.allgather(torch.tensor([comm.rank])).tolist() == list(range(comm.size))


def test_torch_split_refuses_to_reorder(comm: Communicator) -> None:
    if comm.backend == "mpi":
        pytest.skip("MPI_Comm_split honours any key order")
    with pytest.raises(ParamInvalidError, match="must not reorder ranks") as info:
        comm.split(0, key=-comm.rank)
    assert info.value.code == 161002


@pytest.mark.parametrize(
    ("send", "recv", "rule"),
    [
        ("short", None, "one count per rank"),
        ("negative", None, ">= 0"),
        ("wrong_sum", None, "must sum to the rows"),
        (None, "short", "one count per rank"),
    ],
)
def test_alltoallv_rejects_bad_splits(
    comm: Communicator, send: str | None, recv: str | None, rule: str
) -> None:
    n = comm.size
    good = [1] * n
    bad = {"short": [1] * (n - 1), "negative": [-1] + [1] * n, "wrong_sum": [2] * n}
    send_splits = bad[send] if send else good
    recv_splits = bad[recv] if recv else good
    if send == "negative":
        send_splits = [-1, *([1] * (n - 2)), 3]
    with pytest.raises(ParamInvalidError, match=rule) as info:
        comm.alltoallv(torch.zeros(n, 2), send_splits, recv_splits)
    assert info.value.code == 161002
    with pytest.raises(ParamInvalidError, match=rule):
        comm.ialltoallv(torch.zeros(n, 2), send_splits, recv_splits)


def test_rejects_unknown_op_and_dtype_and_ragged_reduce_scatter(comm: Communicator) -> None:
    with pytest.raises(ParamInvalidError, match="op='avg'") as info:
        comm.allreduce(torch.ones(2), op="avg")
    assert info.value.code == 161002
    with pytest.raises(ParamInvalidError, match="t.dtype"):
        comm.allreduce(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ParamInvalidError, match="multiple of the group size"):
        comm.reduce_scatter(torch.ones(comm.size + 1, 2))
    with pytest.raises(ParamInvalidError, match="color"):
        comm.split(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_results_land_in_out(comm: Communicator, dtype: torch.dtype) -> None:
    mine = data(16, comm.rank, (6, 2), dtype)
    out = torch.full((6, 2), 99).to(dtype)
    got = comm.allreduce(mine, out=out)
    assert got is out
    everyone = [as_f64(data(16, r, (6, 2), dtype)) for r in range(comm.size)]
    assert_same(out, torch.from_numpy(reduce_np(everyone, ReduceOp.SUM)).to(dtype))
    work = comm.iallreduce(mine, out=torch.empty_like(out))
    assert_same(work.wait(), out)

    matrix = send_matrix(comm.size, rows_of=4)
    send = matrix[comm.rank]
    recv = [matrix[r][comm.rank] for r in range(comm.size)]
    rows = torch.empty((sum(recv), 3), dtype=dtype)
    got = comm.alltoallv(data(17, comm.rank, (sum(send), 3), dtype), send, recv, out=rows)
    assert got is rows
    assert_same(rows, expected_alltoallv(comm, matrix, 17, (3,), dtype))
    strided = torch.empty((3, sum(recv)), dtype=dtype).t()  # not contiguous: copied into
    work = comm.ialltoallv(data(17, comm.rank, (sum(send), 3), dtype), send, recv, out=strided)
    assert work.wait() is strided
    assert_same(strided.contiguous(), rows)


def test_out_of_the_wrong_shape_or_dtype_is_rejected(comm: Communicator) -> None:
    with pytest.raises(ParamInvalidError, match="result's shape \\(2,\\)") as info:
        comm.allreduce(torch.ones(2), out=torch.empty(3))
    assert info.value.code == 161002
    with pytest.raises(ParamInvalidError, match="dtype torch.float32"):
        comm.allreduce(torch.ones(2), out=torch.empty(2, dtype=torch.float64))
    splits = [1] * comm.size
    with pytest.raises(ParamInvalidError, match="out="):
        comm.alltoallv(torch.ones(comm.size, 2), splits, splits, out=torch.empty(comm.size, 3))


def test_16bit_reductions_in_flight_never_share_scratch(comm: Communicator) -> None:
    # several float16/bfloat16 reductions in flight at once, then repeated: the float32
    # scratch each one sums in is reused only once it is free
    for _ in range(3):
        works = [
            (i, dtype, comm.iallreduce(data(30 + i, comm.rank, (50 + 10 * i, 3), dtype)))
            for i, dtype in enumerate([torch.bfloat16, torch.float16, torch.bfloat16])
        ]
        for i, dtype, work in reversed(works):
            shape = (50 + 10 * i, 3)
            everyone = [as_f64(data(30 + i, r, shape, dtype)) for r in range(comm.size)]
            expected = torch.from_numpy(reduce_np(everyone, ReduceOp.SUM)).to(dtype)
            assert_same(work.wait(), expected)


def test_measure_progress_finds_how_each_backend_progresses(comm: Communicator) -> None:
    # MPICH (no progress thread) advances a nonblocking collective only inside its calls:
    # most of it is left after its ranks computed; gloo's threads finish it meanwhile where
    # they find a core (4 ranks computing on 2 cores starve them: 79% left, polled as far as
    # the model goes, so no claim there)
    import os

    from mc2sim.study.calibrate import POLLED_SHARE, measure_progress

    share = measure_progress(comm, 9)
    assert share == comm.allgather_object(share)[0]  # every rank decides alike
    if comm.backend == "mpi":
        assert share > POLLED_SHARE
    elif comm.size <= len(os.sched_getaffinity(0)):  # a core for every rank
        assert share < POLLED_SHARE


def _last_rank_busy_then(comm: Communicator, measure: Callable[[], object]) -> float:
    """The last rank sleeps 0.3 s before ``measure`` (every rank calls it); when it was done."""
    if comm.rank == comm.size - 1:
        time.sleep(0.3)  # still at what came before (a fit of the contention, say)
    done = time.monotonic()
    measure()
    return float(max(comm.allgather_object(done)))


def test_the_speed_probe_waits_for_every_rank_before_rank_0_times_it(
    comm: Communicator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rank 0 times the probe alone: a rank still working would share its core (4 ranks here
    # read half the machine's speed after a fit that every rank computes)
    from mc2sim.study import measure

    started: list[float] = []

    def matmul_tflops() -> float:  # notes when the timing starts
        started.append(time.monotonic())
        return 0.5

    monkeypatch.setattr(measure, "matmul_tflops", matmul_tflops)
    got: list[float] = []
    last_done = _last_rank_busy_then(comm, lambda: got.append(measure.probe_tflops(comm)))
    assert got == [0.5]  # rank 0's, on every rank
    if comm.rank == 0:
        assert len(started) == 1 and started[0] >= last_done
    else:
        assert not started


def test_the_independent_figures_wait_for_every_rank_before_rank_0_times_them(
    comm: Communicator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mc2sim.study import calibrate, measure

    started: list[float] = []
    monkeypatch.setattr(calibrate, "UPCAST_ELEMENTS", 1024)

    def matmul_tflops() -> float:  # notes when the timing starts
        started.append(time.monotonic())
        return 0.5

    monkeypatch.setattr(measure, "matmul_tflops", matmul_tflops)
    got: list[object] = []
    last_done = _last_rank_busy_then(
        comm, lambda: got.append(calibrate.measure_independent(comm, 1))
    )
    assert got[0].matmul_tflops == 0.5  # type: ignore[attr-defined]
    if comm.rank == 0:
        assert len(started) == 1 and started[0] >= last_done


def test_measure_waiting_reads_how_a_busy_rank_shares_its_core(comm: Communicator) -> None:
    # half the ranks compute while the others wait in the communicator. With a core per
    # rank a busy one has its core to itself; MPICH's waiting ranks poll, so where ranks
    # outnumber cores (4 on this 2-core machine: 0.53) a busy one gets about its share
    import os

    from mc2sim.study.calibrate import measure_waiting, sharing_of
    from mc2sim.topology import CoreSharing

    got = measure_waiting(comm, 5)
    assert got == comm.allgather_object(got)[0]  # every rank decides alike
    assert 0 < got <= 1
    cores = len(os.sched_getaffinity(0))
    if comm.size <= cores:
        assert got > 0.75
    elif comm.backend == "mpi" and comm.size >= 2 * cores:
        share = cores / comm.size
        assert sharing_of(got, share) is CoreSharing.PROCESSOR


def test_measure_duplex_agrees_on_every_rank_and_names_the_nearest_duplex(
    comm: Communicator,
) -> None:
    # Which duplex the ratios read is the machine's, not the code's: MPICH's 2-rank pairs
    # read full (two-way 0.96-1.14x one-way) in quiet hours here and half on a slow evening,
    # and 4 ranks on 2 cores swing between them; the reading is checked against the ratios
    from mc2sim.study.calibrate import DUPLEX_BYTES, measure_duplex, nearest_duplex

    measured = measure_duplex(comm, 9)
    assert measured == comm.allgather_object(measured)[0]
    assert min(measured.one_way_s, measured.both_ways_s, measured.one_to_all_s) > 0
    # no exchange of DUPLEX_BYTES beats a memcpy of them at 100 GB/s
    assert measured.one_way_s > DUPLEX_BYTES / 100e9
    both, spread = (
        measured.both_ways_s / measured.one_way_s,
        measured.one_to_all_s / measured.one_way_s,
    )
    assert measured.duplex is nearest_duplex(both, spread, comm.size)
