"""Mirror of oxibonsai's ``kv_cache_quant`` module (INT8 part): :class:`QuantKvError`, the row
helpers, :class:`QuantizedKvLayer` and :class:`QuantizedKvCache`.

The FP8 types of the same Rust module are in :mod:`kvcl.oxibonsai.fp8`.

Numerics (``kvcl.dtypes.INT8_MODE_AWAY``, run by ``kernels/quantize.cl``): per (token, head) row
``scale = max(max|x| / 127, FLT_EPSILON)`` in float32, ``q = clamp(round(x / scale), -127, 127)``
with rounding half away from zero (C ``round``, as Rust's ``f32::round``), dequant ``q * scale``.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import INT8_MODE_AWAY
from ..errors import CapacityError, DtypeError, KvclError, OutOfRangeError, ShapeError
from ..ops.quantize import dequantize_rows, quantize_rows
from ..runtime import Device, resolve_device
from ..validate import check_array, check_float, check_int, is_device_array
from . import _device
from ..ops._launch import to_host

__all__ = [
    "FLT_EPSILON",
    "CapacityExceeded",
    "HeadOutOfRange",
    "LayerOutOfRange",
    "PositionOutOfRange",
    "QuantKvError",
    "QuantizedKvCache",
    "QuantizedKvLayer",
    "ShapeMismatch",
    "dequantize_row_i8",
    "quant_error_mae",
    "quantize_row_i8",
]

#: Rust's ``f32::EPSILON``: the scale floor of an all-zero row.
FLT_EPSILON = float(np.finfo(np.float32).eps)


# ---- errors ------------------------------------------------------------------------------------

class QuantKvError(KvclError):
    """Base of the ``QuantKvError`` variants; mirrors oxibonsai ``kv_cache_quant::QuantKvError``.

    Each variant is also reachable as an attribute (``QuantKvError.CapacityExceeded``), carries
    the Rust fields as attributes and has the Rust ``Display`` text as its message. Each also
    subclasses kvcl's matching error (and through it the natural built-in): ``ShapeMismatch`` is
    a :class:`kvcl.ShapeError` (``ValueError``), ``CapacityExceeded`` a
    :class:`kvcl.CapacityError` (``ValueError``), the three ``...OutOfRange`` variants
    :class:`kvcl.OutOfRangeError` (``IndexError``).

    Deliberate differences: Rust's enum becomes this base class with one subclass per variant
    (catch ``QuantKvError`` for all of them, or one variant); ``PositionOutOfRange``'s tuple
    field is ``.pos``.

    Examples
    --------
    >>> err = QuantKvError.CapacityExceeded(capacity=2, pos=2)
    >>> str(err), isinstance(err, ValueError), (err.capacity, err.pos)
    ('capacity exceeded: capacity 2, tried to push token 2', True, (2, 2))
    """

    ShapeMismatch: type
    CapacityExceeded: type
    PositionOutOfRange: type
    HeadOutOfRange: type
    LayerOutOfRange: type


class ShapeMismatch(QuantKvError, ShapeError):
    """``ShapeMismatch { expected, actual }``: a key/value slice of the wrong length."""

    def __init__(self, expected: int, actual: int):
        self.expected, self.actual = int(expected), int(actual)
        super().__init__(f"key/value shape mismatch: expected {self.expected}, got {self.actual}")


class CapacityExceeded(QuantKvError, CapacityError):
    """``CapacityExceeded { capacity, pos }``: a push into a full layer."""

    def __init__(self, capacity: int, pos: int):
        self.capacity, self.pos = int(capacity), int(pos)
        super().__init__(f"capacity exceeded: capacity {self.capacity}, tried to push token {self.pos}")


class PositionOutOfRange(QuantKvError, OutOfRangeError):
    """``PositionOutOfRange(pos)``: a read at ``pos >= len``; the position is ``.pos`` (and ``args[0]``)."""

    def __init__(self, pos: int):
        self.pos = pos
        super().__init__(f"token position {pos} out of range")


class HeadOutOfRange(QuantKvError, OutOfRangeError):
    """``HeadOutOfRange { head, num_heads }``."""

    def __init__(self, head: int, num_heads: int):
        self.head, self.num_heads = head, int(num_heads)
        super().__init__(f"head index {head} out of range (num_kv_heads = {self.num_heads})")


class LayerOutOfRange(QuantKvError, OutOfRangeError):
    """``LayerOutOfRange { layer, num_layers }`` (also: a per-layer list of the wrong length)."""

    def __init__(self, layer: int, num_layers: int):
        self.layer, self.num_layers = layer, int(num_layers)
        super().__init__(f"layer {layer} out of range (num_layers = {self.num_layers})")


QuantKvError.ShapeMismatch = ShapeMismatch
QuantKvError.CapacityExceeded = CapacityExceeded
QuantKvError.PositionOutOfRange = PositionOutOfRange
QuantKvError.HeadOutOfRange = HeadOutOfRange
QuantKvError.LayerOutOfRange = LayerOutOfRange


def position_index(pos, length: int) -> int:
    """``pos`` as an int in ``[0, length)``, else :class:`PositionOutOfRange`."""
    pos = check_int("token_pos", pos)
    if not 0 <= pos < length:
        raise PositionOutOfRange(pos)
    return pos


def token_rows(name: str, x, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """One token's ``[num_kv_heads * head_dim]`` slice as float32 ``[H, D]``; ShapeMismatch otherwise."""
    rows, actual = _device.as_row_block(name, x, num_kv_heads, head_dim)
    if rows is None:
        raise ShapeMismatch(num_kv_heads * head_dim, actual)
    return rows


# ---- row helpers -------------------------------------------------------------------------------

def quantize_row_i8(row, *, device: Device | str | None = None) -> tuple[np.ndarray, float]:
    """Quantize one row to int8 with one absmax scale, on the device.

    Mirrors ``kv_cache_quant::quantize_row_i8``. Deliberate difference: non-finite input is
    refused with :class:`kvcl.NonFiniteError` (Rust ignores NaN in the max and maps it to 0;
    an infinity makes the scale infinite and the dequantized row NaN).

    Parameters
    ----------
    row : sequence or numpy.ndarray of float, shape [n]
    device : kvcl.Device or str, optional

    Returns
    -------
    (q, scale) : (numpy.ndarray int8 [n], float)
        ``scale`` is the float32 scale (``FLT_EPSILON`` for an empty or all-zero row).

    Examples
    --------
    >>> quantize_row_i8([127.0, -127.0, 0.0])
    (array([ 127, -127,    0], dtype=int8), 1.0)
    """
    x = _device.as_float32("row", row)
    check_array("row", x, ndim=1, finite=True)
    if x.size == 0:
        return np.zeros(0, np.int8), FLT_EPSILON
    dev = resolve_device(device)
    q = dev.alloc((1, x.size), np.int8, what="the quantized vector", zero=True)
    scale = dev.alloc((1,), np.float32, what="the vector's scale", zero=True)
    quantize_rows(_device.upload(dev, x.reshape(1, -1)), q, scales=scale, kv_dtype="int8",
                  int8_mode=INT8_MODE_AWAY)
    return to_host(q).reshape(-1), float(to_host(scale)[0])


def _dequantize_on_device(q: np.ndarray, scale: float, device) -> np.ndarray:
    if q.size == 0:
        return np.zeros(0, np.float32)
    dev = resolve_device(device)
    out = dev.alloc((1, q.size), np.float32, what="the dequantized vector", zero=True)
    dequantize_rows(_device.upload(dev, q.reshape(1, -1)), out,
                    scales=_device.upload(dev, np.array([scale], np.float32)),
                    kv_dtype="int8", int8_mode=INT8_MODE_AWAY)
    return to_host(out).reshape(-1)


def _int8_vector(name: str, quantized) -> np.ndarray:
    if is_device_array(quantized):
        quantized = quantized.get()
    arr = np.asarray(quantized)
    check_array(name, arr, ndim=1)
    if arr.size == 0:
        return np.zeros(0, np.int8)
    if arr.dtype.kind not in "iu":
        raise DtypeError(f"{name}: expected int8 values, got dtype {arr.dtype}")
    if arr.min() < -128 or arr.max() > 127:
        raise OutOfRangeError(f"{name}: expected values in [-128, 127], got [{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=np.int8)


def dequantize_row_i8(quantized, scale: float, *, device: Device | str | None = None) -> np.ndarray:
    """``q * scale`` for one row, on the device; mirrors ``kv_cache_quant::dequantize_row_i8``.

    Deliberate difference: a non-finite ``scale`` is refused (:class:`kvcl.NonFiniteError`).

    Parameters
    ----------
    quantized : int8 values, shape [n]
    scale : float
        Used as float32.

    Returns
    -------
    numpy.ndarray, float32, shape [n]

    Examples
    --------
    >>> dequantize_row_i8([127, -64, 0], 0.5)
    array([ 63.5, -32. ,   0. ], dtype=float32)
    """
    q = _int8_vector("quantized", quantized)
    scale = check_float("scale", scale)
    return _dequantize_on_device(q, scale, device)


def quant_error_mae(original, quantized, scale: float, *, device: Device | str | None = None) -> float:
    """Mean absolute error between ``original`` and ``quantized * scale``.

    Mirrors ``kv_cache_quant::quant_error_mae``: over the first ``min(len(original),
    len(quantized))`` elements, 0.0 when that is 0; the dequantization runs on the device and
    the sum is accumulated in float32 in order, as Rust's iterator ``sum``. Deliberate
    difference: non-finite ``original`` or ``scale`` is refused (:class:`kvcl.NonFiniteError`).

    Examples
    --------
    >>> row = [0.0] * 32
    >>> q, s = quantize_row_i8(row)
    >>> quant_error_mae(row, q, s)
    0.0
    """
    x = _device.as_float32("original", original)
    check_array("original", x, ndim=1, finite=True)
    q = _int8_vector("quantized", quantized)
    scale = check_float("scale", scale)
    n = min(x.size, q.size)
    if n == 0:
        return 0.0
    restored = _dequantize_on_device(q[:n], scale, device)
    errors = np.abs(x[:n] - restored).astype(np.float32)
    total = np.add.accumulate(errors, dtype=np.float32)[-1]
    return float(np.float32(total) / np.float32(n))


# ---- one layer ---------------------------------------------------------------------------------

class QuantizedKvLayer:
    """One layer's INT8 KV cache on an OpenCL device; mirrors oxibonsai
    ``kv_cache_quant::QuantizedKvLayer``.

    Device buffers, all preallocated: int8 keys and values ``[capacity, num_kv_heads,
    head_dim]`` (Rust's token-major ``[pos][head][dim]``) and float32 scales ``[capacity,
    num_kv_heads]``. :meth:`push` quantizes every (head) row in kvcl's ``quantize_rows`` kernel
    (``int8_mode=0``: float32 scale ``max(absmax / 127, FLT_EPSILON)``, round half away from
    zero, clamp to ±127), the getters dequantize in ``dequantize_rows``; only the result is
    read back.

    Parameters
    ----------
    capacity, num_kv_heads, head_dim : int
        In Rust's order (capacity first), ``>= 0``.
    device : kvcl.Device or str, optional
        Keyword only.

    Notes
    -----
    The Rust public fields ``num_kv_heads``, ``head_dim``, ``capacity`` and ``len`` are
    read-only properties. Deliberate differences (each leaves the layer unchanged):

    * Non-finite keys or values are refused with :class:`kvcl.NonFiniteError`, checked after
      Rust's own checks (keys length → values length → capacity).
    * ``len`` cannot be assigned (Rust's public field can, breaking the layer's invariant).
    * Positions and heads that are not ints raise :class:`kvcl.DtypeError`; a negative one is
      out of range like any other.
    * Keys and values may be flat ``[H * D]`` (as Rust) or ``[H, D]`` arrays.

    Examples
    --------
    >>> layer = QuantizedKvLayer(2, 1, 3)
    >>> layer.push([127.0, -127.0, 0.0], [1.0, 2.0, 3.0])
    >>> layer.len, layer.get_key(0, 0)
    (1, array([ 127., -127.,    0.], dtype=float32))
    >>> round(QuantizedKvLayer(512, 8, 128).compression_ratio(), 3)
    3.879
    """

    def __init__(self, capacity: int, num_kv_heads: int, head_dim: int, *,
                 device: Device | str | None = None):
        self._capacity = check_int("capacity", capacity, low=0)
        self._num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=0)
        self._head_dim = check_int("head_dim", head_dim, low=0)
        self._device = resolve_device(device)
        data_bytes = self._capacity * self._num_kv_heads * self._head_dim
        largest = max(data_bytes, self._capacity * self._num_kv_heads * 4)  # data or scales
        self._device.check_alloc("QuantizedKvLayer", largest, total=self.memory_bytes())
        data_shape = (self._capacity, self._num_kv_heads, self._head_dim)
        scale_shape = (self._capacity, self._num_kv_heads)
        alloc = self._device.alloc
        self._keys = alloc(data_shape, np.int8, what="QuantizedKvLayer keys", zero=True)
        self._key_scales = alloc(scale_shape, np.float32, what="QuantizedKvLayer key scales", zero=True)
        self._values = alloc(data_shape, np.int8, what="QuantizedKvLayer values", zero=True)
        self._value_scales = alloc(scale_shape, np.float32, what="QuantizedKvLayer value scales", zero=True)
        self._len = 0

    @classmethod
    def new(cls, capacity: int, num_kv_heads: int, head_dim: int, *,
            device: Device | str | None = None) -> QuantizedKvLayer:
        """``QuantizedKvLayer::new(capacity, num_kv_heads, head_dim)``."""
        return cls(capacity, num_kv_heads, head_dim, device=device)

    # ---- fields --------------------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        """Number of KV heads."""
        return self._num_kv_heads

    @property
    def head_dim(self) -> int:
        """Dimension of each head."""
        return self._head_dim

    @property
    def capacity(self) -> int:
        """Token positions preallocated."""
        return self._capacity

    @property
    def len(self) -> int:
        """Token positions stored so far."""
        return self._len

    def __len__(self) -> int:
        return self._len

    @property
    def device(self) -> Device:
        """The :class:`kvcl.Device` holding the buffers."""
        return self._device

    # ---- push ----------------------------------------------------------------------------

    def _validate_push(self, keys, values) -> tuple[np.ndarray, np.ndarray]:
        """Every check of :meth:`push`, in Rust's order, then finiteness; writes nothing."""
        k = token_rows("keys", keys, self._num_kv_heads, self._head_dim)
        v = token_rows("values", values, self._num_kv_heads, self._head_dim)
        if self._len >= self._capacity:
            raise CapacityExceeded(self._capacity, self._len)
        check_array("keys", k, finite=True)
        check_array("values", v, finite=True)
        return k, v

    def _write(self, k: np.ndarray, v: np.ndarray) -> None:
        if k.size:
            row = self._len * self._num_kv_heads
            both = _device.upload(self._device, np.concatenate([k, v]))
            rows = self._num_kv_heads
            quantize_rows(both[:rows], self._keys, scales=self._key_scales, kv_dtype="int8",
                          int8_mode=INT8_MODE_AWAY, out_row_offset=row)
            quantize_rows(both[rows:], self._values, scales=self._value_scales, kv_dtype="int8",
                          int8_mode=INT8_MODE_AWAY, out_row_offset=row)
        self._len += 1

    def push(self, keys, values) -> None:
        """Quantize and append one token's keys and values.

        Parameters
        ----------
        keys, values : float, shape [num_kv_heads * head_dim] (or [num_kv_heads, head_dim])
            Heads first, then dims; each head's row gets its own scale.

        Raises
        ------
        ShapeMismatch
            ``keys`` (checked first) or ``values`` has the wrong length.
        CapacityExceeded
            ``len == capacity``.
        NonFiniteError
            NaN or Inf in ``keys`` or ``values`` (kvcl only).
        """
        k, v = self._validate_push(keys, values)
        self._write(k, v)

    # ---- reads ---------------------------------------------------------------------------

    def _dequantize(self, data, scales, first_row: int, num_rows: int) -> np.ndarray:
        if num_rows * self._head_dim == 0:
            return np.zeros(num_rows * self._head_dim, np.float32)
        out = self._device.alloc((num_rows, self._head_dim), np.float32, what="the dequantized rows", zero=True)
        dequantize_rows(data, out, scales=scales, kv_dtype="int8", int8_mode=INT8_MODE_AWAY,
                        row_offset=first_row, num_rows=num_rows)
        return to_host(out).reshape(-1)

    def _check_pos_head(self, token_pos, head) -> tuple[int, int]:
        pos = position_index(token_pos, self._len)
        head = check_int("head", head)
        if not 0 <= head < self._num_kv_heads:
            raise HeadOutOfRange(head, self._num_kv_heads)
        return pos, head

    def get_key(self, token_pos: int, head: int) -> np.ndarray:
        """Dequantized key row of one position and head.

        Returns
        -------
        numpy.ndarray, float32, shape [head_dim]

        Raises
        ------
        PositionOutOfRange
            ``token_pos >= len`` (checked first).
        HeadOutOfRange
            ``head >= num_kv_heads``.
        """
        pos, head = self._check_pos_head(token_pos, head)
        return self._dequantize(self._keys, self._key_scales, pos * self._num_kv_heads + head, 1)

    def get_value(self, token_pos: int, head: int) -> np.ndarray:
        """Dequantized value row of one position and head; see :meth:`get_key`."""
        pos, head = self._check_pos_head(token_pos, head)
        return self._dequantize(self._values, self._value_scales, pos * self._num_kv_heads + head, 1)

    def get_keys_at(self, token_pos: int) -> np.ndarray:
        """Dequantized keys of every head at one position.

        Returns
        -------
        numpy.ndarray, float32, shape [num_kv_heads * head_dim]

        Raises
        ------
        PositionOutOfRange
            ``token_pos >= len``.
        """
        pos = position_index(token_pos, self._len)
        return self._dequantize(self._keys, self._key_scales, pos * self._num_kv_heads, self._num_kv_heads)

    def get_values_at(self, token_pos: int) -> np.ndarray:
        """Dequantized values of every head at one position; see :meth:`get_keys_at`."""
        pos = position_index(token_pos, self._len)
        return self._dequantize(self._values, self._value_scales, pos * self._num_kv_heads,
                                self._num_kv_heads)

    # ---- memory --------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """int8 data plus float32 scales: ``2*C*H*D + 8*C*H`` bytes."""
        return _layer_memory_bytes(self._capacity, self._num_kv_heads, self._head_dim)

    def fp32_memory_bytes(self) -> int:
        """The same data in float32, no scales: ``8*C*H*D`` bytes."""
        return 2 * self._capacity * self._num_kv_heads * self._head_dim * 4

    def compression_ratio(self) -> float:
        """``fp32_memory_bytes / memory_bytes`` in float32 (1.0 when memory is 0)."""
        return _ratio(self.fp32_memory_bytes(), self.memory_bytes())

    # ---- test support --------------------------------------------------------------------

    def _snapshot(self) -> dict:
        """Host fields and device bytes, for comparing states (tests)."""
        self._device.queue.finish()
        return {"len": self._len, **{name: _device.read_all(arr, (), np.int8).tobytes() for name, arr in (
            ("keys", self._keys), ("key_scales", self._key_scales),
            ("values", self._values), ("value_scales", self._value_scales))}}

    def _stored(self) -> dict:
        """The device arrays as numpy (int8 data [C, H, D], float32 scales [C, H]); tests."""
        c, h, d = self._capacity, self._num_kv_heads, self._head_dim
        return {"keys": _device.read_all(self._keys, (c, h, d), np.int8),
                "key_scales": _device.read_all(self._key_scales, (c, h), np.float32),
                "values": _device.read_all(self._values, (c, h, d), np.int8),
                "value_scales": _device.read_all(self._value_scales, (c, h), np.float32)}

    def __repr__(self) -> str:
        return (f"QuantizedKvLayer(capacity={self._capacity}, num_kv_heads={self._num_kv_heads}, "
                f"head_dim={self._head_dim}, len={self._len})")


def _layer_memory_bytes(capacity: int, num_kv_heads: int, head_dim: int) -> int:
    """int8 keys + values (1 byte each) and their float32 scales."""
    return 2 * capacity * num_kv_heads * head_dim + 2 * capacity * num_kv_heads * 4


def _ratio(fp32_bytes: int, quant_bytes: int) -> float:
    """Rust's ``fp32 as f32 / quant as f32`` (1.0 when ``quant_bytes == 0``)."""
    if quant_bytes == 0:
        return 1.0
    return float(np.float32(fp32_bytes) / np.float32(quant_bytes))


# ---- all layers --------------------------------------------------------------------------------

class QuantizedKvCache:
    """Multi-layer INT8 KV cache on an OpenCL device; mirrors oxibonsai
    ``kv_cache_quant::QuantizedKvCache``.

    One :class:`QuantizedKvLayer` per layer, all with the same shape and capacity.

    Parameters
    ----------
    num_layers, capacity, num_kv_heads, head_dim : int
        In Rust's order, ``>= 0``.
    device : kvcl.Device or str, optional
        Keyword only.

    Notes
    -----
    Rust's public fields ``num_layers``, ``num_kv_heads`` and ``head_dim`` are read-only
    properties. Deliberate differences:

    * :meth:`push_step` is atomic: every layer's keys and values are checked (Rust's order per
      layer: keys length → values length → capacity, then finiteness) before the first layer is
      written, so an error leaves every layer unchanged. Rust pushes layer by layer and stops at
      the first error, leaving the earlier layers one token longer.
    * Non-finite input is refused with :class:`kvcl.NonFiniteError`.

    Examples
    --------
    >>> cache = QuantizedKvCache(2, 4, 1, 2)
    >>> cache.push_step([[1.0, 2.0], [127.0, -63.0]], [[0.5, 0.5], [1.0, 1.0]])
    >>> cache.seq_len(), cache.get_key(1, 0, 0)
    (1, array([127., -63.], dtype=float32))
    """

    def __init__(self, num_layers: int, capacity: int, num_kv_heads: int, head_dim: int, *,
                 device: Device | str | None = None):
        self._num_layers = check_int("num_layers", num_layers, low=0)
        check_int("capacity", capacity, low=0)
        self._num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=0)
        self._head_dim = check_int("head_dim", head_dim, low=0)
        self._device = resolve_device(device)
        self._device.check_alloc("QuantizedKvCache",
                                 max(capacity * num_kv_heads * head_dim, capacity * num_kv_heads * 4),
                                 total=self._num_layers * _layer_memory_bytes(capacity, num_kv_heads, head_dim))
        self._layers = [QuantizedKvLayer(capacity, num_kv_heads, head_dim, device=self._device)
                        for _ in range(self._num_layers)]

    @classmethod
    def new(cls, num_layers: int, capacity: int, num_kv_heads: int, head_dim: int, *,
            device: Device | str | None = None) -> QuantizedKvCache:
        """``QuantizedKvCache::new(num_layers, capacity, num_kv_heads, head_dim)``."""
        return cls(num_layers, capacity, num_kv_heads, head_dim, device=device)

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return self._num_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer."""
        return self._num_kv_heads

    @property
    def head_dim(self) -> int:
        """Dimension of each head."""
        return self._head_dim

    @property
    def device(self) -> Device:
        """The :class:`kvcl.Device` holding the buffers."""
        return self._device

    def push_step(self, all_keys, all_values) -> None:
        """Append one decode step to every layer, atomically.

        Parameters
        ----------
        all_keys, all_values : sequence of length num_layers
            ``all_keys[layer]``: float, shape [num_kv_heads * head_dim].

        Raises
        ------
        LayerOutOfRange
            ``len(all_keys)`` (checked first) or ``len(all_values)`` is not ``num_layers``;
            ``layer`` is the given length, as in Rust.
        ShapeMismatch, CapacityExceeded, NonFiniteError
            From the first layer whose input is refused; nothing is written.
        """
        n_keys, n_values = _count("all_keys", all_keys), _count("all_values", all_values)
        if n_keys != self._num_layers:
            raise LayerOutOfRange(n_keys, self._num_layers)
        if n_values != self._num_layers:
            raise LayerOutOfRange(n_values, self._num_layers)
        checked = [layer._validate_push(k, v) for layer, k, v in zip(self._layers, all_keys, all_values)]
        for layer, (k, v) in zip(self._layers, checked):
            layer._write(k, v)

    def _layer(self, layer) -> QuantizedKvLayer:
        layer = check_int("layer", layer)
        if not 0 <= layer < self._num_layers:
            raise LayerOutOfRange(layer, self._num_layers)
        return self._layers[layer]

    def get_key(self, layer: int, token_pos: int, head: int) -> np.ndarray:
        """Dequantized key row ``[head_dim]`` of (layer, position, head).

        Raises
        ------
        LayerOutOfRange
            Checked first; then the layer's ``PositionOutOfRange`` / ``HeadOutOfRange``.
        """
        return self._layer(layer).get_key(token_pos, head)

    def get_value(self, layer: int, token_pos: int, head: int) -> np.ndarray:
        """Dequantized value row ``[head_dim]``; see :meth:`get_key`."""
        return self._layer(layer).get_value(token_pos, head)

    def total_memory_bytes(self) -> int:
        """Sum of the layers' :meth:`QuantizedKvLayer.memory_bytes`."""
        return sum(layer.memory_bytes() for layer in self._layers)

    def total_fp32_memory_bytes(self) -> int:
        """Sum of the layers' :meth:`QuantizedKvLayer.fp32_memory_bytes`."""
        return sum(layer.fp32_memory_bytes() for layer in self._layers)

    def compression_ratio(self) -> float:
        """Overall fp32 / int8 bytes in float32 (1.0 when the cache holds no bytes)."""
        return _ratio(self.total_fp32_memory_bytes(), self.total_memory_bytes())

    def seq_len(self) -> int:
        """Positions stored (layer 0's ``len``; 0 with no layers)."""
        return self._layers[0].len if self._layers else 0

    def _snapshot(self) -> dict:
        """Every layer's state, for comparing (tests)."""
        return {"layers": [layer._snapshot() for layer in self._layers]}

    def __repr__(self) -> str:
        capacity = self._layers[0].capacity if self._layers else 0
        return (f"QuantizedKvCache(num_layers={self._num_layers}, capacity={capacity}, "
                f"num_kv_heads={self._num_kv_heads}, head_dim={self._head_dim}, seq_len={self.seq_len()})")


def _count(name: str, items) -> int:
    if isinstance(items, (str, bytes)) or is_device_array(items) or not hasattr(items, "__len__"):
        raise DtypeError(f"{name}: expected a sequence with one array per layer, got {type(items).__name__}")
    return len(items)
