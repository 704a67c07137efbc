"""Plans of tiles and their real execution: the overlap scheduler.

``mc2sim.schedule`` turns one fused-op call into a :class:`Plan` (a DAG of compute tiles and
comm chunks built from shapes alone) and runs it on the ranks with compute of tile i
overlapping the communication of tile i-1.
"""

from mc2sim.schedule.builders import (
    IfaShape,
    plan_all_gather_matmul,
    plan_alltoallv_gmm,
    plan_gmm_alltoallv,
    plan_ifa,
    plan_matmul_reduce_scatter,
    plan_mm_all_reduce,
)
from mc2sim.schedule.plan import Plan, Resource, Task, TaskKind
from mc2sim.schedule.tiling import Tiling, TilingMode, hardware_mm_all_reduce_tiles, tiling_of

__all__ = [
    "IfaShape",
    "Plan",
    "Resource",
    "Task",
    "TaskKind",
    "Tiling",
    "TilingMode",
    "hardware_mm_all_reduce_tiles",
    "plan_all_gather_matmul",
    "plan_alltoallv_gmm",
    "plan_gmm_alltoallv",
    "plan_ifa",
    "plan_matmul_reduce_scatter",
    "plan_mm_all_reduce",
    "tiling_of",
]
