"""Mirror of the FP8 part of oxibonsai's ``kv_cache_quant`` module: :class:`Fp8KvFormat`,
:class:`Fp8KvLayer` and :class:`Fp8KvCache`.

Numerics, per (token, head) row as in the crate: ``scale = max(max|x| / FP8_MAX, FLT_EPSILON)``
(float32), bytes = ``fp8_encode(x / scale)``, read back as ``fp8_decode(byte) * scale``. All of
it runs in kvcl's ``quantize_rows`` / ``dequantize_rows`` kernels with ``fp8_row_scale=True``
(``kv_dtype="fp8_e4m3"`` / ``"fp8_e5m2"``: OCP formats, round to nearest even, subnormals
kept, saturating; the row absmax, the scale, the correctly rounded division and the final
multiplication are single float32 operations, bit-identical to the crate's). The host only
checks and uploads the pushed values and downloads the decoded rows.
"""

from __future__ import annotations

import enum

import numpy as np

from ..errors import DtypeError, InvalidArgument
from ..ops.quantize import dequantize_rows, quantize_rows
from ..runtime import Device, resolve_device
from ..validate import check_array, check_int
from . import _device
from .kv_cache_quant import FLT_EPSILON, CapacityExceeded, position_index, token_rows
from ..ops._launch import to_host

__all__ = ["FP8_E4M3_MAX", "FP8_E5M2_MAX", "Fp8KvCache", "Fp8KvFormat", "Fp8KvLayer"]

#: Largest finite E4M3 value (oxibonsai-core ``FP8_E4M3_MAX``).
FP8_E4M3_MAX = 448.0
#: Largest finite E5M2 value (oxibonsai-core ``FP8_E5M2_MAX``).
FP8_E5M2_MAX = 57344.0


class Fp8KvFormat(enum.Enum):
    """FP8 encoding of a KV cache; mirrors oxibonsai ``kv_cache_quant::Fp8KvFormat``.

    ``E4M3`` (4-bit exponent, 3-bit mantissa, max 448, no infinities) and ``E5M2`` (5-bit
    exponent, 2-bit mantissa, max 57344). :attr:`max_value` is the format's largest finite
    value and :attr:`kv_dtype` the kvcl storage dtype that encodes it (additions).
    Deliberate difference: wherever a format is taken, the strings ``"e4m3"`` / ``"e5m2"`` (or
    ``"fp8_e4m3"`` / ``"fp8_e5m2"``) are accepted too.

    Examples
    --------
    >>> Fp8KvFormat.E4M3.max_value, Fp8KvFormat.E5M2.kv_dtype
    (448.0, 'fp8_e5m2')
    """

    E4M3 = "e4m3"
    E5M2 = "e5m2"

    @property
    def max_value(self) -> float:
        """Largest finite value: 448.0 (E4M3) or 57344.0 (E5M2)."""
        return FP8_E4M3_MAX if self is Fp8KvFormat.E4M3 else FP8_E5M2_MAX

    @property
    def kv_dtype(self) -> str:
        """The :mod:`kvcl.dtypes` name: ``"fp8_e4m3"`` or ``"fp8_e5m2"``."""
        return "fp8_" + self.value


def _format(fmt) -> Fp8KvFormat:
    if isinstance(fmt, Fp8KvFormat):
        return fmt
    try:
        return Fp8KvFormat(str(fmt).lower().removeprefix("fp8_"))
    except ValueError:
        raise InvalidArgument(f"format: expected Fp8KvFormat.E4M3 or Fp8KvFormat.E5M2, got {fmt!r}") from None


def row_scales(rows: np.ndarray, fmt: Fp8KvFormat) -> np.ndarray:
    """The crate's per-row scale ``max(max|row| / FP8_MAX, FLT_EPSILON)`` (float32), rows [N, D].

    A host-side reference for tests and callers; :class:`Fp8KvLayer` computes its scales in the
    ``quantize_rows`` kernel (``fp8_row_scale=True``), which gives the same bits.
    """
    rows = np.asarray(rows, dtype=np.float32)
    absmax = np.abs(rows).max(axis=-1) if rows.shape[-1] else np.zeros(rows.shape[:-1], np.float32)
    return np.maximum(absmax / np.float32(fmt.max_value), np.float32(FLT_EPSILON)).astype(np.float32)


class Fp8KvLayer:
    """One layer's FP8 KV cache on an OpenCL device; mirrors oxibonsai
    ``kv_cache_quant::Fp8KvLayer``.

    Device buffers, preallocated: fp8 bytes (``uint8``) for keys and values ``[capacity,
    num_kv_heads, head_dim]`` (token-major, as Rust) and float32 row scales ``[capacity,
    num_kv_heads]``.

    Parameters
    ----------
    num_kv_heads, head_dim, capacity : int
        In the order of Rust's ``with_capacity`` (``>= 0``).
    format : Fp8KvFormat
        Also accepted: ``"e4m3"`` / ``"e5m2"`` (or ``"fp8_e4m3"`` / ``"fp8_e5m2"``).
    device : kvcl.Device or str, optional
        Keyword only.

    Notes
    -----
    Rust's public fields ``num_kv_heads``, ``head_dim``, ``capacity``, ``len`` and ``format``
    are read-only properties; Rust's ``len()`` and ``capacity()`` methods are the same
    properties here (and ``len(layer)``), ``is_empty()`` is a method. Deliberate differences:

    * ``get_key`` / ``get_value`` / ``get_keys_at`` / ``get_values_at`` raise
      :class:`~kvcl.oxibonsai.kv_cache_quant.PositionOutOfRange` for ``pos >= len`` (Rust
      panics past the capacity and returns stale or zero rows between ``len`` and capacity).
      ``get_keys_at`` checks every position before reading any.
    * ``push`` refuses non-finite keys or values with :class:`kvcl.NonFiniteError`, after
      Rust's checks (keys length → values length → capacity).
    * E5M2: a row's maximum divided by its scale can land just above 57344 by float rounding;
      Rust's encoder turns that into an infinity (the row reads back with ``inf``), kvcl's
      (common.h's ``fp8_encode``, in the quantize kernel) saturates to 57344 (the value reads
      back as about the row maximum).
    * The row scale, ``x / scale`` and ``decoded * scale`` are computed on the device, in
      float32 (bit-identical to the crate), by ``quantize_rows`` / ``dequantize_rows`` with
      ``fp8_row_scale=True``.

    Examples
    --------
    >>> layer = Fp8KvLayer.with_capacity(1, 4, 2, Fp8KvFormat.E4M3)
    >>> layer.push([1.0, -2.0, 0.5, 448.0], [0.0, 0.0, 0.0, 0.0])
    >>> layer.get_key(0)
    array([  1. ,  -2. ,   0.5, 448. ], dtype=float32)
    >>> layer.len, layer.is_empty()
    (1, False)
    """

    def __init__(self, num_kv_heads: int, head_dim: int, capacity: int, format, *,
                 device: Device | str | None = None):
        self._num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=0)
        self._head_dim = check_int("head_dim", head_dim, low=0)
        self._capacity = check_int("capacity", capacity, low=0)
        self._format = _format(format)
        self._device = resolve_device(device)
        data_bytes = self._capacity * self._num_kv_heads * self._head_dim
        largest = max(data_bytes, self._capacity * self._num_kv_heads * 4)  # data or scales
        self._device.check_alloc("Fp8KvLayer", largest, total=self.memory_bytes())
        data_shape = (self._capacity, self._num_kv_heads, self._head_dim)
        scale_shape = (self._capacity, self._num_kv_heads)
        alloc = self._device.alloc
        self._keys = alloc(data_shape, np.uint8, what="Fp8KvLayer keys", zero=True)
        self._key_scales = alloc(scale_shape, np.float32, what="Fp8KvLayer key scales", zero=True)
        self._values = alloc(data_shape, np.uint8, what="Fp8KvLayer values", zero=True)
        self._value_scales = alloc(scale_shape, np.float32, what="Fp8KvLayer value scales", zero=True)
        self._len = 0

    @classmethod
    def with_capacity(cls, num_kv_heads: int, head_dim: int, capacity: int, format, *,
                      device: Device | str | None = None) -> Fp8KvLayer:
        """``Fp8KvLayer::with_capacity(num_kv_heads, head_dim, capacity, format)``."""
        return cls(num_kv_heads, head_dim, capacity, format, device=device)

    # ---- fields --------------------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        """KV heads per position."""
        return self._num_kv_heads

    @property
    def head_dim(self) -> int:
        """Dimension of each head."""
        return self._head_dim

    @property
    def capacity(self) -> int:
        """Token positions preallocated (Rust's field and ``capacity()``)."""
        return self._capacity

    @property
    def len(self) -> int:
        """Token positions stored (Rust's field and ``len()``)."""
        return self._len

    @property
    def format(self) -> Fp8KvFormat:
        """The encoding of this layer."""
        return self._format

    @property
    def device(self) -> Device:
        """The :class:`kvcl.Device` holding the buffers."""
        return self._device

    def __len__(self) -> int:
        return self._len

    def is_empty(self) -> bool:
        """``len == 0``."""
        return self._len == 0

    # ---- push ----------------------------------------------------------------------------

    def push(self, key, value) -> None:
        """Encode and append one token's keys and values, one scale per head row.

        Parameters
        ----------
        key, value : float, shape [num_kv_heads * head_dim] (or [num_kv_heads, head_dim])

        Raises
        ------
        ShapeMismatch
            ``key`` (checked first) or ``value`` has the wrong length.
        CapacityExceeded
            ``len == capacity``.
        NonFiniteError
            NaN or Inf in ``key`` or ``value`` (kvcl only).
        """
        k = token_rows("key", key, self._num_kv_heads, self._head_dim)
        v = token_rows("value", value, self._num_kv_heads, self._head_dim)
        if self._len >= self._capacity:
            raise CapacityExceeded(self._capacity, self._len)
        check_array("key", k, finite=True)
        check_array("value", v, finite=True)
        rows = self._len * self._num_kv_heads
        for data, scales, x in ((self._keys, self._key_scales, k), (self._values, self._value_scales, v)):
            # Also with head_dim 0: the kernel still stores each row's FLT_EPSILON scale.
            quantize_rows(_device.upload(self._device, x), data, scales=scales,
                          kv_dtype=self._format.kv_dtype, fp8_row_scale=True, out_row_offset=rows)
        self._len += 1

    # ---- reads ---------------------------------------------------------------------------

    def _decode(self, data, scales, pos: int) -> np.ndarray:
        h, d = self._num_kv_heads, self._head_dim
        if h * d == 0:
            return np.zeros(h * d, np.float32)
        out = self._device.alloc((h, d), np.float32, what="the dequantized row", zero=True)
        dequantize_rows(data, out, scales=scales, kv_dtype=self._format.kv_dtype, fp8_row_scale=True,
                        row_offset=pos * h, num_rows=h)
        return to_host(out).reshape(-1)

    def get_key(self, pos: int) -> np.ndarray:
        """Decoded keys of every head at ``pos``.

        Returns
        -------
        numpy.ndarray, float32, shape [num_kv_heads * head_dim]

        Raises
        ------
        PositionOutOfRange
            ``pos >= len`` (Rust panics or returns stale data).
        """
        return self._decode(self._keys, self._key_scales, position_index(pos, self._len))

    def get_value(self, pos: int) -> np.ndarray:
        """Decoded values of every head at ``pos``; see :meth:`get_key`."""
        return self._decode(self._values, self._value_scales, position_index(pos, self._len))

    def _positions(self, positions) -> list[int]:
        if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
            raise DtypeError(f"positions: expected a sequence of ints, got {type(positions).__name__}")
        return [position_index(p, self._len) for p in positions]

    def get_keys_at(self, positions) -> list[np.ndarray]:
        """:meth:`get_key` of each position, every position checked first.

        Returns
        -------
        list of numpy.ndarray, float32, shape [num_kv_heads * head_dim]
        """
        return [self._decode(self._keys, self._key_scales, p) for p in self._positions(positions)]

    def get_values_at(self, positions) -> list[np.ndarray]:
        """:meth:`get_value` of each position; see :meth:`get_keys_at`."""
        return [self._decode(self._values, self._value_scales, p) for p in self._positions(positions)]

    # ---- memory and reset ----------------------------------------------------------------

    def memory_bytes(self) -> int:
        """fp8 data plus float32 scales: ``2*C*H*D + 8*C*H`` bytes."""
        c, h = self._capacity, self._num_kv_heads
        return 2 * c * h * self._head_dim + 2 * c * h * 4

    def memory_bytes_fp32_equivalent(self) -> int:
        """The same data in float32, no scales: ``8*C*H*D`` bytes."""
        return 2 * self._capacity * self._num_kv_heads * self._head_dim * 4

    def clear(self) -> None:
        """``len = 0``; the bytes are not zeroed (overwritten by later pushes)."""
        self._len = 0

    # ---- test support --------------------------------------------------------------------

    def _stored(self) -> dict:
        """The device arrays as numpy (uint8 data [C, H, D], float32 scales [C, H]); tests."""
        c, h, d = self._capacity, self._num_kv_heads, self._head_dim
        return {"keys": _device.read_all(self._keys, (c, h, d), np.uint8),
                "key_scales": _device.read_all(self._key_scales, (c, h), np.float32),
                "values": _device.read_all(self._values, (c, h, d), np.uint8),
                "value_scales": _device.read_all(self._value_scales, (c, h), np.float32)}

    def _snapshot(self) -> dict:
        """Host fields and device bytes, for comparing states (tests)."""
        self._device.queue.finish()
        return {"len": self._len, **{k: v.tobytes() for k, v in self._stored().items()}}

    def __repr__(self) -> str:
        return (f"Fp8KvLayer(num_kv_heads={self._num_kv_heads}, head_dim={self._head_dim}, "
                f"capacity={self._capacity}, format={self._format}, len={self._len})")


class Fp8KvCache:
    """Multi-layer FP8 KV cache; mirrors oxibonsai ``kv_cache_quant::Fp8KvCache``.

    One :class:`Fp8KvLayer` per layer, all with the same format, heads, head size and
    capacity; layers are pushed one by one through :meth:`layer` / :meth:`layer_mut`.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim, capacity : int
        In the order of Rust's ``Fp8KvCache::new``.
    format : Fp8KvFormat
    device : kvcl.Device or str, optional
        Keyword only.

    Notes
    -----
    Rust's public field ``layers`` is a read-only property (a tuple of the layers). Deliberate
    differences: :meth:`layer` and :meth:`layer_mut` raise :class:`kvcl.OutOfRangeError` for a
    layer past the end (Rust panics); both return the same mutable layer object, as Python
    has no shared/exclusive borrows. Each layer's own differences are listed in
    :class:`Fp8KvLayer`.

    Examples
    --------
    >>> cache = Fp8KvCache(2, 1, 2, 4, Fp8KvFormat.E5M2)
    >>> cache.layer_mut(1).push([1.0, 2.0], [3.0, 4.0])
    >>> [cache.layer(i).len for i in range(cache.num_layers())]
    [0, 1]
    >>> cache.clear_all(); cache.layer(1).is_empty()
    True
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, format, *,
                 device: Device | str | None = None):
        num_layers = check_int("num_layers", num_layers, low=0)
        dev = resolve_device(device)
        self._layers = tuple(Fp8KvLayer(num_kv_heads, head_dim, capacity, format, device=dev)
                             for _ in range(num_layers))
        self._device = dev

    @classmethod
    def new(cls, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, format, *,
            device: Device | str | None = None) -> Fp8KvCache:
        """``Fp8KvCache::new(num_layers, num_kv_heads, head_dim, capacity, format)``."""
        return cls(num_layers, num_kv_heads, head_dim, capacity, format, device=device)

    @property
    def layers(self) -> tuple:
        """The per-layer :class:`Fp8KvLayer` objects."""
        return self._layers

    @property
    def device(self) -> Device:
        """The :class:`kvcl.Device` holding the buffers."""
        return self._device

    def layer(self, layer_idx: int) -> Fp8KvLayer:
        """The layer ``layer_idx`` (:class:`kvcl.OutOfRangeError` past the end)."""
        return self._layers[_device.index("layer_idx", layer_idx, len(self._layers))]

    def layer_mut(self, layer_idx: int) -> Fp8KvLayer:
        """The same object as :meth:`layer` (Rust's mutable accessor)."""
        return self.layer(layer_idx)

    def num_layers(self) -> int:
        """Number of layers."""
        return len(self._layers)

    def total_memory_bytes(self) -> int:
        """Sum of the layers' :meth:`Fp8KvLayer.memory_bytes`."""
        return sum(layer.memory_bytes() for layer in self._layers)

    def clear_all(self) -> None:
        """:meth:`Fp8KvLayer.clear` on every layer."""
        for layer in self._layers:
            layer.clear()

    def __repr__(self) -> str:
        return f"Fp8KvCache(num_layers={len(self._layers)}, layers={list(self._layers)!r})"

