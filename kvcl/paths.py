"""Checks for the files kvcl writes: one place that says why an output path cannot be used.

Writers (:func:`kvcl.archive.write_archive`, the ONNX bridge's model writer) call
:func:`check_output_path` before they create anything, so a bad path is refused in one line
naming the argument, instead of an ``OSError`` about the temporary file the atomic write uses.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import InvalidArgument

__all__ = ["check_output_path", "atomic_file"]


def check_output_path(path: "str | os.PathLike", what: str = "path") -> Path:
    """``path`` as a :class:`~pathlib.Path` if a file can be written there (replacing one that
    exists); otherwise :class:`~kvcl.errors.InvalidArgument` naming ``what``."""
    text = os.fspath(path)
    if not text:
        raise InvalidArgument(f"{what}: expected a file name, got an empty string")
    p = Path(text)
    if p.is_dir():
        raise InvalidArgument(f"{what}: expected a file name, got the folder {text!r}")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.exists():
        raise InvalidArgument(f"{what}: the folder {str(folder)!r} of {text!r} does not exist")
    if not folder.is_dir():
        raise InvalidArgument(f"{what}: {str(folder)!r} in {text!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgument(f"{what}: the folder {str(folder)!r} of {text!r} is not writable")
    return p


@contextlib.contextmanager
def atomic_file(path: Path):
    """Write ``path`` through a temporary file beside it (``with atomic_file(p) as f: f.write(...)``):
    the file appears complete, under its name, when the block ends without an exception (flushed
    to disk and renamed over any old one); otherwise the temporary file is removed and an old
    file at ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=str(path.parent) or ".")
    try:
        os.chmod(tmp, _new_file_mode(path))   # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _new_file_mode(path: Path) -> int:
    """The mode a replaced file had, else what ``open`` would give a new one (0666 less umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask
