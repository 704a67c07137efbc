"""Communicators: one ``Communicator`` protocol; backends over mpi4py, torch.distributed, threads.

The names of the modules that import torch or mpi4py are resolved on first use
(:func:`__getattr__`), so importing this package, or a torch-free module of it such as
:mod:`mc2sim.comm.job`, imports neither, initialises no MPI and requires no launcher:
``simulate`` and the other commands that run no kernel start without them. ``agree`` and
``agreed`` are imported here (:mod:`mc2sim.comm.agree` imports torch where it sends), since
the function ``agree`` shares its module's name: a lazy one would resolve to the module
once anything imported ``mc2sim.comm.agree``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mc2sim._lazy import lazy_names
from mc2sim.comm.agree import MustMatch, agree, agreed

if TYPE_CHECKING:
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
    from mc2sim.comm.mpi import MpiCommunicator
    from mc2sim.comm.mpi_objects import MpiObjectCommunicator
    from mc2sim.comm.objects import ObjectCommunicator
    from mc2sim.comm.threads import ThreadCommunicator, run_threads
    from mc2sim.comm.torch_dist import TorchCommunicator

__all__ = [
    "Backend",
    "Communicator",
    "Completed",
    "DeviceChoice",
    "Launcher",
    "MpiCommunicator",
    "MpiObjectCommunicator",
    "MustMatch",
    "ObjectCommunicator",
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

_HOME = {
    "Communicator": "base",
    "Completed": "base",
    "ReduceOp": "base",
    "Work": "base",
    "Backend": "launch",
    "DeviceChoice": "launch",
    "Launcher": "launch",
    "describe_device": "launch",
    "detect_launcher": "launch",
    "init": "launch",
    "rank_device": "launch",
    "transport": "launch",
    "MpiCommunicator": "mpi",
    "MpiObjectCommunicator": "mpi_objects",
    "ObjectCommunicator": "objects",
    "ThreadCommunicator": "threads",
    "run_threads": "threads",
    "TorchCommunicator": "torch_dist",
}
"""The module of :mod:`mc2sim.comm` that defines each public name."""

__getattr__, __dir__ = lazy_names(__name__, _HOME, __all__)
