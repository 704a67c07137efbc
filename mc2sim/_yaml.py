"""What the scenario and topology files share: YAML reading and writing, the shipped folders."""

from __future__ import annotations

import os
import site
import stat
import sys
from pathlib import Path
from typing import Any

import yaml

from mc2sim._atomic import write_atomic
from mc2sim.errors import ParamInvalidError

# A safe dumper that writes multi-line strings as literal blocks (made with ``type`` because
# PyYAML ships no type hints, and mypy refuses a class statement deriving from ``Any``).
_Dumper: Any = type("_Dumper", (yaml.SafeDumper,), {})


def _represent_str(dumper: Any, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style=style)


_Dumper.add_representer(str, _represent_str)


INPUT_BYTES = 64 * 1024 * 1024
"""The largest input file read (a scenario, a topology, a counts file): a larger one, or a
device such as ``/dev/zero``, is refused before it is read, never read into all memory."""


def read_text(file: str, param: str | None = None) -> str:
    """Return the UTF-8 text of the regular file ``file``, of at most :data:`INPUT_BYTES`.

    Args:
        file: the file's path.
        param: what errors name (default: the path itself).

    Raises:
        ParamInvalidError: the file cannot be read, is not a regular file (a folder, a
            FIFO, a device: reading one could block or never end), is larger than
            :data:`INPUT_BYTES`, or is not UTF-8 text.
    """
    name = param if param is not None else file
    try:
        mode = os.stat(file).st_mode
        if not stat.S_ISREG(mode):
            raise ParamInvalidError(name, file, "must be a regular file")
        with open(file, "rb") as handle:
            data = handle.read(INPUT_BYTES + 1)
    except OSError as err:
        raise ParamInvalidError(name, file, f"cannot be read: {err.strerror or err}") from None
    if len(data) > INPUT_BYTES:
        raise ParamInvalidError(name, file, f"must be at most {INPUT_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ParamInvalidError(name, f"byte {err.start}", "is not UTF-8 text") from None


class _UniqueKeys(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type hints
    """A safe loader that refuses a mapping with a key given twice (the last would win)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *anchor``: merged keys may be overridden by the written ones
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: the base loader refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(file: str) -> object:
    """Return the parsed YAML of ``file``; every error names the file and is one line.

    Args:
        file: the file's path.

    Returns:
        The plain data (``yaml.safe_load``).

    Raises:
        ParamInvalidError: the file cannot be read (:func:`read_text`), or is not valid YAML
            or gives a mapping's key twice (the value is where: ``line L, column C``, or the
            character for a character YAML does not allow; the rule is PyYAML's problem on
            one line).
    """
    text = read_text(file)
    try:
        return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506  # a safe loader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        position = getattr(err, "position", None)  # a ReaderError: a character not allowed
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}"
        elif position is not None:
            where = f"character {position + 1}"
        else:
            where = "?"
        # a ReaderError has no problem; its message says where on a second line
        problem = getattr(err, "problem", None) or (str(err).splitlines() or ["?"])[0]
        one_line = " ".join(str(problem).split())
        raise ParamInvalidError(file, where, f"is not valid YAML: {one_line}") from None
    except RecursionError:
        raise ParamInvalidError(file, "?", "is not valid YAML: nested too deeply") from None


def write_yaml(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write plain ``data`` (dicts, lists, scalars) as YAML, keys in the order given.

    Multi-line strings become literal blocks. The write is atomic (:func:`write_atomic`);
    the destination's folder must exist.
    """
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return write_atomic(path, text)


def shipped_dir(name: str) -> Path:
    """Return the folder of the shipped ``name`` files (``"topologies"``, ``"scenarios"``).

    The source tree's (``mc2sim/../<name>``: a checkout or an editable install) when it
    exists, else an installed wheel's copy under the environment's ``share/mc2sim/<name>``
    (``sys.prefix``, or the user base for ``pip install --user``); the source tree's path
    when neither exists, so that errors name the folder looked for.
    """
    source = Path(__file__).resolve().parent.parent / name
    if source.is_dir():
        return source
    for prefix in (sys.prefix, site.getuserbase()):
        installed = Path(prefix) / "share" / "mc2sim" / name
        if installed.is_dir():
            return installed
    return source


def shipped_names(folder: Path) -> list[str]:
    """Return the names of the ``*.yaml`` files in ``folder``, sorted, without the suffix.

    Empty when the folder is absent (an installed package without the source tree).
    """
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if p.is_file())


def shipped_file(folder: Path, name: str, what: str) -> Path:
    """Return ``folder/<name>.yaml`` if it is one of :func:`shipped_names`.

    Raises:
        ParamInvalidError: it is not; the error names ``what`` (``"scenario"``,
            ``"topology"``) and lists the known names.
    """
    known = shipped_names(folder)
    if name not in known:
        listed = ", ".join(known) if known else f"none found in {folder}"
        raise ParamInvalidError(what, name, f"is not a shipped {what}; known: {listed}")
    return folder / f"{name}.yaml"
