"""Task times on a described topology: roofline compute and alpha-beta collectives.

Compute: ``max(flops / (peak(dtype) * util(flops)), bytes / memory_bw) + launch``, the
matrix unit's peak scaled by the device's small-tile efficiency curve (the sum instead of the
max on a device whose memory traffic does not overlap its arithmetic); reductions run on the
vector unit. On a calibrated device the int8 and weight-quant matmuls and attention instead
follow their own line through the profile's points (:func:`baselines`), and every kind's time
is corrected by the profile's measured ratio (:func:`compute_times`; a 16-bit float without
points of its own takes the other's: :func:`profiled_dtype`). Where a node's ranks
share fewer CPU cores than there are ranks
(``Device.cores_per_node``), every rank's CPU work (compute, the issue overhead ``o`` of a
collective, a collective's reduction) runs at its share of a core,
``Topology.core_share``, and pays what sharing a core costs on top: a post's colder start
(``Device.shared_issue_us``) and a message's wait for peers off their cores
(``Device.shared_latency_us``). Collectives: each network dimension is ``alpha`` (latency per
message, :func:`message_latency`) and
``beta`` (1 / bandwidth per rank and direction; the wire's ``link_gbps`` where that is
lower), GB = 1e9 bytes. AllReduce and ReduceScatter also add what they receive, at the
device's ``reduce_gbps`` (0: free, the communication engine reduces in line, as on
accelerators; a CPU MPI's reduction loop is most of the difference between a 16-bit AllReduce
and an AlltoAllv there); on a device whose reductions move float32 copies of 16-bit data
(``Device.reductions_in_float32``, a CPU MPI) their transfers carry twice the bytes the plans
count:

* AllReduce: the better of a hierarchical ring (reduce-scatter from the innermost dimension
  outwards, all-gather back; on a full mesh each phase sends to every peer at once) and
  recursive doubling, ceil(log2 r) exchanges of the whole buffer on each dimension of r
  ranks (small messages).
* AllGather / ReduceScatter: the hierarchical phases of the same.
* AlltoAllv on uneven counts: every rank's traffic is split by the dimension that separates
  it from each peer; a rank's time on a dimension is its send and receive bytes there (on a
  full mesh, the busiest single link; on a ring, bytes times the mean hop count over both
  directions) over that dimension's bandwidth, plus one latency per peer it talks to there
  (pairwise exchange); dimensions run at once, so a rank's time is its slowest dimension;
  the collective ends with its busiest rank. How the two ways add is the dimension's
  ``duplex``: the larger (``full``: a NIC, a link), their sum (``half``: one engine copies
  both ways, as a CPU MPI through shared memory) or the receive bytes alone (``receiver``:
  a single-copy transport); a symmetric exchange (the phases below) costs twice its bytes on
  a ``half`` dimension.

A rank's traffic on the dimensions inside its node and across nodes is what
:func:`mc2sim.schedule.traffic.level_bytes` records; phased collectives pay the levels one
after another (each phase waits for the one before), an AlltoAllv its slowest level.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from mc2sim.errors import ParamInvalidError
from mc2sim.schedule.plan import AlltoAllvLoads, Task, TaskKind
from mc2sim.topology import (
    CoreSharing,
    Device,
    Duplex,
    LinkKind,
    NetworkDim,
    ProfilePoint,
    Topology,
)

__all__ = [
    "FLOAT32_COPIED",
    "allgather_time",
    "allreduce_time",
    "alltoallv_time",
    "baselines",
    "loads_alltoallv_time",
    "nonnegative_lstsq",
    "pairs_alltoallv_time",
    "compute_time",
    "compute_times",
    "core_time",
    "issue_time",
    "issue_times",
    "collective_ratio",
    "LINE_KINDS",
    "MEMORY_KINDS",
    "memory_rate",
    "profiled_dtype",
    "profiled_ratio",
    "SIBLING_DTYPES",
    "schedule_wait",
    "spread_factors",
    "expected_max",
    "PEER_MARGIN",
    "roofline_time",
    "rooflines",
    "task_dtype",
    "WARM_FLOOR",
    "reduce_scatter_time",
]

_MATRIX_KINDS = {
    TaskKind.MATMUL,
    TaskKind.GROUPED_MATMUL,
    TaskKind.QUANT_MATMUL,
    TaskKind.WEIGHT_QUANT_MATMUL,
    TaskKind.ATTENTION,  # q.k and p.v run on the matrix unit; the KV read usually dominates
}


def task_dtype(kind: TaskKind, dtype: str) -> str:
    """The dtype a compute task of ``kind`` runs in, in a plan of compute dtype ``dtype``."""
    return "int8" if kind is TaskKind.QUANT_MATMUL else dtype


def roofline_time(device: Device, kind: TaskKind, dtype: str, flops: float, nbytes: float) -> float:
    """Seconds of a compute task on a whole core (or engine) by the roofline alone."""
    return float(rooflines(device, kind, dtype, np.array([flops]), np.array([nbytes]))[0])


def rooflines(
    device: Device, kind: TaskKind, dtype: str, flops: np.ndarray, nbytes: np.ndarray
) -> np.ndarray:
    """:func:`roofline_time` of many tasks of one kind at once (elementwise)."""
    launch = device.launch_us * 1e-6
    flops = np.asarray(flops, dtype=np.float64)
    if kind in _MATRIX_KINDS:
        peak = device.matrix_peak(task_dtype(kind, dtype))
        eff = device.efficiency  # Efficiency.util, elementwise
        if eff.half_flops == 0:
            util = np.full(flops.shape, eff.large_util)
        else:
            util = eff.small_util + (eff.large_util - eff.small_util) * flops / (
                flops + eff.half_flops
            )
        rate = peak * util
    elif kind in (TaskKind.REDUCE, TaskKind.PACK):  # a pack has no FLOPs: memory only
        peak = device.vector_tflops * 1e12
        rate = np.full(flops.shape, peak)
    else:
        raise ParamInvalidError("task.kind", kind, "is not a compute task")
    # a pack (a row gather) moves the bytes it counts; the kernels' passes move more
    traffic = 1.0 if kind is TaskKind.PACK else device.memory_traffic
    memory = np.asarray(nbytes, dtype=np.float64) * traffic / (device.memory_gbps * 1e9)
    arithmetic = flops / rate if peak > 0 else np.zeros(flops.shape)
    whole = np.maximum(arithmetic, memory) if device.memory_overlap else arithmetic + memory
    return whole + launch


LINE_KINDS = frozenset({TaskKind.QUANT_MATMUL, TaskKind.WEIGHT_QUANT_MATMUL, TaskKind.ATTENTION})
"""Compute kinds whose roofline is not fitted on their own kernel (their peaks are other
kernels' or a dtype's): where a device's profile holds at least three points of such a kind
and dtype, the kind's own line through them, ``a + b * flops + c * bytes``, is the
baseline its profile corrects (:func:`baselines`). A CPU's int8 GEMM pays per output element
(the dequantisation) as well as per FLOP: a 537 MFLOP call of ``k`` 256 took 9.6 us per
MFLOP where one of ``k`` 128 took 14.1, which a curve in the roofline's time alone, nearly
the FLOPs, cannot tell apart."""


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (active set: drop the most negative, refit)."""
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sub, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if np.all(sub >= 0):
            coef[active] = sub
            return coef
        active.pop(int(np.argmin(sub)))
    return coef


def _points(device: Device, kind: TaskKind, dtype: str) -> list[ProfilePoint]:
    """The profile's points of one compute kind and dtype."""
    return [p for p in device.profile if p.kind == str(kind) and p.dtype == dtype]


SIBLING_DTYPES = {"float16": "bfloat16", "bfloat16": "float16"}
"""The dtype whose profiled points stand in for a dtype a device's profile has none of, for
a kind (:func:`profiled_dtype`): the other 16-bit float, whose kernels take the same path
(the same matrix unit on an accelerator; the same conversions around float32 arithmetic on
a CPU). The roofline's own peak of the task's dtype still scales its time. ``calibrate``
runs the ops in bfloat16, so a float16 grouped matmul took the bare roofline before: 4 ranks
here, ``make demo``'s float16 expert chunks of 0.11 MFLOP took 180 to 280 us of CPU time
after a call's first task where the roofline gave 93, and the bfloat16 points' ratio gives
163."""


@functools.lru_cache(maxsize=256)
def profiled_dtype(device: Device, kind: TaskKind, dtype: str) -> str:
    """The dtype whose profiled points of ``kind`` correct a task of ``kind`` in ``dtype``.

    ``dtype`` itself where the profile has a point of ``kind`` in it, else its
    :data:`SIBLING_DTYPES` stand-in where the profile has one in that, else ``dtype`` (no
    points: the roofline alone).
    """
    if _points(device, kind, dtype):
        return dtype
    sibling = SIBLING_DTYPES.get(dtype)
    if sibling is not None and _points(device, kind, sibling):
        return sibling
    return dtype


@functools.lru_cache(maxsize=256)
def _own_line(device: Device, kind: TaskKind, dtype: str) -> tuple[float, float, float] | None:
    """The line ``(a, b, c)`` of a :data:`LINE_KINDS` kind through its profiled points.

    Seconds, per FLOP and per byte, of the profile's points of ``kind`` in ``dtype`` (least
    squares on relative error, none negative); None for another kind, fewer than three
    points, or a line without a fixed cost or without a cost per FLOP or byte (one that
    would not grow with the work, beyond the points it was fitted on).
    """
    if kind not in LINE_KINDS:
        return None
    points = _points(device, kind, profiled_dtype(device, kind, dtype))
    if len(points) < 3:
        return None
    seconds = np.array([p.us * 1e-6 for p in points])
    terms = np.array([[1.0, p.flops, p.bytes] for p in points]) / seconds[:, None]
    a, b, c = (float(v) for v in nonnegative_lstsq(terms, np.ones(len(points))))
    return (a, b, c) if a > 0 and (b > 0 or c > 0) else None


def baselines(
    device: Device, kind: TaskKind, dtype: str, flops: np.ndarray, nbytes: np.ndarray
) -> np.ndarray:
    """Seconds of tasks of one kind before the profile's correction, on a whole core.

    The kind's own line through its profiled points (:data:`LINE_KINDS`), else the roofline
    (:func:`rooflines`). ``dtype`` is the plan's.
    """
    line = _own_line(device, kind, task_dtype(kind, dtype))
    if line is None:
        return rooflines(device, kind, dtype, flops, nbytes)
    a, b, c = line
    return a + b * np.asarray(flops, dtype=np.float64) + c * np.asarray(nbytes, dtype=np.float64)


@functools.lru_cache(maxsize=256)
def _profile_curve(device: Device, kind: TaskKind, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Log baseline time and log measured / baseline of the profile's points of one kind.

    Sorted by the first; empty where the profile has no point of that kind in ``dtype`` (the
    task's: :func:`task_dtype`) or its stand-in (:func:`profiled_dtype`, whose points' ratios
    are to their own dtype's baseline).
    """
    source = profiled_dtype(device, kind, dtype)
    points = _points(device, kind, source)
    base = baselines(
        device,
        kind,
        source,
        np.array([p.flops for p in points], dtype=np.float64),
        np.array([p.bytes for p in points], dtype=np.float64),
    )
    ratio = np.array([p.us * 1e-6 for p in points]) / base if points else np.array([])
    order = np.argsort(base)
    return np.log(base[order]), np.log(ratio[order])


def profiled_ratio(device: Device, kind: TaskKind, dtype: str, baseline: float) -> float:
    """The measured over baseline ratio of a task of ``kind`` whose baseline time is ``baseline``.

    Interpolated linearly in log space between the profile's points of the same kind and
    dtype (or its stand-in: :func:`profiled_dtype`), held at the end points' ratios outside
    them; 1 where the profile has none.
    """
    x, y = _profile_curve(device, kind, dtype)
    if x.size == 0:
        return 1.0
    return float(np.exp(np.interp(math.log(baseline), x, y)))


WARM_FLOOR = 0.5
"""The least fraction of its cold time a warm task takes (:func:`compute_time`): a guard, as
``Device.warm_us`` is measured on small calls. Not the launch: ``launch_us`` is what a call's
first task pays, and a warm one pays less (4 ranks here: 1 MFLOP expert chunks took 205 us
first, then 60 to 80 us of CPU time each, under a fitted launch of 130 us)."""


def compute_time(task: Task, topology: Topology, dtype: str, *, warm: bool = False) -> float:
    """Seconds of a compute task on one device.

    The baseline's time (:func:`baselines`: the roofline, or the kind's own line through
    its profiled points), times the device's profiled ratio for the task's kind and dtype
    (:func:`profiled_ratio`; 1 for a device described on paper), less ``Device.warm_us`` of
    its kind where the rank ran a compute task earlier in the same call, of any kind (never
    below :data:`WARM_FLOOR` of its time), at the rank's share of a core. A call's first
    task meets what the calls before it left in the caches; later ones follow their own
    call's work (4 ranks here: ``make demo``'s shared-expert matmul after its grouped matmul
    took 61 us of CPU time, one of its kind first in a call 150 to 200).

    Args:
        task: a compute task (its FLOPs and bytes).
        topology: the machine.
        dtype: the plan's compute dtype (``int8`` for quant matmuls).
        warm: whether the rank ran a compute task earlier in the call.

    Returns:
        Seconds, launch overhead included.
    """
    flops, nbytes = np.array([task.flops]), np.array([task.bytes])
    return float(compute_times(topology, task.kind, dtype, flops, nbytes, warm=warm)[0])


def compute_times(
    topology: Topology,
    kind: TaskKind,
    dtype: str,
    flops: np.ndarray,
    nbytes: np.ndarray,
    *,
    warm: bool = False,
) -> np.ndarray:
    """:func:`compute_time` of many tasks of one kind at once (elementwise)."""
    device = topology.device
    base = baselines(device, kind, dtype, flops, nbytes)
    if device.profile:
        x, y = _profile_curve(device, kind, task_dtype(kind, dtype))
        if x.size:
            base = base * np.exp(np.interp(np.log(base), x, y))
    saved = device.warm_us.get(str(kind), 0.0) * 1e-6 if warm else 0.0
    if saved > 0.0:
        base = np.maximum(base - saved, WARM_FLOOR * base)
    return base / topology.core_share


PEER_MARGIN = 0.1
"""How near another rank's task must come to a rank's (its FLOPs, else its bytes) to count as
its peer in :func:`spread_factors`: within this fraction below it, or above it."""


@functools.lru_cache(maxsize=1024)
def expected_max(k: int) -> float:
    """The expected largest of ``k`` independent standard normal draws (0 for one).

    ``integral of x * k * phi(x) * Phi(x) ** (k - 1)`` on a grid of 4001 points over
    [-9, 9] (a normal's tails beyond hold nothing at double precision for these ``k``).
    """
    if k <= 1:
        return 0.0
    x, phi, cdf = _normal_grid()
    return float(np.trapezoid(x * k * phi * cdf ** (k - 1), x))


@functools.lru_cache(maxsize=1)
def _normal_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`expected_max`'s grid: points, the normal's density and its distribution there."""
    x = np.linspace(-9.0, 9.0, 4001)
    phi = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    cdf = 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in x]))
    return x, phi, cdf


def spread_factors(spread: float, loads: np.ndarray) -> np.ndarray:
    """Each rank's factor on one compute task's fitted time, from the ranks' ``loads``.

    The fitted figures are each round's slowest rank (``Device.rank_spread`` over the
    slowest rank's own). A rank's task waits on as many ranks as come near its load, its
    peers (itself included; :data:`PEER_MARGIN`): with all of them its factor is 1, the
    figures as fitted; alone at the top, ``1 / spread``, its own pace; between, the spread
    grows with the peers as the expected largest of that many normal draws
    (:func:`expected_max`): ``(1 + (spread - 1) * E_max(peers) / E_max(ranks)) / spread``.

    Args:
        spread: ``Device.rank_spread`` (>= 1).
        loads: one task's work on each rank (FLOPs, else bytes), index = rank.

    Returns:
        The factors, index = rank; all 1 where ``spread`` is 1 or there is one rank.
    """
    loads = np.asarray(loads, dtype=np.float64)
    n = loads.size
    if spread == 1.0 or n < 2:
        return np.ones(n)
    order = np.sort(loads)
    peers = n - np.searchsorted(order, (1.0 - PEER_MARGIN) * loads, side="left")
    whole = expected_max(n)
    share = np.array([expected_max(int(k)) for k in peers]) / whole
    return (1.0 + (spread - 1.0) * share) / spread


MEMORY_KINDS = frozenset({TaskKind.PACK, TaskKind.REDUCE})
"""Compute kinds whose time is their memory traffic (row copies, sums of received partials):
they run faster while fewer of their node's ranks compute (``Device.lone_memory_speedup``).
Not the matmuls, attention included: on 8 ranks of a 16-core host a skewed call's loaded rank,
alone on its node after the others were done, ran its grouped matmul at 0.93 of the figures
as every rank's uniform one did, and its unpermute (49.6 MB) at 0.73."""


def memory_rate(speedup: float, ranks: int, busy: int) -> float:
    """A memory-bound task's rate on a node of ``ranks`` ranks, ``busy`` of them computing.

    ``1 + (speedup - 1) * (ranks - busy) / (ranks - 1)``: the figures (every rank computing,
    as the profile measured them) where all are busy, ``speedup`` (``Device.
    lone_memory_speedup``) where the task's rank computes alone; 1 on a node of one rank.
    """
    if ranks < 2 or speedup == 1.0:
        return 1.0
    idle = min(max(ranks - busy, 0), ranks - 1)
    return 1.0 + (speedup - 1.0) * idle / (ranks - 1)


def schedule_wait(topology: Topology) -> float:
    """Seconds a collective waits for peers off their cores: ``slice * (1 - core_share)``.

    0 where every rank has a core of its own (``core_share`` 1) or ``slice_us`` is 0, and
    where ranks take turns on the cores (``CoreSharing.TURNS``: a rank waits for its peers'
    turns in the simulation itself). The simulator counts it from when the collective's last
    rank queued it, so the waits of collectives queued together overlap.
    """
    if topology.device.core_sharing is CoreSharing.TURNS:
        return 0.0
    return topology.device.slice_us * 1e-6 * (1.0 - topology.core_share)


def core_time(topology: Topology, seconds: float) -> float:
    """Seconds on a core of CPU work that takes ``seconds`` at the rank's core share.

    Where ranks take turns on their node's cores (``CoreSharing.TURNS``), a rank runs its
    work on a whole core while it holds one: the device's whole-core figures, ``seconds *
    core_share`` (:func:`compute_time` and :func:`issue_time` give times at the share).
    ``seconds`` itself where ranks share cores by processor sharing or have one each.
    """
    if topology.device.core_sharing is CoreSharing.TURNS:
        return seconds * topology.core_share
    return seconds


FLOAT32_COPIED = frozenset({TaskKind.ALLREDUCE, TaskKind.REDUCE_SCATTER})
"""The collectives whose posting makes a float32 copy where reductions move float32
(``Device.reductions_in_float32``)."""


def issue_time(topology: Topology, task: Task) -> float:
    """Seconds a rank's issuer spends posting comm task ``task`` (LogP's ``o``), at its core share.

    ``Device.issue_us``, plus its kind's ``Device.issue_extra_us``, plus
    ``Device.shared_issue_us`` where the node's ranks share cores, plus, for an AllReduce
    or a ReduceScatter where reductions move float32 copies, its float32 copy of the task's
    bytes at ``Device.issue_gbps``.
    """
    return float(issue_times(topology, task.kind, np.array([task.bytes]))[0])


def issue_times(topology: Topology, kind: TaskKind, nbytes: np.ndarray) -> np.ndarray:
    """:func:`issue_time` of many comm tasks of one kind at once (elementwise)."""
    device = topology.device
    fixed = device.issue_us + device.issue_extra_us.get(str(kind), 0.0)
    if topology.core_share < 1.0:  # a post on a shared core finds its caches cold
        fixed += device.shared_issue_us
    seconds = np.full(np.shape(nbytes), fixed * 1e-6)
    if device.issue_gbps > 0 and device.reductions_in_float32 and kind in FLOAT32_COPIED:
        seconds = seconds + np.asarray(nbytes, dtype=np.float64) / (device.issue_gbps * 1e9)
    return seconds / topology.core_share


def message_latency(topology: Topology, dim: NetworkDim) -> float:
    """Seconds of one message's latency over ``dim`` (a latency term of the alpha-beta model).

    ``NetworkDim.latency_us``, plus ``Device.shared_latency_us`` where the node's ranks share
    fewer cores (``Topology.core_share`` below 1).
    """
    shared = topology.device.shared_latency_us if topology.core_share < 1.0 else 0.0
    return (dim.latency_us + shared) * 1e-6


def _phase(topology: Topology, dim: NetworkDim, nbytes: float) -> float:
    """One reduce-scatter or all-gather phase over ``dim``; ``nbytes`` is the full result."""
    p = dim.ranks
    if p <= 1 or nbytes <= 0:
        return 0.0
    chunk = nbytes / p
    # a chunk each way
    step = message_latency(topology, dim) + float(_moved(dim, chunk, chunk))
    if dim.kind is LinkKind.FULL_MESH:  # a chunk to every peer at once, one link each
        return step
    # ring (and a ring over a switch port): p - 1 steps of one chunk
    return (p - 1) * step


def _reduce_work(topology: Topology, nbytes: float, rounds: float) -> float:
    """Seconds a collective spends adding ``rounds`` x ``nbytes`` it received.

    Zero when the device's communication engine reduces in line (``reduce_gbps`` of 0).
    """
    rate = topology.device.reduce_gbps
    return rounds * nbytes / (rate * 1e9) / topology.core_share if rate > 0 else 0.0


def _wire(topology: Topology) -> float:
    """Bytes a reduction moves per byte of the plan: 2 where 16-bit data travels as float32."""
    return 2.0 if topology.device.reductions_in_float32 else 1.0


def _comm_points(topology: Topology, kind: str) -> list[ProfilePoint]:
    """The profile's points of collective ``kind`` that hold on ``topology``.

    Those timed on one level of as many ranks as it has (none on a machine on paper).
    """
    if len(topology.network) != 1 or not topology.device.profile:
        return []
    world = topology.world_size
    return [p for p in topology.device.profile if p.kind == kind and p.ranks == world]


@functools.lru_cache(maxsize=256)
def _comm_curve(topology: Topology, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Log modelled time and log measured / modelled of collective ``kind``'s points."""
    raw = _RAW[kind]
    points = _comm_points(topology, kind)
    model = np.array([raw(topology, p.bytes) for p in points])
    keep = model > 0
    measured = np.array([p.us * 1e-6 for p in points])
    order = np.argsort(model[keep])
    return np.log(model[keep][order]), np.log(measured[keep][order] / model[keep][order])


def _profiled(topology: Topology, kind: str, modelled: float) -> float:
    """``modelled`` seconds of collective ``kind``, times the profile's ratio (log space)."""
    if modelled <= 0 or not _comm_points(topology, kind):
        return modelled
    x, y = _comm_curve(topology, kind)
    if x.size == 0:
        return modelled
    return modelled * float(np.exp(np.interp(math.log(modelled), x, y)))


def collective_ratio(topology: Topology, kind: str, nbytes: float) -> float:
    """The profile's measured over modelled time of collective ``kind`` at ``nbytes``.

    ``nbytes`` as the kind's time takes them (:data:`_RAW`: an AllGather's result, the
    others' buffer per rank); 1 where the device has no profile of the kind on this world.
    """
    modelled = _RAW[kind](topology, nbytes)
    return _profiled(topology, kind, modelled) / modelled if modelled > 0 else 1.0


def allreduce_time(topology: Topology, nbytes: float) -> float:
    """Seconds of an AllReduce of ``nbytes`` per rank over the whole topology."""
    return _profiled(topology, "allreduce", _allreduce_model(topology, nbytes))


def allgather_time(topology: Topology, nbytes_total: float) -> float:
    """Seconds of an AllGather whose result is ``nbytes_total`` on every rank."""
    return _profiled(topology, "allgather", _allgather_model(topology, nbytes_total))


def reduce_scatter_time(topology: Topology, nbytes_total: float) -> float:
    """Seconds of a ReduceScatter of ``nbytes_total`` per rank (each keeps 1/world of it)."""
    return _profiled(topology, "reduce_scatter", _reduce_scatter_model(topology, nbytes_total))


def _even_alltoallv_model(topology: Topology, nbytes: float) -> float:
    """An AlltoAllv in which every rank sends ``nbytes / world`` to every other rank."""
    world = topology.world_size
    if world <= 1 or nbytes <= 0:
        return 0.0
    peers = np.arange(1, world)
    each = np.full(world - 1, nbytes / world)
    return rank_alltoallv_time(topology, 0, peers, each, peers, each)


def _allreduce_model(topology: Topology, nbytes: float) -> float:
    """The alpha-beta model of an AllReduce (:func:`allreduce_time` without the profile)."""
    if nbytes <= 0 or topology.world_size <= 1:
        return 0.0
    world = topology.world_size
    wire = _wire(topology)
    size = float(nbytes) * wire
    hierarchical = 0.0
    for dim in topology.network:  # reduce-scatter inwards out, all-gather back
        hierarchical += 2 * _phase(topology, dim, size)
        size /= max(dim.ranks, 1)
    # recursive doubling, dimension by dimension: ceil(log2 r) exchanges of the whole buffer
    doubling = 0.0
    steps = 0
    for dim in topology.network:
        rounds = math.ceil(math.log2(dim.ranks)) if dim.ranks > 1 else 0
        steps += rounds
        exchange = _moved(dim, nbytes * wire, nbytes * wire)
        doubling += rounds * (message_latency(topology, dim) + float(exchange))
    hierarchical += _reduce_work(topology, nbytes, (world - 1) / world)
    doubling += _reduce_work(topology, nbytes, steps)
    return min(hierarchical, doubling)


def _allgather_model(topology: Topology, nbytes_total: float) -> float:
    """The alpha-beta model of an AllGather."""
    time = 0.0  # the all-gather half of the hierarchical AllReduce: outermost dimension first
    gathered = nbytes_total / max(topology.world_size, 1)
    for dim in reversed(topology.network):
        gathered *= dim.ranks
        time += _phase(topology, dim, gathered)
    return time


def _reduce_scatter_model(topology: Topology, nbytes_total: float) -> float:
    """The alpha-beta model of a ReduceScatter."""
    world = max(topology.world_size, 1)
    time = _reduce_work(topology, nbytes_total, (world - 1) / world)
    size = float(nbytes_total) * _wire(topology)
    for dim in topology.network:
        time += _phase(topology, dim, size)
        size /= max(dim.ranks, 1)
    return time


def separating_dims(topology: Topology, ranks: np.ndarray, peers: np.ndarray) -> np.ndarray:
    """The dimension each pair ``(ranks[i], peers[i])`` talks over (-1: the same rank).

    That is the outermost dimension in which the two differ. Two ranks agree in every
    dimension from ``d`` outwards exactly when they agree after dividing by the ranks of the
    dimensions inside ``d``, so the answer is the last ``d`` at which those quotients
    differ (no coordinates are formed).
    """
    ranks, peers = _ints(ranks), _ints(peers)
    out = np.full(ranks.shape, -1, dtype=np.int8 if len(topology.network) < 127 else np.int64)
    inside = 1
    for d, dim in enumerate(topology.network):
        if inside == 1:  # no division: the outermost dimension they differ in comes later
            out[ranks != peers] = d
        else:
            out[ranks // inside != peers // inside] = d
        inside *= dim.ranks
    return out


def _ints(values: np.ndarray) -> np.ndarray:
    """``values`` as a NumPy integer array, kept in its own dtype if already one (no copy)."""
    array = np.asarray(values)
    return array if array.dtype.kind in "iu" else array.astype(np.int64)


def _ring_hops(dim: NetworkDim) -> float:
    """Mean hop count between two distinct ranks of a bidirectional ring."""
    p = dim.ranks
    if p <= 2:
        return 1.0
    return sum(min(h, p - h) for h in range(1, p)) / (p - 1)


def _side_loads(
    topology: Topology, ranks: np.ndarray, peers: np.ndarray, nbytes: np.ndarray, size: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each rank's load on one side (sending or receiving) of an AlltoAllv, by dimension.

    Pair ``i`` moves ``nbytes[i]`` between ``ranks[i]`` and ``peers[i]`` (no pair of a rank
    with itself). In each dimension a rank's load is, by the dimension's kind, the largest of
    its bytes over it (full mesh: a link per peer) or their sum (switch: one port; ring).

    Returns:
        ``{dimension: (each rank's load, how many peers it talks to there)}``, arrays of
        ``size`` ranks, for the dimensions the pairs use.
    """
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if ranks.size == 0:
        return out
    dims = separating_dims(topology, ranks, peers)
    for d, dim in enumerate(topology.network):
        if dim.ranks <= 1:
            continue
        here = dims == d
        if not here.any():
            continue
        owners, load = ranks[here], nbytes[here].astype(np.float64)
        total: np.ndarray
        if dim.kind is LinkKind.FULL_MESH:
            total = np.zeros(size)
            np.maximum.at(total, owners, load)
        else:
            total = np.bincount(owners, weights=load, minlength=size)
        out[d] = (total, np.bincount(owners, minlength=size).astype(np.float64))
    return out


def _busiest(
    topology: Topology,
    send: dict[int, tuple[np.ndarray, np.ndarray]],
    recv: dict[int, tuple[np.ndarray, np.ndarray]],
    size: int,
) -> float:
    """Seconds of an AlltoAllv's busiest rank, from both sides' loads (:func:`_side_loads`).

    A rank's time on a dimension is :func:`_dim_busy` of its two sides; the dimensions run
    at once, so a rank takes its slowest one.
    """
    worst = 0.0
    none = (np.zeros(size), np.zeros(size))
    for d, dim in enumerate(topology.network):
        if d in send or d in recv:
            alpha = message_latency(topology, dim)
            busy = _dim_busy(dim, alpha, *send.get(d, none), *recv.get(d, none))
            worst = max(worst, float(busy.max()))
    return worst


def _moved(dim: NetworkDim, send: np.ndarray | float, recv: np.ndarray | float) -> np.ndarray:
    """Seconds a rank takes to send ``send`` and receive ``recv`` bytes over ``dim``, latency aside.

    The rank's own work by the dimension's :class:`~mc2sim.topology.Duplex` (the larger way,
    both ways added, or what it receives) at ``bandwidth_gbps``, and never faster than the
    wire's ``link_gbps`` carries the larger way.
    """
    send, recv = np.asarray(send, dtype=np.float64), np.asarray(recv, dtype=np.float64)
    work: np.ndarray
    if dim.duplex is Duplex.HALF:
        work = (send + recv) / dim.bytes_per_s
    elif dim.duplex is Duplex.RECEIVER:
        work = recv / dim.bytes_per_s
    else:
        work = np.maximum(send, recv) / dim.bytes_per_s
    if dim.link_gbps > 0:
        work = np.maximum(work, np.maximum(send, recv) / (dim.link_gbps * 1e9))
    return work


def _dim_busy(
    dim: NetworkDim,
    alpha: float,
    send: np.ndarray,
    send_peers: np.ndarray,
    recv: np.ndarray,
    recv_peers: np.ndarray,
) -> np.ndarray:
    """Seconds each rank spends on dimension ``dim`` of an AlltoAllv.

    ``send``, ``recv``: a rank's load each way (:func:`_side_loads`; on a ring, times the
    ring's mean hops over both directions); ``send_peers``, ``recv_peers``: how many peers it
    talks to each way, one latency ``alpha`` (seconds, :func:`message_latency`) each
    (pairwise exchange). On a ``full`` duplex dimension
    the two ways run apart and the rank takes the slower; otherwise :func:`_moved` of both,
    with the latencies of the way that talks to more peers.
    """
    if dim.kind is LinkKind.RING:
        over_both = _ring_hops(dim) / 2
        send, recv = send * over_both, recv * over_both
    if dim.duplex is Duplex.FULL:  # each way at the lower of the ranks' rate and the wire's
        beta = 1.0 / (dim.effective_gbps * 1e9)
        apart: np.ndarray = np.maximum(
            send * beta + alpha * send_peers, recv * beta + alpha * recv_peers
        )
        return apart
    together: np.ndarray = _moved(dim, send, recv) + alpha * np.maximum(send_peers, recv_peers)
    return together


def loads_alltoallv_time(topology: Topology, loads: AlltoAllvLoads) -> float:
    """:func:`alltoallv_time` of an AlltoAllv given as every rank's loads, not its pairs.

    The busiest rank's slowest dimension, as :func:`_busiest` costs it (:func:`_dim_busy`),
    then the device's profile.
    """
    modelled = 0.0
    for d, dim in enumerate(topology.network):
        if dim.ranks <= 1:
            continue
        send, recv = (
            side.largest[d] if dim.kind is LinkKind.FULL_MESH else side.total[d]
            for side in (loads.send, loads.recv)
        )
        alpha = message_latency(topology, dim)
        busy = _dim_busy(dim, alpha, send, loads.send.peers[d], recv, loads.recv.peers[d])
        modelled = max(modelled, float(busy.max()))
    return _profiled(topology, "alltoallv", modelled)


def rank_alltoallv_time(
    topology: Topology,
    rank: int,
    send_peers: np.ndarray,
    send_bytes: np.ndarray,
    recv_peers: np.ndarray,
    recv_bytes: np.ndarray,
) -> float:
    """Seconds one rank spends in an AlltoAllv, given its sparse send and receive bytes."""
    size = rank + 1
    return _busiest(
        topology,
        _side_loads(topology, np.full(len(send_peers), rank), send_peers, send_bytes, size),
        _side_loads(topology, np.full(len(recv_peers), rank), recv_peers, recv_bytes, size),
        size,
    )


def alltoallv_time(
    topology: Topology,
    splits: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
) -> float:
    """Seconds of an AlltoAllv: the busiest rank's time.

    Every rank's pairs are costed at once (:func:`_busiest` over all of them), not rank by
    rank.

    Args:
        topology: the machine.
        splits: for every rank (index = rank), ``(send_peers, send_bytes, recv_peers,
            recv_bytes)`` with zero-byte peers and the rank itself left out.

    Returns:
        Seconds.
    """
    sides = []
    for peers_at, bytes_at in ((0, 1), (2, 3)):
        sizes = [len(parts[peers_at]) for parts in splits]
        ranks = np.repeat(np.arange(len(splits)), sizes)
        if not sum(sizes):
            sides.append((ranks, ranks, ranks))
            continue
        peers = np.concatenate([parts[peers_at] for parts in splits])
        nbytes = np.concatenate([parts[bytes_at] for parts in splits])
        sides.append((ranks, peers, nbytes))
    return pairs_alltoallv_time(topology, sides[0], sides[1])


def pairs_alltoallv_time(
    topology: Topology,
    send: tuple[np.ndarray, np.ndarray, np.ndarray],
    recv: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> float:
    """:func:`alltoallv_time` of every rank's pairs, gathered already.

    Args:
        topology: the machine.
        send: ``(ranks, peers, bytes)``: pair ``i`` sends ``bytes[i]`` from ``ranks[i]`` to
            ``peers[i]``; no zero-byte pair, no pair of a rank with itself.
        recv: likewise, ``ranks[i]`` receiving from ``peers[i]``.

    Returns:
        Seconds.
    """
    size = 1 + max((int(side[0].max()) for side in (send, recv) if side[0].size), default=0)
    modelled = _busiest(
        topology,
        _side_loads(topology, *send, size),
        _side_loads(topology, *recv, size),
        size,
    )
    return _profiled(topology, "alltoallv", modelled)


_RAW: dict[str, Callable[[Topology, float], float]] = {
    "allreduce": _allreduce_model,
    "allgather": _allgather_model,
    "reduce_scatter": _reduce_scatter_model,
    "alltoallv": _even_alltoallv_model,
}
"""Each collective's alpha-beta model of a profile point's bytes."""
