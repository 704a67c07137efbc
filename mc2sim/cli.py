"""The ``mc2sim`` command line (also ``python -m mc2sim``).

One error path: a user's mistake (a file that cannot be read, bad YAML or JSON, a value that
breaks a rule, an output path that cannot be written, a world size the scenario does not
allow) is found before any work, in a command's ``with _checking(...)`` block, and
:func:`main` reports it as one line on stderr, ``mc2sim <command>: <parameter>=<value>:
<rule>``, from rank 0 alone, with exit status 2. Under MPI the ranks agree on the outcome of
their checks (:func:`mc2sim.comm.agree`) before going on, so all of them return 2 together
and none is left waiting in a collective. Usage errors of the arguments themselves are one
line from rank 0 too (exit status 2). What fails after the checks is a failure of the work,
not of the input: a traceback, and on several ranks the job is aborted
(:func:`mc2sim.runtime.abort_on_exception`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import runpy
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mc2sim.errors import AclnnError, ParamInvalidError
from mc2sim.runtime import abort_on_exception, steady_allocator, world_position

if TYPE_CHECKING:
    from concurrent.futures import Future

    import torch
    from _typeshed import SupportsWrite

    from mc2sim.comm import Communicator, ObjectCommunicator
    from mc2sim.scenario import Scenario
    from mc2sim.study.calibrate import Calibration
    from mc2sim.timeline import Timeline
    from mc2sim.topology import Topology

__all__ = ["TIMEOUT_ENV", "InputError", "main"]

TIMEOUT_ENV = "MC2SIM_TIMEOUT"
"""The environment variable ``--timeout`` sets: the seconds a collective may wait before the
communicator's watchdog ends the job with exit status 3 (read when the communicator is
initialised; default 300)."""


class InputError(Exception):
    """A user's input broke a rule, found before any work: one line, exit status 2.

    Args:
        error: the rule broken (every rank holds the same one under MPI).

    """

    def __init__(self, error: AclnnError) -> None:
        super().__init__(str(error))
        self.error = error


def _as_param_error(exc: BaseException) -> AclnnError:
    """An input error that is not yet an ``AclnnError`` (OSError, UnicodeError, YAML), as one."""
    if isinstance(exc, AclnnError):
        return exc
    if isinstance(exc, OSError):
        name = exc.filename if exc.filename is not None else "path"
        return ParamInvalidError(str(name), str(name), f"cannot be used: {exc.strerror or exc}")
    if isinstance(exc, UnicodeDecodeError):
        return ParamInvalidError("input", f"byte {exc.start}", "is not UTF-8 text")
    return ParamInvalidError("input", type(exc).__name__, f"is not valid: {exc}")


@contextlib.contextmanager
def _checking(comm: ObjectCommunicator | None = None) -> Iterator[None]:
    """Run checks of the user's input; a rule broken in the body becomes an :class:`InputError`.

    ``AclnnError`` (the project's errors: every reader names file, key and rule), and an
    ``OSError``, ``UnicodeError`` or YAML error a reader let through, count as input errors;
    anything else is a bug and propagates. With ``comm``, every rank must enter the block:
    the ranks agree on the lowest failing rank's error, so all raise it or none does. The
    body must not call collectives then (one rank failing early would skip them).
    """
    import yaml

    error: AclnnError | None = None
    try:
        yield
    except (AclnnError, OSError, UnicodeError, yaml.YAMLError) as exc:
        error = _as_param_error(exc)
    if comm is not None and comm.size > 1:
        from mc2sim.comm import agree

        try:
            agree(comm, error)
        except AclnnError as exc:
            error = exc
    if error is not None:
        raise InputError(error) from None


def _lead() -> bool:
    """Whether this process is rank 0 (or alone), without initialising anything."""
    return world_position()[0] == 0


class _Parser(argparse.ArgumentParser):
    """argparse whose messages come from rank 0 alone and whose errors are one line."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if _lead():
            super()._print_message(message, file)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """Parse; an unknown argument is reported by the command it was given to.

        argparse hands a subcommand's unknown arguments up to the top-level parser, whose
        line would name ``mc2sim`` alone; this names ``mc2sim COMMAND`` and its help.
        """
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(parsed, "command", None)
            owner = self.commands.get(command, self) if isinstance(command, str) else self
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    commands: Mapping[str, argparse.ArgumentParser] = {}
    """The subcommands' parsers by name (set by :func:`_parser`)."""


def _version_of(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the MPI library, the launcher and every rank's host."""
    from mc2sim.comm import describe_device, detect_launcher, init, rank_device, transport

    comm = init(args.backend)
    with _checking(comm):
        device = rank_device(args.device)
    where = f"{describe_device(device)} via {transport(comm, device)}"
    rows = comm.allgather_object((comm.rank, socket.gethostname(), os.getpid(), where))
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
    for rank, host, pid, where in rows:
        print(f"  rank {rank:>4}  host {host}  pid {pid}  device {where}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit this machine's topology on the ranks at hand; rank 0 writes it."""
    from mc2sim.comm import init
    from mc2sim.study.calibrate import calibrate

    with _checking():  # the arguments alone, the same on every rank: before MPI starts
        _check_name(args.name)
    comm = init("mpi")
    with _checking(comm):
        if comm.rank == 0:
            _check_topology_out(args.out, args.overwrite)

    def fit() -> Calibration:
        with _progress_bar(args.reps + 1, "calibrate", "round", show=comm.rank == 0) as bar:
            return calibrate(comm, reps=args.reps, name=args.name, progress=_ticker(bar))

    fitted = _steadiest_fit(comm, args.fits, fit)
    if comm.rank == 0:
        _report_fit(fitted, args.out)
    return 0


def _report_fit(fitted: Calibration, out: str) -> None:
    """Write a fit to ``out`` and print its figures, the independent ones, speeds and pace."""
    _write_topology(fitted.topology, out)
    _print_independent(fitted.topology, fitted.independent)
    _print_speeds(fitted.speeds)
    _print_pace(fitted.probe_before, fitted.topology.device.probe_tflops)


def _steadiest_fit(comm: Communicator, fits: int, fit: Callable[[], Calibration]) -> Calibration:
    """``fit()`` again while the speed probe moves over :data:`SPEED_NOTE` during a fit's rounds.

    Up to ``fits`` fits; the steadiest (the least ``|ln(after / before)|``, the first of
    equals) is kept. The probes are rank 0's, gathered: every rank reads the same and goes
    on alike, so no rank fits again alone.
    """
    made: list[tuple[float, Calibration]] = []  # (drift, fit) of each fit
    for number in range(1, fits + 1):
        fitted = fit()
        before, after = fitted.probe_before, fitted.topology.device.probe_tflops
        made.append((_drift(before, after), fitted))
        moved = _pace_moved(before, after)
        if number == fits or moved is None:
            break
        if comm.rank == 0:
            print(
                f"the machine's pace changed during fit {number}: {moved}; fitting again "
                f"({number + 1} of at most {fits}, the steadiest kept)"
            )
    return min(made, key=lambda pair: pair[0])[1]


def _drift(before: float, after: float) -> float:
    """How far a fit's speed probe moved over its rounds: ``|ln(after / before)|``, 0 unmeasured."""
    return abs(math.log(after / before)) if before > 0 and after > 0 else 0.0


def _pace_moved(before: float, after: float) -> str | None:
    """What the speed probe read over a fit's rounds, where it moved over :data:`SPEED_NOTE`."""
    if before > 0 and after > 0 and not _near(after / before):
        return (
            f"its speed probe read {before:.3g} TFLOP/s before the rounds and {after:.3g} "
            f"after (x{after / before:.2f})"
        )
    return None


def _print_pace(before: float, after: float) -> None:
    """Say so where the machine's speed probe moved over :data:`SPEED_NOTE` during a fit."""
    moved = _pace_moved(before, after)
    if moved is not None:
        print(
            f"the machine's pace changed during the fit: {moved}; the fit holds a mix of the "
            "two: refit in a steadier period"
        )


def _print_speeds(speeds: Sequence[float]) -> None:
    """Each rank's compute time over the slowest's, as this job measured them."""
    if not speeds:
        return
    shown = " ".join(f"{f:.2f}" for f in speeds)
    print(f"ranks' compute time over the slowest rank's (this job's placement): {shown}")
    if min(speeds) < 1.0:
        print(
            "  the topology's figures are the slowest rank's; to simulate this job's ranks, "
            "--set stragglers.RANK.compute=FACTOR"
        )


def _print_independent(topology: Topology, independent: Any) -> None:
    """The fitted figures beside the same figures measured apart from the fit.

    Each row is the model's figure for what the independent measurement times: a 1024^3
    float32 matmul task on a whole core (the roofline, its efficiency and memory terms),
    the rate the kernels move bytes at (against a bfloat16 to float32 conversion, the
    kernels' memory pass, and a memcpy, each as the bytes it reads and writes), a 4-byte
    exchange of two ranks (latency plus issue overhead: with the other ranks asleep, each rank
    on a core of its own; with every pair exchanging at once, the model's time for a
    collective at the job's core share: its post as the simulator charges it, a message's
    latency with what sharing adds, and the wait for peers off their cores, none where ranks
    take turns, whose waits the simulation itself holds: :func:`mc2sim.model.cost.issue_times`,
    :func:`mc2sim.model.cost.core_time`, :func:`mc2sim.model.cost.message_latency`,
    :func:`mc2sim.model.cost.schedule_wait`), and
    where posting a reduction copies it to float32, that copy's rate (against the
    conversion, as 16-bit bytes read, on one rank alone and on every rank at once: the rate
    is measured with every rank posting).
    """
    from dataclasses import replace

    import numpy as np

    from mc2sim.model.cost import (
        core_time,
        issue_times,
        message_latency,
        roofline_time,
        schedule_wait,
    )
    from mc2sim.schedule.plan import TaskKind

    device = topology.device
    inner = topology.network[0]
    flops = 2.0 * 1024**3
    matmul = flops / roofline_time(device, TaskKind.MATMUL, "float32", flops, 3 * 1024**2 * 4)
    message = inner.latency_us + device.issue_us  # on cores of their own
    # the bare post (a float32 AllReduce converts nothing) at the job's share, as the
    # simulator charges it (on a whole core where ranks take turns: cost.core_time)
    bare = replace(device, issue_extra_us={}, issue_gbps=0.0)
    posted = issue_times(replace(topology, device=bare), TaskKind.ALLREDUCE, np.array([4.0]))
    waited = message_latency(topology, inner) + schedule_wait(topology)
    shared = (waited + core_time(topology, float(posted[0]))) * 1e6
    rows = [
        ("float32 matmul 1024^3, TFLOP/s", matmul / 1e12, independent.matmul_tflops),
        # both as bytes moved: a conversion reads 2 bytes and writes 4 per element, and the
        # fitted rate is the kernels' bytes moved (Device.memory_traffic per counted byte)
        (
            "memory GB/s vs bf16->f32 (read + write)",
            device.memory_gbps,
            3 * independent.upcast_gbps,
        ),
        ("memory GB/s vs memcpy (read + write)", device.memory_gbps, independent.memcpy_gbps),
        ("4-byte exchange us, the others asleep", message, independent.pingpong_us),
        ("4-byte exchange us, every pair at once", shared, independent.pingpong_loaded_us),
    ]
    if device.issue_gbps > 0:  # posting a reduction converts its buffer: the same pass
        rows += [
            (
                "posting's float32 copy GB/s vs bf16->f32",
                device.issue_gbps,
                independent.upcast_gbps,
            ),
            # every rank posts at once where the copy's rate is measured: memory shared
            (
                "posting's copy GB/s vs bf16->f32, all ranks",
                device.issue_gbps,
                independent.upcast_loaded_gbps,
            ),
        ]
    print(
        f"fitted against independent ({device.cores_per_node:g} cores per node, each rank at "
        f"{topology.core_share:.2g} of one; compute and memory on one rank, the others asleep):"
    )
    print(f"  {'':<44}{'fitted':>10}{'measured':>10}   ratio")
    for label, fit, measured in rows:
        if measured > 0:
            print(f"  {label:<44}{fit:>10.4g}{measured:>10.4g}   x{fit / measured:.2f}")
        else:  # a single rank has no peer to exchange with
            print(f"  {label:<44}{fit:>10.4g}{'-':>10}   -")


def _check_name(name: str) -> None:
    """``--name``: a fitted topology's name, not empty."""
    if not name.strip():
        raise ParamInvalidError("--name", name, "must be a non-empty name for the topology")


def _only_with_calibrate(calibrate: bool, *given: tuple[str, object]) -> None:
    """Refuse a ``(flag, value)`` given (not None) where ``--calibrate`` is not."""
    for flag, value in given:
        if value is not None and not calibrate:
            raise ParamInvalidError(flag, value, "is for the fitted topology: it needs --calibrate")


def _check_topology_out(out: str, overwrite: bool, flag: str = "--out") -> None:
    """``flag`` naming a fitted topology's file: a new file, or an old one with ``--overwrite``."""
    from mc2sim._paths import check_new_file

    check_new_file(Path(out), flag, overwrite=overwrite, hint="--overwrite")


def _write_topology(topology: Topology, out: str) -> None:
    """Write a fitted topology (creating its folder) and print its figures."""
    from mc2sim.topology import dump

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    dump(topology, out)
    print(f"wrote {out}")
    _print_fit(topology)


def _print_fit(topology: Topology) -> None:
    """Print a fitted topology's figures, one line a part."""
    from mc2sim.topology import CoreSharing

    device, slow = topology.device, topology.contention
    peaks = ", ".join(f"{k} {v:.3g}" for k, v in sorted(device.matrix_tflops.items()))
    eff = device.efficiency
    print(f"compute: peak TFLOP/s {peaks}; launch {device.launch_us:.1f} us")
    print(
        f"efficiency: small tasks {eff.small_util}, large {eff.large_util}, "
        f"half-way at {eff.half_flops:.3g} FLOP"
    )
    print(f"memory {device.memory_gbps:.1f} GB/s, vector {device.vector_tflops:.3g} TFLOP/s")
    if device.issue_us or device.issue_extra_us:
        extra = "".join(f", {k} +{v:.1f}" for k, v in device.issue_extra_us.items())
        print(f"posting a collective: {device.issue_us:.1f} us{extra}")
    if device.warm_us:
        saved = ", ".join(f"{k} {v:.0f}" for k, v in device.warm_us.items())
        print(f"a call's task after its first saves (us), by kind: {saved}")
    for dim in topology.network:  # innermost first: on several hosts, then across them
        print(
            f"network: {dim.kind} x{dim.ranks}, {dim.bandwidth_gbps:.2f} GB/s, {dim.duplex} duplex"
        )
        print(f"latency {dim.latency_us:.1f} us")
    polled = "polled (a transfer waits while its ranks compute)"
    comm = polled if slow.polled else f"x{slow.comm_slowdown}"
    print(f"contention: compute x{slow.compute_slowdown}, comm {comm}")
    together = "together" if device.concurrent_collectives else "one at a time"
    if device.concurrent_collectives and device.one_at_a_time:
        together += f", but {', '.join(device.one_at_a_time)} one at a time"
    print(f"collectives in flight progress {together}")
    if topology.core_share < 1.0:
        if device.core_sharing is CoreSharing.TURNS:
            print(f"ranks share cores in turns of up to {device.slice_us:.0f} us")
        else:
            weight = (
                f" (a waiting rank takes {device.waiting_weight:.2f} of a busy one's)"
                if device.waiting_weight < 1.0
                else ""
            )
            print(
                f"ranks share cores, each at its share{weight}; a collective waits "
                f"{device.slice_us:.0f} us x {1 - topology.core_share:.2f} for peers off theirs"
            )
        if device.shared_issue_us or device.shared_latency_us:
            print(
                f"sharing a core adds {device.shared_issue_us:.1f} us of CPU time to a post "
                f"and {device.shared_latency_us:.1f} us to every message's latency"
            )
    if device.rank_spread != 1.0:
        print(
            f"a round's slowest rank computes x{device.rank_spread:.3f} the slowest rank's own "
            "(a rank alone at the top of a task's load at its own pace)"
        )
    if device.lone_memory_speedup != 1.0:
        print(
            f"a pack or reduction alone on its node runs x{device.lone_memory_speedup:.2f} its "
            "speed beside every rank (the node's memory shared: one rank's bf16->f32 "
            "conversion over every rank's at once)"
        )


def _ticker(bar: Any) -> Callable[[int, int, str], None]:
    """A progress callback that advances ``bar`` and shows the label."""

    def show(i: int, n: int, label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update()

    return show


def _cmd_validate_model(args: argparse.Namespace) -> int:
    """Run the validation sweep for real and simulated; rank 0 prints the errors."""
    from mc2sim.comm import init
    from mc2sim.model.accuracy import geomean_of
    from mc2sim.study.calibrate import calibrate, fitted_cases
    from mc2sim.study.measure import measure_rounds, probe_tflops
    from mc2sim.study.validate import geomean_error, held_out_cases, runnable, score_cases

    with _checking():  # the arguments alone, the same on every rank: before MPI starts
        _only_with_calibrate(
            args.calibrate, ("--out", args.out), ("--name", args.name), ("--fits", args.fits)
        )
        if args.at_run_speed and args.calibrate:
            raise ParamInvalidError(
                "--at-run-speed", True, "is for a stored fit (--topology): --calibrate fits now"
            )
        if args.topology is not None and args.calibrate:
            raise ParamInvalidError(
                "--topology", args.topology, "is a stored fit to check: --calibrate fits now"
            )
        if args.name is not None:  # an empty one too: the default is this_machine
            _check_name(args.name)
        scenarios, held = _held_out(args.cases)
    comm = init("mpi")
    speed: float | None = None  # a stored fit run at this job's speed: the probes' ratio
    with _checking(comm):
        if args.calibrate and comm.rank == 0 and args.out is not None:
            _check_topology_out(args.out, args.overwrite)
        if not args.calibrate:
            given, fitted_on, named = _topology_file(args.topology, comm.size)
            if args.at_run_speed:
                _check_probed(given, named)
        # the shipped set runs what fits the world size; the files a user names all must
        kept, skipped = runnable(scenarios, comm.size, strict=args.cases is not None)
    cases = held_out_cases(comm, kept)

    def fit() -> Calibration:
        with _progress_bar(args.reps + 1, "validate-model", "round", show=comm.rank == 0) as bar:
            return calibrate(
                comm,
                reps=args.reps,
                name=args.name or "this_machine",
                alongside=[c.run for c in cases],
                progress=_ticker(bar),
            )

    if args.calibrate:
        fitted = _steadiest_fit(comm, args.fits or 1, fit)
        topology, source = fitted.topology, "calibrated in the same rounds"
        # this job's ranks at their measured speeds (the topology's are the slowest's)
        faster = fitted.stragglers()
        spans = [[t.metrics().total_s for t in mine] for mine in fitted.alongside]
        results = score_cases(cases, spans, topology, faster)
        inside = score_cases(fitted.fitted_cases, fitted.fitted_spans, topology, faster)
    else:
        with _progress_bar(args.reps + 1, "validate-model", "round", show=comm.rank == 0) as bar:
            topology, source = given, named
            if fitted_on != comm.size:  # its core share and fits are of another job
                source += f" (fitted on {fitted_on} ranks, resized to {comm.size})"
            own = fitted_cases(comm)
            runs = [c.run for c in cases + own]
            rounds = measure_rounds(comm, runs, reps=args.reps, progress=_ticker(bar))
            spans = [[t.metrics().total_s for t in mine] for mine in rounds]
            speed = _run_speed(topology, probe_tflops(comm))
            if speed is not None:  # the fit at this job's speed too (its probe against the fit's)
                other = topology.at_speed(speed)
                if args.at_run_speed:  # the job's speed is the one scored; the fit's beside it
                    topology, other = other, topology
                    source += f" at this job's speed (x{1 / speed:.2f} the fit's times)"
                beside = score_cases(cases, spans[: len(cases)], other)
            results = score_cases(cases, spans[: len(cases)], topology)
            inside = score_cases(own, spans[len(cases) :], topology)
    if comm.rank == 0:
        if args.calibrate and args.out:
            _write_topology(topology, args.out)
        elif args.calibrate:
            _print_fit(topology)
        if args.calibrate:
            _print_independent(topology, fitted.independent)
            _print_speeds(fitted.speeds)
            _print_pace(fitted.probe_before, topology.device.probe_tflops)
        print(
            f"# validate-model: {comm.size} ranks, {source}, lower quartile of {args.reps} rounds"
        )
        split = (
            f"held out: {held} (never fitted on); "
            "in sample: the calls calibrate fits on (scenarios/calibration/)"
        )
        print(f"# split: {split}")
        for line in skipped:
            print(f"# not run on {comm.size} ranks: {line}")
        for title, rows in (("held out", results), ("in sample", inside)):
            print(f"{title + ': case':<76}{'measured ms':>12}{'simulated ms':>13}{'error':>8}")
            for r in rows:
                measured, simulated = r.measured_s * 1e3, r.simulated_s * 1e3
                print(f"{r.name:<76}{measured:>12.2f}{simulated:>13.2f}{r.error:>8.1%}")
        worst = max(results, key=lambda r: r.error)
        print(
            f"held-out geomean error over {len(results)} cases: {geomean_error(results):.1%} "
            f"(worst {worst.error:.1%}: {worst.name})"
        )
        print(f"in-sample geomean error over {len(inside)} cases: {geomean_error(inside):.1%}")
        medians = geomean_of(r.median_error for r in results)
        print(f"held-out geomean error against the rounds' medians: {medians:.1%}")
        if speed is not None:
            print(_speed_line(speed, given.device.probe_tflops, args.at_run_speed, "job"))
            where = "fit's own speed" if args.at_run_speed else "job's speed (--at-run-speed)"
            print(f"held-out geomean error at the {where}: {geomean_error(beside):.1%}")
    return 0


def _held_out(cases: Sequence[str] | None) -> tuple[list[tuple[Path, Scenario]], str]:
    """``validate-model --cases``: the held-out scenarios (each with its file), and where from.

    None: the shipped ``scenarios/validation/``.
    """
    from mc2sim.study.validate import held_out, scenario_files, validation_dir, validation_files

    if cases is not None:
        return held_out(scenario_files(cases)), " ".join(cases)
    files = validation_files()
    if not files:
        raise ParamInvalidError(
            "--cases",
            str(validation_dir()),
            "the default set has no scenario files here: name some",
        )
    return held_out(files), "scenarios/validation/"


def _topology_file(path: str | None, world: int) -> tuple[Topology, int, str]:
    """``validate-model --topology``: a fit resized to ``world`` ranks, its own ranks, its name.

    A topology file, or a shipped one by name; None: the shipped fit of this machine made on
    ``world`` ranks where there is one (``this_machine_4ranks`` for 4), else ``this_machine``.
    """
    from mc2sim.topology import builtin, list_builtin, load

    if path is None:
        shipped = [n for n in list_builtin() if n.startswith(DEFAULT_FIT)]
        mine = [n for n in shipped if builtin(n).world_size == world]
        path = mine[0] if mine else DEFAULT_FIT
    if path in list_builtin() and not Path(path).exists():
        topology = builtin(path)
    elif not Path(path).is_file():
        rule = "is not a file"
        if not Path(path).exists():
            rule = (
                "no such file or shipped topology: fit one first (mc2sim calibrate), "
                "or pass --calibrate"
            )
        raise ParamInvalidError("--topology", path, rule)
    else:
        topology = load(path)
    return topology.with_world(world), topology.world_size, path


DEFAULT_FIT = "this_machine"
"""The shipped fits of the machine this project is developed on: ``this_machine`` (2 ranks),
``this_machine_4ranks``; ``validate-model`` takes the one made on as many ranks as the job's."""


MAX_ROUNDS = 1000
"""The most rounds ``--reps`` takes: a round of ``calibrate`` or ``validate-model`` runs every
call once (seconds), so this many is already hours."""


def _whole(text: str, high: int, what: str) -> int:
    """A whole number in [1, high] of ``what`` (argparse reports the rule)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number >= 1") from None
    if not 1 <= value <= high:
        raise argparse.ArgumentTypeError(f"{value}: must be in [1, {high}] ({what})")
    return value


def _rounds(text: str) -> int:
    """``--reps``: a whole number of rounds in [1, MAX_ROUNDS]."""
    return _whole(text, MAX_ROUNDS, "rounds measured")


CALIBRATE_ROUNDS = 15
"""The rounds a fit measures unless ``--reps`` says otherwise (calibrate, run --calibrate)."""

MAX_FITS = 10
"""The most fits ``--fits`` makes (calibrate, validate-model --calibrate; each takes a minute
or more)."""


def _fits(text: str) -> int:
    """``--fits`` (calibrate, validate-model): a whole number of fits in [1, MAX_FITS]."""
    return _whole(text, MAX_FITS, "fits made")


def _seconds(text: str) -> float:
    """``--timeout``: seconds, a finite number > 0 (argparse reports the rule)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of seconds > 0")
    return value


def _progress_bar(total: int, desc: str, unit: str, *, show: bool) -> Any:
    """A tqdm bar on stderr, drawn only where ``show`` (rank 0); a no-op bar elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not show)


def _load_scenario(name: str, overrides: Sequence[str], what_if: bool = False) -> Scenario:
    """A shipped scenario by name, or a scenario file, with ``--set`` overrides.

    ``what_if`` (``--what-if``) sets ``limits=what-if``: hardware limits lifted.
    """
    from mc2sim.scenario import builtin, list_builtin, load

    overrides = _with_profile(overrides, what_if)
    if not name.strip():
        raise ParamInvalidError("scenario", name, "must name a scenario file or a shipped scenario")
    if name in list_builtin() and not Path(name).exists():
        return builtin(name, overrides)
    if not Path(name).exists():
        raise ParamInvalidError(
            "scenario",
            name,
            "is neither a scenario file nor a shipped scenario (" + ", ".join(list_builtin()) + ")",
        )
    return load(name, overrides)


def _scenario_file(name: str) -> Path:
    """The file :func:`_load_scenario` reads for ``name`` (recorded in the manifest)."""
    from mc2sim.scenario import list_builtin, scenarios_dir

    if name in list_builtin() and not Path(name).exists():
        return scenarios_dir() / f"{name}.yaml"
    return Path(name)


def _sized_topology(
    scenario: Scenario, given: str | None, world: int, world_param: str
) -> Topology:
    """The topology to simulate on (``--topology``, else the scenario's), at ``world`` ranks."""
    from mc2sim.topology import list_builtin, resolve

    name = given if given is not None else scenario.topology
    unknown = given is not None and given not in list_builtin() and not Path(given).exists()
    if given is not None and (unknown or not given.strip()):
        raise ParamInvalidError(
            "--topology",
            given,
            "is neither a topology file nor a shipped topology (" + ", ".join(list_builtin()) + ")",
        )
    topology = resolve(name)
    if topology.world_size == world:
        return topology
    try:
        return topology.with_world(world)
    except ParamInvalidError as err:
        raise ParamInvalidError(world_param, err.value, err.rule) from None


def _with_profile(overrides: Sequence[str], what_if: bool) -> list[str]:
    """The overrides a study ran with, ``limits=what-if`` added by ``--what-if`` (manifest)."""
    return [*overrides, "limits=what-if"] if what_if else list(overrides)


def _warn_lifted(lifted: Sequence[Any], command: str) -> None:
    """Print each hardware limit a what-if study lifts, once, as a warning line on stderr."""
    seen: set[str] = set()
    for item in lifted:
        if item.limit not in seen:
            seen.add(item.limit)
            print(f"mc2sim {command}: warning: {item.warning()}", file=sys.stderr)


def _out_or(out: str | None, default: str) -> Path:
    """``--out`` as given, else ``default``; an empty one (an unset shell variable) is refused."""
    if out is not None and not out.strip():
        raise ParamInvalidError(
            "--out", out, "must name a folder (leave --out out for the default)"
        )
    return Path(default if out is None else out)


def _check_out(out: Path, overwrite: bool) -> Path:
    """``--out`` of a results (or sweep) folder: a fresh one, or old results with --overwrite."""
    from mc2sim.results import check_folder

    try:
        return check_folder(out, overwrite=overwrite, param="--out", hint="--overwrite")
    except OSError as err:  # the path itself cannot be used (a name too long, a loop)
        raise ParamInvalidError(
            "--out", str(out), f"cannot be used: {err.strerror or err}"
        ) from None


def _check_plots(plots: bool) -> None:
    """The plots need matplotlib: find out before the work, not after it."""
    import importlib.util

    if plots and importlib.util.find_spec("matplotlib") is None:
        raise ParamInvalidError(
            "plots", "matplotlib", "is not installed: pip install matplotlib, or pass --no-plots"
        )


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _stamp_and_hosts(comm: ObjectCommunicator) -> tuple[str, list[str]]:
    """Rank 0's time stamp and every rank's host name (index = rank), in one gather."""
    rows = comm.allgather_object((_stamp(), socket.gethostname()))
    return rows[0][0], [host for _, host in rows]


def _cmd_simulate(args: argparse.Namespace) -> int:
    """Simulate a scenario under each of its tilings; write a results folder; print a table."""
    from mc2sim.model.accuracy import model_error
    from mc2sim.ops.moe_spec import EXPECTED_ROUTING_RANKS
    from mc2sim.report import METRICS_HEADER, metrics_row
    from mc2sim.results import clear_folder
    from mc2sim.study.simulate import PER_TASK_RECORDS, simulate_study, write_results

    with _checking():
        scenario = _load_scenario(args.scenario, args.set, args.what_if)
        world = scenario.world_size(args.ranks, "--ranks")
        world_param = "ranks" if args.ranks is None else "--ranks"
        lifted = scenario.lifted(args.ranks, "--ranks")
        topology = _sized_topology(scenario, args.topology, world, world_param)
        default = f"results/{scenario.name}-{_stamp()}-sim"
        out = _check_out(_out_or(args.out, default), args.overwrite)
        if args.measured and out.resolve() == Path(args.measured).resolve():
            raise ParamInvalidError("--out", str(out), "must be another folder than --measured")
        measured, probe = (
            _measured_totals(Path(args.measured), scenario, world) if args.measured else ({}, None)
        )
        if args.at_run_speed and not args.measured:
            raise ParamInvalidError(
                "--at-run-speed", True, "is for a comparison: it needs --measured"
            )
        speed = _run_speed(topology, probe)
        if args.at_run_speed and speed is None:
            _check_probed(topology, args.topology or scenario.topology)
            raise ParamInvalidError(
                "--at-run-speed", args.measured, "the run has no speed probe (an older run)"
            )
        _check_plots(args.plots)
    _warn_lifted(lifted, "simulate")
    run_on = topology.at_speed(speed) if speed is not None and args.at_run_speed else topology
    with _checking():  # the model is pure: what it refuses is in the input
        result = simulate_study(scenario, run_on, world)
    if args.overwrite:
        clear_folder(out)
    records = result.records
    per_task = args.per_task == "yes" or (args.per_task == "auto" and records <= PER_TASK_RECORDS)
    write_results(
        result, out, scenario_path=_scenario_file(args.scenario), argv=args.argv,
        overrides=_with_profile(args.set, args.what_if), per_task=per_task,
    )  # fmt: skip
    print(f"# {scenario.name}: {scenario.op}, {result.world} ranks on {result.topology.name}")
    if speed is not None and (args.at_run_speed or not _near(speed)):
        print(_speed_line(speed, topology.device.probe_tflops, args.at_run_speed, "run"))
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
    if result.expected_routing:
        print(
            f"routing: read from its law above {EXPECTED_ROUTING_RANKS:,} ranks (each rank's "
            "loads drawn from it, not every token's picks: docs/MODEL.md)"
        )
    if not per_task and args.per_task == "auto":
        print(
            f"per-task files left out: {records:,} task records (auto writes up to "
            f"{PER_TASK_RECORDS:,}); --per-task yes writes tasks.csv and trace.json"
        )
    print(f"results: {out}")
    return 0


def _write_plots(folders: Sequence[Path], out: Path) -> None:
    """Draw the PNG plots of results folders into ``out`` (see :func:`mc2sim.report.report`)."""
    from mc2sim.report import report

    written = report(folders, out).plots
    print(f"plots: {len(written)} PNG in {out}")


def _measured_totals(
    directory: Path, scenario: Scenario, world: int
) -> tuple[dict[str, float], float | None]:
    """``--measured``: a ``mc2sim run`` folder's measured seconds by tiling, and its probe.

    The folder must hold a measured run of the same call as the simulation: its op, shape,
    dtype and world size. The probe (``Manifest.probe_tflops``) is None where the run has none.
    """
    from mc2sim.results import read_results
    from mc2sim.timeline import Source

    try:
        folder = read_results(directory)
    except ParamInvalidError as err:
        raise ParamInvalidError("--measured", str(directory), err.rule) from None
    manifest = folder.manifest
    if manifest.source is not Source.MEASURED:
        raise ParamInvalidError(
            "--measured", str(directory), "must be a folder of `mc2sim run` (it holds a simulation)"
        )
    ran = (manifest.op, dict(manifest.shape), manifest.dtype, manifest.world_size)
    simulated = (scenario.op, dict(scenario.effective_shape()), scenario.dtype, world)
    for what, theirs, ours in zip(("op", "shape", "dtype", "ranks"), ran, simulated, strict=True):
        if str(theirs) != str(ours):
            raise ParamInvalidError(
                "--measured",
                str(directory),
                f"ran another call: {what} {theirs} there, {ours} here (the same op, shape, "
                "dtype and ranks are compared)",
            )
    return folder.totals(), manifest.probe_tflops


def _run_speed(topology: Topology, probe: float | None) -> float | None:
    """A run's speed over its fit's (both probes: ``Device.probe_tflops``); None without both."""
    fitted = topology.device.probe_tflops
    return probe / fitted if probe is not None and fitted > 0 else None


def _speed_line(speed: float, fitted: float, rescaled: bool, what: str) -> str:
    """The line that says at what pace the ``what`` ran against its fit (the probes' ratio).

    ``fitted``: the fit's probe (``Device.probe_tflops``); ``rescaled``: the fit ran at the
    ``what``'s speed.
    """
    now = fitted * speed
    read = (
        f"its probe (a float32 1024^3 matmul on a core) read {now:.3g} TFLOP/s, "
        f"the fit's {fitted:.3g}"
    )
    if rescaled:
        return f"# at the {what}'s speed: {read}: the fit's times x{1 / speed:.2f}"
    return (
        f"# the {what} ran at x{speed:.2f} the fit's pace: {read} "
        "(--at-run-speed runs the fit at it)"
    )


SPEED_NOTE = 0.15
"""How far a run's speed probe may read from its fit's (as a ratio) before ``simulate
--measured`` says so: the probe's spread between quiet hours here."""


def _near(speed: float) -> bool:
    """Whether a run's speed over its fit's is within :data:`SPEED_NOTE` of 1."""
    return 1.0 / (1.0 + SPEED_NOTE) <= speed <= 1.0 + SPEED_NOTE


def _check_probed(topology: Topology, named: str) -> None:
    """``--at-run-speed`` needs the fit's speed probe (``Device.probe_tflops``)."""
    if topology.device.probe_tflops <= 0:
        raise ParamInvalidError(
            "--at-run-speed",
            named,
            "the topology has no speed probe (device.probe_tflops: a fit by mc2sim calibrate)",
        )


def _cmd_run(args: argparse.Namespace) -> int:
    """Run a scenario for real under mpiexec: every tiling, golden check, timeline, results."""
    from dataclasses import replace

    from mc2sim.comm import init, rank_device
    from mc2sim.results import clear_folder
    from mc2sim.topology import resolve

    with _checking():  # the arguments alone, the same on every rank: before MPI starts
        _only_with_calibrate(
            args.calibrate is not None,
            ("--name", args.name), ("--fits", args.fits), ("--reps", args.reps),
        )  # fmt: skip
        if args.name is not None:
            _check_name(args.name)
    comm = init("mpi")
    lead = comm.rank == 0
    stamp, hosts = _stamp_and_hosts(comm)
    with _checking(comm):  # every rank reads the same file: an error is the same everywhere
        device = rank_device(args.device)
        scenario = _load_scenario(args.scenario, args.set)
        _require_strict(scenario, "run")
        scenario.world_size(comm.size)
        _check_fits(scenario, comm.size, hosts, comm.rank)
        resolve(scenario.topology)  # unused by the run, but its folder names it: a bad one fails
        out = _out_or(args.out, f"results/{scenario.name}-{stamp}")
        if args.calibrate is not None:
            if device.type != "cpu":
                raise ParamInvalidError(
                    "--calibrate", args.calibrate,
                    f"fits this machine's CPU ranks: the run must be on the CPU, not {device}",
                )  # fmt: skip
            # the tilings are timed in the fit's rounds, which the results then say
            scenario = replace(scenario, repetitions=args.reps or CALIBRATE_ROUNDS)
        if lead:  # rank 0 alone writes the folder
            _check_out(out, args.overwrite)
            _check_plots(args.plots)
            if args.calibrate is not None:
                _check_topology_out(args.calibrate, args.overwrite, "--calibrate")
    if lead and args.overwrite:
        clear_folder(out)
    fits: list[Calibration] = []
    code = _measure_into(
        comm, scenario, out, plots=args.plots, scenario_path=_scenario_file(args.scenario),
        argv=args.argv, overrides=args.set, device=device,
        timing=None if args.calibrate is None else _fit_timing(comm, args, scenario, fits),
    )  # fmt: skip
    if lead and fits:
        _report_fit(fits[0], args.calibrate)
    return code


def _fit_timing(
    comm: Communicator, args: argparse.Namespace, scenario: Scenario, fits: list[Calibration]
) -> Callable[[list[Callable[[], object]]], list[list[Timeline]]]:
    """``run --calibrate``'s timing: the calls in the rounds of a fit of this machine.

    The fit measures the scenario's ``repetitions`` rounds (``--reps``, set on it). The
    steadiest of ``--fits`` fits (:func:`_steadiest_fit`) is appended to ``fits``, and its
    rounds of the calls are the run's.
    """
    from mc2sim.study.calibrate import calibrate

    rounds = scenario.repetitions
    name = args.name or "this_machine"

    def timing(calls: list[Callable[[], object]]) -> list[list[Timeline]]:
        def fit() -> Calibration:
            with _progress_bar(rounds + 1, "run + calibrate", "round", show=comm.rank == 0) as bar:
                return calibrate(
                    comm, reps=rounds, name=name, alongside=calls, progress=_ticker(bar)
                )

        fitted = _steadiest_fit(comm, args.fits or 1, fit)
        fits.append(fitted)
        return fitted.alongside

    return timing


def _check_fits(scenario: Scenario, world: int, hosts: Sequence[str], rank: int) -> None:
    """Refuse a real run whose ranks on this host need more memory than it has free, kernels alone.

    A shape within every limit can need terabytes (``m = 2**31 - 1`` by ``k = n = 65535``):
    each rank's largest compute task of its serial plan (its bytes read and written, a lower
    bound on what its tensors hold at once) is summed over the ranks on this rank's host
    (``hosts``: every rank's host name, index = rank), which run their serial calls at once,
    and compared with the memory free now (:func:`mc2sim.runtime.available_memory`), before
    any tensor is made: ranks of one host whose kernels each fit its free memory, but not
    together, would start and run it out (2 ranks of 13.2 GiB kernels where 22.9 GiB are
    free). The ranks of other hosts check their own.
    """
    from mc2sim.runtime import available_memory
    from mc2sim.schedule.plan import Resource
    from mc2sim.study.simulate import plans_for

    free = available_memory()
    if free is None:
        return
    plans = plans_for(scenario, world, "serial")
    here = [r for r, host in enumerate(hosts) if host == hosts[rank]]
    kernels = {}  # each rank's largest compute task; a rank without one holds no kernel
    for r in here:
        computes = [t for t in plans[r].tasks if t.resource is Resource.COMPUTE]
        if computes:
            kernels[r] = max(computes, key=lambda t: t.bytes)
    total = sum(t.bytes for t in kernels.values())
    if total <= free:
        return
    top = max(kernels, key=lambda r: kernels[r].bytes)
    task = kernels[top]
    alone = f"rank {top}'s {task.name} alone moves {task.bytes / 2**30:.4g} GiB"
    need = (
        alone
        if len(here) == 1
        else f"its {len(here)} ranks on this host move {total / 2**30:.4g} GiB in their "
        f"largest kernels at once ({alone})"
    )
    raise ParamInvalidError(
        "shape",
        dict(scenario.effective_shape()),
        f"is too large to run here: {need}, and this host has {free / 2**30:.4g} GiB free",
    )


def _require_strict(scenario: Scenario, what: str) -> None:
    """Real runs call the operators, which keep every limit: refuse a what-if scenario."""
    from mc2sim.limits import LimitProfile

    if scenario.limits is not LimitProfile.STRICT:
        raise ParamInvalidError(
            "limits", scenario.limits.value,
            f"{what} executes the real operators, which keep every limit: must be 'strict' "
            "(what-if is for simulate and sweep)",
        )  # fmt: skip


def _measure_into(
    comm: Communicator,
    scenario: Scenario,
    out: Path,
    *,
    plots: bool,
    scenario_path: Path,
    argv: Sequence[str],
    overrides: Sequence[str],
    device: torch.device | None = None,
    timing: Callable[[list[Callable[[], object]]], list[list[Timeline]]] | None = None,
) -> int:
    """Measure ``scenario`` on every rank; rank 0 writes the results folder ``out`` (fresh).

    ``timing``: how the tilings are timed, where not in the scenario's own rounds
    (:func:`mc2sim.study.measure.measure_study`; it shows its own progress).
    """
    from mc2sim.report import METRICS_HEADER, metrics_row
    from mc2sim.results import write_results
    from mc2sim.study.measure import measure_study
    from mc2sim.study.simulate import manifest_of

    lead = comm.rank == 0
    rounds = scenario.repetitions + 1
    with _progress_bar(rounds, scenario.name, "round", show=lead and timing is None) as bar:
        result = measure_study(scenario, comm, progress=_ticker(bar), device=device, timing=timing)
    if lead:
        manifest = manifest_of(
            scenario, topology="measured", world=comm.size, source="measured",
            hosts=result.hosts, scenario_path=scenario_path, argv=argv, overrides=overrides,
            devices=result.devices, backend=result.backend, probe_tflops=result.probe_tflops,
        )  # fmt: skip
        write_results(
            out, timeline=result.timeline, baseline=result.baseline, manifest=manifest,
            verdicts=result.verdicts,
        )  # fmt: skip
        by_run = result.timeline.metrics_by_run(result.baseline)
        print(
            f"# {scenario.name}: {scenario.op}, {comm.size} ranks (measured on "
            f"{', '.join(sorted(set(result.devices)))} via {result.backend})"
        )
        print(METRICS_HEADER + "  golden")
        for tiling, run in result.runs.items():
            m = by_run[run]
            ok = all(v.passed for v in result.verdicts[tiling])
            print(f"{metrics_row(tiling, m)}  {'pass' if ok else 'FAIL'}")
        if plots:
            _write_plots([out], out)
        print(f"results: {out}")
        for verdicts_of_tiling in result.verdicts.values():
            for verdict in verdicts_of_tiling:
                if not verdict.passed:
                    print(f"golden check failed: {verdict.summary()}", file=sys.stderr)
    return 0 if result.passed else 1


def _cmd_check(args: argparse.Namespace) -> int:
    """Check and time a user's implementation of a scenario's op beside mc2sim's tilings."""
    from mc2sim.comm import init
    from mc2sim.report import format_tables
    from mc2sim.results import clear_folder, read_results, write_results
    from mc2sim.study.check import (
        SKIPPED_STATUS,
        ImplementationFailedError,
        check_device,
        check_implementation,
        load_implementation,
    )
    from mc2sim.study.simulate import manifest_of

    comm = init("mpi")
    lead = comm.rank == 0
    stamp, hosts = _stamp_and_hosts(comm)
    with _checking(comm):  # every rank loads the same module: an error is the same everywhere
        scenario = _load_scenario(args.scenario, args.set)
        scenario.world_size(comm.size)
        _check_fits(scenario, comm.size, hosts, comm.rank)
        impl = load_implementation(args.impl, rank=comm.rank)
        check_device(args.device)
        out = _out_or(args.out, f"results/{scenario.name}-check-{stamp}")
        if lead:
            _check_out(out, args.overwrite)
            _check_plots(args.plots)
    bars: list[Any] = []  # drawn from the first timed round: after the checked call's lines

    def progress(i: int, n: int, label: str) -> None:
        if not bars:
            bars.append(_progress_bar(n, f"check {impl.spec}", "round", show=lead))
        _ticker(bars[0])(i, n, label)

    try:
        result = check_implementation(scenario, impl, comm, device=args.device, progress=progress)
    except ImplementationFailedError as exc:  # every rank holds the same one
        if lead:
            print(f"mc2sim check: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        for bar in bars:
            bar.close()
    measured, record = result.measured, result.record
    if result.skipped is not None or measured is None or record is None:  # all three, or none
        if lead:
            print(f"mc2sim check: skipped {impl.spec}: {result.skipped}", file=sys.stderr)
        return SKIPPED_STATUS
    if lead:
        if args.overwrite:
            clear_folder(out)
        manifest = manifest_of(
            scenario, topology="measured", world=comm.size, source="measured",
            hosts=measured.hosts, scenario_path=_scenario_file(args.scenario), argv=args.argv,
            overrides=args.set, probe_tflops=measured.probe_tflops,
        )  # fmt: skip
        write_results(
            out, timeline=measured.timeline, baseline=measured.baseline, manifest=manifest,
            verdicts=measured.verdicts, implementations={impl.label: record},
        )  # fmt: skip
        print(format_tables([read_results(out)]), end="")
        for verdict in result.verdicts:
            print(f"{impl.label}: {verdict.summary()}")
        if args.plots:
            _write_plots([out], out)
        print(f"results: {out}")
    return 0 if result.passed else 1


MAX_SWEEP_POINTS = 10_000
"""The most points a sweep's grid may have (each point is a results folder of its own)."""


def _sweep_points(axes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The grid of ``--set`` lists: ``key=v1,v2`` axes expand, the rest are fixed overrides.

    ``tilings`` is a list value of its own, never an axis. Returns ``(label, overrides)`` per
    point; the label names the point's axis values (``base`` with no axis).

    Raises:
        ParamInvalidError: a key is given twice (an axis lists its values in one ``--set``;
            a second would silently win over the first in every point), or the grid has
            more than :data:`MAX_SWEEP_POINTS` points (found before it is expanded).
    """
    import itertools

    fixed: list[str] = []
    grid: list[list[str]] = []
    given: dict[str, str] = {}
    for item in axes:
        key, equals, values = item.partition("=")
        key = key.strip()
        if equals and key:  # a malformed item is the scenario reader's to refuse, by name
            if key in given:
                raise ParamInvalidError(
                    f"--set {key}", values, f"is given twice (also --set {given[key]}): one "
                    "--set per key; an axis lists its values, --set key=v1,v2",
                )  # fmt: skip
            given[key] = item
        if "," in values and key != "tilings":
            if any(not v.strip() for v in values.split(",")):
                raise ParamInvalidError(
                    f"--set {key}", values, "an axis lists values, none empty: --set key=v1,v2"
                )
            grid.append([f"{key}={v.strip()}" for v in values.split(",")])
        else:
            fixed.append(item)
    size = math.prod(len(axis) for axis in grid)
    if size > MAX_SWEEP_POINTS:
        raise ParamInvalidError(
            "--set", " x ".join(str(len(axis)) for axis in grid) + f" = {size} points",
            f"a sweep has at most {MAX_SWEEP_POINTS} points (a results folder each): "
            "split the grid into several sweeps",
        )  # fmt: skip
    points = list(itertools.product(*grid)) if grid else [()]
    return [(",".join(point) or "base", fixed + list(point)) for point in points]


def _point_folders(points: Sequence[tuple[str, list[str]]]) -> list[str]:
    """Each sweep point's folder name (its label, ``/`` as ``_``).

    Two alike, and a name longer than :data:`_NAME_BYTES`, are refused before any point is
    simulated.
    """
    names = [label.replace("/", "_") for label, _ in points]
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen or name in (".", ".."):
            raise ParamInvalidError(
                "--set", points[i][0], f"names the point folder {name!r}, which another point "
                "has or which is no folder name",
            )  # fmt: skip
        if len(name.encode("utf-8")) > _NAME_BYTES:
            raise ParamInvalidError(
                "--set", points[i][0], f"names a point folder of {len(name.encode('utf-8'))} "
                f"bytes: a file system takes at most {_NAME_BYTES} (shorten the values)",
            )  # fmt: skip
        seen.add(name)
    return names


def _distinct_studies(points: Sequence[tuple[str, list[str]]], scenarios: Sequence[Any]) -> None:
    """Refuse two sweep points that load the same study (``shape.m=8,08``).

    One would be simulated twice, into two folders.
    """
    seen: dict[str, str] = {}
    for (label, _), scenario in zip(points, scenarios, strict=True):
        first = seen.setdefault(repr(scenario), label)
        if first != label:
            raise ParamInvalidError(
                "--set", label, f"is the same study as the point {first}: a sweep's points differ"
            )


_NAME_BYTES = 255
"""The longest file name, in bytes, of ext4, XFS, Btrfs, tmpfs and NTFS alike (``NAME_MAX``)."""


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Simulate (or, with --real under mpiexec, run) a scenario at every point of a grid."""
    from mc2sim.results import clear_folder, write_sweep

    with _checking():  # the arguments alone, the same on every rank: before MPI starts
        points = _sweep_points(args.set)
    default = f"results/{Path(args.scenario).stem}-sweep-"
    if args.real:
        from mc2sim.comm import init, rank_device

        comm = init("mpi")
        lead = comm.rank == 0
        stamp, hosts = _stamp_and_hosts(comm)
        with _checking(comm):
            device = rank_device(args.device)
            if args.ranks is not None or args.topology is not None:
                flag = "--ranks" if args.ranks is not None else "--topology"
                raise ParamInvalidError(
                    flag, args.ranks if args.ranks is not None else args.topology,
                    "is for simulated sweeps: --real runs on the ranks of mpiexec",
                )  # fmt: skip
            if args.what_if:
                raise ParamInvalidError(
                    "--what-if", True, "is for simulated sweeps: --real runs the real operators"
                )
            names = _point_folders(points)
            scenarios = [_load_scenario(args.scenario, point) for _, point in points]
            _distinct_studies(points, scenarios)
            for scenario in scenarios:
                _require_strict(scenario, "sweep --real")
                scenario.world_size(comm.size)
                _check_fits(scenario, comm.size, hosts, comm.rank)
            out = _out_or(args.out, default + stamp)
            if lead:
                _check_out(out, args.overwrite)
                _check_plots(args.plots)
        if lead and args.overwrite:
            clear_folder(out)
        status = 0
        for (label, point), name, scenario in zip(points, names, scenarios, strict=True):
            if lead:
                print(f"# point {label}", flush=True)
            status = max(
                status,
                _measure_into(
                    comm,
                    scenario,
                    out / name,
                    plots=args.plots,
                    scenario_path=_scenario_file(args.scenario),
                    argv=args.argv,
                    overrides=point,
                    device=device,
                ),  # fmt: skip
            )
        if lead:
            if args.plots:
                _write_plots([out / name for name in names], out)
            write_sweep(out, {label: name for (label, _), name in zip(points, names, strict=True)})
        return status
    return _simulate_sweep(args, points, default + _stamp())


def _simulate_sweep(
    args: argparse.Namespace, points: Sequence[tuple[str, list[str]]], default: str
) -> int:
    """``sweep`` without ``--real``: every point simulated, a results folder each.

    Under ``mpiexec -n N`` the points are dealt out in batches of ``N x``
    :data:`_SWEEP_BATCH` by the ranks' speeds so far (:func:`_dealt`, :func:`_speeds`: a
    rank on a slower or busier core gets fewer points, and equal speeds deal in snake order,
    since a grid whose cost rises along its inner axis would give rank ``N - 1`` the dearest
    point of every round under ``i mod N``); each rank simulates and encodes its points of a
    batch. Where every rank sees the folder rank 0 made (one host, or a shared file system:
    :func:`_sees_folder`), each rank writes its own points' folders and rank 0 gathers their
    table rows alone; elsewhere rank 0 gathers the files too and writes every folder. Either
    way the folder is the serial sweep's (:func:`mc2sim.results.comparable_files`). A point
    the model refuses ends the sweep on every rank with the first such point's error, and a
    folder that cannot be written ends it, after the other points, with the first such
    point's error (:func:`_first_failed_write`), as the lone sweep does (exit status 2 both).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from mc2sim.results import clear_folder, write_encoded, write_sweep
    from mc2sim.study.simulate import encode_study, simulate_study

    comm = None
    if world_position()[1] > 1:  # the ranks move objects alone: no torch is imported
        from mc2sim.comm.mpi_objects import MpiObjectCommunicator

        comm = MpiObjectCommunicator()
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    lead = rank == 0
    with _checking(comm):  # every rank reads the same inputs: an error is the same everywhere
        if args.device != "cpu":
            raise ParamInvalidError(
                "--device", args.device, "is for --real sweeps: a simulated sweep runs no kernel"
            )
        names = _point_folders(points)
        scenarios = [_load_scenario(args.scenario, point, args.what_if) for _, point in points]
        _distinct_studies(points, scenarios)
        worlds = [sc.world_size(args.ranks, "--ranks") for sc in scenarios]
        lifted = [item for sc in scenarios for item in sc.lifted(args.ranks, "--ranks")]
        topologies = [
            _sized_topology(sc, args.topology, world, "ranks" if args.ranks is None else "--ranks")
            for sc, world in zip(scenarios, worlds, strict=True)
        ]
        out = _out_or(args.out, default)
        if lead:
            out = _check_out(out, args.overwrite)
            _check_plots(args.plots)
    if lead:
        _warn_lifted(lifted, "sweep")
        if args.overwrite:
            clear_folder(out)
    if comm is not None:  # rank 0's folder (a default one is named by rank 0's clock)
        theirs = Path(comm.allgather_object(str(out.absolute()))[0])
        out = out if lead else theirs
    own_writes = comm is None or _sees_folder(comm, out)
    if lead:
        print(f"{'point':<34}{'tiling':<26}{'total ms':>10}{'overlap%':>9}{'speedup':>9}")
    grid = list(zip(points, names, scenarios, topologies, worlds, strict=True))
    # the folders are written by threads of their own while the ranks simulate on
    writer = ThreadPoolExecutor(max_workers=_SWEEP_WRITERS)
    written = []
    with writer, tqdm(total=len(grid), desc="sweep", file=sys.stderr, disable=not lead) as bar:
        busy = [(0, 0.0)] * size  # each rank's points so far and the seconds they took
        for first in range(0, len(grid), size * _SWEEP_BATCH):
            mine: list[tuple[int, Any, Any, float]] = []
            stop = min(first + size * _SWEEP_BATCH, len(grid))
            for i in _dealt(first, stop, rank, _speeds(busy)):
                (label, point), name, scenario, topology, world = grid[i]
                start = time.perf_counter()
                try:  # the model is pure: what it refuses is in the input
                    result = simulate_study(scenario, topology, world)
                except AclnnError as err:
                    mine.append((i, None, err, 0.0))
                    break
                files = encode_study(
                    result, scenario_path=_scenario_file(args.scenario), argv=args.argv,
                    overrides=_with_profile(point, args.what_if),
                )  # fmt: skip
                if own_writes:
                    written.append((i, writer.submit(write_encoded, out / name, files)))
                rows = _sweep_rows(label, result.metrics())
                seconds = time.perf_counter() - start
                mine.append((i, None if own_writes else files, rows, seconds))
            done = comm.allgather_object(mine) if comm is not None else [mine]
            busy = [
                (points + len(items), seconds + sum(item[3] for item in items))
                for (points, seconds), items in zip(busy, done, strict=True)
            ]
            batch = sorted((item for items in done for item in items), key=lambda item: item[0])
            refused = [item[2] for item in batch if isinstance(item[2], AclnnError)]
            if refused:  # every rank raises the first point's error, so none is left waiting
                raise InputError(refused[0])
            if lead:
                for i, files, rows, _ in batch:
                    if not own_writes:
                        written.append((i, writer.submit(write_encoded, out / names[i], files)))
                    print("\n".join(rows))
                    bar.update(1)
        _first_failed_write(comm, written)
    if lead:
        if args.plots:
            _write_plots([out / name for name in names], out)
        write_sweep(out, {label: name for (label, _), name in zip(points, names, strict=True)})
        print(f"results: {out}")
    return 0


def _first_failed_write(
    comm: ObjectCommunicator | None, written: Sequence[tuple[int, Future[Any]]]
) -> None:
    """Wait for a sweep's writes, ``(point, future)`` in point order.

    Raises, on every rank, the error of the first point in the grid whose folder could not
    be written: the point the lone sweep names, whichever rank wrote it.
    """
    failed: tuple[int, AclnnError] | None = None
    for i, write in written:
        try:
            write.result()
        except (AclnnError, OSError) as exc:
            failed = (i, _as_param_error(exc))
            break
    firsts = comm.allgather_object(failed) if comm is not None else [failed]
    errors = sorted((first for first in firsts if first is not None), key=lambda f: f[0])
    if errors:
        raise InputError(errors[0][1])


def _dealt(first: int, stop: int, rank: int, speeds: Sequence[float]) -> list[int]:
    """The points ``[first, stop)`` of a sweep batch that ``rank`` simulates.

    Each point in turn goes to the rank that would finish its share of the batch first at its
    speed (``speeds[r]``, points a second, the same list on every rank): ``(dealt + 1) /
    speed`` least. Ties go in snake order, round ``j`` of ``len(speeds)`` points looking at
    ranks ``0..N-1`` when ``j`` is even and ``N-1..0`` when odd, so that at equal speeds no
    rank always gets the later, dearer point of each round.
    """
    size = len(speeds)
    dealt = [0] * size
    mine = []
    for i in range(first, stop):
        order = range(size) if (i - first) // size % 2 == 0 else range(size - 1, -1, -1)
        owner = min(order, key=lambda r: (dealt[r] + 1) / speeds[r])
        dealt[owner] += 1
        if owner == rank:
            mine.append(i)
    return mine


def _speeds(busy: Sequence[tuple[int, float]]) -> list[float]:
    """Each rank's points a second from its ``(points, seconds)`` so far.

    A rank with nothing measured yet counts at the mean of the others (1 when none is).
    """
    known = [points / seconds for points, seconds in busy if points and seconds > 0]
    mean = sum(known) / len(known) if known else 1.0
    return [points / seconds if points and seconds > 0 else mean for points, seconds in busy]


def _sees_folder(comm: ObjectCommunicator, out: Path) -> bool:
    """Whether every rank sees the folder ``out`` that rank 0 makes (one host, or shared disk).

    Rank 0 leaves a file of random name and content there and each rank looks for it; rank 0
    removes the file before it returns, and ``out`` stays (empty).
    """
    import secrets

    from mc2sim._atomic import write_atomic

    token = secrets.token_hex(8) if comm.rank == 0 else ""
    with _checking(comm):
        if comm.rank == 0:
            write_atomic(out / f".mc2sim-probe-{token}", token, parents=True)
    token = comm.allgather_object(token)[0]
    probe = out / f".mc2sim-probe-{token}"
    try:
        seen = probe.read_text(encoding="utf-8") == token
    except (OSError, UnicodeError):
        seen = False
    everywhere = all(comm.allgather_object(seen))
    if comm.rank == 0:
        probe.unlink()
    return everywhere


_SWEEP_BATCH = 8
"""Points each rank of a sweep under mpiexec simulates between two gatherings at rank 0:
fewer collectives and waits, at the memory of ``ranks x 8`` points' files on rank 0 where
rank 0 writes every folder (ranks that do not see its folder)."""

_SWEEP_WRITERS = 4
"""Threads of a sweep's process that write its folders. A writer waits for the GIL after each
system call while the main thread simulates: on this project's 2-core machine one thread
took 11 to 13.6 s to write the 1001 files of ``scripts/bench_sweep_mpi.py``'s 200 points,
which take 0.6 s to write alone; four get their turns more often."""


def _sweep_rows(label: str, metrics: Mapping[str, Any]) -> list[str]:
    """A sweep point's lines of the printed table: one per tiling."""
    from mc2sim.report import ms_column

    rows = []
    for tiling, m in metrics.items():
        speedup = f"{m.speedup:.2f}" if m.speedup is not None else "-"
        rows.append(
            f"{label:<34}{tiling:<26}{ms_column(m.total_s)}{m.overlap_pct:>9.1f}{speedup:>9}"
        )
    return rows


def _cmd_report(args: argparse.Namespace) -> int:
    """Tables and plots of one or more results folders (a run and its simulation compare)."""
    from mc2sim._paths import check_creatable
    from mc2sim.report import report

    with _checking():
        if args.out:
            check_creatable(Path(args.out), "--out")
        _check_plots(True)
        result = report([Path(d) for d in args.results], Path(args.out) if args.out else None)
    print(result.tables)
    for path in result.plots:
        print(f"plot: {path}")
    return 0


def _read_counts(path: Path) -> tuple[Any, Any, Any]:
    """``check-counts``' file: JSON with experts_per_rank, send_counts and recv_counts."""
    import json

    from mc2sim._yaml import read_text

    expected = (
        "must be JSON with the keys experts_per_rank, send_counts (a list of counts per rank) "
        "and recv_counts (likewise)"
    )

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        twice = next((key for key in keys if keys.count(key) > 1), None)
        if twice is not None:  # the last would silently win
            raise ValueError(f"the key {twice!r} is given twice")
        return dict(pairs)

    text = read_text(str(path))  # a regular file of at most INPUT_BYTES, UTF-8
    try:
        data = json.loads(text, object_pairs_hook=unique)
    except (ValueError, RecursionError) as err:
        raise ParamInvalidError(str(path), "not JSON", f"{expected} ({err})") from None
    if not isinstance(data, dict):
        raise ParamInvalidError(str(path), type(data).__name__, expected)
    keys = ("experts_per_rank", "send_counts", "recv_counts")
    for key in keys:
        if key not in data:
            raise ParamInvalidError(f"{path}: {key}", None, f"is missing; the file {expected}")
    for key in data:
        if key not in keys:  # a misspelt key would be read as if absent
            raise ParamInvalidError(
                f"{path}: {key}", data[key], f"is an unknown key; the file {expected}"
            )
    return data["send_counts"], data["recv_counts"], data["experts_per_rank"]


def _cmd_check_counts(args: argparse.Namespace) -> int:
    """Check the cross-rank counts invariant on a dump of every rank's counts (no MPI)."""
    from mc2sim.invariants import check_counts_table, counts_mismatch

    path = Path(args.file)
    with _checking():
        send_counts, recv_counts, experts = _read_counts(path)
        try:  # the rules mc2sim.invariants.check_counts applies to every rank's counts
            send, recv = check_counts_table(send_counts, recv_counts, experts)
        except ParamInvalidError as err:
            raise ParamInvalidError(f"{path}: {err.param}", err.value, err.rule) from None
    e = int(experts)
    world = send.shape[0]
    first = counts_mismatch(send, recv, e)
    if first is None:
        rows = int(send.astype(object).sum())  # exact: int64 sums could wrap
        print(f"{path}: consistent: {world} ranks, {e} experts per rank, {rows} rows")
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
    with _checking():
        script = Path(args.script)
        if not script.is_file():
            rule = "is not a file" if script.exists() else "no such file"
            raise ParamInvalidError("script", args.script, rule)
        if not os.access(script, os.R_OK):
            raise ParamInvalidError("script", args.script, "is not readable")
        _check_source(script, args.script)
    sys.argv = [args.script, *args.script_args]
    runpy.run_path(args.script, run_name="__main__")
    return 0


def _check_source(script: Path, given: str) -> None:
    """Compile a Python source ``script`` (``exec``): one that cannot run is refused early.

    Before MPI starts. What ``runpy`` runs besides sources (a zip application, a ``.pyc``) is
    left to it.
    """
    import zipfile

    if script.suffix == ".pyc" or zipfile.is_zipfile(script):
        return
    try:
        compile(script.read_bytes(), given, "exec")
    except SyntaxError as err:
        where = f" (line {err.lineno})" if err.lineno else ""
        raise ParamInvalidError("script", given, f"is not valid Python: {err.msg}{where}") from None
    except ValueError as err:  # a null byte
        raise ParamInvalidError("script", given, f"is not valid Python: {err}") from None
    except RecursionError:
        raise ParamInvalidError("script", given, "is not valid Python: nested too deeply") from None


_TIMEOUT_HELP = (
    f"seconds a collective may wait before the job ends with exit status 3 (sets {TIMEOUT_ENV}; "
    f"default: ${TIMEOUT_ENV}, else 300)"
)
_WHAT_IF_HELP = (
    "lift today's hardware limits (e * world <= 256, aclnn size ranges; each lifted one is "
    "reported once); the operators' semantic limits still apply (sets limits=what-if)"
)
_OVERWRITE_HELP = "replace the results of an earlier run in --out (else --out must be new or empty)"


def _add_timeout(command: argparse.ArgumentParser) -> None:
    command.add_argument("--timeout", type=_seconds, metavar="SECONDS", help=_TIMEOUT_HELP)


def _add_device(command: argparse.ArgumentParser, default: str) -> None:
    command.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default=default,
        help="where each rank's tensors live: cpu, cuda (the GPU of the rank's local rank; "
        "ranks share GPUs when there are fewer), auto (that GPU if the host has one, else "
        f"cpu); default {default}",
    )


def _add_out(command: argparse.ArgumentParser, help_text: str) -> None:
    command.add_argument("--out", help=help_text)
    command.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mc2sim",
        description="Simulation harness for MC2 fused communication-computation operators.",
        epilog="A bad input is reported as one line on stderr (rank 0 alone under MPI), exit "
        "status 2, before any work.",
    )
    parser.add_argument("--version", action="version", version=_version_of("mc2sim"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = commands.choices

    info = commands.add_parser("info", help="print versions, MPI library, world size, backend")
    info.add_argument(
        "--backend", choices=("mpi", "torch"), default="mpi", help="communicator (default mpi)"
    )
    _add_device(info, "auto")
    info.set_defaults(func=_cmd_info)

    run = commands.add_parser(
        "run", help="run a scenario for real under mpiexec: tilings, golden check, timeline"
    )
    run.add_argument("scenario", help="scenario file, or the name of a shipped one")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )
    _add_out(run, "results folder, new or empty (default results/<scenario>-<time>)")
    run.add_argument(
        "--no-plots", dest="plots", action="store_false", help="skip the PNG plots (faster)"
    )
    _add_device(run, "cpu")
    run.add_argument(
        "--calibrate",
        metavar="PATH",
        help="fit this machine's topology in the same rounds as the tilings and write it here "
        "(new), so a comparison with the fit meets the machine at the same pace; the rounds "
        "are the fit's (--reps), not the scenario's repetitions",
    )
    run.add_argument(
        "--reps",
        type=_rounds,
        help=f"with --calibrate: interleaved rounds of the fit's calls and the tilings (1 to "
        f"{MAX_ROUNDS}; default {CALIBRATE_ROUNDS})",
    )
    run.add_argument(
        "--name", help="with --calibrate: the fitted topology's name (default this_machine)"
    )
    run.add_argument(
        "--fits",
        type=_fits,
        help="with --calibrate: fit again while the machine's speed probe moves over 15%% "
        "during a fit's rounds, up to this many fits, keeping the steadiest and its rounds "
        f"of the tilings (1 to {MAX_FITS}; default 1)",
    )
    _add_timeout(run)
    run.set_defaults(func=_cmd_run)

    chk = commands.add_parser(
        "check",
        help="check and time your implementation of a scenario's op on every rank (mpiexec)",
    )
    chk.add_argument("scenario", help="scenario file, or the name of a shipped one")
    chk.add_argument(
        "--impl",
        required=True,
        metavar="MODULE:FUNCTION",
        help="the implementation: a callable with the signature of the op in mc2sim.ops "
        "(a module name or a .py file, a colon, its name); mc2sim.adapters has real ones",
    )
    _add_device(chk, "cpu")
    chk.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )
    _add_out(chk, "results folder, new or empty (default results/<scenario>-check-<time>)")
    chk.add_argument(
        "--no-plots", dest="plots", action="store_false", help="skip the PNG plots (faster)"
    )
    _add_timeout(chk)
    chk.set_defaults(func=_cmd_check)

    sim = commands.add_parser(
        "simulate", help="simulate a scenario on a topology (no MPI); write a results folder"
    )
    sim.add_argument("scenario", help="scenario file, or the name of a shipped one")
    sim.add_argument("--topology", help="topology name or file (default: the scenario's)")
    sim.add_argument("--ranks", type=int, help="world size (default: the scenario's)")
    sim.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )
    sim.add_argument("--what-if", action="store_true", help=_WHAT_IF_HELP)
    _add_out(sim, "results folder, new or empty (default results/<scenario>-<time>-sim)")
    sim.add_argument(
        "--measured",
        metavar="DIR",
        help="a `mc2sim run` results folder to compare with (said when its speed probe read "
        "over 15%% off the fit's)",
    )
    sim.add_argument(
        "--at-run-speed",
        action="store_true",
        help="with --measured: run a fitted topology at the run's speed (the run's speed probe "
        "over the fit's)",
    )
    sim.add_argument(
        "--per-task",
        choices=("auto", "yes", "no"),
        default="auto",
        help="write tasks.csv and trace.json (a record per task and rank); auto: up to "
        "200,000 records",
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
    _add_device(sweep, "cpu")
    sweep.add_argument("--what-if", action="store_true", help=_WHAT_IF_HELP)
    _add_out(sweep, "folder of the points' folders (default results/<scenario>-sweep-<time>)")
    sweep.add_argument(
        "--no-plots", dest="plots", action="store_false", help="skip the PNG plots (faster)"
    )
    _add_timeout(sweep)
    sweep.set_defaults(func=_cmd_sweep)

    rep = commands.add_parser(
        "report", help="tables and PNG plots of results folders (run, simulate, sweep points)"
    )
    rep.add_argument("results", nargs="+", help="results folders (a sweep's: all its points)")
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
    cal.add_argument(
        "--out", default="topologies/this_machine.yaml", help="topology file to write (new)"
    )
    cal.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cal.add_argument(
        "--reps",
        type=_rounds,
        default=CALIBRATE_ROUNDS,
        help=f"interleaved rounds of every call (1 to {MAX_ROUNDS})",
    )
    cal.add_argument("--name", default="this_machine", help="the topology's name")
    cal.add_argument(
        "--fits",
        type=_fits,
        default=1,
        help="fit again while the machine's speed probe moves over 15%% during a fit's rounds, "
        f"up to this many fits, keeping the steadiest (1 to {MAX_FITS})",
    )
    _add_timeout(cal)
    cal.set_defaults(func=_cmd_calibrate)

    val = commands.add_parser(
        "validate-model",
        help="run a sweep for real and simulated; print per-case and geomean error",
    )
    val.add_argument(
        "--topology",
        help="a fitted topology: a file, or a shipped one by name (default: the shipped fit "
        "of this machine on as many ranks, this_machine_4ranks on 4, else this_machine)",
    )
    val.add_argument(
        "--calibrate",
        action="store_true",
        help="fit the topology in this job instead, in the same rounds as the sweep",
    )
    val.add_argument("--out", help="with --calibrate: also write the fitted topology here (new)")
    val.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    val.add_argument(
        "--name", help="with --calibrate: the fitted topology's name (default this_machine)"
    )
    val.add_argument(
        "--reps",
        type=_rounds,
        default=15,
        help=f"interleaved rounds of every case (1 to {MAX_ROUNDS})",
    )
    val.add_argument(
        "--fits",
        type=_fits,
        help="with --calibrate: fit again while the machine's speed probe moves over 15%% "
        "during a fit's rounds, up to this many fits, scoring the steadiest (1 to "
        f"{MAX_FITS}; default 1)",
    )
    val.add_argument(
        "--at-run-speed",
        action="store_true",
        help="run --topology at this job's speed (a speed probe after the rounds over the "
        "fit's); the other way's held-out error is printed too",
    )
    val.add_argument(
        "--cases",
        nargs="+",
        metavar="PATH",
        help="the held-out cases: scenario files or folders of them (default: "
        "scenarios/validation/, less what cannot run on the ranks at hand); each must run "
        "on the ranks at hand and differ from every calibration scenario",
    )
    _add_timeout(val)
    val.set_defaults(func=_cmd_validate_model)

    run_script = commands.add_parser(
        "exec",
        help="run a Python script on every rank; an exception on any rank aborts the job",
    )
    _add_timeout(run_script)
    run_script.add_argument("script", help="path of the script")
    run_script.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    run_script.set_defaults(func=_cmd_exec)
    return parser


def _report_input_error(command: str, exc: InputError) -> None:
    """Print a user error as one line, on rank 0 alone (every rank holds the same one)."""
    if not _lead():
        return
    where = exc.error.rank
    line = f"mc2sim {command}: {exc}" + (f" (found on rank {where})" if where else "")
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        The exit status: 0 done; 1 a check of the results failed (a golden verdict,
        ``check-counts``' invariant, an implementation's verdict); 2 a bad input or usage,
        reported as one line before any work (under ``exec``, also an op's arguments the
        ranks agreed are wrong: ``mc2sim.runtime.abort_on_exception``); 3 a collective or
        an implementation's call ran past the deadline (the watchdog); 4 ``check`` skipped
        an implementation unavailable here.

    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (one line, rank 0)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    args.argv = ["mc2sim", *(sys.argv[1:] if argv is None else argv)]  # for the manifest
    if getattr(args, "timeout", None) is not None:  # read when the communicator starts
        os.environ[TIMEOUT_ENV] = repr(args.timeout)
    steady_allocator()  # repeated calls reuse their memory: timings do not depend on order
    with abort_on_exception():
        try:
            status: int = args.func(args)
        except InputError as exc:
            _report_input_error(args.command, exc)
            status = 2
    return status
