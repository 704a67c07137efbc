"""Checks of output paths before any work: a folder or file that can be written where named.

A command that finds out only after minutes of work that its ``--out`` names a file, or
sits under one, or lies where nothing can be written, has wasted the work; these checks run
first. They leave nothing behind: whether the folder to write in takes a new entry is tried
with an empty folder made and removed at once, since permission bits alone miss a read-only
or virtual file system (``/proc``) and a process running as root.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mc2sim.errors import ParamInvalidError

__all__ = ["check_creatable", "check_new_file"]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``.`` for a relative path's start)."""
    here = path
    while not (here.exists() or here.is_symlink()):
        if here.parent == here:
            break
        here = here.parent
    return here


def check_creatable(path: Path, param: str, *, shown: Path | None = None) -> None:
    """Check that the folder ``path`` exists and is writable, or can be created.

    Args:
        path: the folder.
        param: what errors call it (``"--out"``).
        shown: the path errors show (default ``path``), e.g. the file to be written in it.

    Raises:
        ParamInvalidError: ``path`` or an ancestor on the way is a file, or the folder to
            write in is not writable (by its permissions, or as tried).

    """
    name = str(shown if shown is not None else path)
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        raise ParamInvalidError(param, name, f"cannot be made: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ParamInvalidError(param, name, f"cannot be written: {existing} is not writable")
    try:  # root passes os.access everywhere; a read-only or virtual file system refuses here
        probe = tempfile.mkdtemp(prefix=".mc2sim-probe-", dir=existing)
    except OSError as err:
        rule = f"cannot be written: {existing} takes no new entry ({err.strerror or err})"
        raise ParamInvalidError(param, name, rule) from None
    os.rmdir(probe)


def check_new_file(path: Path, param: str, *, overwrite: bool, hint: str = "") -> None:
    """Check that a file can be written at ``path``: new, or replaceable with ``overwrite``.

    Args:
        path: the file.
        param: what errors call it (``"--out"``).
        overwrite: whether an existing file may be replaced.
        hint: how to allow replacing, for the message (``"--overwrite"``).

    Raises:
        ParamInvalidError: ``path`` is a folder, exists without ``overwrite``, or its
            folder cannot be created or written.

    """
    if path.is_dir():
        raise ParamInvalidError(param, str(path), "is a folder; a file is needed")
    if (path.exists() or path.is_symlink()) and not overwrite:
        how = f": pass {hint} to replace it" if hint else ""
        raise ParamInvalidError(param, str(path), f"exists{how}")
    check_creatable(path.parent, param, shown=path)
