"""Mirror of oxibonsai's ``prefix_cache`` module: :class:`CacheBlock`, :class:`PrefixCache`,
:class:`CacheSession`, :class:`PrefixAwarePrefill` and :class:`PrefixCacheStats`.

A block's keys and values live on the device (``float32 [num_layers, num_kv_heads *
block_size * head_dim]``, each layer in ``[head][pos_in_block][dim]`` order, the layout of
:meth:`kvcl.oxibonsai.KvCache.extract_block`); the trie, LRU stamps, reference counts and
statistics are host bookkeeping, as in the crate.

The wiring the crate's engine uses (block size 16)::

    session, start = prefill.prepare(tokens)
    for i, idx in enumerate(session.block_indices):        # restore the cached prefix
        block = prefill.cache.get_block(idx)
        for layer in range(kv.num_layers()):
            kv.inject_block(layer, i * 16, 16, block.keys_device[layer], block.values_device[layer])
    kv.set_seq_len(start)
    ...                                                    # prefill tokens[start:]
    prefill.store_blocks(tokens, start, new_blocks)        # new_blocks from kv.extract_block
    prefill.release_session(session)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CapacityError, DtypeError
from ..runtime import Device, resolve_device
from ..validate import check_array, check_int, is_device_array
from . import _device

__all__ = [
    "CacheBlock",
    "CacheSession",
    "PrefixAwarePrefill",
    "PrefixCache",
    "PrefixCacheStats",
    "block_edge_key",
]

_FLOAT_BYTES = 4
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x00000100000001B3
_MASK64 = (1 << 64) - 1


def block_edge_key(tokens) -> int:
    """The trie edge key of a block: 64-bit FNV-1a of its token ids folded to 32 bits.

    Examples
    --------
    >>> block_edge_key([1, 2, 3, 4]) == block_edge_key((1, 2, 3, 4))
    True
    """
    h = _FNV_OFFSET
    for t in tokens:
        h = ((h ^ int(t)) * _FNV_PRIME) & _MASK64
    return (h >> 32) ^ (h & 0xFFFFFFFF)


def _token_ids(token_ids) -> tuple:
    """Token ids as a tuple of ints in Rust's ``u32`` range."""
    if is_device_array(token_ids) or isinstance(token_ids, (str, bytes)):
        raise DtypeError(f"token_ids: expected a sequence of ints, got {type(token_ids).__name__}")
    arr = np.asarray(token_ids)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    check_array("token_ids", arr, ndim=1)
    if arr.dtype.kind not in "iu":
        raise DtypeError(f"token_ids: expected integer token ids, got dtype {arr.dtype}")
    if arr.size:
        bad = np.flatnonzero((arr < 0) | (arr >= 2**32))
        if bad.size:
            i = int(bad[0])
            check_int(f"token_ids[{i}]", int(arr[i]), low=0, high=2**32)
    return tuple(int(t) for t in arr)


class CacheBlock:
    """KV tensors of one block of tokens for every layer; mirrors oxibonsai
    ``prefix_cache::CacheBlock``.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim, block_size : int
        As ``CacheBlock::new`` (``>= 0``); the block starts zeroed.
    device : kvcl.Device or str, optional
        Keyword only.

    Notes
    -----
    Rust's public fields are properties: ``keys`` / ``values`` read the device data back as
    numpy ``float32 [num_layers, num_kv_heads * block_size * head_dim]`` (Rust:
    ``Vec<Vec<f32>>``) and are read-only (a :class:`PrefixCache` replaces them on insert);
    ``token_ids`` is a read-only tuple; ``last_used`` and ``ref_count`` are settable
    (non-negative ints), as the crate's tests pin a block by bumping ``ref_count``.
    Additions: ``keys_device`` / ``values_device``, the device arrays themselves (``None`` when
    empty), for injecting a block into a :class:`~kvcl.oxibonsai.KvCache` without a host round
    trip.

    Examples
    --------
    >>> CacheBlock(2, 4, 8, 4).memory_bytes()
    2048
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, *,
                 device: Device | str | None = None):
        self._num_layers = check_int("num_layers", num_layers, low=0)
        per_layer = (check_int("num_kv_heads", num_kv_heads, low=0) * check_int("head_dim", head_dim, low=0)
                     * check_int("block_size", block_size, low=0))
        self._per_layer = per_layer
        self._device = resolve_device(device)
        size = self._num_layers * per_layer
        self._device.check_alloc("CacheBlock", size * _FLOAT_BYTES, total=2 * size * _FLOAT_BYTES)
        shape = (self._num_layers, per_layer)
        alloc = self._device.alloc
        self._keys = alloc(shape, np.float32, what="CacheBlock keys", zero=True) if size else None
        self._values = alloc(shape, np.float32, what="CacheBlock values", zero=True) if size else None
        self._token_ids: tuple = ()
        self._last_used = 0
        self._ref_count = 0

    @classmethod
    def new(cls, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, *,
            device: Device | str | None = None) -> CacheBlock:
        """``CacheBlock::new(num_layers, num_kv_heads, head_dim, block_size)``: zeroed."""
        return cls(num_layers, num_kv_heads, head_dim, block_size, device=device)

    @property
    def keys(self) -> np.ndarray:
        """float32 ``[num_layers, num_kv_heads * block_size * head_dim]`` (a host copy)."""
        return _device.read_all(self._keys, (self._num_layers, self._per_layer), np.float32)

    @property
    def values(self) -> np.ndarray:
        """float32 ``[num_layers, num_kv_heads * block_size * head_dim]`` (a host copy)."""
        return _device.read_all(self._values, (self._num_layers, self._per_layer), np.float32)

    @property
    def keys_device(self):
        """The keys' device array ``[num_layers, H*B*D]`` (``None`` when empty)."""
        return self._keys

    @property
    def values_device(self):
        """The values' device array ``[num_layers, H*B*D]`` (``None`` when empty)."""
        return self._values

    @property
    def token_ids(self) -> tuple:
        """The token ids this block covers."""
        return self._token_ids

    @property
    def last_used(self) -> int:
        """LRU stamp: higher is more recently used."""
        return self._last_used

    @last_used.setter
    def last_used(self, value: int) -> None:
        self._last_used = check_int("last_used", value, low=0)

    @property
    def ref_count(self) -> int:
        """Live users of this block; a block with ``ref_count > 0`` is never evicted."""
        return self._ref_count

    @ref_count.setter
    def ref_count(self, value: int) -> None:
        self._ref_count = check_int("ref_count", value, low=0)

    def memory_bytes(self) -> int:
        """``2 * num_layers * num_kv_heads * block_size * head_dim * 4``."""
        return 2 * self._num_layers * self._per_layer * _FLOAT_BYTES

    @classmethod
    def _unfilled(cls, num_layers: int, per_layer: int, device: Device) -> CacheBlock:
        """A block without buffers yet, for :class:`PrefixCache` (which assigns its data)."""
        block = cls.__new__(cls)
        block._num_layers, block._per_layer, block._device = num_layers, per_layer, device
        block._keys = block._values = None
        block._token_ids, block._last_used, block._ref_count = (), 0, 0
        return block

    def _assign(self, keys, values, token_ids: tuple, last_used: int) -> None:
        self._keys, self._values = keys, values
        self._token_ids = token_ids
        self._last_used = last_used
        self._ref_count = 0

    def __repr__(self) -> str:
        return (f"CacheBlock(token_ids={list(self._token_ids)}, last_used={self._last_used}, "
                f"ref_count={self._ref_count})")


class _TrieNode:
    __slots__ = ("block_idx", "children")

    def __init__(self):
        self.children: dict[int, int] = {}  # edge key -> node index
        self.block_idx: int | None = None


class PrefixCache:
    """Prefix KV cache: a trie of full token blocks with LRU eviction; mirrors oxibonsai
    ``prefix_cache::PrefixCache``.

    Each trie edge is one block of ``block_size`` tokens keyed by :func:`block_edge_key`; the
    tokens stored with the block are compared exactly on lookup. Blocks live in an arena
    (indices are stable; evicted slots are reused last-freed first), their KV data on the
    device.

    Parameters
    ----------
    max_blocks : int
        Live blocks at most (``>= 0``).
    block_size : int
        Tokens per block (``>= 1``).
    num_layers, num_kv_heads, head_dim : int
        Shape of each block's KV data.
    device : kvcl.Device or str, optional
        Keyword only.

    Notes
    -----
    Rust's public counters ``hits``, ``misses`` and ``evictions`` are read-only properties;
    ``len()``, ``is_empty()``, ``capacity()``, ``block_size()``, ``memory_bytes()`` and
    ``hit_rate()`` are methods as in Rust. Deliberate differences:

    * :meth:`insert` raises :class:`kvcl.CapacityError` when the cache is full and every block
      is pinned (``ref_count > 0``); Rust inserts anyway, growing past ``max_blocks``. Nothing
      changes when it raises.
    * :meth:`insert` checks that ``keys`` and ``values`` are ``[num_layers, num_kv_heads *
      block_size * head_dim]`` (Rust stores whatever vectors it is given) and that
      ``block_start <= len(token_ids)`` (Rust panics); token ids must be ints in ``[0, 2**32)``.
    * ``block_size == 0`` is refused at construction (Rust divides by zero on lookup).
    * :meth:`get_block` returns ``None`` for a negative index too; :meth:`release` of an index
      past the arena is ignored, as in Rust.

    Examples
    --------
    >>> cache = PrefixCache(8, 4, 1, 1, 2)
    >>> kv = np.zeros((1, 1 * 4 * 2), np.float32)
    >>> cache.insert([1, 2, 3, 4, 5, 6, 7, 8], 0, kv, kv)
    0
    >>> matched, blocks = cache.lookup([1, 2, 3, 4, 5, 6, 7, 8])
    >>> matched, len(blocks), cache.hits, cache.misses
    (4, 1, 1, 1)
    """

    def __init__(self, max_blocks: int, block_size: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, *, device: Device | str | None = None):
        self._max_blocks = check_int("max_blocks", max_blocks, low=0)
        self._block_size = check_int("block_size", block_size, low=1)
        self._num_layers = check_int("num_layers", num_layers, low=0)
        self._num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=0)
        self._head_dim = check_int("head_dim", head_dim, low=0)
        self._device = resolve_device(device)
        self._nodes = [_TrieNode()]
        self._blocks: list[CacheBlock] = []
        self._occupied: list[int] = []
        self._free_pool: list[int] = []
        self._generation = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @classmethod
    def new(cls, max_blocks: int, block_size: int, num_layers: int, num_kv_heads: int,
            head_dim: int, *, device: Device | str | None = None) -> PrefixCache:
        """``PrefixCache::new(max_blocks, block_size, num_layers, num_kv_heads, head_dim)``."""
        return cls(max_blocks, block_size, num_layers, num_kv_heads, head_dim, device=device)

    # ---- counters and sizes --------------------------------------------------------------

    @property
    def hits(self) -> int:
        """Blocks found by lookups since creation (kept by :meth:`clear`)."""
        return self._hits

    @property
    def misses(self) -> int:
        """Lookups that stopped at a missing block (at most one per lookup)."""
        return self._misses

    @property
    def evictions(self) -> int:
        """Blocks evicted since creation."""
        return self._evictions

    @property
    def device(self) -> Device:
        """The :class:`kvcl.Device` holding the blocks."""
        return self._device

    def len(self) -> int:
        """Number of live blocks."""
        return len(self._occupied)

    def __len__(self) -> int:
        return len(self._occupied)

    def is_empty(self) -> bool:
        """No live block."""
        return not self._occupied

    def capacity(self) -> int:
        """``max_blocks``."""
        return self._max_blocks

    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    def memory_bytes(self) -> int:
        """KV bytes of the live blocks."""
        return sum(self._blocks[idx].memory_bytes() for idx in self._occupied)

    def hit_rate(self) -> float:
        """``hits / (hits + misses)`` in float32, 0.0 before any lookup."""
        total = self._hits + self._misses
        if total == 0:
            return 0.0
        return float(np.float32(self._hits) / np.float32(total))

    def get_block(self, idx: int) -> CacheBlock | None:
        """The block in arena slot ``idx``, ``None`` if there is no such slot."""
        idx = check_int("idx", idx)
        return self._blocks[idx] if 0 <= idx < len(self._blocks) else None

    # ---- lookup --------------------------------------------------------------------------

    def _lookup_indices(self, tokens: tuple) -> tuple[int, list[int]]:
        node_idx, matched_len, matched = 0, 0, []
        bs = self._block_size
        for block_num in range(len(tokens) // bs):
            block_tokens = tokens[block_num * bs:(block_num + 1) * bs]
            child = self._nodes[node_idx].children.get(block_edge_key(block_tokens))
            bidx = self._nodes[child].block_idx if child is not None else None
            if bidx is None or self._blocks[bidx].token_ids != block_tokens:
                self._misses += 1
                break
            self._generation += 1
            block = self._blocks[bidx]
            block._last_used = self._generation
            block._ref_count += 1
            matched_len += bs
            matched.append(bidx)
            self._hits += 1
            node_idx = child
        return matched_len, matched

    def lookup(self, token_ids) -> tuple[int, list[CacheBlock]]:
        """Longest cached prefix of ``token_ids``, in full blocks.

        Every matched block gets a fresh ``last_used`` stamp and ``ref_count + 1`` (the caller
        now holds it: :meth:`release` it later) and counts as a hit; the first block not
        found counts as one miss and ends the walk.

        Returns
        -------
        (matched_len, blocks) : (int, list of CacheBlock)
            ``matched_len`` tokens, a multiple of ``block_size``.
        """
        matched_len, indices = self._lookup_indices(_token_ids(token_ids))
        return matched_len, [self._blocks[i] for i in indices]

    # ---- insert --------------------------------------------------------------------------

    def _block_tensor(self, name: str, x):
        """Validate and copy one block's ``[num_layers, per_layer]`` KV data to a new device array."""
        per_layer = self._num_kv_heads * self._block_size * self._head_dim
        shape = (self._num_layers, per_layer)
        size = self._num_layers * per_layer
        if is_device_array(x):
            src = _device.device_block(name, x, shape, self._device)
            return src.copy() if size else None
        arr = _device.as_float32(name, x)
        check_array(name, arr, shape=shape)
        self._device.check_alloc(f"CacheBlock {name}", size * _FLOAT_BYTES, total=2 * size * _FLOAT_BYTES)
        return _device.upload(self._device, arr) if size else None

    def _victims_needed(self) -> None:
        """Raise (changing nothing) when an insert could not make room."""
        if len(self._occupied) < self._max_blocks:
            return
        if not any(self._blocks[idx].ref_count == 0 for idx in self._occupied):
            raise CapacityError(
                f"insert: the prefix cache is full ({self._max_blocks} blocks) and every block is "
                "pinned (ref_count > 0); release sessions or blocks first "
                "(oxibonsai would insert past max_blocks)"
            )

    def _evict_lru(self) -> bool:
        victim_pos = None
        for pos, bidx in enumerate(self._occupied):
            block = self._blocks[bidx]
            if block.ref_count == 0 and (victim_pos is None or
                                         block.last_used < self._blocks[self._occupied[victim_pos]].last_used):
                victim_pos = pos
        if victim_pos is None:
            return False
        # Vec::swap_remove: the last element takes the victim's place.
        victim = self._occupied[victim_pos]
        last = self._occupied.pop()
        if victim_pos < len(self._occupied):
            self._occupied[victim_pos] = last
        for node in self._nodes:
            if node.block_idx == victim:
                node.block_idx = None
                break
        self._free_pool.append(victim)
        self._evictions += 1
        return True

    def _child(self, node_idx: int, edge_key: int) -> int:
        children = self._nodes[node_idx].children
        child = children.get(edge_key)
        if child is None:
            child = len(self._nodes)
            self._nodes.append(_TrieNode())
            children[edge_key] = child
        return child

    def _commit_insert(self, tokens: tuple, block_start: int, keys, values) -> int:
        while len(self._occupied) >= self._max_blocks:
            if not self._evict_lru():  # unreachable after _victims_needed; kept as Rust's loop
                break
        bs = self._block_size
        block_tokens = tokens[block_start:min(block_start + bs, len(tokens))]
        node_idx = 0
        for blk in range(block_start // bs):
            node_idx = self._child(node_idx, block_edge_key(tokens[blk * bs:(blk + 1) * bs]))
        leaf = self._child(node_idx, block_edge_key(block_tokens))
        self._generation += 1
        if self._free_pool:
            block_idx = self._free_pool.pop()
        else:
            block_idx = len(self._blocks)
            self._blocks.append(CacheBlock._unfilled(self._num_layers, self._num_kv_heads * bs * self._head_dim,
                                                     self._device))
        self._blocks[block_idx]._assign(keys, values, block_tokens, self._generation)
        self._nodes[leaf].block_idx = block_idx
        self._occupied.append(block_idx)
        return block_idx

    def insert(self, token_ids, block_start: int, keys, values) -> int:
        """Cache the block ``token_ids[block_start : block_start + block_size]``.

        When the cache is full the least recently used unpinned block is evicted first. The
        trie path of the blocks before ``block_start`` is created if missing (without data).

        Parameters
        ----------
        token_ids : sequence of int
            The whole prompt (ids in ``[0, 2**32)``).
        block_start : int
            First token of the block, ``<= len(token_ids)`` (a shorter final block is stored
            with its shorter token list, as in Rust).
        keys, values : float32 ``[num_layers, num_kv_heads * block_size * head_dim]``
            Numpy arrays, nested sequences, or float32 device arrays (copied on the device).

        Returns
        -------
        int
            The block's arena slot.

        Raises
        ------
        CapacityError
            Full, and every block pinned (Rust inserts past ``max_blocks``); nothing changes.
        ShapeError, DtypeError, OutOfRangeError
            Bad arguments, checked before anything changes.
        """
        tokens = _token_ids(token_ids)
        block_start = check_int("block_start", block_start, low=0, high=len(tokens) + 1)
        keys_dev = self._block_tensor("keys", keys)
        values_dev = self._block_tensor("values", values)
        self._victims_needed()
        return self._commit_insert(tokens, block_start, keys_dev, values_dev)

    def release(self, block_idx: int) -> None:
        """``ref_count - 1`` (never below 0); an index past the arena is ignored."""
        block_idx = check_int("block_idx", block_idx)
        if 0 <= block_idx < len(self._blocks) and self._blocks[block_idx].ref_count > 0:
            self._blocks[block_idx]._ref_count -= 1

    def clear(self) -> None:
        """Drop every block and the trie; the hit/miss/eviction counters are kept."""
        self._nodes = [_TrieNode()]
        self._blocks = []
        self._occupied = []
        self._free_pool = []
        self._generation = 0

    # ---- test support --------------------------------------------------------------------

    def _snapshot(self) -> dict:
        """Host bookkeeping and every block's device bytes, for comparing states (tests)."""
        self._device.queue.finish()
        return {
            "nodes": [(dict(n.children), n.block_idx) for n in self._nodes],
            "blocks": [(b.token_ids, b.last_used, b.ref_count, b.keys.tobytes(), b.values.tobytes())
                       for b in self._blocks],
            "occupied": list(self._occupied), "free": list(self._free_pool),
            "counters": (self._generation, self._hits, self._misses, self._evictions),
        }

    def __repr__(self) -> str:
        return (f"PrefixCache(max_blocks={self._max_blocks}, block_size={self._block_size}, "
                f"len={len(self._occupied)}, hits={self._hits}, misses={self._misses}, "
                f"evictions={self._evictions})")


@dataclass
class CacheSession:
    """Blocks a request holds; mirrors oxibonsai ``prefix_cache::CacheSession``.

    Fields as in Rust: ``matched_prefix_len`` (tokens already cached) and ``block_indices``
    (arena slots, in order). Holding a session keeps those blocks pinned until
    :meth:`PrefixAwarePrefill.release_session`.

    A plain host record (a dataclass: the fields are assignable, as Rust's public fields).
    Deliberate difference: :meth:`new` checks that the length and indices are non-negative
    ints (Rust's ``usize``); the constructor itself does not.

    Examples
    --------
    >>> CacheSession(8, [0, 1]).cached_tokens(4), CacheSession(0, []).is_empty()
    (8, True)
    """

    matched_prefix_len: int
    block_indices: list = field(default_factory=list)

    @classmethod
    def new(cls, matched_prefix_len: int, block_indices) -> CacheSession:
        """``CacheSession::new(matched_prefix_len, block_indices)``."""
        return cls(check_int("matched_prefix_len", matched_prefix_len, low=0),
                   [check_int("block_indices[]", i, low=0) for i in block_indices])

    def cached_tokens(self, block_size: int) -> int:
        """``len(block_indices) * block_size``."""
        return len(self.block_indices) * check_int("block_size", block_size, low=0)

    def is_empty(self) -> bool:
        """No cached block."""
        return not self.block_indices


@dataclass(frozen=True)
class PrefixCacheStats:
    """Snapshot of prefix-cache statistics; mirrors oxibonsai ``prefix_cache::PrefixCacheStats``.

    A frozen dataclass with Rust's fields. Differences: ``hit_rate`` is Rust's float32 value held
    in a Python float; there is no ``serde::Serialize`` (use :func:`dataclasses.asdict`).

    Examples
    --------
    >>> PrefixAwarePrefill(PrefixCache(4, 2, 1, 1, 1)).stats().capacity_blocks
    4
    """

    hit_rate: float
    cached_blocks: int
    capacity_blocks: int
    memory_bytes: int
    total_hits: int
    total_misses: int
    total_evictions: int


class PrefixAwarePrefill:
    """Prefill helper over a :class:`PrefixCache`; mirrors oxibonsai
    ``prefix_cache::PrefixAwarePrefill``.

    Parameters
    ----------
    cache : PrefixCache
        Rust's public field ``cache`` (a read-only property here).

    Notes
    -----
    Deliberate differences: :meth:`prepare` takes the block slots from the lookup itself
    (Rust re-walks the trie and can return the sentinel ``usize::MAX``, which cannot differ
    from the lookup's result); :meth:`store_blocks` checks every block it will insert before
    inserting the first, so a refused call changes nothing, and raises
    :class:`kvcl.CapacityError` where Rust would insert past capacity.

    Examples
    --------
    >>> prefill = PrefixAwarePrefill(PrefixCache(8, 4, 1, 1, 4))
    >>> kv = np.ones((1, 16), np.float32)
    >>> prefill.store_blocks([1, 2, 3, 4, 5, 6], 0, [(kv, kv), (kv, kv)])  # 2nd block is partial
    >>> session, start = prefill.prepare([1, 2, 3, 4, 5, 6])
    >>> start, session.block_indices, prefill.stats().cached_blocks
    (4, [0], 1)
    >>> prefill.release_session(session)
    """

    def __init__(self, cache: PrefixCache):
        if not isinstance(cache, PrefixCache):
            raise DtypeError(f"cache: expected a PrefixCache, got {type(cache).__name__}")
        self._cache = cache

    @classmethod
    def new(cls, cache: PrefixCache) -> PrefixAwarePrefill:
        """``PrefixAwarePrefill::new(cache)``."""
        return cls(cache)

    @property
    def cache(self) -> PrefixCache:
        """The wrapped :class:`PrefixCache`."""
        return self._cache

    def prepare(self, token_ids) -> tuple[CacheSession, int]:
        """Look up ``token_ids``; returns ``(session, uncached_start)``.

        The matched blocks are pinned until :meth:`release_session`; the model prefills
        ``token_ids[uncached_start:]``.
        """
        matched_len, indices = self._cache._lookup_indices(_token_ids(token_ids))
        return CacheSession(matched_len, indices), matched_len

    def store_blocks(self, token_ids, uncached_start: int, keys_by_block) -> None:
        """Insert the newly computed blocks starting at ``uncached_start``.

        Parameters
        ----------
        token_ids : sequence of int
        uncached_start : int
        keys_by_block : sequence of (keys, values)
            One pair per block, each ``[num_layers, num_kv_heads * block_size * head_dim]``.
            A final block that would run past ``len(token_ids)`` ends the loop (partial
            blocks are not cached), as in Rust.
        """
        cache = self._cache
        tokens = _token_ids(token_ids)
        uncached_start = check_int("uncached_start", uncached_start, low=0)
        if isinstance(keys_by_block, (str, bytes)) or not hasattr(keys_by_block, "__iter__"):
            raise DtypeError(f"keys_by_block: expected a sequence of (keys, values), got "
                             f"{type(keys_by_block).__name__}")
        prepared = []
        for i, pair in enumerate(keys_by_block):
            block_start = uncached_start + i * cache.block_size()
            if block_start + cache.block_size() > len(tokens):
                break
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise DtypeError(f"keys_by_block[{i}]: expected a (keys, values) pair")
            prepared.append((block_start, cache._block_tensor(f"keys_by_block[{i}][0]", pair[0]),
                             cache._block_tensor(f"keys_by_block[{i}][1]", pair[1])))
        if prepared:
            cache._victims_needed()  # only the first insert can lack room: later ones evict earlier ones
        for block_start, keys, values in prepared:
            cache._commit_insert(tokens, block_start, keys, values)

    def release_session(self, session: CacheSession) -> None:
        """Release every block of ``session`` (``ref_count - 1`` each)."""
        for idx in session.block_indices:
            self._cache.release(idx)

    def stats(self) -> PrefixCacheStats:
        """Current statistics of the wrapped cache."""
        c = self._cache
        return PrefixCacheStats(hit_rate=c.hit_rate(), cached_blocks=c.len(), capacity_blocks=c.capacity(),
                                memory_bytes=c.memory_bytes(), total_hits=c.hits, total_misses=c.misses,
                                total_evictions=c.evictions)
