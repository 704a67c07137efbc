"""Each operator limit is written once.

Scenario validation and the op's own check refuse the same out-of-range value with the same
error class, code, value and rule.

The scenario side builds a :class:`~mc2sim.scenario.Scenario` (as a file would); the op side
calls the op on one rank of a group whose ranks all pass the same (no MPI). Only the
parameter's name differs: where the value was met.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from mc2sim import limits, ops
from mc2sim.errors import AclnnError, ParamInvalidError
from mc2sim.scenario import OpName, Scenario

from .fakes import SameOnEveryRank

BF16 = torch.bfloat16

MOE: dict[str, Any] = {
    "name": "t",
    "description": "limits",
    "op": "gmm_alltoallv",
    "ranks": 2,
    "dtype": "bfloat16",
    "shape": {"tokens": 4, "top_k": 2, "experts_per_rank": 2, "h1": 8, "n1": 4},
    "tilings": ("serial",),
}
TP: dict[str, Any] = {**MOE, "op": "mm_all_reduce", "shape": {"m": 4, "k": 8, "n": 8}}
IFA: dict[str, Any] = {
    **MOE,
    "op": "ifa",
    "shape": {
        "batch": 2,
        "heads": 8,
        "kv_heads": 2,
        "head_dim": 16,
        "kv_len": 32,
        "block_size": 16,
    },
}


def scenario_error(base: dict[str, Any], **shape: int) -> AclnnError:
    with pytest.raises(AclnnError) as info:
        Scenario(**{**base, "shape": {**base["shape"], **shape}})
    return info.value


def op_error(call: Callable[[], object]) -> AclnnError:
    with pytest.raises(AclnnError) as info:
        call()
    return info.value


def combine(
    *, world: int = 2, e: int = 2, h1: int = 8, n1: int = 4, rows: int = 2, **kw: Any
) -> Callable[[], object]:
    counts = [rows] * (world * e)
    return lambda: ops.gmm_alltoallv(
        torch.zeros(sum(counts), h1, dtype=BF16),
        torch.zeros(e, h1, n1, dtype=BF16),
        SameOnEveryRank(world),
        world,
        counts,
        list(counts),
        **kw,
    )


def ifa(num_heads: int, num_key_value_heads: int) -> Callable[[], object]:
    dim, block = 16, 16
    return lambda: ops.ifa_decode(
        torch.zeros(1, 1, num_heads * dim, dtype=BF16),
        torch.zeros(2, block, num_key_value_heads * dim, dtype=BF16),
        torch.zeros(2, block, num_key_value_heads * dim, dtype=BF16),
        SameOnEveryRank(1),
        block_table=torch.zeros(1, 1, dtype=torch.int32),
        actual_seq_lengths=[block],
        num_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
        block_size=block,
    )


CASES = [
    ("H1", MOE, {"h1": 65536}, combine(h1=65536), limits.H1),
    ("N1", MOE, {"n1": 65536}, combine(n1=65536), limits.N1),
    ("e", MOE, {"experts_per_rank": 33}, combine(e=33, rows=1), limits.E),
    (
        "H2",
        {**MOE, "shape": {**MOE["shape"], "n2": 4}},
        {"h2": 12289},
        combine(
            mm_x=torch.zeros(4, 12289, dtype=BF16), mm_weight=torch.zeros(12289, 4, dtype=BF16)
        ),
        limits.H2,
    ),
    (
        "top-K",
        {**MOE, "ranks": 1, "shape": {**MOE["shape"], "experts_per_rank": 9, "tokens": 1}},
        {"top_k": 9},
        combine(
            world=1,
            e=9,
            rows=1,
            mm_x=torch.zeros(1, 8, dtype=BF16),
            mm_weight=torch.zeros(8, 4, dtype=BF16),
        ),
        limits.TOP_K,
    ),
    (
        "mm n",
        TP,
        {"n": 65536},
        lambda: ops.mm_all_reduce(
            torch.zeros(4, 8, dtype=BF16), torch.zeros(8, 65536, dtype=BF16), SameOnEveryRank(2)
        ),
        limits.MM_N,
    ),
    (
        "all_gather k",
        {**TP, "op": "all_gather_matmul", "shape": {"m": 4, "k": 256, "n": 8}},
        {"k": 128},
        lambda: ops.all_gather_matmul(
            torch.zeros(4, 128, dtype=BF16), torch.zeros(128, 8, dtype=BF16), SameOnEveryRank(2), 2
        ),
        limits.TP_K,
    ),
    ("ifa heads", IFA, {"heads": 264, "kv_heads": 264}, ifa(264, 264), limits.IFA_HEADS),
    ("ifa group", IFA, {"heads": 128, "kv_heads": 1}, ifa(128, 1), limits.IFA_GROUP),
]


@pytest.mark.parametrize(
    ("base", "shape", "call", "limit"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_scenario_and_op_refuse_the_same_value_with_the_same_code_and_rule(
    base: dict[str, Any],
    shape: dict[str, int],
    call: Callable[[], object],
    limit: limits.Range,
) -> None:
    from_scenario = scenario_error(base, **shape)
    from_op = op_error(call)
    assert type(from_scenario) is type(from_op) is ParamInvalidError
    assert from_scenario.code == from_op.code == 161002
    assert from_scenario.rule == from_op.rule == limit.rule
    assert from_scenario.value == from_op.value
    assert from_scenario.param.startswith("shape.")  # where it was met: the file's key
    # and the rule states the bounds of the one table
    assert f"[{limit.low}, {limit.high}]" in from_op.rule


def test_a_range_names_its_bounds_and_refuses_non_integers() -> None:
    h1 = limits.H1
    assert h1.check("H1", 65535) == 65535 and h1.check("H1", 1) == 1
    for bad in (0, 65536):
        with pytest.raises(ParamInvalidError, match=r"H1=\d+: H1 must be in \[1, 65535\]"):
            h1.check("H1", bad)
    for not_an_int in (True, 2.0, "8"):
        with pytest.raises(ParamInvalidError, match="must be an integer"):
            h1.check("H1", not_an_int)


# ------------------------------------------------------------------ profiles: strict, what-if


def test_the_limits_doc_is_the_code_table() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "LIMITS.md").read_text()
    between = doc.split("<!-- limits-table: begin -->\n")[1].split("<!-- limits-table: end -->")[0]
    assert between == limits.table_markdown()
    # every row has one of the two kinds, and both kinds occur
    kinds = [row.rsplit("|", 2)[1].strip() for row in between.splitlines()[2:]]
    assert set(kinds) == {"semantic", "hardware"}
    assert len(kinds) == len(limits.TABLE)


def test_every_range_the_specs_use_is_in_the_table_once() -> None:
    ranges = [v for v in vars(limits).values() if isinstance(v, (limits.Range, limits.Rule))]
    for item in ranges:
        assert sum(x is item for x in limits.TABLE) == 1, item.name


def _moe(**changes: Any) -> Scenario:
    fields: dict[str, Any] = {
        "name": "t", "description": "", "op": "gmm_alltoallv", "ranks": 4, "dtype": "float16",
        "shape": {"tokens": 16, "top_k": 2, "experts_per_rank": 4, "h1": 64, "n1": 32},
        "tilings": ("serial",), "topology": "atlas_a2_8p",
    }  # fmt: skip
    fields.update(changes)
    return Scenario(**fields)


def test_what_if_lifts_hardware_limits_and_notes_each_once() -> None:
    # 70000 > 65535 (H1) and 4 experts x 128 ranks = 512 > 256: both hardware limits
    shape = {"tokens": 16, "top_k": 2, "experts_per_rank": 4, "h1": 70000, "n1": 32}
    with pytest.raises(ParamInvalidError, match=r"shape.h1=70000: H1 must be in \[1, 65535\]"):
        _moe(shape=shape)
    with pytest.raises(ParamInvalidError) as err:
        _moe(ranks=128)
    assert err.value.code == 161002 and "e * ep_world_size must be in [1, 256]" in str(err.value)
    sc = _moe(shape=shape, ranks=128, limits="what-if")
    lifted = sc.lifted()
    assert [(x.param, x.value) for x in lifted] == [("shape.h1", 70000), ("ranks", 128)]
    assert sc.world_size(1024, "--ranks") == 1024
    assert [x.param for x in sc.lifted(1024, "--ranks")] == ["shape.h1", "--ranks"]
    assert _moe().lifted() == ()  # strict: nothing is ever lifted


def test_what_if_keeps_semantic_limits() -> None:
    # top_k 9 lifts top-K's [2, 8] but 9 distinct experts cannot be drawn from 4 x 2 = 8
    shape = {"tokens": 16, "top_k": 9, "experts_per_rank": 4, "h1": 64, "n1": 32}
    with pytest.raises(ParamInvalidError, match=r"top_k \(9\) must be <= experts_per_rank"):
        _moe(shape=shape, ranks=2, limits="what-if")
    assert _moe(shape=shape, ranks=3, limits="what-if").lifted()[0].param == "shape.top_k"
    # a lifted range still needs a positive size; the shared expert needs both sizes
    lifted = limits.Policy(profile=limits.LimitProfile.WHAT_IF)
    with pytest.raises(ParamInvalidError, match=r"must be in \[1, 2\*\*62\)"):
        limits.H1.check("h1", 0, lifted)
    # and below 2**62: a size of hundreds of digits would overflow the planners' floats
    with pytest.raises(ParamInvalidError, match=r"h1=10000000000.*must be in \[1, 2\*\*62\)"):
        limits.H1.check("h1", 10**400, lifted)
    assert limits.H1.check("h1", 2**62 - 1, lifted) == 2**62 - 1
    with pytest.raises(ParamInvalidError, match="needs both h2 and n2"):
        _moe(shape={**shape, "top_k": 2, "h2": 8}, limits="what-if")
    with pytest.raises(ParamInvalidError, match="must be a multiple of ranks"):
        Scenario(
            name="t", description="", op=OpName.MATMUL_REDUCE_SCATTER, ranks=3, dtype="float16",
            shape={"m": 8, "k": 256, "n": 8}, tilings=("serial",), topology="atlas_a2_8p",
            limits=limits.LimitProfile.WHAT_IF,
        )  # fmt: skip


def test_a_what_if_profile_is_refused_by_its_name() -> None:
    with pytest.raises(ParamInvalidError, match="limits='lenient': must be one of 'strict'"):
        _moe(limits="lenient")
