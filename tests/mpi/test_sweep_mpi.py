"""``mpiexec -n N mc2sim sweep``: the points dealt out over the ranks, one folder, the serial one's.

Every rank calls the command line; rank 0 also runs the same sweep as a lone process
(a subprocess outside the MPI job). Both folders must hold the same files with the same bytes,
but for what says when and in which kind of process they were written
(:data:`mc2sim.results.VOLATILE_MANIFEST_FIELDS`): when each rank writes its own points (the
ranks share the disk, as here) and when rank 0 writes them all (ranks told they do not).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mc2sim.cli
import mc2sim.results
from mc2sim.cli import main
from mc2sim.comm import Communicator, MpiObjectCommunicator
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


@pytest.mark.parametrize("shared", [True, False], ids=["each-rank-writes", "rank-0-writes"])
def test_a_sweep_over_mpi_ranks_writes_the_serial_sweeps_folder(
    comm: Communicator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool
) -> None:
    seen: list[bool] = []
    sees = mc2sim.cli._sees_folder

    def told(group: MpiObjectCommunicator, out: Path) -> bool:
        seen.append(sees(group, out))
        return shared

    monkeypatch.setattr(mc2sim.cli, "_sees_folder", told)
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
    assert seen == [True]  # one host: every rank saw rank 0's folder
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


def test_the_ranks_see_rank_0s_folder_only_where_it_is_theirs_too(
    comm: Communicator, tmp_path: Path
) -> None:
    group = MpiObjectCommunicator()
    common = Path(group.allgather_object(str(tmp_path))[0]) / "shared"
    assert mc2sim.cli._sees_folder(group, common) is True
    group.barrier()  # rank 0 removed its probe before it returned
    assert list(common.iterdir()) == []  # the folder stays, empty
    group.barrier()  # every rank has looked before rank 0 writes its next probe there
    # rank 1 looks into a folder of its own: as on a host without rank 0's disk
    own = common if group.rank != 1 else tmp_path / "elsewhere"
    assert mc2sim.cli._sees_folder(group, own) is False
    comm.barrier()


@pytest.mark.parametrize("shared", [True, False], ids=["each-rank-writes", "rank-0-writes"])
def test_a_folder_that_cannot_be_written_ends_the_sweep_on_every_rank(
    comm: Communicator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    shared: bool,
) -> None:
    """The error is the first such point's in the grid, as the lone sweep's, on any rank."""
    monkeypatch.setattr(mc2sim.cli, "_sees_folder", lambda group, out: shared)
    write = mc2sim.results.write_encoded
    # points 3 and 5 of 6, dealt in snake order to two different ranks (0 and 1 of 2; 3 and 2
    # of 4): neither the lowest nor the highest failing rank's error is the first point's
    full = ("routing.skew=1,small.tokens=16", "routing.skew=1.5,small.tokens=16")

    def full_disk(folder: Path, files: dict[str, bytes], **kwargs: bool) -> object:
        if Path(folder).name.startswith(full):  # whichever rank writes these points
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        return write(folder, files, **kwargs)

    monkeypatch.setattr(mc2sim.results, "write_encoded", full_disk)
    out = Path(comm.allgather_object(str(tmp_path))[0]) / "sweep"
    assert main([*ARGV, "--out", str(out)]) == 2  # on every rank, none left waiting
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mc2sim")]
    if comm.rank == 0:
        folder = out / full[0]  # the first such point in the grid, whichever rank wrote it
        assert err == [
            f"mc2sim sweep: {folder}={str(folder)!r}: cannot be used: No space left on device"
        ]
    else:
        assert err == []
    comm.barrier()


def test_every_rank_writes_into_rank_0s_folder(
    comm: Communicator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0's --out is the one every rank writes into (a default one is named by its clock)."""
    seen: list[bool] = []
    sees = mc2sim.cli._sees_folder

    def spied(group: MpiObjectCommunicator, out: Path) -> bool:
        seen.append(sees(group, out))
        return seen[-1]

    monkeypatch.setattr(mc2sim.cli, "_sees_folder", spied)
    base = Path(comm.allgather_object(str(tmp_path))[0])
    out = base / ("sweep" if comm.rank == 0 else f"elsewhere-{comm.rank}")
    assert main([*ARGV, "--out", str(out)]) == 0
    assert seen == [True]
    comm.barrier()
    assert sorted(p.name for p in base.iterdir()) == ["sweep"]
    points = read_sweep(base / "sweep")
    assert points is not None and len(points) == 6
    assert all((folder / "complete.json").is_file() for folder in points.values())
    comm.barrier()
