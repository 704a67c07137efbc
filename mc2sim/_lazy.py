"""A package's public names imported on first use (PEP 562), so importing it stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(
    package: str, home: Mapping[str, str], public: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return a package's ``__getattr__`` and ``__dir__`` for names defined in its modules.

    Args:
        package: the package's ``__name__``.
        home: each lazily imported public name -> the submodule (relative) defining it.
        public: the package's ``__all__``.

    Returns:
        ``(__getattr__, __dir__)``: the first imports ``package.home[name]`` when ``name`` is
        first looked up and returns the name from it; the second lists ``public`` too.
    """

    def getattr_(name: str) -> Any:
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(public))

    return getattr_, dir_
