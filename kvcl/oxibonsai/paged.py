"""Mirror of oxibonsai's lazily paged ``kv_cache::PagedKvCache`` (``kv_cache_paged.rs``)."""

from __future__ import annotations

import numpy as np

from ..errors import CapacityError, ShapeError
from ..runtime import Device, resolve_device
from ..validate import check_int
from . import _device

__all__ = ["DEFAULT_PAGE_SIZE", "PagedKvCache"]

#: Positions per page of ``PagedKvCache::new`` (Rust's ``DEFAULT_PAGE_SIZE``).
DEFAULT_PAGE_SIZE = 256
_FLOAT_BYTES = 4


class _Page:
    """One page of one (layer, head): keys and values ``[page_size, head_dim]`` on the device."""

    __slots__ = ("keys", "used", "values")

    def __init__(self, device: Device, page_size: int, head_dim: int):
        self.keys = device.alloc((page_size, head_dim), np.float32, what="PagedKvCache page keys", zero=True)
        self.values = device.alloc((page_size, head_dim), np.float32, what="PagedKvCache page values", zero=True)
        self.used = 0  # 1 + the highest offset written in this page


class PagedKvCache:
    """FP32 KV cache whose pages are allocated on first write; mirrors oxibonsai
    ``kv_cache::PagedKvCache``.

    Each (layer, head) owns a list of pages; a page is a pair of zero-filled ``float32``
    device buffers ``[page_size, head_dim]`` (keys, values). Storing at position ``pos``
    allocates every missing page up to ``pos // page_size`` of that (layer, head), as Rust's
    ``ensure_page``. Reads assemble ``[seq_len * head_dim]`` on the host, with zeros for
    pages never allocated.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim, max_seq_len : int
        As ``PagedKvCache::new`` (``>= 0``).
    page_size : int, optional
        Positions per page (``>= 1``), keyword only; :meth:`with_page_size` is the Rust spelling.
    device : kvcl.Device or str, optional
        Keyword only; the default device when omitted.

    Notes
    -----
    Deliberate differences from the Rust type (kvcl raises and leaves the cache unchanged):

    * ``store_key`` / ``store_value`` check layer, head, ``pos < max_seq_len`` and the vector
      length (Rust: ``debug_assert!`` only, so a release build allocates pages past
      ``max_seq_len`` or panics in ``copy_from_slice``).
    * ``keys_for`` / ``values_for`` check layer and head (Rust panics) and refuse
      ``seq_len > max_seq_len`` (Rust pads with zeros).
    * ``advance`` at ``seq_len == max_seq_len`` raises :class:`kvcl.CapacityError`.
    * ``page_size == 0`` is refused at construction (Rust divides by zero on the first store).
    * ``utilization_ratio`` is the 0.1.0–0.1.3 definition (used / allocated page slots); the
      crate removed the method in 0.1.4.
    * A page that does not fit the device raises :class:`kvcl.DeviceMemoryError` before any
      page of that store is allocated.

    Examples
    --------
    >>> cache = PagedKvCache.with_page_size(1, 1, 4, 16, 4)
    >>> cache.total_pages(), cache.memory_usage_bytes()
    (0, 0)
    >>> cache.store_key(0, 0, 5, [1.0, 2.0, 3.0, 4.0])
    >>> cache.total_pages(), cache.memory_usage_bytes()
    (2, 256)
    >>> cache.keys_for(0, 0, 6)[20:]
    array([1., 2., 3., 4.], dtype=float32)
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int, *,
                 page_size: int = DEFAULT_PAGE_SIZE, device: Device | str | None = None):
        self._num_layers = check_int("num_layers", num_layers, low=0)
        self._num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=0)
        self._head_dim = check_int("head_dim", head_dim, low=0)
        self._max_seq_len = check_int("max_seq_len", max_seq_len, low=0)
        self._page_size = check_int("page_size", page_size, low=1)
        self._device = resolve_device(device)
        self._pages: list[list[list[_Page]]] = [
            [[] for _ in range(self._num_kv_heads)] for _ in range(self._num_layers)]
        self._seq_len = 0

    @classmethod
    def new(cls, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int, *,
            device: Device | str | None = None) -> PagedKvCache:
        """``PagedKvCache::new``: page size :data:`DEFAULT_PAGE_SIZE` (256)."""
        return cls(num_layers, num_kv_heads, head_dim, max_seq_len, device=device)

    @classmethod
    def with_page_size(cls, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                       page_size: int, *, device: Device | str | None = None) -> PagedKvCache:
        """``PagedKvCache::with_page_size``: a custom number of positions per page."""
        return cls(num_layers, num_kv_heads, head_dim, max_seq_len, page_size=page_size, device=device)

    @property
    def device(self) -> Device:
        """The :class:`kvcl.Device` holding the pages."""
        return self._device

    # ---- writes --------------------------------------------------------------------------

    def _store(self, which: str, layer, head, pos, vec) -> None:
        layer = _device.index("layer", layer, self._num_layers)
        head = _device.index("head", head, self._num_kv_heads)
        pos = _device.index("pos", pos, self._max_seq_len)
        name = which[:-1]
        row, actual = _device.as_row_block(name, vec, 1, self._head_dim)
        if row is None:
            raise ShapeError(f"{name}: expected {self._head_dim} values (head_dim), got {actual}")
        page_idx, offset = divmod(pos, self._page_size)
        head_pages = self._pages[layer][head]
        missing = page_idx + 1 - len(head_pages)
        if missing > 0:
            page_bytes = self._page_size * self._head_dim * _FLOAT_BYTES
            self._device.check_alloc("PagedKvCache pages", page_bytes, total=2 * missing * page_bytes)
            new_pages = [_Page(self._device, self._page_size, self._head_dim) for _ in range(missing)]
            head_pages.extend(new_pages)  # only once every page is allocated
        page = head_pages[page_idx]
        _device.write(self._device, getattr(page, which), offset * self._head_dim, row)
        page.used = max(page.used, offset + 1)

    def store_key(self, layer: int, head: int, pos: int, key) -> None:
        """Store a key vector ``[head_dim]``, allocating pages up to ``pos``'s page.

        Raises
        ------
        OutOfRangeError
            ``layer``, ``head`` or ``pos`` (``>= max_seq_len``) outside the cache.
        ShapeError
            ``key`` does not hold ``head_dim`` values.
        """
        self._store("keys", layer, head, pos, key)

    def store_value(self, layer: int, head: int, pos: int, value) -> None:
        """Store a value vector ``[head_dim]``; see :meth:`store_key`."""
        self._store("values", layer, head, pos, value)

    # ---- reads ---------------------------------------------------------------------------

    def _read(self, which: str, layer, head, seq_len) -> np.ndarray:
        layer = _device.index("layer", layer, self._num_layers)
        head = _device.index("head", head, self._num_kv_heads)
        seq_len = check_int("seq_len", seq_len, low=0, high=self._max_seq_len + 1)
        out = np.zeros((seq_len, self._head_dim), np.float32)
        for page_idx, page in enumerate(self._pages[layer][head]):
            start = page_idx * self._page_size
            count = min(self._page_size, seq_len - start)
            if count <= 0:
                break
            out[start:start + count] = _device.read(
                self._device, getattr(page, which), 0, count * self._head_dim).reshape(count, -1)
        return out.reshape(-1)

    def keys_for(self, layer: int, head: int, seq_len: int) -> np.ndarray:
        """Keys of positions ``[0, seq_len)``, zeros where no page was allocated.

        Returns
        -------
        numpy.ndarray, float32, shape [seq_len * head_dim]
        """
        return self._read("keys", layer, head, seq_len)

    def values_for(self, layer: int, head: int, seq_len: int) -> np.ndarray:
        """Values of positions ``[0, seq_len)``; see :meth:`keys_for`."""
        return self._read("values", layer, head, seq_len)

    # ---- bookkeeping ---------------------------------------------------------------------

    def seq_len(self) -> int:
        """Current sequence length."""
        return self._seq_len

    def advance(self) -> None:
        """``seq_len += 1``; :class:`kvcl.CapacityError` at ``max_seq_len`` (Rust keeps counting)."""
        if self._seq_len >= self._max_seq_len:
            raise CapacityError(
                f"advance: the cache is full (seq_len {self._seq_len} == max_seq_len "
                f"{self._max_seq_len}); clear() it or create a larger one"
            )
        self._seq_len += 1

    def clear(self) -> None:
        """``seq_len = 0`` and free every page."""
        self._seq_len = 0
        for layer_pages in self._pages:
            for head_pages in layer_pages:
                head_pages.clear()

    def total_pages(self) -> int:
        """Number of pages allocated (over all layers and heads)."""
        return sum(len(head_pages) for layer_pages in self._pages for head_pages in layer_pages)

    def memory_usage_bytes(self) -> int:
        """Bytes of the allocated pages: ``pages * page_size * head_dim * 4 * 2`` (K and V)."""
        return self.total_pages() * self._page_size * self._head_dim * _FLOAT_BYTES * 2

    def utilization_ratio(self) -> float:
        """Used slots / allocated slots over all pages (0.0 with no page)."""
        total = used = 0
        for layer_pages in self._pages:
            for head_pages in layer_pages:
                for page in head_pages:
                    total += self._page_size
                    used += page.used
        return used / total if total else 0.0

    def page_size(self) -> int:
        """Positions per page."""
        return self._page_size

    # ---- test support --------------------------------------------------------------------

    def _snapshot(self) -> dict:
        """Host fields and device bytes of every page, for comparing states (tests)."""
        self._device.queue.finish()
        pages = []
        for layer_pages in self._pages:
            for head_pages in layer_pages:
                pages.append([(p.used, _device.read_all(p.keys, (), np.float32).tobytes(),
                               _device.read_all(p.values, (), np.float32).tobytes()) for p in head_pages])
        return {"seq_len": self._seq_len, "pages": pages}

    def __repr__(self) -> str:
        return (f"PagedKvCache(num_layers={self._num_layers}, num_kv_heads={self._num_kv_heads}, "
                f"head_dim={self._head_dim}, max_seq_len={self._max_seq_len}, "
                f"page_size={self._page_size}, seq_len={self._seq_len}, pages={self.total_pages()})")
