"""``simulate --what-if`` and ``sweep --what-if``: hardware limits lifted, one warning each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mc2sim.cli import main
from mc2sim.results import read_results


def test_simulate_what_if_warns_once_per_lifted_limit_and_records_the_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", "seed_gmm_alltoallv_ep4", "--what-if", "--ranks", "128",
            "--set", "scale=small", "--set", "small.h1=70000", "--set", "shape.h1=70000",
            "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if "warning: what-if lifts" in line]
    # e (4) x 128 = 512 > 256 and H1 = 70000 > 65535: two limits, once each (the full and
    # small shapes both break H1, and the scenario's own ranks do not break e x world)
    assert len(warnings) == 2, err
    assert any("e * ep_world_size must be in [1, 256]" in w for w in warnings)
    assert any("H1 must be in [1, 65535]" in w for w in warnings)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "limits=what-if" in manifest["overrides"]
    assert read_results(out).manifest.world_size == 128


def test_strict_is_silent_and_what_if_without_a_lifted_limit_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["simulate", "seed_gmm_alltoallv_ep4", "--set", "scale=small", "--no-plots"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--what-if", "--out", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err
    a = read_results(tmp_path / "a").totals()
    assert a == read_results(tmp_path / "b").totals()  # the profile never changes a workload
