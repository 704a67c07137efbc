"""Small shims for the oldest supported Python (3.10)."""

from __future__ import annotations

import enum
import sys

__all__ = ["StrEnum"]

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - exercised only on Python 3.10

    class StrEnum(str, enum.Enum):
        """Enum whose members are also strings, as ``enum.StrEnum`` of Python 3.11."""

        def __str__(self) -> str:
            return str(self.value)
