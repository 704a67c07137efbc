"""Fixtures of the MPI tier: a communicator of each backend over all ranks."""

from __future__ import annotations

import pytest

from mc2sim.comm import Communicator, init


@pytest.fixture(scope="session", params=["mpi", "torch"])
def comm(request: pytest.FixtureRequest) -> Communicator:
    """Return a communicator over every rank of the job, once per backend."""
    return init(request.param)
