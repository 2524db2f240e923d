"""Mirrors of the oxibonsai crate's KV-cache types over kvcl device buffers.

One module per Rust source module (``oxibonsai-model``):

* :mod:`~kvcl.oxibonsai.kv_cache` — :class:`KvCache`, :class:`KvCachePolicy`
* :mod:`~kvcl.oxibonsai.paged` — :class:`PagedKvCache` (``kv_cache_paged.rs``)
* :mod:`~kvcl.oxibonsai.prefix_cache` — :class:`CacheBlock`, :class:`PrefixCache`,
  :class:`CacheSession`, :class:`PrefixAwarePrefill`, :class:`PrefixCacheStats`
* :mod:`~kvcl.oxibonsai.kv_cache_quant` — :class:`QuantKvError` and its variants,
  :func:`quantize_row_i8`, :func:`dequantize_row_i8`, :func:`quant_error_mae`,
  :class:`QuantizedKvLayer`, :class:`QuantizedKvCache`
* :mod:`~kvcl.oxibonsai.fp8` — :class:`Fp8KvFormat`, :class:`Fp8KvLayer`, :class:`Fp8KvCache`

Same method names and meanings as the crate; data on the device, numerics in kvcl's kernels.
Where the crate panics, silently corrupts or goes past a capacity, these raise a kvcl
exception and leave the object unchanged; each class docstring lists its differences.
Every constructor takes a keyword-only ``device=`` (a :class:`kvcl.Device`, a device spec
string, or ``None`` for the default device).
"""

from .fp8 import FP8_E4M3_MAX, FP8_E5M2_MAX, Fp8KvCache, Fp8KvFormat, Fp8KvLayer
from .kv_cache import KvCache, KvCachePolicy
from .kv_cache_quant import (CapacityExceeded, HeadOutOfRange, LayerOutOfRange, PositionOutOfRange,
                             QuantizedKvCache, QuantizedKvLayer, QuantKvError, ShapeMismatch,
                             dequantize_row_i8, quant_error_mae, quantize_row_i8)
from .paged import DEFAULT_PAGE_SIZE, PagedKvCache
from .prefix_cache import (CacheBlock, CacheSession, PrefixAwarePrefill, PrefixCache,
                           PrefixCacheStats)

__all__ = [
                             "DEFAULT_PAGE_SIZE",
                             "FP8_E4M3_MAX",
                             "FP8_E5M2_MAX",
                             "CacheBlock",
                             "CacheSession",
                             "CapacityExceeded",
                             "Fp8KvCache",
                             "Fp8KvFormat",
                             "Fp8KvLayer",
                             "HeadOutOfRange",
                             "KvCache",
                             "KvCachePolicy",
                             "LayerOutOfRange",
                             "PagedKvCache",
                             "PositionOutOfRange",
                             "PrefixAwarePrefill",
                             "PrefixCache",
                             "PrefixCacheStats",
                             "QuantKvError",
                             "QuantizedKvCache",
                             "QuantizedKvLayer",
                             "ShapeMismatch",
                             "dequantize_row_i8",
                             "quant_error_mae",
                             "quantize_row_i8",
]
