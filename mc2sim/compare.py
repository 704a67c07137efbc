"""Precision standards of the public tests: compare outputs with their goldens, on every rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from mc2sim._compat import StrEnum
from mc2sim.errors import ParamInvalidError

if TYPE_CHECKING:
    import torch

    from mc2sim.comm.base import Communicator

__all__ = [
    "ALLCLOSE_ATOL",
    "ALLCLOSE_RTOL",
    "DOUBLE_THOUSANDTHS",
    "ERROR_BALANCE_ELEMENT",
    "ERROR_BALANCE_LARGE_K",
    "ERROR_BALANCE_MEAN",
    "GoldenMismatchError",
    "Mismatch",
    "Standard",
    "Verdict",
    "check",
    "check_all",
    "raise_if_failed",
]


class Standard(StrEnum):
    """A precision standard: how far an output may stray from its golden.

    Glossary:
        ``allclose``: every element within ``atol + rtol * |golden|``, rtol = atol = 0.005
            (the multi-rank fused ops).
        ``double_thousandths``: at most a fraction p of the elements have a relative error
            above p; p = 1e-3 (float16), 4e-3 (bfloat16), 1e-4 (float32). Where the golden is
            0 the absolute error stands in for the relative one.
        ``error_balance``: quantized matmul; the mean of ``(actual - golden) / max(|golden|,
            1)`` is at most 2^-10 (float16) or 2^-7 (bfloat16) in absolute value, and each
            element's ``|actual - golden| / max(|golden|, 1)`` at most 2^-8 (float16) or 2^-7
            (bfloat16), doubled when the reduction length k >= 2048.
    """

    ALLCLOSE = "allclose"
    DOUBLE_THOUSANDTHS = "double_thousandths"
    ERROR_BALANCE = "error_balance"


#: ``allclose`` tolerances of the multi-rank fused ops.
ALLCLOSE_RTOL = 0.005
ALLCLOSE_ATOL = 0.005

#: ``double_thousandths``: the threshold p of each output dtype.
DOUBLE_THOUSANDTHS: dict[str, float] = {"float16": 1e-3, "bfloat16": 4e-3, "float32": 1e-4}

#: ``error_balance``: bound on |mean signed relative error| per output dtype.
ERROR_BALANCE_MEAN: dict[str, float] = {"float16": 2.0**-10, "bfloat16": 2.0**-7}

#: ``error_balance``: per-element bound per output dtype, as (k < 2048, k >= 2048).
ERROR_BALANCE_ELEMENT: dict[str, tuple[float, float]] = {
    "float16": (2.0**-8, 2.0**-7),
    "bfloat16": (2.0**-7, 2.0**-6),
}

#: ``error_balance``: reduction lengths from this one up get the looser per-element bound.
ERROR_BALANCE_LARGE_K = 2048

#: How many of the worst mismatching elements a verdict keeps.
WORST_KEPT = 5

_DTYPE_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Mismatch:
    """One element that broke its standard's per-element bound."""

    index: tuple[int, ...]
    """Its index in the original (unflattened) shape."""

    actual: float
    """The output's value, as float64."""

    golden: float
    """The golden value, as float64."""

    error: float
    """The standard's error measure for it (inf for a NaN or inf that does not match)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    """The outcome of comparing one output with its golden under one standard."""

    passed: bool
    """Whether the output meets the standard."""

    standard: Standard
    """The standard applied."""

    dtype: str
    """Name of the dtype whose thresholds applied, e.g. ``"bfloat16"``."""

    numel: int
    """Elements compared."""

    mismatches: int
    """Elements that broke the per-element bound (NaN/inf mismatches included)."""

    mismatch_fraction: float
    """``mismatches / numel``; 0.0 when there are no elements."""

    allowed_fraction: float
    """The largest mismatch fraction that still passes (0 for allclose and error_balance)."""

    max_abs_error: float
    """Largest ``|actual - golden|`` over elements where both are finite (0.0 if none)."""

    max_rel_error: float
    """Largest ``|actual - golden| / |golden|`` over finite elements with golden != 0."""

    mean_error: float | None
    """error_balance only: mean of ``(actual - golden) / max(|golden|, 1)`` over finite pairs."""

    mean_limit: float | None
    """error_balance only: the bound on ``|mean_error|``."""

    worst: tuple[Mismatch, ...]
    """Up to five mismatching elements, worst first."""

    rank: int | None = None
    """The rank whose output this is, or None outside a multi-rank check."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "standard", _standard(self.standard))
        if not 0 <= self.mismatches <= self.numel:
            raise ParamInvalidError(
                "mismatches", self.mismatches, f"must be in [0, numel={self.numel}]"
            )

    def summary(self) -> str:
        """Return a one-line account: rank, standard, outcome, fraction and worst element."""
        who = f"rank {self.rank}: " if self.rank is not None else ""
        outcome = "PASS" if self.passed else "FAIL"
        text = (
            f"{who}{self.standard} ({self.dtype}) {outcome}: {self.mismatches}/{self.numel} "
            f"elements mismatched ({self.mismatch_fraction:.4%}, "
            f"allowed {self.allowed_fraction:.4%})"
        )
        if self.mean_error is not None and self.mean_limit is not None:
            text += f"; mean error {self.mean_error:+.3e} (limit {self.mean_limit:.3e})"
        if self.worst:
            w = self.worst[0]
            text += (
                f"; worst at {w.index}: actual {w.actual!r}, golden {w.golden!r}, "
                f"error {w.error:.3e}"
            )
        else:
            text += f"; max abs error {self.max_abs_error:.3e}"
        return text


class GoldenMismatchError(Exception):
    """One or more ranks' outputs failed their precision standard.

    Args:
        verdicts: the failed verdicts (at least one), lowest rank first.

    """

    def __init__(self, verdicts: Sequence[Verdict]) -> None:
        self.verdicts: tuple[Verdict, ...] = tuple(verdicts)
        if not self.verdicts:
            raise ParamInvalidError("verdicts", [], "must hold at least one failed verdict")
        first = self.verdicts[0]
        ranks = [str(v.rank) for v in self.verdicts if v.rank is not None]
        if ranks:
            head = f"golden mismatch on rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"
        else:
            head = f"golden mismatch in {len(self.verdicts)} output(s)"
        super().__init__(f"{head}; first: {first.summary()}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.verdicts,))


def _standard(standard: str | Standard) -> Standard:
    """Return ``standard`` as a ``Standard``, raising ``ParamInvalidError`` if unknown."""
    try:
        return Standard(standard)
    except ValueError:
        allowed = ", ".join(repr(s.value) for s in Standard)
        raise ParamInvalidError("standard", standard, f"must be one of {allowed}") from None


def _dtype_name(dtype: object) -> str:
    """Return the canonical name of a torch dtype, NumPy dtype or dtype string."""
    import torch

    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        return _DTYPE_ALIASES.get(name, name)
    try:
        return np.dtype(dtype).name  # type: ignore[call-overload,no-any-return]
    except TypeError:
        raise ParamInvalidError(
            "dtype", dtype, "must be a torch dtype, NumPy dtype or name"
        ) from None


def _to_float64(name: str, value: object) -> tuple[npt.NDArray[np.float64], str]:
    """Return ``value`` as a float64 NumPy array on the CPU, and its dtype's name."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ParamInvalidError(f"{name}.dtype", value.dtype, "must be real")
        array = value.detach().to(device="cpu", dtype=torch.float64).numpy()
        return array, _dtype_name(value.dtype)
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise ParamInvalidError(f"{name}.dtype", str(value.dtype), "must be numeric")
        if np.issubdtype(value.dtype, np.complexfloating):
            raise ParamInvalidError(f"{name}.dtype", str(value.dtype), "must be real")
        return value.astype(np.float64), value.dtype.name
    raise ParamInvalidError(name, type(value).__name__, "must be a torch.Tensor or numpy.ndarray")


def check(
    actual: torch.Tensor | npt.NDArray[Any],
    golden: torch.Tensor | npt.NDArray[Any],
    standard: str | Standard = Standard.ALLCLOSE,
    *,
    dtype: torch.dtype | np.dtype[Any] | str | None = None,
    rank: int | None = None,
    k: int | None = None,
) -> Verdict:
    """Compare ``actual`` with ``golden`` under a precision standard, in float64 on the CPU.

    NaN and inf: a pair where either side is not finite matches only when both are NaN or
    both are the same infinity; any other such pair is a mismatch with error inf, and is
    left out of the error statistics.

    Args:
        actual: the output under test (any device, any real dtype).
        golden: the expected output, of the same shape.
        standard: ``allclose``, ``double_thousandths`` or ``error_balance``.
        dtype: dtype whose thresholds apply; default ``actual``'s dtype. double_thousandths
            needs float16, bfloat16 or float32; error_balance float16 or bfloat16.
        rank: recorded in the verdict (``check_all`` passes the caller's rank).
        k: error_balance only: the matmul's reduction length; k >= 2048 loosens the
            per-element bound. None means k < 2048 (the stricter bound). Ignored by the
            other standards.

    Returns:
        The verdict.

    Raises:
        ParamInvalidError: shapes differ, an unknown standard, or a dtype the standard has
            no threshold for.

    """
    std = _standard(standard)
    a, actual_dtype = _to_float64("actual", actual)
    g, _ = _to_float64("golden", golden)
    if a.shape != g.shape:
        raise ParamInvalidError(
            "golden.shape", tuple(g.shape), f"must equal actual.shape {tuple(a.shape)}"
        )
    name = actual_dtype if dtype is None else _dtype_name(dtype)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ParamInvalidError("k", k, "must be a positive integer or None")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise ParamInvalidError("rank", rank, "must be a non-negative integer or None")

    shape = tuple(int(n) for n in a.shape)
    a = a.reshape(-1)
    g = g.reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        return _judge(a, g, shape, std, name, k, rank)


def _judge(
    a: npt.NDArray[np.float64],
    g: npt.NDArray[np.float64],
    shape: tuple[int, ...],
    std: Standard,
    name: str,
    k: int | None,
    rank: int | None,
) -> Verdict:
    """Apply standard ``std`` to the flattened float64 pair; see :func:`check`."""
    finite = np.isfinite(a) & np.isfinite(g)
    special_ok = (np.isnan(a) & np.isnan(g)) | (~finite & (a == g))
    diff = np.where(finite, a - g, 0.0)
    abs_diff = np.abs(diff)
    abs_g = np.abs(np.where(finite, g, 0.0))

    mean_error: float | None = None
    mean_limit: float | None = None
    allowed = 0.0
    if std is Standard.ALLCLOSE:
        error = abs_diff
        bad = abs_diff > ALLCLOSE_ATOL + ALLCLOSE_RTOL * abs_g
    elif std is Standard.DOUBLE_THOUSANDTHS:
        if name not in DOUBLE_THOUSANDTHS:
            raise ParamInvalidError(
                "dtype", name, f"double_thousandths has thresholds for {sorted(DOUBLE_THOUSANDTHS)}"
            )
        allowed = DOUBLE_THOUSANDTHS[name]
        nonzero = abs_g > 0
        error = np.where(nonzero, abs_diff / np.where(nonzero, abs_g, 1.0), abs_diff)
        bad = error > allowed
    else:
        if name not in ERROR_BALANCE_ELEMENT:
            raise ParamInvalidError(
                "dtype", name, f"error_balance has thresholds for {sorted(ERROR_BALANCE_ELEMENT)}"
            )
        large_k = k is not None and k >= ERROR_BALANCE_LARGE_K
        element_limit = ERROR_BALANCE_ELEMENT[name][1 if large_k else 0]
        mean_limit = ERROR_BALANCE_MEAN[name]
        signed = diff / np.maximum(abs_g, 1.0)
        count = int(finite.sum())
        mean_error = float(signed[finite].sum() / count) if count else 0.0
        error = np.abs(signed)
        bad = error > element_limit

    bad = np.where(finite, bad, ~special_ok)
    error = np.where(finite, error, np.where(special_ok, 0.0, np.inf))
    numel = int(a.size)
    mismatches = int(bad.sum())
    fraction = mismatches / numel if numel else 0.0
    passed = fraction <= allowed
    if mean_error is not None and mean_limit is not None:
        passed = passed and abs(mean_error) <= mean_limit

    rel_mask = finite & (abs_g > 0)
    max_rel = float((abs_diff[rel_mask] / abs_g[rel_mask]).max()) if rel_mask.any() else 0.0
    max_abs = float(abs_diff[finite].max()) if finite.any() else 0.0
    return Verdict(
        passed=bool(passed),
        standard=std,
        dtype=name,
        numel=numel,
        mismatches=mismatches,
        mismatch_fraction=fraction,
        allowed_fraction=allowed,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        mean_error=mean_error,
        mean_limit=mean_limit,
        worst=_worst(bad, error, a, g, shape),
        rank=rank,
    )


def _worst(
    bad: npt.NDArray[np.bool_],
    error: npt.NDArray[np.float64],
    a: npt.NDArray[np.float64],
    g: npt.NDArray[np.float64],
    shape: tuple[int, ...],
) -> tuple[Mismatch, ...]:
    """Return up to ``WORST_KEPT`` mismatching elements, largest error first (then by index)."""
    flat = np.flatnonzero(bad)
    if flat.size > WORST_KEPT:
        # the kept elements are the largest errors; ties go to the lowest index
        order = np.lexsort((flat, -error[flat]))[:WORST_KEPT]
        flat = flat[order]
    else:
        flat = flat[np.lexsort((flat, -error[flat]))]
    return tuple(
        Mismatch(
            index=tuple(int(i) for i in np.unravel_index(int(f), shape)),
            actual=float(a[f]),
            golden=float(g[f]),
            error=float(error[f]),
        )
        for f in flat
    )


def check_all(
    comm: Communicator,
    actual: torch.Tensor | npt.NDArray[Any],
    golden: torch.Tensor | npt.NDArray[Any],
    standard: str | Standard = Standard.ALLCLOSE,
    **kw: Any,
) -> list[Verdict]:
    """Check every rank's own output against its own golden; return all ranks' verdicts.

    Every rank of ``comm`` must call this. A parameter error on any rank (shapes differ, say)
    is raised on every rank alike, the lowest failing rank's.

    Args:
        comm: the group.
        actual: this rank's output.
        golden: this rank's golden.
        standard: the precision standard, as for :func:`check`.
        **kw: ``dtype`` and ``k``, as for :func:`check`.

    Returns:
        The same list on every rank: index r holds rank r's verdict.

    """
    from mc2sim.comm.agree import agreed

    verdict: Verdict | None = None
    with agreed(comm):
        verdict = check(actual, golden, standard, rank=comm.rank, **kw)
    verdicts: list[Verdict] = comm.allgather_object(verdict)
    return verdicts


def raise_if_failed(verdicts: Sequence[Verdict]) -> None:
    """Raise ``GoldenMismatchError`` if any verdict failed; the same on every rank.

    Args:
        verdicts: the list from :func:`check_all` (index = rank), or any verdicts.

    Raises:
        GoldenMismatchError: naming the lowest failing rank and its worst element.

    """
    failed = [v for v in verdicts if not v.passed]
    failed.sort(key=lambda v: (v.rank is None, v.rank or 0))
    if failed:
        raise GoldenMismatchError(failed)
