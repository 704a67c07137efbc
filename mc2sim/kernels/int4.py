"""Int4 weight packing (ConvertWeightToINT4Pack) and the FRACTAL_NZ layout transforms.

Vocabulary (OPS.md section 1, seed ``000``):

* An *int4 value* is an integer in [-8, 7]. A weight "holding int4" is an INT32 tensor whose
  every element is such a value.
* *Packed* storage puts the values densely: :attr:`Int4PackDtype.INT32` puts eight values
  in one int32, element ``8j+i`` of a row in bits ``4i..4i+3`` of int32 ``j`` (two's
  complement nibbles, low nibble first); :attr:`Int4PackDtype.INT4` puts two values in one
  byte (a ``torch.uint8`` tensor here, since torch has no usable int4 dtype), element ``2j``
  in the low nibble of byte ``j``.
* :attr:`WeightFormat.FRACTAL_NZ` tiles a (rows, cols) matrix into
  ``(ceil(cols/C0), ceil(rows/16), 16, C0)``: element (r, c) goes to
  ``[c // C0, r // 16, r % 16, c % C0]`` and the padding is zero. C0 is 32 bytes: 64 int4
  values, that is 8 int32 or 32 uint8 storage elements, or 32 int8 values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from mc2sim._compat import StrEnum
from mc2sim.errors import ParamInvalidError
from mc2sim.kernels._validate import require, require_dtype, require_not_none, require_rank

__all__ = [
    "INT4_MAX",
    "INT4_MIN",
    "NZ_C0_BYTES",
    "NZ_R0",
    "Int4PackDtype",
    "WeightFormat",
    "as_enum",
    "convert_weight_to_int4pack",
    "int4_storage_shape",
    "nd_to_nz",
    "nz_to_nd",
    "unpack_int4",
]

INT4_MIN = -8
"""Smallest int4 value."""
INT4_MAX = 7
"""Largest int4 value."""
NZ_R0 = 16
"""Rows per FRACTAL_NZ fractal."""
NZ_C0_BYTES = 32
"""Bytes per FRACTAL_NZ fractal row (C0 = 32 bytes: 64 int4, 8 int32, 32 int8 or uint8)."""


class Int4PackDtype(StrEnum):
    """Storage dtype of packed int4 values.

    INT32: eight int4 per ``torch.int32`` element (aclnn ``ACL_INT32`` "8 int4 each").
    INT4: two int4 per ``torch.uint8`` byte (aclnn ``ACL_INT4``), low nibble first.
    """

    INT32 = "int32"
    INT4 = "int4"

    @property
    def per_element(self) -> int:
        """How many int4 values one storage element holds (8 or 2)."""
        return 8 if self is Int4PackDtype.INT32 else 2

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the storage tensor."""
        return torch.int32 if self is Int4PackDtype.INT32 else torch.uint8


class WeightFormat(StrEnum):
    """Memory layout of a weight tensor.

    ND: plain row-major (any torch strides).
    FRACTAL_NZ: the Ascend cube-friendly tiling described in this module's docstring.
    """

    ND = "ND"
    FRACTAL_NZ = "FRACTAL_NZ"


_E = TypeVar("_E", bound=StrEnum)


def as_enum(param: str, value: object, enum: type[_E]) -> _E:
    """Return ``enum(value)`` (a member or its string), else raise ParamInvalidError.

    Args:
        param: the parameter's name, for the error message.
        value: a member of ``enum`` or the string of one.
        enum: the vocabulary.

    Returns:
        The member.

    """
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ParamInvalidError(param, value, f"must be one of {allowed}") from None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def nd_to_nz(x: torch.Tensor, c0: int, *, r0: int = NZ_R0) -> torch.Tensor:
    """Tile the last two dims of ``x`` into FRACTAL_NZ, padding with zeros.

    Args:
        x: a tensor of rank >= 2, shape ``(..., rows, cols)``; leading dims are kept.
        c0: columns per fractal (in elements of ``x``'s dtype), >= 1.
        r0: rows per fractal, >= 1 (16 on Ascend).

    Returns:
        A contiguous tensor of shape ``(..., ceil(cols/c0), ceil(rows/r0), r0, c0)`` with
        ``out[..., c // c0, r // r0, r % r0, c % c0] == x[..., r, c]`` and zeros elsewhere.

    Raises:
        ParamInvalidError: ``x`` has rank < 2, or ``c0`` / ``r0`` < 1.

    """
    require_not_none("x", x)
    require("c0", c0, isinstance(c0, int) and c0 >= 1, "must be an int >= 1")
    require("r0", r0, isinstance(r0, int) and r0 >= 1, "must be an int >= 1")
    require("x.shape", tuple(x.shape), x.dim() >= 2, "must have at least 2 dimensions")
    rows, cols = x.shape[-2], x.shape[-1]
    r1, c1 = _ceil_div(rows, r0), _ceil_div(cols, c0)
    lead = tuple(x.shape[:-2])
    padded = x.new_zeros((*lead, r1 * r0, c1 * c0))
    padded[..., :rows, :cols] = x
    tiles = padded.reshape(*lead, r1, r0, c1, c0)
    nd = len(lead)
    perm = (*range(nd), nd + 2, nd, nd + 1, nd + 3)
    return tiles.permute(perm).contiguous()


def nz_to_nd(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Undo :func:`nd_to_nz`: gather a FRACTAL_NZ tensor back into a (rows, cols) matrix.

    Args:
        x: a tensor of rank >= 4, shape ``(..., c1, r1, r0, c0)``.
        shape: ``(rows, cols)`` of the matrix (the last two dims of the original); the
            leading dims come from ``x``. Must satisfy ``ceil(rows/r0) == r1`` and
            ``ceil(cols/c0) == c1``.

    Returns:
        A contiguous tensor of shape ``(..., rows, cols)``; the padding is dropped.

    Raises:
        ParamInvalidError: ``x`` has rank < 4, ``shape`` is not two non-negative ints, or
            it does not match ``x``'s fractal counts.

    """
    require_not_none("x", x)
    require("x.shape", tuple(x.shape), x.dim() >= 4, "must have at least 4 dimensions")
    dims = tuple(shape)
    require(
        "shape",
        dims,
        len(dims) == 2 and all(isinstance(d, int) and d >= 0 for d in dims),
        "must be two non-negative ints (rows, cols)",
    )
    rows, cols = dims
    c1, r1, r0, c0 = x.shape[-4:]
    require(
        "x.shape",
        tuple(x.shape),
        _ceil_div(rows, r0) == r1 and _ceil_div(cols, c0) == c1,
        f"must be (..., ceil(cols/c0), ceil(rows/r0), r0, c0) for shape {dims}",
    )
    lead = tuple(x.shape[:-4])
    nd = len(lead)
    perm = (*range(nd), nd + 1, nd + 2, nd, nd + 3)
    full = x.permute(perm).reshape(*lead, r1 * r0, c1 * c0)
    return full[..., :rows, :cols].contiguous()


def int4_storage_shape(
    shape: Sequence[int],
    packed_dtype: Int4PackDtype | str = Int4PackDtype.INT32,
    packed_format: WeightFormat | str = WeightFormat.ND,
) -> tuple[int, ...]:
    """Return the storage shape of packed int4 values of logical shape ``shape``.

    Args:
        shape: ``(..., d0, d1)`` in int4 values; ``d1`` a multiple of 8 (INT32) or 2 (INT4).
        packed_dtype: "int32" or "int4".
        packed_format: "ND" or "FRACTAL_NZ".

    Returns:
        ``(..., d0, d1/8)`` / ``(..., d0, d1/2)`` for ND;
        ``(..., ceil(d1/64), ceil(d0/16), 16, 8)`` / ``(..., ceil(d1/64), ceil(d0/16), 16, 32)``
        for FRACTAL_NZ.

    Raises:
        ParamInvalidError: unknown dtype or format, rank < 2, or ``d1`` not aligned.

    """
    pdt = as_enum("packed_dtype", packed_dtype, Int4PackDtype)
    pfmt = as_enum("packed_format", packed_format, WeightFormat)
    dims = tuple(int(d) for d in shape)
    require("shape", dims, len(dims) >= 2, "must have at least 2 dimensions")
    *lead, d0, d1 = dims
    per = pdt.per_element
    require("shape", dims, d1 % per == 0, f"last dim must be a multiple of {per} for {pdt}")
    if pfmt is WeightFormat.ND:
        return (*lead, d0, d1 // per)
    c0 = NZ_C0_BYTES * 2 // per  # storage elements per fractal row: 8 int32 or 32 bytes
    return (*lead, _ceil_div(d1 // per, c0), _ceil_div(d0, NZ_R0), NZ_R0, c0)


def convert_weight_to_int4pack(
    weight: torch.Tensor,
    *,
    out_dtype: Int4PackDtype | str = Int4PackDtype.INT32,
    out_format: WeightFormat | str = WeightFormat.ND,
) -> torch.Tensor:
    """Pack an INT32 tensor of int4 values densely (aclnnConvertWeightToINT4Pack).

    Args:
        weight: ``torch.int32``, rank 2 ``(d0, d1)`` or 3 ``(b, d0, d1)``, non-empty, every
            value in [-8, 7]; ``d1`` a multiple of 8 for "int32" output, of 2 for "int4".
            Any strides (a transposed view is packed as the matrix it shows).
        out_dtype: "int32" (eight values per int32) or "int4" (two per uint8 byte).
        out_format: "ND" or "FRACTAL_NZ".

    Returns:
        The storage tensor (see :func:`int4_storage_shape`): ``torch.int32`` of shape
        ``(d0, d1/8)`` (ND) or ``(ceil(d1/64), ceil(d0/16), 16, 8)`` (NZ), or ``torch.uint8``
        of shape ``(d0, d1/2)`` (ND) or ``(ceil(d1/64), ceil(d0/16), 16, 32)`` (NZ); a 3-D
        weight keeps its leading dim. NZ padding is zero.

    Raises:
        ParamNullptrError: ``weight`` is None.
        ParamInvalidError: wrong dtype, rank, empty tensor, unaligned last dim, a value
            outside [-8, 7], or an unknown ``out_dtype`` / ``out_format``.

    """
    require_not_none("weight", weight)
    pdt = as_enum("out_dtype", out_dtype, Int4PackDtype)
    pfmt = as_enum("out_format", out_format, WeightFormat)
    require_dtype("weight", weight, (torch.int32,))
    require_rank("weight", weight, (2, 3))
    require("weight.shape", tuple(weight.shape), weight.numel() > 0, "must not be empty")
    per = pdt.per_element
    require(
        "weight.shape",
        tuple(weight.shape),
        weight.shape[-1] % per == 0,
        f"last dim must be a multiple of {per} for out_dtype={pdt.value!r}",
    )
    lo, hi = int(weight.min()), int(weight.max())
    require(
        "weight",
        (lo, hi),
        INT4_MIN <= lo and hi <= INT4_MAX,
        f"values (min, max) must lie in the int4 range [{INT4_MIN}, {INT4_MAX}]",
    )
    packed = _pack_nd(weight, pdt)
    if pfmt is WeightFormat.FRACTAL_NZ:
        packed = nd_to_nz(packed, NZ_C0_BYTES * 2 // per)
    return packed


def _pack_nd(values: torch.Tensor, pdt: Int4PackDtype) -> torch.Tensor:
    """Pack int4 values (any integer dtype, already range-checked) along the last dim."""
    per = pdt.per_element
    nibbles = (values.to(torch.int64) & 0xF).reshape(*values.shape[:-1], -1, per)
    shifts = torch.arange(0, 4 * per, 4, dtype=torch.int64, device=values.device)
    words = (nibbles << shifts).sum(dim=-1)  # disjoint bit fields: sum == bitwise or
    if pdt is Int4PackDtype.INT4:
        return words.to(torch.uint8)
    # Reinterpret the unsigned 32-bit word as two's complement int32.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_nd(packed: torch.Tensor, pdt: Int4PackDtype) -> torch.Tensor:
    """Inverse of :func:`_pack_nd`: int32 values in [-8, 7], last dim times 8 or 2."""
    per = pdt.per_element
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 4 * per, 4, dtype=torch.int64, device=packed.device)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF
    values = nibbles - ((nibbles & 0x8) << 1)  # nibble > 7 means value - 16
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.int32)


def unpack_int4(
    packed: torch.Tensor,
    shape: Sequence[int],
    *,
    packed_dtype: Int4PackDtype | str = Int4PackDtype.INT32,
    packed_format: WeightFormat | str = WeightFormat.ND,
) -> torch.Tensor:
    """Recover the int4 values from packed storage; the exact inverse of packing.

    Args:
        packed: the storage tensor: ``torch.int32`` for "int32", ``torch.uint8`` for "int4",
            of shape ``int4_storage_shape(shape, packed_dtype, packed_format)``. ND storage
            may be any strided view of that shape.
        shape: the logical shape ``(..., d0, d1)`` in int4 values.
        packed_dtype: "int32" or "int4".
        packed_format: "ND" or "FRACTAL_NZ".

    Returns:
        A contiguous ``torch.int32`` tensor of shape ``shape`` with values in [-8, 7].

    Raises:
        ParamNullptrError: ``packed`` is None.
        ParamInvalidError: unknown dtype or format, wrong storage dtype, or a storage shape
            that does not match ``shape``.

    """
    require_not_none("packed", packed)
    pdt = as_enum("packed_dtype", packed_dtype, Int4PackDtype)
    pfmt = as_enum("packed_format", packed_format, WeightFormat)
    require_dtype("packed", packed, (pdt.torch_dtype,))
    dims = tuple(int(d) for d in shape)
    expected = int4_storage_shape(dims, pdt, pfmt)
    require(
        "packed.shape",
        tuple(packed.shape),
        tuple(packed.shape) == expected,
        f"must be {expected} for logical shape {dims} ({pdt.value}, {pfmt.value})",
    )
    if pfmt is WeightFormat.FRACTAL_NZ:
        packed = nz_to_nd(packed, (dims[-2], dims[-1] // pdt.per_element))
    return _unpack_nd(packed, pdt)
