from typing import Any

import numpy as np
import pytest
import torch

from mc2sim.errors import AclnnError, ParamInvalidError, ParamNullptrError
from mc2sim.kernels import matmul


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
def test_against_float64_loops(dtype: torch.dtype, lead: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(*lead, 7, generator=gen).to(dtype)
    x2 = torch.randn(4, 7, generator=gen).to(dtype).t()  # transposed view
    bias = torch.randn(4, generator=gen).to(dtype)
    out = matmul(x1, x2, bias=bias)
    a = x1.double().reshape(-1, 7).numpy()
    b = x2.double().numpy()
    expected = np.array(
        [
            [sum(a[i, p] * b[p, j] for p in range(7)) + float(bias[j]) for j in range(4)]
            for i in range(a.shape[0])
        ]
    ).reshape(*lead, 4)
    assert out.dtype == dtype and out.shape == (*lead, 4)
    # one rounding of the exact value: within half an ulp of the output dtype
    assert torch.equal(out, torch.from_numpy(expected).to(dtype)) or torch.allclose(
        out.double(), torch.from_numpy(expected), rtol=torch.finfo(dtype).eps, atol=1e-6
    )


def test_without_bias() -> None:
    x1 = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    x2 = torch.tensor([[3.0], [4.0]], dtype=torch.bfloat16)
    assert matmul(x1, x2).tolist() == [[11.0]]


@pytest.mark.parametrize(
    ("args", "error", "param"),
    [
        ((None, torch.ones(2, 2)), ParamNullptrError, "x1"),
        ((torch.ones(2, 2), None), ParamNullptrError, "x2"),
        ((torch.ones(2, 2, dtype=torch.int8), torch.ones(2, 2)), ParamInvalidError, "x1.dtype"),
        ((torch.ones(2, 2), torch.ones(2, 2).half()), ParamInvalidError, "x2.dtype"),
        ((torch.ones(2), torch.ones(2, 2)), ParamInvalidError, "x1.shape"),
        ((torch.ones(2, 2), torch.ones(2, 2, 2)), ParamInvalidError, "x2.shape"),
        ((torch.ones(2, 3), torch.ones(2, 2)), ParamInvalidError, "x2.shape"),
    ],
)
def test_rules(args: tuple[Any, Any], error: type[AclnnError], param: str) -> None:
    with pytest.raises(error) as info:
        matmul(*args)
    assert info.value.code == error.code
    assert str(info.value).startswith(param)


def test_bias_rules() -> None:
    with pytest.raises(ParamInvalidError, match="bias.dtype"):
        matmul(torch.ones(2, 2), torch.ones(2, 2), bias=torch.ones(2).half())
    with pytest.raises(ParamInvalidError, match=r"bias.shape=\(3,\): must be \(2,\)"):
        matmul(torch.ones(2, 2), torch.ones(2, 2), bias=torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_many_row_blocks_with_bias(dtype: torch.dtype) -> None:
    # n = 4096 makes a block 64 rows: 200 rows run as 4 blocks, the last one short
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(2, 100, 8, generator=gen).to(dtype)
    x2 = torch.randn(8, 4096, generator=gen).to(dtype)
    bias = torch.randn(4096, generator=gen).to(dtype)
    out = matmul(x1, x2, bias=bias)
    exact = x1.double() @ x2.double() + bias.double()
    assert out.shape == (2, 100, 4096) and out.dtype == dtype
    assert torch.equal(out, exact.to(dtype)) or torch.allclose(
        out.double(), exact, rtol=torch.finfo(dtype).eps, atol=1e-6
    )
