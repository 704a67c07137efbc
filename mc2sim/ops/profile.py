"""Opt-in strict hardware profiles: limits of today's Ascend hardware, not of the operators.

By default mc2sim runs every operator on any number of ranks. A strict profile adds the
limits OPS.md marks as today's hardware (allowed world sizes, the per-peer traffic window),
reported with the same error codes the hardware uses.
"""

from __future__ import annotations

from mc2sim._compat import StrEnum
from mc2sim.errors import ParamInvalidError

__all__ = ["HardwareProfile", "hardware_profile"]


class HardwareProfile(StrEnum):
    """Which hardware's limits to enforce on top of the operators' own.

    Glossary: ``none`` enforces only the operators' definitions (any world size); ``A2`` is
    Atlas A2 (800T/900 A2, HCCS full mesh of 8); ``A3`` is Atlas A3 (SuperPod, HCCS double
    ring, 2 MB to 100 MB per peer for AlltoAllv-based ops).
    """

    NONE = "none"
    A2 = "A2"
    A3 = "A3"


def hardware_profile(strict: str | HardwareProfile | None) -> HardwareProfile:
    """Return ``strict`` as a profile; ``None`` means ``HardwareProfile.NONE``.

    Raises:
        ParamInvalidError: an unknown profile name.
    """
    if strict is None:
        return HardwareProfile.NONE
    try:
        return HardwareProfile(strict)
    except ValueError:
        allowed = ", ".join(repr(p.value) for p in HardwareProfile)
        raise ParamInvalidError("strict", strict, f"must be None or one of {allowed}") from None
