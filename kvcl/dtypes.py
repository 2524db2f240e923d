"""KV storage dtypes: names, storage element types and the kernel defines that select them.

One table, used by the kernels' build options, the numpy reference and memory accounting.

=========  =========  ==========  ============================================================
name       element    scale       numerics
=========  =========  ==========  ============================================================
fp32       float32    none        exact
fp16       uint16     none        IEEE binary16 via ``vstore_half`` (round to nearest even)
int8       int8       float32     symmetric absmax per (token, kv head) row:
                                  ``scale = max(absmax / 127, FLT_EPSILON)``,
                                  ``q = clamp(round_half_away(x / scale), -127, 127)``
fp8_e4m3   uint8      none        OCP E4M3 ("fn": no infinities), saturating at ±448,
                                  round to nearest even, subnormals kept
fp8_e5m2   uint8      none        OCP E5M2, saturating at ±57344, round to nearest even
int4       uint8      2 x fp16    two codes per byte of the row rotated by the Hadamard matrix
                                  (``y = H x / sqrt(P)``, P the largest power of two dividing
                                  head_dim), asymmetric: ``lo = fp16(min y)``,
                                  ``sc = fp16(max((max y - lo) / 15, FLT_EPSILON))``,
                                  ``c = clamp(round_half_away((y - lo) / sc), 0, 15)``; byte ``j``
                                  holds ``c[2j]`` (low nibble) and ``c[2j+1]``; the row's float32
                                  scale slot holds the bits of ``sc`` (low half) and ``lo``
=========  =========  ==========  ============================================================

``KV_DTYPES`` are the formats of the cache engine, the bridge and every kernel family.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgument


@dataclass(frozen=True)
class KvDtype:
    name: str
    code: int  # the KV_DTYPE define seen by the kernels (kernels/common.h)
    storage: np.dtype  # element type of the pool buffers
    has_scale: bool  # one float32 scale slot per (token, kv head) row (int4: two float16)
    codes_per_elem: int = 1  # KV values per storage element (int4: two per byte)

    @property
    def bytes_per_elem(self) -> int:
        """Bytes of one storage element (int4: a byte holds two values)."""
        return self.storage.itemsize

    def row_elems(self, head_dim: int) -> int:
        """Storage elements of one (token, kv head) row: the last axis of a pool."""
        return head_dim // self.codes_per_elem

    def check_int8_mode(self, int8_mode: int) -> None:
        """Refuse an ``int8_mode`` the format has no kernel for: int4 has one scale convention."""
        if self.codes_per_elem > 1 and int8_mode != INT8_MODE_AWAY:
            raise InvalidArgument(f"int8_mode: {self.name} has one scale convention ({INT8_MODE_AWAY}), got "
                                  f"{int8_mode}: a float16 scale and minimum per rotated row")

    def row_bytes(self, head_dim: int) -> int:
        """Bytes one (token, kv head) row of K (or V) occupies, scale included."""
        return self.row_elems(head_dim) * self.bytes_per_elem + (4 if self.has_scale else 0)


FP32 = KvDtype("fp32", 0, np.dtype(np.float32), False)
FP16 = KvDtype("fp16", 1, np.dtype(np.uint16), False)
INT8 = KvDtype("int8", 2, np.dtype(np.int8), True)
FP8_E4M3 = KvDtype("fp8_e4m3", 3, np.dtype(np.uint8), False)
FP8_E5M2 = KvDtype("fp8_e5m2", 4, np.dtype(np.uint8), False)
INT4 = KvDtype("int4", 5, np.dtype(np.uint8), True, codes_per_elem=2)

KV_DTYPES: dict[str, KvDtype] = {d.name: d for d in (FP32, FP16, INT8, FP8_E4M3, FP8_E5M2, INT4)}

# int8 rounding/scale conventions (the INT8_MODE define):
INT8_MODE_AWAY = 0  # engine + oxibonsai 002: f32 scale, floor FLT_EPSILON, round half away from zero
INT8_MODE_EVEN = 1  # ferrum 004: max(absmax, 1e-8)/127 stored as fp16, round half to even


def kv_dtype(name: "str | KvDtype") -> KvDtype:
    """Look a KV dtype up by name, with an error that lists the valid names."""
    if isinstance(name, KvDtype):
        if name.name not in KV_DTYPES:
            raise InvalidArgument(f"dtype: expected one of {', '.join(KV_DTYPES)}, got {name.name!r}")
        return name
    try:
        return KV_DTYPES[str(name).lower()]
    except KeyError:
        raise InvalidArgument(
            f"dtype: expected one of {', '.join(KV_DTYPES)}, got {name!r}"
        ) from None
