"""``mc2sim check`` as a user launches it: verdicts, results folder, report; never a hang.

The planted bugs that end the job (a rank that never returns, a rank that raises while the
others wait for it in the implementation's collectives) run here, as their own ``mpiexec``
jobs, at 2 and 4 ranks: the job ends with one line naming the rank and exit status 3 (the
deadline) or 1 (the error), within the deadline plus 10 s. The verdicts of the other bugs
are asserted in tests/mpi/test_check_impl.py.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mc2sim.cli import main
from mc2sim.report import report

from .conftest import Result, launch, mpiexec

pytestmark = pytest.mark.timeout(300)

TIMEOUT_S = 5.0

SCENARIO = """
    name: check_mm
    description: a small MatmulAllReduce for mc2sim check
    op: mm_all_reduce
    ranks: 2
    dtype: bfloat16
    shape: {m: 64, k: 256, n: 256}
    quant: none
    tilings: [serial, 2]
    topology: this_machine
    standard: allclose
    repetitions: 2
"""

PLUGIN = "examples/mc2_plugin.py:mm_all_reduce"
BROKEN = "tests.mpi.broken_impls"


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "check_mm.yaml"
    path.write_text(textwrap.dedent(SCENARIO))
    return path


def check(n: int, scenario: Path, impl: str, *args: str) -> Result:
    return mpiexec(
        n, "-m", "mc2sim", "check", str(scenario), "--impl", impl, "--no-plots",
        "--timeout", str(TIMEOUT_S), *args, timeout=150,
    )  # fmt: skip


def lines_of(res: Result) -> list[str]:
    """mc2sim's own lines on stderr (a progress bar may precede one on its line)."""
    return [m.group(0) for m in re.finditer(r"mc2sim[ :].*", res.stderr.replace("\r", "\n"))]


@pytest.mark.parametrize("n", [2, 4])
def test_the_example_plugin_passes_and_report_shows_it_beside_the_tilings(
    n: int, scenario: Path, tmp_path: Path
) -> None:
    out = tmp_path / "checked"
    res = check(n, scenario, PLUGIN, "--out", str(out))
    assert res.returncode == 0, res.stderr
    label = f"impl {PLUGIN}"
    assert re.search(
        rf"^{re.escape(label)}\s+[\d.]+\s+-\s+-\s+-\s+-\s+[\d.]+\s+pass$", res.stdout, re.M
    )
    for r in range(n):
        assert f"{label}: rank {r}: pass: allclose (bfloat16) PASS" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    record = summary["implementations"][label]
    assert record["impl"] == PLUGIN and record["timed"] is True and record["device"] == "cpu"
    assert [v["rank"] for v in record["verdicts"]] == list(range(n))
    assert {r["run"]["tiling"] for r in summary["runs"]} == {"serial", "tiles=2", label}
    # the model's prediction of the same scenario, and report putting them side by side
    sim = tmp_path / "sim"
    argv = ["simulate", str(scenario), "--ranks", str(n), "--topology", "atlas_a2_8p"]
    assert main([*argv, "--out", str(sim), "--no-plots"]) == 0
    tables = report([out, sim], plots=False).tables
    assert re.search(rf"^{re.escape(label)}: measured [\d.]+ ms; model: ", tables, re.M)
    assert re.search(rf"^{re.escape(label)}\s+[\d.]+(\s+-){{4}}", tables, re.M)


@pytest.mark.parametrize("n", [2, 4])
def test_a_rank_that_never_returns_ends_the_job_naming_it(n: int, scenario: Path) -> None:
    start = time.monotonic()
    res = check(n, scenario, f"{BROKEN}:hangs_on_last_rank")
    assert res.returncode == 3, res.stderr
    assert time.monotonic() - start < TIMEOUT_S + 25
    lines = lines_of(res)
    assert len(lines) == 1, res.stderr
    assert "timeout" in lines[0] and str(n - 1) in lines[0]
    assert "Traceback" not in res.stderr


def test_a_call_that_never_returns_anywhere_ends_the_job(scenario: Path) -> None:
    res = check(2, scenario, f"{BROKEN}:hangs_everywhere")
    assert res.returncode == 3, res.stderr
    lines = lines_of(res)
    assert lines == [
        f"mc2sim: timeout: implementation {BROKEN}:hangs_everywhere did not return on rank 0 "
        f"within {TIMEOUT_S:g} s"
    ], res.stderr


@pytest.mark.parametrize("n", [2, 4])
def test_a_rank_that_raises_while_the_others_wait_ends_the_job_naming_it(
    n: int, scenario: Path
) -> None:
    res = check(n, scenario, f"{BROKEN}:raises_on_last_rank")
    assert res.returncode == 1, res.stderr
    lines = lines_of(res)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(
        f"mc2sim: rank {n - 1}/{n}: implementation {BROKEN}:raises_on_last_rank raised "
        "ValueError: boom on the last rank;"
    )
    assert "Traceback" not in res.stderr


def test_an_implementation_raising_everywhere_fails_with_its_verdicts(
    scenario: Path, tmp_path: Path
) -> None:
    out = tmp_path / "raised"
    res = check(2, scenario, f"{BROKEN}:raises_everywhere", "--out", str(out))
    assert res.returncode == 1, res.stderr
    assert f"impl {BROKEN}:raises_everywhere: rank 1: raised: ValueError: boom" in res.stdout
    assert "not timed" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    record = summary["implementations"][f"impl {BROKEN}:raises_everywhere"]
    assert record["timed"] is False
    assert [v["error"] for v in record["verdicts"]] == ["raised: ValueError: boom"] * 2


def test_an_unavailable_implementation_is_skipped_with_one_line(scenario: Path) -> None:
    res = check(2, scenario, f"{BROKEN}:not_here")
    assert res.returncode == 4, res.stderr
    assert lines_of(res) == [
        f"mc2sim check: skipped {BROKEN}:not_here: rank 0: needs libfoo, which is not installed"
    ]


@pytest.mark.parametrize(
    ("impl", "rule"),
    [
        ("no_colon", "must be MODULE:FUNCTION"),
        ("tests.mpi.broken_impls:nothing", "tests.mpi.broken_impls has no attribute 'nothing'"),
    ],
)
def test_a_bad_impl_is_one_line_and_status_2(scenario: Path, impl: str, rule: str) -> None:
    # every rule of --impl is in tests/unit/test_check.py; here the line as launched
    res = check(2, scenario, impl)
    assert res.returncode == 2, res.stderr
    lines = lines_of(res)
    assert len(lines) == 1 and lines[0].startswith(f"mc2sim check: --impl='{impl}': ")
    assert rule in lines[0]


def test_a_module_that_raises_on_import_is_an_input_error(scenario: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("raise RuntimeError('cannot load the kernel')\n")
    res = check(2, scenario, f"{bad}:f")
    assert res.returncode == 2, res.stderr
    assert lines_of(res) == [
        f"mc2sim check: --impl='{bad}:f': module '{bad}' cannot be imported: "
        "RuntimeError: cannot load the kernel"
    ]


def test_a_module_that_never_finishes_importing_ends_the_job_at_the_deadline(
    scenario: Path, tmp_path: Path
) -> None:
    stuck = tmp_path / "stuck_plugin.py"
    stuck.write_text("import time\ntime.sleep(3600)\n")
    res = launch(
        [sys.executable, "-m", "mc2sim", "check", str(scenario), "--impl", f"{stuck}:f",
         "--no-plots", "--timeout", str(TIMEOUT_S)],
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert lines_of(res) == [
        f"mc2sim: timeout: importing '{stuck}' did not return on rank 0 within {TIMEOUT_S:g} s"
    ]
    assert "Traceback" not in res.stderr


@pytest.mark.gpu
def test_a_cuda_implementation_is_checked_on_one_gpu(scenario: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    out = tmp_path / "cuda"
    res = check(1, scenario, PLUGIN, "--device", "cuda", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert f"impl {PLUGIN}: rank 0: pass: allclose (bfloat16) PASS" in res.stdout
    record = json.loads((out / "summary.json").read_text())["implementations"][f"impl {PLUGIN}"]
    assert record["device"] == "cuda:0" and record["timed"] is True
