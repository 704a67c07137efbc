"""``mc2sim check``'s study on real ranks: the example plugin passes, each planted bug is caught.

Every test runs :func:`mc2sim.study.check.check_implementation` on every rank (both
backends) with a small scenario, one tiling and one timed round, and asserts every rank's
verdict, on every rank: the verdicts are gathered and compared, so no rank may hold another
story. The golden is mc2sim's float64 one; the correct versions of the same arithmetic pass,
so each failure is the bug's.

The "missing per-rank rounding" bug is caught only where the precision standard can see it:
at float16 under ``double_thousandths`` (at most 0.1% of elements off by more than 1e-3
relative), (64, 256) x (256, 256) on 2 or 4 ranks, about 7% of the elements are off (the
per-rank rounding is worth up to 2^-12 of each rank's partial, and the partials cancel);
under ``allclose`` (0.005 + 0.005 |golden|) it would pass.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mc2sim.comm import Communicator
from mc2sim.scenario import Scenario, load
from mc2sim.study.check import CheckedStudy, Outcome, check_implementation

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

MM = """
    name: check_mm
    description: a small MatmulAllReduce for mc2sim check
    op: mm_all_reduce
    ranks: 2
    dtype: bfloat16
    shape: {m: 64, k: 256, n: 256}
    quant: none
    tilings: [serial]
    topology: this_machine
    standard: allclose
    repetitions: 1
"""

MOE = """
    name: check_moe
    description: a small MoE op for mc2sim check
    op: alltoallv_gmm
    ranks: 2
    dtype: bfloat16
    shape: {tokens: 16, top_k: 2, experts_per_rank: 2, h1: 32, n1: 32}
    quant: none
    routing: {kind: uniform, seed: 3}
    tilings: [serial]
    topology: this_machine
    standard: allclose
    repetitions: 1
"""

BROKEN = "tests.mpi.broken_impls"


def scenario(comm: Communicator, text: str, tmp: Path, *overrides: str) -> Scenario:
    path = tmp / f"scenario_{comm.rank}.yaml"
    path.write_text(textwrap.dedent(text))
    return load(path, overrides)


@pytest.fixture
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("check")


def run(comm: Communicator, sc: Scenario, impl: str) -> CheckedStudy:
    result = check_implementation(sc, impl, comm)
    # every rank holds every rank's verdict, and the same ones
    mine = [(v.rank, v.outcome, v.detail) for v in result.verdicts]
    assert comm.allgather_object(mine) == [mine] * comm.size
    assert [v.rank for v in result.verdicts] == list(range(comm.size)) or result.skipped
    return result


def outcomes(result: CheckedStudy) -> list[Outcome]:
    return [v.outcome for v in result.verdicts]


def test_the_example_plugin_passes_on_every_rank_and_is_timed(
    comm: Communicator, tmp: Path
) -> None:
    result = run(comm, scenario(comm, MM, tmp), "examples/mc2_plugin.py:mm_all_reduce")
    assert outcomes(result) == [Outcome.PASS] * comm.size
    assert result.passed and result.timed
    assert result.measured is not None
    run_key = result.measured.runs["impl examples/mc2_plugin.py:mm_all_reduce"]
    tasks = result.measured.timeline.for_run(run_key).records
    assert sorted(t.rank for t in tasks) == list(range(comm.size))  # one task per rank
    assert all(t.kind == "implementation" and t.duration_s > 0 for t in tasks)
    assert result.record is not None and result.record.passed


@pytest.mark.parametrize("op", ["alltoallv_gmm", "gmm_alltoallv"])
def test_the_example_plugin_passes_the_moe_ops(comm: Communicator, tmp: Path, op: str) -> None:
    sc = scenario(comm, MOE, tmp, f"op={op}", "shape.h2=32", "shape.n2=16")
    result = run(comm, sc, f"examples/mc2_plugin.py:{op}")
    assert outcomes(result) == [Outcome.PASS] * comm.size


def test_experts_left_in_rank_order_are_caught(comm: Communicator, tmp: Path) -> None:
    sc = scenario(comm, MOE, tmp)
    assert outcomes(run(comm, sc, f"{BROKEN}:dispatch_correct")) == [Outcome.PASS] * comm.size
    result = run(comm, sc, f"{BROKEN}:dispatch_rank_order")
    assert outcomes(result) == [Outcome.MISMATCH] * comm.size
    for v in result.verdicts:
        assert v.verdict is not None and v.verdict.worst  # the worst element and its index
        assert len(v.verdict.worst[0].index) == 2
    assert result.timed and not result.passed  # a wrong answer of the op's form is timed


def test_a_missing_per_rank_rounding_is_caught_by_double_thousandths(
    comm: Communicator, tmp: Path
) -> None:
    sc = scenario(comm, MM, tmp, "dtype=float16", "standard=double_thousandths")
    fixed = run(comm, sc, f"{BROKEN}:mm_rounded_per_rank")
    assert outcomes(fixed) == [Outcome.PASS] * comm.size
    result = run(comm, sc, f"{BROKEN}:mm_no_rounding")
    assert outcomes(result) == [Outcome.MISMATCH] * comm.size
    verdict = result.verdicts[0].verdict
    assert verdict is not None and verdict.mismatch_fraction > 0.01  # far past 0.1%
    # the same bug passes the looser allclose standard: the scenario's standard decides
    loose = scenario(comm, MM, tmp, "dtype=float16")
    assert outcomes(run(comm, loose, f"{BROKEN}:mm_no_rounding")) == [Outcome.PASS] * comm.size


def test_a_wrong_per_group_scale_index_is_caught(comm: Communicator, tmp: Path) -> None:
    sc = scenario(comm, MM, tmp, "quant=weight_int8", "shape.group_size=64")
    assert outcomes(run(comm, sc, f"{BROKEN}:group_quant_correct")) == [Outcome.PASS] * comm.size
    result = run(comm, sc, f"{BROKEN}:group_quant_wrong_index")
    assert outcomes(result) == [Outcome.MISMATCH] * comm.size


def test_a_rank_returning_another_shape_is_named_on_every_rank(
    comm: Communicator, tmp: Path
) -> None:
    last = comm.size - 1
    result = run(comm, scenario(comm, MM, tmp), f"{BROKEN}:short_on_last_rank")
    assert outcomes(result) == [Outcome.PASS] * last + [Outcome.SHAPE]
    assert result.verdicts[last].detail == "returned shape (63, 256), expected (64, 256)"
    assert not result.timed and not result.passed
    assert result.record is not None
    assert result.record.verdicts[last].error == (
        "shape: returned shape (63, 256), expected (64, 256)"
    )


def test_a_rank_returning_another_dtype_is_named(comm: Communicator, tmp: Path) -> None:
    result = run(comm, scenario(comm, MM, tmp), f"{BROKEN}:float32_on_last_rank")
    assert outcomes(result)[-1] is Outcome.DTYPE
    assert result.verdicts[-1].detail == "returned dtype float32, expected bfloat16"


def test_a_tensor_for_the_ops_tuple_is_a_form_error(comm: Communicator, tmp: Path) -> None:
    result = run(comm, scenario(comm, MOE, tmp), f"{BROKEN}:tensor_for_tuple")
    assert outcomes(result) == [Outcome.FORM] * comm.size
    assert "alltoallv_gmm returns a tuple of 3" in result.verdicts[0].detail


def test_an_implementation_raising_everywhere_gets_its_error_on_every_rank(
    comm: Communicator, tmp: Path
) -> None:
    result = run(comm, scenario(comm, MM, tmp), f"{BROKEN}:raises_everywhere")
    assert outcomes(result) == [Outcome.RAISED] * comm.size
    assert {v.detail for v in result.verdicts} == {"ValueError: boom"}
    assert not result.timed
    dataless = run(comm, scenario(comm, MM, tmp), f"{BROKEN}:meta_output")
    assert outcomes(dataless) == [Outcome.RAISED] * comm.size  # its output cannot be read
    exited = run(comm, scenario(comm, MM, tmp), f"{BROKEN}:exits_everywhere")
    assert [(v.outcome, v.detail) for v in exited.verdicts] == [
        (Outcome.RAISED, "SystemExit: 3")
    ] * comm.size


def test_an_unavailable_implementation_is_skipped_with_its_reason(
    comm: Communicator, tmp: Path
) -> None:
    sc = scenario(comm, MM, tmp)
    raised = run(comm, sc, f"{BROKEN}:not_here")
    assert raised.skipped == "rank 0: needs libfoo, which is not installed"
    probed = run(comm, sc, f"{BROKEN}:probed_away")
    assert probed.skipped == f"rank {comm.size - 1}: no device here"
    assert probed.verdicts == () and probed.measured is None and not probed.passed


def test_an_implementation_writing_into_its_inputs_leaves_the_tilings_theirs(
    comm: Communicator, tmp: Path
) -> None:
    result = run(comm, scenario(comm, MM, tmp, "tilings=serial,2"), f"{BROKEN}:writes_into_x1")
    assert outcomes(result) == [Outcome.PASS] * comm.size
    assert result.measured is not None and result.measured.passed  # mc2sim's own, after it


def test_ranks_naming_different_implementations_all_get_the_error(
    comm: Communicator, tmp: Path
) -> None:
    from mc2sim.errors import ParamInvalidError

    sc = scenario(comm, MM, tmp)
    mine = (
        f"{BROKEN}:mm_no_rounding"
        if comm.rank == comm.size - 1
        else f"{BROKEN}:mm_rounded_per_rank"
    )
    with pytest.raises(ParamInvalidError) as info:
        check_implementation(sc, mine, comm)
    assert info.value.param == "impl" and info.value.rank == comm.size - 1
    assert "every rank runs the same implementation" in info.value.rule
    with pytest.raises(ParamInvalidError) as bad:
        check_implementation(sc, "no_colon" if comm.rank == 0 else f"{BROKEN}:mm_no_rounding", comm)
    assert bad.value.param == "impl" and "must be MODULE:FUNCTION" in bad.value.rule
