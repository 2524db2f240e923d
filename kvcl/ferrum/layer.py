"""The per-layer cache state of the ferrum mirror: :class:`KvCache`, :class:`KvCacheQuant`,
plus :class:`AttnConfig` and the :class:`KvDtypeUnsupported` error.

These are plain state holders, like the Rust structs: every operation lives on the dtype
classes of :mod:`kvcl.ferrum.kinds` (``KvFp16.paged_write(layer, ...)``), as in
ferrum's ``KvLayer`` trait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import KvclError
from ..runtime import Device

__all__ = ["AttnConfig", "KvCache", "KvCacheQuant", "KvDtypeUnsupported"]


class KvDtypeUnsupported(KvclError, NotImplementedError):
    """The operation does not exist for this KV dtype.

    Raised where ferrum panics (``KvInt8::alloc_contig``: "INT8 KV is paged-only";
    ``contig_write`` / ``contig_decode_attention`` of INT8: ``unimplemented!``) or does not
    compile (``KvBf16`` has no ``KvLayer`` impl), and kvcl has no kernel either (bf16 storage).
    """


class KvCache:
    """One layer's KV state for FP16 (and kvcl's FP8) — mirrors ferrum ``backend::KvCache<B, K>``.

    Made by ``KvFp16.alloc_paged`` / ``KvFp16.alloc_contig`` (or the ``KvFp8`` ones), never
    directly. Public fields as in Rust, with device arrays for the ``B::Buffer`` ones.

    Attributes
    ----------
    kind : type
        The dtype class that made it (``KvFp16`` or ``KvFp8``); only its methods accept it.
    k, v : pyopencl.array.Array or None
        Contiguous layer: ``[num_kv_heads, capacity, head_dim]`` storage (uint16 fp16 bits for
        FP16, uint8 OCP E4M3 bytes for FP8). Paged layer: the shared pools bound at
        ``alloc_paged(pool_k=..., pool_v=...)``, ``[num_blocks, num_kv_heads, block_size,
        head_dim]``, else ``None`` (Rust: a 1-element dummy buffer).
    len : int
        Tokens cached; only ``set_len`` changes it (writes do not).
    capacity : int
        Tokens: ``max_blocks_per_seq · block_size`` (paged) or ``capacity`` (contiguous).
    num_kv_heads, head_dim : int
    block_size : int
        0 for a contiguous layer.
    block_table : pyopencl.array.Array or None
        uint32 ``[max_blocks_per_seq]``: logical block → physical block of the pool (paged).
    context_lens : pyopencl.array.Array or None
        uint32 ``[1]``: the ``final_kv_len`` of the last ``paged_decode_attention`` (paged).
    paged_block_indices : list of int
        Host copy of the block table, kept by the caller as in Rust (kvcl reads the device
        ``block_table`` itself, so a stale host copy cannot misdirect a write).
    device : kvcl.Device
        Where the buffers live.
    """

    def __init__(self, *, kind: type, k: Any, v: Any, capacity: int, num_kv_heads: int,
                 head_dim: int, block_size: int, block_table: Any, context_lens: Any,
                 paged_block_indices: list, device: Device):
        self.kind = kind
        self.k = k
        self.v = v
        self.len = 0
        self.capacity = capacity
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.block_table = block_table
        self.context_lens = context_lens
        self.paged_block_indices = paged_block_indices
        self.device = device

    @property
    def is_paged(self) -> bool:
        return self.block_size > 0

    @property
    def max_blocks_per_seq(self) -> int:
        """Entries of ``block_table`` (0 for a contiguous layer)."""
        return self.capacity // self.block_size if self.block_size else 0

    def __repr__(self) -> str:
        layout = f"paged block_size={self.block_size}" if self.is_paged else "contiguous"
        return (f"<kvcl.ferrum.{type(self).__name__} {self.kind.NAME} {layout} len={self.len} "
                f"capacity={self.capacity} kv_heads={self.num_kv_heads} head_dim={self.head_dim}>")


class KvCacheQuant(KvCache):
    """One layer's INT8 KV state — mirrors ferrum ``backend::KvCacheQuant<B, KvInt8>``.

    Always paged, with its own pools (ferrum's INT8 layer owns them; the shared-pool
    arguments of the operations are ignored, as in Rust).

    Attributes
    ----------
    k, v : pyopencl.array.Array
        int8 ``[max_blocks_per_seq, num_kv_heads, block_size, head_dim]``.
    k_scales, v_scales : pyopencl.array.Array
        uint16 (IEEE fp16 bits) ``[max_blocks_per_seq, num_kv_heads, block_size]``: one
        scale per (token, kv head), ``max(absmax, 1e-8) / 127`` rounded to fp16.

    Every other attribute is that of :class:`KvCache`.
    """

    def __init__(self, *, k_scales: Any, v_scales: Any, **fields):
        super().__init__(**fields)
        self.k_scales = k_scales
        self.v_scales = v_scales


@dataclass(frozen=True)
class AttnConfig:
    """The attention shape of ``contig_decode_attention`` (ferrum ``backend::AttnConfig``).

    Parameters
    ----------
    num_heads : int
        Query heads (a multiple of ``num_kv_heads``).
    num_kv_heads, head_dim : int
        Must equal the layer's.
    causal : bool
        ``True``: query ``i`` (absolute position ``pos_offset + i``) sees positions
        ``[0, pos_offset + i]``. kvcl's kernel always masks bottom-right, so ``causal``
        with several query tokens needs ``pos_offset + tokens == len``, and ``causal=False``
        needs ``tokens == 1`` (anything else raises :class:`kvcl.InvalidArgument`).
    scale : float, optional
        Logit scale; default ``1 / sqrt(head_dim)``.
    sliding_window : int
        Attend only the last ``sliding_window`` positions (0: all).
    kv_seq_stride : int
        Accepted for signature parity and ignored: the layer's capacity is the stride.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool = True
    scale: float | None = None
    sliding_window: int = 0
    kv_seq_stride: int = 0
