"""Machine descriptions the cost model times plans on: device, network dimensions, contention.

A :class:`Topology` says how fast one rank computes (:class:`Device`, with the small-tile
:class:`Efficiency` of its matrix unit), how its ranks are wired (a tuple of
:class:`NetworkDim`, innermost first) and how much overlapped compute and communication slow
each other down (:class:`Contention`). Topologies live in YAML files (``topologies/*.yaml``,
format in ``docs/TOPOLOGY.md``); :func:`load` reads one and names the file and the field path
in every error, :func:`dump` writes one back, :func:`builtin` opens a shipped one by name::

    topo = mc2sim.topology.builtin("atlas_a2_multinode")   # 4 nodes x 8 NPUs
    topo.world_size                                          # 32
    topo.dim_of(3, 11)                                       # 1: the ranks are on two nodes
    topo.with_world(64).world_size                           # 64: 8 nodes of 8

Units: 1 GB = 1e9 bytes, 1 TFLOP/s = 1e12 FLOP/s (int8 figures are TOP/s, 1e12 operations
per second); times are in microseconds in the files and in seconds from the unit-converting
properties (:attr:`NetworkDim.latency_s`, for example).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from mc2sim._compat import StrEnum
from mc2sim._yaml import read_yaml, shipped_dir, shipped_file, shipped_names, write_yaml
from mc2sim.errors import ParamInvalidError

__all__ = [
    "MATRIX_DTYPES",
    "Contention",
    "CoreSharing",
    "Device",
    "Duplex",
    "Efficiency",
    "LinkKind",
    "NetworkDim",
    "ProfilePoint",
    "Topology",
    "builtin",
    "builtin_dir",
    "dump",
    "list_builtin",
    "load",
    "resolve",
]

MATRIX_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "int8")
"""The dtype names a device may give matrix throughput for (``Device.matrix_tflops`` keys)."""

_HALF_PAIR = {"float16": "bfloat16", "bfloat16": "float16"}

_T = TypeVar("_T")


class LinkKind(StrEnum):
    """How the ranks of one network dimension are wired to each other.

    Glossary:
        ``full_mesh``: every rank of the dimension has a direct link of ``bandwidth_gbps``
            (per direction) to each other rank of it, and all of them can be used at once
            (Ascend HCCS 8P in an Atlas 800T A2 server: 7 links per NPU).
        ``ring``: each rank has a link of ``bandwidth_gbps`` (per direction) to each of its
            two neighbours; traffic to a farther rank takes several hops and shares the links
            on its way (a ring of NPUs, HCCL's Ring and Double-Ring algorithms).
        ``switch``: each rank has one port of ``bandwidth_gbps`` (per direction) into a
            non-blocking switch; all its traffic in the dimension shares that port (NVLink via
            NVSwitch, the Ascend A3 unified bus via its UB switches, a RoCE/InfiniBand fabric).
    """

    FULL_MESH = "full_mesh"
    RING = "ring"
    SWITCH = "switch"


class Duplex(StrEnum):
    """Whose work moves the bytes of a transfer in one network dimension.

    Glossary:
        ``full``: a rank sends and receives at once, each way at ``bandwidth_gbps`` (a NIC or a
            chip-to-chip link): a rank's time is the larger of its send and receive bytes.
        ``half``: one engine of the rank moves both ways (a CPU MPI copying through a
            shared-memory buffer: the sender copies in, the receiver copies out): its send and
            receive bytes add up.
        ``receiver``: the receiving rank moves the bytes and the sender only posts them (a
            single-copy shared-memory transport, the receiver reading the sender's buffer): a
            rank's time is its receive bytes.

    ``mc2sim calibrate`` measures it: one-way pairs, two-way pairs and one rank sending to
    all (:func:`mc2sim.study.calibrate.measure_duplex`). On a 16-core host under Open MPI
    without single copy, two-way pairs took 1.9-2.0x one-way pairs and one sender about
    one-way's time (``half``); under MPICH on 2 cores, two-way 1.0-1.1x one-way.
    """

    FULL = "full"
    HALF = "half"
    RECEIVER = "receiver"


class CoreSharing(StrEnum):
    """How ranks that share their node's cores (``Topology.core_share`` below 1) get them.

    Glossary:
        ``processor``: every rank runs all the time at its share of a core (processor
            sharing: ranks that busy-poll while they wait hold their time slices), and a
            collective waits ``Device.slice_us * (1 - core_share)`` for peers off their cores.
        ``turns``: the ranks take turns on the cores. A rank holds a core from when it has CPU
            work (a compute task, posting a collective) until its issuer waits (inside MPI,
            which yields the core) or it has held it ``Device.slice_us`` while another rank
            of its node waits for one (the scheduler's time slice); it then runs at a whole
            core's speed, and a rank waiting for a core does nothing. The ranks a node runs
            first hold the cores until they wait, and the others start then.

    ``mc2sim calibrate`` chooses one with the contention (:func:`mc2sim.model.fit.fit_contention`).
    Measured on 4 ranks of a 2-core machine (MPICH, which yields a waiting rank's core):
    the 0.05 ms tiles of a tiled GroupedMatMulAlltoAllv ran at a whole core's speed, two ranks
    ran their tiles while the other two waited, and the first two's collectives completed
    only after the other two had run theirs (``turns``).
    """

    PROCESSOR = "processor"
    TURNS = "turns"


# ----------------------------------------------------------------------------- checks


def _real(param: str, value: object) -> float:
    """Return ``value`` as a finite float, raising ``ParamInvalidError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamInvalidError(param, value, "must be a number")
    result = float(value)
    if not math.isfinite(result):
        raise ParamInvalidError(param, value, "must be finite")
    return result


def _positive(param: str, value: object) -> float:
    """Return ``value`` as a float > 0."""
    result = _real(param, value)
    if result <= 0:
        raise ParamInvalidError(param, value, "must be > 0")
    return result


def _non_negative(param: str, value: object) -> float:
    """Return ``value`` as a float >= 0."""
    result = _real(param, value)
    if result < 0:
        raise ParamInvalidError(param, value, "must be >= 0")
    return result


def _at_least_one(param: str, value: object) -> float:
    """Return ``value`` as a float >= 1 (a slowdown factor)."""
    result = _real(param, value)
    if result < 1:
        raise ParamInvalidError(param, value, "must be >= 1 (1 means no slowdown)")
    return result


def _integer(param: str, value: object, *, minimum: int) -> int:
    """Return ``value`` as an int >= ``minimum``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamInvalidError(param, value, "must be an integer")
    if value < minimum:
        raise ParamInvalidError(param, value, f"must be >= {minimum}")
    return value


def _text(param: str, value: object, *, nonempty: bool = False) -> str:
    """Return ``value`` if it is a string (non-empty when asked)."""
    if not isinstance(value, str):
        raise ParamInvalidError(param, value, "must be a string")
    if nonempty and not value.strip():
        raise ParamInvalidError(param, value, "must not be empty")
    return value


def _check_kind(param: str, kind: object, value: object, resource: str) -> None:
    """Raise unless ``kind`` names a task kind of ``resource`` (a ``Resource``'s value)."""
    # here, not at the top: the schedule package (and numpy) load only for a kind to check
    from mc2sim.schedule.plan import Resource, TaskKind

    kinds = [str(k) for k in TaskKind if k.resource is Resource(resource)]
    if kind not in kinds:
        words = "compute" if resource == "compute" else "collective"
        raise ParamInvalidError(param, value, f"unknown {words} kind; known: {', '.join(kinds)}")


def _us_by_kind(param: str, value: object, resource: str) -> Mapping[str, float]:
    """``value``, microseconds by task kind of ``resource`` (a ``Resource``'s value), read-only."""
    words = "compute" if resource == "compute" else "collective"
    if not isinstance(value, Mapping):
        raise ParamInvalidError(param, value, f"must be a mapping of {words} kind to microseconds")
    table = {}
    for kind, us in value.items():
        _check_kind(f"{param}.{kind}", kind, us, resource)
        table[str(kind)] = _non_negative(f"{param}.{kind}", us)
    return MappingProxyType(table)


def _comm_kinds(param: str, value: object) -> tuple[str, ...]:
    """``value``, collective kind names, sorted and each once."""
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ParamInvalidError(param, value, "must be a list of collective kinds")
    for kind in value:
        _check_kind(param, kind, kind, "comm")
    return tuple(sorted({str(k) for k in value}))


_E = TypeVar("_E", bound=StrEnum)


def _as_choice(param: str, value: object, vocabulary: type[_E]) -> _E:
    """Return ``value`` as a member of ``vocabulary``, listing the allowed values otherwise."""
    try:
        return vocabulary(value)
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in vocabulary)
        raise ParamInvalidError(param, value, f"must be one of {allowed}") from None


# ----------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, kw_only=True, slots=True)
class ProfilePoint:
    """One compute task or collective timed on the machine.

    A device's profile corrects its model where the hardware is at hand: a task's time is
    the roofline's (a collective's, the alpha-beta model's), times the measured over modelled
    ratio of its kind, interpolated in log space (:mod:`mc2sim.model.cost`).
    """

    kind: str
    """The task kind (``matmul``, ``attention``, ..., ``allreduce``, ``alltoallv``, ...)."""
    dtype: str
    """The plan's compute dtype (``int8`` for quant matmuls); empty for a collective."""
    flops: float
    """The task's FLOPs, >= 0."""
    bytes: float
    """Bytes it reads and writes, as the plan builders count them, >= 0."""
    us: float
    """Its measured time on a whole core (a collective's: as the job's ranks ran it), in
    microseconds, > 0."""
    ranks: int = 0
    """The ranks a collective was timed on (its ratio holds on a one-level topology of that
    many ranks); 0 for a compute task. A collective's ``bytes`` are as
    :class:`mc2sim.model.fit.CommSample` counts them."""

    def __post_init__(self) -> None:
        _text("kind", self.kind, nonempty=True)
        object.__setattr__(self, "ranks", _integer("ranks", self.ranks, minimum=0))
        # a compute task's point has no ranks, a collective's has them
        _check_kind("kind", self.kind, self.kind, "compute" if self.ranks == 0 else "comm")
        _text("dtype", self.dtype, nonempty=self.ranks == 0)
        object.__setattr__(self, "flops", _non_negative("flops", self.flops))
        object.__setattr__(self, "bytes", _non_negative("bytes", self.bytes))
        object.__setattr__(self, "us", _positive("us", self.us))


@dataclass(frozen=True, kw_only=True, slots=True)
class Efficiency:
    """Utilisation of the matrix unit as a function of a task's size.

    For a task of ``f`` FLOPs the utilisation is
    ``small_util + (large_util - small_util) * f / (f + half_flops)``: ``small_util`` for a
    vanishing task, half-way between the two at ``half_flops``, ``large_util`` for a very
    large one. Small tiles underuse the matrix unit (``small_util < large_util``); ``mc2sim
    calibrate`` fits a curve rising to 1, while a described topology may give any shape.
    """

    small_util: float
    """Utilisation of the smallest tasks, in (0, 1]."""

    large_util: float
    """Utilisation of the largest tasks, in (0, 1]."""

    half_flops: float
    """Task size (FLOPs) at which utilisation is half-way from ``small_util`` to
    ``large_util``; 0 means every task runs at ``large_util``."""

    def __post_init__(self) -> None:
        small_util = _real("small_util", self.small_util)
        large_util = _real("large_util", self.large_util)
        if not 0 < small_util <= 1:
            raise ParamInvalidError("small_util", self.small_util, "must be in (0, 1]")
        if not 0 < large_util <= 1:
            raise ParamInvalidError("large_util", self.large_util, "must be in (0, 1]")
        object.__setattr__(self, "small_util", small_util)
        object.__setattr__(self, "large_util", large_util)
        object.__setattr__(self, "half_flops", _non_negative("half_flops", self.half_flops))

    def util(self, flops: float) -> float:
        """Return the matrix unit's utilisation for a task of ``flops`` FLOPs.

        Args:
            flops: the task's work, >= 0; ``math.inf`` gives ``large_util``.

        Returns:
            A fraction between ``small_util`` and ``large_util``.

        """
        if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not flops >= 0:
            raise ParamInvalidError("flops", flops, "must be a number >= 0")
        if math.isinf(flops) or self.half_flops == 0:
            return self.large_util
        return self.small_util + (self.large_util - self.small_util) * flops / (
            flops + self.half_flops
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Device:
    """One rank's compute engine: peak throughputs, memory bandwidth and per-task overhead."""

    name: str
    """Product name, e.g. ``"Ascend 910B"``."""

    matrix_tflops: Mapping[str, float]
    """Peak matrix throughput per dtype name (keys from ``MATRIX_DTYPES``, at least one), in
    TFLOP/s (int8 in TOP/s). Stored read-only."""

    vector_tflops: float
    """Peak elementwise throughput (reductions, dequantization) on 16-bit elements, in 1e12
    operations per second counted as vendors count FLOPs (a fused multiply-add is two); > 0."""

    memory_gbps: float
    """Device memory bandwidth in GB/s (1 GB = 1e9 bytes), > 0."""

    efficiency: Efficiency
    """Utilisation of the matrix unit as a function of task size."""

    launch_us: float
    """Fixed cost of every task (launch or in-kernel synchronisation), in microseconds, >= 0."""

    reduce_gbps: float = 0.0
    """Rate at which a collective's reduction consumes the data it adds, in GB/s; 0 means the
    reduction is free (done in line by the communication engine, as HCCL and NCCL do). A CPU
    MPI sums received buffers in a loop of its own, which calibration measures."""

    memory_traffic: float = 1.0
    """Bytes a compute task moves through memory per byte the plans count for it (>= 1): 1
    where a kernel reads each operand and writes each result once (accelerators; a machine on
    paper). mc2sim's CPU reference kernels convert each 16-bit operand to a float32 copy
    (2 bytes read, 4 written), multiply the copies (4 read) and convert the float32 result
    back (4 written, 4 read, 2 written): 5 bytes per counted byte, which ``mc2sim calibrate``
    writes, so that ``memory_gbps`` is the rate at which the machine moves bytes (comparable
    to a memcpy's) rather than counted bytes per second. A ``pack`` task (a row gather)
    moves the bytes it counts, each row read and written once, whatever this figure."""

    memory_overlap: bool = True
    """Whether a task's memory traffic overlaps its arithmetic (the roofline: the longer of the
    two, as on accelerators whose DMA feeds the matrix unit) or adds to it (separate passes, as
    the CPU reference kernels make: upcast, matmul, cast)."""

    concurrent_collectives: bool = False
    """Whether the collectives a rank has in flight progress together or one at a time in
    issue order. False: a communication stream runs them in order (HCCL, NCCL on one
    stream, the MC2 kernels' queue). True: one progress engine advances every outstanding
    request at once (MPI's nonblocking collectives): a collective's latency (its alpha terms)
    overlaps the collectives before it, while the transfers still take the links one at a
    time in issue order."""

    one_at_a_time: tuple[str, ...] = ()
    """Where ``concurrent_collectives`` is set, the collective kinds (``allreduce``,
    ``alltoallv``, ``allgather``, ``reduce_scatter``) that still run one at a time: one of
    them starts only once every collective queued before it has ended, so its latency does
    not overlap theirs. A CPU MPI posts an AlltoAllv's sends and receives at once, but runs a
    nonblocking reduction as a schedule of rounds, each waiting for the one before: four
    32 KiB AllReduces posted at once on 4 ranks of this 2-core machine took 2.6x one, where
    overlapped latencies give 2.0x and one at a time 3.0x. ``mc2sim calibrate`` fits it with
    the contention, where ranks share cores (:data:`mc2sim.model.fit.ORDERS`). Stored sorted,
    each kind once."""

    cores_per_node: float = 0.0
    """CPU cores the ranks of one node share (fractional where several nodes share one
    machine's cores, as namespaces on one host do) (``ranks_per_node`` of them); 0: every rank has
    an engine of its own (an NPU, a GPU). Where a node holds more ranks than cores (four MPI
    ranks on two cores), each rank's share of a core is ``cores_per_node / ranks_per_node``,
    and the figures above are those of one whole core. How the ranks get it is
    ``core_sharing``: by processor sharing (MPI ranks busy-poll while they wait, so every rank
    of the node holds a core's time slices all the time), compute tasks, the issue overhead
    and the collectives' reductions run at that share; taking turns, a rank runs on a whole
    core while it holds one and not at all while it waits for one."""

    issue_us: float = 0.0
    """CPU time a rank spends issuing one collective (LogP's overhead ``o``), in microseconds,
    >= 0: packing its buffers and posting the nonblocking call (a CPU MPI copies small
    messages eagerly while posting). The rank's issuer can do nothing else meanwhile; a
    plan of many tiny chunks pays it once per chunk. ``mc2sim calibrate`` times it right
    after a compute task, as a plan posts: on 2 ranks here the bare post took 13.6 us
    there and 8.4 us back to back. 0 on accelerators, whose communication engine takes a
    descriptor."""

    shared_issue_us: float = 0.0
    """Where a node's ranks share fewer cores (``Topology.core_share`` below 1): the CPU time,
    in microseconds of a whole core, that every post takes on top of ``issue_us``, which is
    then a post's on a core of its own. A rank that gets its core back after another's turn
    finds its caches and its MPI library's state cold: on 4 ranks of a 2-core machine a
    1-element AllReduce's post took 37.5 us of CPU time with every rank posting and 15.0 us
    with one pair posting and the others asleep. ``mc2sim calibrate`` times both. >= 0; 0 (the
    default) where it was not measured or every rank has a core of its own."""

    shared_latency_us: float = 0.0
    """Where a node's ranks share fewer cores (``Topology.core_share`` below 1): the
    microseconds every message of a collective (each latency term of every network level)
    takes on top of its level's ``latency_us``, which is then a message's between ranks on
    cores of their own: a step waits for peers off their cores, and a progress engine runs
    only while its rank holds one. On 4 ranks of a 2-core machine the level's latency fitted
    34.6 us per message with every rank at once and 9.8 us on one pair with the others
    asleep. ``mc2sim calibrate`` fits the latencies both ways; this is the difference. >= 0;
    0 (the default) where it was not measured or every rank has a core of its own."""

    issue_extra_us: Mapping[str, float] = field(default_factory=dict)
    """Per collective kind (``allreduce``, ``alltoallv``, ``allgather``, ``reduce_scatter``),
    the microseconds (a whole core's) posting one takes beyond ``issue_us``, which is a post
    that converts nothing (a float32 AllReduce's, as a ping-pong's): an AlltoAllv's counts
    and displacements, a 16-bit reduction's float32 copy's fixed part (its bytes at
    ``issue_gbps`` come on top). ``mc2sim calibrate`` times each; none (the default) on
    accelerators. Each >= 0; stored read-only."""

    issue_gbps: float = 0.0
    """Where reductions move float32 copies (``reductions_in_float32``): the rate, in GB/s of
    the plan's 16-bit bytes, at which posting an AllReduce or a ReduceScatter makes its
    float32 copy (a conversion pass on the rank's core, before the nonblocking call returns),
    on top of ``issue_us``. 0: posting costs ``issue_us`` whatever the size (accelerators,
    which reduce 16-bit data in line). >= 0."""

    slice_us: float = 0.0
    """Where a node's ranks share fewer cores (``Topology.core_share`` below 1): how long a
    collective waits, in microseconds, for a peer that is off its core (the scheduler's
    time slice). Each collective waits ``slice_us * (1 - core_share)`` on average, as
    latency, counted from when its last rank queued it, so collectives queued together wait
    at once (a peer back on its core progresses all it has posted); ``mc2sim calibrate``
    fits it with the contention. >= 0. Where ranks take turns on the cores (``core_sharing``
    ``turns``), it is instead how long a rank holds a core while another waits for one,
    > 0."""

    core_sharing: CoreSharing = CoreSharing.PROCESSOR
    """How the ranks of a node that share its cores get them (:class:`CoreSharing`); only
    where a node holds more ranks than cores."""

    waiting_weight: float = 1.0
    """Under processor sharing, the part of a busy rank's share of the cores a rank takes
    while it waits (polls inside MPI): a computing rank of a node with ``b`` busy ranks of
    ``n`` runs at ``min(1, cores_per_node / (b + waiting_weight * (n - b)))`` of a core. 1
    (the default): every rank holds its share all the time; ``mc2sim calibrate`` measures
    it (4 ranks of MPICH here: 0.87). In [0, 1]."""

    warm_us: Mapping[str, float] = field(default_factory=dict)
    """Per compute task kind (``matmul``, ``grouped_matmul``, ``attention``, ...), the
    microseconds of a whole core a task saves when its rank ran a compute task earlier in
    the same call, of any kind: the call's code, operands and buffers are warm in the
    caches. A call's first task pays them (the profile's points are such tasks); its later
    ones do not, and never take less than half their cold time
    (:data:`mc2sim.model.cost.WARM_FLOOR`). ``mc2sim calibrate`` measures them on small
    calls in two tiles where ranks share cores, else run twice in a row; none (the default)
    for a machine described on paper. Each >= 0; stored read-only."""

    profile: tuple[ProfilePoint, ...] = ()
    """Compute tasks timed on this machine (``mc2sim calibrate``); empty for a machine
    described on paper, whose tasks take the roofline's time."""

    reductions_in_float32: bool = False
    """Whether AllReduce and ReduceScatter move float32 copies of the plans' 16-bit data,
    twice the bytes the plans count (mc2sim's MPI and gloo communicators on a CPU: MPI has no
    bfloat16 sum, so they sum in float32 and round once). False: 16-bit data moves and is
    reduced as it is (HCCL, NCCL)."""

    rank_spread: float = 1.0
    """How far a round's slowest rank's compute is above the slowest rank's own: the fitted
    compute figures are each round's slowest rank's time (its lower quartile over the
    rounds), and where ranks' times vary from round to round the slowest is a different
    rank each time. A call where every rank does the same work waits for that one, as the
    figures hold; a rank whose task carries more work than any other's (a skewed routing's
    loaded rank) runs at its own pace, the figures over this (the simulator scales a
    task between the two by how many ranks' tasks come near its work:
    :func:`mc2sim.model.cost.spread_factors`). ``mc2sim calibrate`` measures it on its
    serial calls (8 ranks of 16-core hosts: 1.00 to 1.21). >= 1; 1 (the default): every
    rank alike."""

    lone_memory_speedup: float = 1.0
    """How much faster a memory-bound task (a pack, a reduction: ``cost.MEMORY_KINDS``) runs
    with its node's other ranks idle than with every rank of the node computing: the ranks of a
    node share its memory bandwidth. The profile's figures are every rank computing at once;
    the simulator runs such a task at ``1 + (lone_memory_speedup - 1) * (n - busy) / (n - 1)``
    times them, ``busy`` of the node's ``n`` ranks computing (:func:`mc2sim.model.cost.
    memory_rate`). ``mc2sim calibrate`` measures it where each rank has a core of its own: one
    rank's bfloat16 to float32 conversion, the others asleep, over every rank's at once (8
    ranks of 16-core hosts: 1.5 to 2.8; 4 ranks 1.2 to 1.7). >= 1; 1 (the default): the
    bandwidth not shared, or a machine described on paper."""

    probe_tflops: float = 0.0
    """The machine's speed when these figures were fitted: a plain float32 1024 x 1024 x 1024
    matmul on one rank's core while the job's other ranks sleep, in TFLOP/s (``mc2sim
    calibrate``). ``mc2sim run`` times the same probe after its rounds; a comparison of that
    run with a simulation on this topology says when the two differ, and can run the
    simulation at the run's speed (``--at-run-speed``: :meth:`Topology.at_speed`). 0 (the
    default): not measured (a machine described on paper). >= 0."""

    def __post_init__(self) -> None:
        _text("name", self.name, nonempty=True)
        if not isinstance(self.matrix_tflops, Mapping):
            raise ParamInvalidError(
                "matrix_tflops", self.matrix_tflops, "must be a mapping of dtype name to TFLOP/s"
            )
        if not self.matrix_tflops:
            raise ParamInvalidError(
                "matrix_tflops", {}, f"must give at least one of {', '.join(MATRIX_DTYPES)}"
            )
        table: dict[str, float] = {}
        for dtype, tflops in self.matrix_tflops.items():
            if dtype not in MATRIX_DTYPES:
                raise ParamInvalidError(
                    f"matrix_tflops.{dtype}",
                    tflops,
                    f"unknown dtype; known: {', '.join(MATRIX_DTYPES)}",
                )
            table[dtype] = _positive(f"matrix_tflops.{dtype}", tflops)
        object.__setattr__(self, "matrix_tflops", MappingProxyType(table))
        object.__setattr__(self, "vector_tflops", _positive("vector_tflops", self.vector_tflops))
        object.__setattr__(self, "memory_gbps", _positive("memory_gbps", self.memory_gbps))
        if not isinstance(self.efficiency, Efficiency):
            raise ParamInvalidError("efficiency", self.efficiency, "must be an Efficiency")
        object.__setattr__(self, "launch_us", _non_negative("launch_us", self.launch_us))
        object.__setattr__(self, "reduce_gbps", _non_negative("reduce_gbps", self.reduce_gbps))
        object.__setattr__(
            self, "memory_traffic", _at_least_one("memory_traffic", self.memory_traffic)
        )
        if not isinstance(self.memory_overlap, bool):
            raise ParamInvalidError("memory_overlap", self.memory_overlap, "must be true or false")
        if not isinstance(self.concurrent_collectives, bool):
            raise ParamInvalidError(
                "concurrent_collectives", self.concurrent_collectives, "must be true or false"
            )
        if not isinstance(self.reductions_in_float32, bool):
            raise ParamInvalidError(
                "reductions_in_float32", self.reductions_in_float32, "must be true or false"
            )
        object.__setattr__(self, "one_at_a_time", _comm_kinds("one_at_a_time", self.one_at_a_time))
        object.__setattr__(
            self, "cores_per_node", _non_negative("cores_per_node", self.cores_per_node)
        )
        for name in ("issue_us", "shared_issue_us", "shared_latency_us"):
            object.__setattr__(self, name, _non_negative(name, getattr(self, name)))
        object.__setattr__(self, "issue_gbps", _non_negative("issue_gbps", self.issue_gbps))
        object.__setattr__(self, "slice_us", _non_negative("slice_us", self.slice_us))
        object.__setattr__(self, "probe_tflops", _non_negative("probe_tflops", self.probe_tflops))
        for name in ("rank_spread", "lone_memory_speedup"):  # ratios to the fitted figures
            value = _non_negative(name, getattr(self, name))
            if value < 1.0:
                raise ParamInvalidError(name, getattr(self, name), "must be >= 1")
            object.__setattr__(self, name, value)
        object.__setattr__(
            self, "core_sharing", _as_choice("core_sharing", self.core_sharing, CoreSharing)
        )
        weight = _non_negative("waiting_weight", self.waiting_weight)
        if weight > 1.0:
            raise ParamInvalidError("waiting_weight", self.waiting_weight, "must be in [0, 1]")
        object.__setattr__(self, "waiting_weight", weight)
        if self.core_sharing is CoreSharing.TURNS and self.slice_us <= 0:
            raise ParamInvalidError(
                "slice_us",
                self.slice_us,
                "must be > 0 where core_sharing is 'turns' (how long a rank holds a core)",
            )
        for name, resource in (("warm_us", "compute"), ("issue_extra_us", "comm")):
            object.__setattr__(self, name, _us_by_kind(name, getattr(self, name), resource))
        if not isinstance(self.profile, tuple) or not all(
            isinstance(p, ProfilePoint) for p in self.profile
        ):
            raise ParamInvalidError("profile", self.profile, "must be a tuple of ProfilePoint")

    def __hash__(self) -> int:
        return hash(
            (
                self.name,
                tuple(sorted(self.matrix_tflops.items())),
                self.vector_tflops,
                self.memory_gbps,
                self.efficiency,
                self.launch_us,
                self.reduce_gbps,
                self.memory_traffic,
                self.memory_overlap,
                self.concurrent_collectives,
                self.one_at_a_time,
                self.reductions_in_float32,
                self.cores_per_node,
                self.issue_us,
                self.shared_issue_us,
                self.shared_latency_us,
                tuple(sorted(self.issue_extra_us.items())),
                self.issue_gbps,
                self.slice_us,
                self.core_sharing,
                self.waiting_weight,
                tuple(sorted(self.warm_us.items())),
                self.profile,
                self.rank_spread,
                self.lone_memory_speedup,
                self.probe_tflops,
            )
        )

    def matrix_peak(self, dtype: str) -> float:
        """Return the peak matrix throughput for ``dtype`` in FLOP/s (OP/s for int8).

        A device that gives only one of ``float16`` and ``bfloat16`` is taken to run the other
        at the same rate (true of the Ascend cube unit and of tensor cores).

        Args:
            dtype: a dtype name such as ``"float16"``.

        Returns:
            Peak operations per second, before the small-tile ``efficiency``.

        Raises:
            ParamInvalidError: the device gives no figure for ``dtype``.

        """
        tflops = self.matrix_tflops.get(dtype)
        if tflops is None and dtype in _HALF_PAIR:
            tflops = self.matrix_tflops.get(_HALF_PAIR[dtype])
        if tflops is None:
            known = ", ".join(sorted(self.matrix_tflops))
            raise ParamInvalidError(
                "dtype", dtype, f"{self.name} gives no matrix throughput for it; known: {known}"
            )
        return tflops * 1e12

    @property
    def vector_peak(self) -> float:
        """Peak elementwise throughput in operations per second (a multiply-add is two)."""
        return self.vector_tflops * 1e12

    @property
    def memory_bytes_per_s(self) -> float:
        """Device memory bandwidth in bytes per second."""
        return self.memory_gbps * 1e9

    @property
    def launch_s(self) -> float:
        """Fixed cost of every task in seconds."""
        return self.launch_us * 1e-6


@dataclass(frozen=True, kw_only=True, slots=True)
class NetworkDim:
    """One level of the network: how many ranks it joins, how they are wired, how fast."""

    kind: LinkKind
    """Wiring of the dimension (a ``LinkKind`` or its string value)."""

    ranks: int
    """Number of ranks along the dimension (>= 1)."""

    bandwidth_gbps: float
    """Per rank and per direction, in GB/s: per link for ``full_mesh``, per neighbour link for
    ``ring``, the port for ``switch``; > 0."""

    latency_us: float
    """Fixed cost of one message in the dimension, in microseconds, >= 0."""

    name: str = ""
    """Short name of the interconnect, e.g. ``"hccs"``, ``"roce"``, ``"nvlink"``."""

    link_gbps: float = 0.0
    """A cap the wire itself puts on each rank, per direction, in GB/s, below what the ranks'
    own communication work achieves (``bandwidth_gbps``): a node's network link shared by
    its ranks, or a rate limit on it; 0 means no cap. Transfers move at the lower of the two
    rates, and overlapped compute slows only what the ranks' own work limits (a wire keeps
    its pace while the processor computes). ``mc2sim calibrate`` fits ``bandwidth_gbps`` on
    the links as they are; a cap says what a slower link would change."""

    duplex: Duplex = Duplex.FULL
    """Whose work moves a transfer's bytes (a ``Duplex`` or its string value):
    ``bandwidth_gbps`` is then the rate of that work, both ways together for ``half``. A wire's
    ``link_gbps`` is always full duplex."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _as_choice("kind", self.kind, LinkKind))
        object.__setattr__(self, "duplex", _as_choice("duplex", self.duplex, Duplex))
        _integer("ranks", self.ranks, minimum=1)
        object.__setattr__(self, "bandwidth_gbps", _positive("bandwidth_gbps", self.bandwidth_gbps))
        object.__setattr__(self, "latency_us", _non_negative("latency_us", self.latency_us))
        _text("name", self.name)
        object.__setattr__(self, "link_gbps", _non_negative("link_gbps", self.link_gbps))

    @property
    def bytes_per_s(self) -> float:
        """``bandwidth_gbps`` in bytes per second."""
        return self.bandwidth_gbps * 1e9

    @property
    def effective_gbps(self) -> float:
        """The rate transfers move at: ``bandwidth_gbps``, or ``link_gbps`` where lower."""
        if self.link_gbps > 0:
            return min(self.bandwidth_gbps, self.link_gbps)
        return self.bandwidth_gbps

    @property
    def latency_s(self) -> float:
        """``latency_us`` in seconds."""
        return self.latency_us * 1e-6


@dataclass(frozen=True, kw_only=True, slots=True)
class Contention:
    """How much overlapped compute and communication on one rank slow each other down."""

    compute_slowdown: float = 1.0
    """Factor (>= 1) on a rank's compute time while a transfer it takes part in is in flight."""

    comm_slowdown: float = 1.0
    """Factor (>= 1) on a transfer's time while any rank taking part in it computes."""

    polled: bool = False
    """Whether a transfer progresses only while no rank taking part in it computes (a CPU
    MPI without a progress thread advances a nonblocking collective only inside MPI calls,
    which the executor makes between tasks): ``comm_slowdown`` without bound. A capped wire
    still carries what was handed to it (see :mod:`mc2sim.model.simulator`)."""

    source: str = ""
    """How the factors were obtained: ``"fitted by mc2sim calibrate on ..."`` or
    ``"assumed: ..."`` with the reason."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "compute_slowdown", _at_least_one("compute_slowdown", self.compute_slowdown)
        )
        object.__setattr__(
            self, "comm_slowdown", _at_least_one("comm_slowdown", self.comm_slowdown)
        )
        if not isinstance(self.polled, bool):
            raise ParamInvalidError("polled", self.polled, "must be true or false")
        _text("source", self.source)


@dataclass(frozen=True, kw_only=True, slots=True)
class Topology:
    """A machine: its device, its network (innermost dimension first) and its contention.

    Ranks are numbered innermost-fastest: with dimension sizes ``r0, r1, r2, ...`` the rank
    whose coordinates are ``c0, c1, c2, ...`` is ``c0 + r0 * (c1 + r1 * (c2 + ...))``; for
    ``8 x 4`` (8 NPUs per node, 4 nodes), ranks 0-7 are node 0, 8-15 node 1, and so on.
    """

    name: str
    """Identifier, e.g. ``"atlas_a2_8p"`` (a shipped file's name is its file name)."""

    description: str
    """One or two sentences on the machine."""

    device: Device
    """The compute engine of every rank."""

    network: tuple[NetworkDim, ...]
    """Network dimensions, innermost first (at least one); the product of their ``ranks`` is
    the world size."""

    contention: Contention
    """Slowdown of overlapped compute and communication."""

    source: str
    """Where the numbers come from, and which of them are assumptions."""

    def __post_init__(self) -> None:
        _text("name", self.name, nonempty=True)
        _text("description", self.description)
        _text("source", self.source)
        if not isinstance(self.device, Device):
            raise ParamInvalidError("device", self.device, "must be a Device")
        if isinstance(self.network, (str, bytes)) or not isinstance(self.network, Iterable):
            raise ParamInvalidError("network", self.network, "must be a sequence of NetworkDim")
        network = tuple(self.network)
        if not network:
            raise ParamInvalidError("network", [], "must have at least one dimension")
        for i, dim in enumerate(network):
            if not isinstance(dim, NetworkDim):
                raise ParamInvalidError(f"network[{i}]", dim, "must be a NetworkDim")
        object.__setattr__(self, "network", network)
        if not isinstance(self.contention, Contention):
            raise ParamInvalidError("contention", self.contention, "must be a Contention")

    @property
    def world_size(self) -> int:
        """Number of ranks: the product of every dimension's ``ranks``."""
        return math.prod(dim.ranks for dim in self.network)

    def group_size(self, dim: int) -> int:
        """Return how many ranks a rank reaches within dimensions ``0..dim``.

        Args:
            dim: a dimension index in ``[0, len(network))``, or -1 (the rank alone).

        Returns:
            ``ranks[0] * ... * ranks[dim]`` (1 for ``dim == -1``).

        """
        self._check_dim(dim)
        return math.prod(d.ranks for d in self.network[: dim + 1])

    @property
    def ranks_per_node(self) -> int:
        """Ranks of one node: the innermost dimension's ``ranks``.

        A node is the innermost dimension (the NPUs of a server on HCCS, the processes of a
        host on shared memory); every outer dimension joins nodes. A topology of one
        dimension is one node. Consecutive ranks share a node, as ``mpiexec -hosts
        a:K,b:K`` places them.
        """
        return self.network[0].ranks

    @property
    def core_share(self) -> float:
        """The share of a CPU core each rank runs at: ``cores_per_node / ranks_per_node``.

        At most 1; 1 where the device's ``cores_per_node`` is 0 (an engine per rank).
        """
        cores = self.device.cores_per_node
        return 1.0 if cores <= 0 else min(1.0, cores / self.ranks_per_node)

    def node_of(self, rank: int) -> int:
        """Return the node a rank is on: ``rank // ranks_per_node``.

        Args:
            rank: a rank in ``[0, world_size)``.

        Returns:
            The node's index, from 0.

        """
        self._check_rank("rank", rank)
        return rank // self.ranks_per_node

    def coords(self, rank: int) -> tuple[int, ...]:
        """Return a rank's coordinate along every dimension, innermost first.

        Args:
            rank: a rank in ``[0, world_size)``.

        Returns:
            ``(c0, c1, ...)`` with ``rank = c0 + r0 * (c1 + r1 * (...))``.

        """
        self._check_rank("rank", rank)
        out = []
        for d in self.network:
            rank, c = divmod(rank, d.ranks)
            out.append(c)
        return tuple(out)

    def dim_of(self, rank_a: int, rank_b: int) -> int:
        """Return the dimension two ranks talk over: the outermost one where they differ.

        Args:
            rank_a: a rank in ``[0, world_size)``.
            rank_b: a rank in ``[0, world_size)``.

        Returns:
            The index of the outermost dimension in which the two ranks' coordinates differ,
            or -1 when they are the same rank.

        """
        self._check_rank("rank_a", rank_a)
        self._check_rank("rank_b", rank_b)
        ca, cb = self.coords(rank_a), self.coords(rank_b)
        for i in range(len(self.network) - 1, -1, -1):
            if ca[i] != cb[i]:
                return i
        return -1

    def with_world(self, world_size: int) -> Topology:
        """Return a copy whose outermost dimension is resized to give ``world_size`` ranks.

        Used to simulate a machine at another rank count (more nodes, or a smaller group).

        Args:
            world_size: the wanted number of ranks, a positive multiple of the inner
                dimensions' product.

        Returns:
            A new :class:`Topology`; everything but the outermost ``ranks`` is unchanged.

        Raises:
            ParamInvalidError: ``world_size`` is not a positive multiple of the inner product.

        """
        _integer("world_size", world_size, minimum=1)
        inner = math.prod(d.ranks for d in self.network[:-1])
        if world_size % inner:
            raise ParamInvalidError(
                "world_size",
                world_size,
                f"must be a multiple of {inner}, the ranks of the inner dimensions of {self.name}",
            )
        outer = replace(self.network[-1], ranks=world_size // inner)
        return replace(self, network=(*self.network[:-1], outer))

    def at_speed(self, speed: float) -> Topology:
        """Return a copy of this machine running ``speed`` times as fast (0.5: half as fast).

        Every figure set by the CPU's pace scales: times (``launch_us``, ``issue_us``,
        ``shared_issue_us`` and ``issue_extra_us``, ``shared_latency_us``, ``slice_us``,
        ``warm_us``, the profile's points, each level's ``latency_us``) by ``1 / speed`` and
        rates (``matrix_tflops``, ``vector_tflops``, ``memory_gbps``, ``reduce_gbps``,
        ``issue_gbps``, each level's ``bandwidth_gbps``) by ``speed``, so a plan's simulated
        times scale by ``1 / speed``; a wire's cap (``link_gbps``) keeps its pace, and
        ``probe_tflops`` becomes the probe at that speed.
        For a fit (``probe_tflops``) compared with a run whose probe read otherwise.

        Raises:
            ParamInvalidError: ``speed`` is not a finite number > 0.
        """
        speed = _positive("speed", speed)
        if speed == 1.0:
            return self
        dev, slow = self.device, 1.0 / speed
        device = replace(
            dev,
            matrix_tflops={d: v * speed for d, v in dev.matrix_tflops.items()},
            vector_tflops=dev.vector_tflops * speed,
            memory_gbps=dev.memory_gbps * speed,
            launch_us=dev.launch_us * slow,
            reduce_gbps=dev.reduce_gbps * speed,
            issue_us=dev.issue_us * slow,
            shared_issue_us=dev.shared_issue_us * slow,
            shared_latency_us=dev.shared_latency_us * slow,
            issue_extra_us={k: v * slow for k, v in dev.issue_extra_us.items()},
            issue_gbps=dev.issue_gbps * speed,
            slice_us=dev.slice_us * slow,
            warm_us={k: v * slow for k, v in dev.warm_us.items()},
            profile=tuple(replace(p, us=p.us * slow) for p in dev.profile),
            probe_tflops=dev.probe_tflops * speed,
        )
        network = tuple(
            replace(d, bandwidth_gbps=d.bandwidth_gbps * speed, latency_us=d.latency_us * slow)
            for d in self.network
        )
        return replace(self, device=device, network=network)

    def _check_rank(self, param: str, rank: object) -> None:
        """Raise ``ParamInvalidError`` unless ``rank`` is an int in ``[0, world_size)``."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ParamInvalidError(param, rank, f"must be an integer in [0, {self.world_size})")

    def _check_dim(self, dim: object) -> None:
        """Raise ``ParamInvalidError`` unless ``dim`` is an int in ``[-1, len(network))``."""
        n = len(self.network)
        if isinstance(dim, bool) or not isinstance(dim, int) or not -1 <= dim < n:
            raise ParamInvalidError("dim", dim, f"must be an integer in [-1, {n})")


# ----------------------------------------------------------------------------- YAML reading

_TOP_KEYS = ("name", "description", "source", "device", "network", "contention")
_DEVICE_OPTIONAL = (
    "reduce_gbps",
    "memory_traffic",
    "memory_overlap",
    "concurrent_collectives",
    "one_at_a_time",
    "reductions_in_float32",
    "cores_per_node",
    "issue_us",
    "shared_issue_us",
    "shared_latency_us",
    "issue_extra_us",
    "issue_gbps",
    "slice_us",
    "core_sharing",
    "waiting_weight",
    "warm_us",
    "profile",
    "rank_spread",
    "lone_memory_speedup",
    "probe_tflops",
)
_DEVICE_KEYS = (
    "name",
    "matrix_tflops",
    "vector_tflops",
    "memory_gbps",
    "launch_us",
    "efficiency",
    *_DEVICE_OPTIONAL,
)
_PROFILE_KEYS = ("kind", "dtype", "flops", "bytes", "us", "ranks")
_EFFICIENCY_KEYS = ("small_util", "large_util", "half_flops")
_DIM_KEYS = ("name", "kind", "ranks", "bandwidth_gbps", "latency_us", "link_gbps", "duplex")
_DIM_OPTIONAL = ("name", "link_gbps", "duplex")
_US_BY_KIND = "a mapping of task kind to microseconds"
_CONTENTION_KEYS = ("compute_slowdown", "comm_slowdown", "polled", "source")
_CONTENTION_OPTIONAL = ("compute_slowdown", "comm_slowdown", "polled")

# YAML 1.1 (PyYAML) reads ``1e9`` and ``2.5e9`` as strings; numbers written so are accepted.
_NUMBER_TEXT = re.compile(r"[+-]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][+-]?\d+)?")


class _Reader:
    """Turns the parsed YAML of one file into a :class:`Topology`, naming file and field."""

    def __init__(self, file: str) -> None:
        self.file = file

    def error(self, where: str, value: object, rule: str) -> ParamInvalidError:
        return ParamInvalidError(f"{self.file}: {where}" if where else self.file, value, rule)

    def mapping(
        self, value: object, where: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Check ``value`` is a mapping with exactly the allowed keys, all required ones given."""
        if not isinstance(value, dict):
            what = f"a mapping with keys {', '.join(keys)}"
            raise self.error(where, value, f"must be {what}, not {type(value).__name__}")
        prefix = f"{where}." if where else ""
        for key in value:
            if key not in keys:
                raise self.error(
                    f"{prefix}{key}", value[key], f"unknown key; allowed: {', '.join(keys)}"
                )
        for key in keys:
            if key not in value and key not in optional:
                raise self.error(f"{prefix}{key}", None, "is required")
        return value

    def flag(self, value: object, where: str) -> bool:
        """Return a YAML boolean."""
        if not isinstance(value, bool):
            raise self.error(where, value, "must be true or false")
        return value

    def number(self, value: object, where: str) -> float:
        """Return a YAML number (or numeric text such as ``1e9``) as a float."""
        if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
            return float(value.strip().replace("_", ""))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(where, value, "must be a number")
        return float(value)

    def integer(self, value: object, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(where, value, "must be an integer")
        return value

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise self.error(where, value, "must be a string")
        return value

    def build(self, where: str, factory: Callable[..., _T], **kwargs: Any) -> _T:
        """Call ``factory(**kwargs)``, re-raising its checks' errors with file and field path."""
        try:
            return factory(**kwargs)
        except ParamInvalidError as err:
            path = f"{where}.{err.param}" if where else err.param
            raise self.error(path, err.value, err.rule) from None

    def topology(self, data: object) -> Topology:
        top = self.mapping(data, "", _TOP_KEYS)
        dims_data = top["network"]
        if not isinstance(dims_data, list):
            raise self.error("network", dims_data, "must be a list of dimensions, innermost first")
        if not dims_data:
            raise self.error("network", dims_data, "must have at least one dimension")
        return self.build(
            "",
            Topology,
            name=self.text(top["name"], "name"),
            description=self.text(top["description"], "description"),
            source=self.text(top["source"], "source"),
            device=self.device(top["device"]),
            network=tuple(self.dim(d, f"network[{i}]") for i, d in enumerate(dims_data)),
            contention=self.contention(top["contention"]),
        )

    def device(self, data: object) -> Device:
        dev = self.mapping(data, "device", _DEVICE_KEYS, _DEVICE_OPTIONAL)
        matrix = self.numbers(
            dev["matrix_tflops"], "device.matrix_tflops", "a mapping of dtype name to TFLOP/s"
        )
        eff = self.mapping(dev["efficiency"], "device.efficiency", _EFFICIENCY_KEYS)
        efficiency = self.build(
            "device.efficiency",
            Efficiency,
            **{k: self.number(eff[k], f"device.efficiency.{k}") for k in _EFFICIENCY_KEYS},
        )
        return self.build(
            "device",
            Device,
            name=self.text(dev["name"], "device.name"),
            matrix_tflops=matrix,
            vector_tflops=self.number(dev["vector_tflops"], "device.vector_tflops"),
            memory_gbps=self.number(dev["memory_gbps"], "device.memory_gbps"),
            launch_us=self.number(dev["launch_us"], "device.launch_us"),
            efficiency=efficiency,
            reduce_gbps=self.number(dev.get("reduce_gbps", 0.0), "device.reduce_gbps"),
            memory_traffic=self.number(dev.get("memory_traffic", 1.0), "device.memory_traffic"),
            memory_overlap=self.flag(dev.get("memory_overlap", True), "device.memory_overlap"),
            concurrent_collectives=self.flag(
                dev.get("concurrent_collectives", False), "device.concurrent_collectives"
            ),
            one_at_a_time=self.names(dev.get("one_at_a_time", []), "device.one_at_a_time"),
            reductions_in_float32=self.flag(
                dev.get("reductions_in_float32", False), "device.reductions_in_float32"
            ),
            cores_per_node=self.number(dev.get("cores_per_node", 0.0), "device.cores_per_node"),
            issue_us=self.number(dev.get("issue_us", 0.0), "device.issue_us"),
            shared_issue_us=self.number(dev.get("shared_issue_us", 0.0), "device.shared_issue_us"),
            shared_latency_us=self.number(
                dev.get("shared_latency_us", 0.0), "device.shared_latency_us"
            ),
            issue_gbps=self.number(dev.get("issue_gbps", 0.0), "device.issue_gbps"),
            slice_us=self.number(dev.get("slice_us", 0.0), "device.slice_us"),
            core_sharing=self.text(
                dev.get("core_sharing", CoreSharing.PROCESSOR.value), "device.core_sharing"
            ),
            waiting_weight=self.number(dev.get("waiting_weight", 1.0), "device.waiting_weight"),
            warm_us=self.numbers(dev.get("warm_us", {}), "device.warm_us", _US_BY_KIND),
            issue_extra_us=self.numbers(
                dev.get("issue_extra_us", {}), "device.issue_extra_us", _US_BY_KIND
            ),
            profile=self.profile(dev.get("profile", [])),
            rank_spread=self.number(dev.get("rank_spread", 1.0), "device.rank_spread"),
            lone_memory_speedup=self.number(
                dev.get("lone_memory_speedup", 1.0), "device.lone_memory_speedup"
            ),
            probe_tflops=self.number(dev.get("probe_tflops", 0.0), "device.probe_tflops"),
        )

    def names(self, data: object, where: str) -> tuple[str, ...]:
        """A list of names."""
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise self.error(where, data, "must be a list of names")
        return tuple(data)

    def numbers(self, data: object, where: str, what: str) -> dict[str, float]:
        """A mapping of names to numbers (``what`` says of what, for the error)."""
        if not isinstance(data, dict):
            raise self.error(where, data, f"must be {what}")
        return {str(k): self.number(v, f"{where}.{k}") for k, v in data.items()}

    def profile(self, data: object) -> tuple[ProfilePoint, ...]:
        if not isinstance(data, list):
            raise self.error("device.profile", data, "must be a list of timed tasks")
        points = []
        for i, item in enumerate(data):
            where = f"device.profile[{i}]"
            p = self.mapping(item, where, _PROFILE_KEYS, ("ranks",))
            points.append(
                self.build(
                    where,
                    ProfilePoint,
                    kind=self.text(p["kind"], f"{where}.kind"),
                    dtype=self.text(p["dtype"], f"{where}.dtype"),
                    flops=self.number(p["flops"], f"{where}.flops"),
                    bytes=self.number(p["bytes"], f"{where}.bytes"),
                    us=self.number(p["us"], f"{where}.us"),
                    ranks=self.integer(p.get("ranks", 0), f"{where}.ranks"),
                )
            )
        return tuple(points)

    def dim(self, data: object, where: str) -> NetworkDim:
        d = self.mapping(data, where, _DIM_KEYS, _DIM_OPTIONAL)
        return self.build(
            where,
            NetworkDim,
            name=self.text(d.get("name", ""), f"{where}.name"),
            kind=self.text(d["kind"], f"{where}.kind"),
            ranks=self.integer(d["ranks"], f"{where}.ranks"),
            bandwidth_gbps=self.number(d["bandwidth_gbps"], f"{where}.bandwidth_gbps"),
            latency_us=self.number(d["latency_us"], f"{where}.latency_us"),
            link_gbps=self.number(d.get("link_gbps", 0.0), f"{where}.link_gbps"),
            duplex=self.text(d.get("duplex", Duplex.FULL.value), f"{where}.duplex"),
        )

    def contention(self, data: object) -> Contention:
        c = self.mapping(data, "contention", _CONTENTION_KEYS, _CONTENTION_OPTIONAL)
        return self.build(
            "contention",
            Contention,
            compute_slowdown=self.number(
                c.get("compute_slowdown", 1.0), "contention.compute_slowdown"
            ),
            comm_slowdown=self.number(c.get("comm_slowdown", 1.0), "contention.comm_slowdown"),
            polled=self.flag(c.get("polled", False), "contention.polled"),
            source=self.text(c["source"], "contention.source"),
        )


def load(path: str | os.PathLike[str]) -> Topology:
    """Read a topology file.

    Args:
        path: a YAML file in the format of ``docs/TOPOLOGY.md``.

    Returns:
        The :class:`Topology` it describes.

    Raises:
        ParamInvalidError: the file cannot be read, is not valid YAML, or breaks the format
            (unknown or missing key, wrong type, value out of range, unknown link kind); the
            message names the file and the field path, e.g.
            ``"topologies/a2.yaml: network[1].bandwidth_gbps=-1.0: must be > 0"``.

    """
    file = os.fspath(path)
    data = read_yaml(file)
    return _Reader(file).topology(data)


# ----------------------------------------------------------------------------- YAML writing


def _as_data(topology: Topology) -> dict[str, Any]:
    """Return the plain-data form of ``topology``, in the file format's key order."""
    dev = topology.device
    eff = dev.efficiency
    return {
        "name": topology.name,
        "description": topology.description,
        "source": topology.source,
        "device": {
            "name": dev.name,
            "matrix_tflops": dict(dev.matrix_tflops),
            "vector_tflops": dev.vector_tflops,
            "memory_gbps": dev.memory_gbps,
            "launch_us": dev.launch_us,
            "reduce_gbps": dev.reduce_gbps,
            **({"memory_traffic": dev.memory_traffic} if dev.memory_traffic != 1.0 else {}),
            "memory_overlap": dev.memory_overlap,
            "concurrent_collectives": dev.concurrent_collectives,
            **({"one_at_a_time": list(dev.one_at_a_time)} if dev.one_at_a_time else {}),
            "reductions_in_float32": dev.reductions_in_float32,
            **({"cores_per_node": dev.cores_per_node} if dev.cores_per_node else {}),
            **({"issue_us": dev.issue_us} if dev.issue_us else {}),
            **({"shared_issue_us": dev.shared_issue_us} if dev.shared_issue_us else {}),
            **({"shared_latency_us": dev.shared_latency_us} if dev.shared_latency_us else {}),
            **({"issue_extra_us": dict(dev.issue_extra_us)} if dev.issue_extra_us else {}),
            **({"issue_gbps": dev.issue_gbps} if dev.issue_gbps else {}),
            **({"slice_us": dev.slice_us} if dev.slice_us else {}),
            **(
                {"core_sharing": dev.core_sharing.value}
                if dev.core_sharing is not CoreSharing.PROCESSOR
                else {}
            ),
            **({"waiting_weight": dev.waiting_weight} if dev.waiting_weight != 1.0 else {}),
            **({"warm_us": dict(dev.warm_us)} if dev.warm_us else {}),
            **({"rank_spread": dev.rank_spread} if dev.rank_spread != 1.0 else {}),
            **(
                {"lone_memory_speedup": dev.lone_memory_speedup}
                if dev.lone_memory_speedup != 1.0
                else {}
            ),
            **({"probe_tflops": dev.probe_tflops} if dev.probe_tflops else {}),
            "efficiency": {
                "small_util": eff.small_util,
                "large_util": eff.large_util,
                "half_flops": eff.half_flops,
            },
            **(
                {
                    "profile": [
                        {
                            "kind": p.kind,
                            "dtype": p.dtype,
                            "flops": p.flops,
                            "bytes": p.bytes,
                            "us": p.us,
                            **({"ranks": p.ranks} if p.ranks else {}),
                        }
                        for p in dev.profile
                    ]
                }
                if dev.profile
                else {}
            ),
        },
        "network": [
            {
                "name": d.name,
                "kind": d.kind.value,
                "ranks": d.ranks,
                "bandwidth_gbps": d.bandwidth_gbps,
                "latency_us": d.latency_us,
                **({"link_gbps": d.link_gbps} if d.link_gbps > 0 else {}),
                **({"duplex": d.duplex.value} if d.duplex is not Duplex.FULL else {}),
            }
            for d in topology.network
        ],
        "contention": {
            "compute_slowdown": topology.contention.compute_slowdown,
            "comm_slowdown": topology.contention.comm_slowdown,
            **({"polled": True} if topology.contention.polled else {}),
            "source": topology.contention.source,
        },
    }


def dump(topology: Topology, path: str | os.PathLike[str]) -> None:
    """Write ``topology`` as YAML that :func:`load` reads back equal.

    The file is written to a temporary file in the same folder and moved into place
    (``os.replace``), so a reader never sees half a file.

    Args:
        topology: the topology to write.
        path: the destination file; its folder must exist.

    """
    if not isinstance(topology, Topology):
        raise ParamInvalidError("topology", topology, "must be a Topology")
    write_yaml(_as_data(topology), path)


# ----------------------------------------------------------------------------- shipped files


def builtin_dir() -> Path:
    """Return the shipped ``topologies`` folder: the repository's, or an install's copy."""
    return shipped_dir("topologies")


def list_builtin() -> list[str]:
    """Return the names of the shipped topologies (the ``*.yaml`` files of :func:`builtin_dir`).

    Returns:
        Sorted names without the ``.yaml`` suffix; empty when the folder is absent (an
        installed package without the source tree).

    """
    return shipped_names(builtin_dir())


def builtin(name: str) -> Topology:
    """Load the shipped topology ``topologies/<name>.yaml``.

    Args:
        name: one of :func:`list_builtin`, e.g. ``"atlas_a2_8p"``.

    Returns:
        The loaded :class:`Topology`.

    Raises:
        ParamInvalidError: no shipped topology has that name.

    """
    return load(shipped_file(builtin_dir(), name, "topology"))


def resolve(name_or_path: str | os.PathLike[str]) -> Topology:
    """A shipped topology by name (:func:`builtin`), or else a topology file by path.

    Each is read once while unchanged (a sweep asks once per point; a topology is immutable).

    Args:
        name_or_path: one of :func:`list_builtin`, or a topology file's path.

    Returns:
        The loaded :class:`Topology`.

    Raises:
        ParamInvalidError: neither a shipped topology nor a readable topology file.

    """
    text = os.fspath(name_or_path)
    path = Path(text)
    if text not in list_builtin() and path.is_file():
        stat = path.stat()
        return _resolved(text, (stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return _resolved(text, None)


@functools.lru_cache(maxsize=16)
def _resolved(name_or_path: str, version: tuple[int, int, int] | None) -> Topology:
    """:func:`resolve` uncached; ``version`` (a file's stat) is the cache key."""
    del version
    if name_or_path in list_builtin():
        return builtin(name_or_path)
    return load(name_or_path)
