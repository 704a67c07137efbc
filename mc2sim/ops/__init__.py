"""Fused MC2 operators on real ranks: each composes mc2sim's kernels with a Communicator.

Argument names and order mirror torch_npu's, with ``comm`` in place of the ``hcom`` group
name. Every op checks its parameters on every rank and the ranks agree before any data moves:
a bad parameter on any rank raises the same error on all of them.

The ops are resolved on first use (:func:`__getattr__`): importing this package, or its
torch-free modules (:mod:`mc2sim.ops.spec`, the ``*_spec`` modules, :mod:`mc2sim.ops.registry`)
to plan and simulate, does not import torch or the kernels. A spec imports its op where it
runs it (``real_case``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mc2sim._lazy import lazy_names

if TYPE_CHECKING:
    from mc2sim.ops.attention import ifa_decode
    from mc2sim.ops.moe import alltoallv_gmm, gmm_alltoallv
    from mc2sim.ops.profile import HardwareProfile
    from mc2sim.ops.tp import MatmulMode, all_gather_matmul, matmul_reduce_scatter, mm_all_reduce

__all__ = [
    "HardwareProfile",
    "MatmulMode",
    "all_gather_matmul",
    "alltoallv_gmm",
    "gmm_alltoallv",
    "ifa_decode",
    "matmul_reduce_scatter",
    "mm_all_reduce",
]

_HOME = {
    "HardwareProfile": "profile",
    "MatmulMode": "tp",
    "all_gather_matmul": "tp",
    "alltoallv_gmm": "moe",
    "gmm_alltoallv": "moe",
    "ifa_decode": "attention",
    "matmul_reduce_scatter": "tp",
    "mm_all_reduce": "tp",
}
"""The module of :mod:`mc2sim.ops` that defines each public name."""

__getattr__, __dir__ = lazy_names(__name__, _HOME, __all__)
