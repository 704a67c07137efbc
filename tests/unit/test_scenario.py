"""Unit tests of mc2sim.scenario: shipped files, overrides, validation rules, round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mc2sim import scenario as sc
from mc2sim.compare import Standard
from mc2sim.errors import ParamInvalidError
from mc2sim.routing import RoutingKind

SHIPPED = sc.list_builtin()

MOE: dict[str, Any] = {
    "name": "t_moe",
    "description": "test",
    "op": "gmm_alltoallv",
    "ranks": 4,
    "dtype": "float16",
    "shape": {"tokens": 64, "top_k": 2, "experts_per_rank": 4, "h1": 112, "n1": 64},
    "routing": {"kind": "zipf", "seed": 1, "skew": 1.2},
    "tilings": ["serial", "hardware", 2],
    "topology": "atlas_a2_8p",
    "standard": "allclose",
    "repetitions": 3,
    "small": {"tokens": 16},
}

TP: dict[str, Any] = {
    "name": "t_tp",
    "description": "test",
    "op": "mm_all_reduce",
    "ranks": 8,
    "dtype": "bfloat16",
    "shape": {"m": 512, "k": 256, "n": 512},
    "tilings": ["serial", 4],
    "topology": "atlas_a2_8p",
    "small": {"m": 64},
}


def write(tmp_path: Path, data: dict[str, Any], name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    data = {**base, **{k: v for k, v in changes.items() if v is not ...}}
    for key, value in changes.items():
        if value is ...:
            del data[key]
    return data


def expect_error(path: Path, key: str, overrides: tuple[str, ...] = ()) -> ParamInvalidError:
    with pytest.raises(ParamInvalidError) as info:
        sc.load(path, overrides)
    err = info.value
    assert err.code == 161002
    assert str(path) in str(err)
    assert key in err.param, (key, str(err))
    return err


# ----------------------------------------------------------------------------- shipped files


def test_expected_scenarios_are_shipped() -> None:
    for name in (
        "seed_gmm_alltoallv_ep4",
        "seed_gmm_alltoallv_ep8",
        "seed_weight_quant_mm_allreduce",
        "deepseek_v3_combine_ep32",
        "deepseek_v3_dispatch_ep64",
        "qwen3_moe_combine",
        "mixtral_8x7b_combine",
        "llama70b_tp8_prefill",
        "llama70b_tp8_decode",
        "llama70b_tp8_w8a8",
        "llama70b_tp8_allgather",
        "llama70b_tp8_ifa_decode",
    ):
        assert name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenario_loads_full_and_small(name: str) -> None:
    full = sc.builtin(name)
    small = sc.builtin(name, ["scale=small"])
    assert full.name == name
    assert full.scale is sc.Scale.FULL and small.scale is sc.Scale.SMALL
    assert "serial" in full.tilings
    assert full.description.strip()
    big, little = full.effective_shape(), small.effective_shape()
    assert set(big) == set(little)
    for key in big:
        assert 1 <= little[key] <= big[key]
    assert little == {**dict(full.shape), **dict(full.small)}
    assert full.world_size(None) == full.ranks
    assert full.load_topology().world_size >= 1


def test_seed_examples_match_the_documentation() -> None:
    for ranks, name in ((4, "seed_gmm_alltoallv_ep4"), (8, "seed_gmm_alltoallv_ep8")):
        s = sc.builtin(name)
        assert s.op is sc.OpName.GMM_ALLTOALLV and s.ranks == ranks
        assert dict(s.shape) == {
            "tokens": 4096,
            "top_k": 2,
            "experts_per_rank": 4,
            "h1": 7168,
            "n1": 4096,
            "h2": 7168,
            "n2": 4096,
        }
        assert "h2" in s.shape and "n2" in s.shape
    w = sc.builtin("seed_weight_quant_mm_allreduce")
    assert (w.op, w.quant, w.dtype, w.ranks) == (
        sc.OpName.MM_ALL_REDUCE,
        sc.QuantMode.WEIGHT_INT8,
        "float16",
        8,
    )
    assert dict(w.shape) == {"m": 32, "k": 64, "n": 128}


def test_deepseek_sizes() -> None:
    combine = sc.builtin("deepseek_v3_combine_ep32")
    assert combine.shape["experts_per_rank"] * combine.ranks == 256
    assert (combine.shape["h1"], combine.shape["n1"], combine.shape["top_k"]) == (2048, 7168, 8)
    dispatch = sc.builtin("deepseek_v3_dispatch_ep64")
    assert dispatch.op is sc.OpName.ALLTOALLV_GMM
    assert dispatch.shape["experts_per_rank"] * dispatch.ranks == 256
    assert dispatch.shape["h1"] == 7168


def test_unknown_builtin_lists_known() -> None:
    with pytest.raises(ParamInvalidError, match="llama70b_tp8_prefill"):
        sc.builtin("no_such_scenario")


# ----------------------------------------------------------------------------- overrides


def test_overrides_of_each_kind(tmp_path: Path) -> None:
    path = write(tmp_path, MOE)
    s = sc.load(
        path,
        [
            "scale=small",
            "ranks=8",
            "shape.h1=224",
            "small.h1=56",
            "routing.skew=1.5",
            "routing.kind=hot",
            "routing.hot_experts=3",
            "routing.hot_fraction=0.25",
            "tilings=serial,4,hardware",
            "repetitions=7",
            "topology=atlas_a2_multinode",
            "standard=double_thousandths",
            "dtype=bfloat16",
        ],
    )
    assert s.scale is sc.Scale.SMALL and s.ranks == 8
    assert s.shape["h1"] == 224 and s.effective_shape()["h1"] == 56
    assert s.effective_shape()["tokens"] == 16
    assert s.routing.kind is RoutingKind.HOT and s.routing.skew == 1.5
    assert s.routing.hot_experts == 3 and s.routing.hot_fraction == 0.25
    assert s.tilings == ("serial", 4, "hardware")
    assert s.repetitions == 7 and s.topology == "atlas_a2_multinode"
    assert s.standard is Standard.DOUBLE_THOUSANDTHS and s.dtype == "bfloat16"


def test_override_adds_shared_expert_and_tp_shape(tmp_path: Path) -> None:
    s = sc.load(write(tmp_path, MOE), ["shape.h2=112", "shape.n2=64"])
    assert "h2" in s.shape and s.shape["n2"] == 64
    t = sc.load(
        write(tmp_path, TP, "t.yaml"), ["shape.m=128", "quant=weight_int4", "op=mm_all_reduce"]
    )
    assert t.shape["m"] == 128 and t.quant is sc.QuantMode.WEIGHT_INT4


def test_with_overrides_matches_load(tmp_path: Path) -> None:
    path = write(tmp_path, TP)
    assert sc.load(path).with_overrides(["shape.n=256", "scale=small"]) == sc.load(
        path, ["shape.n=256", "scale=small"]
    )


def test_a_shape_override_a_small_run_would_ignore_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, TP)  # small: {m: 64}
    with pytest.raises(ParamInvalidError) as err:
        sc.load(path, ["scale=small", "shape.m=256"])
    assert err.value.param == f"{path}: --set shape.m" and err.value.value == 256
    assert "small.m=64 replaces it: set small.m instead" in err.value.rule
    with pytest.raises(ParamInvalidError, match="--set shape.m"):
        sc.load(path).with_overrides(["shape.m=256", "scale=small"])
    # what the run uses: the full shape's m, a key small does not name, or both set
    assert sc.load(path, ["shape.m=256"]).effective_shape()["m"] == 256
    assert sc.load(path, ["scale=small", "shape.n=256"]).effective_shape()["n"] == 256
    both = sc.load(path, ["scale=small", "shape.m=256", "small.m=32"])
    assert both.effective_shape()["m"] == 32 and both.shape["m"] == 256


def test_tilings_override_none_is_hardware(tmp_path: Path) -> None:
    assert sc.load(write(tmp_path, TP), ["tilings=serial,none"]).tilings == ("serial", "hardware")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ranks=eight", "--set ranks"),
        ("ranks=1000", "--set ranks"),
        ("shape.m=abc", "--set shape.m"),
        ("shape.foo=3", "--set shape.foo"),
        ("routing.skew=steep", "--set routing.skew"),
        ("routing.kind=zipfian", "--set routing.kind"),
        ("routing.bogus=1", "--set routing.bogus"),
        ("nonsense=1", "--set nonsense"),
        ("tilings=4,hardware", "--set tilings"),
        ("tilings=serial,99", "--set tilings"),
        ("scale=tiny", "--set scale"),
        ("topology=no_such_machine", "--set topology"),
        ("repetitions=0", "--set repetitions"),
    ],
)
def test_bad_override_names_set_key(tmp_path: Path, override: str, key: str) -> None:
    path = write(tmp_path, MOE)
    with pytest.raises(ParamInvalidError) as info:
        sc.load(path, [override])
    assert info.value.code == 161002
    assert key in str(info.value)
    assert str(path) in str(info.value)


def test_override_without_equals(tmp_path: Path) -> None:
    with pytest.raises(ParamInvalidError, match="KEY=VALUE") as info:
        sc.load(write(tmp_path, TP), ["ranks"])
    assert info.value.code == 161002


def test_routing_override_on_tp_op_names_set(tmp_path: Path) -> None:
    with pytest.raises(ParamInvalidError, match="--set routing.skew"):
        sc.load(write(tmp_path, TP), ["routing.skew=2"])


# ----------------------------------------------------------------------------- validation

BROKEN: list[tuple[dict[str, Any], str, str]] = [
    (with_(MOE, colour="red"), "colour", "allowed"),
    (with_(MOE, ranks=...), "ranks", "required"),
    (with_(MOE, op="matmul_all_gather"), "op", "mm_all_reduce"),
    (with_(MOE, dtype="float32"), "dtype", "bfloat16"),
    (with_(MOE, ranks=0), "ranks", "in [1, 65536]"),
    (with_(TP, ranks=65_537), "ranks", "in [1, 65536]"),
    (with_(MOE, repetitions=0), "repetitions", "in [1, 10000]"),
    (with_(MOE, scale="medium"), "scale", "small"),
    (with_(MOE, standard="close_enough"), "standard", "allclose"),
    (with_(MOE, topology="no_such_machine"), "topology", "atlas_a2_8p"),
    (with_(MOE, tilings=["hardware", 4]), "tilings", "serial"),
    (with_(MOE, tilings=["serial", 17]), "tilings[1]", "[1, 16]"),
    (with_(MOE, tilings=["serial", "fast"]), "tilings[1]", "serial"),
    (with_(MOE, tilings=["serial", None, "hardware"]), "tilings[2]", "repeats"),
    (with_(MOE, tilings="serial"), "tilings", "list"),
    (with_(MOE, routing={"kind": "zipfian"}), "routing.kind", "'balanced'"),
    (with_(MOE, routing={"kind": "zipf", "skew": -1}), "routing.skew", "[0.0"),
    (with_(MOE, routing={"kind": "zipf", "temperature": 2}), "routing.temperature", "skew"),
    (with_(MOE, routing={"kind": "hot", "hot_experts": 17}), "routing.hot_experts", "16"),
    (with_(MOE, shape={**MOE["shape"], "m": 4}), "shape.m", "tokens"),
    (
        with_(MOE, shape={"tokens": 64, "top_k": 2, "h1": 8, "n1": 8}),
        "shape.experts_per_rank",
        "required",
    ),
    (with_(MOE, shape={**MOE["shape"], "experts_per_rank": 33}), "shape.experts_per_rank", "32"),
    (with_(MOE, ranks=128), "ranks", "256"),
    (with_(MOE, shape={**MOE["shape"], "top_k": 1}), "shape.top_k", "[2, 8]"),
    (with_(MOE, shape={**MOE["shape"], "top_k": 9}), "shape.top_k", "[2, 8]"),
    (
        with_(MOE, ranks=1, shape={**MOE["shape"], "experts_per_rank": 2, "top_k": 4}),
        "ranks",
        "top_k",
    ),
    (with_(MOE, shape={**MOE["shape"], "h1": 65536}), "shape.h1", "65535"),
    (with_(MOE, shape={**MOE["shape"], "n1": 65536}), "shape.n1", "65535"),
    (with_(MOE, shape={**MOE["shape"], "h2": 64}), "shape.h2", "both"),
    (with_(MOE, shape={**MOE["shape"], "h2": 12289, "n2": 8}), "shape.h2", "12288"),
    (with_(MOE, shape={**MOE["shape"], "tokens": 0}), "shape.tokens", ">= 1"),
    (with_(MOE, quant="w8a8"), "quant", "must be 'none' for gmm_alltoallv"),
    (with_(MOE, small={"tokens": 65}), "small.tokens", "<="),
    (with_(MOE, small={"m": 1}), "small.m", "key of shape"),
    (with_(MOE, small={"top_k": 1}), "small.top_k", "[2, 8]"),
    (with_(TP, shape={"m": 8, "k": 8}), "shape.n", "required"),
    (with_(TP, shape={"m": 8, "k": 8, "n": 65536}), "shape.n", "65535"),
    (with_(TP, routing={"kind": "uniform"}), "routing", "only applies to ops that route tokens"),
    (
        with_(TP, op="all_gather_matmul", shape={"m": 8, "k": 128, "n": 8}, small={}),
        "shape.k",
        "k must be in [256, 65534]",
    ),
    (
        with_(TP, op="matmul_reduce_scatter", shape={"m": 12, "k": 256, "n": 8}, small={}),
        "ranks",
        "multiple",
    ),
    (with_(TP, op="matmul_reduce_scatter", small={"m": 4}), "ranks", "multiple"),
    (
        with_(TP, op="matmul_reduce_scatter", small={"k": 128}),
        "small.k",
        "k must be in [256, 65534]",
    ),
    (
        with_(TP, quant="weight_int4", shape={"m": 8, "k": 8, "n": 12}, small={}),
        "shape.n",
        "multiple of 8",
    ),
    (with_(TP, quant="int3"), "quant", "weight_int8"),
]


@pytest.mark.parametrize(("data", "key", "words"), BROKEN)
def test_each_rule_names_file_key_and_rule(
    tmp_path: Path, data: dict[str, Any], key: str, words: str
) -> None:
    path = write(tmp_path, data)
    err = expect_error(path, key)
    assert err.param == f"{path}: {key}"
    assert words in err.rule


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ParamInvalidError, match="not valid YAML") as info:
        sc.load(bad)
    assert info.value.code == 161002
    with pytest.raises(ParamInvalidError, match="cannot be read"):
        sc.load(tmp_path / "absent.yaml")


def test_world_size_override_is_checked(tmp_path: Path) -> None:
    s = sc.load(write(tmp_path, MOE))
    assert s.world_size(None) == 4
    assert s.world_size(2) == 2
    with pytest.raises(ParamInvalidError, match="world_size") as info:
        s.world_size(128)
    assert info.value.code == 161002
    rs = sc.load(write(tmp_path, with_(TP, op="matmul_reduce_scatter"), "rs.yaml"))
    with pytest.raises(ParamInvalidError, match="multiple"):
        rs.world_size(3)


def test_topology_path_relative_to_the_file(tmp_path: Path) -> None:
    from mc2sim import topology

    topology.dump(topology.builtin("atlas_a2_8p"), tmp_path / "machine.yaml")
    (tmp_path / "sub").mkdir()
    s = sc.load(write(tmp_path, with_(TP, topology="../machine.yaml"), "sub/x.yaml"))
    assert Path(s.topology).resolve() == (tmp_path / "machine.yaml").resolve()
    assert s.load_topology().name == "atlas_a2_8p"


def test_scenario_is_frozen_and_hashable() -> None:
    s = sc.builtin("llama70b_tp8_prefill")
    with pytest.raises(AttributeError):
        s.ranks = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.shape["m"] = 1  # type: ignore[index]
    assert hash(s) == hash(sc.builtin("llama70b_tp8_prefill"))


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", SHIPPED)
def test_dump_round_trip(tmp_path: Path, name: str) -> None:
    original = sc.builtin(name, ["scale=small"])
    sc.dump(original, tmp_path / "out.yaml")
    assert sc.load(tmp_path / "out.yaml") == original


IFA: dict[str, Any] = {
    "name": "t_ifa",
    "description": "test",
    "op": "ifa",
    "ranks": 2,
    "dtype": "float16",
    "shape": {
        "batch": 4, "heads": 8, "kv_heads": 2, "head_dim": 64, "kv_len": 100, "block_size": 32,
    },
    "tilings": ["serial", 2],
    "topology": "atlas_a2_8p",
    "standard": "double_thousandths",
    "repetitions": 2,
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "key", "rule"),
    [
        ({"kv_heads": 3}, "shape.kv_heads", "must divide heads (8)"),
        ({"batch": 65537}, "shape.batch", "[1, 65536]"),
        ({"block_size": 40}, "shape.block_size", "multiple of 16"),
        ({"block_size": 1024}, "shape.block_size", "[1, 512]"),
        ({"head_dim": 513}, "shape.head_dim", "[1, 512]"),
        ({"m": 4}, "shape.m", "allowed: batch, heads, kv_heads, head_dim, kv_len, block_size"),
    ],
)
def test_ifa_shape_rules(tmp_path: Path, change: dict[str, int], key: str, rule: str) -> None:
    path = write(tmp_path, with_(IFA, shape={**IFA["shape"], **change}))
    with pytest.raises(ParamInvalidError) as info:
        sc.load(path)
    message = str(info.value)
    assert f"{path}: {key}=" in message and rule in message


def test_ifa_takes_no_quant_or_routing(tmp_path: Path) -> None:
    s = sc.load(write(tmp_path, IFA))
    assert s.op is sc.OpName.IFA and not s.routed
    assert sc.SHAPE_KEYS[sc.OpName.IFA][0][0] == "batch"
    with pytest.raises(ParamInvalidError, match="quant"):
        sc.load(write(tmp_path, with_(IFA, quant="w8a8"), "q.yaml"))
    with pytest.raises(ParamInvalidError, match="routing"):
        sc.load(write(tmp_path, with_(IFA, routing={"kind": "zipf", "skew": 1.0}), "r.yaml"))


def test_a_key_given_twice_is_refused_and_a_merge_key_is_not(tmp_path: Path) -> None:
    from mc2sim._yaml import read_yaml

    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {a: 1, c: 3}\nx: {<<: *b, a: 2}\n", encoding="utf-8")
    # the written key overrides the merged one, as YAML's merge says
    assert read_yaml(str(merged)) == {"base": {"a": 1, "c": 3}, "x": {"a": 2, "c": 3}}
    twice = tmp_path / "twice.yaml"
    twice.write_text("x:\n  a: 1\n  b: 2\n  a: 3\n", encoding="utf-8")
    with pytest.raises(ParamInvalidError, match="the key 'a' is given twice") as info:
        read_yaml(str(twice))
    assert info.value.value == "line 4, column 3"
