"""Kernels compute on their inputs' device, return there, and refuse mixed devices (161002).

PyTorch's ``meta`` device stands in for an accelerator on a CPU-only machine: it runs the
kernels' non-CPU paths for shapes and dtypes only, and any hidden copy to the host (``.cpu()``,
``.item()``, ``.tolist()`` of data) fails on it, so these tests also show that the paths read
nothing back. The arithmetic of those paths is checked on a real GPU by ``test_gpu.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from mc2sim.errors import ParamInvalidError
from mc2sim.kernels import (
    grouped_matmul,
    incre_flash_attention,
    matmul,
    quant_matmul,
    weight_quant_batchmatmul,
)

F16, BF16, I8 = torch.float16, torch.bfloat16, torch.int8
META = torch.device("meta")


def t(*shape: int, dtype: torch.dtype = F16, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.ones(*shape, dtype=dtype, device=device)


CASES: dict[str, tuple[Callable[..., torch.Tensor], Callable[[torch.device], dict[str, Any]]]] = {
    "matmul": (matmul, lambda d: {"x1": t(3, 8, device=d), "x2": t(8, 5, device=d)}),
    "matmul_bias_3d": (
        matmul,
        lambda d: {"x1": t(2, 3, 8, device=d), "x2": t(8, 5, device=d), "bias": t(5, device=d)},
    ),
    "grouped_matmul": (
        grouped_matmul,
        lambda d: {"x": t(6, 8, device=d), "weight": t(3, 8, 4, device=d), "group_list": [2, 0, 4]},
    ),
    "grouped_matmul_trans": (
        grouped_matmul,
        lambda d: {
            "x": t(6, 8, dtype=BF16, device=d),
            "weight": t(2, 4, 8, dtype=BF16, device=d),
            "group_list": [1, 5],  # a tensor's counts are read on the host: no meta data
            "trans_weight": True,
        },
    ),
    "weight_quant": (
        weight_quant_batchmatmul,
        lambda d: {
            "x": t(4, 64, device=d),
            "weight": t(64, 16, dtype=I8, device=d),
            "antiquant_scale": t(16, device=d),
            "antiquant_offset": t(16, device=d),
            "bias": t(16, device=d),
        },
    ),
    "weight_quant_int4_group": (
        weight_quant_batchmatmul,
        lambda d: {
            "x": t(4, 64, dtype=BF16, device=d),
            "weight": torch.zeros(64, 2, dtype=torch.int32, device=d),
            "antiquant_scale": t(2, 16, dtype=BF16, device=d),
            "antiquant_group_size": 32,
        },
    ),
    "quant_matmul_fp16": (
        quant_matmul,
        lambda d: {
            "x1": t(2, 3, 32, dtype=I8, device=d),
            "x2": t(32, 8, dtype=I8, device=d),
            "scale": t(8, dtype=torch.float32, device=d),
            "bias": t(8, dtype=torch.int32, device=d),
            "output_dtype": F16,
        },
    ),
    "quant_matmul_int8_out": (
        quant_matmul,
        lambda d: {
            "x1": t(3, 32, dtype=I8, device=d),
            "x2": t(32, 8, dtype=I8, device=d),
            "scale": t(8, dtype=torch.float32, device=d),
            "offset": t(8, dtype=torch.float32, device=d),
        },
    ),
    "quant_matmul_int4": (
        quant_matmul,
        lambda d: {
            "x1": torch.zeros(3, 4, dtype=torch.int32, device=d),
            "x2": torch.zeros(32, 1, dtype=torch.int32, device=d),
            "scale": t(8, dtype=torch.float32, device=d),
            "output_dtype": F16,
        },
    ),
    "ifa_bnsd": (
        incre_flash_attention,
        lambda d: {
            "query": t(2, 4, 1, 16, device=d),
            "key": t(2, 2, 40, 16, device=d),
            "value": t(2, 2, 40, 16, device=d),
            "num_heads": 4,
            "num_key_value_heads": 2,
            "input_layout": "BNSD",
            "actual_seq_lengths": [40, 17],
        },
    ),
    "ifa_bsh_pse": (
        incre_flash_attention,
        lambda d: {
            "query": t(2, 1, 64, dtype=BF16, device=d),
            "key": t(2, 40, 32, dtype=BF16, device=d),
            "value": t(2, 40, 32, dtype=BF16, device=d),
            "pse_shift": t(1, 4, 1, 40, dtype=BF16, device=d),
            "num_heads": 4,
            "num_key_value_heads": 2,
        },
    ),
    "ifa_int8_kv": (
        incre_flash_attention,
        lambda d: {
            "query": t(2, 1, 64, device=d),
            "key": t(2, 40, 32, dtype=I8, device=d),
            "value": t(2, 40, 32, dtype=I8, device=d),
            "antiquant_scale": t(2, 2, 16, device=d),
            "antiquant_offset": t(2, 2, 16, device=d),
            "quant_scale2": t(1, dtype=torch.float32, device=d),
            "num_heads": 4,
            "num_key_value_heads": 2,
            "inner_precise": 0,
        },
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_compute_where_their_inputs_live(case: str) -> None:
    kernel, make = CASES[case]
    on_cpu = kernel(**make(torch.device("cpu")))
    on_meta = kernel(**make(META))
    assert on_meta.device == META
    assert on_meta.shape == on_cpu.shape and on_meta.dtype == on_cpu.dtype


MIXED = [
    ("matmul", "x2", {"x2": t(8, 5, device=META)}),
    ("matmul_bias_3d", "bias", {"bias": t(5, device=META)}),
    ("grouped_matmul", "weight", {"weight": t(3, 8, 4, device=META)}),
    ("grouped_matmul", "group_list", {"group_list": torch.tensor([2, 0, 4], device=META)}),
    ("weight_quant", "weight", {"weight": t(64, 16, dtype=I8, device=META)}),
    ("weight_quant", "antiquant_offset", {"antiquant_offset": t(16, device=META)}),
    ("weight_quant", "bias", {"bias": t(16, device=META)}),
    ("quant_matmul_fp16", "scale", {"scale": t(8, dtype=torch.float32, device=META)}),
    ("quant_matmul_int8_out", "offset", {"offset": t(8, dtype=torch.float32, device=META)}),
    ("ifa_bnsd", "key", {"key": t(2, 2, 40, 16, device=META)}),
    ("ifa_bsh_pse", "pse_shift", {"pse_shift": t(1, 4, 1, 40, dtype=BF16, device=META)}),
    ("ifa_int8_kv", "antiquant_scale", {"antiquant_scale": t(2, 2, 16, device=META)}),
]


@pytest.mark.parametrize(
    ("case", "param", "override"), MIXED, ids=[f"{c}-{p}" for c, p, _ in MIXED]
)
def test_mixed_devices_are_refused_naming_the_parameter(
    case: str, param: str, override: dict[str, Any]
) -> None:
    kernel, make = CASES[case]
    with pytest.raises(ParamInvalidError) as info:
        kernel(**{**make(torch.device("cpu")), **override})
    assert info.value.code == 161002
    assert info.value.param == f"{param}.device"
    assert "meta" in str(info.value) and "cpu" in str(info.value)


def test_from_host_on_the_cpu_keeps_values_and_casts_to_the_dtype() -> None:
    """On the CPU ``from_host`` is the host tensor itself, in the asked dtype."""
    from mc2sim.kernels._device import from_host

    t = from_host([[1, 2], [3, 4]], torch.device("cpu"), torch.int32)
    assert t.dtype == torch.int32 and t.device.type == "cpu" and t.tolist() == [[1, 2], [3, 4]]
    given = torch.tensor([True, False])
    assert from_host(given, torch.device("cpu")) is given
    assert from_host(given, torch.device("cpu"), torch.int64).tolist() == [1, 0]


def test_cpu_gemm_is_a_float32_product_whatever_the_strides() -> None:
    """The float64 product within float32 summation error, for a transposed view too."""
    from mc2sim.kernels._device import cpu_gemm

    g = torch.Generator().manual_seed(7)
    a = torch.randn(37, 64, generator=g)
    b = torch.randn(29, 64, generator=g).t()  # a transposed view
    exact = a.double() @ b.double()
    got = cpu_gemm(a, b)
    assert got.dtype == torch.float32 and got.shape == (37, 29)
    bound = 64 * torch.finfo(torch.float32).eps * (a.abs().double() @ b.abs().double())
    assert ((got.double() - exact).abs() <= bound).all()
    # integers below 2**24 sum exactly, in any order (the int8 paths rely on it)
    ints_a = torch.randint(-128, 128, (16, 200), generator=g).float()
    ints_b = torch.randint(-128, 128, (200, 8), generator=g).float()
    assert torch.equal(cpu_gemm(ints_a, ints_b), (ints_a.double() @ ints_b.double()).float())
