"""Writers of timelines and their metrics: Chrome trace, tasks CSV and JSON summary files.

The only side effects of :mod:`mc2sim.timeline` live here. Every file is written atomically
(a temporary file in the same directory, then ``os.replace``), so a reader never sees half a
file. The writers never communicate: gather first (``mc2sim.timeline.gather``), then write on
one rank. Import them from :mod:`mc2sim.timeline`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mc2sim._atomic import write_atomic
from mc2sim.errors import ParamInvalidError

if TYPE_CHECKING:
    from mc2sim.timeline import Metrics, TaskRecord, Timeline

__all__ = [
    "CSV_COLUMNS",
    "chrome_trace",
    "write_all",
    "write_chrome_trace",
    "write_summary_json",
    "write_tasks_csv",
]

#: Columns of the tasks CSV: every ``TaskRecord`` field, then ``duration_s``.
CSV_COLUMNS = (
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
    "duration_s",
)

#: Chrome trace thread id of each stream's first lane; lane k of a stream is at ``tid + 2k``.
_STREAM_TID = {"compute": 0, "comm": 1}

#: Gap left between runs laid one after another in a trace, as a fraction of a run's span.
_RUN_GAP = 0.1


def _run_offsets(timeline: Timeline) -> dict[str, float]:
    """Return the shift, in seconds, that lays each run after the previous one in a trace.

    Runs are taken in the order of :meth:`Timeline.runs`. A run that starts after the
    previous one ended (runs timed from one epoch) keeps its times; one that would overlap it
    (each run timed from its own epoch) is moved to start a little after it.
    """
    spans: dict[str, tuple[float, float]] = {}
    for rec in timeline.records:
        lo, hi = spans.get(rec.run, (rec.start_s, rec.end_s))
        spans[rec.run] = (min(lo, rec.start_s), max(hi, rec.end_s))
    offsets: dict[str, float] = {}
    prev_end: float | None = None
    prev_span = 0.0
    for run in timeline.runs():
        start, end = spans[run]
        shift = 0.0
        if prev_end is not None and start < prev_end:
            shift = prev_end + _RUN_GAP * prev_span - start
        offsets[run] = shift
        prev_end, prev_span = end + shift, end - start
    return offsets


def _lanes(records: list[tuple[float, float, TaskRecord]]) -> list[int]:
    """Return a lane per interval so that intervals of one lane never overlap.

    Chrome's format draws the complete events of one thread as a stack of properly nested
    slices; tasks that overlap on one stream (several chunks in flight) go on extra lanes.
    ``records`` are ``(start, end, record)`` sorted by start.
    """
    lane_ends: list[float] = []
    lanes = []
    for start, end, _ in records:
        for lane, lane_end in enumerate(lane_ends):
            if lane_end <= start:
                lane_ends[lane] = end
                break
        else:
            lane = len(lane_ends)
            lane_ends.append(end)
        lanes.append(lane)
    return lanes


def chrome_trace(timeline: Timeline) -> dict[str, Any]:
    """Return ``timeline`` as a Chrome trace in the JSON Object Format (Perfetto opens it).

    One process per rank (``pid`` = rank, named ``"rank r"``), one thread per stream
    (``tid`` 0 = compute, 1 = comm; tasks that overlap on one stream spill onto extra lanes
    ``tid + 2``, ``tid + 4``, ... named ``"compute #2"``, ...), and one complete event
    (``"ph": "X"``) per record with ``ts`` and ``dur`` in microseconds, ``name``, ``cat`` =
    kind and ``args`` = flops, bytes, run and task. Several runs are laid one after another
    (see ``otherData["mc2sim.run_offsets_s"]``, the shift added to each run's times).
    ``otherData`` holds the timeline's meta plus ``"mc2sim.source"``.

    Args:
        timeline: the records to draw, of any ranks and runs.

    Returns:
        The trace, ready for ``json.dump``.

    """
    offsets = _run_offsets(timeline)
    by_thread: dict[tuple[int, str], list[tuple[float, float, TaskRecord]]] = {}
    for rec in timeline.records:
        shift = offsets[rec.run]
        key = (rec.rank, rec.stream.value)
        by_thread.setdefault(key, []).append((rec.start_s + shift, rec.end_s + shift, rec))
    meta_events: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for rank in timeline.ranks():
        meta_events.append(_meta_event("process_name", rank, 0, {"name": f"rank {rank}"}))
        meta_events.append(_meta_event("process_sort_index", rank, 0, {"sort_index": rank}))
    for (rank, stream), items in sorted(by_thread.items()):
        items.sort(key=lambda item: (item[0], item[1]))
        lanes = _lanes(items)
        for lane in range(max(lanes) + 1):
            tid = _STREAM_TID[stream] + 2 * lane
            name = stream if lane == 0 else f"{stream} #{lane + 1}"
            meta_events.append(_meta_event("thread_name", rank, tid, {"name": name}))
            meta_events.append(_meta_event("thread_sort_index", rank, tid, {"sort_index": tid}))
        for (start, end, rec), lane in zip(items, lanes, strict=True):
            events.append(
                {
                    "name": rec.name,
                    "cat": rec.kind,
                    "ph": "X",
                    "ts": start * 1e6,
                    "dur": (end - start) * 1e6,
                    "pid": rank,
                    "tid": _STREAM_TID[stream] + 2 * lane,
                    "args": {
                        "flops": rec.flops,
                        "bytes": rec.bytes,
                        "run": rec.run,
                        "task": rec.task,
                    },
                }
            )
    other = dict(timeline.meta)
    other["mc2sim.source"] = timeline.source.value
    other["mc2sim.run_offsets_s"] = offsets
    return {"traceEvents": meta_events + events, "displayTimeUnit": "ms", "otherData": other}


def _meta_event(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    """Return a Chrome trace metadata event (``"ph": "M"``)."""
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def write_chrome_trace(timeline: Timeline, path: str | os.PathLike[str]) -> Path:
    """Write ``timeline`` as a Chrome trace JSON file (see :func:`chrome_trace`).

    Args:
        timeline: the records to draw.
        path: the file to write; parent directories are created.

    Returns:
        The path written.

    """
    return write_atomic(path, json.dumps(chrome_trace(timeline), allow_nan=False), parents=True)


def write_tasks_csv(timeline: Timeline, path: str | os.PathLike[str]) -> Path:
    """Write one CSV row per record: a header of :data:`CSV_COLUMNS`, then the records.

    Floats are written with ``repr`` and read back exactly; ``stream`` is its name.

    Args:
        timeline: the records to write, in their order.
        path: the file to write; parent directories are created.

    Returns:
        The path written.

    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rec in timeline.records:
        writer.writerow(
            (
                rec.rank,
                rec.run,
                rec.task,
                rec.name,
                rec.stream.value,
                rec.kind,
                repr(rec.start_s),
                repr(rec.end_s),
                rec.flops,
                rec.bytes,
                repr(rec.duration_s),
            )
        )
    return write_atomic(path, buf.getvalue(), parents=True)


def write_summary_json(
    metrics_by_run: Mapping[str, Metrics],
    path: str | os.PathLike[str],
    *,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"meta": meta, "runs": {run: metrics.as_dict()}}`` as indented JSON.

    ``Metrics.from_dict`` rebuilds each run's metrics from the file.

    Args:
        metrics_by_run: each run's metrics, by run label.
        path: the file to write; parent directories are created.
        meta: JSON-serialisable facts to store alongside (default: ``{}``).

    Returns:
        The path written.

    Raises:
        ParamInvalidError: ``meta`` is not JSON-serialisable (nothing is written).

    """
    summary = {
        "meta": dict(meta or {}),
        "runs": {run: m.as_dict() for run, m in metrics_by_run.items()},
    }
    try:
        text = json.dumps(summary, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ParamInvalidError("meta", meta, f"must be JSON-serialisable ({exc})") from None
    return write_atomic(path, text + "\n", parents=True)


def write_all(
    timeline: Timeline,
    directory: str | os.PathLike[str],
    *,
    baseline_run: str | None = None,
) -> dict[str, Path]:
    """Write ``trace.json``, ``tasks.csv`` and ``summary.json`` of ``timeline``.

    The summary holds the metrics of every run (``timeline.for_run(run).metrics()``), with
    the run ``baseline_run`` as each run's baseline when given (speedup against it, and its
    communication as the overlap's t_pure). Its meta is ``{"source", "baseline_run",
    "timeline": timeline.meta}``. Metrics are computed before anything is written.

    Args:
        timeline: every rank's records (see ``mc2sim.timeline.gather``).
        directory: where to write; created if missing.
        baseline_run: label of the serial run to compare every run with, or None.

    Returns:
        ``{"trace": ..., "tasks": ..., "summary": ...}``: the paths written.

    Raises:
        ParamInvalidError: ``baseline_run`` is not a run of ``timeline``, or the baseline
            lacks a rank of some run.

    """
    runs = timeline.runs()
    baseline = None
    if baseline_run is not None:
        if baseline_run not in runs:
            raise ParamInvalidError("baseline_run", baseline_run, f"must be one of {runs}")
        baseline = timeline.for_run(baseline_run)
    metrics = {run: timeline.for_run(run).metrics(baseline=baseline) for run in runs}
    out = Path(directory)
    meta = {
        "source": timeline.source.value,
        "baseline_run": baseline_run,
        "timeline": dict(timeline.meta),
    }
    return {
        "trace": write_chrome_trace(timeline, out / "trace.json"),
        "tasks": write_tasks_csv(timeline, out / "tasks.csv"),
        "summary": write_summary_json(metrics, out / "summary.json", meta=meta),
    }
