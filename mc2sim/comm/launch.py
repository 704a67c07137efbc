"""Build a Communicator from how the job was launched (mpiexec, torchrun, or a lone process)."""

from __future__ import annotations

import atexit
import os
import socket
from typing import TYPE_CHECKING

from mc2sim._compat import StrEnum
from mc2sim.comm.job import Launcher, detect_launcher
from mc2sim.errors import ParamInvalidError

if TYPE_CHECKING:
    import torch
    from torch._C._distributed_c10d import Store

    from mc2sim.comm.base import Communicator

__all__ = [
    "Backend",
    "DeviceChoice",
    "Launcher",
    "describe_device",
    "detect_launcher",
    "init",
    "rank_device",
    "transport",
]

_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")
_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


class Backend(StrEnum):
    """Which library carries the collectives.

    Glossary: ``mpi`` is mpi4py (``MpiCommunicator``); ``torch`` is torch.distributed
    (``TorchCommunicator``: gloo on CPUs, NCCL on GPUs, HCCL on Ascend).
    """

    MPI = "mpi"
    TORCH = "torch"


class DeviceChoice(StrEnum):
    """Where a rank's tensors live (``mc2sim run --device``).

    Glossary: ``cpu`` is the host; ``cuda`` is the GPU of the rank's local rank (ranks on
    one host take its GPUs in turn, several ranks sharing one when there are fewer GPUs);
    ``auto`` is that GPU when the host has one (CUDA, else an Ascend ``npu``), else the
    host.
    """

    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


def rank_device(choice: str | DeviceChoice, param: str = "--device") -> torch.device:
    """This rank's device for ``choice``, made the current device of its kind.

    Args:
        choice: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        param: the parameter to name in an error.

    Returns:
        The device: ``cuda:<local rank mod GPUs>`` (or ``npu:...``) or ``cpu``.

    Raises:
        ParamInvalidError: an unknown choice, or ``cuda`` on a host without a CUDA GPU.
    """
    import torch

    try:
        chosen = DeviceChoice(choice)
    except ValueError:
        allowed = ", ".join(repr(c.value) for c in DeviceChoice)
        raise ParamInvalidError(param, choice, f"must be one of {allowed}") from None
    if chosen is DeviceChoice.CPU:
        return torch.device("cpu")
    kinds = ["cuda"] if chosen is DeviceChoice.CUDA else ["cuda", "npu"]
    for kind in kinds:
        module = getattr(torch, kind, None)
        if module is not None and module.is_available() and module.device_count() > 0:
            device = torch.device(kind, _local_rank() % module.device_count())
            module.set_device(device)
            return device
    if chosen is DeviceChoice.CUDA:
        raise ParamInvalidError(param, choice, "needs a CUDA GPU, and this host has none")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """``device`` in words, with its model for an accelerator: ``"cuda:0 (NVIDIA H200)"``."""
    import torch

    if device.type == "cpu":
        return "cpu"
    module = torch.get_device_module(device)
    name = getattr(module, "get_device_name", None)
    return f"{device} ({name(device)})" if name is not None else str(device)


def transport(comm: Communicator, device: torch.device) -> str:
    """How ``comm`` carries tensors of ``device``: its backend, and how MPI meets a device."""
    if comm.backend != "mpi" or device.type == "cpu":
        return comm.backend
    from mc2sim.comm.mpi import device_aware

    return "mpi (device-aware)" if device_aware(device) else "mpi (staged through host memory)"


def init(backend: str | Backend = "mpi", *, torch_backend: str | None = None) -> Communicator:
    """Return a communicator over all processes of the job.

    Args:
        backend: ``"mpi"`` for mpi4py or ``"torch"`` for torch.distributed.
        torch_backend: with ``backend="torch"``, the process-group backend; ``None`` picks
            ``nccl`` when CUDA is available with a GPU for each of this host's ranks,
            ``hccl`` when torch_npu is, else ``gloo``.

    Returns:
        A ``MpiCommunicator`` over ``MPI.COMM_WORLD`` or a ``TorchCommunicator`` over the
        default process group (initialised here if it is not yet: from torchrun's variables,
        or bootstrapped through MPI under mpiexec, or as a world of one).

    Raises:
        ParamInvalidError: unknown ``backend``, or ``nccl`` with more ranks on this host
            than GPUs.

    """
    try:
        chosen = Backend(backend)
    except ValueError:
        allowed = ", ".join(repr(b.value) for b in Backend)
        raise ParamInvalidError("backend", backend, f"must be one of {allowed}") from None
    if chosen is Backend.MPI:
        from mc2sim.comm.mpi import MpiCommunicator

        return MpiCommunicator()
    return _init_torch(torch_backend)


def _default_torch_backend() -> str:
    import torch

    if torch.cuda.is_available() and _local_size() <= torch.cuda.device_count():
        return "nccl"  # one GPU per rank; ranks sharing a GPU fall back to gloo
    if hasattr(torch, "npu"):  # pragma: no cover - torch_npu registers torch.npu on Ascend
        return "hccl"
    return "gloo"


def _local_rank() -> int:
    for var in _LOCAL_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _local_size() -> int:
    for var in _LOCAL_SIZE_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 1


def _one_gpu_per_rank() -> None:
    """Refuse NCCL when this host's ranks outnumber its GPUs (NCCL needs a GPU per rank)."""
    import torch

    ranks, gpus = _local_size(), torch.cuda.device_count()
    if ranks > gpus:
        raise ParamInvalidError(
            "torch_backend",
            "nccl",
            f"needs one GPU per rank: {ranks} ranks share {gpus} GPU(s) on this host; use the "
            "mpi backend, which stages device tensors through host memory",
        )


def _init_torch(torch_backend: str | None) -> Communicator:
    import torch
    import torch.distributed as dist

    from mc2sim.comm.torch_dist import TorchCommunicator

    if dist.is_initialized():
        return TorchCommunicator()
    pg_backend = torch_backend or _default_torch_backend()
    if pg_backend == "nccl":  # each process drives one GPU
        _one_gpu_per_rank()
        torch.cuda.set_device(_local_rank() % torch.cuda.device_count())
    launcher = detect_launcher()
    # Tear the group down before the interpreter exits: gloo's and the TCP store's threads
    # otherwise die unjoined and the process aborts with status 6 after a clean run.
    atexit.register(_destroy_torch_group)
    if launcher is Launcher.TORCHRUN:
        dist.init_process_group(pg_backend)
    elif launcher is Launcher.MPIEXEC:
        store, rank, size = _store_through_mpi()
        dist.init_process_group(pg_backend, store=store, rank=rank, world_size=size)
    else:
        lone = dist.HashStore()  # type: ignore[attr-defined]
        dist.init_process_group(pg_backend, store=lone, rank=0, world_size=1)
    return TorchCommunicator()


def _destroy_torch_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _store_through_mpi() -> tuple[Store, int, int]:
    """Start torch.distributed's TCP store on rank 0 and tell every rank where it is, via MPI.

    Rank 0 binds the store to a free port (no race on choosing one); the address is the
    loopback when all ranks share rank 0's host, else rank 0's resolved host name.
    """
    import torch.distributed as dist
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    hosts = world.allgather(socket.gethostname())
    if all(h == hosts[0] for h in hosts):
        addr = "127.0.0.1"
    else:  # pragma: no cover - multi-node
        addr = socket.gethostbyname(hosts[0])
    if rank == 0:
        master = dist.TCPStore(  # type: ignore[attr-defined]
            addr, 0, size, is_master=True, wait_for_workers=False
        )
        world.bcast(master.port, root=0)
        return master, rank, size
    port = world.bcast(None, root=0)
    client = dist.TCPStore(addr, port, size, is_master=False)  # type: ignore[attr-defined]
    return client, rank, size
