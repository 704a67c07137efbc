"""Topologies: shipped files, YAML round trip, rank geometry and every loader error."""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mc2sim.errors import ParamInvalidError
from mc2sim.topology import (
    Contention,
    Device,
    Efficiency,
    LinkKind,
    NetworkDim,
    Topology,
    builtin,
    builtin_dir,
    dump,
    list_builtin,
    load,
)

# The shipped files and the world sizes docs/TOPOLOGY.md gives for them.
SHIPPED_WORLD = {
    "atlas_a2_8p": 8,
    "atlas_a2_multinode": 32,
    "atlas_a3_superpod_16": 16,
    "atlas_a3_superpod_384": 384,
    "h200_8x_nvlink": 8,
}


def device(**kw: Any) -> Device:
    args: dict[str, Any] = {
        "name": "Test NPU",
        "matrix_tflops": {"float16": 100.0, "int8": 200.0},
        "vector_tflops": 10.0,
        "memory_gbps": 1000.0,
        "efficiency": Efficiency(small_util=0.5, large_util=0.9, half_flops=1e9),
        "launch_us": 1.0,
    }
    args.update(kw)
    return Device(**args)


def two_level(inner: int = 4, outer: int = 3) -> Topology:
    return Topology(
        name="two_level",
        description="4 ranks per node on a mesh, 3 nodes on a switch",
        device=device(),
        network=(
            NetworkDim(kind=LinkKind.FULL_MESH, ranks=inner, bandwidth_gbps=30.0, latency_us=2.0),
            NetworkDim(
                kind=LinkKind.SWITCH, ranks=outer, bandwidth_gbps=25.0, latency_us=5, name="roce"
            ),
        ),
        contention=Contention(compute_slowdown=1.25, comm_slowdown=1.5, source="made up"),
        source="test",
    )


def valid_data() -> dict[str, Any]:
    """Plain data of a valid two-dimension topology file."""
    return {
        "name": "t",
        "description": "d",
        "source": "s",
        "device": {
            "name": "NPU",
            "matrix_tflops": {"float16": 300.0, "int8": 600},
            "vector_tflops": 20.0,
            "memory_gbps": 1600.0,
            "launch_us": 2.0,
            "efficiency": {"small_util": 0.65, "large_util": 0.85, "half_flops": 2.0e9},
        },
        "network": [
            {
                "name": "hccs",
                "kind": "full_mesh",
                "ranks": 8,
                "bandwidth_gbps": 28.0,
                "latency_us": 5,
            },
            {"name": "roce", "kind": "switch", "ranks": 2, "bandwidth_gbps": 25.0, "latency_us": 5},
        ],
        "contention": {"compute_slowdown": 1.0, "comm_slowdown": 1.0, "source": "assumed"},
    }


def write(tmp_path: Path, data: Any, name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- shipped files


def test_every_documented_file_is_shipped() -> None:
    assert set(SHIPPED_WORLD) <= set(list_builtin())
    assert builtin_dir().name == "topologies"


def test_an_install_without_the_source_tree_finds_the_shipped_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mc2sim import _yaml

    # the package in site-packages, no topologies/ beside it; the wheel's data files under
    # the environment's share/mc2sim (pyproject.toml's data-files)
    site = tmp_path / "env" / "lib" / "site-packages"
    (site / "mc2sim").mkdir(parents=True)
    monkeypatch.setattr(_yaml, "__file__", str(site / "mc2sim" / "_yaml.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))
    assert list_builtin() == []  # nothing shipped anywhere yet
    assert builtin_dir() == site / "topologies"  # errors name the source tree's folder
    shared = tmp_path / "env" / "share" / "mc2sim" / "topologies"
    shared.mkdir(parents=True)
    shutil.copy(Path(__file__).parents[2] / "topologies" / "atlas_a2_8p.yaml", shared)
    assert builtin_dir() == shared and list_builtin() == ["atlas_a2_8p"]
    assert builtin("atlas_a2_8p").world_size == 8
    # a source tree beside the package wins (a checkout, an editable install)
    (site / "topologies").mkdir()
    assert builtin_dir() == site / "topologies"


@pytest.mark.parametrize("name", list_builtin())
def test_shipped_file_loads_and_round_trips(name: str, tmp_path: Path) -> None:
    topo = builtin(name)
    assert topo.name == name  # a shipped file is named after its file
    if name in SHIPPED_WORLD:
        assert topo.world_size == SHIPPED_WORLD[name]
    assert topo.source.strip() and topo.contention.source.strip()
    if not name.startswith("this_machine"):  # accelerators: small tiles underuse the unit
        assert topo.device.efficiency.small_util <= topo.device.efficiency.large_util
    out = tmp_path / f"{name}.yaml"
    dump(topo, out)
    assert load(out) == topo


def test_shipped_figures_match_their_derivations() -> None:
    a2 = builtin("atlas_a2_8p")
    # 24 cube cores x 4096 MAC/cycle x 2 FLOP x 1.8 GHz (docs/OPS.md, CANN platform config)
    assert a2.device.matrix_peak("float16") == pytest.approx(24 * 4096 * 2 * 1.8e9, rel=1e-3)
    assert a2.device.matrix_peak("int8") == 2 * a2.device.matrix_peak("float16")
    assert (a2.device.efficiency.small_util, a2.device.efficiency.large_util) == (0.65, 0.85)
    assert a2.network[0].kind is LinkKind.FULL_MESH and a2.network[0].bandwidth_gbps == 28.0
    multi = builtin("atlas_a2_multinode")
    assert [d.ranks for d in multi.network] == [8, 4]
    assert multi.network[1].bytes_per_s == 25e9  # 200 Gb/s
    a3 = builtin("atlas_a3_superpod_384")
    assert [d.ranks for d in a3.network] == [16, 24]
    assert a3.device.matrix_peak("bfloat16") == 376e12
    assert a3.with_world(768).network[-1].ranks == 48  # the whole SuperPoD
    h200 = builtin("h200_8x_nvlink")
    assert h200.device.matrix_peak("bfloat16") == 989e12
    assert h200.device.memory_bytes_per_s == 4.8e12
    assert h200.network[0].bytes_per_s == 450e9


def test_builtin_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ParamInvalidError) as info:
        builtin("no_such_machine")
    assert info.value.code == 161002
    assert "no_such_machine" in str(info.value) and "atlas_a2_8p" in str(info.value)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_of_a_two_level_topology(tmp_path: Path) -> None:
    topo = two_level()
    path = tmp_path / "t.yaml"
    dump(topo, path)
    again = load(path)
    assert again == topo
    assert hash(again) == hash(topo)
    assert again.network[1].kind is LinkKind.SWITCH
    assert list(yaml.safe_load(path.read_text())) == [
        "name",
        "description",
        "source",
        "device",
        "network",
        "contention",
    ]
    assert os.listdir(tmp_path) == ["t.yaml"]  # no temporary file left behind


def test_dump_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("old contents")
    dump(two_level(), path)
    assert load(path) == two_level()


texts = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\x85\u2028\u2029"),
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(
    description=texts,
    source=texts,
    bandwidth=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
    half_flops=st.floats(min_value=0, max_value=1e15, allow_nan=False),
    ranks=st.integers(min_value=1, max_value=64),
)
def test_round_trip_keeps_any_text_and_number(
    tmp_path_factory: pytest.TempPathFactory,
    description: str,
    source: str,
    bandwidth: float,
    half_flops: float,
    ranks: int,
) -> None:
    base = two_level()
    topo = Topology(
        name="x",
        description=description,
        source=source,
        device=device(efficiency=Efficiency(small_util=0.1, large_util=0.3, half_flops=half_flops)),
        network=(
            NetworkDim(kind=LinkKind.RING, ranks=ranks, bandwidth_gbps=bandwidth, latency_us=0),
        ),
        contention=base.contention,
    )
    path = tmp_path_factory.mktemp("rt") / "x.yaml"
    dump(topo, path)
    assert load(path) == topo


# ----------------------------------------------------------------------------- geometry


def test_dim_of_and_group_size_by_hand() -> None:
    topo = two_level()  # 4 x 3: ranks 0-3 node 0, 4-7 node 1, 8-11 node 2
    assert topo.world_size == 12
    assert [topo.group_size(d) for d in (-1, 0, 1)] == [1, 4, 12]
    assert topo.coords(7) == (3, 1)
    assert topo.dim_of(5, 5) == -1
    assert topo.dim_of(0, 3) == 0
    assert topo.dim_of(5, 7) == 0
    assert topo.dim_of(3, 4) == 1
    assert topo.dim_of(0, 4) == 1
    assert topo.dim_of(1, 9) == 1


def test_dim_of_three_levels_by_hand() -> None:
    dims = tuple(
        NetworkDim(kind=LinkKind.FULL_MESH, ranks=r, bandwidth_gbps=1.0, latency_us=0.0)
        for r in (2, 3, 2)
    )
    topo = Topology(
        name="t3",
        description="",
        device=device(),
        network=dims,
        contention=Contention(),
        source="",
    )
    # rank = c0 + 2 * (c1 + 3 * c2)
    assert topo.coords(7) == (1, 0, 1)
    assert topo.coords(9) == (1, 1, 1)
    assert topo.dim_of(7, 1) == 2
    assert topo.dim_of(7, 6) == 0
    assert topo.dim_of(7, 9) == 1
    assert [topo.group_size(d) for d in (0, 1, 2)] == [2, 6, 12]
    # every pair against an independent oracle: NumPy's Fortran-order unravel
    shape = (2, 3, 2)
    for a in range(12):
        ca = np.unravel_index(a, shape, order="F")
        assert topo.coords(a) == tuple(int(c) for c in ca)
        for b in range(12):
            cb = np.unravel_index(b, shape, order="F")
            diff = [i for i in range(3) if ca[i] != cb[i]]
            assert topo.dim_of(a, b) == (max(diff) if diff else -1)


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda t: t.dim_of(0, 12), "rank_b"),
        (lambda t: t.dim_of(-1, 0), "rank_a"),
        (lambda t: t.dim_of(True, 0), "rank_a"),
        (lambda t: t.coords(12), "rank"),
        (lambda t: t.group_size(2), "dim"),
        (lambda t: t.group_size(-2), "dim"),
    ],
)
def test_geometry_rejects_out_of_range(call: Any, param: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        call(two_level())
    assert info.value.code == 161002 and info.value.param == param


def test_with_world_resizes_the_outermost_dimension() -> None:
    topo = two_level()
    bigger = topo.with_world(20)
    assert [d.ranks for d in bigger.network] == [4, 5]
    assert bigger.network[0] == topo.network[0]
    assert bigger.network[1].bandwidth_gbps == topo.network[1].bandwidth_gbps
    assert (bigger.device, bigger.contention, bigger.name) == (
        topo.device,
        topo.contention,
        topo.name,
    )
    assert [d.ranks for d in topo.network] == [4, 3]  # the original is untouched
    assert topo.with_world(4).world_size == 4
    single = builtin("h200_8x_nvlink").with_world(3)
    assert single.world_size == 3


@pytest.mark.parametrize("n", [6, 0, -4, 2.0])
def test_with_world_refuses_a_non_multiple(n: Any) -> None:
    with pytest.raises(ParamInvalidError) as info:
        two_level().with_world(n)
    assert info.value.code == 161002 and info.value.param == "world_size"


# ----------------------------------------------------------------------------- device


def test_efficiency_curve() -> None:
    eff = Efficiency(small_util=0.65, large_util=0.85, half_flops=2e9)
    assert eff.util(0) == 0.65
    assert eff.util(2e9) == pytest.approx(0.75)
    assert eff.util(6e9) == pytest.approx(0.65 + 0.2 * 0.75)
    assert eff.util(math.inf) == 0.85
    assert eff.util(1e300) == pytest.approx(0.85)
    values = [eff.util(f) for f in np.logspace(3, 15, 25)]
    assert values == sorted(values)
    assert Efficiency(small_util=0.5, large_util=0.9, half_flops=0).util(0) == 0.9
    # a time-shared CPU: short tasks run on a whole core, long ones share it
    falling = Efficiency(small_util=1.0, large_util=0.4, half_flops=1e8)
    assert falling.util(0) == 1.0 and falling.util(1e8) == pytest.approx(0.7)
    assert falling.util(math.inf) == 0.4
    for bad in (-1.0, math.nan):
        with pytest.raises(ParamInvalidError):
            eff.util(bad)


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"small_util": 1.1, "large_util": 0.8, "half_flops": 1}, "small_util"),
        ({"small_util": 0.0, "large_util": 0.8, "half_flops": 1}, "small_util"),
        ({"small_util": 0.5, "large_util": 1.5, "half_flops": 1}, "large_util"),
        ({"small_util": 0.5, "large_util": 0.8, "half_flops": -1}, "half_flops"),
        ({"small_util": 0.5, "large_util": math.inf, "half_flops": 1}, "large_util"),
    ],
)
def test_efficiency_validation(kw: dict[str, float], param: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        Efficiency(**kw)
    assert info.value.code == 161002 and info.value.param == param


def test_matrix_peak_and_half_precision_fallback() -> None:
    dev = device()
    assert dev.matrix_peak("float16") == 100e12
    assert dev.matrix_peak("bfloat16") == 100e12  # only float16 given: same rate
    assert dev.matrix_peak("int8") == 200e12
    with pytest.raises(ParamInvalidError) as info:
        dev.matrix_peak("float32")
    assert info.value.code == 161002 and info.value.param == "dtype"
    assert "float32" in str(info.value) and "float16, int8" in str(info.value)
    assert dev.vector_peak == 10e12 and dev.memory_bytes_per_s == 1e12 and dev.launch_s == 1e-6


def test_device_table_is_copied_and_read_only() -> None:
    table = {"float16": 100.0}
    dev = device(matrix_tflops=table)
    table["float16"] = 1.0
    assert dev.matrix_peak("float16") == 100e12
    with pytest.raises(TypeError):
        dev.matrix_tflops["float16"] = 5.0  # type: ignore[index]


@pytest.mark.parametrize(
    ("factory", "param"),
    [
        (lambda: device(matrix_tflops={}), "matrix_tflops"),
        (lambda: device(matrix_tflops={"fp16": 1.0}), "matrix_tflops.fp16"),
        (lambda: device(matrix_tflops={"float16": 0.0}), "matrix_tflops.float16"),
        (lambda: device(memory_gbps=-1), "memory_gbps"),
        (lambda: device(launch_us=-0.5), "launch_us"),
        (lambda: device(name=""), "name"),
        (
            lambda: NetworkDim(kind=cast(Any, "torus"), ranks=2, bandwidth_gbps=1, latency_us=0),
            "kind",
        ),
        (lambda: NetworkDim(kind=LinkKind.RING, ranks=0, bandwidth_gbps=1, latency_us=0), "ranks"),
        (
            lambda: NetworkDim(
                kind=LinkKind.RING, ranks=cast(Any, 2.0), bandwidth_gbps=1, latency_us=0
            ),
            "ranks",
        ),
        (
            lambda: NetworkDim(kind=LinkKind.RING, ranks=2, bandwidth_gbps=0, latency_us=0),
            "bandwidth_gbps",
        ),
        (
            lambda: NetworkDim(kind=LinkKind.RING, ranks=2, bandwidth_gbps=1, latency_us=-1),
            "latency_us",
        ),
        (lambda: Contention(compute_slowdown=0.9), "compute_slowdown"),
        (lambda: Contention(comm_slowdown=True), "comm_slowdown"),
        (lambda: replace(two_level(), network=()), "network"),
        (lambda: replace(two_level(), network=cast(Any, (two_level().device,))), "network[0]"),
        (lambda: replace(two_level(), contention=cast(Any, None)), "contention"),
    ],
)
def test_constructor_validation(factory: Any, param: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        factory()
    assert info.value.code == 161002 and info.value.param == param


# ----------------------------------------------------------------------------- loader errors


def mutate(data: dict[str, Any], path: str, value: Any) -> None:
    """Set (or with ``value is DELETE`` remove) ``path`` such as ``network[1].kind``."""
    parts = path.replace("]", "").replace("[", ".").split(".")
    node: Any = data
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    [
        # unknown keys
        ("colour", "blue", "colour", ["unknown key", "allowed", "network"]),
        ("device.frequency", 1.8, "device.frequency", ["unknown key", "memory_gbps"]),
        ("network[1].bandwith_gbps", 1.0, "network[1].bandwith_gbps", ["bandwidth_gbps"]),
        ("contention.note", "x", "contention.note", ["unknown key"]),
        ("device.efficiency.mid", 0.7, "device.efficiency.mid", ["half_flops"]),
        # missing keys
        ("device.memory_gbps", DELETE, "device.memory_gbps", ["required"]),
        ("network[0].kind", DELETE, "network[0].kind", ["required"]),
        ("contention.source", DELETE, "contention.source", ["required"]),
        ("source", DELETE, "source", ["required"]),
        # bad kind, lists the allowed ones
        ("network[1].kind", "torus", "network[1].kind", ["'full_mesh'", "'ring'", "'switch'"]),
        # out of range
        ("network[1].bandwidth_gbps", -1.0, "network[1].bandwidth_gbps", ["> 0"]),
        ("network[0].ranks", 0, "network[0].ranks", [">= 1"]),
        ("network[0].latency_us", -2, "network[0].latency_us", [">= 0"]),
        ("device.efficiency.small_util", 1.5, "device.efficiency.small_util", ["(0, 1]"]),
        ("device.matrix_tflops.float16", 0, "device.matrix_tflops.float16", ["> 0"]),
        ("device.matrix_tflops.fp16", 1.0, "device.matrix_tflops.fp16", ["bfloat16"]),
        ("contention.comm_slowdown", 0.5, "contention.comm_slowdown", [">= 1"]),
        ("network", [], "network", ["at least one"]),
        # wrong types
        ("network[0].ranks", 8.5, "network[0].ranks", ["integer"]),
        ("network[0].ranks", True, "network[0].ranks", ["integer"]),
        ("network[0].bandwidth_gbps", "fast", "network[0].bandwidth_gbps", ["number"]),
        ("name", 3, "name", ["string"]),
        ("device.launch_us", [1], "device.launch_us", ["number"]),
        # non-mappings where a mapping is due
        ("device", ["a", "b"], "device", ["mapping", "list"]),
        ("device.efficiency", 0.7, "device.efficiency", ["mapping"]),
        ("device.matrix_tflops", [300.0], "device.matrix_tflops", ["mapping"]),
        ("network[1]", "roce", "network[1]", ["mapping"]),
        ("contention", None, "contention", ["mapping"]),
        ("network", {"kind": "ring"}, "network", ["list"]),
    ],
)
def test_loader_errors_name_file_and_field(
    tmp_path: Path, path: str, value: Any, field: str, words: list[str]
) -> None:
    data = valid_data()
    mutate(data, path, value)
    file = write(tmp_path, data, "bad.yaml")
    with pytest.raises(ParamInvalidError) as info:
        load(file)
    err = info.value
    assert err.code == 161002
    assert err.param == f"{file}: {field}"
    message = str(err)
    assert message.startswith(f"{file}: {field}=")
    for word in words:
        assert word in message


def test_loader_accepts_the_valid_data_and_numeric_text(tmp_path: Path) -> None:
    data = valid_data()
    topo = load(write(tmp_path, data))
    assert topo.world_size == 16 and topo.device.efficiency.half_flops == 2e9
    assert topo.network[0].latency_us == 5.0 and isinstance(topo.network[0].latency_us, float)
    # YAML 1.1 reads 2e9 as a string; the loader takes it as the number it means
    path = tmp_path / "numeric.yaml"
    path.write_text(
        write(tmp_path, data).read_text().replace("half_flops: 2000000000.0", "half_flops: 2e9")
    )
    assert "half_flops: 2e9" in path.read_text()
    assert load(path) == topo
    del data["network"][0]["name"]  # name is optional
    assert load(write(tmp_path, data)).network[0].name == ""


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: [unclosed\n", ["not valid YAML", "line"]),
        ("- a\n- b\n", ["mapping", "list"]),
        ("just a string\n", ["mapping", "str"]),
        ("", ["mapping", "NoneType"]),
    ],
)
def test_loader_errors_for_bad_yaml_and_non_mapping(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text(text)
    with pytest.raises(ParamInvalidError) as info:
        load(file)
    assert info.value.code == 161002
    assert str(info.value).startswith(str(file))
    for word in words:
        assert word in str(info.value)


def test_loader_error_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamInvalidError) as info:
        load(tmp_path / "absent.yaml")
    assert info.value.code == 161002 and "absent.yaml" in str(info.value)


# ----------------------------------------------------------------------------- speed


@pytest.mark.parametrize(
    ("name", "scenario", "world", "turns"),
    [
        ("this_machine_4ranks", "seed_gmm_alltoallv_ep4", 4, False),
        ("this_machine_4ranks", "seed_gmm_alltoallv_ep4", 4, True),
        ("this_machine", "llama70b_tp8_decode", 2, False),
        ("atlas_a2_multinode", "llama70b_tp8_prefill", 16, False),
    ],
)
@pytest.mark.parametrize("speed", [0.5, 1.7])
def test_at_speed_scales_every_simulated_time_by_its_inverse(
    name: str, scenario: str, world: int, turns: bool, speed: float
) -> None:
    from mc2sim.model.simulator import simulate_waits
    from mc2sim.scenario import builtin as scenario_of
    from mc2sim.study.simulate import plans_for
    from mc2sim.topology import CoreSharing

    topo = builtin(name).with_world(world)
    if turns:  # ranks taking turns on the cores: the slice is how long a rank holds one
        topo = replace(topo, device=replace(topo.device, core_sharing=CoreSharing.TURNS))
    sc = scenario_of(scenario, ["scale=small"])
    for tiling in sc.tilings:
        plans = plans_for(sc, world, tiling)
        before = simulate_waits(plans, topo)[0]
        after = simulate_waits(plans, topo.at_speed(speed))[0]
        assert after.metrics().total_s == pytest.approx(before.metrics().total_s / speed, rel=1e-9)
        ends = sorted(r.end_s for r in before.records)
        assert sorted(r.end_s for r in after.records) == pytest.approx(
            [e / speed for e in ends], rel=1e-9, abs=1e-15
        )


def test_at_speed_keeps_a_wires_cap_and_carries_the_probe() -> None:
    topo = two_level()
    capped = replace(topo, network=(topo.network[0], replace(topo.network[1], link_gbps=3.0)))
    probed = replace(capped, device=replace(capped.device, probe_tflops=0.2))
    slow = probed.at_speed(0.5)
    assert slow.network[1].link_gbps == 3.0
    assert slow.network[1].bandwidth_gbps == probed.network[1].bandwidth_gbps * 0.5
    assert slow.network[0].latency_us == probed.network[0].latency_us * 2
    assert slow.device.probe_tflops == pytest.approx(0.1)
    assert slow.device.launch_us == probed.device.launch_us * 2
    assert probed.at_speed(1.0) is probed
    for bad in (0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ParamInvalidError, match="speed"):
            probed.at_speed(bad)  # type: ignore[arg-type]


def test_probe_tflops_round_trips_through_yaml_and_is_checked(tmp_path: Path) -> None:
    from mc2sim.topology import dump, load

    topo = builtin("this_machine_4ranks")
    probed = replace(topo, device=replace(topo.device, probe_tflops=0.205))
    dump(probed, tmp_path / "p.yaml")
    assert "probe_tflops: 0.205" in (tmp_path / "p.yaml").read_text()
    assert load(tmp_path / "p.yaml") == probed
    dump(replace(probed, device=replace(probed.device, probe_tflops=0.0)), tmp_path / "n.yaml")
    left = yaml.safe_load((tmp_path / "n.yaml").read_text())["device"]
    assert "probe_tflops" not in left  # not measured: left out
    text = (tmp_path / "p.yaml").read_text().replace("probe_tflops: 0.205", "probe_tflops: -1")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ParamInvalidError, match="probe_tflops"):
        load(tmp_path / "bad.yaml")


def test_every_device_figure_takes_part_in_its_hash() -> None:
    """Two devices that differ in any one figure hash apart.

    Every field has a changed value below, so a field added to Device without one fails here.
    """
    import dataclasses

    from mc2sim.topology import CoreSharing, ProfilePoint

    base = device(cores_per_node=2.0, slice_us=100.0)
    changed: dict[str, Any] = {
        "name": "Other NPU",
        "matrix_tflops": {"float16": 101.0},
        "vector_tflops": 11.0,
        "memory_gbps": 1001.0,
        "efficiency": Efficiency(small_util=0.6, large_util=0.9, half_flops=1e9),
        "launch_us": 2.0,
        "reduce_gbps": 5.0,
        "memory_traffic": 5.0,
        "memory_overlap": False,
        "concurrent_collectives": True,
        "one_at_a_time": ("allreduce",),
        "cores_per_node": 4.0,
        "issue_us": 3.0,
        "shared_issue_us": 4.0,
        "shared_latency_us": 5.0,
        "issue_extra_us": {"alltoallv": 1.0},
        "issue_gbps": 2.0,
        "slice_us": 200.0,
        "core_sharing": CoreSharing.TURNS,
        "waiting_weight": 0.5,
        "warm_us": {"matmul": 10.0},
        "profile": (ProfilePoint(kind="matmul", dtype="float16", flops=1, bytes=1, us=1.0),),
        "reductions_in_float32": True,
        "rank_spread": 1.2,
        "lone_memory_speedup": 1.5,
        "probe_tflops": 0.1,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(Device)}
    for name, value in changed.items():
        other = replace(base, **{name: value})
        assert other != base, name
        assert hash(other) != hash(base), name
