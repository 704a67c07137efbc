"""MoE plans of thousands of ranks from the routing's law, against the plans of every draw.

Above ``EXPECTED_ROUTING_RANKS`` ranks a simulation reads the routing's law
(:func:`mc2sim.routing.expect`) and draws each rank's AlltoAllv loads from it
(:func:`mc2sim.schedule.builders.moe_arrays`) instead of every token's picks. Oracles:

* ``balanced`` routing whose picks divide evenly has no randomness: every rank sends every
  expert the same rows, so the arrays must give the per-rank plans' simulation exactly (every
  op, tiling, topology kind and straggler);
* the law's moments against the binomial enumerated term by term;
* the per-dimension sums and maxima against a loop over every pair of ranks;
* on ``zipf``, ``uniform`` and ``hot`` draws, the simulated times within a few percent of the
  per-token draw's.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import mc2sim.ops.moe_spec as moe_spec
from mc2sim.cli import main
from mc2sim.model.cost import separating_dims
from mc2sim.model.heterogeneity import Straggler
from mc2sim.model.simulator import simulate_arrays, simulate_run
from mc2sim.results import read_results
from mc2sim.routing import RoutingConfig, RoutingKind, expect, route
from mc2sim.scenario import builtin
from mc2sim.schedule.builders import MoeShape, _level_max, _level_sums, moe_arrays
from mc2sim.schedule.tiling import tiling_of
from mc2sim.study.simulate import simulate_study
from mc2sim.timeline import RunColumns
from mc2sim.topology import Topology

from .test_model import dim, machine, moe_plans, two_level

BALANCED = RoutingConfig(kind=RoutingKind.BALANCED)


def shape(e: int) -> MoeShape:
    """``moe_plans``'s shapes, without counts."""
    return MoeShape(
        e=e, send=(), recv=(), h1=64, n1=48, elem_bytes=2, shared=(24, 64, 32), dtype="bfloat16"
    )


@pytest.mark.parametrize(
    "where",
    [
        two_level,
        lambda: machine(dim("ring", 8, 50.0, 2.0)),
        lambda: machine(dim("switch", 2, 40.0, 1.0), dim("full_mesh", 4, 10.0, 3.0)),
    ],
    ids=["mesh-switch", "ring", "switch-mesh"],
)
@pytest.mark.parametrize("op", ["gmm_alltoallv", "alltoallv_gmm"])
@pytest.mark.parametrize("tiling", [None, "serial", 2, 3])
def test_balanced_arrays_are_the_per_rank_plans(
    where: object, op: str, tiling: str | int | None
) -> None:
    topology: Topology = where()  # type: ignore[operator]
    world, e, tokens, k = 8, 3, 24, 3  # 72 picks a rank: 3 rows to each of the 24 experts
    table = route(
        BALANCED, world_size=world, experts_per_rank=e, tokens_per_rank=tokens, top_k=k,
        sparse=True,
    )  # fmt: skip
    plans = moe_plans(op, tiling, table)
    law = expect(BALANCED, world_size=world, experts_per_rank=e, tokens_per_rank=tokens, top_k=k)
    dims = [d.ranks for d in topology.network]
    arrays = moe_arrays(op=op, expected=law, shape=shape(e), tiling=tiling_of(tiling), dims=dims)
    stragglers = {2: Straggler(compute=1.5, link=0.5), 5: Straggler(late_us=2.0)}
    for slow in ({}, stragglers):
        mine, _ = simulate_arrays(arrays, topology, slow)
        theirs, _ = simulate_run(plans, topology, slow)
        assert isinstance(theirs, RunColumns)
        assert mine.names == theirs.names and mine.kinds == theirs.kinds
        for field in ("flops", "bytes", "intra_bytes", "inter_bytes"):
            np.testing.assert_array_equal(getattr(mine, field), getattr(theirs, field))
        np.testing.assert_allclose(mine.start_s, theirs.start_s, rtol=1e-12, atol=1e-18)
        np.testing.assert_allclose(mine.end_s, theirs.end_s, rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize(
    ("tokens", "mean"), [(20, 0.3), (20, 7.0), (200, 3.5), (400, 60.0), (4000, 900.0)]
)
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 16])
def test_the_laws_sub_tiles_are_the_binomials(tokens: int, mean: float, parts: int) -> None:
    law = replace(
        expect(RoutingConfig(), world_size=1, experts_per_rank=1, tokens_per_rank=tokens, top_k=1),
        mean=np.array([mean]),
    )
    got_mean, got_var, got_nonzero = law.parts(parts)
    prob = mean / tokens
    pmf = [
        math.exp(
            math.lgamma(tokens + 1) - math.lgamma(c + 1) - math.lgamma(tokens - c + 1)
            + c * math.log(prob) + (tokens - c) * math.log1p(-prob)
        )
        for c in range(tokens + 1)
    ]  # fmt: skip
    for p in range(parts):
        cut = [c // parts + (p < c % parts) for c in range(tokens + 1)]
        m = sum(w * x for w, x in zip(pmf, cut, strict=True))
        v = sum(w * x * x for w, x in zip(pmf, cut, strict=True)) - m * m
        nz = sum(w for w, x in zip(pmf, cut, strict=True) if x > 0)
        exact = mean <= 16  # past it the remainder is taken as uniform: close, not exact
        tol = 1e-9 if exact else 0.02
        assert got_mean[p, 0] == pytest.approx(m, rel=tol)
        assert 0.0 <= got_nonzero[p, 0] <= 1.0
        assert got_nonzero[p, 0] == pytest.approx(nz, rel=tol, abs=1e-9)
        assert got_var[p, 0] == pytest.approx(v, rel=1e-9 if exact else 0.35)


@pytest.mark.parametrize("dims", [[4, 2], [2, 3, 2], [1, 5], [6]])
def test_level_sums_and_maxima_are_every_pairs(dims: list[int]) -> None:
    world = math.prod(dims)
    topology = machine(*(dim("full_mesh", n, 1.0, 1.0) for n in dims))
    values = np.random.default_rng(3).integers(0, 5, world).astype(float)
    ranks, peers = np.divmod(np.arange(world * world), world)
    level = separating_dims(topology, ranks, peers)
    sums, largest = _level_sums(values, dims), _level_max(values, dims)
    for r in range(world):
        for d in range(len(dims)):
            mine = [values[q] for q in range(world) if level[r * world + q] == d]
            assert sums[d, r] == sum(mine)
            assert largest[d, r] == (max(mine) if mine else 0.0)


CASES = [
    ("deepseek_v3_combine_ep32", []),
    ("deepseek_v3_dispatch_ep64", []),
    ("deepseek_v3_dispatch_ep64", ["routing.kind=uniform", "scale=small"]),
    ("deepseek_v3_combine_ep32", ["routing.kind=hot", "routing.hot_experts=16"]),
    ("qwen3_moe_combine", ["routing.skew=2", "scale=small"]),
]


@pytest.mark.parametrize(("name", "sets"), CASES, ids=lambda v: str(v))
def test_the_laws_times_are_the_draws_within_a_few_percent(
    name: str, sets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = builtin(name, ["limits=what-if", *sets])
    topology = scenario.load_topology()
    drawn = simulate_study(scenario, topology, 64)
    monkeypatch.setattr(moe_spec, "EXPECTED_ROUTING_RANKS", 0)
    law = simulate_study(scenario, topology, 64)
    assert law.expected_routing and not drawn.expected_routing
    for tiling, m in drawn.metrics().items():
        got = law.metrics()[tiling]
        assert got.total_s == pytest.approx(m.total_s, rel=0.05), tiling
        assert got.comm_s == pytest.approx(m.comm_s, rel=0.05), tiling
        assert got.compute_s == pytest.approx(m.compute_s, rel=0.05), tiling
        # who sends what: the busiest sender (an expert owner in the combine, where the hot
        # experts live) and all ranks together
        sent, drawn_sent = ([r.bytes for r in x.per_rank] for x in (got, m))
        assert max(sent) == pytest.approx(max(drawn_sent), rel=0.05), tiling
        assert sum(sent) == pytest.approx(sum(drawn_sent), rel=0.02), tiling


def test_thousands_of_ranks_read_the_law_and_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["simulate", "deepseek_v3_combine_ep32", "--what-if", "--no-plots"]
    assert main([*args, "--ranks", "2048", "--out", str(tmp_path / "a")]) == 0
    assert "routing: read from its law above 1,024 ranks" in capsys.readouterr().out
    assert main([*args, "--ranks", "2048", "--out", str(tmp_path / "b")]) == 0
    seeded = [*args, "--set", "routing.seed=7", "--ranks", "2048"]
    assert main([*seeded, "--out", str(tmp_path / "c")]) == 0
    first, again = (read_results(tmp_path / n) for n in ("a", "b"))
    other = read_results(tmp_path / "c")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["timeline_meta"]["routing"] == "expected"
    assert first.totals() == again.totals()  # the same seed, the same draw
    assert first.totals() != other.totals()
    assert not (tmp_path / "a" / "tasks.csv").exists()  # 241,664 records: left out
    sixteen = [*args, "--ranks", "2048", "--set", "tilings=serial,16"]
    assert main([*sixteen, "--out", str(tmp_path / "d")]) == 0  # sub-tiles of a few rows


@pytest.mark.parametrize(
    "sets",
    [
        ["routing.skew=3"],
        ["routing.kind=hot", "routing.hot_experts=1", "routing.hot_fraction=0.125"],
    ],
    ids=["zipf-3", "hot-1"],
)
def test_an_expert_every_token_picks_is_a_fixed_count(sets: list[str], tmp_path: Path) -> None:
    """A count that cannot vary (pi = 1: tokens rows from every rank) has fixed sub-tiles."""
    world, e, tokens = 4096, 8, 64
    config = builtin("deepseek_v3_combine_ep32", sets).routing
    law = expect(config, world_size=world, experts_per_rank=e, tokens_per_rank=tokens, top_k=8)
    assert law.mean.max() == pytest.approx(tokens)  # somebody's expert takes every token
    for parts in (1, 4, 16):
        mean, var, nonzero = law.parts(parts)
        assert np.isfinite(mean).all() and np.isfinite(var).all()
        assert ((nonzero >= 0) & (nonzero <= 1)).all()
        hot = int(np.argmax(law.mean))
        cut = [tokens // parts + (p < tokens % parts) for p in range(parts)]
        assert mean[:, hot].tolist() == pytest.approx(cut) and var[:, hot].max() == 0
    args = ["simulate", "deepseek_v3_combine_ep32", "--what-if", "--ranks", "2048", "--no-plots"]
    sets_args = [a for s in sets for a in ("--set", s)]
    assert main([*args, *sets_args, "--set", "tilings=serial,16", "--out", str(tmp_path)]) == 0
