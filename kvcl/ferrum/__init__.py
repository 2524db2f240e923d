"""Mirror of ferrum-kernels' per-dtype KV layer API (``KvDtypeKind`` / ``KvLayer``, 0.7.x).

ferrum (``ferrum-kernels``, module ``backend``) picks a KV cache layout and its write /
attention launchers per K dtype through two traits. kvcl mirrors them as Python classes over
OpenCL device buffers, with the numerics run by kvcl's kernels:

=============  ====  ===========  ===================================================
class          NAME  bytes/elem   kvcl storage
=============  ====  ===========  ===================================================
``KvFp16``     fp16  2            ``"fp16"`` (IEEE binary16, round to nearest even)
``KvBf16``     bf16  2            none: allocation raises :class:`KvDtypeUnsupported`
``KvInt8``     int8  1            ``"int8"``, ``int8_mode=1``: fp16 row scales,
                                  ``max(absmax, 1e-8)/127``, round half to even
``KvFp8``      fp8   1            ``"fp8_e4m3"`` (kvcl extension; ferrum: marker only)
=============  ====  ===========  ===================================================

The trait functions are classmethods of each dtype class (``KvFp16.paged_write(layer, ...)``);
the layer state is :class:`KvCache` (FP16, FP8) or :class:`KvCacheQuant` (INT8).

A paged layer for one sequence::

    pool_k, pool_v = KvFp16.alloc_pool(num_blocks=8, block_size=16, num_kv_heads=2, head_dim=128)
    layer = KvFp16.alloc_paged(4, 16, 2, 128, pool_k=pool_k, pool_v=pool_v)
    KvFp16.set_block_table(layer, [5, 2, 7, 1])
    q = KvFp16.paged_write(layer, qkv, None, None, cos, sin, None, tokens=5, num_q_heads=8,
                           num_kv_heads=2, head_dim=128, pos_offset=0, eps=1e-6, qk_mode=2)
    KvFp16.set_len(layer, 5)
    out = KvFp16.paged_decode_attention(layer, q, None, 8, 2, 128, final_kv_len=5, tokens=5)

Deliberate differences from ferrum (every class shares them):

* **Layout.** ferrum's backends disagree on the paged pool layout (the CUDA FP16 / INT8
  kernels use ``[block][slot][head][dim]``, Metal ``[block][head][slot][dim]``); kvcl uses its
  own pool layout ``[num_blocks][num_kv_heads][block_size][head_dim]`` (scales
  ``[num_blocks][num_kv_heads][block_size]``) for every dtype, and ``[num_kv_heads][capacity]
  [head_dim]`` for contiguous layers, as ferrum does. Tests check paged == contiguous.
* **Positions.** One rule for every dtype: token ``t`` of ``paged_write`` goes to position
  ``pos_offset + t`` (RoPE row and cache slot), as ferrum's FP16 kernels do. ferrum's INT8 CUDA
  kernel instead stores at ``len + t`` and rotates at ``pos_offset + len + t``; kvcl does not
  reproduce that. ``contig_write`` stores at row ``len + t`` and rotates at ``pos_offset + t``,
  as ferrum's contiguous path does.
* **Raises instead of corrupting, and changes nothing first.** ferrum trusts its arguments:
  a write past ``capacity`` or a block-table entry outside the pool writes out of bounds,
  ``KvInt8::alloc_contig`` panics, INT8 ``contig_*`` are ``unimplemented!``, ``KvBf16`` has no
  ``KvLayer`` impl. kvcl raises :class:`kvcl.CapacityError`, :class:`kvcl.OutOfRangeError` or
  :class:`KvDtypeUnsupported` before any write. ``set_len`` refuses a length past ``capacity``
  (ferrum does not check). Head counts and ``head_dim`` passed to an operation must equal the
  layer's (:class:`kvcl.ShapeError`). numpy inputs must be finite; a device-array input whose K
  or V row is NaN/Inf leaves that row unwritten and raises :class:`kvcl.NonFiniteError`.
* **The block table is read from the device** on every paged operation (a small blocking
  copy), so what is checked is what the kernel follows; ``paged_block_indices`` is only the
  caller's host copy, as in ferrum. :meth:`KvLayer.set_block_table` (kvcl addition) writes both.
  A new paged layer's table is the identity map (ferrum: a zero-filled device table and an
  empty host list).
* **Arguments.** ``ctx`` and scratch buffers are dropped; data may be numpy arrays or
  ``pyopencl.array.Array`` (float32, exact element counts: ferrum may read a prefix of a
  larger scratch buffer, kvcl does not). Outputs (``q_out``, ``output``) may be ``None`` and are
  returned. Pools default to those bound at ``alloc_paged``; INT8 ignores pool arguments as
  ferrum does. ``head_dim`` must be a multiple of 4 (kvcl's kernels).
* **Numerics.** Everything is computed in float32 from float32 inputs (ferrum's CUDA kernels
  read and write fp16 activations, so Q and the attention output are not rounded to fp16
  here). INT8 divides by the float32 scale where ferrum multiplies by its reciprocal.
  ``paged_decode_attention`` honours ``tokens > 1`` with a causal mask for INT8 too (ferrum's
  INT8 kernel decodes one row). ``contig_decode_attention`` supports what kvcl's bottom-right
  causal kernel can express (see :class:`AttnConfig`).
* **Additions.** ``KvLayer.alloc_pool`` (shared pools), ``set_block_table``, the ``device``
  and ``max_blocks_per_seq`` of a layer; operations return their output array.
"""

from .kinds import QK_MODES, KvBf16, KvDtypeKind, KvFp8, KvFp16, KvInt8, KvLayer
from .layer import AttnConfig, KvCache, KvCacheQuant, KvDtypeUnsupported

__all__ = [
           "QK_MODES",
           "AttnConfig",
           "KvBf16",
           "KvCache",
           "KvCacheQuant",
           "KvDtypeKind",
           "KvDtypeUnsupported",
           "KvFp8",
           "KvFp16",
           "KvInt8",
           "KvLayer",
]
