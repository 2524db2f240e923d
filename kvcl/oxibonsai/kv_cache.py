"""Mirror of oxibonsai's ``kv_cache`` module: :class:`KvCache` and :class:`KvCachePolicy`.

The paged variant of the same Rust module is :class:`kvcl.oxibonsai.paged.PagedKvCache`.
"""

from __future__ import annotations

import numpy as np

from ..errors import CapacityError, InvalidArgument, ShapeError
from ..ops.blocks import extract_positions, inject_positions
from ..runtime import Device, resolve_device
from ..validate import check_int
from . import _device
from ..ops._launch import to_host

__all__ = ["KvCache", "KvCachePolicy"]

_FLOAT_BYTES = 4


class KvCachePolicy:
    """Storage policy of a KV cache; mirrors oxibonsai ``kv_cache::KvCachePolicy``.

    The Rust enum has three variants: ``Standard`` (FP32, the default), ``Fp16`` and
    ``SlidingWindow(n)`` (keep the most recent ``n`` positions). Here ``Standard`` and ``Fp16``
    are instances and ``SlidingWindow(n)`` builds one, so ``KvCachePolicy.SlidingWindow(512)``
    reads as in Rust. Values compare and hash by variant (and window).

    Deliberate differences: the variant is exposed as :attr:`kind` (a string) and the window as
    :attr:`window` (``None`` for the other variants), since Python has no ``match`` on enum
    payloads that works across versions; ``SlidingWindow`` refuses a negative or non-int size
    (Rust's ``usize`` cannot be negative). As in the source, a policy is only a value: no
    cache in this module reads it.

    Examples
    --------
    >>> KvCachePolicy.default() == KvCachePolicy.Standard
    True
    >>> KvCachePolicy.SlidingWindow(512)
    KvCachePolicy.SlidingWindow(512)
    >>> KvCachePolicy.SlidingWindow(512).window
    512
    """

    __slots__ = ("_kind", "_window")
    _KINDS = ("Standard", "Fp16", "SlidingWindow")

    Standard: KvCachePolicy
    Fp16: KvCachePolicy

    def __init__(self, kind: str, window: int | None = None):
        if kind not in self._KINDS:
            raise InvalidArgument(f"kind: expected one of {', '.join(self._KINDS)}, got {kind!r}")
        if kind == "SlidingWindow":
            window = check_int("window", window, low=0)
        elif window is not None:
            raise InvalidArgument(f"window: only SlidingWindow has a window, got {window!r} for {kind}")
        self._kind = kind
        self._window = window

    @staticmethod
    def SlidingWindow(n: int) -> KvCachePolicy:
        """The ``SlidingWindow(n)`` variant: retain the most recent ``n`` positions."""
        return KvCachePolicy("SlidingWindow", n)

    @classmethod
    def default(cls) -> KvCachePolicy:
        """``Standard``, as Rust's ``#[default]``."""
        return cls.Standard

    @property
    def kind(self) -> str:
        """``"Standard"``, ``"Fp16"`` or ``"SlidingWindow"``."""
        return self._kind

    @property
    def window(self) -> int | None:
        """The window of a ``SlidingWindow`` policy, else ``None``."""
        return self._window

    def __eq__(self, other) -> bool:
        if not isinstance(other, KvCachePolicy):
            return NotImplemented
        return (self._kind, self._window) == (other._kind, other._window)

    def __hash__(self) -> int:
        return hash((self._kind, self._window))

    def __repr__(self) -> str:
        if self._kind == "SlidingWindow":
            return f"KvCachePolicy.SlidingWindow({self._window})"
        return f"KvCachePolicy.{self._kind}"


KvCachePolicy.Standard = KvCachePolicy("Standard")
KvCachePolicy.Fp16 = KvCachePolicy("Fp16")


class KvCache:
    """Contiguous FP32 KV cache on an OpenCL device; mirrors oxibonsai ``kv_cache::KvCache``.

    Keys and values are zero-filled ``float32`` device buffers, one pair per layer, each
    ``[num_kv_heads, max_seq_len, head_dim]``, so the whole cache is Rust's
    ``[layer][head][pos][dim]`` layout. Block extract/inject run in kvcl's positional block
    kernels (:func:`kvcl.ops.blocks.extract_positions` / ``inject_positions``); reads come
    back as new numpy ``float32`` arrays (Rust returns slices or ``Vec<f32>``).

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim, max_seq_len : int
        As ``KvCache::new`` (all ``>= 0``).
    device : kvcl.Device or str, optional
        Where the buffers live (keyword only); the default device when omitted.

    Notes
    -----
    Deliberate differences from the Rust type (each raises a kvcl exception and leaves the
    cache unchanged, where Rust panics, silently corrupts or goes past its capacity):

    * ``store_key`` / ``store_value`` check ``layer``, ``head`` and ``pos`` (Rust checks only in
      debug builds; a release build writes into the next head or layer) and the vector
      length (Rust's ``copy_from_slice`` panics): :class:`kvcl.OutOfRangeError` /
      :class:`kvcl.ShapeError`.
    * ``keys_for`` / ``values_for`` refuse ``seq_len > max_seq_len`` (Rust returns the next
      head's rows, or panics past the end of the buffer).
    * ``advance`` at ``seq_len == max_seq_len`` raises :class:`kvcl.CapacityError` (Rust keeps
      counting, and ``utilization_ratio`` exceeds 1.0).
    * ``extract_block`` / ``inject_block`` check ``layer`` and the block lengths (Rust:
      ``debug_assert!`` only). ``inject_block`` also accepts float32 device arrays (e.g. a
      :class:`~kvcl.oxibonsai.prefix_cache.CacheBlock`'s ``keys_device[layer]``), copied on
      the device without a host round trip.
    * The getters are methods as in Rust (``cache.seq_len()``); :meth:`memory_bytes_for` is an
      addition that evaluates the ``memory_bytes`` formula without allocating, and
      construction raises :class:`kvcl.DeviceMemoryError` when the buffers cannot fit.
    * Values are stored as float32 as given (NaN and Inf included, as in Rust).

    Examples
    --------
    >>> cache = KvCache(1, 1, 4, 8)
    >>> cache.store_key(0, 0, 0, [1.0, 2.0, 3.0, 4.0]); cache.advance()
    >>> cache.keys_for(0, 0, 1)
    array([1., 2., 3., 4.], dtype=float32)
    >>> cache.seq_len(), cache.utilization_ratio()
    (1, 0.125)
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int, *,
                 device: Device | str | None = None):
        self._num_layers = check_int("num_layers", num_layers, low=0)
        self._num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=0)
        self._head_dim = check_int("head_dim", head_dim, low=0)
        self._max_seq_len = check_int("max_seq_len", max_seq_len, low=0)
        self._device = resolve_device(device)
        layer_bytes = self._num_kv_heads * self._max_seq_len * self._head_dim * _FLOAT_BYTES
        self._device.check_alloc("KvCache", layer_bytes, total=self.memory_bytes())
        shape = (self._num_kv_heads, self._max_seq_len, self._head_dim)
        alloc = self._device.alloc
        self._keys = [alloc(shape, np.float32, what=f"KvCache layer {i} keys", zero=True)
                      for i in range(self._num_layers)]
        self._values = [alloc(shape, np.float32, what=f"KvCache layer {i} values", zero=True)
                        for i in range(self._num_layers)]
        self._seq_len = 0

    @classmethod
    def new(cls, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int, *,
            device: Device | str | None = None) -> KvCache:
        """``KvCache::new``: the same as the constructor."""
        return cls(num_layers, num_kv_heads, head_dim, max_seq_len, device=device)

    @staticmethod
    def memory_bytes_for(num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int) -> int:
        """What :meth:`memory_bytes` of such a cache returns, without allocating it.

        Examples
        --------
        >>> KvCache.memory_bytes_for(36, 8, 128, 4096) == 36 * 8 * 4096 * 128 * 4 * 2
        True
        """
        dims = [check_int(name, value, low=0) for name, value in (
            ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim), ("max_seq_len", max_seq_len))]
        return 2 * dims[0] * dims[1] * dims[2] * dims[3] * _FLOAT_BYTES

    # ---- getters -------------------------------------------------------------------------

    @property
    def device(self) -> Device:
        """The :class:`kvcl.Device` holding the buffers."""
        return self._device

    def seq_len(self) -> int:
        """Current number of cached tokens."""
        return self._seq_len

    def max_seq_len(self) -> int:
        """Maximum sequence length (the capacity in positions)."""
        return self._max_seq_len

    def num_layers(self) -> int:
        """Number of layers."""
        return self._num_layers

    def num_kv_heads(self) -> int:
        """Number of KV heads per layer."""
        return self._num_kv_heads

    def head_dim(self) -> int:
        """Head dimension."""
        return self._head_dim

    # ---- writes --------------------------------------------------------------------------

    def _row_offset(self, layer, head, pos) -> tuple[int, int]:
        layer = _device.index("layer", layer, self._num_layers)
        head = _device.index("head", head, self._num_kv_heads)
        pos = _device.index("pos", pos, self._max_seq_len)
        return layer, (head * self._max_seq_len + pos) * self._head_dim

    def _store(self, buffers, name, layer, head, pos, vec) -> None:
        layer, offset = self._row_offset(layer, head, pos)
        row, actual = _device.as_row_block(name, vec, 1, self._head_dim)
        if row is None:
            raise ShapeError(f"{name}: expected {self._head_dim} values (head_dim), got {actual}")
        _device.write(self._device, buffers[layer], offset, row)

    def store_key(self, layer: int, head: int, pos: int, key) -> None:
        """Store a key vector ``[head_dim]`` at (layer, head, pos); ``seq_len`` is unchanged.

        Raises
        ------
        OutOfRangeError
            ``layer``, ``head`` or ``pos`` outside the cache.
        ShapeError
            ``key`` does not hold ``head_dim`` values.
        """
        self._store(self._keys, "key", layer, head, pos, key)

    def store_value(self, layer: int, head: int, pos: int, value) -> None:
        """Store a value vector ``[head_dim]`` at (layer, head, pos); see :meth:`store_key`."""
        self._store(self._values, "value", layer, head, pos, value)

    # ---- reads ---------------------------------------------------------------------------

    def _read(self, buffers, layer, head, seq_len) -> np.ndarray:
        layer = _device.index("layer", layer, self._num_layers)
        head = _device.index("head", head, self._num_kv_heads)
        seq_len = check_int("seq_len", seq_len, low=0, high=self._max_seq_len + 1)
        start = head * self._max_seq_len * self._head_dim
        return _device.read(self._device, buffers[layer], start, seq_len * self._head_dim)

    def keys_for(self, layer: int, head: int, seq_len: int) -> np.ndarray:
        """Keys of positions ``[0, seq_len)`` for one layer and head.

        ``seq_len`` is independent of the cache's own length (as in Rust).

        Returns
        -------
        numpy.ndarray, float32, shape [seq_len * head_dim]
            Position-major (``[pos][dim]``), as Rust's slice.
        """
        return self._read(self._keys, layer, head, seq_len)

    def values_for(self, layer: int, head: int, seq_len: int) -> np.ndarray:
        """Values of positions ``[0, seq_len)``; see :meth:`keys_for`."""
        return self._read(self._values, layer, head, seq_len)

    # ---- length bookkeeping --------------------------------------------------------------

    def advance(self) -> None:
        """``seq_len += 1``.

        Raises
        ------
        CapacityError
            The cache already holds ``max_seq_len`` tokens (Rust would keep counting).
        """
        if self._seq_len >= self._max_seq_len:
            raise CapacityError(
                f"advance: the cache is full (seq_len {self._seq_len} == max_seq_len "
                f"{self._max_seq_len}); clear() it or create a larger one"
            )
        self._seq_len += 1

    def clear(self) -> None:
        """``seq_len = 0``; the stored data is not zeroed (as in Rust)."""
        self._seq_len = 0

    def set_seq_len(self, n: int) -> None:
        """Set the cached length to ``min(n, max_seq_len)`` (after :meth:`inject_block`)."""
        n = check_int("n", n, low=0)
        self._seq_len = min(n, self._max_seq_len)

    def memory_bytes(self) -> int:
        """Bytes of both buffers: ``2 * L * H * max_seq_len * D * 4`` (the fixed capacity)."""
        return 2 * self._num_layers * self._num_kv_heads * self._max_seq_len * self._head_dim * _FLOAT_BYTES

    def utilization_ratio(self) -> float:
        """``seq_len / max_seq_len`` (0.0 when ``max_seq_len == 0``)."""
        if self._max_seq_len == 0:
            return 0.0
        return self._seq_len / self._max_seq_len

    # ---- prefix-cache blocks -------------------------------------------------------------

    def _block_args(self, layer, start_pos, block_size) -> tuple[int, int, int]:
        layer = _device.index("layer", layer, self._num_layers)
        start_pos = check_int("start_pos", start_pos, low=0, high=2**62)
        block_size = check_int("block_size", block_size, low=0, high=2**32)
        return layer, start_pos, block_size

    def extract_block(self, layer: int, start_pos: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Copy ``block_size`` positions from ``start_pos`` of one layer, every head.

        Positions at or past ``max_seq_len`` come back as zeros; ``seq_len`` is ignored.

        Returns
        -------
        (keys, values) : numpy.ndarray, float32, shape [num_kv_heads * block_size * head_dim]
            ``[head][pos_in_block][dim]`` order (the layout of a prefix-cache block).

        Examples
        --------
        >>> cache = KvCache(1, 1, 2, 4)
        >>> cache.store_key(0, 0, 3, [7.0, 8.0])
        >>> cache.extract_block(0, 3, 2)[0]
        array([7., 8., 0., 0.], dtype=float32)
        """
        layer, start_pos, block_size = self._block_args(layer, start_pos, block_size)
        shape = (self._num_kv_heads, block_size, self._head_dim)
        size = int(np.prod(shape, dtype=np.int64))
        if size == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        self._device.check_alloc("extract_block output", size * _FLOAT_BYTES, total=2 * size * _FLOAT_BYTES)
        out_keys = self._device.alloc(shape, np.float32, what="extract_block output keys", zero=True)
        out_values = self._device.alloc(shape, np.float32, what="extract_block output values", zero=True)
        extract_positions(self._keys[layer], start_pos, block_size, out_keys)
        extract_positions(self._values[layer], start_pos, block_size, out_values)
        return to_host(out_keys).reshape(-1), to_host(out_values).reshape(-1)

    def inject_block(self, layer: int, start_pos: int, block_size: int, keys, values) -> None:
        """Write a block produced by :meth:`extract_block` back at ``start_pos``.

        Positions at or past ``max_seq_len`` are skipped; ``seq_len`` is not changed (call
        :meth:`set_seq_len`).

        Parameters
        ----------
        layer, start_pos, block_size : int
        keys, values : float32, ``num_kv_heads * block_size * head_dim`` values
            ``[head][pos_in_block][dim]`` order: flat or ``[H, B, D]`` numpy arrays/sequences,
            or float32 device arrays on this cache's context (copied on the device).

        Raises
        ------
        OutOfRangeError, ShapeError, DtypeError
            Checked for both arrays before anything is written.
        """
        layer, start_pos, block_size = self._block_args(layer, start_pos, block_size)
        shape = (self._num_kv_heads, block_size, self._head_dim)
        src_keys = _device.device_block("keys", keys, shape, self._device)
        src_values = _device.device_block("values", values, shape, self._device)
        if src_keys is None:
            return
        inject_positions(src_keys, start_pos, self._keys[layer])
        inject_positions(src_values, start_pos, self._values[layer])

    # ---- test support --------------------------------------------------------------------

    def _snapshot(self) -> dict:
        """Host fields and device bytes, for comparing states (tests)."""
        self._device.queue.finish()
        return {
            "seq_len": self._seq_len,
            "keys": [_device.read_all(k, (), np.float32).tobytes() for k in self._keys],
            "values": [_device.read_all(v, (), np.float32).tobytes() for v in self._values],
        }

    def __repr__(self) -> str:
        return (f"KvCache(num_layers={self._num_layers}, num_kv_heads={self._num_kv_heads}, "
                f"head_dim={self._head_dim}, max_seq_len={self._max_seq_len}, seq_len={self._seq_len})")
