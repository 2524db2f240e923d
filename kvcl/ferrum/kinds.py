"""The KV dtype classes of the ferrum mirror and their ``KvLayer`` operations.

ferrum dispatches per K dtype through two traits: ``KvDtypeKind`` (``NAME``,
``BYTES_PER_ELEM``) and ``KvLayer<B>`` (allocation, metadata accessors, paged / contiguous
write and decode attention). Here each dtype is a class and the trait functions are its
classmethods, so ported code reads the same: ``KvFp16.paged_write(layer, ...)``.

All numerics run in kvcl's kernels (:mod:`kvcl.ops.paged_write`,
:mod:`kvcl.ops.decode_attention`); their numpy twins are in :mod:`kvcl.reference`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyopencl.array as cla

from ..dtypes import INT8_MODE_AWAY, INT8_MODE_EVEN, kv_dtype
from ..errors import (
    DtypeError,
    InvalidArgument,
    OutOfRangeError,
    ShapeError,
)
from ..ops import decode_attention as attention_ops
from ..ops import write_checks as checks
from ..runtime import resolve_device
from ..validate import check_array, check_float, check_int, is_device_array
from . import _fused, _io
from .layer import AttnConfig, KvCache, KvCacheQuant, KvDtypeUnsupported
from ..ops._launch import to_host

__all__ = ["QK_MODES", "KvBf16", "KvDtypeKind", "KvFp8", "KvFp16", "KvInt8", "KvLayer"]

#: qk_mode → (RMS-norm Q and K with the weights, RoPE mode of kvcl's kernel)
QK_MODES = {0: (False, "none"), 1: (True, "half"), 2: (False, "half"), 3: (False, "interleaved")}
_INT32_MAX = 2**31 - 1


class KvDtypeKind:
    """Marker + metadata of a KV element type (ferrum ``ferrum_interfaces::kv_dtype::KvDtypeKind``).

    Attributes
    ----------
    NAME : str
        Stable name: ``"fp16"``, ``"bf16"``, ``"int8"``, ``"fp8"``.
    BYTES_PER_ELEM : int
        Bytes per stored K or V element (scales not counted).
    """

    NAME: str = ""
    BYTES_PER_ELEM: int = 0


class KvLayer(KvDtypeKind):
    """The ``KvLayer`` trait: allocation, accessors, write and decode attention for one dtype.

    Not used directly: call the subclasses (:class:`KvFp16`, :class:`KvInt8`, :class:`KvFp8`;
    :class:`KvBf16` refuses to allocate). Every method checks that the layer was made by the
    same class. Deliberate differences shared by all dtypes are listed in :mod:`kvcl.ferrum`.
    """

    _STORAGE: str | None = None     # kvcl storage dtype name (kvcl.dtypes)
    _INT8_MODE: int = INT8_MODE_AWAY
    _OWN_POOLS = False                # INT8: the layer owns its pools; else a shared pool
    _CONTIG = True                    # alloc_contig / contig_* supported

    # ---- allocation ------------------------------------------------------------------------

    @classmethod
    def _storage(cls):
        if cls._STORAGE is None:
            raise KvDtypeUnsupported(
                f"{cls.__name__}: kvcl has no {cls.NAME} storage kernel, and ferrum has no "
                f"KvLayer impl for {cls.__name__} either (only a KvDtypeKind marker); use KvFp16")
        return kv_dtype(cls._STORAGE)

    @classmethod
    def _shape_args(cls, block_size_name: str, block_size: Any, num_kv_heads: Any, head_dim: Any):
        bs = check_int(block_size_name, block_size, low=1)
        h = check_int("num_kv_heads", num_kv_heads, low=1)
        d = check_int("head_dim", head_dim, low=4)
        if d % 4:
            raise InvalidArgument(f"head_dim: kvcl's kernels need a multiple of 4, got {d}")
        return bs, h, d

    @classmethod
    def _paged_meta(cls, device, max_blocks: int):
        ids = np.arange(max_blocks, dtype=np.uint32)
        return cla.to_device(device.queue, ids), cla.zeros(device.queue, 1, np.uint32), ids.tolist()

    @classmethod
    def alloc_paged(cls, max_blocks_per_seq: int, block_size: int, num_kv_heads: int,
                    head_dim: int, *, pool_k: Any = None, pool_v: Any = None,
                    device: Any = None) -> KvCache:
        """Allocate a paged layer for one sequence (``capacity = max_blocks_per_seq · block_size``).

        Parameters
        ----------
        max_blocks_per_seq, block_size, num_kv_heads : int
            At least 1.
        head_dim : int
            A multiple of 4 (kvcl's kernels).
        pool_k, pool_v : pyopencl.array.Array, optional
            FP16 / FP8 only: shared pools ``[num_blocks, num_kv_heads, block_size,
            head_dim]`` (see :meth:`alloc_pool`) bound to the layer as ``k`` / ``v`` and used
            when an operation gets no pool. Ignored for INT8 (its layer owns its pools).
        device : kvcl.Device or str, optional
            Default: the pools' device when given, else :func:`kvcl.default_device`.

        Returns
        -------
        KvCache (FP16, FP8) or KvCacheQuant (INT8)
            ``block_table`` uint32 ``[max_blocks_per_seq]`` starts as the identity map and
            ``paged_block_indices`` as its host copy; ``context_lens`` uint32 ``[1]`` is 0.

        Examples
        --------
        >>> pool_k, pool_v = KvFp16.alloc_pool(8, 16, 2, 128)               # doctest: +SKIP
        >>> layer = KvFp16.alloc_paged(4, 16, 2, 128, pool_k=pool_k, pool_v=pool_v)  # doctest: +SKIP
        >>> KvFp16.capacity(layer), KvFp16.is_paged(layer)                   # doctest: +SKIP
        (64, True)
        """
        storage = cls._storage()
        max_blocks = check_int("max_blocks_per_seq", max_blocks_per_seq, low=1)
        bs, h, d = cls._shape_args("block_size", block_size, num_kv_heads, head_dim)
        if max_blocks > _INT32_MAX or max_blocks * bs > _INT32_MAX:
            raise InvalidArgument(f"max_blocks_per_seq: {max_blocks} blocks of {bs} tokens exceed "
                                  "the kernels' int32 positions")
        dev = resolve_device(device)
        common = {"kind": cls, "capacity": max_blocks * bs, "num_kv_heads": h, "head_dim": d,
                      "block_size": bs, "device": dev}
        if cls._OWN_POOLS:
            shape = (max_blocks, h, bs, d)
            k = dev.alloc(shape, storage.storage, what="the INT8 K pool", zero=True)
            v = dev.alloc(shape, storage.storage, what="the INT8 V pool", zero=True)
            ks = dev.alloc(shape[:3], np.uint16, what="the INT8 K scales", zero=True)
            vs = dev.alloc(shape[:3], np.uint16, what="the INT8 V scales", zero=True)
            table, lens, host = cls._paged_meta(dev, max_blocks)
            return KvCacheQuant(k=k, v=v, k_scales=ks, v_scales=vs, block_table=table,
                                context_lens=lens, paged_block_indices=host, **common)
        probe = KvCache(k=None, v=None, block_table=None, context_lens=None,
                        paged_block_indices=[], **common)
        if (pool_k is None) != (pool_v is None):
            raise InvalidArgument("pool_k, pool_v: give both shared pools or neither")
        if pool_k is not None:
            _io.check_pool("pool_k", pool_k, probe, storage.storage, bs)
            _io.check_pool("pool_v", pool_v, probe, storage.storage, bs)
            if tuple(pool_v.shape) != tuple(pool_k.shape):
                raise ShapeError(f"pool_v: expected the shape of pool_k {tuple(pool_k.shape)}, "
                                 f"got {tuple(pool_v.shape)}")
        table, lens, host = cls._paged_meta(dev, max_blocks)
        return KvCache(k=pool_k, v=pool_v, block_table=table, context_lens=lens,
                       paged_block_indices=host, **common)

    @classmethod
    def alloc_contig(cls, capacity: int, num_kv_heads: int, head_dim: int, *,
                     device: Any = None) -> KvCache:
        """Allocate a contiguous layer: K and V ``[num_kv_heads, capacity, head_dim]``, zeroed.

        Parameters
        ----------
        capacity, num_kv_heads : int
        head_dim : int
            A multiple of 4.
        device : kvcl.Device or str, optional

        Raises
        ------
        KvDtypeUnsupported
            For INT8 (ferrum panics: "INT8 KV is paged-only") and BF16.

        Examples
        --------
        >>> layer = KvFp16.alloc_contig(64, 2, 128)              # doctest: +SKIP
        >>> KvFp16.is_paged(layer), KvFp16.block_size(layer)     # doctest: +SKIP
        (False, 0)
        """
        storage = cls._storage()
        if not cls._CONTIG:
            raise KvDtypeUnsupported(f"{cls.__name__}.alloc_contig: {cls.NAME} KV is paged-only "
                                     "(ferrum panics here); use alloc_paged")
        cap, h, d = cls._shape_args("capacity", capacity, num_kv_heads, head_dim)
        dev = resolve_device(device)
        k = dev.alloc((h, cap, d), storage.storage, what="the contiguous K cache", zero=True)
        v = dev.alloc((h, cap, d), storage.storage, what="the contiguous V cache", zero=True)
        return KvCache(kind=cls, k=k, v=v, capacity=cap, num_kv_heads=h, head_dim=d, block_size=0,
                       block_table=None, context_lens=None, paged_block_indices=[], device=dev)

    @classmethod
    def alloc_pool(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                   device: Any = None) -> tuple:
        """Shared K and V pools for paged FP16 / FP8 layers (kvcl addition; ferrum's model
        allocates them itself).

        Returns
        -------
        (pool_k, pool_v) : pyopencl.array.Array
            Zeroed ``[num_blocks, num_kv_heads, block_size, head_dim]``, uint16 fp16 bits
            (FP16) or uint8 E4M3 bytes (FP8).
        """
        storage = cls._storage()
        if cls._OWN_POOLS:
            raise KvDtypeUnsupported(f"{cls.__name__}.alloc_pool: an {cls.NAME} layer owns its "
                                     "pools (alloc_paged allocates them)")
        n = check_int("num_blocks", num_blocks, low=1)
        bs, h, d = cls._shape_args("block_size", block_size, num_kv_heads, head_dim)
        dev = resolve_device(device)
        shape = (n, h, bs, d)
        return (dev.alloc(shape, storage.storage, what="the shared K pool", zero=True),
                dev.alloc(shape, storage.storage, what="the shared V pool", zero=True))

    # ---- accessors (the variant-agnostic trait functions) ---------------------------------

    @classmethod
    def _layer(cls, layer: Any, *, paged: bool | None = None) -> KvCache:
        if not isinstance(layer, KvCache):
            raise DtypeError(f"layer: expected a layer made by {cls.__name__}.alloc_*, got "
                             f"{type(layer).__name__}")
        if layer.kind is not cls:
            raise DtypeError(f"layer: expected a {cls.__name__} layer, got a "
                             f"{layer.kind.__name__} layer; call {layer.kind.__name__}'s methods")
        if paged is True and not layer.is_paged:
            raise InvalidArgument("layer: a contiguous layer has no block_table; use the contig_* "
                                  "operations (ferrum: 'missing block_table')")
        if paged is False and layer.is_paged:
            raise InvalidArgument("layer: a paged layer; use paged_write / paged_decode_attention")
        return layer

    @classmethod
    def len(cls, layer: KvCache) -> int:
        return cls._layer(layer).len

    @classmethod
    def set_len(cls, layer: KvCache, new_len: int) -> None:
        """Set the cached-token count; ``0 <= new_len <= capacity`` (ferrum does not check)."""
        layer = cls._layer(layer)
        layer.len = check_int("new_len", new_len, low=0, high=layer.capacity + 1)

    @classmethod
    def capacity(cls, layer: KvCache) -> int:
        return cls._layer(layer).capacity

    @classmethod
    def block_size(cls, layer: KvCache) -> int:
        return cls._layer(layer).block_size

    @classmethod
    def num_kv_heads(cls, layer: KvCache) -> int:
        return cls._layer(layer).num_kv_heads

    @classmethod
    def head_dim(cls, layer: KvCache) -> int:
        return cls._layer(layer).head_dim

    @classmethod
    def block_table(cls, layer: KvCache):
        """The uint32 device block table, or ``None`` for a contiguous layer."""
        return cls._layer(layer).block_table

    block_table_mut = block_table

    @classmethod
    def context_lens(cls, layer: KvCache):
        """The uint32 ``[1]`` device context length, or ``None`` for a contiguous layer."""
        return cls._layer(layer).context_lens

    context_lens_mut = context_lens

    @classmethod
    def paged_block_indices(cls, layer: KvCache) -> list:
        """The host copy of the block table (the list itself: mutate it as Rust's ``_mut``)."""
        return cls._layer(layer).paged_block_indices

    paged_block_indices_mut = paged_block_indices

    @classmethod
    def is_paged(cls, layer: KvCache) -> bool:
        return cls._layer(layer).block_size > 0

    @classmethod
    def set_block_table(cls, layer: KvCache, block_ids: Any) -> None:
        """Write ``block_ids`` to the device table's first entries and to ``paged_block_indices``.

        kvcl addition: what ferrum's model does with ``write_u32`` on ``block_table_mut`` plus
        the host copy. Block ids must be in ``[0, 2**31)`` (INT8: inside the layer's own pool);
        FP16 / FP8 ids are checked against the shared pool when it is used.

        Examples
        --------
        >>> KvFp16.set_block_table(layer, [5, 2, 7, 1])          # doctest: +SKIP
        """
        layer = cls._layer(layer, paged=True)
        ids = np.asarray(block_ids)
        check_array("block_ids", ids, ndim=1)
        if ids.size and ids.dtype.kind not in "iu":
            raise DtypeError(f"block_ids: expected integer block ids, got dtype {ids.dtype}")
        check_int("len(block_ids)", len(ids), low=0, high=layer.max_blocks_per_seq + 1)
        limit = layer.max_blocks_per_seq if cls._OWN_POOLS else _INT32_MAX
        for i, b in enumerate(ids.tolist()):
            check_int(f"block_ids[{i}]", b, low=0, high=limit)
        if len(ids):
            table = to_host(layer.block_table)
            table[:len(ids)] = ids.astype(np.uint32)
            layer.block_table.set(table)
        layer.paged_block_indices[:] = [int(b) for b in ids]

    # ---- shared checks ---------------------------------------------------------------------

    @classmethod
    def _heads(cls, layer, num_q_heads, num_kv_heads, head_dim) -> int:
        hq = check_int("num_q_heads", num_q_heads, low=1)
        for name, value, want in (("num_kv_heads", num_kv_heads, layer.num_kv_heads),
                                  ("head_dim", head_dim, layer.head_dim)):
            if check_int(name, value) != want:
                raise ShapeError(f"{name}: the layer has {want}, got {value}")
        return checks.check_q_heads(hq, layer.num_kv_heads)

    @classmethod
    def _pools(cls, layer, pool_k, pool_v):
        """``(k_pool, v_pool, k_scales, v_scales)`` the kernels use for a paged layer."""
        if cls._OWN_POOLS:  # ferrum ignores the pool arguments of an INT8 layer
            return layer.k, layer.v, layer.k_scales, layer.v_scales
        storage = cls._storage().storage
        pk = pool_k if pool_k is not None else layer.k
        pv = pool_v if pool_v is not None else layer.v
        _io.check_pool("pool_k", pk, layer, storage, layer.block_size)
        _io.check_pool("pool_v", pv, layer, storage, layer.block_size)
        if tuple(pv.shape) != tuple(pk.shape):
            raise ShapeError(f"pool_v: expected the shape of pool_k {tuple(pk.shape)}, got "
                             f"{tuple(pv.shape)}")
        return pk, pv, None, None

    # ---- write ------------------------------------------------------------------------------

    @classmethod
    def _write_args(cls, layer, tokens, num_q_heads, num_kv_heads, head_dim, pos_offset, eps,
                    qk_mode):
        tokens = check_int("tokens", tokens, low=0)
        hq = cls._heads(layer, num_q_heads, num_kv_heads, head_dim)
        pos_offset = check_int("pos_offset", pos_offset, low=0)
        eps = check_float("eps", eps)
        qk_mode = check_int("qk_mode", qk_mode)
        if qk_mode not in QK_MODES:
            raise InvalidArgument(f"qk_mode: expected 0 (copy), 1 (RMS qk-norm + half RoPE), "
                                  f"2 (half RoPE) or 3 (interleaved RoPE), got {qk_mode!r}")
        return tokens, hq, pos_offset, eps, int(qk_mode)

    @classmethod
    def paged_write(cls, layer: KvCache, qkv: Any, q_norm_w: Any, k_norm_w: Any, cos: Any,
                    sin: Any, q_out: Any, tokens: int, num_q_heads: int, num_kv_heads: int,
                    head_dim: int, pos_offset: int, eps: float, qk_mode: int,
                    pool_k: Any = None, pool_v: Any = None):
        """Split packed QKV → optional RMS qk-norm → RoPE → store K/V in the paged cache.

        Token ``t`` goes to position ``p = pos_offset + t``: RoPE row ``p`` of ``cos`` /
        ``sin``, cache slot ``block_table[p // block_size] · block_size + p % block_size``.
        Q (normed and rotated like K) goes to ``q_out``; V is stored as given. ``len`` is
        not changed (the caller does ``set_len(layer, len + tokens)``).

        Parameters
        ----------
        layer : KvCache or KvCacheQuant
            A paged layer of this dtype.
        qkv : float32, ``tokens · (num_q_heads + 2·num_kv_heads) · head_dim`` elements
            Per token all Q heads, then the K heads, then the V heads (numpy or device array,
            ``[tokens, width]`` or flat).
        q_norm_w, k_norm_w : float32 ``[head_dim]`` or None
            RMS-norm weights, required for ``qk_mode`` 1 and unused otherwise.
        cos, sin : float32 ``[max_position, head_dim / 2]`` or None
            RoPE tables, required unless ``qk_mode`` is 0; at least ``pos_offset + tokens`` rows.
        q_out : float32 ``tokens · num_q_heads · head_dim`` elements, or None
            Receives Q ``[tokens][num_q_heads][head_dim]``; allocated when None.
        tokens, num_q_heads : int
        num_kv_heads, head_dim : int
            Must equal the layer's.
        pos_offset : int
        eps : float
        qk_mode : {0, 1, 2, 3}
            0 copy; 1 ``x · rsqrt(mean(x²) + eps) · w`` then half-split RoPE
            (``out[i] = x0·c − x1·s``, ``out[i + D/2] = x1·c + x0·s``); 2 half-split RoPE only;
            3 RoPE on interleaved pairs ``(2i, 2i + 1)``.
        pool_k, pool_v : pyopencl.array.Array, optional
            FP16 / FP8: the shared pools (default: those bound at ``alloc_paged``).
            INT8: ignored, as in ferrum.

        Returns
        -------
        q_out
            The given ``q_out`` filled, or a new array: numpy if ``qkv`` was numpy, else a
            device array ``[tokens, num_q_heads, head_dim]``.

        Raises
        ------
        kvcl.CapacityError
            ``pos_offset + tokens > capacity`` (ferrum writes past the table).
        kvcl.OutOfRangeError
            A block-table entry used by the write is outside the pool (ferrum writes out of
            bounds), or a head count / dimension differs from the layer's.
        kvcl.ShapeError, kvcl.DtypeError, kvcl.NonFiniteError, kvcl.InvalidArgument
            Bad arrays (numpy inputs must be finite) or arguments. All of these are raised
            before anything is written.

        Examples
        --------
        >>> q = KvInt8.paged_write(layer, qkv, None, None, None, None, None, tokens=5,
        ...                        num_q_heads=8, num_kv_heads=2, head_dim=128, pos_offset=0,
        ...                        eps=1e-6, qk_mode=0)                   # doctest: +SKIP
        >>> KvInt8.set_len(layer, 5)                                    # doctest: +SKIP
        """
        layer = cls._layer(layer, paged=True)
        tokens, hq, pos_offset, eps, qk_mode = cls._write_args(
            layer, tokens, num_q_heads, num_kv_heads, head_dim, pos_offset, eps, qk_mode)
        _io.check_capacity(layer, pos_offset + tokens, "paged_write")
        pools = cls._pools(layer, pool_k, pool_v)
        if tokens == 0:  # ferrum returns early too
            _io.as_input("qkv", qkv, (0, (hq + 2 * layer.num_kv_heads) * layer.head_dim), layer)
            return q_out if q_out is not None else np.zeros((0, hq, layer.head_dim), np.float32)
        bs = layer.block_size
        table = _io.read_block_table(layer, pos_offset // bs, (pos_offset + tokens - 1) // bs,
                                     int(pools[0].shape[0]))
        return _fused.write(cls, layer, qkv, q_norm_w, k_norm_w, cos, sin, q_out, tokens, hq,
                            pos_offset, eps, qk_mode, norm_rope=QK_MODES[qk_mode], slot_start=None,
                            pools=pools, block_size=bs, table=table)

    @classmethod
    def contig_write(cls, layer: KvCache, qkv: Any, q_norm_w: Any, k_norm_w: Any, cos: Any,
                     sin: Any, q_out: Any, tokens: int, num_q_heads: int, num_kv_heads: int,
                     head_dim: int, pos_offset: int, eps: float, qk_mode: int):
        """The write of :meth:`paged_write` on a contiguous layer (FP16 / FP8 only).

        As in ferrum's contiguous path, token ``t`` is stored at row ``len + t`` of the
        ``[num_kv_heads, capacity, head_dim]`` cache and rotated at position
        ``pos_offset + t`` (callers pass ``pos_offset == len``). ``len`` is not changed.
        The scratch buffers of the Rust signature (``k_scratch``, ``v_scratch``, ``q_buf``,
        ``k_buf``, ``v_buf``) are not needed and not taken.

        Returns
        -------
        q_out
            As in :meth:`paged_write`.

        Raises
        ------
        KvDtypeUnsupported
            For INT8 (ferrum: ``unimplemented!``).
        kvcl.CapacityError
            ``len + tokens > capacity``. Other errors as in :meth:`paged_write`.
        """
        if not cls._CONTIG:
            raise KvDtypeUnsupported(f"{cls.__name__}.contig_write: {cls.NAME} KV is paged-only")
        layer = cls._layer(layer, paged=False)
        tokens, hq, pos_offset, eps, qk_mode = cls._write_args(
            layer, tokens, num_q_heads, num_kv_heads, head_dim, pos_offset, eps, qk_mode)
        _io.check_capacity(layer, layer.len + tokens, "contig_write")
        if tokens == 0:
            _io.as_input("qkv", qkv, (0, (hq + 2 * layer.num_kv_heads) * layer.head_dim), layer)
            return q_out if q_out is not None else np.zeros((0, hq, layer.head_dim), np.float32)
        shape = (1, layer.num_kv_heads, layer.capacity, layer.head_dim)
        pools = (layer.k.reshape(shape), layer.v.reshape(shape), None, None)
        return _fused.write(cls, layer, qkv, q_norm_w, k_norm_w, cos, sin, q_out, tokens, hq,
                            pos_offset, eps, qk_mode, norm_rope=QK_MODES[qk_mode],
                            slot_start=layer.len, pools=pools, block_size=layer.capacity, table=None)

    # ---- decode attention -------------------------------------------------------------------

    @classmethod
    def paged_decode_attention(cls, layer: KvCache, q: Any, output: Any, num_q_heads: int,
                               num_kv_heads: int, head_dim: int, final_kv_len: int, tokens: int,
                               pool_k: Any = None, pool_v: Any = None):
        """Attention of ``tokens`` query rows over the first ``final_kv_len`` cached positions.

        Writes ``final_kv_len`` to ``context_lens``. Query head ``h`` reads kv head
        ``h // (num_q_heads / num_kv_heads)``; logits ``q·k / sqrt(head_dim)``, max-subtracted
        softmax and ``Σ p·v`` in float32, quantized K/V dequantized on the fly. With
        ``tokens > 1`` query ``i`` sees positions ``[0, final_kv_len − tokens + 1 + i)``.

        Parameters
        ----------
        layer : KvCache or KvCacheQuant
            A paged layer of this dtype.
        q : float32, ``tokens · num_q_heads · head_dim`` elements
            Token-major ``[tokens][num_q_heads][head_dim]`` (numpy or device).
        output : float32, same size, or None
            Receives the result; allocated when None.
        num_q_heads : int
            A multiple of ``num_kv_heads``.
        num_kv_heads, head_dim : int
            Must equal the layer's.
        final_kv_len : int
            ``tokens <= final_kv_len <= capacity``.
        tokens : int
            At least 1 (ferrum's INT8 kernel ignores it and decodes one row; kvcl does not).
        pool_k, pool_v : pyopencl.array.Array, optional
            As in :meth:`paged_write`.

        Returns
        -------
        output
            The given ``output`` filled, or a new array (numpy if ``q`` was numpy) of shape
            ``[tokens, num_q_heads, head_dim]``.

        Examples
        --------
        >>> out = KvFp16.paged_decode_attention(layer, q, None, 8, 2, 128, 50, 1)  # doctest: +SKIP
        """
        layer = cls._layer(layer, paged=True)
        hq = cls._heads(layer, num_q_heads, num_kv_heads, head_dim)
        tokens = check_int("tokens", tokens, low=1)
        final_kv_len = check_int("final_kv_len", final_kv_len, low=tokens)
        _io.check_capacity(layer, final_kv_len, "paged_decode_attention: final_kv_len")
        k_pool, v_pool, k_scales, v_scales = cls._pools(layer, pool_k, pool_v)
        bs = layer.block_size
        npages = -(-final_kv_len // bs)
        table = _io.read_block_table(layer, 0, npages - 1, int(k_pool.shape[0]))
        D = layer.head_dim
        like_device = is_device_array(q)
        q_dev = _io.as_input("q", q, (tokens, hq, D), layer)
        out_dev, target = _io.as_output("output", output, (tokens, hq, D), layer,
                                        like_device=like_device)
        if is_device_array(output) and output.base_data == q_dev.base_data:
            raise InvalidArgument("output: must not alias q")
        indptr, indices, last, q_indptr = _io.upload_ints(
            layer, [0, npages], table, [final_kv_len - (npages - 1) * bs], [0, tokens])
        layer.context_lens.set(np.array([final_kv_len], np.uint32))
        attention_ops.paged_attention(
            q_dev, k_pool, v_pool, indptr, indices, last, q_indptr, out_dev, k_scales=k_scales,
            v_scales=v_scales, kv_dtype=cls._STORAGE, int8_mode=cls._INT8_MODE,
            scale=1.0 / math.sqrt(D), max_q_len=tokens, max_kv_len=final_kv_len,
            queue=layer.device.queue)
        return _io.finish_output(out_dev, target, output)

    @classmethod
    def contig_decode_attention(cls, layer: KvCache, q: Any, output: Any, attn_cfg: AttnConfig,
                                tokens: int, pos_offset: int):
        """Attention of ``tokens`` query rows over the contiguous layer's first ``len`` positions.

        Parameters
        ----------
        layer : KvCache
            A contiguous layer of this dtype, ``len >= tokens``.
        q, output
            As in :meth:`paged_decode_attention`.
        attn_cfg : AttnConfig
            Heads, scale, causality, sliding window.
        tokens : int
            At least 1.
        pos_offset : int
            Absolute position of query 0 (see :class:`AttnConfig` for what kvcl accepts).

        Raises
        ------
        KvDtypeUnsupported
            For INT8 (ferrum: ``unimplemented!``).
        """
        if not cls._CONTIG:
            raise KvDtypeUnsupported(f"{cls.__name__}.contig_decode_attention: {cls.NAME} KV is "
                                     "paged-only")
        layer = cls._layer(layer, paged=False)
        if not isinstance(attn_cfg, AttnConfig):
            raise DtypeError(f"attn_cfg: expected a kvcl.ferrum.AttnConfig, got "
                             f"{type(attn_cfg).__name__}")
        hq = cls._heads(layer, attn_cfg.num_heads, attn_cfg.num_kv_heads, attn_cfg.head_dim)
        tokens = check_int("tokens", tokens, low=1)
        pos_offset = check_int("pos_offset", pos_offset, low=0)
        kv_len = layer.len
        if kv_len < tokens:
            raise OutOfRangeError(f"layer.len: {kv_len} cached tokens, fewer than the {tokens} "
                                  "query tokens (call set_len after contig_write)")
        if attn_cfg.causal and pos_offset + tokens != kv_len:
            raise InvalidArgument(
                f"pos_offset: kvcl's causal mask ends each query at its own position, "
                f"pos_offset + tokens must equal len ({kv_len}), got {pos_offset} + {tokens}")
        if not attn_cfg.causal and tokens != 1:
            raise InvalidArgument("attn_cfg.causal: kvcl's kernel always masks causally; "
                                  "non-causal attention needs tokens == 1")
        scale = None if attn_cfg.scale is None else check_float("attn_cfg.scale", attn_cfg.scale)
        window = check_int("attn_cfg.sliding_window", attn_cfg.sliding_window, low=0)
        D = layer.head_dim
        like_device = is_device_array(q)
        q_dev = _io.as_input("q", q, (tokens, hq, D), layer)
        out_dev, target = _io.as_output("output", output, (tokens, hq, D), layer,
                                        like_device=like_device)
        if is_device_array(output) and output.base_data == q_dev.base_data:
            raise InvalidArgument("output: must not alias q")
        shape = (1, layer.num_kv_heads, layer.capacity, D)
        kv_lens, q_indptr = _io.upload_ints(layer, [kv_len], [0, tokens])
        attention_ops.contiguous_attention(
            q_dev, layer.k.reshape(shape), layer.v.reshape(shape), kv_lens, q_indptr, out_dev,
            kv_dtype=cls._STORAGE, scale=scale, window=window, max_q_len=tokens,
            max_kv_len=kv_len, queue=layer.device.queue)
        return _io.finish_output(out_dev, target, output)


class KvFp16(KvLayer):
    """FP16 KV (ferrum ``KvFp16``): K/V stored as IEEE binary16, rounded to nearest even.

    Paged layers write into a shared pool passed to each operation (or bound at
    ``alloc_paged``); contiguous layers own ``[num_kv_heads, capacity, head_dim]``
    caches. kvcl storage dtype ``"fp16"`` (uint16 bits, ``vstore_half_rte``).
    """

    NAME = "fp16"
    BYTES_PER_ELEM = 2
    _STORAGE = "fp16"


class KvBf16(KvLayer):
    """BF16 KV (ferrum ``KvBf16``): metadata only.

    ferrum defines the ``KvDtypeKind`` marker but no ``KvLayer`` impl (a layer of it does not
    compile), and kvcl has no bf16 storage kernel. Emulating it with float32 storage would
    keep values bf16 would round and report ``BYTES_PER_ELEM`` 2 for 4-byte storage, so kvcl
    refuses instead: ``alloc_paged`` / ``alloc_contig`` / ``alloc_pool`` raise
    :class:`KvDtypeUnsupported`.
    """

    NAME = "bf16"
    BYTES_PER_ELEM = 2
    _STORAGE = None


class KvInt8(KvLayer):
    """INT8 KV (ferrum ``KvInt8``): paged-only, per-layer int8 pools with fp16 row scales.

    Numerics of ferrum's CUDA kernel, run by kvcl's ``int8_mode=1``: per (token, kv head)
    ``scale = max(absmax, 1e-8) / 127`` stored as fp16, ``q = rint(clamp(x / scale, ±127))``
    (round half to even), with ``x / scale`` on the float32 scale (ferrum multiplies by
    ``1 / scale``: a last-ulp difference can move a value across a rounding boundary).
    Decode attention folds the fp16 scales back in. ``alloc_contig`` and the ``contig_*``
    operations raise :class:`KvDtypeUnsupported` (ferrum panics); the pool arguments of the
    operations are ignored, as in ferrum.
    """

    NAME = "int8"
    BYTES_PER_ELEM = 1
    _STORAGE = "int8"
    _INT8_MODE = INT8_MODE_EVEN
    _OWN_POOLS = True
    _CONTIG = False


class KvFp8(KvLayer):
    """FP8 KV (ferrum ``KvFp8``, "E4M3 by default"): a kvcl extension with FP16's API.

    ferrum defines only the marker (no ``KvLayer`` impl); kvcl implements it like
    :class:`KvFp16` (shared pools for paged layers, contiguous layers supported) with storage
    ``"fp8_e4m3"``: OCP E4M3 bytes, round to nearest even, saturating at ±448, no scale.
    """

    NAME = "fp8"
    BYTES_PER_ELEM = 1
    _STORAGE = "fp8_e4m3"
