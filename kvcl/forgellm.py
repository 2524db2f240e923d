"""Mirror of forgellm-runtime's ``kv_cache::KVCache``: a growable, token-major KV cache.

forgellm keeps, per layer, two ``Vec<f32>`` (K and V) that grow by ``num_kv_heads · head_dim``
floats per :meth:`KVCache.append`; ``len`` counts tokens and is advanced by the caller once per
token after every layer has been appended. kvcl keeps the same state in OpenCL device
buffers: each layer's K and V are one float32 buffer in token-major order
``[token][kv_head][head_dim]``, grown on the device by doubling (a new buffer and a
device-to-device copy, as ``Vec`` reallocates), never shrunk.

The numerics are trivial (values are stored verbatim as float32), so there is no kernel and no
numpy twin: the device copies are checked against numpy in ``tests/device/test_mirror_forgellm.py``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pyopencl as cl

from .errors import DtypeError, ShapeError
from .runtime import Device, resolve_device
from .validate import check_array, check_int, is_device_array

__all__ = ["KVCache"]

_FLOAT = np.dtype(np.float32)
_ITEM = _FLOAT.itemsize


class KVCache:
    """Growable per-layer K/V storage on an OpenCL device (forgellm ``KVCache``).

    Mirrors ``forgellm_runtime::kv_cache::KVCache``: ``new``, ``with_capacity``, ``append``,
    ``advance``, ``k``, ``v``, ``len``, ``is_empty``, ``num_layers``, ``clear``,
    ``entry_size``, with the same meanings. Layer ``l``'s K is the concatenation of every
    ``k_data`` appended to it, ``[rows][num_kv_heads][head_dim]`` flattened; ``len`` is a
    separate token counter that only :meth:`advance` and :meth:`clear` change.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        All at least 1.
    device : kvcl.Device or str, optional
        Where the buffers live; default :func:`kvcl.default_device`.

    Notes
    -----
    Deliberate differences from the Rust type:

    * **Bad input raises, and changes nothing.** Rust checks the slice lengths of ``append``
      only with ``debug_assert`` (a release build appends a wrong-sized row and shifts every
      later token) and panics on a layer out of range. kvcl raises :class:`kvcl.ShapeError`
      (wrong length), :class:`kvcl.OutOfRangeError` (layer), :class:`kvcl.DtypeError`
      (not floating point, or a device array that is not float32) or
      :class:`kvcl.DeviceMismatchError` (a device array of another context), before any
      buffer is touched: K and V are appended together or not at all.
    * **Inputs**: ``k_data`` / ``v_data`` may be numpy arrays (any floating dtype, converted
      to float32 as Rust's caller would with ``as f32``), sequences of floats, or float32
      ``pyopencl.array.Array`` on this cache's context (copied device to device). Any shape
      with ``num_kv_heads · head_dim`` elements is accepted (flat or ``[num_kv_heads,
      head_dim]``). Values are stored verbatim, NaN and Inf included (Rust does the same).
    * :meth:`k` / :meth:`v` return a numpy **copy** of the layer's appended floats (Rust
      returns a borrowed slice); :meth:`k_device` / :meth:`v_device` return a float32
      device array view of them, valid until the next :meth:`append` or :meth:`clear`.
    * :meth:`clear` keeps the reserved device buffers (like ``Vec::clear``, which keeps the
      capacity) and drops every appended row: ``k(layer)`` is empty afterwards, as in Rust.
      The old bytes are not zeroed; they are unreachable.
    * ``with_capacity`` reserves ``max_seq_len`` tokens per layer up front (one buffer of
      ``max_seq_len · entry_size`` floats each for K and V) and, as in Rust, is no limit:
      appending more grows the buffers. ``new`` reserves nothing; the first append allocates.
      Growth doubles the capacity (at least to what the append needs) with a
      device-to-device copy; the capacity never shrinks.
    * Additions: :meth:`capacity` (floats reserved per layer, like ``Vec::capacity``),
      :meth:`k_device` / :meth:`v_device`, the read-only properties ``num_kv_heads``,
      ``head_dim`` and ``device``, and ``len(cache)``. ``advance`` is not checked against
      the appended rows (Rust does not check either).
    * Appends are serialised by a lock; Rust needs ``&mut self`` for the same guarantee.

    Examples
    --------
    >>> from kvcl.forgellm import KVCache
    >>> cache = KVCache.new(2, 4, 16)                  # doctest: +SKIP
    >>> cache.entry_size()                             # doctest: +SKIP
    64
    >>> row = np.ones(64, np.float32)                  # doctest: +SKIP
    >>> cache.append(0, row, row); cache.append(1, row, row); cache.advance()  # doctest: +SKIP
    >>> len(cache), cache.k(0).shape                   # doctest: +SKIP
    (1, (64,))
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *,
                 device: Any = None, _reserve_tokens: int = 0):
        self._num_layers = check_int("num_layers", num_layers, low=1)
        self._num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
        self._head_dim = check_int("head_dim", head_dim, low=1)
        reserve = check_int("max_seq_len", _reserve_tokens, low=0)
        self._device: Device = resolve_device(device)
        self._lock = threading.RLock()
        self._len = 0
        # per layer: K and V buffers of the same capacity; ``_used`` floats appended to each
        self._k: list[cl.Buffer | None] = [None] * self._num_layers
        self._v: list[cl.Buffer | None] = [None] * self._num_layers
        self._cap = [0] * self._num_layers
        self._used = [0] * self._num_layers
        if reserve:
            floats = reserve * self.entry_size()
            self._device.check_alloc(f"max_seq_len={reserve}: K and V of {self._num_layers} layers",
                                     floats * _ITEM, total=2 * self._num_layers * floats * _ITEM)
            for layer in range(self._num_layers):
                self._k[layer] = self._alloc(floats, f"max_seq_len={reserve}: layer {layer}'s K")
                self._v[layer] = self._alloc(floats, f"max_seq_len={reserve}: layer {layer}'s V")
                self._cap[layer] = floats

    # ---- construction (the Rust associated functions) -------------------------------------

    @classmethod
    def new(cls, num_layers: int, num_kv_heads: int, head_dim: int, *,
            device: Any = None) -> KVCache:
        """An empty cache with nothing reserved (Rust ``KVCache::new``).

        Parameters
        ----------
        num_layers, num_kv_heads, head_dim : int
        device : kvcl.Device or str, optional

        Examples
        --------
        >>> KVCache.new(2, 4, 16).is_empty()           # doctest: +SKIP
        True
        """
        return cls(num_layers, num_kv_heads, head_dim, device=device)

    @classmethod
    def with_capacity(cls, num_layers: int, num_kv_heads: int, head_dim: int,
                      max_seq_len: int, *, device: Any = None) -> KVCache:
        """An empty cache with ``max_seq_len`` tokens reserved per layer (not a limit).

        Parameters
        ----------
        num_layers, num_kv_heads, head_dim : int
        max_seq_len : int
            Tokens to reserve; ``max_seq_len · num_kv_heads · head_dim`` float32 each for
            K and V of every layer.
        device : kvcl.Device or str, optional

        Examples
        --------
        >>> c = KVCache.with_capacity(16, 8, 64, 2048)    # doctest: +SKIP
        >>> c.num_layers(), c.entry_size()                # doctest: +SKIP
        (16, 512)
        """
        return cls(num_layers, num_kv_heads, head_dim, device=device, _reserve_tokens=max_seq_len)

    # ---- the Rust methods -----------------------------------------------------------------

    def append(self, layer: int, k_data: Any, v_data: Any) -> None:
        """Append one token's K and V (``num_kv_heads · head_dim`` floats each) to ``layer``.

        Does not change :meth:`len` (call :meth:`advance` once per token, after all layers).

        Parameters
        ----------
        layer : int
            ``0 <= layer < num_layers()``.
        k_data, v_data : array-like of float, ``entry_size()`` elements
            numpy arrays / sequences (floating point, converted to float32) or float32
            ``pyopencl.array.Array`` on this cache's context.

        Raises
        ------
        kvcl.OutOfRangeError, kvcl.ShapeError, kvcl.DtypeError, kvcl.DeviceMismatchError
            Before anything is written.
        kvcl.DeviceMemoryError
            The layer would have to grow past what the device holds; nothing is changed.

        Examples
        --------
        >>> cache.append(0, np.zeros(64, np.float32), np.zeros(64, np.float32))  # doctest: +SKIP
        """
        with self._lock:
            layer = self._check_layer(layer)
            k_src = self._source("k_data", k_data)
            v_src = self._source("v_data", v_data)
            n = self.entry_size()
            need = self._used[layer] + n
            if need > self._cap[layer]:
                self._grow(layer, max(2 * self._cap[layer], need))
            offset = self._used[layer] * _ITEM
            queue = self._device.queue
            for dst, src in ((self._k[layer], k_src), (self._v[layer], v_src)):
                if isinstance(src, np.ndarray):
                    cl.enqueue_copy(queue, dst, src, dst_offset=offset, is_blocking=True)
                else:
                    cl.enqueue_copy(queue, dst, src.base_data, byte_count=n * _ITEM,
                                    src_offset=src.offset, dst_offset=offset,
                                    wait_for=src.events or None)
            self._used[layer] = need

    def advance(self) -> None:
        """``len += 1``: one more token is cached (call after appending to every layer)."""
        with self._lock:
            self._len += 1

    def k(self, layer: int) -> np.ndarray:
        """Every K float appended to ``layer`` (may be more than ``len() · entry_size()``).

        Returns
        -------
        numpy.ndarray, float32, shape ``[rows · num_kv_heads · head_dim]``
            A copy, token-major ``[row][kv_head][dim]`` flattened; empty after :meth:`clear`.
        """
        return self._read(self._k, layer)

    def v(self, layer: int) -> np.ndarray:
        """Every V float appended to ``layer``; see :meth:`k`."""
        return self._read(self._v, layer)

    def len(self) -> int:
        """Tokens cached (advanced by :meth:`advance`, reset by :meth:`clear`)."""
        return self._len

    def __len__(self) -> int:
        return self._len

    def is_empty(self) -> bool:
        """``len() == 0``."""
        return self._len == 0

    def num_layers(self) -> int:
        return self._num_layers

    def clear(self) -> None:
        """Drop every appended row of every layer and set ``len`` to 0; keep the capacity."""
        with self._lock:
            self._used = [0] * self._num_layers
            self._len = 0

    def entry_size(self) -> int:
        """Floats per token per layer: ``num_kv_heads · head_dim``."""
        return self._num_kv_heads * self._head_dim

    # ---- kvcl additions -------------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        return self._num_kv_heads

    @property
    def head_dim(self) -> int:
        return self._head_dim

    @property
    def device(self) -> Device:
        return self._device

    def capacity(self, layer: int) -> int:
        """Floats reserved for ``layer``'s K (and, equally, V): Rust's ``Vec::capacity``."""
        return self._cap[self._check_layer(layer)]

    def k_device(self, layer: int):
        """``layer``'s appended K as a float32 ``pyopencl.array.Array`` view (no copy).

        Returns
        -------
        pyopencl.array.Array or None
            Shape ``[rows · num_kv_heads · head_dim]``; ``None`` when nothing was appended.
            Valid until the next :meth:`append` (which may reallocate) or :meth:`clear`.
        """
        return self._view(self._k, layer)

    def v_device(self, layer: int):
        """``layer``'s appended V as a device array view; see :meth:`k_device`."""
        return self._view(self._v, layer)

    def __repr__(self) -> str:
        return (f"<kvcl.forgellm.KVCache layers={self._num_layers} kv_heads={self._num_kv_heads} "
                f"head_dim={self._head_dim} len={self._len}>")

    # ---- internals ------------------------------------------------------------------------

    def _check_layer(self, layer: Any) -> int:
        return check_int("layer", layer, low=0, high=self._num_layers)

    def _alloc(self, floats: int, what: str) -> cl.Buffer:
        return self._device.alloc((floats,), _FLOAT, what=what).base_data

    def _grow(self, layer: int, floats: int) -> None:
        """Reallocate K and V of ``layer`` to ``floats`` and copy the used part on the device.
        Both are checked (one buffer each; all layers' K and V together) before either is made."""
        queue = self._device.queue
        what = f"append: layer {layer}'s K and V grown to {floats:,} floats each"
        others = sum(cap for i, cap in enumerate(self._cap) if i != layer)
        self._device.check_alloc(what, floats * _ITEM, total=2 * (others + floats) * _ITEM)
        new_k, new_v = self._alloc(floats, what), self._alloc(floats, what)  # both before swapping either
        used = self._used[layer] * _ITEM
        if used:
            cl.enqueue_copy(queue, new_k, self._k[layer], byte_count=used)
            cl.enqueue_copy(queue, new_v, self._v[layer], byte_count=used)
        self._k[layer], self._v[layer], self._cap[layer] = new_k, new_v, floats

    def _source(self, name: str, data: Any):
        """Validate one row: a float32 C-contiguous numpy copy, or the device array itself."""
        n = self.entry_size()
        if is_device_array(data):
            check_array(name, data, dtype=np.float32, context=self._device.context)
            if data.size != n:
                raise ShapeError(f"{name}: expected {n} floats (num_kv_heads {self._num_kv_heads} x "
                                 f"head_dim {self._head_dim}), got shape {tuple(data.shape)}")
            if not data.flags.c_contiguous:
                raise ShapeError(f"{name}: expected a C-contiguous device array, got strides "
                                 f"{data.strides}")
            return data
        if not isinstance(data, np.ndarray):
            try:
                data = np.asarray(data)
            except (TypeError, ValueError) as exc:
                raise DtypeError(f"{name}: expected an array of floats, got "
                                 f"{type(data).__name__} ({exc})") from None
        check_array(name, data)
        if data.dtype.kind != "f":
            raise DtypeError(f"{name}: expected floating-point values, got dtype {data.dtype}")
        if data.size != n:
            raise ShapeError(f"{name}: expected {n} floats (num_kv_heads {self._num_kv_heads} x "
                             f"head_dim {self._head_dim}), got shape {tuple(data.shape)}")
        return np.ascontiguousarray(data, dtype=np.float32).reshape(n)

    def _view(self, buffers: list, layer: Any):
        import pyopencl.array as cla

        with self._lock:
            layer = self._check_layer(layer)
            used = self._used[layer]
            if used == 0:
                return None
            return cla.Array(self._device.queue, (used,), np.float32, data=buffers[layer])

    def _read(self, buffers: list, layer: Any) -> np.ndarray:
        with self._lock:
            layer = self._check_layer(layer)
            used = self._used[layer]
            out = np.empty(used, np.float32)
            if used:
                cl.enqueue_copy(self._device.queue, out, buffers[layer], is_blocking=True)
            return out
