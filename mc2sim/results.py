"""The results folder of ``mc2sim run`` and ``mc2sim simulate``: its one writer and reader.

A results folder holds:

* ``manifest.json``: what ran and where (:class:`Manifest`): the command line, the
  scenario and its file's sha256, op, shape, tilings, routing, topology, world size, hosts,
  seeds, package versions, the MPI library, and the git revision of this checkout.
* ``summary.json``: every run's key and :class:`~mc2sim.timeline.Metrics` (against the
  baseline run), the baseline's key, and each tiling's golden verdicts
  (:class:`GoldenVerdict`, one per rank) for measured runs.
* ``tasks.csv``: every task of every rank and run, the run as the columns ``op``,
  ``tiling`` and ``repetition``.
* ``trace.json``: the same tasks as a Chrome trace (Perfetto opens it); written only.
* ``complete.json``: written last: the folder is complete, and these are its files (the
  size and SHA-256 of each). A folder without it is incomplete (its run did not finish)
  and is refused; so is one whose files differ from what it lists (a ``tasks.csv`` cut
  short, a ``summary.json`` of another run). ``tasks.csv`` and ``trace.json`` may be
  deleted to save space; the others may not.

:func:`write_results` writes them all (atomically, file by file, the marker last) into a
fresh folder (:func:`check_folder`, :func:`clear_folder`) and :func:`read_results` reads
them back as typed records (:class:`ResultsFolder`); nothing else reads or writes these
files. A sweep's folder holds a results folder per point and a ``complete.json`` of its own
listing them (:func:`write_sweep`, :func:`read_sweep`). The PNG plots are drawn by
:mod:`mc2sim.report` under the file names given here (:func:`gantt_png` and the ``*_PNG``
names).

This module sits below the scenario, the ops and MPI: :func:`collect_manifest` takes plain
values, and nothing here imports ``torch`` or ``mpi4py``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from mc2sim._atomic import write_atomic
from mc2sim._paths import check_creatable
from mc2sim.errors import ParamInvalidError
from mc2sim.timeline import (
    Clock,
    Metrics,
    Outline,
    RankMetrics,
    RunKey,
    Source,
    Stream,
    TaskRecord,
    Timeline,
)

if TYPE_CHECKING:
    from mc2sim.compare import Verdict

__all__ = [
    "COMPLETE_FILE",
    "CSV_COLUMNS",
    "FORMAT",
    "MANIFEST_FILE",
    "OVERLAP_VS_SKEW_PNG",
    "PACKAGES",
    "PREDICTED_VS_MEASURED_PNG",
    "SPEEDUP_PNG",
    "SUMMARY_FILE",
    "RANKS_FILE",
    "RANK_COLUMNS",
    "RankRow",
    "TASKS_FILE",
    "TRACE_FILE",
    "VOLATILE_MANIFEST_FIELDS",
    "GoldenVerdict",
    "ImplementationRecord",
    "Manifest",
    "ManifestRouting",
    "ResultsFolder",
    "WorstElement",
    "check_folder",
    "chrome_trace",
    "clear_folder",
    "collect_manifest",
    "comparable_files",
    "encode_results",
    "gantt_png",
    "git_state",
    "read_results",
    "read_sweep",
    "write_encoded",
    "write_results",
    "write_sweep",
]

FORMAT = 2
"""Version of the folder's format, stored in ``manifest.json`` and ``complete.json``; other
versions are refused. Format 2 added ``complete.json``."""

COMPLETE_FILE = "complete.json"
"""Written last: the folder is complete; each file's size and SHA-256 (or a sweep's points)."""

MANIFEST_FILE = "manifest.json"
"""What ran and where: :class:`Manifest`."""

SUMMARY_FILE = "summary.json"
"""Every run's key and metrics, the baseline, golden verdicts."""

TASKS_FILE = "tasks.csv"
"""Every task, a row each, columns :data:`CSV_COLUMNS`."""

TRACE_FILE = "trace.json"
"""The tasks as a Chrome trace (JSON Object Format)."""

RANKS_FILE = "ranks.csv"
"""Per rank and tiling, a simulated study's stragglers and who waited for whom (only
written for a study with stragglers)."""

SPEEDUP_PNG = "speedup.png"
"""Plot: speedup against tile count, a line per folder."""

OVERLAP_VS_SKEW_PNG = "overlap_vs_skew.png"
"""Plot: overlap against routing skew, a line per tiling."""

PREDICTED_VS_MEASURED_PNG = "predicted_vs_measured.png"
"""Plot: simulated against measured total time per tiling."""

PACKAGES = ("mc2sim", "torch", "numpy", "mpi4py", "mpich")
"""The distributions whose versions a manifest records."""

CSV_COLUMNS = (
    "rank",
    "op",
    "tiling",
    "repetition",
    "task",
    "name",
    "stream",
    "kind",
    "start_s",
    "end_s",
    "flops",
    "bytes",
    "duration_s",
    "intra_bytes",
    "inter_bytes",
    "clock",
    "host_start_s",
    "host_end_s",
    "cpu_s",
)
"""Columns of ``tasks.csv``: the ``TaskRecord`` fields with the run as its three fields,
then ``duration_s`` (written for readers; derived, so not read back), then the bytes sent
within and across nodes, then what timed the task and the host's interval of it, then its
CPU time (empty where not measured)."""

_LATER_COLUMNS = ("clock", "host_start_s", "host_end_s", "cpu_s")
"""Columns added after format 2 was fixed: a ``tasks.csv`` written before lacks them and
reads as host-timed tasks (the host's interval is the task's) with no CPU time."""

_STREAM_TID = {"compute": 0, "comm": 1}
"""Chrome trace thread id of each stream's first lane; lane k of a stream is at ``tid + 2k``."""

_HOST_TID = 1000
"""Chrome trace thread id of the first lane of the host's intervals of device-timed tasks."""

_RUN_GAP = 0.1
"""Gap left between runs laid one after another in a trace, as a fraction of a run's span."""

_OWN_NAME = re.compile(
    r"(manifest|summary|complete|trace)\.json|tasks\.csv|gantt_\w*\.png"
    r"|speedup\.png|overlap_vs_skew\.png|predicted_vs_measured\.png"
)
"""Names of the files mc2sim writes in a results or sweep folder."""

_TEMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{16}\.tmp")
"""A temporary file of an atomic write (``mc2sim._atomic``) of one of those files."""

_OPTIONAL_FILES = (TASKS_FILE, TRACE_FILE, RANKS_FILE)
"""Files a complete folder may lack (deleted to save space); the rest must be there."""

_PACKAGE_DIR = Path(__file__).resolve().parent
"""Where this package's files are; its git revision is recorded only for own checkouts."""


def gantt_png(tiling: str) -> str:
    """Return the file name of the Gantt chart of ``tiling``, e.g. ``gantt_tiles_4.png``.

    Args:
        tiling: the tiling in words.

    Returns:
        ``gantt_<tiling with runs of other characters than letters and digits as _>.png``.

    """
    return f"gantt_{re.sub(r'[^A-Za-z0-9]+', '_', tiling).strip('_') or 'tiling'}.png"


# ----------------------------------------------------------------------------- JSON values


def _number(value: float) -> float | str:
    """A float as JSON allows it: non-finite values as ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class _Fields:
    """Typed access to one JSON object of a results file; errors name the key's path."""

    __slots__ = ("data", "where")

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ParamInvalidError(where, _kind(data), "must be a JSON object")
        self.data: Mapping[str, Any] = data
        self.where = where

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise ParamInvalidError(self.where, sorted(self.data), f"lacks the key {key!r}")
        return self.data[key]

    def _bad(self, key: str, value: object, rule: str) -> ParamInvalidError:
        return ParamInvalidError(f"{self.where}.{key}", value, rule)

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, value, "must be a string")
        return value

    def text_or_none(self, key: str) -> str | None:
        return None if self._get(key) is None else self.text(key)

    def integer(self, key: str) -> int:
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(key, value, "must be an integer")
        return value

    def integer_or_none(self, key: str) -> int | None:
        return None if self._get(key) is None else self.integer(key)

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
            return float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self._bad(key, value, "must be a number (or 'nan', 'inf', '-inf')")
        return float(value)

    def number_or_none(self, key: str) -> float | None:
        return None if self._get(key) is None else self.number(key)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._bad(key, value, "must be true or false")
        return value

    def flag_or_none(self, key: str) -> bool | None:
        return None if self._get(key) is None else self.flag(key)

    def texts(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, value, "must be a list of strings")
        return tuple(value)

    def table(self, key: str) -> _Fields:
        return _Fields(self._get(key), f"{self.where}.{key}")

    def items(self, key: str) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._bad(key, _kind(value), "must be a list")
        return value


def _kind(value: object) -> str:
    """A short name of a JSON value's type, for error messages."""
    return type(value).__name__


def _run_json(run: RunKey) -> dict[str, Any]:
    return {"op": run.op, "tiling": run.tiling, "repetition": run.repetition}


def _run_of(data: _Fields) -> RunKey:
    return RunKey(
        op=data.text("op"), tiling=data.text("tiling"), repetition=data.integer("repetition")
    )


# ----------------------------------------------------------------------------- golden verdicts


@dataclass(frozen=True, kw_only=True, slots=True)
class WorstElement:
    """The output element that strayed furthest from its golden."""

    index: tuple[int, ...]
    """Its index in the output's shape."""

    actual: float
    """The output's value there."""

    golden: float
    """The golden value there."""

    error: float
    """The standard's error measure of the element (inf for an unmatched NaN or inf)."""

    def __post_init__(self) -> None:
        index = tuple(self.index)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in index):
            raise ParamInvalidError("index", self.index, "must be a tuple of ints >= 0")
        object.__setattr__(self, "index", index)
        for name in ("actual", "golden", "error"):
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True, kw_only=True, slots=True)
class GoldenVerdict:
    """One rank's golden check of one tiling, as ``summary.json`` stores it.

    The record of a :class:`mc2sim.compare.Verdict` (:meth:`of`); see its fields.
    """

    standard: str
    """The precision standard applied (a ``mc2sim.compare.Standard`` value)."""

    passed: bool
    """Whether the output met the standard."""

    dtype: str
    """The dtype whose thresholds applied, e.g. ``"bfloat16"``."""

    numel: int
    """Elements compared."""

    mismatches: int
    """Elements that broke the per-element bound."""

    mismatch_fraction: float
    """``mismatches / numel`` (0.0 without elements)."""

    allowed_fraction: float
    """The largest mismatch fraction that still passes."""

    max_abs_error: float
    """Largest ``|actual - golden|`` over finite elements."""

    max_rel_error: float
    """Largest ``|actual - golden| / |golden|`` over finite elements with golden != 0."""

    mean_error: float | None = None
    """``error_balance`` only: the mean signed relative error; None otherwise."""

    mean_limit: float | None = None
    """``error_balance`` only: the bound on ``|mean_error|``; None otherwise."""

    worst: WorstElement | None = None
    """The worst mismatching element, or None when no element mismatched."""

    rank: int | None = None
    """The rank whose output was checked, or None outside a multi-rank check."""

    error: str | None = None
    """Why the output could not be compared with its golden (the implementation raised, or
    returned another shape, dtype or form than the op's), or None when it was. A verdict
    with an error has not passed. Absent from folders written before it (read as None)."""

    def __post_init__(self) -> None:
        if self.error is not None and (not isinstance(self.error, str) or not self.error):
            raise ParamInvalidError("error", self.error, "must be None or a non-empty string")
        if self.error is not None and self.passed is True:
            raise ParamInvalidError("passed", self.passed, "must be False with an error")
        for name in ("standard", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ParamInvalidError(name, getattr(self, name), "must be a non-empty string")
        object.__setattr__(self, "standard", str(self.standard))  # a Standard as its value
        if not isinstance(self.passed, bool):
            raise ParamInvalidError("passed", self.passed, "must be a bool")
        for name in ("numel", "mismatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ParamInvalidError(name, value, "must be an int >= 0")
        if self.mismatches > self.numel:
            raise ParamInvalidError(
                "mismatches", self.mismatches, f"must be <= numel ({self.numel})"
            )
        for name in ("mismatch_fraction", "allowed_fraction", "max_abs_error", "max_rel_error"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("mean_error", "mean_limit"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        if self.rank is not None and (
            not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0
        ):
            raise ParamInvalidError("rank", self.rank, "must be None or an int >= 0")

    @classmethod
    def of(cls, verdict: Verdict) -> GoldenVerdict:
        """Return the record of a verdict of :mod:`mc2sim.compare`.

        Args:
            verdict: one rank's verdict (``check`` or ``check_all``).

        Returns:
            Its record; ``worst`` is the first (worst) of the verdict's mismatches.

        """
        first = verdict.worst[0] if verdict.worst else None
        return cls(
            standard=str(verdict.standard),
            passed=bool(verdict.passed),
            dtype=verdict.dtype,
            numel=verdict.numel,
            mismatches=verdict.mismatches,
            mismatch_fraction=verdict.mismatch_fraction,
            allowed_fraction=verdict.allowed_fraction,
            max_abs_error=verdict.max_abs_error,
            max_rel_error=verdict.max_rel_error,
            mean_error=verdict.mean_error,
            mean_limit=verdict.mean_limit,
            worst=None
            if first is None
            else WorstElement(
                index=first.index, actual=first.actual, golden=first.golden, error=first.error
            ),
            rank=verdict.rank,
        )

    def to_json(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dict (non-finite floats as strings)."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, WorstElement):
                value = {
                    "index": list(value.index),
                    "actual": _number(value.actual),
                    "golden": _number(value.golden),
                    "error": _number(value.error),
                }
            elif isinstance(value, float):
                value = _number(value)
            data[f.name] = value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "verdict") -> GoldenVerdict:
        """Rebuild from :meth:`to_json`'s output.

        Args:
            data: the dict.
            where: how errors name it.

        Returns:
            The equal record.

        Raises:
            ParamInvalidError: a key is missing or holds a value of the wrong type.

        """
        got = _Fields(data, where)
        worst = None
        if got.data.get("worst") is not None:
            w = got.table("worst")
            index = w.items("index")
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in index):
                raise ParamInvalidError(f"{where}.worst.index", index, "must be a list of ints")
            worst = WorstElement(
                index=tuple(index),
                actual=w.number("actual"),
                golden=w.number("golden"),
                error=w.number("error"),
            )
        return cls(
            standard=got.text("standard"),
            passed=got.flag("passed"),
            dtype=got.text("dtype"),
            numel=got.integer("numel"),
            mismatches=got.integer("mismatches"),
            mismatch_fraction=got.number("mismatch_fraction"),
            allowed_fraction=got.number("allowed_fraction"),
            max_abs_error=got.number("max_abs_error"),
            max_rel_error=got.number("max_rel_error"),
            mean_error=got.number_or_none("mean_error"),
            mean_limit=got.number_or_none("mean_limit"),
            worst=worst,
            rank=got.integer_or_none("rank"),
            error=got.text_or_none("error") if "error" in got.data else None,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ImplementationRecord:
    """A user's implementation of the op, checked and timed beside the tilings (``check``).

    ``summary.json`` keeps one per implementation under its run's tiling in words (its
    label, e.g. ``"impl plugin:my_mm"``); that run is in the timeline when the
    implementation was timed (every rank returned an output of the op's form, shape and
    dtype), and absent when it was not.
    """

    impl: str
    """The implementation as given: ``module:function``."""

    device: str
    """Where its inputs were: ``"cpu"``, ``"cuda"``, ..."""

    verdicts: tuple[GoldenVerdict, ...]
    """Every rank's golden verdict of its output (index = rank)."""

    timed: bool
    """Whether its run is in the timeline."""

    def __post_init__(self) -> None:
        for name in ("impl", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ParamInvalidError(name, getattr(self, name), "must be a non-empty string")
        object.__setattr__(self, "verdicts", tuple(self.verdicts))
        for index, verdict in enumerate(self.verdicts):
            if not isinstance(verdict, GoldenVerdict) or verdict.rank != index:
                raise ParamInvalidError(
                    f"verdicts[{index}]", verdict, f"must be a GoldenVerdict of rank {index}"
                )
        if not isinstance(self.timed, bool):
            raise ParamInvalidError("timed", self.timed, "must be a bool")

    @property
    def passed(self) -> bool:
        """Whether every rank's output met its golden (False without verdicts)."""
        return bool(self.verdicts) and all(v.passed for v in self.verdicts)

    def to_json(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dict."""
        return {
            "impl": self.impl,
            "device": self.device,
            "verdicts": [v.to_json() for v in self.verdicts],
            "timed": self.timed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> ImplementationRecord:
        """Rebuild from :meth:`to_json`'s output; errors name ``where`` and the key."""
        got = _Fields(data, where)
        return cls(
            impl=got.text("impl"),
            device=got.text("device"),
            verdicts=tuple(
                GoldenVerdict.from_json(v, f"{where}.verdicts[{i}]")
                for i, v in enumerate(got.items("verdicts"))
            ),
            timed=got.flag("timed"),
        )


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True, kw_only=True, slots=True)
class RankRow:
    """One rank of one tiling of a study with stragglers: its slowdowns and its waits.

    Exposed communication is the rank's ``total - compute`` (:class:`RankMetrics`); the
    nominal figures come from the same study simulated without its stragglers.
    """

    tiling: str
    """The tiling, in words."""
    rank: int
    """The rank."""
    compute: float
    """Its compute slowdown factor (1: nominal)."""
    link: float
    """The fraction of bandwidth its links carry (1: nominal)."""
    late_us: float
    """Microseconds it started after the others."""
    total_s: float
    """Its time from its first task's start to its last task's end."""
    exposed_comm_s: float
    """Its exposed communication."""
    nominal_exposed_comm_s: float
    """Its exposed communication without the stragglers."""
    added_exposed_s: float
    """``exposed_comm_s - nominal_exposed_comm_s``: what the stragglers added."""
    wait_s: float
    """Seconds it waited at collectives for the last rank to arrive."""
    nominal_wait_s: float
    """The same without the stragglers."""
    waited_for: int
    """The last rank to arrive at the collective where it waited longest (-1: never)."""
    last: int
    """Collectives at which it arrived last while another rank waited for it."""

    def __post_init__(self) -> None:
        for name in ("rank", "waited_for", "last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParamInvalidError(name, value, "must be an integer")
        for name in RANK_COLUMNS[2:]:
            value = getattr(self, name)
            if name not in ("waited_for", "last") and not (
                isinstance(value, float) and math.isfinite(value)
            ):
                raise ParamInvalidError(name, value, "must be a finite float")


RANK_COLUMNS = (
    "tiling", "rank", "compute", "link", "late_us", "total_s", "exposed_comm_s",
    "nominal_exposed_comm_s", "added_exposed_s", "wait_s", "nominal_wait_s", "waited_for",
    "last",
)  # fmt: skip
"""The columns of :data:`RANKS_FILE`, in order (:class:`RankRow`'s fields)."""


def _ranks_csv(rows: Sequence[RankRow]) -> str:
    """One CSV row per :class:`RankRow`; floats with ``repr`` (exact)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RANK_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                repr(v) if isinstance(v, float) else v
                for v in (getattr(row, c) for c in RANK_COLUMNS)
            ]
        )
    return buf.getvalue()


def _read_ranks(path: Path, folder: Path) -> tuple[RankRow, ...]:
    """Read :data:`RANKS_FILE` back into typed rows."""
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != RANK_COLUMNS:
                raise _broken(folder, f"{RANKS_FILE} has the columns {reader.fieldnames}")
            for item in reader:
                kwargs: dict[str, Any] = {"tiling": item["tiling"]}
                for name in RANK_COLUMNS[1:]:
                    text = item[name]
                    kwargs[name] = (
                        int(text) if name in ("rank", "waited_for", "last") else float(text)
                    )
                rows.append(RankRow(**kwargs))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, ParamInvalidError) as exc:
        raise _broken(folder, f"{RANKS_FILE} is broken near row {len(rows) + 1}: {exc}") from None
    return tuple(rows)


@dataclass(frozen=True, kw_only=True, slots=True)
class ManifestRouting:
    """How MoE tokens were routed (the TP ops keep the scenario's default routing)."""

    kind: str
    """The routing model, e.g. ``"uniform"`` or ``"zipf"`` (a ``RoutingKind`` value)."""

    seed: int
    """Seed of the routing's random draws."""

    skew: float
    """Zipf exponent (used by ``zipf`` only)."""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ParamInvalidError("routing.kind", self.kind, "must be a non-empty string")
        object.__setattr__(self, "kind", str(self.kind))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ParamInvalidError("routing.seed", self.seed, "must be an int")
        if not isinstance(self.skew, (int, float)) or isinstance(self.skew, bool):
            raise ParamInvalidError("routing.skew", self.skew, "must be a number")
        object.__setattr__(self, "skew", float(self.skew))


def _texts(param: str, value: object) -> tuple[str, ...]:
    """``value`` as a tuple of strings, or ``ParamInvalidError``."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ParamInvalidError(param, value, "must be a sequence of strings")
    items = tuple(value)
    if not all(isinstance(v, str) for v in items):
        raise ParamInvalidError(param, items, "must be a sequence of strings")
    return items


def _int_table(param: str, value: object) -> MappingProxyType[str, int]:
    """``value`` as a read-only ``str -> int`` mapping, or ``ParamInvalidError``."""
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise ParamInvalidError(param, value, "must map names to ints")
    return MappingProxyType(dict(value))


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """What ran and where: ``manifest.json`` of a results folder.

    Build one with :func:`collect_manifest`, which adds the facts of this process (versions,
    MPI library, Python, time, git revision) to the values of the study.
    """

    argv: tuple[str, ...]
    """The command line that produced the folder (``sys.argv``)."""

    overrides: tuple[str, ...]
    """The ``--set key=value`` overrides applied to the scenario, in order."""

    scenario: str
    """The scenario's name."""

    scenario_path: str | None
    """The scenario file read, or None when the scenario came from no file."""

    scenario_sha256: str | None
    """SHA-256 of that file's bytes (hex), or None without a file."""

    op: str
    """The fused op (an ``OpName`` value)."""

    shape: Mapping[str, int]
    """The shape used (the scenario's effective shape: full or small). Stored read-only."""

    dtype: str
    """Activation and output dtype."""

    quant: str
    """Quantisation mode (a ``QuantMode`` value)."""

    standard: str
    """Precision standard of the golden checks (a ``Standard`` value)."""

    repetitions: int
    """Timed repetitions per tiling (>= 1)."""

    scale: str
    """``"full"`` or ``"small"``: which of the scenario's shapes was used."""

    tilings: tuple[str, ...]
    """The tilings the scenario asked for, as written there (``"serial"``, ``"4"``, ...)."""

    routing: ManifestRouting
    """MoE routing model, seed and skew."""

    topology: str
    """The topology's name (``"measured"`` for a real run)."""

    world_size: int
    """Ranks (>= 1)."""

    source: Source
    """Whether the times were measured or simulated (a ``Source`` or its value)."""

    hosts: tuple[str, ...]
    """Every rank's host name, in rank order (this host alone for a simulation)."""

    seeds: Mapping[str, int]
    """Every seed of the study by what it seeds, e.g. ``{"routing": 0}``. Stored read-only."""

    versions: Mapping[str, str | None]
    """Distribution -> installed version (None: not installed), for :data:`PACKAGES`."""

    mpi_library: str | None
    """The MPI library's version line, or None when ``mpi4py.MPI`` was not loaded."""

    python: str
    """The Python version, e.g. ``"3.11.7"``."""

    created: str
    """When the manifest was collected: ISO 8601 with the UTC offset."""

    git_revision: str | None
    """The commit of this project's checkout, or None when mc2sim is not run from one."""

    git_dirty: bool | None
    """Whether tracked files differ from that commit; None without a revision."""

    devices: tuple[str, ...] = ()
    """Every rank's device, in rank order, e.g. ``"cuda:0 (NVIDIA H200)"`` or ``"cpu"``;
    empty for a simulated run (and in folders written before devices were recorded)."""

    backend: str | None = None
    """The transport of a measured run's collectives: ``"mpi"``, ``"mpi (staged through host
    memory)"``, ``"mpi (device-aware)"``, ``"nccl"``, ``"gloo"``; None when simulated (and in
    folders written before backends were recorded)."""

    probe_tflops: float | None = None
    """A measured run's speed probe (:func:`mc2sim.study.measure.probe_tflops`: a float32
    1024^3 matmul on rank 0's core while the others slept, after the rounds), TFLOP/s, > 0;
    None when simulated (and in folders written before probes were recorded)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "argv", _texts("argv", self.argv))
        object.__setattr__(self, "overrides", _texts("overrides", self.overrides))
        object.__setattr__(self, "tilings", _texts("tilings", self.tilings))
        object.__setattr__(self, "hosts", _texts("hosts", self.hosts))
        object.__setattr__(self, "devices", _texts("devices", self.devices))
        if self.backend is not None and (not isinstance(self.backend, str) or not self.backend):
            raise ParamInvalidError("backend", self.backend, "must be a non-empty string or None")
        probe = self.probe_tflops
        if probe is not None and not (
            isinstance(probe, (int, float))
            and not isinstance(probe, bool)
            and math.isfinite(probe)
            and probe > 0
        ):
            raise ParamInvalidError("probe_tflops", probe, "must be a finite number > 0 or None")
        for name in ("scenario", "op", "dtype", "quant", "standard", "scale", "topology"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ParamInvalidError(name, value, "must be a non-empty string")
            object.__setattr__(self, name, str(value))  # an enum member as its value
        for name in ("scenario_path", "mpi_library", "git_revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ParamInvalidError(name, value, "must be a string or None")
        if (self.scenario_path is None) != (self.scenario_sha256 is None):
            raise ParamInvalidError(
                "scenario_sha256", self.scenario_sha256, "is given if and only if scenario_path is"
            )
        digest = self.scenario_sha256
        if digest is not None and not (
            isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)
        ):
            raise ParamInvalidError("scenario_sha256", digest, "must be 64 lowercase hex digits")
        object.__setattr__(self, "shape", _int_table("shape", self.shape))
        object.__setattr__(self, "seeds", _int_table("seeds", self.seeds))
        versions = self.versions
        if not isinstance(versions, Mapping) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in versions.items()
        ):
            raise ParamInvalidError("versions", versions, "must map names to strings or None")
        object.__setattr__(self, "versions", MappingProxyType(dict(versions)))
        for name in ("repetitions", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParamInvalidError(name, value, "must be an int >= 1")
        if not isinstance(self.routing, ManifestRouting):
            raise ParamInvalidError("routing", self.routing, "must be a ManifestRouting")
        try:
            object.__setattr__(self, "source", Source(self.source))
        except ValueError:
            raise ParamInvalidError(
                "source", self.source, "must be 'measured' or 'simulated'"
            ) from None
        for name in ("python", "created"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ParamInvalidError(name, getattr(self, name), "must be a non-empty string")
        if self.git_dirty is not None and not isinstance(self.git_dirty, bool):
            raise ParamInvalidError("git_dirty", self.git_dirty, "must be a bool or None")
        if self.git_revision is None and self.git_dirty is not None:
            raise ParamInvalidError("git_dirty", self.git_dirty, "must be None without a revision")

    def to_json(self) -> dict[str, Any]:
        """Return the manifest as a JSON-ready dict, with the folder's ``format``."""
        data: dict[str, Any] = {"format": FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ManifestRouting):
                value = {"kind": value.kind, "seed": value.seed, "skew": _number(value.skew)}
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Source):
                value = value.value
            data[f.name] = value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        """Rebuild from :meth:`to_json`'s output.

        Args:
            data: the dict, e.g. ``manifest.json`` parsed.

        Returns:
            The equal manifest.

        Raises:
            ParamInvalidError: another ``format``, a missing key, or a value of the wrong
                type; the message names the key.

        """
        got = _Fields(data, "manifest")
        if got.data.get("format") != FORMAT:
            raise ParamInvalidError(
                "manifest.format",
                got.data.get("format"),
                f"must be {FORMAT}: the folder was written by another version of mc2sim",
            )
        routing = got.table("routing")
        shape = got.table("shape").data
        seeds = got.table("seeds").data
        versions = got.table("versions").data
        return cls(
            argv=got.texts("argv"),
            overrides=got.texts("overrides"),
            scenario=got.text("scenario"),
            scenario_path=got.text_or_none("scenario_path"),
            scenario_sha256=got.text_or_none("scenario_sha256"),
            op=got.text("op"),
            shape=dict(shape),
            dtype=got.text("dtype"),
            quant=got.text("quant"),
            standard=got.text("standard"),
            repetitions=got.integer("repetitions"),
            scale=got.text("scale"),
            tilings=got.texts("tilings"),
            routing=ManifestRouting(
                kind=routing.text("kind"), seed=routing.integer("seed"), skew=routing.number("skew")
            ),
            topology=got.text("topology"),
            world_size=got.integer("world_size"),
            source=_source_of(got.text("source")),
            hosts=got.texts("hosts"),
            seeds=dict(seeds),
            versions=dict(versions),
            mpi_library=got.text_or_none("mpi_library"),
            python=got.text("python"),
            created=got.text("created"),
            git_revision=got.text_or_none("git_revision"),
            git_dirty=got.flag_or_none("git_dirty"),
            # recorded since the accelerator executor; older folders lack them
            devices=got.texts("devices") if "devices" in got.data else (),
            backend=got.text_or_none("backend") if "backend" in got.data else None,
            probe_tflops=got.number_or_none("probe_tflops") if "probe_tflops" in got.data else None,
        )


def _source_of(text: str) -> Source:
    try:
        return Source(text)
    except ValueError:
        raise ParamInvalidError(
            "manifest.source", text, "must be 'measured' or 'simulated'"
        ) from None


def _version_of(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str | None], ...]:
    """The installed version of each of :data:`PACKAGES`, looked up once per process.

    A sweep collects a manifest per point.
    """
    return tuple((p, _version_of(p)) for p in PACKAGES)


def _mpi_library() -> str | None:
    """The MPI library's first version line, if ``mpi4py.MPI`` is loaded (never loads it)."""
    module = sys.modules.get("mpi4py.MPI")
    if module is None:
        return None
    line: str = module.Get_library_version().split("\n", 1)[0]
    return " ".join(line.split())


def _git(cwd: Path, *args: str) -> str | None:
    """Output of a git command in ``cwd``, or None when git fails or is missing."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return done.stdout


def _is_mc2sim_project(pyproject: Path) -> bool:
    """Whether ``pyproject`` declares ``name = "mc2sim"`` in its ``[project]`` table."""
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    table = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            table = stripped
        elif table == "[project]":
            found = re.fullmatch(r"""name\s*=\s*["']([^"']*)["']\s*(#.*)?""", stripped)
            if found:
                return found.group(1) == "mc2sim"
    return False


def git_state(package_dir: Path | None = None) -> tuple[str | None, bool | None]:
    """Return the git revision and dirty flag of this project's checkout, if mc2sim is one.

    Only when ``package_dir`` is the ``mc2sim`` folder at the top of a git work tree whose
    ``pyproject.toml`` names the project ``mc2sim``: an installed copy (in a virtual
    environment inside some other repository, say) has no revision of its own.

    Args:
        package_dir: the package's folder; default the one this module is in.

    Returns:
        ``(commit, dirty)``: dirty when tracked files differ from the commit; ``(None,
        None)`` outside an own checkout or when git is unavailable.

    """
    here = (package_dir or _PACKAGE_DIR).resolve()
    top = _git(here, "rev-parse", "--show-toplevel")
    if top is None:
        return None, None
    root = Path(top.strip()).resolve()
    if here != root / "mc2sim" or not _is_mc2sim_project(root / "pyproject.toml"):
        return None, None
    revision = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if revision is None or status is None:
        return None, None
    return revision.strip(), bool(status.strip())


def collect_manifest(
    *,
    scenario: str,
    scenario_path: str | os.PathLike[str] | None,
    op: str,
    shape: Mapping[str, int],
    dtype: str,
    quant: str,
    standard: str,
    repetitions: int,
    scale: str,
    tilings: Sequence[str | int | None],
    routing_kind: str,
    routing_seed: int,
    routing_skew: float,
    topology: str,
    world_size: int,
    source: Source | str,
    seeds: Mapping[str, int],
    hosts: Sequence[str] | None = None,
    argv: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    devices: Sequence[str] = (),
    backend: str | None = None,
    probe_tflops: float | None = None,
) -> Manifest:
    """Build a :class:`Manifest` from a study's plain values and the facts of this process.

    Adds the versions of :data:`PACKAGES`, the MPI library (only if ``mpi4py.MPI`` is
    already loaded), the Python version, the time, the git state (:func:`git_state`) and
    the scenario file's SHA-256.

    Args:
        scenario: the scenario's name.
        scenario_path: the scenario file read, or None.
        op: the fused op.
        shape: the shape used.
        dtype: activation dtype.
        quant: quantisation mode.
        standard: precision standard.
        repetitions: timed repetitions per tiling.
        scale: ``"full"`` or ``"small"``.
        tilings: the scenario's tilings (each written with ``str``; None as ``"hardware"``).
        routing_kind: MoE routing model.
        routing_seed: its seed.
        routing_skew: its skew.
        topology: the topology's name.
        world_size: ranks.
        source: measured or simulated.
        seeds: every seed by what it seeds.
        hosts: every rank's host; default this host alone.
        argv: the command line; default ``sys.argv``.
        overrides: the ``--set`` strings.
        devices: every rank's device (a measured run).
        backend: the collectives' transport (a measured run).
        probe_tflops: the speed probe after a measured run's rounds.

    Returns:
        The manifest.

    Raises:
        ParamInvalidError: the scenario file cannot be read, or a value is invalid.

    """
    path = None if scenario_path is None else Path(scenario_path)
    digest = None
    if path is not None:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise ParamInvalidError("scenario_path", str(path), f"cannot be read ({exc})") from None
    revision, dirty = git_state()
    return Manifest(
        argv=tuple(sys.argv if argv is None else argv),
        overrides=tuple(overrides),
        scenario=scenario,
        scenario_path=None if path is None else str(path.resolve()),
        scenario_sha256=digest,
        op=str(op),
        shape=dict(shape),
        dtype=str(dtype),
        quant=str(quant),
        standard=str(standard),
        repetitions=repetitions,
        scale=str(scale),
        tilings=tuple("hardware" if t is None else str(t) for t in tilings),
        routing=ManifestRouting(kind=str(routing_kind), seed=routing_seed, skew=routing_skew),
        topology=topology,
        world_size=world_size,
        source=Source(source),
        hosts=tuple(hosts) if hosts is not None else (socket.gethostname(),),
        seeds=dict(seeds),
        versions=dict(_versions()),
        mpi_library=_mpi_library(),
        python=platform.python_version(),
        created=datetime.now().astimezone().isoformat(timespec="seconds"),
        git_revision=revision,
        git_dirty=dirty,
        devices=tuple(devices),
        backend=backend,
        probe_tflops=probe_tflops,
    )


# ----------------------------------------------------------------------------- Chrome trace


def _run_offsets(timeline: Timeline) -> tuple[list[RunKey], list[float], list[int]]:
    """Return the shift, in seconds, that lays each run after the previous one in a trace.

    Runs are taken in the order of :meth:`Timeline.runs`. A run that starts after the
    previous one ended (runs timed from one epoch) keeps its times; one that would overlap it
    (each run timed from its own epoch) is moved to start a little after it.

    Returns:
        The runs, each one's shift, and each record's run as a position among them
        (:meth:`Timeline.run_positions`).
    """
    runs, positions = timeline.run_positions()
    starts = [math.inf] * len(runs)
    ends = [-math.inf] * len(runs)
    for rec, position in zip(timeline.records, positions, strict=True):
        if rec.start_s < starts[position]:
            starts[position] = rec.start_s
        if rec.end_s > ends[position]:
            ends[position] = rec.end_s
    offsets: list[float] = []
    prev_end: float | None = None
    prev_span = 0.0
    for start, end in zip(starts, ends, strict=True):
        shift = 0.0
        if prev_end is not None and start < prev_end:
            shift = prev_end + _RUN_GAP * prev_span - start
        offsets.append(shift)
        prev_end, prev_span = end + shift, end - start
    return runs, offsets, positions


def _lanes(intervals: Iterable[tuple[float, float]]) -> list[int]:
    """Return a lane per interval so that intervals of one lane never overlap.

    Chrome's format draws the complete events of one thread as a stack of properly nested
    slices; tasks that overlap on one stream (several chunks in flight) go on extra lanes.
    ``intervals`` are ``(start, end)`` sorted by start.
    """
    lane_ends: list[float] = []
    lanes = []
    for start, end in intervals:
        for lane, lane_end in enumerate(lane_ends):
            if lane_end <= start:
                lane_ends[lane] = end
                break
        else:
            lane = len(lane_ends)
            lane_ends.append(end)
        lanes.append(lane)
    return lanes


def _meta_event(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    """Return a Chrome trace metadata event (``"ph": "M"``)."""
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


_Complete = tuple[str, float, float, int, int, TaskRecord, str, str]
"""A complete event of a trace: name, start and end (seconds, shifted), pid, tid, the record,
its run's label and the clock named in its arguments."""


def _trace_layout(
    timeline: Timeline,
) -> tuple[list[dict[str, Any]], Iterator[_Complete], dict[str, Any]]:
    """The pieces of :func:`chrome_trace`: metadata events, complete events, ``otherData``.

    The complete events come one at a time, in the trace's order, made as they are asked
    for: a thread keeps its records' positions and times (plain numbers), so laying out a
    timeline of many records leaves no object per record behind for the garbage collector
    to walk again and again.
    """
    runs, offsets, positions = _run_offsets(timeline)
    labels = [str(run) for run in runs]
    records = timeline.records
    host_clock = Clock.HOST
    # (rank, stream) -> its records' positions in `records`, starts and ends (shifted)
    threads: dict[tuple[int, str], tuple[list[int], list[float], list[float]]] = {}
    for i, (rec, position) in enumerate(zip(records, positions, strict=True)):
        shift = offsets[position]
        key = (rec.rank, f"{rec.stream}")  # a StrEnum formats as its value
        thread = threads.get(key)
        if thread is None:
            thread = threads[key] = ([], [], [])
        thread[0].append(i)
        thread[1].append(rec.start_s + shift)
        thread[2].append(rec.end_s + shift)
        if rec.clock is not host_clock:
            start, end = rec.host_span_s
            issued = threads.setdefault((rec.rank, "host"), ([], [], []))
            issued[0].append(i)
            issued[1].append(start + shift)
            issued[2].append(end + shift)
    meta_events: list[dict[str, Any]] = []
    for rank in timeline.ranks():
        meta_events.append(_meta_event("process_name", rank, 0, {"name": f"rank {rank}"}))
        meta_events.append(_meta_event("process_sort_index", rank, 0, {"sort_index": rank}))
    laid_out = []
    for (rank, stream), (indices, starts, ends) in sorted(threads.items()):
        order = sorted(range(len(indices)), key=lambda k: (starts[k], ends[k]))
        lanes = _lanes((starts[k], ends[k]) for k in order)
        host = stream == "host"
        base, step = (_HOST_TID, 1) if host else (_STREAM_TID[stream], 2)
        clocks = sorted({f"{records[i].clock}" for i in indices} - {host_clock.value})
        label = stream if host or not clocks else f"{stream} ({', '.join(clocks)})"
        for lane in range(max(lanes) + 1):
            tid = base + step * lane
            name = label if lane == 0 else f"{label} #{lane + 1}"
            meta_events.append(_meta_event("thread_name", rank, tid, {"name": name}))
            meta_events.append(_meta_event("thread_sort_index", rank, tid, {"sort_index": tid}))
        laid_out.append((rank, host, base, step, order, lanes, indices, starts, ends))

    def complete() -> Iterator[_Complete]:
        for rank, host, base, step, order, lanes, indices, starts, ends in laid_out:
            for k, lane in zip(order, lanes, strict=True):
                rec = records[indices[k]]
                yield (
                    f"issue {rec.name}" if host else rec.name,
                    starts[k],
                    ends[k],
                    rank,
                    base + step * lane,
                    rec,
                    labels[positions[indices[k]]],
                    "host" if host else f"{rec.clock}",
                )

    other = dict(timeline.meta)
    other["mc2sim.source"] = timeline.source.value
    other["mc2sim.run_offsets_s"] = dict(zip(labels, offsets, strict=True))
    return meta_events, complete(), other


def chrome_trace(timeline: Timeline) -> dict[str, Any]:
    """Return ``timeline`` as a Chrome trace in the JSON Object Format (Perfetto opens it).

    One process per rank (``pid`` = rank, named ``"rank r"``), one thread per stream
    (``tid`` 0 = compute, 1 = comm; tasks that overlap on one stream spill onto extra lanes
    ``tid + 2``, ``tid + 4``, ... named ``"compute #2"``, ...), and one complete event
    (``"ph": "X"``) per record with ``ts`` and ``dur`` in microseconds, ``name``, ``cat`` =
    kind and ``args`` = flops, bytes, run (its display label), task and clock. A stream
    timed by the device is named after its clock (``"compute (device)"``, ``"comm
    (staged)"``), and the host's interval of each such task (issuing it; for a staged
    collective, until the host saw MPI complete) is drawn on the rank's ``"host"`` thread
    (``tid`` 1000, lanes 1001, ...), so launch overhead shows. Several runs are laid one after
    another (``otherData["mc2sim.run_offsets_s"]``: the shift added to each run's times, by
    display label). ``otherData`` also holds the timeline's meta and ``"mc2sim.source"``.
    The trace is for viewers: mc2sim never reads it back.

    Args:
        timeline: the records to draw, of any ranks and runs.

    Returns:
        The trace, ready for ``json.dump``.

    """
    meta_events, complete, other = _trace_layout(timeline)
    events = [
        {
            "name": name,
            "cat": rec.kind,
            "ph": "X",
            "ts": start * 1e6,
            "dur": (end - start) * 1e6,
            "pid": pid,
            "tid": tid,
            "args": {
                "flops": rec.flops,
                "bytes": rec.bytes,
                "run": run,
                "task": rec.task,
                "clock": clock,
            },
        }
        for name, start, end, pid, tid, rec, run, clock in complete
    ]
    return {"traceEvents": meta_events + events, "displayTimeUnit": "ms", "otherData": other}


def _trace_json(timeline: Timeline) -> str:
    """``json.dumps(chrome_trace(timeline), allow_nan=False)``, a complete event at a time.

    Each event is formatted here as ``json`` writes it (numbers with ``repr``, each distinct
    text encoded once by ``json``), with no dictionary per event in between.
    """
    meta_events, complete, other = _trace_layout(timeline)
    encoded: dict[str, str] = {}

    def text(value: str) -> str:
        quoted = encoded.get(value)
        if quoted is None:
            quoted = encoded[value] = json.dumps(value)
        return quoted

    parts = [json.dumps(meta_events, allow_nan=False)[1:-1]] if meta_events else []
    for name, start, end, pid, tid, rec, run, clock in complete:
        ts, dur = start * 1e6, (end - start) * 1e6
        if not (math.isfinite(ts) and math.isfinite(dur)):
            raise ValueError(f"Out of range float values are not JSON compliant: {ts!r}, {dur!r}")
        parts.append(
            f'{{"name": {text(name)}, "cat": {text(rec.kind)}, "ph": "X", "ts": {ts!r}, '
            f'"dur": {dur!r}, "pid": {pid}, "tid": {tid}, "args": {{"flops": {rec.flops}, '
            f'"bytes": {rec.bytes}, "run": {text(run)}, "task": {rec.task}, '
            f'"clock": {text(clock)}}}}}'
        )
    return (
        f'{{"traceEvents": [{", ".join(parts)}], "displayTimeUnit": "ms", '
        f'"otherData": {json.dumps(other, allow_nan=False)}}}'
    )


# ----------------------------------------------------------------------------- tasks CSV


def _csv_cell(text: str) -> str:
    """``text`` as ``csv.writer`` writes it among other cells (quoted only where it must be)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow((text, ""))
    return buf.getvalue()[: -len(",\n")]


def _tasks_csv(timeline: Timeline) -> str:
    """One CSV row per record under :data:`CSV_COLUMNS`; floats with ``repr`` (exact).

    The bytes ``csv.writer`` writes, with the rows formatted here in one pass: numbers never
    need quotes, and each distinct text (a task's name, a run) is quoted once.
    """
    cells: dict[str, str] = {}
    runs: dict[RunKey, str] = {}

    def cell(text: str) -> str:
        quoted = cells.get(text)
        if quoted is None:
            quoted = cells[text] = _csv_cell(text)
        return quoted

    lines = [",".join(map(cell, CSV_COLUMNS))]
    run, run_cells = None, ""
    for rec in timeline.records:
        if rec.run is not run:  # a run's records come together: look its cells up once
            run = rec.run
            run_cells = runs.get(run) or runs.setdefault(
                run, f"{cell(run.op)},{cell(run.tiling)},{run.repetition}"
            )
        host_start, host_end = rec.host_span_s
        # a StrEnum formats as its value, as csv.writer writes it
        lines.append(
            f"{rec.rank},{run_cells},{rec.task},{cell(rec.name)},{rec.stream},{cell(rec.kind)},"
            f"{rec.start_s!r},{rec.end_s!r},{rec.flops},{rec.bytes},{rec.end_s - rec.start_s!r},"
            f"{rec.intra_bytes},{rec.inter_bytes},{rec.clock},{host_start!r},{host_end!r},"
            f"{'' if rec.cpu_s is None else repr(rec.cpu_s)}"
        )
    lines.append("")
    return "\n".join(lines)


def _float_or_none(text: str | None) -> float | None:
    """A later column's number, or None where a row lacks it."""
    return None if text is None or text == "" else float(text)


def _read_tasks(path: Path, folder: Path, source: Source, meta: Mapping[str, Any]) -> Timeline:
    """Read ``tasks.csv`` back into a timeline of typed records."""
    records = []
    try:
        with path.open("rb") as raw:
            raw.seek(0, os.SEEK_END)
            if raw.tell() == 0:
                raise _broken(folder, f"{TASKS_FILE} is empty: it lacks even its header")
            raw.seek(-1, os.SEEK_END)
            if raw.read(1) != b"\n":
                raise _broken(folder, f"{TASKS_FILE} ends in the middle of a row: it was cut short")
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            # duration_s is derived, not read back; the later columns may be absent
            needed = [c for c in CSV_COLUMNS if c != "duration_s" and c not in _LATER_COLUMNS]
            missing = [c for c in needed if c not in (reader.fieldnames or ())]
            if missing:
                raise _broken(folder, f"{TASKS_FILE} lacks the columns {missing}")
            for row in reader:
                try:
                    records.append(
                        TaskRecord(
                            rank=int(row["rank"]),
                            run=RunKey(
                                op=row["op"],
                                tiling=row["tiling"],
                                repetition=int(row["repetition"]),
                            ),
                            task=int(row["task"]),
                            name=row["name"],
                            stream=Stream(row["stream"]),
                            kind=row["kind"],
                            start_s=float(row["start_s"]),
                            end_s=float(row["end_s"]),
                            flops=int(row["flops"]),
                            bytes=int(row["bytes"]),
                            intra_bytes=int(row["intra_bytes"]),
                            inter_bytes=int(row["inter_bytes"]),
                            clock=Clock(row.get("clock") or Clock.HOST),
                            host_start_s=_float_or_none(row.get("host_start_s")),
                            host_end_s=_float_or_none(row.get("host_end_s")),
                            cpu_s=_float_or_none(row.get("cpu_s")),
                        )
                    )
                except (TypeError, ValueError) as exc:  # ParamInvalidError is a ValueError
                    raise _broken(
                        folder, f"{TASKS_FILE} line {reader.line_num} is broken ({exc})"
                    ) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _broken(folder, f"{TASKS_FILE} cannot be read ({exc})") from None
    return Timeline(records=tuple(records), source=source, meta=meta)


# ----------------------------------------------------------------------------- the folder


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def _golden_records(
    verdicts: Mapping[str, Sequence[Verdict | GoldenVerdict]], tilings: Sequence[str]
) -> dict[str, tuple[GoldenVerdict, ...]]:
    """Each tiling's verdicts as records, checked: a known tiling, index = rank."""
    golden: dict[str, tuple[GoldenVerdict, ...]] = {}
    for tiling, given in verdicts.items():
        if tiling not in tilings:
            raise ParamInvalidError("verdicts", tiling, f"must be a tiling of the runs {tilings}")
        records = []
        for index, verdict in enumerate(given):
            record = verdict if isinstance(verdict, GoldenVerdict) else GoldenVerdict.of(verdict)
            if record.rank is None:
                record = dataclasses.replace(record, rank=index)
            elif record.rank != index:
                raise ParamInvalidError(
                    f"verdicts[{tiling!r}][{index}].rank",
                    record.rank,
                    f"must be {index} (index = rank)",
                )
            records.append(record)
        golden[tiling] = tuple(records)
    return golden


def _check_implementations(
    impls: Mapping[str, ImplementationRecord], tilings: Sequence[str], world: int
) -> None:
    """Each implementation: a record, at most one verdict per rank, its run there iff timed."""
    for label, record in impls.items():
        if not isinstance(record, ImplementationRecord):
            raise ParamInvalidError(
                f"implementations[{label!r}]", record, "must be an ImplementationRecord"
            )
        if len(record.verdicts) > world:
            raise ParamInvalidError(
                f"implementations[{label!r}].verdicts",
                f"{len(record.verdicts)} verdicts",
                f"must be at most one per rank ({world})",
            )
        if record.timed != (label in tilings):
            rule = "must be a run of the timeline" if record.timed else "was not timed: no run"
            raise ParamInvalidError(f"implementations[{label!r}]", label, rule)


def _is_own(entry: Path) -> bool:
    """Whether mc2sim wrote ``entry``: a results file, a plot, a temporary file of one.

    A folder (a sweep's point) counts when everything in it does.
    """
    if entry.is_symlink():
        return False
    if entry.is_dir():
        return all(_is_own(child) for child in entry.iterdir())
    temp = _TEMP_NAME.fullmatch(entry.name)
    return bool(_OWN_NAME.fullmatch(temp.group(1) if temp else entry.name))


def check_folder(
    folder: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    param: str = "folder",
    hint: str = "overwrite=True",
) -> Path:
    """Check, before any work, that a fresh results (or sweep) folder can be written there.

    Args:
        folder: where the results will go.
        overwrite: whether a folder of earlier results may be cleared (:func:`clear_folder`)
            to make room; without it, only a missing or empty folder will do.
        param: what errors call the folder (``"--out"``).
        hint: how to allow clearing, for the message (``"--overwrite"``).

    Returns:
        The folder as a :class:`~pathlib.Path`.

    Raises:
        ParamInvalidError: the folder is a file or cannot be created or written; it is not
            empty and ``overwrite`` is False; or it holds anything mc2sim did not write (which
            even ``overwrite`` never deletes).

    """
    path = Path(folder)
    if path.is_dir():  # a link to a folder is that folder
        entries = sorted(path.iterdir())
        if entries and not overwrite:
            raise ParamInvalidError(
                param,
                str(path),
                f"is not empty: name a new folder, or pass {hint} to replace the results in it",
            )
        foreign = [e.name for e in entries if not _is_own(e)]
        if foreign:
            raise ParamInvalidError(
                param,
                str(path),
                f"holds {foreign[0]!r}, which mc2sim did not write: only a folder of mc2sim "
                "results is replaced; name another folder",
            )
    elif path.exists() or path.is_symlink():
        raise ParamInvalidError(param, str(path), "is a file, not a folder")
    check_creatable(path, param)
    return path


def clear_folder(folder: str | os.PathLike[str]) -> None:
    """Delete the results in ``folder`` (its ``complete.json`` first), leaving it empty.

    Args:
        folder: a folder :func:`check_folder` accepted with ``overwrite``; a missing one is
            left missing.

    Raises:
        ParamInvalidError: the folder holds anything mc2sim did not write (nothing is
            deleted then).

    """
    path = Path(folder)
    if not path.is_dir():
        return
    check_folder(path, overwrite=True)
    _clear(path)


def _clear(path: Path) -> None:
    marker = path / COMPLETE_FILE
    if marker.exists():  # first: from here on the folder is incomplete
        marker.unlink()
    for entry in sorted(path.iterdir()):
        if entry.is_dir():
            _clear(entry)
            entry.rmdir()
        else:
            entry.unlink()


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_results(
    folder: Path,
    *,
    timeline: Timeline,
    baseline: RunKey,
    manifest: Manifest,
    verdicts: Mapping[str, Sequence[Verdict | GoldenVerdict]] | None = None,
    implementations: Mapping[str, ImplementationRecord] | None = None,
    overwrite: bool = False,
    ranks: Sequence[RankRow] = (),
) -> dict[str, Path]:
    """Write a results folder: tasks, trace, summary, manifest, then ``complete.json``.

    The files are ``tasks.csv``, ``trace.json``, ``summary.json`` and ``manifest.json``.
    Every run's metrics are computed against ``baseline`` (its speedup, and its
    communication as the overlap's t_pure) before anything is written. Each file is written
    atomically; ``complete.json`` goes last, so a folder with it is complete, and it lists
    the size and SHA-256 of every file written, so a file changed later is found.

    Args:
        folder: where to write: missing (it is created) or empty, or, with ``overwrite``, a
            folder of earlier results (cleared first).
        timeline: every rank's records of every run (at most one run per tiling).
        baseline: the run every run is compared with (the serial plan's).
        manifest: what ran and where; its ``source`` must be the timeline's.
        verdicts: tiling in words -> every rank's golden verdict (index = rank), as
            :class:`mc2sim.compare.Verdict` (or :class:`GoldenVerdict`); None without checks.
        implementations: label -> a user's implementation checked beside the tilings
            (``mc2sim check``); a timed one's run is the timeline's run of that label.
        overwrite: clear a folder of earlier results first (see :func:`check_folder`).
        ranks: a study with stragglers: every rank's row of every tiling (``ranks.csv``,
            written only when given).

    Returns:
        ``{"manifest": ..., "summary": ..., "tasks": ..., "trace": ..., "complete": ...}``
        (and ``"ranks"``): the paths written.

    Raises:
        ParamInvalidError: an empty timeline, two runs of one tiling, a baseline that is not
            a run, a baseline lacking a rank of some run, a rank outside the manifest's world
            size, a source that differs from the manifest's, verdicts of an unknown tiling
            or out of rank order, or a folder that is not fresh (:func:`check_folder`).
            Nothing is written then.

    """
    return write_encoded(
        folder,
        encode_results(
            timeline=timeline, baseline=baseline, manifest=manifest, verdicts=verdicts,
            implementations=implementations, ranks=ranks,
        ),
        overwrite=overwrite,
    )  # fmt: skip


def encode_results(
    *,
    timeline: Timeline | Outline,
    baseline: RunKey,
    manifest: Manifest,
    verdicts: Mapping[str, Sequence[Verdict | GoldenVerdict]] | None = None,
    implementations: Mapping[str, ImplementationRecord] | None = None,
    ranks: Sequence[RankRow] = (),
    metrics: Mapping[RunKey, Metrics] | None = None,
) -> dict[str, bytes]:
    """The files of a results folder, as bytes, without writing them (:func:`write_results`).

    A sweep spread over MPI ranks encodes each point on the rank that simulated it and has
    rank 0 write the bytes (:func:`write_encoded`), so its folder is the serial sweep's.
    Given an :class:`~mc2sim.timeline.Outline` instead of a timeline (with ``metrics``), the
    per-task files (``tasks.csv``, ``trace.json``) are left out.
    ``metrics``: every run's metrics against ``baseline``, where the caller has them already
    (a simulated study); computed from ``timeline`` otherwise.

    Returns:
        File name -> its bytes, ``complete.json`` (listing the others' digests) last.

    Raises:
        ParamInvalidError: as :func:`write_results`.
    """
    if not isinstance(manifest, Manifest):
        raise ParamInvalidError("manifest", manifest, "must be a Manifest")
    if manifest.source is not timeline.source:
        raise ParamInvalidError(
            "manifest.source",
            manifest.source.value,
            f"must be the timeline's source ({timeline.source.value})",
        )
    runs = timeline.runs()
    if not runs:
        raise ParamInvalidError("timeline", "no records", "is empty: there is nothing to write")
    tilings = [run.tiling for run in runs]
    for run in runs:
        if tilings.count(run.tiling) > 1:
            twins = [str(r) for r in runs if r.tiling == run.tiling]
            raise ParamInvalidError("timeline", twins, "must hold one run per tiling")
    if baseline not in runs:
        raise ParamInvalidError(
            "baseline", str(baseline), f"must be one of {[str(r) for r in runs]}"
        )
    outside = [r for r in timeline.ranks() if r >= manifest.world_size]
    if outside:
        raise ParamInvalidError(
            "timeline", f"rank {outside[0]}", f"must be below the world size {manifest.world_size}"
        )
    if metrics is None:
        if not isinstance(timeline, Timeline):
            raise ParamInvalidError("metrics", None, "must be given with an outline")
        metrics = timeline.metrics_by_run(baseline)
    elif set(metrics) != set(runs):
        raise ParamInvalidError(
            "metrics", sorted(str(r) for r in metrics), "must hold exactly the timeline's runs"
        )
    impls = dict(implementations or {})
    _check_implementations(impls, tilings, manifest.world_size)
    golden = _golden_records(verdicts or {}, tilings)
    for tiling in golden:
        if tiling in impls:
            raise ParamInvalidError(
                "verdicts", tiling, "is an implementation: its verdicts are in its record"
            )
    for tiling, records in golden.items():
        if len(records) > manifest.world_size:
            raise ParamInvalidError(
                f"verdicts[{tiling!r}]",
                f"{len(records)} verdicts",
                f"must be at most one per rank ({manifest.world_size})",
            )
    summary = {
        "baseline": _run_json(baseline),
        "runs": [{"run": _run_json(run), "metrics": metrics[run].as_dict()} for run in runs],
        "golden": {t: [v.to_json() for v in records] for t, records in golden.items()},
        "implementations": {label: record.to_json() for label, record in impls.items()},
        "timeline_meta": dict(timeline.meta),
    }
    files = {}
    if isinstance(timeline, Timeline):
        files[TASKS_FILE] = _tasks_csv(timeline).encode("utf-8")
        files[TRACE_FILE] = _trace_json(timeline).encode("utf-8")
    files[SUMMARY_FILE] = _json_text(summary).encode("utf-8")
    files[MANIFEST_FILE] = _json_text(manifest.to_json()).encode("utf-8")
    if ranks:
        bad = [r for r in ranks if r.tiling not in tilings or not 0 <= r.rank < manifest.world_size]
        if bad:
            raise ParamInvalidError(
                "ranks", f"{bad[0].tiling} rank {bad[0].rank}",
                f"must be a tiling of the runs and a rank below {manifest.world_size}",
            )  # fmt: skip
        files[RANKS_FILE] = _ranks_csv(ranks).encode("utf-8")
    marker = {
        "format": FORMAT,
        "kind": "results",
        "files": {name: _digest(data) for name, data in files.items()},
    }
    files[COMPLETE_FILE] = _json_text(marker).encode("utf-8")
    return files


def write_encoded(
    folder: str | os.PathLike[str], files: Mapping[str, bytes], *, overwrite: bool = False
) -> dict[str, Path]:
    """Write the files :func:`encode_results` made into ``folder``, ``complete.json`` last.

    Args:
        folder: missing, empty, or (``overwrite``) a folder of earlier results.
        files: file name -> bytes, as :func:`encode_results` returns them.
        overwrite: clear a folder of earlier results first.

    Returns:
        The paths written, by file stem (``"manifest"``, ..., ``"complete"``).

    Raises:
        ParamInvalidError: the folder is not fresh (:func:`check_folder`), or ``files``
            lacks ``complete.json``.
    """
    if COMPLETE_FILE not in files:
        raise ParamInvalidError("files", sorted(files), f"must hold {COMPLETE_FILE}")
    out = check_folder(Path(folder), overwrite=overwrite)
    if overwrite:
        clear_folder(out)
    paths = {
        name.split(".")[0]: write_atomic(out / name, data, parents=True)
        for name, data in files.items()
        if name != COMPLETE_FILE
    }
    paths["complete"] = write_atomic(out / COMPLETE_FILE, files[COMPLETE_FILE])
    return paths


VOLATILE_MANIFEST_FIELDS = ("created", "mpi_library")
"""The manifest's fields that say when and in which kind of process a folder was written,
not what was studied: the time it was collected, and the MPI library (loaded under mpiexec,
absent in a lone process). Two runs of the same study differ in these alone, and in the
manifest's digest in ``complete.json`` that follows from them (:func:`comparable_files`)."""


def comparable_files(folder: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file of a results or sweep folder, with what differs between runs left out.

    A ``manifest.json`` loses :data:`VOLATILE_MANIFEST_FIELDS`; a results folder's
    ``complete.json`` loses the manifest's digest. Two runs of the same study (a sweep
    serial and spread over MPI ranks) give equal dictionaries.

    Args:
        folder: a folder :func:`write_results` or a sweep wrote.

    Returns:
        Path relative to ``folder`` (``/``-separated) -> the file's bytes, so adjusted.
    """
    root = Path(folder)
    found: dict[str, bytes] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == MANIFEST_FILE:
            manifest = json.loads(data)
            for key in VOLATILE_MANIFEST_FIELDS:
                manifest.pop(key, None)
            data = _json_text(manifest).encode("utf-8")
        elif path.name == COMPLETE_FILE:
            marker = json.loads(data)
            if isinstance(marker.get("files"), dict):
                marker["files"].pop(MANIFEST_FILE, None)
            data = _json_text(marker).encode("utf-8")
        found[path.relative_to(root).as_posix()] = data
    return found


def write_sweep(folder: str | os.PathLike[str], points: Mapping[str, str]) -> Path:
    """Mark a sweep's folder complete: write its ``complete.json`` listing the points.

    Call it last, once every point's results folder is written (and the plots drawn).

    Args:
        folder: the sweep's folder.
        points: each point's label (its ``--set`` values) -> its results folder's name in
            ``folder``.

    Returns:
        The marker's path.

    Raises:
        ParamInvalidError: a point's folder is not a complete results folder.

    """
    path = Path(folder)
    for label, name in points.items():
        if Path(name).name != name or not (path / name / COMPLETE_FILE).is_file():
            raise ParamInvalidError(
                f"points[{label!r}]", name, f"must name a complete results folder in {path}"
            )
    marker = {"format": FORMAT, "kind": "sweep", "points": dict(points)}
    return write_atomic(path / COMPLETE_FILE, _json_text(marker))


def read_sweep(folder: str | os.PathLike[str]) -> dict[str, Path] | None:
    """Return a sweep folder's points, label -> results folder; None for another folder.

    Args:
        folder: any folder.

    Returns:
        The points, in the order written, when ``folder`` is a complete sweep's folder; None
        when it is not a sweep's folder (a results folder, an incomplete one, no folder).

    Raises:
        ParamInvalidError: the sweep's ``complete.json`` is broken.

    """
    path = Path(folder)
    marker = _read_marker(path)
    if marker is None or marker.get("kind") != "sweep":
        return None
    points = marker.get("points")
    if not isinstance(points, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and Path(v).name == v for k, v in points.items()
    ):
        raise _broken(path, f"{COMPLETE_FILE} is broken: points must map labels to folder names")
    return {label: path / name for label, name in points.items()}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's ``complete.json`` (format checked), or None when it has none."""
    path = folder / COMPLETE_FILE
    if not path.is_file():
        return None
    data = _read_json(folder, COMPLETE_FILE)
    if not isinstance(data, dict) or data.get("kind") not in ("results", "sweep"):
        raise _broken(folder, f"{COMPLETE_FILE} is broken: it must be an object with a kind")
    if data.get("format") != FORMAT:
        raise _broken(
            folder,
            f"{COMPLETE_FILE} has format {data.get('format')!r}, not {FORMAT}: the folder was "
            "written by another version of mc2sim",
        )
    return data


def _check_files(folder: Path, marker: Mapping[str, Any]) -> None:
    """Check the folder's files against the sizes and digests its marker lists."""
    files = marker.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise _broken(folder, f"{COMPLETE_FILE} is broken: files must map names to digests")
    for name in (MANIFEST_FILE, SUMMARY_FILE, *_OPTIONAL_FILES):
        listed = files.get(name)
        path = folder / name
        if listed is None:
            if path.exists():
                raise _broken(folder, f"{name} is not one of the files {COMPLETE_FILE} lists")
            continue
        if not path.is_file():
            if path.exists() or path.is_symlink():  # a FIFO would block the read for ever
                raise _broken(folder, f"{name} is not a regular file")
            if name in _OPTIONAL_FILES:
                continue
            raise _broken(folder, f"{name} is missing")
        try:
            actual = _digest(path.read_bytes())
        except OSError as exc:
            raise _broken(folder, f"{name} cannot be read ({exc})") from None
        if actual != listed:
            raise _broken(
                folder,
                f"{name} is not the file its run wrote ({actual['bytes']} bytes, "
                f"{COMPLETE_FILE} lists {listed.get('bytes')}; SHA-256 differs): it was "
                "changed, cut short or replaced after the run finished",
            )


def _metrics_of(data: _Fields) -> Metrics:
    """A run's metrics from ``summary.json``, every field of its type (numbers as numbers)."""
    per_rank = []
    for i, item in enumerate(data.items("per_rank")):
        m = _Fields(item, f"per_rank[{i}]")
        per_rank.append(
            RankMetrics(
                rank=m.integer("rank"),
                total_s=m.number("total_s"),
                compute_s=m.number("compute_s"),
                comm_s=m.number("comm_s"),
                exposed_comm_s=m.number("exposed_comm_s"),
                pure_comm_s=m.number("pure_comm_s"),
                overlap_pct=m.number("overlap_pct"),
                flops=m.integer("flops"),
                bytes=m.integer("bytes"),
            )
        )
    return Metrics(
        per_rank=tuple(per_rank),
        critical_rank=data.integer("critical_rank"),
        total_s=data.number("total_s"),
        compute_s=data.number("compute_s"),
        comm_s=data.number("comm_s"),
        exposed_comm_s=data.number("exposed_comm_s"),
        overlap_pct=data.number("overlap_pct"),
        speedup=data.number_or_none("speedup"),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ResultsFolder:
    """A results folder, read back as typed records."""

    path: Path
    """The folder."""

    manifest: Manifest
    """What ran and where."""

    runs: Mapping[str, RunKey]
    """Tiling in words -> its run, in the order written. Stored read-only."""

    metrics: Mapping[str, Metrics]
    """Tiling in words -> its run's metrics against the baseline. Stored read-only."""

    baseline: RunKey
    """The run every run was compared with."""

    verdicts: Mapping[str, tuple[GoldenVerdict, ...]]
    """Tiling in words -> every rank's golden verdict (index = rank); empty without checks."""

    timeline: Timeline | None
    """Every task of ``tasks.csv``, or None when the folder has no ``tasks.csv``."""

    implementations: Mapping[str, ImplementationRecord] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    """Label -> a user's implementation checked beside the tilings; a timed one's label is
    also a run of :attr:`runs`. Empty for folders of ``run`` and ``simulate`` (and for folders
    written before implementations were recorded). Stored read-only."""

    ranks: tuple[RankRow, ...] = ()
    """A study with stragglers: ``ranks.csv``'s rows (every rank of every tiling)."""

    def totals(self) -> dict[str, float]:
        """Return tiling in words -> its run's ``total_s``, in the order written."""
        return {tiling: m.total_s for tiling, m in self.metrics.items()}

    def passed(self, tiling: str) -> bool | None:
        """Whether every rank's output under ``tiling`` (or implementation) met its golden.

        None when it was not checked.
        """
        if tiling in self.implementations:
            return self.implementations[tiling].passed
        verdicts = self.verdicts.get(tiling)
        if not verdicts:
            return None
        return all(v.passed for v in verdicts)


def _require_regular(file: Path, folder: Path) -> None:
    """Refuse a folder's file that is no regular file: reading a FIFO would block for ever."""
    if not file.is_file():
        raise _broken(folder, f"{file.name} is not a regular file")


def _broken(folder: Path, rule: str) -> ParamInvalidError:
    return ParamInvalidError("directory", str(folder), rule)


def _read_json(folder: Path, name: str) -> Any:
    path = folder / name
    if not path.is_file():
        raise _broken(folder, f"is not a results folder: {name} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _broken(
            folder, f"is not a results folder: {name} is not valid JSON ({exc})"
        ) from None


def read_results(folder: Path) -> ResultsFolder:
    """Read a results folder written by :func:`write_results`.

    Args:
        folder: the folder holding ``manifest.json``, ``summary.json`` and optionally
            ``tasks.csv``.

    Returns:
        The manifest, runs, metrics, baseline, golden verdicts and (with ``tasks.csv``)
        the timeline, typed.

    Raises:
        ParamInvalidError: the folder is missing or incomplete (no ``complete.json``); a
            file is missing, broken, written in another format, or not the file its run
            wrote (its size or SHA-256 differs from what ``complete.json`` lists); or the
            files disagree (a rank outside the manifest's world size, runs of ``tasks.csv``
            other than the summary's); the message names the folder, the file and the key.

    """
    path = Path(folder)
    if not path.is_dir():
        what = "it is a file" if path.exists() else "no such folder"
        raise _broken(path, f"is not a results folder: {what}")
    marker = _read_marker(path)
    if marker is not None and marker["kind"] == "sweep":
        raise _broken(path, "is a sweep's folder, not a results folder: read its points")
    written = (MANIFEST_FILE, SUMMARY_FILE, TASKS_FILE, TRACE_FILE)
    if marker is None and any((path / name).exists() for name in written):
        raise _broken(
            path,
            f"is incomplete: it has no {COMPLETE_FILE}, so the run writing it did not finish "
            f"(or an mc2sim older than format {FORMAT} wrote it)",
        )
    try:
        manifest = Manifest.from_json(_read_json(path, MANIFEST_FILE))
    except ParamInvalidError as exc:
        if exc.param == "directory":
            raise
        raise _broken(path, f"{MANIFEST_FILE} is broken: {exc}") from None
    data = _read_json(path, SUMMARY_FILE)
    try:
        summary = _Fields(data, "summary")
        baseline = _run_of(summary.table("baseline"))
        runs: dict[str, RunKey] = {}
        metrics: dict[str, Metrics] = {}
        for i, item in enumerate(summary.items("runs")):
            entry = _Fields(item, f"summary.runs[{i}]")
            run = _run_of(entry.table("run"))
            if run.tiling in runs:
                raise ParamInvalidError(entry.where, str(run), "repeats a tiling")
            try:
                metrics[run.tiling] = _metrics_of(entry.table("metrics"))
            except ParamInvalidError as exc:
                raise ParamInvalidError(
                    f"{entry.where}.metrics", str(run), f"is broken ({exc})"
                ) from None
            bad = [m.rank for m in metrics[run.tiling].per_rank if m.rank >= manifest.world_size]
            if bad:
                raise ParamInvalidError(
                    f"{entry.where}.metrics", f"rank {bad[0]}",
                    f"is not a rank of the manifest's world size {manifest.world_size}",
                )  # fmt: skip
            runs[run.tiling] = run
        if baseline not in runs.values():
            raise ParamInvalidError("summary.baseline", str(baseline), "is not one of the runs")
        golden: dict[str, tuple[GoldenVerdict, ...]] = {}
        table = summary.table("golden")
        for tiling in table.data:
            if tiling not in runs:
                raise ParamInvalidError("summary.golden", tiling, "is not a tiling of the runs")
            golden[tiling] = tuple(
                GoldenVerdict.from_json(v, f"summary.golden[{tiling!r}][{i}]")
                for i, v in enumerate(table.items(tiling))
            )
            if len(golden[tiling]) > manifest.world_size:
                raise ParamInvalidError(
                    f"summary.golden[{tiling!r}]", f"{len(golden[tiling])} verdicts",
                    f"must be at most one per rank of the manifest ({manifest.world_size})",
                )  # fmt: skip
        implementations: dict[str, ImplementationRecord] = {}
        if "implementations" in summary.data:  # folders of format 2 before it lack the key
            table = summary.table("implementations")
            for label in table.data:
                record = ImplementationRecord.from_json(
                    table.data[label], f"summary.implementations[{label!r}]"
                )
                if record.timed != (label in runs):
                    raise ParamInvalidError(
                        f"summary.implementations[{label!r}].timed", record.timed,
                        "must say whether its run is one of the runs",
                    )  # fmt: skip
                if len(record.verdicts) > manifest.world_size:
                    raise ParamInvalidError(
                        f"summary.implementations[{label!r}].verdicts",
                        f"{len(record.verdicts)} verdicts",
                        f"must be at most one per rank of the manifest ({manifest.world_size})",
                    )
                implementations[label] = record
        meta = dict(summary.table("timeline_meta").data)
        for key in ("scenario", "world_size"):
            stated = getattr(manifest, key)
            if key in meta and meta[key] != stated:
                raise ParamInvalidError(
                    f"summary.timeline_meta.{key}", meta[key], f"must be the manifest's ({stated})"
                )
    except ParamInvalidError as exc:
        raise _broken(path, f"{SUMMARY_FILE} is broken: {exc}") from None
    timeline = None
    if (path / TASKS_FILE).exists():
        _require_regular(path / TASKS_FILE, path)
        timeline = _read_tasks(path / TASKS_FILE, path, manifest.source, meta)
        if set(timeline.runs()) != set(runs.values()):
            raise _broken(
                path,
                f"{TASKS_FILE} holds the runs {sorted(str(r) for r in timeline.runs())}, "
                f"{SUMMARY_FILE} {sorted(str(r) for r in runs.values())}",
            )
        outside = [r for r in timeline.ranks() if r >= manifest.world_size]
        if outside:
            raise _broken(
                path,
                f"{TASKS_FILE} holds rank {outside[0]}, outside the manifest's world size "
                f"{manifest.world_size}",
            )
    if marker is None:
        raise _broken(path, f"is incomplete: it has no {COMPLETE_FILE}")
    _check_files(path, marker)
    rank_rows = _read_ranks(path / RANKS_FILE, path) if (path / RANKS_FILE).is_file() else ()
    return ResultsFolder(
        path=path,
        manifest=manifest,
        runs=MappingProxyType(runs),
        metrics=MappingProxyType(metrics),
        baseline=baseline,
        verdicts=MappingProxyType(golden),
        timeline=timeline,
        implementations=MappingProxyType(implementations),
        ranks=rank_rows,
    )
