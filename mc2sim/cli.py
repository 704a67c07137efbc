"""The ``mc2sim`` command line (also ``python -m mc2sim``)."""

from __future__ import annotations

import argparse
import os
import platform
import runpy
import socket
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from mc2sim.runtime import abort_on_exception

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
    with abort_on_exception():
        status: int = args.func(args)
    return status
