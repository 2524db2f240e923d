"""Block allocator: a FIFO free queue and reference counts over a pool of KV blocks.

A block is always in exactly one of three states:

* **free** — reference count 0, in the free queue, holds nothing worth keeping;
* **referenced** — reference count > 0 (held by that many sequences);
* **cached-evictable** — reference count 0 but kept by the :class:`~kvcl.paging.PrefixIndex`
  because it holds a full block of tokens a later prompt may reuse.

``num_free`` counts free *and* cached-evictable blocks: both can be handed out.
:meth:`BlockAllocator.allocate` takes plain free blocks from the front of the free queue
first, and evicts cached blocks (least recently released first) only when the queue is empty.
Released blocks go to the back of the free queue (or, if cached, to the most-recent end of
the prefix index's LRU). The queue starts as ``0, 1, ..., num_blocks - 1``.
"""

from __future__ import annotations

import threading
from collections import deque

from ..errors import InvalidArgument, OutOfBlocks
from ..validate import check_int
from .exceptions import InvariantViolation
from .prefix import PrefixIndex


def _block(num_blocks: int, block: object) -> int:
    """Validate a block id (fast path for plain ints: this runs on every ref-count change)."""
    if type(block) is int and 0 <= block < num_blocks:
        return block
    return check_int("block", block, low=0, high=num_blocks)


class BlockAllocator:
    """Free queue and reference counts of a pool of ``num_blocks`` KV blocks.

    Parameters
    ----------
    num_blocks : int
        Pool size (>= 1). Block ids are ``0 .. num_blocks - 1``.
    prefix_index : PrefixIndex, optional
        Where cached blocks live; without one every released block goes back to the queue.
    lock : threading.RLock, optional
        Lock guarding every public method (a fresh one by default); pass the owner's lock
        when the allocator is part of a larger structure.

    Examples
    --------
    >>> alloc = BlockAllocator(4)
    >>> alloc.allocate(2), alloc.num_free
    ([0, 1], 2)
    >>> alloc.decref(0); alloc.free_queue()
    [2, 3, 0]
    """

    def __init__(self, num_blocks: int, *, prefix_index: PrefixIndex | None = None,
                 lock: "threading.RLock | None" = None):
        self._num_blocks = check_int("num_blocks", num_blocks, low=1)
        self._free: deque[int] = deque(range(self._num_blocks))
        self._refs: list[int] = [0] * self._num_blocks
        self.prefix_index = prefix_index
        self._lock = lock if lock is not None else threading.RLock()

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Pool size."""
        return self._num_blocks

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: free + cached-evictable."""
        with self._lock:
            evictable = self.prefix_index.num_evictable if self.prefix_index is not None else 0
            return len(self._free) + evictable

    def free_queue(self) -> list[int]:
        """The plain free blocks, next to be allocated first (cached-evictable ones excluded)."""
        with self._lock:
            return list(self._free)

    def ref_count(self, block: int) -> int:
        """Number of references held on ``block`` (0 for free and cached-evictable blocks)."""
        block = _block(self._num_blocks, block)
        with self._lock:
            return self._refs[block]

    # ---- mutations -------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks, each with reference count 1.

        Plain free blocks come first, from the front of the queue; when those run out,
        cached-evictable blocks are evicted from the prefix index, least recently released
        first.

        Parameters
        ----------
        n : int
            Number of blocks (>= 0).

        Returns
        -------
        list of int
            The block ids, in allocation order.

        Raises
        ------
        kvcl.errors.OutOfBlocks
            Fewer than ``n`` blocks are free (counting evictable ones); nothing was changed.
        """
        n = check_int("n", n, low=0)
        with self._lock:
            available = self.num_free
            if n > available:
                raise OutOfBlocks(n, available)
            blocks = []
            for _ in range(n):
                block = self._free.popleft() if self._free else self.prefix_index.evict_lru()
                assert self._refs[block] == 0
                self._refs[block] = 1
                blocks.append(block)
            return blocks

    def incref(self, block: int) -> None:
        """Add a reference to a referenced block, or revive a cached-evictable one.

        Raises
        ------
        kvcl.errors.InvalidArgument
            ``block`` is free (allocate it instead).
        """
        block = _block(self._num_blocks, block)
        with self._lock:
            if self._refs[block] == 0:
                if self.prefix_index is None or not self.prefix_index.is_evictable(block):
                    raise InvalidArgument(f"incref: block {block} is free; allocate() it instead")
                self.prefix_index.mark_in_use(block)
            self._refs[block] += 1

    def decref(self, block: int) -> None:
        """Drop one reference; at 0 the block becomes cached-evictable (if the prefix index
        holds it) or goes to the back of the free queue.

        Raises
        ------
        kvcl.errors.InvalidArgument
            ``block`` has no reference to drop.
        """
        block = _block(self._num_blocks, block)
        with self._lock:
            if self._refs[block] == 0:
                raise InvalidArgument(f"decref: block {block} has no reference to drop")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self.prefix_index is not None and self.prefix_index.contains_block(block):
                    self.prefix_index.mark_evictable(block)
                else:
                    self._free.append(block)

    # ---- consistency and state -------------------------------------------------------------

    def check_invariants(self) -> None:
        """Every block is exactly one of free / referenced / cached-evictable.

        Raises
        ------
        InvariantViolation
        """
        with self._lock:
            free = set(self._free)
            if len(free) != len(self._free):
                raise InvariantViolation("allocator: a block appears twice in the free queue")
            index = self.prefix_index
            for block, refs in enumerate(self._refs):
                cached = index is not None and index.contains_block(block)
                evictable = index is not None and index.is_evictable(block)
                states = (block in free) + (refs > 0) + evictable
                if refs < 0 or states != 1:
                    raise InvariantViolation(
                        f"allocator: block {block} has ref count {refs}, in free queue: "
                        f"{block in free}, cached: {cached}, evictable: {evictable}")
                if block in free and cached:
                    raise InvariantViolation(f"allocator: free block {block} is still cached")
            if index is not None:
                index.check_invariants(self._refs)

    def state_dict(self) -> dict:
        """``{"num_blocks", "free_queue", "ref_counts"}`` as plain ints and lists."""
        with self._lock:
            return {"num_blocks": self._num_blocks, "free_queue": list(self._free),
                    "ref_counts": list(self._refs)}

    @classmethod
    def from_state_dict(cls, state: dict, *, prefix_index: PrefixIndex | None = None,
                        lock: "threading.RLock | None" = None) -> "BlockAllocator":
        """Rebuild an allocator from :meth:`state_dict` (and checks its invariants)."""
        try:
            alloc = cls(int(state["num_blocks"]), prefix_index=prefix_index, lock=lock)
            alloc._free = deque(int(b) for b in state["free_queue"])
            refs = [int(r) for r in state["ref_counts"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed allocator state: {exc!r}") from exc
        if len(refs) != alloc._num_blocks:
            raise InvariantViolation(
                f"allocator: {len(refs)} ref counts for {alloc._num_blocks} blocks")
        if any(not 0 <= b < alloc._num_blocks for b in alloc._free):
            raise InvariantViolation("allocator: free queue holds a block outside the pool")
        alloc._refs = refs
        alloc.check_invariants()
        return alloc
