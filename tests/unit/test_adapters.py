"""The adapters' argument mapping, with fakes of torch_npu and torch.ops.symm_mem that record calls.

Each adapter is called the way ``mc2sim check`` calls an implementation: with the arguments
a scenario's real case holds (:meth:`mc2sim.ops.spec.RealCase.call`), so the test sees the
mapping of mc2sim's real arguments, not of arguments written for the test. The fakes record
each call (positional arguments and keywords) and return tensors of the op's output shape.
"""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from mc2sim.adapters import symm_mem
from mc2sim.adapters import torch_npu as npu_adapters
from mc2sim.ops.spec import RealCase
from mc2sim.scenario import load


class OneRank:
    """A communicator of one rank: enough for a real case's golden."""

    rank, size = 0, 1

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]


class Recorder:
    """A fake library function: records its calls, returns ``result(args, kwargs)``."""

    def __init__(self, result: Any) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.result = result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.result(args, kwargs)


def case(tmp_path: Path, op: str, shape: str, *extra: str) -> RealCase:
    text = f"""
        name: adapter_{op}
        description: an adapter's arguments
        op: {op}
        ranks: 1
        dtype: bfloat16
        shape: {shape}
        quant: none
        tilings: [serial]
        topology: this_machine
        standard: allclose
        repetitions: 1
    """
    path = tmp_path / f"{op}.yaml"
    path.write_text(textwrap.dedent(text))
    sc = load(path, extra)
    return sc.spec.real_case(sc, OneRank(), torch.Generator().manual_seed(0))  # type: ignore[arg-type]


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A torch_npu of recorders; the adapters' device is the CPU and hcom a fixed name."""
    fake = types.SimpleNamespace()
    module = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(npu_adapters, "_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(npu_adapters, "hcom_of", lambda comm: "hccl-comm-0")
    reduced: list[torch.Tensor] = []

    def all_reduce(comm: Any, y: torch.Tensor) -> torch.Tensor:
        reduced.append(y)
        return y

    monkeypatch.setattr(npu_adapters, "_all_reduce", all_reduce)
    fake.module, fake.reduced = module, reduced
    return fake


def test_mm_all_reduce_base_gets_mc2sims_arguments_under_torch_npus_names(
    tmp_path: Path, fake_npu: types.SimpleNamespace
) -> None:
    real = case(tmp_path, "mm_all_reduce", "{m: 16, k: 64, n: 32}", "quant=weight_int8",
                "shape.group_size=32")  # fmt: skip
    x1, x2, _ = real.args
    out = torch.zeros(real.expected.shape, dtype=torch.bfloat16)
    fake_npu.module.npu_mm_all_reduce_base = rec = Recorder(lambda a, k: out)
    assert real.call(npu_adapters.npu_mm_all_reduce_base) is out
    ((args, kwargs),) = rec.calls
    assert args[0] is x1 and args[1] is x2 and args[2] == "hccl-comm-0"
    assert kwargs["antiquant_scale"] is real.kwargs["antiquant_scale"]
    assert kwargs["antiquant_offset"] is real.kwargs["antiquant_offset"]
    assert kwargs["antiquant_group_size"] == 32
    assert kwargs["reduce_op"] == "sum" and kwargs["comm_turn"] == 0
    assert kwargs["bias"] is None and kwargs["x3"] is None and kwargs["dequant_scale"] is None
    assert "pertoken_scale" not in kwargs  # older torch_npu has no such keyword


def test_weight_quant_batchmatmul_then_all_reduce(
    tmp_path: Path, fake_npu: types.SimpleNamespace
) -> None:
    real = case(tmp_path, "mm_all_reduce", "{m: 16, k: 64, n: 32}", "quant=weight_int8")
    x1, x2, _ = real.args
    y = torch.ones(real.expected.shape, dtype=torch.bfloat16)
    fake_npu.module.npu_weight_quant_batchmatmul = rec = Recorder(lambda a, k: y)
    assert real.call(npu_adapters.npu_weight_quant_batchmatmul) is y
    ((args, kwargs),) = rec.calls
    assert args == (x1, x2, real.kwargs["antiquant_scale"])
    assert kwargs == {
        "antiquant_offset": real.kwargs["antiquant_offset"],
        "bias": None,
        "antiquant_group_size": 0,
    }
    assert fake_npu.reduced == [y]  # each rank's output goes into the AllReduce


def test_quant_matmul_takes_dequant_scale_as_scale_and_mc2sims_output_dtype(
    tmp_path: Path, fake_npu: types.SimpleNamespace
) -> None:
    real = case(tmp_path, "mm_all_reduce", "{m: 16, k: 64, n: 32}", "quant=w8a8")
    x1, x2, _ = real.args
    y = torch.ones(real.expected.shape, dtype=torch.bfloat16)
    fake_npu.module.npu_quant_matmul = rec = Recorder(lambda a, k: y)
    real.call(npu_adapters.npu_quant_matmul)
    ((args, kwargs),) = rec.calls
    assert args == (x1, x2, real.kwargs["dequant_scale"])
    assert kwargs == {"pertoken_scale": None, "bias": None, "output_dtype": torch.bfloat16}
    assert fake_npu.reduced == [y]


@pytest.mark.parametrize("op", ["gmm_alltoallv", "alltoallv_gmm"])
def test_the_moe_ops_keep_their_names_and_counts(
    tmp_path: Path, fake_npu: types.SimpleNamespace, op: str
) -> None:
    real = case(
        tmp_path, op, "{tokens: 8, top_k: 2, experts_per_rank: 2, h1: 32, n1: 16, h2: 32, n2: 8}"
    )
    x, w, comm, world, send, recv = real.args
    rows = int(sum(recv))
    y = torch.zeros(rows, 16, dtype=torch.bfloat16)
    mm_y = torch.zeros(8, 8, dtype=torch.bfloat16)
    result = (y, mm_y) if op == "gmm_alltoallv" else (y, mm_y, None)
    adapter = getattr(npu_adapters, f"npu_{op}")
    rec = Recorder(lambda a, k: result)
    setattr(fake_npu.module, f"npu_{op}", rec)
    flat = real.call(adapter)
    assert flat.shape == real.expected.shape  # y and mm_y, as the golden covers them
    ((args, kwargs),) = rec.calls
    assert args[0] is x and args[1] is w and args[2] == "hccl-comm-0" and args[3] == world == 1
    assert args[4] == list(send) and args[5] == list(recv)
    assert kwargs["mm_x"] is real.kwargs["mm_x"] and kwargs["mm_weight"] is real.kwargs["mm_weight"]
    assert kwargs["trans_gmm_weight"] is False and kwargs["trans_mm_weight"] is False
    assert kwargs["send_counts_tensor"] is None and kwargs["recv_counts_tensor"] is None
    assert ("permute_out_flag" in kwargs) == (op == "alltoallv_gmm")


def test_incre_flash_attention_is_bsh_with_mc2sims_paged_cache(
    tmp_path: Path, fake_npu: types.SimpleNamespace
) -> None:
    real = case(
        tmp_path, "ifa",
        "{batch: 2, heads: 4, kv_heads: 2, head_dim: 64, kv_len: 200, block_size: 128}",
    )  # fmt: skip
    query, key_cache, value_cache, _ = real.args
    out = torch.zeros(real.expected.shape, dtype=torch.bfloat16)
    fake_npu.module.npu_incre_flash_attention = rec = Recorder(lambda a, k: out)
    assert real.call(npu_adapters.npu_incre_flash_attention) is out
    ((args, kwargs),) = rec.calls
    assert args == (query, key_cache, value_cache)
    assert kwargs["block_table"] is real.kwargs["block_table"]
    assert kwargs["actual_seq_lengths"] == [200, 200]
    assert kwargs["num_heads"] == 4 and kwargs["num_key_value_heads"] == 2
    assert kwargs["block_size"] == 128 and kwargs["input_layout"] == "BSH"
    assert kwargs["scale_value"] == pytest.approx(64**-0.5)


def test_without_torch_npu_every_adapter_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import fails
    for name in npu_adapters.__all__:
        adapter = getattr(npu_adapters, name)
        if name.startswith("npu_"):
            reason = adapter.unavailable(OneRank())
            assert reason is not None and reason.startswith("torch_npu is not installed")


class FakeSymm:
    """``torch.ops.symm_mem`` with recording fused ops."""

    def __init__(self, m: int, k: int, n: int, world: int) -> None:
        gathered = torch.zeros(world * m, k)
        self.fused_all_gather_matmul = Recorder(
            lambda a, kw: (gathered, [torch.ones(world * m, n)])
        )
        self.fused_matmul_reduce_scatter = Recorder(lambda a, kw: torch.ones(m // world, n))
        self.gathered = gathered


@pytest.fixture
def fake_symm(monkeypatch: pytest.MonkeyPatch) -> FakeSymm:
    fake = FakeSymm(16, 256, 32, 1)
    monkeypatch.setattr(symm_mem, "symm_mem_ops", lambda: fake)
    monkeypatch.setattr(symm_mem, "_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(symm_mem, "_group_name", lambda comm: "group-0")
    return fake


def test_fused_all_gather_matmul_gathers_x1_on_dim_0_and_returns_the_pair(
    tmp_path: Path, fake_symm: FakeSymm
) -> None:
    real = case(tmp_path, "all_gather_matmul", "{m: 16, k: 256, n: 32}")
    x1, x2, _, _ = real.args
    out = real.call(symm_mem.fused_all_gather_matmul)
    assert torch.equal(out, torch.ones(16, 32))
    ((args, kwargs),) = fake_symm.fused_all_gather_matmul.calls
    assert args[0] is x1 and args[1] == [x2] and args[2:] == (0, "group-0")
    assert kwargs == {"return_A": True}
    pair = symm_mem.fused_all_gather_matmul(x1, x2, OneRank(), 1, gather_output=False)  # type: ignore[arg-type]
    assert pair[1] is None and fake_symm.fused_all_gather_matmul.calls[1][1] == {"return_A": False}


def test_fused_matmul_reduce_scatter_sums_on_dim_0(tmp_path: Path, fake_symm: FakeSymm) -> None:
    real = case(tmp_path, "matmul_reduce_scatter", "{m: 16, k: 256, n: 32}")
    x1, x2, _, _ = real.args
    real.call(symm_mem.fused_matmul_reduce_scatter)
    ((args, kwargs),) = fake_symm.fused_matmul_reduce_scatter.calls
    assert args[0] is x1 and args[1] is x2 and args[2:] == ("sum", 0, "group-0") and kwargs == {}
    bias = torch.full((32,), 0.5)
    out = symm_mem.fused_matmul_reduce_scatter(x1, x2, OneRank(), 4, bias=bias)  # type: ignore[arg-type]
    assert torch.equal(out, torch.ones(16, 32) + 2.0)  # bias in each of 4 ranks' products


def test_symm_mem_says_why_it_cannot_run_here(monkeypatch: pytest.MonkeyPatch) -> None:
    class Two(OneRank):
        size = 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = symm_mem.fused_all_gather_matmul.unavailable(Two())  # type: ignore[attr-defined]
    assert (
        reason
        == "the symmetric-memory fused ops need CUDA GPUs; torch.cuda.is_available() is False"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "has no GPU of its own (0 on this host)" in str(symm_mem.unavailable(Two()))  # type: ignore[arg-type]
