"""Parameter checks shared by the reference kernels, raising mc2sim's aclnn errors."""

from __future__ import annotations

from collections.abc import Collection

import torch

from mc2sim.errors import ParamInvalidError, ParamNullptrError

__all__ = [
    "require",
    "require_dtype",
    "require_not_none",
    "require_rank",
    "require_shape",
]


def require_not_none(param: str, value: object) -> None:
    """Raise ``ParamNullptrError`` when a required input is missing.

    Args:
        param: the parameter's name, as the caller spells it.
        value: the value passed.
    """
    if value is None:
        raise ParamNullptrError(param, None, "is required and must not be None")


def require(param: str, value: object, ok: bool, rule: str) -> None:
    """Raise ``ParamInvalidError(param, value, rule)`` unless ``ok``.

    Args:
        param: the parameter's name.
        value: the value seen (shown in the message).
        ok: whether the rule holds.
        rule: the rule, in words ("must be a multiple of 8").
    """
    if not ok:
        raise ParamInvalidError(param, value, rule)


def require_dtype(param: str, tensor: torch.Tensor, allowed: Collection[torch.dtype]) -> None:
    """Raise ``ParamInvalidError`` unless ``tensor.dtype`` is one of ``allowed``.

    Args:
        param: the parameter's name.
        tensor: the tensor passed.
        allowed: the dtypes the rule allows.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ParamInvalidError(param, type(tensor).__name__, "must be a torch.Tensor")
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ParamInvalidError(
            f"{param}.dtype", str(tensor.dtype).removeprefix("torch."), f"must be one of {names}"
        )


def require_rank(param: str, tensor: torch.Tensor, allowed: Collection[int]) -> None:
    """Raise ``ParamInvalidError`` unless ``tensor.dim()`` is one of ``allowed``.

    Args:
        param: the parameter's name.
        tensor: the tensor passed.
        allowed: the numbers of dimensions the rule allows.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ParamInvalidError(param, type(tensor).__name__, "must be a torch.Tensor")
    if tensor.dim() not in allowed:
        raise ParamInvalidError(
            f"{param}.shape",
            tuple(tensor.shape),
            f"must have {' or '.join(str(r) for r in sorted(allowed))} dimensions",
        )


def require_shape(param: str, tensor: torch.Tensor, expected: tuple[int, ...], why: str) -> None:
    """Raise ``ParamInvalidError`` unless ``tensor.shape == expected``.

    Args:
        param: the parameter's name.
        tensor: the tensor passed.
        expected: the shape the rule asks for.
        why: what the expected shape follows from ("(n,) for per-channel scale").
    """
    if not isinstance(tensor, torch.Tensor):
        raise ParamInvalidError(param, type(tensor).__name__, "must be a torch.Tensor")
    if tuple(tensor.shape) != tuple(expected):
        raise ParamInvalidError(f"{param}.shape", tuple(tensor.shape), f"must be {expected}: {why}")
