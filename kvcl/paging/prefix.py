"""Prefix index: full KV blocks keyed by a hash chain of their tokens, with LRU eviction.

A *full* block (``block_size`` tokens) is identified by

``block_hash(parent_hash, tokens) = blake2b-64(parent_hash, tokens) >> 1``

where ``parent_hash`` is the hash of the block before it in the sequence (``None`` for the
first block). A block's hash therefore covers every token of the sequence up to and
including it, so two sequences with equal hashes at block ``j`` share the first
``(j + 1) * block_size`` tokens. Each entry also stores its tokens and its parent hash, and a
lookup compares both exactly, so a hash collision turns into a miss, never into a wrong hit.
Hashes are 63-bit non-negative ints (they fit an int64 in a saved state) and are the same on
every platform and Python version (``hashlib.blake2b``, not ``hash()``).

Cached blocks are either *in use* (some sequence holds a reference) or *evictable* (reference
count 0). Evictable blocks still count as free for the allocator: they are kept, in LRU
order, until an allocation finds no plain free block, and then the least recently released
one is evicted (:attr:`PrefixIndex.evictions` + 1) and reused.

The index does not know reference counts; :class:`kvcl.paging.BlockAllocator` tells it when a
cached block becomes evictable or in use again. It has no lock of its own: it is always
driven through :class:`~kvcl.paging.BlockAllocator` / :class:`~kvcl.paging.PagedBookkeeping`,
which hold theirs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InvalidArgument
from .exceptions import InvariantViolation

#: Hashes live in ``[0, 2**63)``; ``ROOT`` stands for "no parent" in saved states.
ROOT = -1


def block_hash(parent_hash: int | None, tokens: Sequence[int]) -> int:
    """The hash-chain key of one full block.

    Parameters
    ----------
    parent_hash : int or None
        Hash of the previous block of the sequence, ``None`` for the first block.
    tokens : sequence of int, shape [block_size]
        The block's token ids (non-negative).

    Returns
    -------
    int
        A 63-bit non-negative integer, stable across processes and platforms.

    Examples
    --------
    >>> h0 = block_hash(None, [1, 2, 3, 4])
    >>> h0 == block_hash(None, [1, 2, 3, 4]), h0 == block_hash(h0, [1, 2, 3, 4])
    (True, False)
    """
    h = hashlib.blake2b(digest_size=8, person=b"kvcl-prefix")
    if parent_hash is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01" + int(parent_hash).to_bytes(8, "little"))
    h.update(np.asarray(tokens, dtype="<i8").tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass(frozen=True)
class CachedBlock:
    """One entry of the index: which block holds which tokens after which parent."""

    block: int
    parent_hash: int | None
    tokens: tuple[int, ...]


class PrefixIndex:
    """Full blocks keyed by a hash chain of their tokens, with LRU eviction of unused ones.

    Parameters
    ----------
    block_size : int
        Tokens per block.

    Attributes
    ----------
    queries : int
        Number of :meth:`match` calls (one per ``add_sequence(prefix_tokens=...)``).
    hits : int
        Full blocks served from the cache by :meth:`match`.
    misses : int
        Full blocks :meth:`match` was asked for (see its ``max_blocks``) but did not find;
        ``hits + misses`` is the number of blocks looked up, ``hits / (hits + misses)`` the
        block hit rate.
    evictions : int
        Evictable blocks dropped from the index to be reused by an allocation.

    Examples
    --------
    >>> index = PrefixIndex(block_size=2)
    >>> h = index.insert(5, None, [7, 8])
    >>> [block for block, _ in index.match([7, 8, 9], max_blocks=1)], index.hits, index.misses
    ([5], 1, 0)
    """

    def __init__(self, block_size: int):
        self.block_size = int(block_size)
        self._by_hash: dict[int, CachedBlock] = {}
        self._hash_of_block: dict[int, int] = {}
        # Evictable blocks, least recently released first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.queries = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ---- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of cached blocks (in use + evictable)."""
        return len(self._by_hash)

    @property
    def num_evictable(self) -> int:
        """Cached blocks no sequence references (they count as free for the allocator)."""
        return len(self._lru)

    def contains_block(self, block: int) -> bool:
        """Whether ``block`` is cached (in use or evictable)."""
        return block in self._hash_of_block

    def is_evictable(self, block: int) -> bool:
        """Whether ``block`` is cached with no reference."""
        return block in self._lru

    def hash_of(self, block: int) -> int | None:
        """The hash under which ``block`` is cached, or ``None``."""
        return self._hash_of_block.get(block)

    def evictable_blocks(self) -> list[int]:
        """Evictable blocks in eviction order (least recently released first)."""
        return list(self._lru)

    def lookup(self, parent_hash: int | None, tokens: Sequence[int]) -> int | None:
        """The block caching exactly ``tokens`` after ``parent_hash``, or ``None``.

        Does not touch the counters.
        """
        entry = self._by_hash.get(block_hash(parent_hash, tokens))
        if entry is None or entry.parent_hash != parent_hash or entry.tokens != tuple(tokens):
            return None
        return entry.block

    def match(self, tokens: Sequence[int], *, max_blocks: int) -> list[tuple[int, int]]:
        """Longest cached chain of full blocks at the start of ``tokens``.

        Parameters
        ----------
        tokens : sequence of int
            Token ids of a prompt.
        max_blocks : int
            Look up at most this many leading full blocks (the caller caps it, see
            :meth:`kvcl.paging.PagedBookkeeping.add_sequence`).

        Returns
        -------
        list of (block, hash)
            The matched blocks in order. Counters: ``queries += 1``, ``hits += len(result)``,
            ``misses += max_blocks - len(result)``. Reference counts are the caller's job.
        """
        bs = self.block_size
        max_blocks = min(int(max_blocks), len(tokens) // bs)
        found: list[tuple[int, int]] = []
        parent: int | None = None
        for j in range(max_blocks):
            chunk = tuple(tokens[j * bs:(j + 1) * bs])
            h = block_hash(parent, chunk)
            entry = self._by_hash.get(h)
            if entry is None or entry.parent_hash != parent or entry.tokens != chunk:
                break
            found.append((entry.block, h))
            parent = h
        self.queries += 1
        self.hits += len(found)
        self.misses += max_blocks - len(found)
        return found

    def stats(self) -> dict[str, int]:
        """Counters and sizes as a plain dict."""
        return {"queries": self.queries, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "cached": len(self), "evictable": self.num_evictable}

    # ---- mutations -------------------------------------------------------------------------

    def insert(self, block: int, parent_hash: int | None, tokens: Sequence[int]) -> tuple[int, bool]:
        """Register a full, referenced block.

        Parameters
        ----------
        block : int
            The block holding ``tokens``; it must be referenced by a sequence and not cached.
        parent_hash : int or None
            Hash of the previous block of its sequence.
        tokens : sequence of int, shape [block_size]

        Returns
        -------
        (hash, inserted) : (int, bool)
            ``inserted`` is False when the same hash is already cached (by another block):
            the first copy stays the cached one and ``block`` stays uncached (as in vLLM).
        """
        tokens = tuple(int(t) for t in tokens)
        if len(tokens) != self.block_size:
            raise InvalidArgument(f"tokens: a cached block holds {self.block_size} tokens, got {len(tokens)}")
        if block in self._hash_of_block:
            raise InvalidArgument(f"block {block} is already cached")
        h = block_hash(parent_hash, tokens)
        if h in self._by_hash:
            return h, False
        self._by_hash[h] = CachedBlock(int(block), parent_hash, tokens)
        self._hash_of_block[int(block)] = h
        return h, True

    def mark_evictable(self, block: int) -> None:
        """``block``'s reference count dropped to 0: it becomes the most recently released."""
        if block not in self._hash_of_block:
            raise InvalidArgument(f"block {block} is not cached")
        self._lru[block] = None
        self._lru.move_to_end(block)

    def mark_in_use(self, block: int) -> None:
        """An evictable ``block`` is referenced again (a prefix hit): it leaves the LRU."""
        if block not in self._lru:
            raise InvalidArgument(f"block {block} is not an evictable cached block")
        del self._lru[block]

    def evict_lru(self) -> int:
        """Drop the least recently released evictable block from the index and return it."""
        if not self._lru:
            raise InvalidArgument("no evictable cached block")
        block, _ = self._lru.popitem(last=False)
        del self._by_hash[self._hash_of_block.pop(block)]
        self.evictions += 1
        return block

    # ---- consistency and state -------------------------------------------------------------

    def check_invariants(self, ref_counts: Sequence[int] | None = None) -> None:
        """Verify the index's own consistency (and, given ``ref_counts``, the LRU's).

        Raises
        ------
        InvariantViolation
        """
        def fail(msg: str) -> None:
            raise InvariantViolation(f"prefix index: {msg}")

        if len(self._by_hash) != len(self._hash_of_block):
            fail("hash -> block and block -> hash maps differ in size")
        for h, entry in self._by_hash.items():
            if self._hash_of_block.get(entry.block) != h:
                fail(f"block {entry.block} is cached under {h} but maps back to another hash")
            if len(entry.tokens) != self.block_size:
                fail(f"block {entry.block} caches {len(entry.tokens)} tokens")
        for block in self._lru:
            if block not in self._hash_of_block:
                fail(f"evictable block {block} is not cached")
        if ref_counts is not None:
            for block in self._hash_of_block:
                if not 0 <= block < len(ref_counts):
                    fail(f"cached block {block} is outside the pool")
                if (ref_counts[block] == 0) != (block in self._lru):
                    fail(f"cached block {block} has ref count {ref_counts[block]} but "
                         f"{'is' if block in self._lru else 'is not'} evictable")

    def state_dict(self) -> dict:
        """Plain-ints snapshot: entries sorted by block, the LRU order, the counters.

        ``parent_hash`` ``None`` is saved as :data:`ROOT` (-1).
        """
        entries = []
        for block in sorted(self._hash_of_block):
            e = self._by_hash[self._hash_of_block[block]]
            entries.append([e.block, ROOT if e.parent_hash is None else e.parent_hash, list(e.tokens)])
        return {"block_size": self.block_size, "entries": entries, "lru": list(self._lru),
                "queries": self.queries, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PrefixIndex":
        """Rebuild an index from :meth:`state_dict` (hashes are recomputed from the tokens)."""
        try:
            index = cls(int(state["block_size"]))
            for block, parent, tokens in state["entries"]:
                parent_hash = None if int(parent) == ROOT else int(parent)
                h, inserted = index.insert(int(block), parent_hash, [int(t) for t in tokens])
                if not inserted:
                    raise InvariantViolation(f"prefix index: two entries share hash {h}")
            for block in state["lru"]:
                index.mark_evictable(int(block))
            if len(index._lru) != len(state["lru"]):
                raise InvariantViolation("prefix index: a block appears twice in the LRU")
            for name in ("queries", "hits", "misses", "evictions"):
                setattr(index, name, int(state[name]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed prefix index state: {exc!r}") from exc
        return index

