"""Test configuration shared by every tier.

Tiers: plain unit tests (``pytest``), MPI tests (``mpiexec -n N python -m pytest --with-mpi``,
marked ``@pytest.mark.mpi(min_size=2)``), and end-to-end runs of the command line under
``mpiexec`` (``tests/e2e``). Under ``--with-mpi`` a failure on any rank aborts the whole job
after printing it, so a rank that failed alone never leaves the others waiting in a
collective; only rank 0 prints pytest's own report.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


def _with_mpi(config: pytest.Config) -> bool:
    return bool(config.getoption("with_mpi", default=False))


@pytest.hookimpl(trylast=True)  # after the terminal reporter registered itself
def pytest_configure(config: pytest.Config) -> None:
    if not _with_mpi(config):
        return
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() != 0:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not (report.failed and _with_mpi(item.config)):
        return
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() > 1:
        print(
            f"\n[rank {world.Get_rank()}/{world.Get_size()}] {item.nodeid} FAILED "
            f"({report.when}):\n{report.longreprtext}",
            file=sys.stderr,
            flush=True,
        )
        world.Abort(1)
