"""The one timeline type of mc2sim: per-task records, their metrics, recording and gathering.

Both the real executor and the cost-model simulator describe an op call the same way: for
every task of its plan, on every rank, when it started and ended and on which stream. That
record is :class:`TaskRecord`; a set of them is a :class:`Timeline` (``source`` says whether
the times were measured or simulated). :meth:`Timeline.metrics` turns one run's timeline into
:class:`Metrics`. Every record names its run by a :class:`RunKey` (op, tiling, repetition),
never by a label string. The files of a results folder (Chrome trace, tasks CSV, summary)
are written and read by :mod:`mc2sim.results`.

Recording a real run::

    with mc2sim.timeline.record() as rec:
        out = mm_all_reduce(...)  # the executor calls current_recorder().add(...)
    everything = mc2sim.timeline.gather(comm, rec.timeline)  # every rank's records
    run = everything.runs()[0]  # RunKey(op="mm_all_reduce", tiling="tiles=4", repetition=0)
    metrics = everything.for_run(run).metrics()
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from mc2sim._compat import StrEnum
from mc2sim.errors import ParamInvalidError

if TYPE_CHECKING:
    from mc2sim.comm.base import Communicator

__all__ = [
    "Clock",
    "Metrics",
    "Outline",
    "RankMetrics",
    "Recorder",
    "RunColumns",
    "RunKey",
    "Source",
    "Stream",
    "TaskRecord",
    "Timeline",
    "busy_time",
    "busy_times",
    "current_recorder",
    "gather",
    "record",
]


class Stream(StrEnum):
    """The resource a task occupied on its rank.

    Glossary:
        ``compute``: the rank's compute engine (matmul tiles, grouped matmul, quantization).
            Tasks on it count towards ``compute_s``.
        ``comm``: the rank's communication engine (allreduce, alltoallv, ... chunks). Tasks
            on it count towards ``comm_s``; the part of a run's time not covered by compute
            is its exposed communication.
    """

    COMPUTE = "compute"
    COMM = "comm"


class Clock(StrEnum):
    """What timed a task's ``start_s`` and ``end_s``.

    Glossary:
        ``host``: the host's monotonic clock (``time.perf_counter_ns``) around the task, run
            on the calling thread: the CPU executor. Simulated records carry it too (their
            times are the model's).
        ``device``: events recorded on the task's device stream (compute stream or comm
            stream) before and after its kernels, measured against the run's epoch event.
        ``staged``: device events around a collective that the host progressed: the data
            left the device (event before the copy to host memory), travelled by MPI on the
            host, and landed back (event after the copy to the device). The wire time in
            between is the host's (``host_end_s`` is when the host saw MPI complete).
    """

    HOST = "host"
    DEVICE = "device"
    STAGED = "staged"


class Source(StrEnum):
    """Where a timeline's times come from.

    Glossary:
        ``measured``: wall-clock times recorded by the real executor on each rank.
        ``simulated``: times computed by the cost-model simulator from the same plan.
    """

    MEASURED = "measured"
    SIMULATED = "simulated"


def _as_enum(enum: type[StrEnum], param: str, value: object) -> Any:
    """Return ``value`` as a member of ``enum``, raising ``ParamInvalidError`` otherwise."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ParamInvalidError(param, value, f"must be one of {allowed}") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class RunKey:
    """Which op call a task belongs to: the op, its tiling in words and the repetition.

    A run is data, never a label to parse: ``str(key)`` (``"op/tiling#repetition"``) is for
    display only (Chrome trace arguments, tables).
    """

    op: str
    """The fused op, e.g. ``"mm_all_reduce"`` (``Plan.op``)."""

    tiling: str
    """The tiling in words, as ``Plan.tiling`` gives it, e.g. ``"tiles=4"`` or ``"serial"``."""

    repetition: int = 0
    """Which call of ``op`` under ``tiling`` this is, from 0 (always 0 when simulated)."""

    def __post_init__(self) -> None:
        for name in ("op", "tiling"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ParamInvalidError(name, value, "must be a non-empty string")
        if type(self.repetition) is not int:  # accept NumPy integers, store plain ints
            try:
                object.__setattr__(self, "repetition", int(operator.index(self.repetition)))
            except TypeError:
                raise ParamInvalidError(
                    "repetition", self.repetition, "must be an int >= 0"
                ) from None
        if self.repetition < 0:
            raise ParamInvalidError("repetition", self.repetition, "must be an int >= 0")

    def __str__(self) -> str:
        return f"{self.op}/{self.tiling}#{self.repetition}"


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskRecord:
    """When one task of a plan ran on one rank, and on which stream."""

    rank: int
    """The rank that ran the task (>= 0)."""

    run: RunKey
    """The op call the task belongs to."""

    task: int
    """The task's id within its plan (>= 0)."""

    name: str
    """Short name of the task, e.g. ``"matmul[2]"`` or ``"allreduce[2]"``."""

    stream: Stream
    """The resource the task occupied (a ``Stream`` or its string value)."""

    kind: str
    """What the task does, e.g. ``"matmul"``, ``"grouped_matmul"``, ``"allreduce"``."""

    start_s: float
    """Start, in seconds from the run's epoch (finite)."""

    end_s: float
    """End, in seconds from the run's epoch (finite, >= ``start_s``)."""

    flops: int = 0
    """Floating-point operations the task performed (>= 0; 0 when not counted)."""

    bytes: int = 0
    """Bytes the task moved (>= 0; 0 when not counted)."""

    intra_bytes: int = 0
    """Of a comm task, the bytes the rank sent to ranks of its own node (>= 0), as
    :func:`mc2sim.schedule.traffic.level_bytes` splits them; 0 for compute tasks."""

    inter_bytes: int = 0
    """Of a comm task, the bytes the rank sent to other nodes (>= 0); 0 on one node."""

    clock: Clock = Clock.HOST
    """What timed ``start_s`` and ``end_s`` (a ``Clock`` or its string value)."""

    host_start_s: float | None = None
    """When the host began issuing the task, in seconds from the run's epoch on the host's
    clock; None (the default) means ``start_s``: a host-timed task starts when issued."""

    host_end_s: float | None = None
    """When the host was done with the task: for a device task, when its kernels were
    enqueued (``host_end_s - host_start_s`` is the launch overhead); for a staged
    collective, when the host saw MPI complete. None (the default) means ``end_s``."""

    cpu_s: float | None = None
    """The CPU time the rank's process spent while the task ran, in seconds (>= 0): a
    compute task run on the host's CPU; None (the default) where not measured (collectives,
    tasks on a device). Where ranks share cores it is the task's own work, which the task's
    span (``end_s - start_s``) also holds the other ranks' turns in."""

    def __post_init__(self) -> None:
        if not isinstance(self.run, RunKey):
            raise ParamInvalidError("run", self.run, "must be a RunKey")
        if not isinstance(self.stream, Stream):
            object.__setattr__(self, "stream", _as_enum(Stream, "stream", self.stream))
        for name in ("rank", "task", "flops", "bytes", "intra_bytes", "inter_bytes"):
            value = getattr(self, name)
            if type(value) is not int:  # accept NumPy integers, store plain ints
                try:
                    value = operator.index(value)
                except TypeError:
                    raise ParamInvalidError(name, value, "must be an int >= 0") from None
                object.__setattr__(self, name, int(value))
            if value < 0:
                raise ParamInvalidError(name, value, "must be an int >= 0")
        for name in ("start_s", "end_s"):
            value = getattr(self, name)
            if type(value) is not float:  # ints and NumPy floats are stored as plain floats
                try:
                    object.__setattr__(self, name, float(value))
                except (TypeError, ValueError):
                    raise ParamInvalidError(name, value, "must be a number") from None
        if not (math.isfinite(self.start_s) and math.isfinite(self.end_s)):
            raise ParamInvalidError(
                "start_s, end_s", (self.start_s, self.end_s), "must be finite numbers"
            )
        if self.end_s < self.start_s:
            raise ParamInvalidError(
                "end_s", self.end_s, f"must be >= start_s ({self.start_s}) in task {self.name!r}"
            )
        if not isinstance(self.clock, Clock):
            object.__setattr__(self, "clock", _as_enum(Clock, "clock", self.clock))
        for name, default in (("host_start_s", self.start_s), ("host_end_s", self.end_s)):
            value = getattr(self, name)
            if value is None:
                value = default
            elif type(value) is not float:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise ParamInvalidError(name, value, "must be a number or None") from None
            if not math.isfinite(value):
                raise ParamInvalidError(name, value, "must be a finite number")
            object.__setattr__(self, name, value)
        if self.cpu_s is not None:
            try:
                cpu = float(self.cpu_s)
            except (TypeError, ValueError):
                raise ParamInvalidError("cpu_s", self.cpu_s, "must be a number or None") from None
            if not (math.isfinite(cpu) and cpu >= 0):
                raise ParamInvalidError("cpu_s", self.cpu_s, "must be a finite number >= 0")
            object.__setattr__(self, "cpu_s", cpu)
        if self.host_span_s[1] < self.host_span_s[0]:
            raise ParamInvalidError(
                "host_end_s",
                self.host_end_s,
                f"must be >= host_start_s ({self.host_start_s}) in task {self.name!r}",
            )

    @property
    def duration_s(self) -> float:
        """``end_s - start_s``, in seconds."""
        return self.end_s - self.start_s

    @property
    def host_span_s(self) -> tuple[float, float]:
        """``(host_start_s, host_end_s)``, both numbers (filled in from the task's own)."""
        start = self.start_s if self.host_start_s is None else self.host_start_s
        end = self.end_s if self.host_end_s is None else self.host_end_s
        return start, end


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """Return the length of the union of closed intervals: overlapping ones count once.

    Args:
        intervals: ``(start, end)`` pairs with ``end >= start``, in any order.

    Returns:
        The total time covered by at least one interval (0.0 for none).

    """
    total = 0.0
    cur_start = cur_end = -math.inf
    for start, end in sorted(intervals):
        if start > cur_end:  # a gap: close the current block and open a new one
            if cur_end > cur_start:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        elif end > cur_end:
            cur_end = end
    if cur_end > cur_start:
        total += cur_end - cur_start
    return total


@dataclass(frozen=True, kw_only=True, slots=True)
class Outline:
    """A timeline's runs, ranks and meta without its records.

    What a results folder's summary needs where the per-task files are left out
    (:func:`mc2sim.results.encode_results`): a simulation of many thousand ranks.
    """

    source: Source
    """Measured or simulated."""
    run_keys: tuple[RunKey, ...]
    """The runs, in order."""
    world: int
    """Ranks 0..world-1 have records."""
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """As :attr:`Timeline.meta`."""

    def runs(self) -> list[RunKey]:
        """The runs, in order."""
        return list(self.run_keys)

    def ranks(self) -> list[int]:
        """The ranks, in increasing order."""
        return list(range(self.world))


def busy_times(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """:func:`busy_time` of many sets of intervals at once: row ``r`` is one set.

    The same arithmetic in the same order as :func:`busy_time`, a column at a time, so each
    row's result equals ``busy_time(zip(start[r], end[r]))`` exactly.

    Args:
        start: (sets, intervals) starts.
        end: (sets, intervals) ends, ``end >= start``.

    Returns:
        (sets,) float64 lengths of the unions.
    """
    sets = start.shape[0]
    total = np.zeros(sets)
    if start.shape[1] == 0:
        return total
    order = np.lexsort((end, start), axis=1)  # by start, then end: as sorted() orders tuples
    start, end = np.take_along_axis(start, order, 1), np.take_along_axis(end, order, 1)
    cur_start = np.full(sets, -math.inf)
    cur_end = np.full(sets, -math.inf)
    with np.errstate(invalid="ignore"):  # -inf - -inf before the first block: never taken
        for i in range(start.shape[1]):
            s, e = start[:, i], end[:, i]
            gap = s > cur_end
            close = gap & (cur_end > cur_start)
            total = np.where(close, total + (cur_end - cur_start), total)
            cur_start = np.where(gap, s, cur_start)
            cur_end = np.where(gap, e, np.where(e > cur_end, e, cur_end))
        return np.where(cur_end > cur_start, total + (cur_end - cur_start), total)


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class RunColumns:
    """One run's task records as columns: task ``i`` of rank ``r`` at ``[i, r]``.

    What the lockstep simulator makes (:mod:`mc2sim.model.simulator`), where every rank's
    plan has the same tasks in kind and order (their names and figures may differ): the
    same facts as the run's :class:`TaskRecord` objects, in arrays, so that metrics over
    thousands of ranks need no object per task. :meth:`timeline` gives the records.
    """

    run: RunKey
    """The op call."""
    kinds: tuple[str, ...]
    """Task ``i``'s kind (the same on every rank)."""
    streams: tuple[Stream, ...]
    """Task ``i``'s stream."""
    names: tuple[tuple[str, ...], ...]
    """``names[r][i]``: task ``i``'s name on rank ``r``."""
    start_s: np.ndarray
    """(tasks, ranks) float64 starts."""
    end_s: np.ndarray
    """(tasks, ranks) float64 ends."""
    flops: np.ndarray
    """(tasks, ranks) int64."""
    bytes: np.ndarray
    """(tasks, ranks) int64."""
    intra_bytes: np.ndarray
    """(tasks, ranks) int64: a comm task's bytes to its rank's own node."""
    inter_bytes: np.ndarray
    """(tasks, ranks) int64: a comm task's bytes to other nodes."""

    @property
    def world(self) -> int:
        """Ranks."""
        return int(self.start_s.shape[1])

    def records(self) -> list[TaskRecord]:
        """The run's records, in the order the tasks ended (as the event engine emits them).

        Ties go by rank, then task.
        """
        tasks = len(self.kinds)
        order = np.argsort(self.end_s.T, axis=None, kind="stable").tolist()
        columns = [
            a.T.ravel().tolist()
            for a in (
                self.start_s,
                self.end_s,
                self.flops,
                self.bytes,
                self.intra_bytes,
                self.inter_bytes,
            )
        ]
        start, end, flops, nbytes, intra, inter = columns
        out = []
        for at in order:
            rank, i = divmod(at, tasks)
            out.append(
                TaskRecord(
                    rank=rank,
                    run=self.run,
                    task=i,
                    name=self.names[rank][i],
                    stream=self.streams[i],
                    kind=self.kinds[i],
                    start_s=start[at],
                    end_s=end[at],
                    flops=flops[at],
                    bytes=nbytes[at],
                    intra_bytes=intra[at],
                    inter_bytes=inter[at],
                )
            )
        return out

    def _busy(self, stream: Stream) -> np.ndarray:
        rows = [i for i, s in enumerate(self.streams) if s is stream]
        return busy_times(self.start_s[rows].T, self.end_s[rows].T)

    def _totals(self) -> np.ndarray:
        """Every rank's last end minus the run's first start."""
        out: np.ndarray = self.end_s.max(axis=0) - self.start_s.min()
        return out

    def baseline(self) -> tuple[np.ndarray, float]:
        """What a run compared with this one reads of it.

        Every rank's ``comm_s`` (the overlap's t_pure) and the slowest rank's ``total_s``
        (the speedup's numerator).
        """
        return self._busy(Stream.COMM), float(self._totals().max())

    def metrics(self, *, baseline: RunColumns | tuple[np.ndarray, float] | None = None) -> Metrics:
        """:meth:`Timeline.metrics` of this run (the same values), ``baseline`` likewise.

        ``baseline`` may also be its :meth:`baseline`, read once for many runs.

        Raises:
            ParamInvalidError: the baseline has another number of ranks.
        """
        base = baseline.baseline() if isinstance(baseline, RunColumns) else baseline
        if base is not None and base[0].size != self.world:
            raise ParamInvalidError(
                "baseline", f"{base[0].size} ranks", f"must have this run's {self.world}"
            )
        comm = self._busy(Stream.COMM)
        per_rank = _rank_metrics_of(
            range(self.world),
            self._totals(),
            self._busy(Stream.COMPUTE),
            comm,
            comm if base is None else base[0],
            self.flops.sum(axis=0).tolist(),
            self.bytes.sum(axis=0).tolist(),
        )
        return _job_metrics(per_rank, None if base is None else base[1])

    def timeline(self, *, meta: Mapping[str, Any] | None = None) -> Timeline:
        """The run's records as a simulated :class:`Timeline`."""
        return Timeline(records=tuple(self.records()), source=Source.SIMULATED, meta=meta or {})


@dataclass(frozen=True, kw_only=True, slots=True)
class RankMetrics:
    """How one rank spent one run: busy time per stream, exposed communication, overlap.

    All times are in seconds; see :meth:`Timeline.metrics` for the definitions and sources.
    """

    rank: int
    """The rank these metrics describe."""

    total_s: float
    """The rank's last end minus the run's first start (of any rank)."""

    compute_s: float
    """Busy time of the compute stream: the union of its tasks' intervals."""

    comm_s: float
    """Busy time of the comm stream: the union of its tasks' intervals."""

    exposed_comm_s: float
    """``max(0, total_s - compute_s)``: time not hidden behind compute (ASTRA-sim)."""

    pure_comm_s: float
    """t_pure of the overlap formula: the baseline's ``comm_s`` of this rank, else own."""

    overlap_pct: float
    """OSU overlap: ``clip(100 * (1 - (total_s - compute_s) / pure_comm_s), 0, 100)``."""

    flops: int
    """Sum of the rank's tasks' ``flops``."""

    bytes: int
    """Sum of the rank's tasks' ``bytes``."""

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return {name: getattr(self, name) for name in _RANK_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankMetrics:
        """Rebuild from :meth:`as_dict`'s output.

        Args:
            data: a mapping with every field's name.

        Returns:
            The equal ``RankMetrics``.

        """
        return cls(**{name: data[name] for name in _RANK_FIELDS})


_RANK_FIELDS = (
    "rank",
    "total_s",
    "compute_s",
    "comm_s",
    "exposed_comm_s",
    "pure_comm_s",
    "overlap_pct",
    "flops",
    "bytes",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Metrics:
    """The metrics of one run: per rank, and for the job as its critical rank sees it.

    See :meth:`Timeline.metrics` for the definitions and sources.
    """

    per_rank: tuple[RankMetrics, ...]
    """One entry per rank, in rank order."""

    critical_rank: int
    """The rank with the largest ``total_s`` (the lowest such rank on a tie)."""

    total_s: float
    """The critical rank's ``total_s``: the slowest rank decides the job's time."""

    compute_s: float
    """The critical rank's ``compute_s``."""

    comm_s: float
    """The critical rank's ``comm_s``."""

    exposed_comm_s: float
    """The critical rank's ``exposed_comm_s``."""

    overlap_pct: float
    """The critical rank's ``overlap_pct``."""

    speedup: float | None
    """``baseline.total_s / total_s``; None without a baseline or when ``total_s`` is 0."""

    def as_dict(self) -> dict[str, Any]:
        """Return the metrics as a JSON-ready dict (``per_rank`` as a list of dicts)."""
        return {
            "per_rank": [m.as_dict() for m in self.per_rank],
            "critical_rank": self.critical_rank,
            "total_s": self.total_s,
            "compute_s": self.compute_s,
            "comm_s": self.comm_s,
            "exposed_comm_s": self.exposed_comm_s,
            "overlap_pct": self.overlap_pct,
            "speedup": self.speedup,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metrics:
        """Rebuild from :meth:`as_dict`'s output (e.g. read back from a summary JSON).

        Args:
            data: a mapping with every field's name.

        Returns:
            The equal ``Metrics``.

        """
        return cls(
            per_rank=tuple(RankMetrics.from_dict(m) for m in data["per_rank"]),
            critical_rank=data["critical_rank"],
            total_s=data["total_s"],
            compute_s=data["compute_s"],
            comm_s=data["comm_s"],
            exposed_comm_s=data["exposed_comm_s"],
            overlap_pct=data["overlap_pct"],
            speedup=data["speedup"],
        )


def _rank_metrics_of(
    ranks: Iterable[int],
    total: np.ndarray,
    compute: np.ndarray,
    comm: np.ndarray,
    pure: np.ndarray,
    flops: list[int],
    nbytes: list[int],
) -> list[RankMetrics]:
    """Each rank's :class:`RankMetrics` from its times, for records and columns alike.

    Exposed comm and the OSU overlap as :meth:`Timeline.metrics` defines them; the arrays'
    entry ``i`` is rank ``ranks[i]``'s.
    """
    exposed = np.maximum(0.0, total - compute)
    with np.errstate(divide="ignore", invalid="ignore"):  # no comm: 0, as OSU's benchmarks
        overlap = np.where(
            pure > 0.0,
            np.maximum(0.0, np.minimum(100.0, 100.0 * (1.0 - (total - compute) / pure))),
            0.0,
        )
    rows = zip(
        ranks, total.tolist(), compute.tolist(), comm.tolist(), exposed.tolist(),
        pure.tolist(), overlap.tolist(), flops, nbytes, strict=True,
    )  # fmt: skip
    return [
        RankMetrics(
            rank=r,
            total_s=t,
            compute_s=c,
            comm_s=m,
            exposed_comm_s=x,
            pure_comm_s=p,
            overlap_pct=o,
            flops=f,
            bytes=b,
        )  # fmt: skip
        for r, t, c, m, x, p, o, f, b in rows
    ]


def _job_metrics(per_rank: Sequence[RankMetrics], base_total: float | None) -> Metrics:
    """A run's :class:`Metrics` from its ranks' (and the baseline's slowest total, if any)."""
    critical = max(per_rank, key=lambda m: (m.total_s, -m.rank))
    speedup = None
    if base_total is not None and critical.total_s > 0.0:
        speedup = base_total / critical.total_s
    return Metrics(
        per_rank=tuple(per_rank),
        critical_rank=critical.rank,
        total_s=critical.total_s,
        compute_s=critical.compute_s,
        comm_s=critical.comm_s,
        exposed_comm_s=critical.exposed_comm_s,
        overlap_pct=critical.overlap_pct,
        speedup=speedup,
    )


def _freeze_meta(meta: Mapping[str, Any] | None) -> MappingProxyType[str, Any]:
    """Return a read-only copy of ``meta``, checking it is JSON-serialisable."""
    copy = dict(meta or {})
    try:
        json.dumps(copy, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ParamInvalidError("meta", copy, f"must be JSON-serialisable ({exc})") from None
    return MappingProxyType(copy)


def _rebuild_timeline(
    records: tuple[TaskRecord, ...], source: str, meta: dict[str, Any]
) -> Timeline:
    """Unpickle a :class:`Timeline` (its read-only ``meta`` travels as a dict)."""
    return Timeline(records=records, source=Source(source), meta=meta)


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeline:
    """Task records of one or more runs on one or more ranks, measured or simulated."""

    records: tuple[TaskRecord, ...] = ()
    """The records, in the order they were added (any iterable is stored as a tuple)."""

    source: Source = Source.MEASURED
    """Whether the times were measured by the executor or computed by the simulator."""

    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Free-form, JSON-serialisable facts (world size, op, tiling, ...); stored read-only."""

    def __post_init__(self) -> None:
        if not isinstance(self.records, tuple):
            object.__setattr__(self, "records", tuple(self.records))
        for rec in self.records:
            if not isinstance(rec, TaskRecord):
                raise ParamInvalidError("records", rec, "must hold TaskRecord objects only")
        if not isinstance(self.source, Source):
            object.__setattr__(self, "source", _as_enum(Source, "source", self.source))
        object.__setattr__(self, "meta", _freeze_meta(self.meta))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_timeline, (self.records, self.source.value, dict(self.meta)))

    def ranks(self) -> list[int]:
        """Return the ranks that have records, in increasing order."""
        return sorted({r.rank for r in self.records})

    def runs(self) -> list[RunKey]:
        """Return the runs, in the order of their first record."""
        return self.run_positions()[0]

    def run_positions(self) -> tuple[list[RunKey], list[int]]:
        """Return the runs (as :meth:`runs`) and each record's run, as a position among them.

        Each distinct ``RunKey`` object is hashed once (the simulator shares one per rank), so
        grouping a timeline's records by run costs about a dict lookup per record.
        """
        runs: dict[RunKey, int] = {}
        by_object: dict[int, int] = {}  # id of a RunKey the records hold -> its position
        positions = []
        for rec in self.records:
            position = by_object.get(id(rec.run))
            if position is None:
                position = by_object[id(rec.run)] = runs.setdefault(rec.run, len(runs))
            positions.append(position)
        return list(runs), positions

    def by_run(self) -> dict[RunKey, Timeline]:
        """Return each run's timeline (as :meth:`for_run` gives it), runs in :meth:`runs` order.

        One pass over the records, however many runs.
        """
        runs, positions = self.run_positions()
        kept: list[list[TaskRecord]] = [[] for _ in runs]
        for rec, position in zip(self.records, positions, strict=True):
            kept[position].append(rec)
        return {
            run: Timeline(records=tuple(records), source=self.source, meta=self.meta)
            for run, records in zip(runs, kept, strict=True)
        }

    def metrics_by_run(self, baseline: RunKey) -> dict[RunKey, Metrics]:
        """Each run's :meth:`metrics` against the ``baseline`` run, runs in :meth:`runs` order.

        One pass over the records (:meth:`by_run`), however many runs.
        """
        per_run = self.by_run()
        base = per_run[baseline]._rank_metrics(None)  # read once for every run
        return {run: one._metrics_against(base) for run, one in per_run.items()}

    def for_rank(self, rank: int) -> Timeline:
        """Return the timeline of ``rank``'s records only (same source and meta).

        Args:
            rank: the rank to keep.

        Returns:
            A timeline, empty when ``rank`` has no records.

        """
        kept = tuple(r for r in self.records if r.rank == rank)
        return Timeline(records=kept, source=self.source, meta=self.meta)

    def for_run(self, run: RunKey) -> Timeline:
        """Return the timeline of run ``run``'s records only (same source and meta).

        Args:
            run: the run to keep.

        Returns:
            A timeline, empty when ``run`` has no records.

        """
        runs, positions = self.run_positions()
        wanted = runs.index(run) if run in runs else -1
        kept = tuple(r for r, p in zip(self.records, positions, strict=True) if p == wanted)
        return Timeline(records=kept, source=self.source, meta=self.meta)

    @classmethod
    def merge(cls, *timelines: Timeline, meta: Mapping[str, Any] | None = None) -> Timeline:
        """Concatenate the records of timelines of one source, in the order given.

        Args:
            *timelines: at least one timeline; all must have the same ``source``.
            meta: the merged timeline's meta. By default the union of the timelines' metas,
                which must agree on every key they share.

        Returns:
            One timeline holding every record.

        Raises:
            ParamInvalidError: no timelines, different sources, or metas that disagree and
                no ``meta`` given.

        """
        if not timelines:
            raise ParamInvalidError("timelines", (), "must hold at least one timeline")
        sources = sorted({t.source.value for t in timelines})
        if len(sources) > 1:
            raise ParamInvalidError("source", sources, "timelines to merge must share one")
        if meta is None:
            merged: dict[str, Any] = {}
            for t in timelines:
                for key, value in t.meta.items():
                    if key in merged and merged[key] != value:
                        raise ParamInvalidError(
                            f"meta[{key!r}]",
                            (merged[key], value),
                            "differs between the timelines; pass meta= to merge them",
                        )
                    merged[key] = value
            meta = merged
        records = tuple(rec for t in timelines for rec in t.records)
        return cls(records=records, source=timelines[0].source, meta=meta)

    def _single_run(self, param: str) -> RunKey:
        """Return the one run this timeline holds, or raise ``ParamInvalidError``."""
        runs = self.runs()
        if not runs:
            raise ParamInvalidError(param, "no records", "is empty: there is nothing to measure")
        if len(runs) > 1:
            raise ParamInvalidError(
                param,
                [str(run) for run in runs],
                "holds several runs; pick one with .for_run(run) before computing metrics",
            )
        return runs[0]

    def _rank_metrics(self, pure_by_rank: Mapping[int, float] | None) -> list[RankMetrics]:
        """Return each rank's metrics, in rank order (the timeline holds one run).

        ``pure_by_rank`` gives t_pure of each rank (the baseline's ``comm_s``); without it
        each rank's own ``comm_s`` stands in.
        """
        by_rank: dict[int, list[TaskRecord]] = {}
        for rec in self.records:
            by_rank.setdefault(rec.rank, []).append(rec)
        ranks = sorted(by_rank)
        began = min(r.start_s for r in self.records)
        times = []
        for rank in ranks:
            recs = by_rank[rank]
            compute = busy_time((r.start_s, r.end_s) for r in recs if r.stream is Stream.COMPUTE)
            comm = busy_time((r.start_s, r.end_s) for r in recs if r.stream is Stream.COMM)
            total = max(r.end_s for r in recs) - began
            if pure_by_rank is None:
                pure = comm
            elif rank in pure_by_rank:
                pure = pure_by_rank[rank]
            else:
                raise ParamInvalidError(
                    "baseline", sorted(pure_by_rank), f"has no records of rank {rank}"
                )
            times.append((total, compute, comm, pure))
        total_s, compute_s, comm_s, pure_s = (
            np.array(c, dtype=float) for c in zip(*times, strict=True)
        )
        return _rank_metrics_of(
            ranks, total_s, compute_s, comm_s, pure_s,
            [sum(r.flops for r in by_rank[k]) for k in ranks],
            [sum(r.bytes for r in by_rank[k]) for k in ranks],
        )  # fmt: skip

    def metrics(self, *, baseline: Timeline | None = None) -> Metrics:
        """Return the metrics of the one run this timeline holds.

        Per rank (times in seconds):

        * ``total_s``: the rank's last end minus the run's first start (of any rank): the
          ranks' clocks line up (one machine's ranks read its clock, machines are lined up
          by the barrier before the run), so a rank that started late, e.g. waiting for a
          core it shares, spent that wait in the call.
        * ``compute_s`` / ``comm_s``: busy time of the compute / comm stream, i.e. the length
          of the union of its records' intervals (concurrent tasks count once).
        * ``exposed_comm_s = max(0, total_s - compute_s)``: the time not hidden behind
          compute, ASTRA-sim's "exposed communication". Idle gaps, where the rank waits on
          neither stream, count as exposed: the rank was waiting for something other than
          its compute.
        * ``overlap_pct``: the OSU micro-benchmarks' overlap of non-blocking collectives,
          ``max(0, min(100, 100 * (1 - (t_overall - t_compute) / t_pure)))`` with
          ``t_overall = total_s``, ``t_compute = compute_s`` and ``t_pure`` the pure
          communication time: the ``baseline``'s ``comm_s`` of the same rank (the serial
          plan's communication, measured alone) when a baseline is given, else this rank's
          own ``comm_s``. When ``t_pure`` is 0 there is nothing to overlap and it is 0.0.

        For the job: ``total_s`` is the largest rank ``total_s`` (the slowest rank decides);
        that rank is the ``critical_rank`` (lowest on a tie) and ``compute_s``, ``comm_s``,
        ``exposed_comm_s`` and ``overlap_pct`` are its own. ``speedup`` is
        ``baseline.metrics().total_s / total_s`` with a baseline, else None (None also when
        ``total_s`` is 0).

        Args:
            baseline: the same op's serial run (one run, records of every rank of this
                one), e.g. ``timeline.for_run(RunKey(op="mm_all_reduce", tiling="serial"))``.

        Returns:
            The run's metrics.

        Raises:
            ParamInvalidError: this timeline or the baseline is empty or holds several runs,
                or the baseline lacks a rank of this timeline.

        """
        self._single_run("timeline")
        base: list[RankMetrics] | None = None
        if baseline is not None:
            baseline._single_run("baseline")
            base = baseline._rank_metrics(None)
        return self._metrics_against(base)

    def _metrics_against(self, base: list[RankMetrics] | None) -> Metrics:
        """:meth:`metrics` of one run, the baseline's rank metrics given (read once for many)."""
        per_rank = self._rank_metrics(None if base is None else {m.rank: m.comm_s for m in base})
        return _job_metrics(per_rank, None if base is None else max(m.total_s for m in base))


_FIELDS = (
    "rank",
    "run",
    "task",
    "name",
    "stream",
    "kind",
    "start_s",
    "end_s",
    "flops",
    "bytes",
    "intra_bytes",
    "inter_bytes",
    "clock",
    "host_start_s",
    "host_end_s",
    "cpu_s",
)
"""TaskRecord's fields, in the order ``Recorder.add_raw`` takes them."""

_RAW_LENGTHS = (_FIELDS.index("inter_bytes") + 1, len(_FIELDS))
"""How many fields ``add_raw`` takes: up to the bytes by level (host-timed, no CPU time), or
all."""


class Recorder:
    """Collects the task records of the executor while a :func:`record` context is active.

    Records added to a recorder are also added to its parent (the recorder that was active
    when this one was opened), so an outer ``record()`` sees everything recorded inside
    inner ones, while an inner one sees only its own. ``add`` may be called from several
    threads; note that a new thread does not inherit the context, so an executor looks the
    recorder up with :func:`current_recorder` in the calling thread and hands it on.
    """

    __slots__ = ("_lock", "_parent", "_records", "meta")

    def __init__(
        self, *, meta: Mapping[str, Any] | None = None, parent: Recorder | None = None
    ) -> None:
        self.meta: Mapping[str, Any] = _freeze_meta(meta)
        """The meta of the timeline this recorder builds."""
        self._parent = parent
        self._records: list[TaskRecord | tuple[Any, ...]] = []
        self._lock = threading.Lock()

    @property
    def parent(self) -> Recorder | None:
        """The enclosing recorder, which also receives every record added here."""
        return self._parent

    def add(self, record: TaskRecord) -> None:
        """Append ``record`` here and to every enclosing recorder.

        Args:
            record: one finished task.

        """
        if not isinstance(record, TaskRecord):
            raise ParamInvalidError("record", record, "must be a TaskRecord")
        recorder: Recorder | None = self
        while recorder is not None:
            with recorder._lock:
                recorder._records.append(record)
            recorder = recorder._parent

    def add_raw(self, fields: tuple[Any, ...]) -> None:
        """Append a record given as its field values, in ``TaskRecord`` field order.

        The executor's hot path: the record is built and validated only when the records
        are read, so recording a task costs the op about a list append.

        Args:
            fields: ``(rank, run, task, name, stream, kind, start_s, end_s, flops, bytes,
                intra_bytes, inter_bytes)``, optionally followed by ``(clock, host_start_s,
                host_end_s, cpu_s)`` (else the task was timed by the host, with no CPU time).

        """
        if len(fields) not in _RAW_LENGTHS:
            raise ParamInvalidError(
                "fields", len(fields), f"must hold {' or '.join(map(str, _RAW_LENGTHS))} values"
            )
        recorder: Recorder | None = self
        while recorder is not None:
            with recorder._lock:
                recorder._records.append(fields)
            recorder = recorder._parent

    @property
    def records(self) -> tuple[TaskRecord, ...]:
        """The records added so far, in order."""
        with self._lock:
            built = [
                r
                if isinstance(r, TaskRecord)
                else TaskRecord(**dict(zip(_FIELDS[: len(r)], r, strict=True)))
                for r in self._records
            ]
            self._records = list(built)
            return tuple(built)

    @property
    def timeline(self) -> Timeline:
        """A measured :class:`Timeline` of the records added so far."""
        return Timeline(records=self.records, source=Source.MEASURED, meta=self.meta)


_CURRENT: ContextVar[Recorder | None] = ContextVar("mc2sim_timeline_recorder", default=None)


def current_recorder() -> Recorder | None:
    """Return the recorder of the innermost active :func:`record` context, or None.

    The executor calls this once per op call; with None it records nothing.
    """
    return _CURRENT.get()


@contextlib.contextmanager
def record(*, meta: Mapping[str, Any] | None = None) -> Iterator[Recorder]:
    """Record the tasks of every op call made inside the ``with`` block on this rank.

    Contexts nest: an inner recorder holds only what was recorded inside it, and passes
    every record on to the outer one too.

    Args:
        meta: JSON-serialisable facts to attach to the recorded timeline.

    Yields:
        The :class:`Recorder`; read ``rec.timeline`` after (or during) the block.

    """
    recorder = Recorder(meta=meta, parent=_CURRENT.get())
    token = _CURRENT.set(recorder)
    try:
        yield recorder
    finally:
        _CURRENT.reset(token)


def gather(comm: Communicator, timeline: Timeline) -> Timeline:
    """Merge every rank's timeline into one, on every rank (a collective).

    Each rank records only its own tasks; this gives every rank the records of all, in rank
    order. Every rank of ``comm`` must call it. If the parts cannot be merged (different
    sources, metas that disagree) every rank raises the same ``ParamInvalidError``, since
    every rank merges the same parts.

    Args:
        comm: the group whose ranks contribute.
        timeline: this rank's timeline.

    Returns:
        The merged timeline, equal on every rank.

    """
    parts: list[Timeline] = comm.allgather_object(timeline)
    return Timeline.merge(*parts)
