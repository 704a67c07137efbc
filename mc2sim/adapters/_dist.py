"""The ``torch.distributed`` group an adapter's library needs, over a communicator's ranks."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from mc2sim.comm import Communicator

__all__ = ["local_rank", "move", "process_group"]

_GROUPS: dict[str, Any] = {}
"""backend -> the process group made for it in this process."""


def local_rank() -> int:
    """This process's rank on its host (the launcher's variable; else the job's rank)."""
    for var in ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    from mc2sim.comm.job import world_position

    return world_position()[0]


def process_group(comm: Communicator, backend: str) -> Any:
    """A ``torch.distributed`` group of ``backend`` over every rank of ``comm``.

    The default group when ``torch.distributed`` is already initialised with ``comm``'s size
    (a job launched with torchrun); else a new default group, its rendezvous address sent
    from rank 0 through ``comm``. Every rank must call it.

    Args:
        comm: the ranks (all of the job's).
        backend: ``"nccl"``, ``"hccl"``, ...

    Returns:
        The group (``torch.distributed.group.WORLD``).
    """
    import torch.distributed as dist

    if backend in _GROUPS:
        return _GROUPS[backend]
    if not dist.is_initialized():
        hosts = comm.allgather_object(socket.gethostname())
        address = None
        if comm.rank == 0:
            one_host = len(set(hosts)) == 1
            host = "127.0.0.1" if one_host else socket.gethostbyname(socket.gethostname())
            with socket.socket() as s:
                s.bind((host if one_host else "", 0))
                address = f"tcp://{host}:{s.getsockname()[1]}"
        address = comm.allgather_object(address)[0]
        dist.init_process_group(backend, init_method=address, rank=comm.rank, world_size=comm.size)
    group = dist.group.WORLD
    _GROUPS[backend] = group
    return group


def move(value: Any, device: torch.device) -> Any:
    """``value`` on ``device`` if it is a tensor elsewhere; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device)
    return value
