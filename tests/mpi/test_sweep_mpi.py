"""``mpiexec -n N mc2sim sweep``: the points dealt out over the ranks, one folder, the serial one's.

Every rank calls the command line; rank 0 also runs the same sweep as a lone process
(a subprocess outside the MPI job). Both folders must hold the same files with the same bytes,
but for what says when and in which kind of process they were written
(:data:`mc2sim.results.VOLATILE_MANIFEST_FIELDS`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mc2sim.cli import main
from mc2sim.comm import Communicator
from mc2sim.results import VOLATILE_MANIFEST_FIELDS, comparable_files, read_sweep

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]

# 5 points (not a multiple of 2 or 4: the last round is partial), MoE routing and a
# straggler, so every kind of file is written
ARGV = [
    "sweep", "seed_gmm_alltoallv_ep4", "--set", "scale=small", "--set", "routing.skew=0.5,1,1.5",
    "--set", "small.tokens=8,16", "--set", "stragglers.1.compute=1.5", "--no-plots",
]  # fmt: skip
LAUNCHER_VARS = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPIR_", "RANK", "WORLD_SIZE", "MPICH_")


def _lone_env() -> dict[str, str]:
    """This process's environment without the MPI launcher's variables: a lone process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_a_sweep_over_mpi_ranks_writes_the_serial_sweeps_folder(
    comm: Communicator, tmp_path: Path
) -> None:
    base = Path(comm.allgather_object(str(tmp_path))[0])
    out = base / "sweep"  # the same --out (it is in the manifest's argv) for both runs
    if comm.rank == 0:
        serial = subprocess.run(
            [sys.executable, "-m", "mc2sim", *ARGV, "--out", str(out)],
            env=_lone_env(), capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        assert serial.returncode == 0, serial.stderr
        out.rename(base / "serial")
    comm.barrier()
    assert main([*ARGV, "--out", str(out)]) == 0
    comm.barrier()
    if comm.rank == 0:
        points = read_sweep(out)
        assert points is not None and len(points) == 6
        spread, alone = comparable_files(out), comparable_files(base / "serial")
        assert sorted(spread) == sorted(alone)
        assert len([name for name in spread if name.endswith("ranks.csv")]) == 6
        differ = [name for name in spread if spread[name] != alone[name]]
        assert differ == []
        # and no more was left out than the fields named
        manifest = spread[f"{next(iter(points.values())).name}/manifest.json"].decode()
        assert all(f'"{key}"' not in manifest for key in VOLATILE_MANIFEST_FIELDS)
        assert '"argv"' in manifest and '"hosts"' in manifest and '"git_revision"' in manifest
    comm.barrier()
