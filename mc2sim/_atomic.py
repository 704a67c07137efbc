"""Atomic file writes: a temporary file in the destination's folder, then a rename.

A reader (another rank, a plotting script polling a results folder) never sees half a file,
and a failed write leaves the previous file in place. Files get the usual permissions
(``0o666`` less the umask), not the ``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, parents: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in its folder, then rename.

    Args:
        path: the destination file.
        data: text (written as UTF-8, newlines untranslated) or bytes.
        parents: create missing parent folders; otherwise a missing folder raises
            :class:`FileNotFoundError`.

    Returns:
        The destination as a :class:`~pathlib.Path`.

    """
    target = Path(path)
    if parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target
