"""Tables and plots of one or more results folders written by ``mc2sim run`` or ``simulate``.

Folders are read with :func:`mc2sim.results.read_results` (the one reader of their files),
as typed :class:`~mc2sim.results.ResultsFolder` records. :func:`format_tables` prints
per-tiling tables (and a predicted vs measured table for a measured and a simulated folder of
one scenario and world size), and :func:`report` does both and draws PNG plots, under the
file names :mod:`mc2sim.results` gives::

    result = report([Path("results/demo"), Path("results/demo-sim")])
    print(result.tables)  # result.plots lists the PNG files written

Plots are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never
through ``pyplot``: nothing depends on (or changes) the process's matplotlib backend, so
reports run headless and from threads. Every PNG is written atomically.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mc2sim._atomic import write_atomic
from mc2sim.errors import ParamInvalidError
from mc2sim.model.accuracy import geomean_of, model_error
from mc2sim.results import (
    OVERLAP_VS_SKEW_PNG,
    PREDICTED_VS_MEASURED_PNG,
    SPEEDUP_PNG,
    ResultsFolder,
    gantt_png,
    read_results,
    read_sweep,
)
from mc2sim.timeline import Metrics, Source, Stream, TaskRecord, Timeline

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "GANTT_RANKS",
    "METRICS_HEADER",
    "Comparison",
    "ComparisonRow",
    "ReportResult",
    "compare",
    "format_tables",
    "gantt_ranks",
    "implementation_rows",
    "metrics_row",
    "report",
    "tile_count",
]

_STREAM_COLORS = {Stream.COMPUTE: "tab:blue", Stream.COMM: "tab:orange"}
_TRAILING_NUMBER = re.compile(r"(\d+)\)?\s*$")


def tile_count(tiling: str) -> int | None:
    """Return the number of tiles of a tiling in words, or None when it has no number.

    ``serial`` is 1 tile; ``tiles=4``, ``experts x 4``, ``ranks x 4`` and
    ``hardware(tiles=4)`` are 4; ``hardware(per expert)`` has no number.

    Args:
        tiling: the tiling in words.

    Returns:
        The tile count, or None.

    """
    if tiling == "serial":
        return 1
    found = _TRAILING_NUMBER.search(tiling)
    return int(found.group(1)) if found else None


def _is_hardware(tiling: str) -> bool:
    return tiling.startswith("hardware")


def _tiling_order(tiling: str) -> tuple[int, float, str]:
    """Sort key: serial, then hardware, then by tile count, then by name."""
    count = tile_count(tiling)
    group = 0 if tiling == "serial" else 1 if _is_hardware(tiling) else 2
    return (group, math.inf if count is None else count, tiling)


def _tilings(folder: ResultsFolder) -> list[str]:
    """The folder's tilings in display order: serial, hardware, then by tile count.

    The runs of implementations checked beside them (``mc2sim check``) are not tilings and
    are left out: see :func:`_implementations`.
    """
    return sorted((t for t in folder.runs if t not in folder.implementations), key=_tiling_order)


def _implementations(folder: ResultsFolder) -> list[str]:
    """The labels of the implementations checked in the folder, in the order written."""
    return list(folder.implementations)


def _golden(folder: ResultsFolder, tiling: str) -> str:
    """``pass`` when every rank met its golden, ``FAIL`` when one did not, ``-`` unchecked."""
    passed = folder.passed(tiling)
    return "-" if passed is None else "pass" if passed else "FAIL"


@dataclass(frozen=True, kw_only=True, slots=True)
class ComparisonRow:
    """One tiling's measured and simulated total time."""

    tiling: str
    """The tiling in words."""

    measured_s: float
    """The measured run's ``total_s``."""

    simulated_s: float
    """The simulated run's ``total_s``."""

    @property
    def error(self) -> float:
        """``max / min - 1`` of the two times (0 when equal)."""
        return model_error(self.measured_s, self.simulated_s)


@dataclass(frozen=True, kw_only=True, slots=True)
class Comparison:
    """A measured and a simulated folder of one scenario and world size, tiling by tiling."""

    measured: ResultsFolder
    """The ``mc2sim run`` folder."""

    simulated: ResultsFolder
    """The ``mc2sim simulate`` folder."""

    rows: tuple[ComparisonRow, ...]
    """The tilings both folders ran (with positive times), in the measured folder's order."""

    @property
    def geomean_error(self) -> float:
        """``exp(mean(log(max/min))) - 1`` over the rows; 0.0 without rows."""
        return geomean_of(r.error for r in self.rows)


def compare(folders: Sequence[ResultsFolder]) -> list[Comparison]:
    """Pair each measured folder with the first simulated one of its scenario and world size.

    Args:
        folders: loaded results folders, in any order.

    Returns:
        One comparison per measured folder that has a simulated partner.

    """
    pairs = []
    for measured in folders:
        if measured.manifest.source is not Source.MEASURED:
            continue
        partner = next(
            (
                f
                for f in folders
                if f.manifest.source is Source.SIMULATED
                and f.manifest.scenario == measured.manifest.scenario
                and f.manifest.world_size == measured.manifest.world_size
            ),
            None,
        )
        if partner is None:
            continue
        rows = tuple(
            ComparisonRow(
                tiling=tiling,
                measured_s=m.total_s,
                simulated_s=partner.metrics[tiling].total_s,
            )
            for tiling in _tilings(measured)
            if tiling in partner.metrics
            and (m := measured.metrics[tiling]).total_s > 0
            and partner.metrics[tiling].total_s > 0
        )
        pairs.append(Comparison(measured=measured, simulated=partner, rows=rows))
    return pairs


METRICS_HEADER = (
    f"{'tiling':<26}{'total ms':>10}{'compute':>10}{'comm':>10}{'exposed':>10}"
    f"{'overlap%':>9}{'speedup':>9}"
)
"""The column heads of :func:`metrics_row`."""


def ms_column(seconds: float, width: int = 10) -> str:
    """``seconds`` in ms, right-aligned in ``width`` characters with a space before it.

    Three decimals where they fit; otherwise 4 significant digits in exponent form (a
    what-if of huge shapes), so the columns stay aligned.
    """
    text = f"{seconds * 1e3:.3f}"
    if len(text) >= width:
        text = f"{seconds * 1e3:.4g}"
    return f"{text:>{width}}"


def metrics_row(tiling: str, m: Metrics, *, opaque: bool = False) -> str:
    """One tiling's metrics as a table row under :data:`METRICS_HEADER` (times in ms).

    ``opaque``: the run is one task per rank spanning a call whose inside is not seen (an
    implementation checked by ``mc2sim check``): its compute, comm, exposed and overlap
    columns are ``-``.
    """
    speedup = f"{m.speedup:.2f}" if m.speedup is not None else "-"
    if opaque:
        dashes = f"{'-':>10}{'-':>10}{'-':>10}{'-':>9}"
        return f"{tiling:<26}{ms_column(m.total_s)}{dashes}{speedup:>9}"
    return (
        f"{tiling:<26}{ms_column(m.total_s)}{ms_column(m.compute_s)}"
        f"{ms_column(m.comm_s)}{ms_column(m.exposed_comm_s)}"
        f"{m.overlap_pct:>9.1f}{speedup:>9}"
    )


def implementation_rows(folder: ResultsFolder) -> list[str]:
    """The rows of the folder's implementations under :data:`METRICS_HEADER` + golden.

    A timed implementation's row has its total and speedup (the rest ``-``: its inside is
    not seen); one not timed (a rank raised or returned another form, shape or dtype) says
    so. Each is followed by the failing ranks' verdicts, one line each.
    """
    lines = []
    for label, record in folder.implementations.items():
        golden = "pass" if record.passed else "FAIL"
        if label in folder.metrics:
            lines.append(f"{metrics_row(label, folder.metrics[label], opaque=True)}  {golden}")
        else:
            lines.append(f"{label:<26}{'not timed':>10}{'':>47}  {golden}")
        for v in record.verdicts:
            if v.passed:
                continue
            if v.error is not None:
                lines.append(f"  rank {v.rank}: {v.error}")
            elif v.worst is not None:
                w = v.worst
                lines.append(
                    f"  rank {v.rank}: {v.standard} ({v.dtype}) {v.mismatches}/{v.numel} "
                    f"mismatched; worst at {w.index}: actual {w.actual!r}, golden {w.golden!r}"
                )
            else:
                lines.append(f"  rank {v.rank}: {v.standard} ({v.dtype}) failed")
    return lines


def _folder_table(folder: ResultsFolder) -> list[str]:
    manifest = folder.manifest
    lines = [
        f"# {manifest.scenario}: {manifest.op}, {manifest.world_size} ranks, {manifest.source}, "
        f"skew {manifest.routing.skew:g} ({folder.path})",
        METRICS_HEADER + "  golden",
    ]
    for tiling in _tilings(folder):
        lines.append(f"{metrics_row(tiling, folder.metrics[tiling])}  {_golden(folder, tiling)}")
    return lines + implementation_rows(folder)


STRAGGLER_ROWS = 8
"""Ranks the straggler table shows per tiling besides the stragglers themselves: those whose
exposed communication the stragglers raised most."""


def _straggler_table(folder: ResultsFolder) -> list[str]:
    """Per tiling: the stragglers, then the ranks they delayed most (``ranks.csv``)."""
    lines = [
        f"# stragglers of {folder.manifest.scenario} ({folder.path}): exposed comm with and "
        "without them, waits at collectives for the last rank to arrive",
        f"{'tiling':<26}{'rank':>6}{'compute':>9}{'link':>6}{'late us':>9}{'exposed ms':>12}"
        f"{'nominal ms':>12}{'added ms':>10}{'wait ms':>10}{'waited for':>11}{'last at':>8}",
    ]
    by_tiling: dict[str, list[Any]] = {}
    for row in folder.ranks:
        by_tiling.setdefault(row.tiling, []).append(row)
    for tiling, rows in by_tiling.items():
        odd = [r for r in rows if (r.compute, r.link, r.late_us) != (1.0, 1.0, 0.0)]
        others = sorted(
            (r for r in rows if r not in odd), key=lambda r: (-r.added_exposed_s, r.rank)
        )[:STRAGGLER_ROWS]
        for r in [*odd, *others]:
            lines.append(
                f"{tiling:<26}{r.rank:>6}{r.compute:>9.3g}{r.link:>6.3g}{r.late_us:>9.3g}"
                f"{r.exposed_comm_s * 1e3:>12.3f}{r.nominal_exposed_comm_s * 1e3:>12.3f}"
                f"{r.added_exposed_s * 1e3:>10.3f}{r.wait_s * 1e3:>10.3f}"
                f"{r.waited_for if r.waited_for >= 0 else '-':>11}{r.last:>8}"
            )
        rest = len(rows) - len(odd) - len(others)
        if rest > 0:
            mean = sum(r.added_exposed_s for r in rows if r not in odd) / (len(rows) - len(odd))
            lines.append(f"{tiling:<26}  ... {rest} more ranks; mean added over the nominal "
                         f"ranks {mean * 1e3:.3f} ms")  # fmt: skip
    return lines


def _comparison_table(pair: Comparison) -> list[str]:
    measured = pair.measured.manifest
    lines = [
        f"# predicted vs measured: {measured.scenario}, {measured.world_size} ranks "
        f"({pair.measured.path} vs {pair.simulated.path})",
        f"{'tiling':<26}{'measured ms':>12}{'simulated ms':>13}{'error':>9}",
    ]
    for row in pair.rows:
        lines.append(
            f"{row.tiling:<26}{row.measured_s * 1e3:>12.3f}{row.simulated_s * 1e3:>13.3f}"
            f"{row.error:>9.1%}"
        )
    lines.append(f"geomean error over {len(pair.rows)} tilings: {pair.geomean_error:.1%}")
    lines += _implementation_vs_model(pair)
    return lines


def _implementation_vs_model(pair: Comparison) -> list[str]:
    """Each timed implementation's measured total beside the model's prediction of the op.

    The model predicts the tilings, not a user's kernel: the lines give its time of the
    hardware tiling (the fused op's own schedule) and of its fastest tiling.
    """
    simulated = pair.simulated.metrics
    if not simulated:
        return []
    fastest = min(simulated, key=lambda t: simulated[t].total_s)
    hardware = next((t for t in simulated if _is_hardware(t)), None)
    lines = []
    for label in _implementations(pair.measured):
        if label not in pair.measured.metrics:
            continue
        line = f"{label}: measured {pair.measured.metrics[label].total_s * 1e3:.3f} ms; model: "
        if hardware is not None:
            line += f"{hardware} {simulated[hardware].total_s * 1e3:.3f} ms, "
        line += f"fastest {fastest} {simulated[fastest].total_s * 1e3:.3f} ms"
        lines.append(line)
    return lines


def format_tables(folders: Sequence[ResultsFolder]) -> str:
    """Return the text tables of ``folders``.

    One table per folder (a row per tiling: total, compute, comm and exposed ms, overlap %,
    speedup, golden verdict), a straggler table per folder of a study with stragglers (the
    stragglers, and the ranks whose exposed communication they raised most), then one
    predicted vs measured table per pair found by :func:`compare` (measured ms, simulated
    ms, error ``max/min - 1``, geomean error).

    Args:
        folders: loaded results folders.

    Returns:
        The tables, separated by blank lines, ending with a newline.

    """
    blocks = [_folder_table(f) for f in folders]
    blocks += [_straggler_table(f) for f in folders if f.ranks]
    blocks += [_comparison_table(p) for p in compare(folders)]
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def _new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "mc2sim report draws plots with matplotlib: pip install matplotlib", name=exc.name
        ) from exc
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG, atomically (rendered in memory, then written and renamed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return write_atomic(path, buf.getvalue(), parents=True)


GANTT_RANKS = 16
"""The most ranks a Gantt chart draws: beyond it, the ones with the most compute."""


def gantt_ranks(records: Sequence[TaskRecord], limit: int = GANTT_RANKS) -> list[int]:
    """The ranks a Gantt chart of ``records`` shows, in rank order.

    Every rank up to ``limit`` ranks; beyond it the ``limit`` with the most compute time
    (the ones a collective waits for: a straggler, the ranks of the hot experts), the lower
    rank first among equals.
    """
    busy: dict[int, float] = {}
    for r in records:
        busy[r.rank] = busy.get(r.rank, 0.0) + (r.duration_s if r.stream == Stream.COMPUTE else 0.0)
    if len(busy) <= limit:
        return sorted(busy)
    return sorted(sorted(busy, key=lambda rank: (-busy[rank], rank))[:limit])


def _plot_gantt(folder: ResultsFolder, timeline: Timeline, tiling: str, path: Path) -> Path:
    """One lane per (rank, stream); bars from start to end in ms, colored by stream.

    At most :data:`GANTT_RANKS` ranks (:func:`gantt_ranks`); the title says when it is fewer
    than the run's.
    """
    from matplotlib.patches import Patch

    records = timeline.for_run(folder.runs[tiling]).records
    t0 = min((r.start_s for r in records), default=0.0)
    shown = gantt_ranks(records)
    lanes = [(rank, stream) for rank in shown for stream in Stream]
    index = {lane: i for i, lane in enumerate(lanes)}
    bars: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(lanes))}
    for r in records:
        lane = index.get((r.rank, r.stream))
        if lane is not None:
            bars[lane].append(((r.start_s - t0) * 1e3, r.duration_s * 1e3))
    fig = _new_figure(10.0, min(30.0, 1.5 + 0.3 * max(len(lanes), 2)))
    ax = fig.subplots()
    for i, (_, stream) in enumerate(lanes):
        if bars[i]:
            ax.broken_barh(
                bars[i], (i - 0.4, 0.8), facecolors=_STREAM_COLORS[stream], edgecolor="black",
                linewidth=0.3, alpha=0.85,
            )  # fmt: skip
    ax.set_yticks(range(len(lanes)), [f"rank {rank} {stream.value}" for rank, stream in lanes])
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlabel("time from the run's first task (ms)")
    ax.set_ylabel("rank, stream")
    manifest = folder.manifest
    ranks = f"{manifest.world_size} ranks"
    if len(shown) < manifest.world_size:
        ranks = f"the {len(shown)} of {ranks} with the most compute"
    ax.set_title(f"{manifest.scenario}: {tiling} ({manifest.source}, {ranks})")
    ax.legend(
        handles=[Patch(color=c, label=s.value) for s, c in _STREAM_COLORS.items()],
        loc="upper right",
    )
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _folder_label(folder: ResultsFolder) -> str:
    return f"{folder.path.name} ({folder.manifest.source})"


def _plot_speedup(folders: Sequence[ResultsFolder], path: Path) -> Path | None:
    """Speedup against tile count, a line per folder; hardware tilings as star markers."""
    series = []
    for folder in folders:
        points: list[tuple[int, float]] = []
        hardware: list[tuple[str, int | None, float]] = []
        for tiling, m in folder.metrics.items():
            if m.speedup is None or tiling in folder.implementations:
                continue
            count = tile_count(tiling)
            if _is_hardware(tiling):
                hardware.append((tiling, count, m.speedup))
            elif count is not None:
                points.append((count, m.speedup))
        if any(count > 1 for count, _ in points):
            series.append((folder, sorted(points), hardware))
    if not series:
        return None
    fig = _new_figure(7.0, 4.5)
    ax = fig.subplots()
    counts: set[int] = set()
    for folder, points, hardware in series:
        xs = [c for c, _ in points]
        counts.update(xs)
        (line,) = ax.plot(xs, [s for _, s in points], marker="o", label=_folder_label(folder))
        for tiling, count, speedup in hardware:
            if count is not None:
                counts.add(count)
                ax.plot([count], [speedup], marker="*", markersize=14, color=line.get_color())
                ax.annotate(tiling, (count, speedup), textcoords="offset points", xytext=(6, 6))
            else:  # no tile count: a level line across the plot
                ax.axhline(speedup, linestyle=":", color=line.get_color())
                ax.annotate(
                    tiling, (min(xs), speedup), textcoords="offset points", xytext=(4, 4),
                    color=line.get_color(),
                )  # fmt: skip
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(counts), [str(c) for c in sorted(counts)])
    ax.set_xlabel("tile count (serial = 1; hardware: * at its tile count, else dotted)")
    ax.set_ylabel("speedup over serial")
    ax.set_title("speedup against tile count")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_overlap_vs_skew(folders: Sequence[ResultsFolder], path: Path) -> Path | None:
    """Overlap % against routing skew, a line per tiling, for folders of one scenario."""
    groups: dict[tuple[str, int, str], dict[float, ResultsFolder]] = {}
    for folder in folders:
        manifest = folder.manifest
        key = (manifest.scenario, manifest.world_size, manifest.source.value)
        groups.setdefault(key, {}).setdefault(manifest.routing.skew, folder)
    usable = {key: by_skew for key, by_skew in groups.items() if len(by_skew) >= 2}
    if not usable:
        return None
    fig = _new_figure(7.0, 4.5)
    ax = fig.subplots()
    several = len(usable) > 1
    for (scenario, world, source), by_skew in usable.items():
        skews = sorted(by_skew)
        tilings = list(dict.fromkeys(t for s in skews for t in _tilings(by_skew[s])))
        for tiling in tilings:
            xs = [s for s in skews if tiling in by_skew[s].metrics]
            ys = [by_skew[s].metrics[tiling].overlap_pct for s in xs]
            label = f"{tiling} ({scenario}, {world} ranks, {source})" if several else tiling
            ax.plot(xs, ys, marker="o", label=label)
    if not several:
        ((scenario, world, source),) = usable
        ax.set_title(f"{scenario}: overlap against routing skew ({world} ranks, {source})")
    else:
        ax.set_title("overlap against routing skew")
    ax.set_xlabel("routing skew")
    ax.set_ylabel("overlap (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _plot_predicted_vs_measured(pairs: Sequence[Comparison], path: Path) -> Path | None:
    """Simulated against measured total ms per tiling, with the line y = x."""
    pairs = [p for p in pairs if p.rows]
    if not pairs:
        return None
    fig = _new_figure(6.0, 6.0)
    ax = fig.subplots()
    values = []
    for pair in pairs:
        xs = [r.measured_s * 1e3 for r in pair.rows]
        ys = [r.simulated_s * 1e3 for r in pair.rows]
        values += xs + ys
        label = f"{pair.measured.manifest.scenario}, {pair.measured.manifest.world_size} ranks"
        label += f" (geomean error {pair.geomean_error:.1%})"
        ax.scatter(xs, ys, label=label, zorder=3)
        for row, x, y in zip(pair.rows, xs, ys, strict=True):
            ax.annotate(row.tiling, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    lo, hi = min(values) / 1.5, max(values) * 1.5
    ax.plot([lo, hi], [lo, hi], color="gray", linestyle="--", label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured total (ms)")
    ax.set_ylabel("simulated total (ms)")
    ax.set_title("predicted vs measured")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _results_folders(directory: Path) -> list[Path]:
    """``directory``, or a sweep's point folders when it is a sweep's folder."""
    points = read_sweep(directory)
    return [directory] if points is None else list(points.values())


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportResult:
    """What :func:`report` produced."""

    tables: str
    """The text tables (see :func:`format_tables`)."""

    plots: tuple[Path, ...]
    """The PNG files written, in the order written."""

    comparisons: tuple[Comparison, ...]
    """The predicted vs measured pairs found."""


def report(
    directories: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    plots: bool = True,
) -> ReportResult:
    """Read results folders; return their tables and write PNG plots.

    Plots (each skipped, without error, when the folders do not support it):

    * ``gantt_<tiling>.png`` for every tiling of the first folder: a lane per (rank, stream),
      of at most :data:`GANTT_RANKS` ranks, beyond it those with the most compute
      (:func:`gantt_ranks`) (none when the folder has no ``tasks.csv``);
    * ``speedup.png``: speedup against tile count, a line per folder with numbered tilings;
    * ``overlap_vs_skew.png``: overlap % against routing skew, a line per tiling, when folders
      of one scenario, world size and source have at least two different skews;
    * ``predicted_vs_measured.png``: simulated against measured total ms, when a measured and
      a simulated folder of one scenario and world size are given.

    Args:
        directories: one or more results folders; a sweep's folder stands for its points.
        out: where to write the PNGs; default the first folder (created if missing).
        plots: False to only read and tabulate (matplotlib is not needed then).

    Returns:
        The tables, the PNG paths written and the predicted vs measured pairs.

    Raises:
        ParamInvalidError: no folder given, or one is not a complete results folder (see
            :func:`mc2sim.results.read_results`).

    """
    if not directories:
        raise ParamInvalidError("directories", [], "must name at least one results folder")
    folders = [read_results(p) for d in directories for p in _results_folders(Path(d))]
    pairs = compare(folders)
    tables = format_tables(folders)
    written: list[Path] = []
    if plots:
        target = Path(out) if out is not None else Path(directories[0])
        first = folders[0]
        if first.timeline is not None:
            timed = [label for label in _implementations(first) if label in first.runs]
            for tiling in _tilings(first) + timed:
                path = target / gantt_png(tiling)
                written.append(_plot_gantt(first, first.timeline, tiling, path))
        for drawn in (
            _plot_speedup(folders, target / SPEEDUP_PNG),
            _plot_overlap_vs_skew(folders, target / OVERLAP_VS_SKEW_PNG),
            _plot_predicted_vs_measured(pairs, target / PREDICTED_VS_MEASURED_PNG),
        ):
            if drawn is not None:
                written.append(drawn)
    return ReportResult(tables=tables, plots=tuple(written), comparisons=tuple(pairs))
