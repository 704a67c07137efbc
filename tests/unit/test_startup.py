"""The commands that run no kernel start without torch.

Each runs in a fresh interpreter (this one has torch imported already) through
:func:`mc2sim.cli.main`, which then prints whether ``torch`` (or ``mpi4py``) is in
``sys.modules``: the oracle is the interpreter's own record of what was imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import sys
from mc2sim.cli import main
status = main(sys.argv[1:])
print("STATUS", status, "torch" in sys.modules, "mpi4py" in sys.modules)
"""


def _imports_after(args: list[str]) -> tuple[int, bool, bool]:
    """Run ``mc2sim ARGS`` in a fresh interpreter; its status, whether torch and mpi4py loaded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MC2SIM_TIMEOUT", None)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("STATUS ")]
    assert lines, done.stdout + done.stderr
    _, status, torch, mpi = lines[-1].split()
    return int(status), torch == "True", mpi == "True"


def _commands(tmp: Path) -> dict[str, list[str]]:
    counts = tmp / "counts.json"
    counts.write_text(
        json.dumps(
            {
                "experts_per_rank": 1,
                "send_counts": [[1, 2], [3, 4]],
                "recv_counts": [[1, 3], [2, 4]],
            }
        ),  # fmt: skip
        encoding="utf-8",
    )
    sim = ["simulate", "seed_gmm_alltoallv_ep4", "--no-plots", "--out", str(tmp / "sim")]
    return {
        "simulate": sim,
        "simulate --what-if": [
            "simulate",
            "deepseek_v3_combine_ep32",
            "--what-if",
            "--ranks",
            "64",
            "--no-plots",
            "--out",
            str(tmp / "what-if"),
        ],  # fmt: skip
        "sweep": [
            "sweep",
            "seed_gmm_alltoallv_ep4",
            "--set",
            "routing.skew=0,1",
            "--no-plots",
            "--out",
            str(tmp / "sweep"),
        ],  # fmt: skip
        "report": ["report", str(tmp / "sim"), "--out", str(tmp)],  # after "simulate"
        "check-counts": ["check-counts", str(counts)],
    }


@pytest.mark.parametrize("command", ["simulate", "simulate --what-if", "sweep", "check-counts"])
def test_a_command_that_runs_no_kernel_imports_neither_torch_nor_mpi4py(
    command: str, tmp_path: Path
) -> None:
    status, torch, mpi = _imports_after(_commands(tmp_path)[command])
    assert status == 0
    assert not torch, f"mc2sim {command} imported torch"
    assert not mpi, f"mc2sim {command} imported mpi4py"


def test_report_of_a_simulation_imports_no_torch(tmp_path: Path) -> None:
    commands = _commands(tmp_path)
    assert _imports_after(commands["simulate"])[0] == 0
    status, torch, _ = _imports_after(commands["report"])
    assert status == 0
    assert not torch
    assert sorted(p.name for p in tmp_path.glob("*.png")), "report drew no plot"


def test_an_op_is_resolved_on_first_use_and_brings_torch_then() -> None:
    """The counterpart: the lazy package still gives the op, and the op needs torch."""
    probe = (
        "import sys, mc2sim.ops, mc2sim.ops.registry, mc2sim.comm\n"
        "before = 'torch' in sys.modules\n"
        "op = mc2sim.ops.gmm_alltoallv\n"
        "from mc2sim.ops.moe import gmm_alltoallv\n"
        "print(before, 'torch' in sys.modules, op is gmm_alltoallv,"
        " mc2sim.comm.Communicator.__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["False", "True", "True", "mc2sim.comm.base"]
