"""Routing tables: invariants, laws of each kind, matrix files and every validation rule."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from mc2sim import routing
from mc2sim.errors import ParamInvalidError
from mc2sim.ops import moe_spec
from mc2sim.routing import (
    Direction,
    RoutingConfig,
    RoutingKind,
    RoutingTable,
    SparseRouting,
    load_matrix,
    route,
)
from mc2sim.scenario import builtin
from mc2sim.schedule import Plan
from mc2sim.study import plans_for

GENERATED = [
    RoutingConfig(kind=RoutingKind.BALANCED),
    RoutingConfig(kind=RoutingKind.UNIFORM, seed=1),
    RoutingConfig(kind=RoutingKind.ZIPF, seed=2, skew=1.3),
    RoutingConfig(kind=RoutingKind.HOT, seed=3, hot_experts=2, hot_fraction=0.3),
]
IDS = [str(c.kind) for c in GENERATED]


def make(config: RoutingConfig, w: int = 3, e: int = 4, bs: int = 50, k: int = 4) -> RoutingTable:
    return route(config, world_size=w, experts_per_rank=e, tokens_per_rank=bs, top_k=k)


def make_sparse(
    config: RoutingConfig, w: int = 3, e: int = 4, bs: int = 50, k: int = 4
) -> SparseRouting:
    return route(config, world_size=w, experts_per_rank=e, tokens_per_rank=bs, top_k=k, sparse=True)


# ---------------------------------------------------------------- invariants of every kind


@pytest.mark.parametrize("config", GENERATED, ids=IDS)
def test_every_rank_sends_tokens_times_k_and_distinct_experts(config: RoutingConfig) -> None:
    table = make(config, w=3, e=4, bs=50, k=4)
    assert table.counts.shape == (3, 3, 4)
    assert table.counts.dtype == np.int64
    assert (table.world_size, table.experts_per_rank, table.num_experts) == (3, 4, 12)
    assert table.counts.sum(axis=(1, 2)).tolist() == [200, 200, 200]
    # distinct experts per token: no rank sends one expert more rows than it has tokens
    assert table.counts.max() <= 50
    assert table.counts.min() >= 0


@pytest.mark.parametrize(
    "config",
    [
        *GENERATED[:3],
        RoutingConfig(kind=RoutingKind.HOT, seed=3, hot_experts=2, hot_fraction=2 / 6),
    ],
    ids=IDS,
)
def test_top_k_equal_to_all_experts_picks_each_expert_once_per_token(
    config: RoutingConfig,
) -> None:
    # with K = W * e a token must take every expert exactly once: any repeat shows up here
    table = make(config, w=2, e=3, bs=37, k=6)
    assert (table.counts == 37).all()


def test_hot_with_a_whole_number_of_hot_picks_is_exact() -> None:
    # hot_fraction * K = 2 = hot_experts: every token takes both hot experts
    table = make(
        RoutingConfig(kind=RoutingKind.HOT, seed=9, hot_experts=2, hot_fraction=0.5), bs=40, k=4
    )
    load = table.expert_load()
    hot = np.flatnonzero(load == 3 * 40)
    assert hot.size == 2
    per_rank = table.matrix()
    assert (per_rank[:, hot] == 40).all()
    assert per_rank.sum(axis=1).tolist() == [160, 160, 160]


@pytest.mark.parametrize("config", GENERATED, ids=IDS)
def test_recv_counts_mirror_send_counts(config: RoutingConfig) -> None:
    w, e = 3, 2
    table = make(config, w=w, e=e, bs=30, k=3)
    send = [table.send_counts(r) for r in range(w)]
    recv = [table.recv_counts(q) for q in range(w)]
    for q, r, j in itertools.product(range(w), range(w), range(e)):
        assert recv[q][r * e + j] == send[r][q * e + j]
        assert send[r][q * e + j] == table.counts[r, q, j]
    for counts in send + recv:
        assert len(counts) == w * e
        assert all(type(c) is int for c in counts)
    assert sum(map(sum, send)) == sum(map(sum, recv)) == w * 30 * 3


def test_combine_direction_swaps_send_and_receive() -> None:
    w, e = 3, 2
    table = make(RoutingConfig(kind=RoutingKind.UNIFORM, seed=4), w=w, e=e, bs=20, k=2)
    for r in range(w):
        assert table.send_counts(r, Direction.COMBINE) == table.recv_counts(r)
        assert table.recv_counts(r, "combine") == table.send_counts(r)
        # the combine op's receiver gets back all BS * K rows of its tokens
        assert sum(table.recv_counts(r, "combine")) == 40
    for q, r, j in itertools.product(range(w), range(w), range(e)):
        # GroupedMatMulAlltoAllv's invariant, in its own (combine) direction
        got = table.recv_counts(q, "combine")[r * e + j]
        assert got == table.send_counts(r, "combine")[q * e + j]


def test_expert_load_and_imbalance_by_hand() -> None:
    table = RoutingTable.from_matrix([[4, 0, 2, 0], [0, 0, 2, 0]], experts_per_rank=2)
    assert table.counts[0, 1, 0] == 2  # global expert 2 = rank 1's local expert 0
    assert table.expert_load().tolist() == [4, 0, 4, 0]
    assert table.imbalance() == pytest.approx(4 / 2)
    assert table.send_counts(0) == [4, 0, 2, 0]
    assert table.recv_counts(1) == [2, 0, 2, 0]
    assert RoutingTable.from_matrix([[1, 1], [1, 1]], 1).imbalance() == 1.0
    assert RoutingTable.from_matrix([[0, 0], [0, 0]], 1).imbalance() == 1.0


# ---------------------------------------------------------------- determinism and seeds


@pytest.mark.parametrize("config", GENERATED, ids=IDS)
def test_same_config_same_table(config: RoutingConfig) -> None:
    assert make(config) == make(config)
    assert make(config).counts.tolist() == make(config).counts.tolist()


@pytest.mark.parametrize("kind", ["uniform", "zipf", "hot"])
def test_different_seeds_differ(kind: str) -> None:
    tables = [
        make(RoutingConfig(kind=RoutingKind(kind), seed=s, hot_fraction=0.25), bs=200)
        for s in range(3)
    ]
    assert tables[0] != tables[1]
    assert tables[1] != tables[2]


def test_balanced_ignores_the_seed() -> None:
    assert make(RoutingConfig(kind=RoutingKind.BALANCED, seed=1)) == make(
        RoutingConfig(kind=RoutingKind.BALANCED)
    )


def test_zipf_with_skew_zero_is_uniform() -> None:
    uniform = make(RoutingConfig(kind=RoutingKind.UNIFORM, seed=7), bs=200)
    assert make(RoutingConfig(kind=RoutingKind.ZIPF, seed=7, skew=0.0), bs=200) == uniform


def test_zipf_popular_experts_follow_the_seed() -> None:
    favourites = {
        int(
            np.argmax(
                make(RoutingConfig(kind=RoutingKind.ZIPF, seed=s, skew=2.0), bs=300).expert_load()
            )
        )
        for s in range(8)
    }
    assert len(favourites) > 1


def test_chunked_drawing_gives_the_same_table(monkeypatch: pytest.MonkeyPatch) -> None:
    configs = [*GENERATED, RoutingConfig(kind=RoutingKind.ZIPF, seed=5, skew=3.0)]
    whole = [make(c, bs=300) for c in configs]
    sparse = [make_sparse(c, bs=300).matrix() for c in configs]
    monkeypatch.setattr(routing, "_CHUNK_ELEMENTS", 40)  # one rank per block
    assert [make(c, bs=300) for c in configs] == whole
    assert all(
        (make_sparse(c, bs=300).matrix() == m).all() for c, m in zip(configs, sparse, strict=True)
    )
    hot = make(RoutingConfig(kind=RoutingKind.HOT, hot_experts=3, hot_fraction=0.4), bs=301, k=5)
    assert hot.counts.sum(axis=(1, 2)).tolist() == [301 * 5] * 3
    assert hot.counts.max() <= 301


# ---------------------------------------------------------------- laws of each kind


@pytest.mark.parametrize(("w", "e", "bs", "k"), [(2, 3, 7, 2), (3, 4, 50, 4), (4, 5, 13, 3)])
def test_balanced_counts_differ_by_at_most_one(w: int, e: int, bs: int, k: int) -> None:
    table = make(RoutingConfig(kind=RoutingKind.BALANCED), w=w, e=e, bs=bs, k=k)
    per_rank = table.matrix()
    assert (per_rank.max(axis=1) - per_rank.min(axis=1) <= 1).all()
    load = table.expert_load()
    assert load.max() - load.min() <= 1
    assert load.sum() == w * bs * k


def test_uniform_counts_match_their_mean() -> None:
    w, e, bs, k = 2, 4, 4000, 3
    table = make(RoutingConfig(kind=RoutingKind.UNIFORM, seed=11), w=w, e=e, bs=bs, k=k)
    p = k / (w * e)
    sigma = math.sqrt(bs * p * (1 - p))
    assert np.abs(table.matrix() - bs * p).max() < 6 * sigma


def successive_sampling_inclusion(weights: np.ndarray, k: int) -> np.ndarray:
    """P(expert i among k draws without replacement, each draw by weight): brute force."""
    n = len(weights)
    inclusion = np.zeros(n)
    for order in itertools.permutations(range(n), k):
        prob, left = 1.0, weights.sum()
        for i in order:
            prob *= weights[i] / left
            left -= weights[i]
        inclusion[list(order)] += prob
    return inclusion


def test_zipf_follows_successive_sampling_law() -> None:
    w, e, bs, k, skew = 2, 2, 20000, 2, 1.0
    table = make(RoutingConfig(kind=RoutingKind.ZIPF, seed=3, skew=skew), w=w, e=e, bs=bs, k=k)
    weights = 1.0 / np.arange(1, w * e + 1) ** skew
    p = successive_sampling_inclusion(weights, k)
    n = w * bs
    expected = n * p  # already in popularity order, most popular first
    got = np.sort(table.expert_load())[::-1]
    assert np.all(np.abs(got - expected) < 6 * np.sqrt(n * p * (1 - p))), (got, expected)


def test_zipf_imbalance_grows_with_skew() -> None:
    skews = [0.0, 0.5, 1.0, 1.5, 2.0]
    imbalance = [
        make(
            RoutingConfig(kind=RoutingKind.ZIPF, seed=1, skew=s), w=2, e=16, bs=2048, k=2
        ).imbalance()
        for s in skews
    ]
    # means are about 1.1, 3.1, 7.0, 11.4, 14.0; seed noise is under 0.3
    assert all(b > a + 1.0 for a, b in itertools.pairwise(imbalance)), imbalance


def test_hot_fraction_of_picks() -> None:
    w, e, bs, k = 2, 8, 3000, 4
    config = RoutingConfig(kind=RoutingKind.HOT, seed=2, hot_experts=2, hot_fraction=0.3)
    table = make(config, w=w, e=e, bs=bs, k=k)
    load = np.sort(table.expert_load())[::-1]
    hot_picks = load[:2].sum()
    # each token takes 1 hot expert, plus a second with probability 0.2
    n = w * bs
    mean, sigma = n * 1.2, math.sqrt(n * 0.2 * 0.8)
    assert abs(hot_picks - mean) < 6 * sigma
    # cold experts share the rest evenly: 2.8 picks per token over 14 experts
    assert np.abs(load[2:] - n * 2.8 / 14).max() < 6 * math.sqrt(n * 0.2 * 0.8)
    # every token takes one or two hot experts, so each rank sends them BS to 2 * BS rows
    hot_rows = table.matrix()[:, np.argsort(table.expert_load())[-2:]].sum(axis=1)
    assert ((hot_rows >= bs) & (hot_rows <= 2 * bs)).all()


# ---------------------------------------------------------------- one draw, dense or sparse

DRAWN = [*GENERATED, RoutingConfig(kind=RoutingKind.ZIPF, seed=4, skew=3.0)]
DRAWN_IDS = [*IDS, "zipf-steep"]


@pytest.mark.parametrize("config", DRAWN, ids=DRAWN_IDS)
@pytest.mark.parametrize(
    ("w", "e", "bs", "k"),
    [(1, 4, 20, 2), (3, 4, 50, 4), (60, 1, 6, 3), (63, 1, 5, 3), (64, 1, 5, 3), (65, 1, 5, 3),
     (70, 1, 4, 3), (66, 2, 3, 6)],
)  # fmt: skip
def test_dense_and_sparse_hold_the_same_counts(
    config: RoutingConfig, w: int, e: int, bs: int, k: int
) -> None:
    dense, sparse = make(config, w, e, bs, k), make_sparse(config, w, e, bs, k)
    assert (sparse.world_size, sparse.experts_per_rank, sparse.num_experts) == (w, e, w * e)
    for r, direction in itertools.product(range(w), Direction):
        assert sparse.send_counts(r, direction).dense() == dense.send_counts(r, direction)
        assert sparse.recv_counts(r, direction).dense() == dense.recv_counts(r, direction)
    for r in range(w):
        # distinct experts per token, in sparse form too: at most one row per token for an
        # expert, BS * K rows in all, and only non-zero counts kept, in ascending order
        counts = sparse.send_counts(r)
        assert counts.size == w * e and counts.total() == bs * k
        assert counts.index.dtype == counts.values.dtype == np.int64
        assert 0 < counts.values.min() and counts.values.max() <= bs
        assert (np.diff(counts.index) > 0).all()
    assert sparse.matrix().tolist() == dense.matrix().tolist()


def test_a_matrix_file_kept_sparse(tmp_path: Path) -> None:
    path = write(tmp_path, "m.npy", MATRIX)
    config = RoutingConfig(kind=RoutingKind.MATRIX, matrix_path=cast(Any, path))
    sparse = route(config, world_size=2, experts_per_rank=2, sparse=True)
    assert sparse.send_counts(1).dense() == [0, 3, 3, 0]
    assert sparse.recv_counts(1).dense() == [1, 2, 3, 0]
    assert sparse.send_counts(0, "combine").dense() == [5, 0, 0, 3]
    assert SparseRouting.from_matrix(MATRIX, 2).matrix().tolist() == MATRIX.tolist()
    # counts too large to share a 64-bit sort key with the receiver's index still sort right
    huge = SparseRouting.from_matrix([[2**60, 0, 1, 0], [0, 2, 0, 3]], 2)
    assert huge.recv_counts(0).dense() == [2**60, 0, 0, 2]
    assert huge.recv_counts(1, "combine").dense() == [0, 2, 0, 3]


@pytest.mark.parametrize("config", DRAWN, ids=DRAWN_IDS)
def test_a_ranks_row_depends_on_the_number_of_experts_not_on_the_world(
    config: RoutingConfig,
) -> None:
    # 24 experts as 4 ranks of 6, 8 ranks of 3 or 24 ranks of 1: rank r draws the same row
    rows = [
        make_sparse(config, w=w, e=24 // w, bs=30, k=4).matrix()[:4].tolist() for w in (4, 8, 24)
    ]
    assert rows[0] == rows[1] == rows[2]
    assert make(config, w=8, e=3, bs=30, k=4).matrix()[:4].tolist() == rows[0]


def test_sparse_must_be_a_bool() -> None:
    with pytest.raises(ParamInvalidError) as info:
        route(RoutingConfig(), **SIZES, sparse=cast(Any, "yes"))
    assert info.value.param == "sparse"


def plan_facts(plan: Plan) -> list[tuple[object, ...]]:
    """Every task's work, with its splits made dense (sparse and dense splits compare alike)."""
    return [
        (t.name, t.kind, t.deps, t.flops, t.bytes, tuple(t.send_splits), tuple(t.recv_splits))
        for t in plan.tasks
    ]


@pytest.mark.parametrize("name", ["deepseek_v3_dispatch_ep64", "deepseek_v3_combine_ep32"])
def test_study_plans_are_the_same_on_both_sides_of_the_dense_limit(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # study keeps counts sparse above DENSE_ROUTING_LIMIT ranks only to save memory: at 64 and
    # 65 ranks, the plans are the same whichever representation it picks
    scenario = builtin(name, ["scale=small"])
    limit = moe_spec.DENSE_ROUTING_LIMIT
    for world in (limit, limit + 1):
        default = plans_for(scenario, world, "hardware")
        # the other representation: dense above the limit, sparse at or below it
        monkeypatch.setattr(moe_spec, "DENSE_ROUTING_LIMIT", world if world > limit else 0)
        other = plans_for(scenario, world, "hardware")
        monkeypatch.setattr(moe_spec, "DENSE_ROUTING_LIMIT", limit)
        assert [plan_facts(default[r]) for r in range(world)] == [
            plan_facts(other[r]) for r in range(world)
        ]


# ---------------------------------------------------------------- the draw as documented


def reference_row(config: RoutingConfig, rank: int, num_experts: int, bs: int, k: int) -> list[int]:
    """Rank ``rank``'s row drawn token by token in plain Python, as ``route`` documents it.

    Shares only the candidate law (its alias table, groups and sums of weights) with the
    code under test: the order of the draws, the rounds, the reserve and the inversion are
    written anew.
    """
    law = routing._law(config, num_experts, k)
    rng = np.random.default_rng([config.seed, 1, rank])
    size, cut = num_experts, law.cut
    weight: list[float] = law.weight.tolist()
    survival: list[float] = law.survival.tolist()
    rank_of = list(range(size)) if law.rank_of is None else law.rank_of.tolist()
    by_rank = list(range(size)) if law.by_rank is None else law.by_rank.tolist()

    def candidate(raw: int, cold: bool) -> int:
        if law.hot_frac is not None:
            return cut + raw // cut if cold else raw % cut
        if law.table is None:
            return raw
        column, entry = raw >> law.shift, int(law.table[raw >> law.shift])
        if raw & ((1 << law.shift) - 1) < entry >> law.alias_bits:
            return column
        return entry & ((1 << law.alias_bits) - 1)

    hot = [k] * bs
    if law.hot_frac is not None:
        hot = [law.hot_base + int(u < law.hot_frac) for u in rng.random(bs)]

    def cold_next(picks: list[int], t: int) -> bool:
        return sum(v < cut for v in picks) >= hot[t]

    raw = rng.integers(0, law.span, size=bs * k).tolist()
    picks: list[list[int]] = []
    for t in range(bs):
        mine: list[int] = []
        for i in range(k):
            value = candidate(raw[t * k + i], i >= hot[t])
            if value not in mine:
                mine.append(value)
        picks.append(mine)

    def fast(t: int) -> bool:
        lo, hi = (cut, size) if cold_next(picks[t], t) else (0, cut)
        total = survival[lo] - survival[hi]
        return 2 * (total - sum(weight[v] for v in picks[t] if lo <= v < hi)) >= total

    short = [t for t in range(bs) if len(picks[t]) < k]
    active = [t for t in short if fast(t)]
    slow = [t for t in short if not fast(t)]
    wanted = sum(k - len(picks[t]) for t in active)
    reserve = rng.integers(0, law.span, size=2 * wanted + 4).tolist() if wanted else []
    for _ in range(routing._ROUNDS):
        if not active:
            break
        if len(reserve) < len(active):
            reserve += rng.integers(0, law.span, size=2 * len(active) + 4).tolist()
        for t in active:
            value = candidate(reserve.pop(0), cold_next(picks[t], t))
            if value not in picks[t]:
                picks[t].append(value)
        active = [t for t in active if len(picks[t]) < k]
    rest = sorted(slow + active)
    uniforms = rng.random(sum(k - len(picks[t]) for t in rest)).tolist() if rest else []
    for t in rest:
        places = sorted(rank_of[v] for v in picks[t])  # by decreasing weight
        while len(places) < k:
            lo, hi = (cut, size) if sum(p < cut for p in places) >= hot[t] else (0, cut)
            head = lo
            while head in places:
                head += 1
            inside = [p for p in places if head < p < hi]
            base = survival[head]
            left = base - survival[hi] - sum(survival[p] - survival[p + 1] for p in inside)
            x = uniforms.pop(0) * max(left, 0.0)
            for p in inside:
                if x >= base - survival[p]:
                    x = max(x + (survival[p] - survival[p + 1]), base - survival[p + 1])
            place = next(v for v in range(head, hi) if base - survival[v + 1] > x)
            while place in places:  # rounding only
                place = place + 1 if place + 1 < hi else max(set(range(lo, hi)) - set(places))
            places = sorted([*places, place])
        picks[t] = [by_rank[p] for p in places]
    row = [0] * num_experts
    experts = law.experts
    for mine in picks:
        assert len(set(mine)) == k
        for value in mine:
            row[value if experts is None else int(experts[value])] += 1
    return row


@pytest.mark.parametrize(
    ("config", "w", "e", "bs", "k"),
    [
        (RoutingConfig(kind=RoutingKind.UNIFORM, seed=3), 3, 2, 40, 6),  # K = all experts: inversion
        (RoutingConfig(kind=RoutingKind.UNIFORM, seed=3), 2, 8, 200, 4),
        (RoutingConfig(kind=RoutingKind.UNIFORM, seed=3), 2, 500, 3, 2),  # no repeats at all
        (RoutingConfig(kind=RoutingKind.ZIPF, seed=1, skew=1.0), 4, 4, 300, 4),  # rounds and reserve
        (RoutingConfig(kind=RoutingKind.ZIPF, seed=2, skew=3.0), 3, 3, 100, 5),  # inversion
        (RoutingConfig(kind=RoutingKind.ZIPF, seed=8, skew=1.2), 70, 1, 8, 8),
        (RoutingConfig(kind=RoutingKind.HOT, seed=5, hot_experts=3, hot_fraction=0.4), 4, 2, 150, 5),
        (RoutingConfig(kind=RoutingKind.HOT, seed=6, hot_experts=2, hot_fraction=0.25), 2, 4, 99, 8),
    ],
)  # fmt: skip
def test_rows_are_the_documented_draw(
    config: RoutingConfig, w: int, e: int, bs: int, k: int
) -> None:
    expected = [reference_row(config, r, w * e, bs, k) for r in range(w)]
    assert make(config, w, e, bs, k).matrix().tolist() == expected
    assert make_sparse(config, w, e, bs, k).matrix().tolist() == expected


def test_a_very_steep_zipf_takes_the_most_popular_experts() -> None:
    # skew 80: after the heaviest picks, the next most popular expert still holds all but
    # 1e-7 of what is left, though that is 1e-24 of the whole weight; every token must take
    # the K most popular experts (the seeded permutation lists experts by popularity)
    table = make(RoutingConfig(kind=RoutingKind.ZIPF, seed=3, skew=80.0), w=2, e=4, bs=50, k=4)
    expected = np.zeros(8, dtype=np.int64)
    expected[np.random.default_rng([3, 0]).permutation(8)[:4]] = 50
    assert table.matrix().tolist() == [expected.tolist()] * 2


@pytest.mark.parametrize("rounds", [0, 8, 1000])
def test_steep_zipf_follows_successive_sampling_by_inversion_and_rounds(
    rounds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 6 experts, K = 4, skew 2.5: most picks after the first come from the redraw rounds or
    # the inversion; however many rounds run first, the law is successive sampling
    monkeypatch.setattr(routing, "_ROUNDS", rounds)
    w, e, bs, k, skew = 2, 3, 20000, 4, 2.5
    table = make(RoutingConfig(kind=RoutingKind.ZIPF, seed=11, skew=skew), w=w, e=e, bs=bs, k=k)
    p = successive_sampling_inclusion(1.0 / np.arange(1, w * e + 1) ** skew, k)
    n = w * bs
    got = np.sort(table.expert_load())[::-1]
    assert np.all(np.abs(got - n * p) < 6 * np.sqrt(n * p * (1 - p))), (got, n * p)
    assert (table.matrix() <= bs).all()


# ---------------------------------------------------------------- matrix files


MATRIX = np.array([[5, 0, 1, 2], [0, 3, 3, 0]], dtype=np.int64)


def write(tmp_path: Path, name: str, content: str | np.ndarray) -> Path:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("m.npy", MATRIX),
        ("m.npy", MATRIX.astype(np.float32)),
        ("m.csv", "5,0,1,2\n0,3,3,0\n"),
        ("m.csv", "# rank-by-expert\n5, 0, 1, 2\n0, 3, 3.0, 0\n"),
        ("m.json", json.dumps(MATRIX.tolist())),
        ("M.JSON", json.dumps({"matrix": MATRIX.tolist(), "note": "x"})),
    ],
)
def test_matrix_files_round_trip(tmp_path: Path, name: str, content: str | np.ndarray) -> None:
    path = write(tmp_path, name, content)
    loaded = load_matrix(path)
    assert loaded.dtype == np.int64
    assert loaded.tolist() == MATRIX.tolist()
    config = RoutingConfig(kind=RoutingKind.MATRIX, matrix_path=cast(Any, path))
    assert config.matrix_path == str(path)
    # tokens and top_k do not have to agree with the matrix: its counts rule
    table = route(config, world_size=2, experts_per_rank=2, tokens_per_rank=1, top_k=1)
    assert table.matrix().tolist() == MATRIX.tolist()
    assert table == RoutingTable.from_matrix(MATRIX, experts_per_rank=2)
    assert table.send_counts(1) == [0, 3, 3, 0]
    assert table.recv_counts(1) == [1, 2, 3, 0]
    assert route(config, world_size=2, experts_per_rank=2) == table


def test_single_row_csv_is_a_matrix(tmp_path: Path) -> None:
    path = write(tmp_path, "one.csv", "1,2,3\n")
    assert load_matrix(path).tolist() == [[1, 2, 3]]
    config = RoutingConfig(kind=RoutingKind.MATRIX, matrix_path=str(path))
    table = route(config, world_size=1, experts_per_rank=3)
    assert table.send_counts(0) == table.recv_counts(0) == [1, 2, 3]


@pytest.mark.parametrize(
    ("name", "content", "rule"),
    [
        ("m.txt", "1,2", "must end in .npy, .csv or .json"),
        ("m.csv", "1,-2\n3,4\n", "entries must be >= 0"),
        ("m.csv", "1,2.5\n3,4\n", "whole numbers"),
        ("m.csv", "1,nan\n3,4\n", "finite"),
        ("m.csv", "1,2\n3\n", "cannot be read"),
        ("m.csv", "a,b\n", "cannot be read"),
        ("m.json", "[[1, 2], [3]]", "differ in length"),
        ("m.json", "[1, 2]", "list of rows"),
        ("m.json", '{"rows": [[1]]}', '"matrix" key'),
        ("m.json", '[[1, "2"]]', "must be numbers"),
        ("m.json", "[[true, 1]]", "must be numbers"),
        ("m.json", "[[1, 2]", "cannot be read"),
        ("m.json", "[[]]", "non-empty 2-D"),
        ("m.npy", np.arange(4), "non-empty 2-D"),
        ("m.npy", np.array([[True]]), "must hold numbers"),
    ],
)
def test_bad_matrix_files(tmp_path: Path, name: str, content: str | np.ndarray, rule: str) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(ParamInvalidError, match=rule) as info:
        load_matrix(path)
    assert info.value.code == 161002
    assert info.value.param == "matrix_path"
    assert str(path) in str(info.value)


def test_missing_matrix_file(tmp_path: Path) -> None:
    with pytest.raises(ParamInvalidError, match="no such file") as info:
        load_matrix(tmp_path / "absent.npy")
    assert info.value.code == 161002
    assert "absent.npy" in str(info.value)
    # a FIFO would block the read for a writer that never comes; a folder is no file either
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "folder.npy").mkdir()
    for name in ("fifo.csv", "folder.npy"):
        with pytest.raises(ParamInvalidError, match="must be a regular file") as info:
            load_matrix(tmp_path / name)
        assert info.value.param == "matrix_path"


def test_a_matrix_past_int64_is_refused(tmp_path: Path) -> None:
    # as unsigned integers they would wrap to negative counts; as rows they would overflow
    np.save(tmp_path / "u.npy", np.full((2, 4), 2**64 - 1, dtype=np.uint64))
    np.save(tmp_path / "rows.npy", np.full((2, 4), 2**61, dtype=np.int64))
    for name in ("u.npy", "rows.npy"):
        with pytest.raises(ParamInvalidError, match=r"row sums must be below 2\*\*62"):
            load_matrix(tmp_path / name)
    np.save(tmp_path / "ok.npy", np.full((2, 4), 2**59, dtype=np.int64))
    assert load_matrix(tmp_path / "ok.npy").sum(axis=1).tolist() == [2**61, 2**61]


def test_matrix_of_the_wrong_shape_for_the_group(tmp_path: Path) -> None:
    path = write(tmp_path, "m.npy", MATRIX)
    config = RoutingConfig(kind=RoutingKind.MATRIX, matrix_path=cast(Any, path))
    with pytest.raises(ParamInvalidError, match=r"shape \(2, 4\); expected .* \(2, 6\)") as info:
        route(config, world_size=2, experts_per_rank=3)
    assert info.value.code == 161002
    assert info.value.param == "matrix_path"


# ---------------------------------------------------------------- validation rules


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"kind": "gaussian"}, "kind"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"skew": -0.1}, "skew"),
        ({"skew": math.nan}, "skew"),
        ({"skew": math.inf}, "skew"),
        ({"skew": "1"}, "skew"),
        ({"hot_fraction": 1.01}, "hot_fraction"),
        ({"hot_fraction": -0.01}, "hot_fraction"),
        ({"hot_experts": 0}, "hot_experts"),
        ({"hot_experts": 2.0}, "hot_experts"),
        ({"kind": "matrix"}, "matrix_path"),
        ({"kind": "uniform", "matrix_path": "m.npy"}, "matrix_path"),
        ({"kind": "matrix", "matrix_path": 3}, "matrix_path"),
    ],
)
def test_config_rules(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        RoutingConfig(**kwargs)
    assert info.value.code == 161002
    assert info.value.param == param


def test_config_normalises_kind_and_numbers() -> None:
    zipf: Any = "zipf"  # the kind's string value, as a scenario file gives it
    config = RoutingConfig(kind=zipf, seed=np.int64(4), skew=2, hot_experts=np.int32(3))
    assert config.kind is RoutingKind.ZIPF
    assert type(config.seed) is int and config.seed == 4
    assert type(config.skew) is float and config.skew == 2.0
    assert type(config.hot_experts) is int
    with pytest.raises(AttributeError):
        config.seed = 5  # type: ignore[misc]


SIZES: dict[str, Any] = {"world_size": 2, "experts_per_rank": 2, "tokens_per_rank": 8, "top_k": 2}


@pytest.mark.parametrize(
    ("config", "override", "param"),
    [
        (RoutingConfig(), {"world_size": 0}, "world_size"),
        (RoutingConfig(), {"experts_per_rank": 0}, "experts_per_rank"),
        (RoutingConfig(), {"experts_per_rank": 2.0}, "experts_per_rank"),
        (RoutingConfig(), {"tokens_per_rank": 0}, "tokens_per_rank"),
        (RoutingConfig(), {"tokens_per_rank": None}, "tokens_per_rank"),
        (RoutingConfig(), {"top_k": 0}, "top_k"),
        (RoutingConfig(), {"top_k": 5}, "top_k"),
        (RoutingConfig(), {"top_k": None}, "top_k"),
        (RoutingConfig(kind=RoutingKind.BALANCED), {"top_k": True}, "top_k"),
        (RoutingConfig(kind=RoutingKind.HOT, hot_experts=5), {}, "hot_experts"),
        (RoutingConfig(kind=RoutingKind.HOT, hot_experts=1, hot_fraction=0.6), {}, "hot_fraction"),
        # three hot experts of four, K = 2: at least one hot pick per token
        (RoutingConfig(kind=RoutingKind.HOT, hot_experts=3, hot_fraction=0.4), {}, "hot_fraction"),
    ],
)
def test_route_rules(config: RoutingConfig, override: dict[str, Any], param: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        route(config, **{**SIZES, **override})
    assert info.value.code == 161002
    assert info.value.param == param


def test_route_needs_a_config() -> None:
    with pytest.raises(ParamInvalidError) as info:
        route(cast(Any, {"kind": "uniform"}), **SIZES)
    assert info.value.param == "config"


def test_hot_fraction_error_names_the_reachable_range() -> None:
    with pytest.raises(ParamInvalidError, match=r"must be in \[0, 0.333333\] with hot_experts=1"):
        route(RoutingConfig(kind=RoutingKind.HOT, hot_fraction=0.5), **{**SIZES, "top_k": 3})


def test_hot_fraction_limits_are_reachable() -> None:
    # 0.7 * 10 is 7.000000000000001 in floating point: still the whole number 7
    table = route(
        RoutingConfig(kind=RoutingKind.HOT, hot_experts=7, hot_fraction=0.7),
        world_size=2,
        experts_per_rank=8,
        tokens_per_rank=5,
        top_k=10,
    )
    assert (np.sort(table.expert_load())[-7:] == 10).all()


@pytest.mark.parametrize(
    ("counts", "param"),
    [
        (np.zeros((2, 3, 1), dtype=np.int64), "counts.shape"),
        (np.zeros((2, 2), dtype=np.int64), "counts.shape"),
        (np.zeros((2, 2, 0), dtype=np.int64), "counts.shape"),
        (np.zeros((2, 2, 1)), "counts.dtype"),
        (-np.ones((2, 2, 1), dtype=np.int64), "counts"),
    ],
)
def test_table_rules(counts: np.ndarray, param: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        RoutingTable(counts=counts)
    assert info.value.code == 161002
    assert info.value.param == param


def test_table_is_a_frozen_copy() -> None:
    source = np.ones((2, 2, 1), dtype=np.int32)
    table = RoutingTable(counts=cast(Any, source))  # int32: the table converts
    source[0, 0, 0] = 9
    assert table.counts.dtype == np.int64
    assert table.counts[0, 0, 0] == 1
    with pytest.raises(ValueError):
        table.counts[0, 0, 0] = 5
    assert table.matrix().flags.writeable


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda t: t.send_counts(2), "rank"),
        (lambda t: t.recv_counts(-1), "rank"),
        (lambda t: t.send_counts(0, "sideways"), "direction"),
        (lambda t: RoutingTable.from_matrix([[1, 2, 3]], 2), "matrix.shape"),
        (lambda t: RoutingTable.from_matrix([[1, 2]], 0), "experts_per_rank"),
        (lambda t: RoutingTable.from_matrix([[1, -2]], 2), "matrix"),
    ],
)
def test_table_call_rules(call: Callable[[RoutingTable], object], param: str) -> None:
    table = RoutingTable.from_matrix([[1, 2], [3, 4]], experts_per_rank=1)
    with pytest.raises(ParamInvalidError) as info:
        call(table)
    assert info.value.code == 161002
    assert info.value.param == param
