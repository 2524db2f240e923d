"""Saving a :class:`kvcl.engine.PagedKVCache` to a file and loading it back, bit-exactly.

The file format (an archive of named arrays and a JSON header) is :mod:`kvcl.archive`'s;
this module decides what a cache puts in it: its config, its host bookkeeping and every
layer's pools (and scales for int8). A damaged or mismatched file raises
:class:`kvcl.archive.ArchiveError` before any device memory is allocated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import archive
from .dtypes import kv_dtype
from .ops._launch import to_host
from .paging import PagedBookkeeping

__all__ = ["save_cache", "load_cache"]

KIND = "kvcl.PagedKVCache"
# int4's stored format: 2 = rotated rows, asymmetric codes, float16 scale + minimum (files from
# before it, per-row symmetric codes, carry no such field and are refused: their bytes would
# decode wrongly)
INT4_FORMAT = 2


def _config(cache) -> dict:
    return {"num_layers": cache.num_layers, "num_kv_heads": cache.num_kv_heads,
            "head_dim": cache.head_dim, "num_blocks": cache.num_blocks,
            "block_size": cache.block_size, "dtype": cache.dtype.name,
            "enable_prefix_caching": cache._book.prefix_index is not None,
            **({"int4_format": INT4_FORMAT} if cache.dtype.name == "int4" else {})}


def save_cache(cache, path) -> int:
    """Write ``cache`` to ``path`` (atomic, see :func:`kvcl.archive.write_archive`); its size.
    Call with the cache's lock held (:meth:`~kvcl.engine.PagedKVCache.save` does)."""
    cache.synchronize()
    arrays = {}
    for layer in range(cache.num_layers):
        arrays[f"k.{layer}"] = to_host(cache._k[layer])
        arrays[f"v.{layer}"] = to_host(cache._v[layer])
        if cache.dtype.has_scale:
            arrays[f"k_scale.{layer}"] = to_host(cache._ks[layer])
            arrays[f"v_scale.{layer}"] = to_host(cache._vs[layer])
    meta = {"kind": KIND, "config": _config(cache), "bookkeeping": cache._book.state_dict()}
    return archive.write_archive(path, meta, arrays)


def load_cache(cls, path, device: Any = None):
    """A ``cls`` (:class:`PagedKVCache`) rebuilt from a file :func:`save_cache` wrote."""
    meta, arrays = archive.read_archive(path)
    if meta.get("kind") != KIND:
        raise archive.ArchiveError(f"{path}: holds {meta.get('kind')!r}, not a {KIND}")
    cfg = meta["config"]
    dt = kv_dtype(cfg["dtype"])
    if dt.name == "int4" and cfg.get("int4_format") != INT4_FORMAT:
        raise archive.ArchiveError(
            f"{path}: int4 format {cfg.get('int4_format', 1)} (per-row symmetric codes, before "
            f"kvcl's rotated int4) is not readable by this kvcl (int4 format {INT4_FORMAT}); "
            "rebuild the cache and save it again")
    pool_shape = [cfg["num_blocks"], cfg["num_kv_heads"], cfg["block_size"], dt.row_elems(cfg["head_dim"])]
    expected = {}
    for layer in range(cfg["num_layers"]):
        expected[f"k.{layer}"] = (dt.storage, pool_shape)
        expected[f"v.{layer}"] = (dt.storage, pool_shape)
        if dt.has_scale:
            expected[f"k_scale.{layer}"] = (np.dtype(np.float32), pool_shape[:3])
            expected[f"v_scale.{layer}"] = (np.dtype(np.float32), pool_shape[:3])
    if set(arrays) != set(expected):
        raise archive.ArchiveError(f"{path}: arrays {sorted(arrays)} do not match the config (expected {sorted(expected)})")
    for name, (dtype, shape) in expected.items():
        if arrays[name].dtype != dtype or list(arrays[name].shape) != list(shape):
            raise archive.ArchiveError(
                f"{path}: array {name!r} is {arrays[name].dtype} {list(arrays[name].shape)}, "
                f"the config ({dt.name}) needs {np.dtype(dtype)} {shape}")
    try:
        book = PagedBookkeeping.from_state_dict(meta["bookkeeping"])
    except Exception as exc:
        raise archive.ArchiveError(f"{path}: bookkeeping is inconsistent: {exc}") from None
    cache = cls(cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"], cfg["num_blocks"],
                cfg["block_size"], dt, device=device,
                enable_prefix_caching=cfg.get("enable_prefix_caching", True))
    cache._book = book
    queue = cache.device.queue
    for layer in range(cache.num_layers):
        cache._k[layer].set(arrays[f"k.{layer}"], queue=queue)
        cache._v[layer].set(arrays[f"v.{layer}"], queue=queue)
        if dt.has_scale:
            cache._ks[layer].set(arrays[f"k_scale.{layer}"], queue=queue)
            cache._vs[layer].set(arrays[f"v_scale.{layer}"], queue=queue)
    queue.finish()
    return cache
