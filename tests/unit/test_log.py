import logging

import pytest

from mc2sim.log import get_logger, setup_logging


def test_prefix_and_rank_zero_level(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mc2sim.log.world_position", lambda: (0, 4))
    setup_logging()
    get_logger("schedule").info("hello")
    assert "[rank 0/4] INFO mc2sim.schedule: hello" in capsys.readouterr().err


def test_other_ranks_only_warn(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mc2sim.log.world_position", lambda: (2, 4))
    setup_logging()
    log = get_logger("mc2sim.comm")
    log.info("quiet")
    log.warning("loud")
    err = capsys.readouterr().err
    assert "quiet" not in err
    assert "[rank 2/4] WARNING mc2sim.comm: loud" in err
    setup_logging(logging.DEBUG, all_ranks=True)
    log.debug("detail")
    assert "[rank 2/4] DEBUG mc2sim.comm: detail" in capsys.readouterr().err
