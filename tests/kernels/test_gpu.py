"""Every kernel and fused op (one rank) on a CUDA GPU, checked two ways.

Each result must lie on the GPU, match the independent float64 golden by the standard its
tier uses (device-rounded where the device rounds), and match the kernel's own CPU result:
bitwise where the arithmetic is exact (integer products, identical float32 elementwise steps),
else within an ulp or two (float32 summation order, libm's exp) with nearly every element
equal. Marked ``gpu``; skipped where there is no CUDA device (CI has none)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python -m pytest -m gpu tests/kernels
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from mc2sim import golden, ops
from mc2sim.comm import Communicator
from mc2sim.compare import check
from mc2sim.kernels import (
    convert_weight_to_int4pack,
    grouped_matmul,
    incre_flash_attention,
    matmul,
    quant_matmul,
    trans_quant_param,
    unpack_int4,
    weight_quant_batchmatmul,
)
from tests.kernels.test_ifa import _kv, _loop_oracle, _paged, _paged_call, _query, _run
from tests.kernels.test_weight_quant import oracle as wq_oracle

DEVICE = torch.device(os.environ.get("MC2SIM_GPU_TEST_DEVICE", "cuda"))
"""The GPU; ``MC2SIM_GPU_TEST_DEVICE=cpu`` dry-runs the tests' own logic on the CPU."""

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
    ),
]

F16, BF16, F32, I8, I32 = torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.int32
HALF = [F16, BF16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(
    g: torch.Generator, *shape: int, dtype: torch.dtype = F16, scale: float = 1.0
) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def ints(
    g: torch.Generator, *shape: int, lo: int = -128, hi: int = 128, dtype: torch.dtype = I8
) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=g, dtype=dtype)


def cuda(*tensors: torch.Tensor | None) -> list[Any]:
    """The tensors on the GPU, None kept (Any: each one is what its argument was)."""
    return [None if t is None else t.to(DEVICE) for t in tensors]


def assert_like_cpu(
    on_gpu: torch.Tensor, on_cpu: torch.Tensor, *, ulps: float = 1.0, equal: float = 0.99
) -> None:
    """On the GPU, and the CPU result but for float32 summation order and libm (``ulps``)."""
    assert on_gpu.device.type == DEVICE.type
    got = on_gpu.cpu()
    assert got.dtype == on_cpu.dtype and got.shape == on_cpu.shape
    if not got.dtype.is_floating_point:
        assert torch.equal(got, on_cpu)
        return
    same = (got == on_cpu) | (got.isnan() & on_cpu.isnan())
    assert same.double().mean() >= equal, f"{same.double().mean():.4f} equal"
    ref = on_cpu.double()
    floor = ref.abs().max().clamp_min(1e-30) * 2.0**-8  # near-zero outputs: the sum's scale
    spacing = torch.finfo(on_cpu.dtype).eps * torch.maximum(ref.abs(), floor)
    assert ((got.double() - ref).abs() <= ulps * spacing).all()


# -- kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
def test_matmul(dtype: torch.dtype) -> None:
    g = gen(1)
    x1, x2, bias = (
        rand(g, 3, 40, 256, dtype=dtype),
        rand(g, 96, 256, dtype=dtype).t(),
        rand(g, 96, dtype=dtype),
    )
    out = matmul(x1.to(DEVICE), x2.to(DEVICE), bias=bias.to(DEVICE))
    cpu = matmul(x1, x2, bias=bias)
    exact = x1.double() @ x2.double() + bias.double()
    if dtype == F32:  # no rounding to a narrower dtype: summation order shows
        assert out.device.type == DEVICE.type
        torch.testing.assert_close(out.cpu(), cpu, rtol=1e-5, atol=1e-4)
        return
    assert_like_cpu(out, cpu)
    verdict = check(out.cpu(), exact.numpy(), "double_thousandths")
    assert verdict.passed, verdict.summary()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("trans", [False, True], ids=["w", "wT"])
def test_grouped_matmul(dtype: torch.dtype, trans: bool) -> None:
    g = gen(2)
    counts = [40, 0, 17, 71]
    x = rand(g, sum(counts), 128, dtype=dtype)
    w = rand(g, 4, *((64, 128) if trans else (128, 64)), dtype=dtype, scale=0.1)
    out = grouped_matmul(x.to(DEVICE), w.to(DEVICE), counts, trans_weight=trans)
    cpu = grouped_matmul(x, w, counts, trans_weight=trans)
    assert_like_cpu(out, cpu)
    starts = np.cumsum([0, *counts])
    exact = torch.cat(
        [
            x[starts[j] : starts[j + 1]].double() @ (w[j].t() if trans else w[j]).double()
            for j in range(4)
        ]
    )
    verdict = check(out.cpu(), exact.numpy(), "double_thousandths")
    assert verdict.passed, verdict.summary()
    group_tensor = grouped_matmul(
        x.to(DEVICE), w.to(DEVICE), torch.tensor(counts).to(DEVICE), trans_weight=trans
    )
    assert torch.equal(group_tensor, out)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("n", [256, 2048], ids=["all_tiles_cut", "last_wave_cut"])
def test_grouped_matmul_splits_the_last_wave_along_k(dtype: torch.dtype, n: int) -> None:
    """The bench's uneven experts: tiles cut along K sum to the per-expert float32 result."""
    gmm_triton = pytest.importorskip("mc2sim.kernels._gmm_triton")
    g = gen(12)
    counts = [576, 585, 732, 364, 561, 548, 318, 412]
    h = 1024
    x = rand(g, sum(counts), h, dtype=dtype)
    w = rand(g, len(counts), h, n, dtype=dtype, scale=0.05)
    tiles = len(gmm_triton.row_tiles(counts, gmm_triton.BLOCK_M)) // 3 * (n // gmm_triton.BLOCK_N)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    whole, split = gmm_triton.plan_split(tiles, h, sms)
    assert split > 1 and (whole == 0) == (tiles < sms), "the case must cut tiles along K"
    out = grouped_matmul(x.to(DEVICE), w.to(DEVICE), counts)
    # the per-expert path: one float32-output GEMM per expert, rounded once
    starts = np.cumsum([0, *counts])
    per_expert = torch.cat(
        [
            (x[starts[j] : starts[j + 1]].float() @ w[j].float()).to(dtype)
            for j in range(len(counts))
        ]
    )
    assert_like_cpu(out, per_expert, ulps=1.0, equal=0.95)
    exact = torch.cat(
        [x[starts[j] : starts[j + 1]].double() @ w[j].double() for j in range(len(counts))]
    )
    verdict = check(out.cpu(), exact.numpy(), "double_thousandths")
    assert verdict.passed, verdict.summary()
    # the same product from CUTLASS's grouped GEMM (no split), where torch has it
    if hasattr(torch, "_grouped_mm"):
        from mc2sim.kernels.grouped_matmul import _cuda_grouped_gemm

        cutlass = _cuda_grouped_gemm(x.to(DEVICE), w.to(DEVICE), counts, False)
        if cutlass is not None:
            assert_like_cpu(out, cutlass.cpu(), ulps=1.0, equal=0.95)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    "case", ["int8_per_tensor", "int8_per_group_offset", "int4_per_channel", "int4_nz"]
)
def test_weight_quant_batchmatmul(dtype: torch.dtype, case: str) -> None:
    g = gen(3)
    m, k, n = 24, 256, 64
    bits = 4 if case.startswith("int4") else 8
    values = ints(g, k, n, lo=-8 if bits == 4 else -128, hi=8 if bits == 4 else 128, dtype=I32)
    kwargs: dict[str, Any] = {}
    if case == "int4_nz":  # seed 000: the transposed weight packed to FRACTAL_NZ
        weight = convert_weight_to_int4pack(values.t().contiguous(), out_format="FRACTAL_NZ")
        kwargs = {"weight_shape": (k, n), "weight_transposed": True}
    elif bits == 4:
        weight = convert_weight_to_int4pack(values)
    else:
        weight = values.to(I8)
    shape, group = {
        "int8_per_tensor": ((1,), 0),
        "int8_per_group_offset": ((k // 64, n), 64),
        "int4_per_channel": ((n,), 0),
        "int4_nz": ((n,), 0),
    }[case]
    x = rand(g, m, k, dtype=dtype)
    scale = (torch.rand(shape, generator=g) * 0.05 + 0.01).to(dtype)
    offset = rand(g, *shape, dtype=dtype) if "offset" in case or bits == 4 else None
    bias = rand(g, n, dtype=dtype)
    args = (scale, offset)
    scale_on_gpu, offset_on_gpu = cuda(*args)
    out = weight_quant_batchmatmul(
        x.to(DEVICE),
        weight.to(DEVICE),
        scale_on_gpu,
        offset_on_gpu,
        bias=bias.to(DEVICE),
        antiquant_group_size=group,
        **kwargs,
    )
    cpu = weight_quant_batchmatmul(
        x, weight, *args, bias=bias, antiquant_group_size=group, **kwargs
    )
    assert_like_cpu(out, cpu)
    device = wq_oracle(x, values.numpy(), scale, offset, bias=bias, group_size=group)
    assert (out.cpu() == torch.from_numpy(device).to(dtype)).double().mean() >= 0.99


def test_weight_quant_int8_output() -> None:
    g = gen(4)
    x, w = rand(g, 20, 64), ints(g, 64, 16)
    scale = (torch.rand(16, generator=g) * 0.02).half()
    qs = trans_quant_param(torch.rand(16, generator=g) * 0.5, torch.randn(16, generator=g) * 4)
    out = weight_quant_batchmatmul(
        x.to(DEVICE), w.to(DEVICE), scale.to(DEVICE), quant_scale=qs.to(DEVICE)
    )
    cpu = weight_quant_batchmatmul(x, w, scale, quant_scale=qs)
    assert out.dtype == I8
    assert (out.cpu() == cpu).double().mean() >= 0.99 and (
        out.cpu().int() - cpu.int()
    ).abs().max() <= 1


QUANT_CASES: dict[str, dict[str, Any]] = {
    "int8->fp16 float scale, int32 bias": dict(
        x1=(5, 300), x2=(300, 24), scale="f32", bias="i32", out=F16
    ),
    "int8->int8 int64 scale + offset": dict(x1=(33, 64), x2=(64, 9), scale="i64+off", out=None),
    "int8->int8 float scale + offset": dict(
        x1=(40, 96), x2=(96, 16), scale="f32", offset=True, out=None
    ),
    "int8->bf16 pertoken bf16 bias": dict(
        x1=(3, 17, 128), x2=(128, 40), scale="bf16", pertoken=True, bias="bf16", out=BF16
    ),
    "int8->fp16 pertoken batched": dict(
        x1=(2, 1, 19, 64), x2=(3, 64, 8), scale="f32", pertoken=True, out=F16
    ),
    "int8->int32 large k": dict(x1=(18, 4000), x2=(4000, 32), scale="f32", out=I32),
}


@pytest.mark.parametrize("case", sorted(QUANT_CASES))
def test_quant_matmul_is_bitwise_the_cpu_result(case: str) -> None:
    spec = QUANT_CASES[case]
    g = gen(5)
    x1, x2 = ints(g, *spec["x1"]), ints(g, *spec["x2"])
    n, m = x2.shape[-1], x1.shape[-2]
    raw = torch.rand(n, generator=g) * 1e-3 + 1e-4
    kwargs: dict[str, object] = {"output_dtype": spec["out"]}
    if spec["scale"] == "i64+off":
        scale = trans_quant_param(raw * 50, torch.randn(n, generator=g) * 20)
    elif spec["scale"] == "bf16":
        scale = raw.to(BF16)
    else:
        scale = raw * (50 if spec["out"] is None else 1)
    if spec.get("offset"):
        kwargs["offset"] = torch.randn(n, generator=g) * 30
    if spec.get("pertoken"):
        kwargs["pertoken_scale"] = torch.rand(m, generator=g) + 0.5
    if spec.get("bias") == "i32":
        kwargs["bias"] = ints(g, n, lo=-1000, hi=1000, dtype=I32)
    elif spec.get("bias") == "bf16":
        kwargs["bias"] = rand(g, n, dtype=BF16)
    on_gpu = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    out = quant_matmul(x1.to(DEVICE), x2.to(DEVICE), scale.to(DEVICE), **on_gpu)  # type: ignore[arg-type]
    cpu = quant_matmul(x1, x2, scale, **kwargs)  # type: ignore[arg-type]
    assert out.device.type == DEVICE.type
    assert torch.equal(out.cpu(), cpu)


@pytest.mark.parametrize("x2_transposed", [False, True])
def test_int4_pack_and_quant_matmul(x2_transposed: bool) -> None:
    g = gen(6)
    v1, v2 = ints(g, 5, 64, lo=-8, hi=8, dtype=I32), ints(g, 64, 24, lo=-8, hi=8, dtype=I32)
    x1 = convert_weight_to_int4pack(v1.to(DEVICE))
    x2 = (
        convert_weight_to_int4pack(v2.t().contiguous().to(DEVICE)).t()
        if x2_transposed
        else convert_weight_to_int4pack(v2.to(DEVICE))
    )
    assert x1.device.type == DEVICE.type and torch.equal(x1.cpu(), convert_weight_to_int4pack(v1))
    nz = convert_weight_to_int4pack(v2.to(DEVICE), out_dtype="int4", out_format="FRACTAL_NZ")
    assert torch.equal(
        unpack_int4(nz, (64, 24), packed_dtype="int4", packed_format="FRACTAL_NZ").cpu(), v2
    )
    scale = torch.rand(24, generator=g) * 0.1
    out = quant_matmul(x1, x2, scale.to(DEVICE), output_dtype=F16)
    assert torch.equal(out.cpu(), quant_matmul(x1.cpu(), x2.cpu(), scale, output_dtype=F16))


def _ifa_both(**kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on the GPU and on the CPU, same arguments."""

    def move(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return value.to(DEVICE)
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            return [t.to(DEVICE) for t in value]
        return value

    gpu_args = {k: move(v) for k, v in kwargs.items()}
    return incre_flash_attention(**gpu_args), incre_flash_attention(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("layout", ["BSH", "BNSD", "BSND"])
def test_ifa_dense_layouts_with_mask_and_pse(dtype: torch.dtype, layout: str) -> None:
    g = gen(7)
    b, n, nkv, d, s = 3, 8, 2, 64, 300
    q, k, v = (
        rand(g, b, n, d, dtype=dtype),
        rand(g, b, nkv, s, d, dtype=dtype),
        rand(g, b, nkv, s, d, dtype=dtype),
    )
    mask = torch.rand(b, s, generator=g) < 0.1
    pse = rand(g, 1, n, 1, s, dtype=dtype, scale=0.5)
    lengths = [300, 171, 5]
    out, cpu = _ifa_both(
        query=_query(q, layout), key=_kv(k, layout), value=_kv(v, layout), atten_mask=mask,
        pse_shift=pse, actual_seq_lengths=lengths, num_heads=n, num_key_value_heads=nkv,
        scale_value=d**-0.5, input_layout=layout,
    )  # fmt: skip
    assert_like_cpu(out, cpu, ulps=2, equal=0.97)
    ref = _loop_oracle(
        q, list(k), list(v), scale=d**-0.5, windows=[(0, x) for x in lengths], mask=mask,
        pse=pse[:, :, 0], probs_dtype=dtype,
    )  # fmt: skip
    verdict = check(out.cpu().reshape(b, n, d), ref, "allclose")
    assert verdict.passed, verdict.summary()


@pytest.mark.parametrize("heads_first", [False, True])
def test_ifa_paged_and_list_kv(heads_first: bool) -> None:
    g = gen(8)
    b, n, nkv, d, block, s = 3, 4, 2, 32, 32, 160
    lengths = [160, 75, 0]
    q, k, v = rand(g, b, n, d), rand(g, b, nkv, s, d), rand(g, b, nkv, s, d)
    perm = torch.randperm(12, generator=g)
    kc, table = _paged(k, lengths, block, heads_first=heads_first, perm=perm, garbage=float("nan"))
    vc, _ = _paged(v, lengths, block, heads_first=heads_first, perm=perm, garbage=float("nan"))
    layout = "BNSD" if heads_first else "BSH"
    out, cpu = _ifa_both(
        query=_query(q, layout), key=kc, value=vc, block_table=table, actual_seq_lengths=lengths,
        block_size=block, num_heads=n, num_key_value_heads=nkv, scale_value=0.2, input_layout=layout,
    )  # fmt: skip
    assert_like_cpu(out, cpu, ulps=2, equal=0.97)
    assert not out.isnan().any() and not out[2].any()
    listed, listed_cpu = _ifa_both(
        query=_query(q, "BSH"), key=[_kv(k[i : i + 1], "BSH") for i in range(b)],
        value=[_kv(v[i : i + 1], "BSH") for i in range(b)], actual_seq_lengths=lengths,
        num_heads=n, num_key_value_heads=nkv, scale_value=0.2,
    )  # fmt: skip
    assert_like_cpu(listed, listed_cpu, ulps=2, equal=0.97)


@pytest.mark.parametrize("inner_precise", [0, 1])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_ifa_int8_kv_and_int8_output(inner_precise: int, dtype: torch.dtype) -> None:
    g = gen(9)
    b, n, nkv, d, s = 2, 8, 2, 64, 1500  # two chunks of the int8 value product
    q = rand(g, b, n, d, dtype=dtype)
    k, v = ints(g, b, nkv, s, d), ints(g, b, nkv, s, d)
    scale = (torch.rand(2, nkv, 1, d, generator=g) * 0.02 + 0.005).to(dtype)
    offset = (torch.randn(2, nkv, 1, d, generator=g) * 3).round().to(dtype)
    common = dict(
        query=_query(q, "BNSD"), key=k, value=v, antiquant_scale=scale, antiquant_offset=offset,
        num_heads=n, num_key_value_heads=nkv, scale_value=d**-0.5, input_layout="BNSD",
        inner_precise=inner_precise,
    )  # fmt: skip
    out, cpu = _ifa_both(**common)
    assert_like_cpu(out, cpu, ulps=2, equal=0.97)
    sc, of = scale.double().numpy(), offset.double().numpy()
    exact = _loop_oracle(
        q,
        list(k),
        list(v),
        scale=d**-0.5,
        windows=[(0, s)] * b,
        kv_affine=(sc[0], of[0], sc[1], of[1]),
    )
    verdict = check(out.cpu().reshape(b, n, d), exact, "allclose")
    assert verdict.passed, verdict.summary()
    q8, q8_cpu = _ifa_both(
        **common, quant_scale2=torch.tensor([40.0]), quant_offset2=torch.tensor([1.0])
    )
    assert q8.dtype == I8 and (q8.cpu().int() - q8_cpu.int()).abs().max() <= 1


@pytest.mark.parametrize("kv_dtype", [F16, I8], ids=str)
def test_ifa_a_remembered_cuda_table_changed_unseen_raises_before_any_gather(
    monkeypatch: pytest.MonkeyPatch, kv_dtype: torch.dtype
) -> None:
    """A remembered CUDA table changed unseen is checked where the torch path reads it.

    The table's check is remembered, then it is written through ``.data`` (torch's version
    counter unchanged): the entries the torch composition reads on the host are checked again,
    so an entry out of the cache raises 161002 instead of indexing on the device.
    """
    from mc2sim.errors import ParamInvalidError
    from mc2sim.kernels import _ifa_plan
    from mc2sim.kernels import ifa as ifa_module

    if DEVICE.type != "cuda":
        pytest.skip("a CUDA table is the one whose check is remembered")
    monkeypatch.setattr(_ifa_plan, "_CHECKED_TABLES", {})
    monkeypatch.setattr(ifa_module, "FUSED_CUDA_KERNEL", False)
    call = {
        name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
        for name, value in _paged_call(kv_dtype=kv_dtype).items()
    }
    table = call["block_table"]  # [[0, 1], [2, 3]]; lengths [40, 20], block 32, 4 blocks
    assert isinstance(table, torch.Tensor)
    first = _run(call)
    assert id(table) in _ifa_plan._CHECKED_TABLES  # remembered: the next call does not read it
    version = table._version
    table.data[1, 0] = 7
    assert table._version == version
    with pytest.raises(ParamInvalidError) as info:
        _run(call)
    assert info.value.code == 161002
    assert str(info.value) == "block_table[1][0]=7: must be a block index in [0, blocknum=4)"
    table.data[1, 0] = 2
    assert torch.equal(_run(call), first)
    torch.cuda.synchronize()  # no device-side error was left behind


def _fused_and_torch(
    monkeypatch: pytest.MonkeyPatch, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton kernels and the torch composition on the GPU, same arguments.

    Asserts the first call took the fused kernels and the second did not.
    """
    from mc2sim.kernels import ifa as ifa_module

    pytest.importorskip("triton")
    if DEVICE.type != "cuda":
        pytest.skip("the fused kernels need CUDA")
    from mc2sim.kernels import _ifa_triton

    calls: list[int] = []
    real = _ifa_triton.run

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_ifa_triton, "run", counted)
    fused = incre_flash_attention(**kwargs)  # type: ignore[arg-type]
    assert calls == [1], "the fused kernels did not run"
    # a second call launches the compiled kernels directly, not through Triton's launcher
    # (and, without mask, pse or padding, skips the checks its first call passed)
    assert torch.equal(incre_flash_attention(**kwargs), fused)  # type: ignore[arg-type]
    assert calls == [1, 1], "the second call did not run the fused kernels"
    calls.pop()
    monkeypatch.setattr(ifa_module, "FUSED_CUDA_KERNEL", False)
    composed = incre_flash_attention(**kwargs)  # type: ignore[arg-type]
    assert calls == [1]
    return fused, composed


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    ("layout", "group", "padding"),
    [("BSH", 4, False), ("BNSD", 1, True), ("BSND", 8, False), ("BNSD", 16, False)],
)
def test_ifa_fused_kernel_is_the_torch_path_dense(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, layout: str, group: int, padding: bool
) -> None:
    """Dense KV, GQA, mask, pse, lengths (one empty), left padding: fused == composed."""
    g = gen(15)
    b, nkv, d, s = 4, 2, 128, 1100
    n = nkv * group
    q, k, v = (
        rand(g, b, n, d, dtype=dtype),
        rand(g, b, nkv, s, d, dtype=dtype),
        rand(g, b, nkv, s, d, dtype=dtype),
    )
    mask = torch.rand(b, s, generator=g) < 0.1
    pse = rand(g, b, n, 1, s, dtype=dtype, scale=0.5)
    lengths = [1100, 613, 0, 64] if not padding else [1000, 613, 0, 64]
    pad = 37
    kwargs = dict(
        query=_query(q, layout).to(DEVICE), key=_kv(k, layout).to(DEVICE),
        value=_kv(v, layout).to(DEVICE), atten_mask=mask.to(DEVICE),
        pse_shift=pse.to(DEVICE), actual_seq_lengths=lengths, num_heads=n,
        num_key_value_heads=nkv, scale_value=d**-0.5, input_layout=layout,
    )  # fmt: skip
    if padding:
        kwargs["kv_padding_size"] = torch.tensor([pad]).to(DEVICE)
    fused, composed = _fused_and_torch(monkeypatch, **kwargs)
    assert fused.dtype == dtype and fused.shape == composed.shape
    assert_like_cpu(fused, composed.cpu(), ulps=2, equal=0.97)
    windows = [(s - pad - x, s - pad) if padding else (0, x) for x in lengths]
    ref = _loop_oracle(
        q, list(k), list(v), scale=d**-0.5, windows=windows, mask=mask, pse=pse[:, :, 0],
        probs_dtype=dtype,
    )  # fmt: skip
    verdict = check(fused.cpu().reshape(b, n, d), ref, "allclose")
    assert verdict.passed, verdict.summary()
    assert not fused.reshape(b, -1)[2].any()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("heads_first", [False, True])
@pytest.mark.parametrize("block", [16, 128])
def test_ifa_fused_kernel_is_the_torch_path_paged(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, heads_first: bool, block: int
) -> None:
    """Page attention (shuffled blocks, NaN garbage past the windows): fused == composed."""
    g = gen(16)
    b, n, nkv, d = 3, 16, 4, 64
    lengths = [700, 129, 0]
    s = 768
    q, k, v = (
        rand(g, b, n, d, dtype=dtype),
        rand(g, b, nkv, s, d, dtype=dtype),
        rand(g, b, nkv, s, d, dtype=dtype),
    )
    blocknum = sum(-(-x // block) for x in lengths) + 3
    perm = torch.randperm(blocknum, generator=g)
    kc, table = _paged(k, lengths, block, heads_first=heads_first, perm=perm, garbage=float("nan"))
    vc, _ = _paged(v, lengths, block, heads_first=heads_first, perm=perm, garbage=float("nan"))
    layout = "BNSD" if heads_first else "BSH"
    fused, composed = _fused_and_torch(
        monkeypatch, query=_query(q, layout).to(DEVICE), key=kc.to(DEVICE), value=vc.to(DEVICE),
        block_table=table.to(DEVICE), actual_seq_lengths=lengths, block_size=block,
        num_heads=n, num_key_value_heads=nkv, scale_value=d**-0.5, input_layout=layout,
    )  # fmt: skip
    assert not fused.isnan().any() and not fused.reshape(b, -1)[2].any()
    assert_like_cpu(fused, composed.cpu(), ulps=2, equal=0.97)
    ref = _loop_oracle(
        q, [k[i, :, : lengths[i]] for i in range(b)], [v[i, :, : lengths[i]] for i in range(b)],
        scale=d**-0.5, windows=[(0, x) for x in lengths], probs_dtype=dtype,
    )  # fmt: skip
    verdict = check(fused.cpu().reshape(b, n, d), ref, "allclose")
    assert verdict.passed, verdict.summary()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("s", [48, 1000])
def test_ifa_rounds_the_probabilities_where_the_device_does(dtype: torch.dtype, s: int) -> None:
    """exp(s - max) in the query's dtype before the values, over the window's own maximum.

    As tests/kernels/test_ifa.py's CPU test, on the GPU (the fused kernels where Triton
    imports; at S=1000 the positions are split over many programs): nearly every output is
    the device-rounded float64 oracle rounded once; float32 probabilities throughout would
    differ from it in a large share.
    """
    g = gen(18)
    b, n, nkv, d = 8, 8, 2, 16
    q, k, v = (
        rand(g, b, n, d, dtype=dtype),
        rand(g, b, nkv, s, d, dtype=dtype),
        rand(g, b, nkv, s, d, dtype=dtype),
    )
    out = incre_flash_attention(
        _query(q, "BNSD").to(DEVICE), k.to(DEVICE), v.to(DEVICE), num_heads=n,
        num_key_value_heads=nkv, scale_value=0.5, input_layout="BNSD",
    )  # fmt: skip
    windows = [(0, s)] * b
    device = _loop_oracle(q, list(k), list(v), scale=0.5, windows=windows, probs_dtype=dtype)
    exact = _loop_oracle(q, list(k), list(v), scale=0.5, windows=windows)
    got = out.cpu().double().reshape(b, -1)
    rounded = torch.from_numpy(device).to(dtype).double().reshape(b, -1)
    assert (got == rounded).double().mean() >= 0.99
    plain = torch.from_numpy(exact).to(dtype).double().reshape(b, -1)
    assert (got != plain).double().mean() >= 0.2


@pytest.mark.parametrize("paged", [False, True], ids=["dense_bsh", "paged_bnsd"])
def test_ifa_fused_kernel_repeats_a_checked_call_for_other_data(
    monkeypatch: pytest.MonkeyPatch, paged: bool
) -> None:
    """A call of a checked call's key (other caches, same shapes) skips the checks, not the data.

    Its output is bitwise the one of the same call checked from scratch (the remembered
    launches forgotten), and a new table of that key with an entry out of range still raises
    161002.
    """
    from mc2sim.errors import ParamInvalidError
    from mc2sim.kernels import _ifa_plan
    from mc2sim.kernels import ifa as ifa_module

    pytest.importorskip("triton")
    if DEVICE.type != "cuda":
        pytest.skip("the fused kernels need CUDA")
    b, n, nkv, d, s, block = 3, 8, 2, 64, 512, 32
    lengths = [500, 33, 0] if paged else [512, 200, 1]
    layout = "BNSD" if paged else "BSH"

    def call(seed: int) -> dict[str, Any]:
        g = gen(seed)
        q, k, v = rand(g, b, n, d), rand(g, b, nkv, s, d), rand(g, b, nkv, s, d)
        kwargs: dict[str, Any] = dict(
            query=_query(q, layout).to(DEVICE), num_heads=n, num_key_value_heads=nkv,
            scale_value=d**-0.5, input_layout=layout, actual_seq_lengths=lengths,
        )  # fmt: skip
        if paged:
            perm = torch.randperm(b * s // block, generator=g)
            kc, table = _paged(k, lengths, block, heads_first=True, perm=perm, garbage=float("nan"))
            vc, _ = _paged(v, lengths, block, heads_first=True, perm=perm, garbage=float("nan"))
            kwargs.update(key=kc.to(DEVICE), value=vc.to(DEVICE), block_table=table.to(DEVICE),
                          block_size=block)  # fmt: skip
        else:
            kwargs.update(key=_kv(k, layout).to(DEVICE), value=_kv(v, layout).to(DEVICE))
        return kwargs

    planned: list[int] = []
    real_plan = _ifa_plan.plan_incre_flash_attention  # the one ifa imports

    def counted(*args: Any, **kwargs: Any) -> Any:
        planned.append(1)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(ifa_module, "plan_incre_flash_attention", counted)
    monkeypatch.setattr(ifa_module, "_CHECKED", {})
    incre_flash_attention(**call(1))
    other = call(2)
    repeated = incre_flash_attention(**other)
    assert planned == [1], "the second call was checked again"
    monkeypatch.setattr(ifa_module, "_CHECKED", {})
    assert torch.equal(repeated, incre_flash_attention(**other))
    assert planned == [1, 1]
    assert not repeated.isnan().any()
    if paged:
        bad = other["block_table"].clone()
        bad[1, 0] = b * s // block  # one past the last block, in use by batch 1
        with pytest.raises(ParamInvalidError) as info:
            incre_flash_attention(**dict(other, block_table=bad))
        assert info.value.code == 161002 and "block_table[1][0]" in str(info.value)
        assert planned == [1, 1], "the bad table was caught by the full checks, not the repeat"


def test_ifa_fused_kernel_on_a_reused_table_rechecks_an_in_place_change() -> None:
    """A CUDA block table checked once is not re-read; an in-place change is (161002)."""
    from mc2sim.errors import ParamInvalidError

    g = gen(17)
    q, kv = rand(g, 2, 1, 4 * 32), rand(g, 6, 16, 4 * 32)
    table = torch.tensor([[0, 1], [2, 3]], dtype=I32).to(DEVICE)
    call = dict(
        query=q.to(DEVICE), key=kv.to(DEVICE), value=kv.to(DEVICE), block_table=table,
        actual_seq_lengths=[32, 20], block_size=16, num_heads=4,
    )  # fmt: skip
    first = incre_flash_attention(**call)  # type: ignore[arg-type]
    assert torch.equal(incre_flash_attention(**call), first)  # type: ignore[arg-type]
    table[1, 1] = 6
    with pytest.raises(ParamInvalidError) as info:
        incre_flash_attention(**call)  # type: ignore[arg-type]
    assert info.value.code == 161002 and "block_table[1][1]" in str(info.value)


# -- fused ops, one rank -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def comm() -> Iterator[Communicator]:
    from mc2sim.comm import init

    yield init("torch")  # a world of one: NCCL on this GPU


def _golden_check(out: torch.Tensor, expected: np.ndarray, standard: str = "allclose") -> None:
    assert out.device.type == DEVICE.type
    verdict = check(out.cpu(), expected, standard)
    assert verdict.passed, verdict.summary()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_mm_all_reduce_modes(comm: Communicator, dtype: torch.dtype) -> None:
    g = gen(10)
    m, k, n = 300, 256, 96
    x1, x2, bias, x3 = (
        rand(g, m, k, dtype=dtype, scale=0.1),
        rand(g, k, n, dtype=dtype, scale=0.1),
        rand(g, n, dtype=dtype),
        rand(g, m, n, dtype=dtype),
    )
    out = ops.mm_all_reduce(
        x1.to(DEVICE), x2.to(DEVICE), comm, bias=bias.to(DEVICE), x3=x3.to(DEVICE)
    )
    _golden_check(out, golden.mm_all_reduce([x1], [x2], bias=[bias], x3=[x3], local_dtype=dtype))
    # weight-quant: int8 per-group with offset, and seed 000's int4 FRACTAL_NZ transposed weight
    w8 = ints(g, k, n)
    scale = (torch.rand(k // 64, n, generator=g) * 0.02 + 0.005).to(dtype)
    offset = rand(g, k // 64, n, dtype=dtype)
    out = ops.mm_all_reduce(
        x1.to(DEVICE), w8.to(DEVICE), comm, antiquant_scale=scale.to(DEVICE), antiquant_offset=offset.to(DEVICE),
        antiquant_group_size=64, bias=bias.to(DEVICE),
    )  # fmt: skip
    _golden_check(
        out,
        golden.mm_all_reduce(
            [x1], [w8], bias=[bias], antiquant_scale=[scale], antiquant_offset=[offset],
            antiquant_group_size=64, local_dtype=dtype,
        ),
    )  # fmt: skip
    v4 = ints(g, k, n, lo=-8, hi=8, dtype=I32)
    nz = convert_weight_to_int4pack(v4.t().contiguous(), out_format="FRACTAL_NZ")
    s4 = (torch.rand(n, generator=g) * 0.05).to(dtype)
    out = ops.mm_all_reduce(
        x1.to(DEVICE),
        nz.to(DEVICE),
        comm,
        antiquant_scale=s4.to(DEVICE),
        x2_shape=(k, n),
        x2_transposed=True,
    )
    _golden_check(
        out,
        golden.mm_all_reduce(
            [x1], [nz], antiquant_scale=[s4], x2_shape=(k, n), x2_transposed=True, local_dtype=dtype
        ),
    )


def test_mm_all_reduce_quant(comm: Communicator) -> None:
    g = gen(11)
    x1, x2 = ints(g, 70, 128), ints(g, 128, 32)
    raw = torch.rand(32, generator=g) * 1e-3 + 1e-4
    pertoken = torch.rand(70, generator=g) + 0.5
    bias = ints(g, 32, lo=-500, hi=500, dtype=I32)
    for scale, pt, out_dtype in (
        (trans_quant_param(raw), None, F16),
        (raw.to(BF16), pertoken, BF16),
    ):
        x3 = rand(g, 70, 32, dtype=out_dtype)
        out = ops.mm_all_reduce(
            x1.to(DEVICE), x2.to(DEVICE), comm, dequant_scale=scale.to(DEVICE), bias=bias.to(DEVICE), x3=x3.to(DEVICE),
            pertoken_scale=None if pt is None else pt.to(DEVICE),
        )  # fmt: skip
        assert out.dtype == out_dtype
        _golden_check(
            out,
            golden.mm_all_reduce(
                [x1], [x2], bias=[bias], x3=[x3], dequant_scale=[scale],
                pertoken_scale=None if pt is None else [pt], local_dtype=out_dtype,
            ),
        )  # fmt: skip


def test_all_gather_matmul_and_matmul_reduce_scatter(comm: Communicator) -> None:
    g = gen(12)
    x1, x2, bias = rand(g, 64, 256, scale=0.25), rand(g, 48, 256, scale=0.25).t(), rand(g, 48)
    out, gathered = ops.all_gather_matmul(x1.to(DEVICE), x2.to(DEVICE), comm, 1, bias.to(DEVICE))
    expected, _ = golden.all_gather_matmul([x1], x2, bias)
    _golden_check(out, expected)
    assert gathered is not None and gathered.device.type == DEVICE.type
    out = ops.matmul_reduce_scatter(x1.to(DEVICE), x2.to(DEVICE), comm, 1, bias=bias.to(DEVICE))
    _golden_check(out, golden.matmul_reduce_scatter(0, [x1], [x2], [bias], local_dtype=F16))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_moe_ops(comm: Communicator, dtype: torch.dtype) -> None:
    g = gen(13)
    e, h1, n1, bs, h2, n2 = 3, 64, 48, 16, 32, 24
    send = [10, 0, 22]  # top-K 2: 32 routed rows for 16 tokens
    gmm_x, weight = rand(g, 32, h1, dtype=dtype), rand(g, e, n1, h1, dtype=dtype, scale=0.2)
    mm_x, mm_w = rand(g, bs, h2, dtype=dtype), rand(g, h2, n2, dtype=dtype, scale=0.2)
    y, mm_y = ops.gmm_alltoallv(
        gmm_x.to(DEVICE), weight.to(DEVICE), comm, 1, send, send, mm_x=mm_x.to(DEVICE), mm_weight=mm_w.to(DEVICE),
        trans_gmm_weight=True,
    )  # fmt: skip
    gy, gmm = golden.gmm_alltoallv(
        0, [gmm_x], [weight], [send], trans_gmm_weight=True, mm_x=mm_x, mm_weight=mm_w
    )
    _golden_check(y, gy)
    assert mm_y is not None and gmm is not None
    _golden_check(mm_y, gmm)
    gmm_y, _, permuted = ops.alltoallv_gmm(
        gmm_x.to(DEVICE),
        weight.to(DEVICE),
        comm,
        1,
        send,
        send,
        trans_gmm_weight=True,
        permute_out_flag=True,
    )
    gy, _, gperm = golden.alltoallv_gmm(0, [gmm_x], weight, [send], trans_gmm_weight=True)
    _golden_check(gmm_y, gy)
    assert permuted is not None and np.array_equal(permuted.double().cpu().numpy(), gperm)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_ifa_decode(comm: Communicator, dtype: torch.dtype) -> None:
    g = gen(14)
    batch, heads, kv_heads, dim, block, per_seq = 6, 8, 1, 128, 32, 8
    blocks = batch * per_seq + 2
    table = torch.randperm(blocks, generator=g)[: batch * per_seq].reshape(batch, per_seq).to(I32)
    lengths = [256, 250, 1, 0, 129, 200]
    q = rand(g, batch, 1, heads * dim, dtype=dtype)
    kc = rand(g, blocks, block, kv_heads * dim, dtype=dtype)
    vc = rand(g, blocks, block, kv_heads * dim, dtype=dtype)
    expected = golden.ifa_paged(
        q, kc, vc, table, lengths, num_heads=heads, num_kv_heads=kv_heads, scale=dim**-0.5,
        probs_dtype=dtype,
    )  # fmt: skip
    for tiling in ("serial", 3):
        out = ops.ifa_decode(
            q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), comm, block_table=table.to(DEVICE),
            actual_seq_lengths=lengths, num_heads=heads, num_key_value_heads=kv_heads,
            block_size=block, scale_value=dim**-0.5, tiling=tiling,
        )  # fmt: skip
        # allclose: double_thousandths is relative, and cancellation leaves outputs near 0
        _golden_check(out, expected)


def test_metadata_reaches_the_device_without_waiting_for_queued_kernels() -> None:
    """``from_host`` (the kernels' index and offset lists) never blocks on queued GPU work.

    A blocking host-to-device copy waits for every kernel before it; with 4 GEMMs of 8192^3
    queued (milliseconds), the stream must still be busy when ``from_host`` returns, and the
    copied values must be right once it drains.
    """
    from mc2sim.kernels._device import from_host

    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA stream to queue work on")
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for _ in range(4):
        a = a @ a / 8192
    moved = [from_host([i, i + 1, i + 2], DEVICE, torch.int32) for i in range(50)]
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy, "from_host waited for the queued GEMMs"
    assert all(m.device.type == DEVICE.type and m.dtype == torch.int32 for m in moved)
    assert [m.tolist() for m in moved] == [[i, i + 1, i + 2] for i in range(50)]
