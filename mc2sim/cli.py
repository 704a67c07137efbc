"""The ``mc2sim`` command line (also ``python -m mc2sim``)."""

from __future__ import annotations

import argparse
import os
import platform
import runpy
import socket
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mc2sim.runtime import abort_on_exception, steady_allocator

if TYPE_CHECKING:
    from mc2sim.topology import Topology

__all__ = ["main"]


def _version_of(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the MPI library, the launcher and every rank's host."""
    from mc2sim.comm import detect_launcher, init

    comm = init(args.backend)
    rows = comm.allgather_object((comm.rank, socket.gethostname(), os.getpid()))
    if comm.rank != 0:
        return 0
    mpi_library = "not loaded"
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        mpi_library = " ".join(MPI.Get_library_version().split("\n", 1)[0].split())
    packages = ("mc2sim", "torch", "numpy", "mpi4py", "mpich")
    print(
        f"mc2sim {_version_of('mc2sim')} on Python {platform.python_version()} "
        f"({platform.machine()})"
    )
    print("packages:    " + ", ".join(f"{p} {_version_of(p)}" for p in packages[1:]))
    print(f"MPI library: {mpi_library}")
    print(f"launcher:    {detect_launcher()}")
    print(f"backend:     {comm.backend}")
    print(f"world size:  {comm.size}")
    for rank, host, pid in rows:
        print(f"  rank {rank:>4}  host {host}  pid {pid}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit this machine's topology on the ranks at hand; rank 0 writes it."""
    from mc2sim.comm import init
    from mc2sim.study.calibrate import calibrate

    comm = init("mpi")
    with _progress_bar(args.reps + 1, "calibrate", "round", show=comm.rank == 0) as bar:
        topology = calibrate(comm, reps=args.reps, name=args.name, progress=_ticker(bar)).topology
    if comm.rank == 0:
        _write_topology(topology, args.out)
    return 0


def _write_topology(topology: Topology, out: str) -> None:
    """Write a fitted topology and print its figures."""
    from mc2sim.topology import dump

    dump(topology, out)
    print(f"wrote {out}")
    _print_fit(topology)


def _print_fit(topology: Topology) -> None:
    """Print a fitted topology's figures, one line a part."""
    device, slow = topology.device, topology.contention
    peaks = ", ".join(f"{k} {v:.3g}" for k, v in sorted(device.matrix_tflops.items()))
    eff = device.efficiency
    print(f"compute: peak TFLOP/s {peaks}; launch {device.launch_us:.1f} us")
    print(
        f"efficiency: small tasks {eff.small_util}, large {eff.large_util}, "
        f"half-way at {eff.half_flops:.3g} FLOP"
    )
    print(f"memory {device.memory_gbps:.1f} GB/s, vector {device.vector_tflops:.3g} TFLOP/s")
    for dim in topology.network:  # innermost first: on several hosts, then across them
        print(f"network: {dim.kind} x{dim.ranks}, {dim.bandwidth_gbps:.2f} GB/s")
        print(f"latency {dim.latency_us:.1f} us")
    print(f"contention: compute x{slow.compute_slowdown}, comm x{slow.comm_slowdown}")
    together = "together" if device.concurrent_collectives else "one at a time"
    print(f"collectives in flight progress {together}")


def _ticker(bar: Any) -> Callable[[int, int, str], None]:
    """A progress callback that advances ``bar`` and shows the label."""

    def show(i: int, n: int, label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update()

    return show


def _cmd_validate_model(args: argparse.Namespace) -> int:
    """Run the validation sweep for real and simulated; rank 0 prints the errors."""
    from mc2sim.comm import init
    from mc2sim.study.calibrate import calibrate
    from mc2sim.study.validate import default_cases, geomean_error, run_cases, score_cases
    from mc2sim.topology import load

    for flag, value in (("--out", args.out), ("--name", args.name)):
        if value is not None and not args.calibrate:
            print(f"mc2sim validate-model: {flag} is for the fitted topology: it needs --calibrate",
                  file=sys.stderr)  # fmt: skip
            return 2
    comm = init("mpi")
    cases = default_cases(comm)
    with _progress_bar(args.reps + 1, "validate-model", "round", show=comm.rank == 0) as bar:
        if args.calibrate:
            fitted = calibrate(
                comm,
                reps=args.reps,
                name=args.name or "this_machine",
                alongside=[c.run for c in cases],
                progress=_ticker(bar),
            )
            topology, source = fitted.topology, "calibrated in the same rounds"
            results = score_cases(cases, fitted.alongside, topology)
        else:
            topology, source = load(args.topology), args.topology
            if topology.world_size != comm.size:
                topology = topology.with_world(comm.size)
            results = run_cases(comm, cases, topology, reps=args.reps, progress=_ticker(bar))
    if comm.rank == 0:
        if args.calibrate and args.out:
            _write_topology(topology, args.out)
        elif args.calibrate:
            _print_fit(topology)
        print(f"# validate-model: {comm.size} ranks, {source}, median of {args.reps}")
        print(f"{'case':<70}{'measured ms':>12}{'simulated ms':>13}{'error':>8}")
        for r in results:
            measured, simulated = r.measured_s * 1e3, r.simulated_s * 1e3
            print(f"{r.name:<70}{measured:>12.2f}{simulated:>13.2f}{r.error:>8.1%}")
        print(f"geomean error over {len(results)} cases: {geomean_error(results):.1%}")
    return 0


def _rounds(text: str) -> int:
    """``--reps``: a whole number of rounds, at least one (argparse reports the rule)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1 (rounds measured)")
    return value


def _progress_bar(total: int, desc: str, unit: str, *, show: bool) -> Any:
    """A tqdm bar on stderr, drawn only where ``show`` (rank 0); a no-op bar elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not show)


def _load_scenario(name: str, overrides: Sequence[str]) -> Any:
    """A shipped scenario by name, or a scenario file, with ``--set`` overrides."""
    from pathlib import Path

    from mc2sim.scenario import builtin, list_builtin, load

    if name in list_builtin() and not Path(name).exists():
        return builtin(name, overrides)
    return load(name, overrides)


def _scenario_file(name: str) -> Path:
    """The file :func:`_load_scenario` reads for ``name`` (recorded in the manifest)."""
    from mc2sim.scenario import list_builtin, scenarios_dir

    if name in list_builtin() and not Path(name).exists():
        return scenarios_dir() / f"{name}.yaml"
    return Path(name)


def _cmd_simulate(args: argparse.Namespace) -> int:
    """Simulate a scenario under each of its tilings; write a results folder; print a table."""
    from pathlib import Path

    from mc2sim.errors import AclnnError
    from mc2sim.model.accuracy import model_error
    from mc2sim.report import METRICS_HEADER, metrics_row
    from mc2sim.study.simulate import load_topology, simulate_study, write_results

    try:
        scenario = _load_scenario(args.scenario, args.set)
        topology = load_topology(args.topology or scenario.topology)
    except (AclnnError, OSError) as exc:
        print(f"mc2sim simulate: {exc}", file=sys.stderr)
        return 2
    result = simulate_study(scenario, topology, args.ranks)
    out = Path(args.out or f"results/{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}-sim")
    write_results(
        result, out, scenario_path=_scenario_file(args.scenario), argv=args.argv,
        overrides=args.set,
    )  # fmt: skip
    measured = _measured_totals(Path(args.measured)) if args.measured else {}
    print(f"# {scenario.name}: {scenario.op}, {result.world} ranks on {result.topology.name}")
    print(METRICS_HEADER + (f"{'measured':>10}{'error':>8}" if measured else ""))
    for tiling, m in result.metrics().items():
        line = metrics_row(tiling, m)
        if tiling in measured:
            real = measured[tiling]
            error = model_error(real, m.total_s)
            line += f"{real * 1e3:>10.3f}{error:>8.1%}"
        print(line)
    if args.plots:
        _write_plots([out, Path(args.measured)] if args.measured else [out], out)
    print(f"results: {out}")
    return 0


def _write_plots(folders: Sequence[Path], out: Path) -> None:
    """Draw the PNG plots of results folders into ``out`` (see :func:`mc2sim.report.report`)."""
    from mc2sim.report import report

    written = report(folders, out).plots
    print(f"plots: {len(written)} PNG in {out}")


def _measured_totals(directory: Path) -> dict[str, float]:
    """Tiling -> measured total seconds, from a ``mc2sim run`` results folder."""
    from mc2sim.results import read_results

    return read_results(directory).totals()


def _cmd_run(args: argparse.Namespace) -> int:
    """Run a scenario for real under mpiexec: every tiling, golden check, timeline, results."""
    from pathlib import Path

    from mc2sim.comm import init
    from mc2sim.errors import AclnnError
    from mc2sim.report import METRICS_HEADER, metrics_row
    from mc2sim.results import write_results
    from mc2sim.study.measure import measure_study
    from mc2sim.study.simulate import manifest_of

    comm = init("mpi")
    lead = comm.rank == 0
    try:  # every rank reads the same file: an error is the same everywhere
        scenario = _load_scenario(args.scenario, args.set)
        scenario.world_size(comm.size)
    except (AclnnError, OSError) as exc:
        if lead:
            print(f"mc2sim run: {exc}", file=sys.stderr)
        return 2
    stamp = comm.allgather_object(time.strftime("%Y%m%d-%H%M%S"))[0]
    out = Path(args.out or f"results/{scenario.name}-{stamp}")

    rounds = scenario.repetitions + 1
    with _progress_bar(rounds, scenario.name, "round", show=lead) as bar:
        result = measure_study(scenario, comm, progress=_ticker(bar))
    if lead:
        manifest = manifest_of(
            scenario, topology="measured", world=comm.size, source="measured",
            hosts=result.hosts, scenario_path=_scenario_file(args.scenario), argv=args.argv,
            overrides=args.set,
        )  # fmt: skip
        write_results(
            out, timeline=result.timeline, baseline=result.baseline, manifest=manifest,
            verdicts=result.verdicts,
        )  # fmt: skip
        base = result.timeline.for_run(result.baseline)
        print(f"# {scenario.name}: {scenario.op}, {comm.size} ranks (measured)")
        print(METRICS_HEADER + "  golden")
        for tiling, run in result.runs.items():
            m = result.timeline.for_run(run).metrics(baseline=base)
            ok = all(v.passed for v in result.verdicts[tiling])
            print(f"{metrics_row(tiling, m)}  {'pass' if ok else 'FAIL'}")
        if args.plots:
            _write_plots([out], out)
        print(f"results: {out}")
        for verdicts_of_tiling in result.verdicts.values():
            for verdict in verdicts_of_tiling:
                if not verdict.passed:
                    print(f"golden check failed: {verdict.summary()}", file=sys.stderr)
    return 0 if result.passed else 1


def _sweep_points(axes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The grid of ``--set`` lists: ``key=v1,v2`` axes expand, the rest are fixed overrides.

    ``tilings`` is a list value of its own, never an axis. Returns ``(label, overrides)`` per
    point; the label names the point's axis values (``base`` with no axis).
    """
    import itertools

    fixed: list[str] = []
    grid: list[list[str]] = []
    for item in axes:
        key, _, values = item.partition("=")
        if "," in values and key.strip() != "tilings":
            grid.append([f"{key.strip()}={v.strip()}" for v in values.split(",")])
        else:
            fixed.append(item)
    points = list(itertools.product(*grid)) if grid else [()]
    return [(",".join(point) or "base", fixed + list(point)) for point in points]


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Simulate (or, with --real under mpiexec, run) a scenario at every point of a grid."""
    from pathlib import Path

    from tqdm import tqdm

    from mc2sim.errors import AclnnError
    from mc2sim.study.simulate import load_topology, simulate_study, write_results

    points = _sweep_points(args.set)
    out = Path(
        args.out or f"results/{Path(args.scenario).stem}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    try:
        scenarios = [_load_scenario(args.scenario, point) for _, point in points]
        topologies = [load_topology(args.topology or sc.topology) for sc in scenarios]
    except (AclnnError, OSError) as exc:
        print(f"mc2sim sweep: {exc}", file=sys.stderr)
        return 2
    if args.real:
        from mc2sim.comm import init

        comm = init("mpi")
        lead = comm.rank == 0
        status = 0
        for label, point in points:
            sub = ["run", args.scenario, "--out", str(out / label.replace("/", "_"))]
            sub += [] if args.plots else ["--no-plots"]
            for item in point:
                sub += ["--set", item]
            if lead:
                print(f"# point {label}", flush=True)
            status = max(status, main(sub))
        if lead and args.plots:
            _write_plots([out / label.replace("/", "_") for label, _ in points], out)
        return status
    print(f"{'point':<34}{'tiling':<26}{'total ms':>10}{'overlap%':>9}{'speedup':>9}")
    folders: list[Path] = []
    for (label, _), scenario, topology in tqdm(
        list(zip(points, scenarios, topologies, strict=True)), desc="sweep", file=sys.stderr
    ):
        result = simulate_study(scenario, topology, args.ranks)
        folders.append(out / label.replace("/", "_"))
        write_results(result, folders[-1])
        for tiling, m in result.metrics().items():
            speedup = f"{m.speedup:.2f}" if m.speedup is not None else "-"
            print(
                f"{label:<34}{tiling:<26}{m.total_s * 1e3:>10.3f}{m.overlap_pct:>9.1f}{speedup:>9}"
            )
    if args.plots:
        _write_plots(folders, out)
    print(f"results: {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Tables and plots of one or more results folders (a run and its simulation compare)."""
    from pathlib import Path

    from mc2sim.errors import AclnnError
    from mc2sim.report import report

    try:
        result = report([Path(d) for d in args.results], Path(args.out) if args.out else None)
    except AclnnError as exc:
        print(f"mc2sim report: {exc}", file=sys.stderr)
        return 2
    print(result.tables)
    for path in result.plots:
        print(f"plot: {path}")
    return 0


def _cmd_check_counts(args: argparse.Namespace) -> int:
    """Check the cross-rank counts invariant on a dump of every rank's counts (no MPI)."""
    import json
    from pathlib import Path

    import numpy as np

    from mc2sim.invariants import counts_mismatch

    path = Path(args.file)
    try:
        data = json.loads(path.read_text())
        e = int(data["experts_per_rank"])
        send = np.asarray(data["send_counts"], dtype=np.int64)
        recv = np.asarray(data["recv_counts"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(
            f"mc2sim check-counts: {path}: {exc!r}; expected JSON with keys "
            "experts_per_rank, send_counts (a list per rank), recv_counts (a list per rank)",
            file=sys.stderr,
        )
        return 2
    world = send.shape[0] if send.ndim == 2 else 0
    for key, counts in (("send_counts", send), ("recv_counts", recv)):
        if counts.ndim != 2 or counts.shape != (world, world * e) or world == 0:
            print(
                f"mc2sim check-counts: {path}: {key} has shape {counts.shape}; must be "
                f"(ranks, ranks * experts_per_rank) = ({world}, {world * e})",
                file=sys.stderr,
            )
            return 2
    first = counts_mismatch(send, recv, e)
    if first is None:
        print(f"{path}: consistent: {world} ranks, {e} experts per rank, {int(send.sum())} rows")
        return 0
    q, r, j = first
    print(
        f"{path}: recv_counts[{r * e + j}] on rank {q} = {int(recv[q, r * e + j])} but "
        f"send_counts[{q * e + j}] on rank {r} = {int(send[r, q * e + j])} "
        f"(receiver q={q}, sender r={r}, expert j={j})",
        file=sys.stderr,
    )
    return 1


def _cmd_exec(args: argparse.Namespace) -> int:
    """Run a Python script as ``__main__`` on every rank, aborting the job if it raises."""
    sys.argv = [args.script, *args.script_args]
    runpy.run_path(args.script, run_name="__main__")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mc2sim",
        description="Simulation harness for MC2 fused communication-computation operators.",
    )
    parser.add_argument("--version", action="version", version=_version_of("mc2sim"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="print versions, MPI library, world size, backend")
    info.add_argument(
        "--backend", choices=("mpi", "torch"), default="mpi", help="communicator (default mpi)"
    )
    info.set_defaults(func=_cmd_info)

    run = commands.add_parser(
        "run", help="run a scenario for real under mpiexec: tilings, golden check, timeline"
    )
    run.add_argument("scenario", help="scenario file, or the name of a shipped one")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )
    run.add_argument("--out", help="results folder (default results/<scenario>-<time>)")
    run.add_argument(
        "--no-plots", dest="plots", action="store_false", help="skip the PNG plots (faster)"
    )
    run.set_defaults(func=_cmd_run)

    sim = commands.add_parser(
        "simulate", help="simulate a scenario on a topology (no MPI); write a results folder"
    )
    sim.add_argument("scenario", help="scenario file, or the name of a shipped one")
    sim.add_argument("--topology", help="topology name or file (default: the scenario's)")
    sim.add_argument("--ranks", type=int, help="world size (default: the scenario's)")
    sim.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )
    sim.add_argument("--out", help="results folder (default results/<scenario>-<time>-sim)")
    sim.add_argument(
        "--measured", metavar="DIR", help="a `mc2sim run` results folder to compare with"
    )
    sim.add_argument(
        "--no-plots", dest="plots", action="store_false", help="skip the PNG plots (faster)"
    )
    sim.set_defaults(func=_cmd_simulate)

    sweep = commands.add_parser(
        "sweep", help="a grid of a scenario: --set key=v1,v2 axes; simulated, or --real"
    )
    sweep.add_argument("scenario", help="scenario file, or the name of a shipped one")
    sweep.add_argument(
        "--set", action="append", default=[], metavar="KEY=V1,V2", help="an axis or an override"
    )
    sweep.add_argument("--topology", help="topology name or file (default: the scenario's)")
    sweep.add_argument("--ranks", type=int, help="world size to simulate (default: the scenario's)")
    sweep.add_argument("--real", action="store_true", help="run each point for real (mpiexec)")
    sweep.add_argument("--out", help="results folder (default results/<scenario>-sweep-<time>)")
    sweep.add_argument(
        "--no-plots", dest="plots", action="store_false", help="skip the PNG plots (faster)"
    )
    sweep.set_defaults(func=_cmd_sweep)

    rep = commands.add_parser(
        "report", help="tables and PNG plots of results folders (run, simulate, sweep points)"
    )
    rep.add_argument("results", nargs="+", help="results folders")
    rep.add_argument("--out", help="folder for the plots (default: the first results folder)")
    rep.set_defaults(func=_cmd_report)

    counts = commands.add_parser(
        "check-counts", help="check the MoE counts invariant on a JSON dump of every rank's counts"
    )
    counts.add_argument("file", help="JSON: experts_per_rank, send_counts, recv_counts")
    counts.set_defaults(func=_cmd_check_counts)

    cal = commands.add_parser(
        "calibrate", help="fit this machine's topology on the ranks at hand (under mpiexec)"
    )
    cal.add_argument("--out", default="topologies/this_machine.yaml", help="topology file to write")
    cal.add_argument(
        "--reps", type=_rounds, default=15, help="interleaved rounds of every call (>= 1)"
    )
    cal.add_argument("--name", default="this_machine", help="the topology's name")
    cal.set_defaults(func=_cmd_calibrate)

    val = commands.add_parser(
        "validate-model",
        help="run a sweep for real and simulated; print per-case and geomean error",
    )
    val.add_argument(
        "--topology", default="topologies/this_machine.yaml", help="topology file (calibrated)"
    )
    val.add_argument(
        "--calibrate",
        action="store_true",
        help="fit the topology in this job instead, in the same rounds as the sweep",
    )
    val.add_argument("--out", help="with --calibrate: also write the fitted topology here")
    val.add_argument(
        "--name", help="with --calibrate: the fitted topology's name (default this_machine)"
    )
    val.add_argument(
        "--reps", type=_rounds, default=15, help="interleaved rounds of every case (>= 1)"
    )
    val.set_defaults(func=_cmd_validate_model)

    run_script = commands.add_parser(
        "exec",
        help="run a Python script on every rank; an exception on any rank aborts the job",
    )
    run_script.add_argument("script", help="path of the script")
    run_script.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    run_script.set_defaults(func=_cmd_exec)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        The exit status.

    """
    args = _parser().parse_args(argv)
    args.argv = ["mc2sim", *(sys.argv[1:] if argv is None else argv)]  # for the manifest
    steady_allocator()  # repeated calls reuse their memory: timings do not depend on order
    with abort_on_exception():
        status: int = args.func(args)
    return status
