"""Communicators: one ``Communicator`` protocol; backends over mpi4py, torch.distributed, threads.

``MpiCommunicator`` and ``TorchCommunicator`` are imported lazily, so importing this package
neither initialises MPI nor requires a launcher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mc2sim.comm.agree import MustMatch, agree, agreed
from mc2sim.comm.base import Communicator, Completed, ReduceOp, Work
from mc2sim.comm.launch import (
    Backend,
    DeviceChoice,
    Launcher,
    describe_device,
    detect_launcher,
    init,
    rank_device,
    transport,
)
from mc2sim.comm.threads import ThreadCommunicator, run_threads

if TYPE_CHECKING:
    from mc2sim.comm.mpi import MpiCommunicator
    from mc2sim.comm.torch_dist import TorchCommunicator

__all__ = [
    "Backend",
    "Communicator",
    "Completed",
    "DeviceChoice",
    "Launcher",
    "MpiCommunicator",
    "MustMatch",
    "ReduceOp",
    "ThreadCommunicator",
    "TorchCommunicator",
    "Work",
    "agree",
    "agreed",
    "describe_device",
    "detect_launcher",
    "init",
    "rank_device",
    "run_threads",
    "transport",
]

_LAZY = {
    "MpiCommunicator": "mc2sim.comm.mpi",
    "TorchCommunicator": "mc2sim.comm.torch_dist",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
