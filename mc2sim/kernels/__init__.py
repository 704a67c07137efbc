"""Reference kernels of the MC2 operators: pure single-rank functions of torch tensors.

Names and keyword arguments mirror torch_npu's so Ascend users recognise them. They round
where the device rounds (docs/OPS.md, "Where the device rounds"): 16-bit products are exact
and accumulated in float32, intermediate results the device stores in 16 bits are rounded to
them, integer matmuls are exact. Each kernel computes on its inputs' device and returns there
(inputs on different devices: ``ParamInvalidError``). Every documented constraint is checked
before any arithmetic (see ``mc2sim.errors``).
"""

from mc2sim.kernels.grouped_matmul import grouped_matmul
from mc2sim.kernels.ifa import incre_flash_attention
from mc2sim.kernels.int4 import convert_weight_to_int4pack, nd_to_nz, nz_to_nd, unpack_int4
from mc2sim.kernels.matmul import matmul
from mc2sim.kernels.quant_matmul import quant_matmul, trans_quant_param
from mc2sim.kernels.weight_quant import weight_quant_batchmatmul

__all__ = [
    "convert_weight_to_int4pack",
    "grouped_matmul",
    "incre_flash_attention",
    "matmul",
    "nd_to_nz",
    "nz_to_nd",
    "quant_matmul",
    "trans_quant_param",
    "unpack_int4",
    "weight_quant_batchmatmul",
]
