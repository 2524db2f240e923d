"""Checks for the files kvcl writes: one place that says why an output path cannot be used.

Writers (:func:`kvcl.archive.write_archive`, the ONNX bridge's model writer) call
:func:`check_output_path` before they create anything, so a bad path is refused in one line
naming the argument, instead of an ``OSError`` about the temporary file the atomic write uses.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidArgument

__all__ = ["check_output_path"]


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
