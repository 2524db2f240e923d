"""kvcl's file format for saved caches: one header, many raw arrays, every byte checksummed.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"KVCLSAVE"
    8       4     format version (uint32, currently 1)
    12      8     header length H in bytes (uint64)
    20      H     header: UTF-8 JSON object (see below)
    20+H    32    SHA-256 of the header bytes
    ...           the arrays' raw bytes, back to back, in header order

The header holds ``meta`` (free-form JSON chosen by the writer: the cache's config and
bookkeeping) and ``arrays``: a list of ``{"name", "dtype", "shape", "nbytes", "sha256"}``.

:func:`read_archive` checks the magic, the version, the header checksum, the file size and
every array's checksum before returning anything, so a truncated or corrupted file raises
:class:`ArchiveError` and nothing is half-loaded. :func:`write_archive` writes to a temporary
file in the same folder and renames it over the target, so a crash mid-save leaves the old
file intact. No pyopencl import: callers move arrays to and from the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import KvclError
from .paths import atomic_file, check_output_path

MAGIC = b"KVCLSAVE"
VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")


class ArchiveError(KvclError, ValueError):
    """A saved file is not a kvcl archive, is of another version, or is damaged."""


def write_archive(path: "str | os.PathLike", meta: dict, arrays: "dict[str, np.ndarray]") -> int:
    """Write ``meta`` and ``arrays`` to ``path`` atomically; return the file size in bytes.
    A path that cannot be written raises :class:`~kvcl.errors.InvalidArgument` first."""
    path = check_output_path(path, "path")
    entries, blobs = [], []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        entries.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                        "nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        blobs.append(data)
    header = json.dumps({"meta": meta, "arrays": entries}, sort_keys=True).encode()
    with atomic_file(path) as f:
        f.write(_PREAMBLE.pack(MAGIC, VERSION, len(header)))
        f.write(header)
        f.write(hashlib.sha256(header).digest())
        for data in blobs:
            f.write(data)
    return path.stat().st_size


def read_archive(path: "str | os.PathLike") -> tuple[dict, "dict[str, np.ndarray]"]:
    """Read and fully verify an archive; return ``(meta, arrays)``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ArchiveError(f"path: no such file {str(path)!r}") from None
    if len(raw) < _PREAMBLE.size:
        raise ArchiveError(f"{path}: truncated: {len(raw)} bytes is shorter than the {_PREAMBLE.size}-byte preamble")
    magic, version, header_len = _PREAMBLE.unpack_from(raw)
    if magic != MAGIC:
        raise ArchiveError(f"{path}: not a kvcl save file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ArchiveError(f"{path}: format version {version} is not supported (this kvcl reads version {VERSION})")
    start = _PREAMBLE.size
    end = start + header_len
    if end + 32 > len(raw):
        raise ArchiveError(f"{path}: truncated inside the header ({len(raw)} bytes, header ends at {end + 32})")
    header = raw[start:end]
    if hashlib.sha256(header).digest() != raw[end:end + 32]:
        raise ArchiveError(f"{path}: header checksum mismatch (the file is corrupted)")
    try:
        doc = json.loads(header)
        meta, entries = doc["meta"], doc["arrays"]
    except (ValueError, KeyError) as exc:
        raise ArchiveError(f"{path}: unreadable header ({exc})") from None
    expected = end + 32 + sum(int(e["nbytes"]) for e in entries)
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ArchiveError(f"{path}: {kind}: {len(raw)} bytes, expected {expected}")
    arrays, offset = {}, end + 32
    for e in entries:
        data = raw[offset:offset + e["nbytes"]]
        offset += e["nbytes"]
        if hashlib.sha256(data).hexdigest() != e["sha256"]:
            raise ArchiveError(f"{path}: checksum mismatch in array {e['name']!r} (the file is corrupted)")
        dtype = np.dtype(e["dtype"])
        arrays[e["name"]] = np.frombuffer(data, dtype=dtype).reshape(e["shape"]).copy()
    return meta, arrays
