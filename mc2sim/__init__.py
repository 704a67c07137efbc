"""mc2sim: a distributed simulation harness for MC2 fused communication-computation operators."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mc2sim")
except PackageNotFoundError:  # pragma: no cover - running from a source tree not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
