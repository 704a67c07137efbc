"""Fused MC2 operators on real ranks: each composes mc2sim's kernels with a Communicator.

Argument names and order mirror torch_npu's, with ``comm`` in place of the ``hcom`` group
name. Every op checks its parameters on every rank and the ranks agree before any data moves:
a bad parameter on any rank raises the same error on all of them.
"""

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
