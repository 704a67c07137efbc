"""YAML writing shared by the scenario and topology files: readable, round-trippable, atomic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mc2sim._atomic import write_atomic

# A safe dumper that writes multi-line strings as literal blocks (made with ``type`` because
# PyYAML ships no type hints, and mypy refuses a class statement deriving from ``Any``).
_Dumper: Any = type("_Dumper", (yaml.SafeDumper,), {})


def _represent_str(dumper: Any, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style=style)


_Dumper.add_representer(str, _represent_str)


def write_yaml(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write plain ``data`` (dicts, lists, scalars) as YAML, keys in the order given.

    Multi-line strings become literal blocks. The write is atomic (:func:`write_atomic`);
    the destination's folder must exist.
    """
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return write_atomic(path, text)
