"""The command line's input checks on real ranks: one rank's bad input stops every rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from mc2sim.cli import InputError, _checking
from mc2sim.comm import Communicator
from mc2sim.errors import ParamInvalidError

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(90)]


def test_checks_that_pass_everywhere_let_every_rank_on(comm: Communicator) -> None:
    with _checking(comm):
        pass
    comm.barrier()


def test_a_bad_input_seen_by_one_rank_stops_every_rank(comm: Communicator) -> None:
    last = comm.size - 1
    with pytest.raises(InputError) as info:
        with _checking(comm):
            if comm.rank == last:  # e.g. a path only this rank's host cannot write
                raise ParamInvalidError("--out", "/results", "cannot be written here")
    assert str(info.value) == "--out='/results': cannot be written here"
    assert info.value.error.rank == last
    comm.barrier()  # nobody was left behind in a collective


def test_an_os_error_on_one_rank_is_an_input_error_everywhere(comm: Communicator) -> None:
    with pytest.raises(InputError) as info:
        with _checking(comm):
            if comm.rank == 1:
                Path("/nonexistent/mc2sim/scenario.yaml").read_text()
    assert "/nonexistent/mc2sim/scenario.yaml" in str(info.value)
    assert "cannot be used" in str(info.value) and info.value.error.rank == 1
    comm.barrier()
