"""The cost model: plans timed on described topologies, simulated event by event.

``simulate(plans, topology)`` runs the very Plans the real executor runs and returns the same
``Timeline`` type, so metrics and trace writers serve both.
"""

from mc2sim.model.cost import (
    allgather_time,
    allreduce_time,
    alltoallv_time,
    compute_time,
    reduce_scatter_time,
)
from mc2sim.model.simulator import simulate

__all__ = [
    "allgather_time",
    "allreduce_time",
    "alltoallv_time",
    "compute_time",
    "reduce_scatter_time",
    "simulate",
]
