"""Sequences over a paged block pool: add, fork (copy-on-write), free, plan a step.

:class:`PagedBookkeeping` is the one object the cache engine drives. It owns a
:class:`~kvcl.paging.BlockAllocator` and (unless prefix caching is off) a
:class:`~kvcl.paging.PrefixIndex`, and exchanges only integers with the device side: block
ids, slot mappings, page tables, copy actions (all in a :class:`~kvcl.paging.StepPlan`).

Rules the engine relies on
--------------------------
* Sequence ids count up from 0 and are never reused; a freed id raises
  :class:`~kvcl.paging.UnknownSequence` forever after.
* A sequence of length ``L`` holds exactly ``ceil(L / block_size)`` blocks, in token order.
* :meth:`PagedBookkeeping.plan` *commits*: the lengths include the new tokens when it
  returns, and its blocks are reserved. It is all-or-nothing: on
  :class:`~kvcl.errors.OutOfBlocks` (or any bad argument) nothing changed, and
  :meth:`PagedBookkeeping.snapshot` is identical to before the call.
* Copy-on-write: after :meth:`~PagedBookkeeping.fork` parent and child share every block.
  Full blocks are never written again, so they stay shared. A shared, partially filled last
  block is copied by the first sequence that writes into it: the writer gets a fresh block
  (``(src, dst)`` in ``StepPlan.copies``), the others keep ``src``; once a block has a single
  holder, that holder writes in place.
* :meth:`~PagedBookkeeping.free` releases a sequence's blocks *last block first*, so the free
  queue receives them in reverse token order (and cached blocks enter the LRU tail-first,
  which makes the tail of a prompt evicted before its head, as in vLLM).
* Prefix caching: a block joins the index when it becomes full and the sequence's token
  history is known, i.e. the sequence started empty or from a cached prefix and every
  ``plan`` that gave it tokens passed ``token_ids``. A ``plan`` without ``token_ids`` for a
  sequence that receives tokens stops caching for that sequence (and its forks) for good.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from typing import Any, Sequence

import numpy as np

from ..errors import DtypeError, InvalidArgument, OutOfBlocks, ShapeError
from ..validate import check_int
from .allocator import BlockAllocator
from .exceptions import InvariantViolation, UnknownSequence
from .page_table import PageTable, StepPlan, _frozen, build_page_table
from .prefix import PrefixIndex

_INT32_MAX = 2**31 - 1
STATE_VERSION = 1


class _Sequence:
    """Per-sequence state (internal)."""

    __slots__ = ("block_ids", "length", "block_hashes", "tail_tokens", "tracked")

    def __init__(self, block_ids: list[int], length: int, block_hashes: list[int],
                 tail_tokens: list[int], tracked: bool):
        self.block_ids = block_ids          # [ceil(length / block_size)]
        self.length = length
        self.block_hashes = block_hashes    # hash chain of the full blocks (while tracked)
        self.tail_tokens = tail_tokens      # tokens of the partial last block (while tracked)
        self.tracked = tracked              # token history known: full blocks can be cached

    def copy(self) -> "_Sequence":
        return _Sequence(list(self.block_ids), self.length, list(self.block_hashes),
                         list(self.tail_tokens), self.tracked)


def _int(name: str, value: Any, *, low: int | None = None) -> int:
    """``check_int`` with a fast path for plain ints (it runs once per id on hot paths)."""
    if type(value) is int and (low is None or value >= low):
        return value
    return check_int(name, value, low=low)


def _as_list(name: str, value: Any, what: str) -> list:
    """A list from a sequence argument (list, tuple, 1-D array), or a DtypeError naming it."""
    if isinstance(value, (str, bytes, dict)):
        raise DtypeError(f"{name}: expected {what}, got {type(value).__name__}")
    try:
        return list(value)
    except TypeError:
        raise DtypeError(f"{name}: expected {what}, got {type(value).__name__} {value!r}") from None


_SMALL_STEP = 64   # new tokens up to which plan computes slots with Python ints, not numpy


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _as_tokens(name: str, tokens: Any) -> list[int]:
    """Validate a 1-D sequence of non-negative int token ids and return it as a list."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ShapeError(f"{name}: expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iu":
        raise DtypeError(f"{name}: expected int token ids, got dtype {arr.dtype}")
    if arr.min() < 0 or (arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max):
        raise InvalidArgument(f"{name}: token ids must be in [0, 2**63), got {arr.min()}..{arr.max()}")
    return [int(t) for t in arr.tolist()]


class PagedBookkeeping:
    """Host bookkeeping of a paged KV cache: blocks, sequences, page tables, prefix reuse.

    Parameters
    ----------
    num_blocks : int
        Blocks in the pool (ids ``0 .. num_blocks - 1``).
    block_size : int
        Token slots per block. ``num_blocks * block_size`` must fit an int32 (slot ids).
    enable_prefix_caching : bool, keyword-only
        Keep full blocks in a :class:`PrefixIndex` for reuse by later prompts (default True).

    Attributes
    ----------
    allocator : BlockAllocator
    prefix_index : PrefixIndex or None
        ``None`` when prefix caching is off.

    Notes
    -----
    Every public method holds one ``threading.RLock`` (shared with the allocator), so
    sequences may be driven from several threads; each call is atomic.

    Examples
    --------
    >>> book = PagedBookkeeping(num_blocks=8, block_size=4)
    >>> seq = book.add_sequence()
    >>> plan = book.plan([seq], [5])
    >>> book.block_ids(seq), plan.slot_mapping.tolist(), plan.last_page_len.tolist()
    ([0, 1], [0, 1, 2, 3, 4], [1])
    >>> child = book.fork(seq)
    >>> book.plan([child], [1]).copies      # the shared half-full block 1 is copied first
    ((1, 2),)
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        num_blocks = check_int("num_blocks", num_blocks, low=1)
        self.block_size = check_int("block_size", block_size, low=1)
        if num_blocks * self.block_size > _INT32_MAX + 1:
            raise InvalidArgument(
                f"num_blocks * block_size = {num_blocks * self.block_size} slots do not fit "
                "int32 slot ids; use fewer or smaller blocks")
        self._lock = threading.RLock()
        self.prefix_index = PrefixIndex(self.block_size) if enable_prefix_caching else None
        self.allocator = BlockAllocator(num_blocks, prefix_index=self.prefix_index, lock=self._lock)
        self._seqs: dict[int, _Sequence] = {}
        self._next_seq_id = 0

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Pool size."""
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        """Blocks available to allocations (free + cached-evictable)."""
        return self.allocator.num_free

    @property
    def seq_ids(self) -> list[int]:
        """Live sequence ids, ascending."""
        with self._lock:
            return sorted(self._seqs)

    def __len__(self) -> int:
        """Number of live sequences."""
        return len(self._seqs)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def seq_len(self, seq_id: int) -> int:
        """Tokens stored (or reserved by the last :meth:`plan`) for ``seq_id``."""
        with self._lock:
            return self._get(seq_id).length

    def block_ids(self, seq_id: int) -> list[int]:
        """The blocks of ``seq_id`` in token order (a copy)."""
        with self._lock:
            return list(self._get(seq_id).block_ids)

    def ref_count(self, block: int) -> int:
        """Number of sequences holding ``block``."""
        return self.allocator.ref_count(block)

    def stats(self) -> dict[str, int]:
        """Pool usage and prefix-cache counters as a plain dict."""
        with self._lock:
            out = {"num_blocks": self.num_blocks, "num_free": self.num_free,
                   "num_sequences": len(self._seqs),
                   "num_tokens": sum(s.length for s in self._seqs.values())}
            if self.prefix_index is not None:
                out.update({f"prefix_{k}": v for k, v in self.prefix_index.stats().items()})
            return out

    # ---- sequence lifecycle ----------------------------------------------------------------

    def add_sequence(self, prefix_tokens: Sequence[int] | None = None) -> int:
        """Start a sequence, reusing cached blocks of ``prefix_tokens`` if any.

        Parameters
        ----------
        prefix_tokens : sequence of int, optional
            The prompt. Its leading full blocks found in the prefix index are shared (ref
            count + 1 each) and the sequence starts with that many tokens already stored.
            At most ``(len(prefix_tokens) - 1) // block_size`` blocks are reused, so at least
            one prompt token is left to compute (its logits start generation), as in vLLM.
            Nothing is reserved for the remaining tokens: pass them to :meth:`plan`.

        Returns
        -------
        int
            The new sequence id; ``seq_len(id)`` is the number of reused tokens (a multiple
            of ``block_size``, 0 without prefix caching or without a hit).

        Examples
        --------
        >>> book = PagedBookkeeping(8, 2)
        >>> a = book.add_sequence()
        >>> _ = book.plan([a], [5], token_ids=[[1, 2, 3, 4, 5]])
        >>> b = book.add_sequence([1, 2, 3, 4, 9])
        >>> book.seq_len(b), book.block_ids(b)
        (4, [0, 1])
        """
        tokens = None if prefix_tokens is None else _as_tokens("prefix_tokens", prefix_tokens)
        with self._lock:
            seq = _Sequence([], 0, [], [], tracked=self.prefix_index is not None)
            if tokens is not None and self.prefix_index is not None:
                max_blocks = max(0, (len(tokens) - 1) // self.block_size)
                for block, h in self.prefix_index.match(tokens, max_blocks=max_blocks):
                    self.allocator.incref(block)
                    seq.block_ids.append(block)
                    seq.block_hashes.append(h)
                seq.length = len(seq.block_ids) * self.block_size
            seq_id = self._next_seq_id
            self._next_seq_id += 1
            self._seqs[seq_id] = seq
            return seq_id

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every block of ``seq_id`` (copy-on-write; never allocates).

        Returns
        -------
        int
            The child's id. Both sequences have the same length and blocks; each block's
            ref count grew by one. The first write into a shared partial last block is
            preceded by a copy (see :meth:`plan`).
        """
        with self._lock:
            child = self._get(seq_id).copy()
            for block in child.block_ids:
                self.allocator.incref(block)
            child_id = self._next_seq_id
            self._next_seq_id += 1
            self._seqs[child_id] = child
            return child_id

    def free(self, seq_id: int) -> None:
        """Release ``seq_id`` and its blocks, last block first; the id is never reused."""
        with self._lock:
            seq = self._get(seq_id)
            del self._seqs[seq_id]
            for block in reversed(seq.block_ids):
                self.allocator.decref(block)

    # ---- planning --------------------------------------------------------------------------

    def blocks_needed(self, seq_ids: Sequence[int], num_new_tokens: Sequence[int]) -> int:
        """Blocks :meth:`plan` would take for this batch (new blocks + copy-on-write copies).

        A scheduler can compare it with :attr:`num_free` instead of catching
        :class:`~kvcl.errors.OutOfBlocks`. Validates like :meth:`plan`; changes nothing.
        """
        with self._lock:
            _, seqs, counts = self._validate_batch(seq_ids, num_new_tokens)
            return self._blocks_needed(seqs, counts)

    def plan(self, seq_ids: Sequence[int], num_new_tokens: Sequence[int],
             token_ids: Sequence[Sequence[int] | None] | None = None) -> StepPlan:
        """Reserve slots for the new tokens of a batch and describe the step for the device.

        Parameters
        ----------
        seq_ids : sequence of int, [B]
            Distinct live sequences, in batch order.
        num_new_tokens : sequence of int, [B]
            New tokens per sequence (>= 0; 0 keeps the sequence in the attention batch
            without writing).
        token_ids : sequence of (sequence of int or None), [B][num_new_tokens[b]], optional
            The ids of the new tokens, to cache blocks that become full (prefix caching).
            ``None`` (or a ``None`` entry for a sequence receiving tokens) stops prefix
            caching for that sequence, see the module notes.

        Returns
        -------
        StepPlan
            Slot mapping, positions, the page table after the step and the copy-on-write
            actions. The reservation is committed: ``seq_len`` already includes the tokens.

        Raises
        ------
        kvcl.errors.OutOfBlocks
            The pool cannot hold the batch (``requested`` = :meth:`blocks_needed`); nothing
            changed.
        UnknownSequence, kvcl.errors.InvalidArgument, kvcl.errors.ShapeError, kvcl.errors.DtypeError
            Bad arguments (unknown or repeated id, length mismatch, negative count, token
            list of the wrong length); nothing changed.

        Notes
        -----
        Blocks are allocated sequence by sequence in batch order: first the copy-on-write
        block (if the last block is shared and partially filled), then the new blocks.
        """
        with self._lock:
            ids, seqs, counts = self._validate_batch(seq_ids, num_new_tokens)
            tokens = self._validate_tokens(token_ids, counts)
            needed = self._blocks_needed(seqs, counts)
            if needed > self.allocator.num_free:
                raise OutOfBlocks(needed, self.allocator.num_free)

            bs = self.block_size
            copies: list[tuple[int, int]] = []
            slots: list = []       # per sequence: a list (a few tokens) or an int64 array
            positions: list = []
            small = sum(counts) <= _SMALL_STEP
            for seq, n, toks in zip(seqs, counts, tokens):
                if n == 0:
                    continue
                start = seq.length
                if start % bs and self.allocator.ref_count(seq.block_ids[-1]) > 1:
                    src = seq.block_ids[-1]
                    (dst,) = self.allocator.allocate(1)
                    self.allocator.decref(src)
                    seq.block_ids[-1] = dst
                    copies.append((src, dst))
                grow = _ceil_div(start + n, bs) - len(seq.block_ids)
                if grow:   # most decode steps fill a slot of the last block
                    seq.block_ids.extend(self.allocator.allocate(grow))
                if small:   # Python arithmetic: cheaper than numpy for a decode step's few tokens
                    blocks = seq.block_ids
                    positions.append(range(start, start + n))
                    slots.append([blocks[p // bs] * bs + p % bs for p in range(start, start + n)])
                else:
                    pos = np.arange(start, start + n, dtype=np.int64)
                    table = np.asarray(seq.block_ids, dtype=np.int64)
                    positions.append(pos)
                    slots.append(table[pos // bs] * bs + pos % bs)
                seq.length = start + n
                self._record_tokens(seq, toks)

            table = build_page_table(ids, [s.block_ids for s in seqs],
                                     [s.length for s in seqs], bs)
            q_indptr = [0, *itertools.accumulate(counts)]
            if small:
                slot_mapping = [x for part in slots for x in part]
                pos_all = [x for part in positions for x in part]
            else:
                empty = np.zeros(0, dtype=np.int64)
                slot_mapping = np.concatenate(slots) if slots else empty
                pos_all = np.concatenate(positions) if positions else empty
            return StepPlan(
                block_size=bs,
                seq_ids=table.seq_ids,
                num_new_tokens=_frozen(counts),
                slot_mapping=_frozen(slot_mapping),
                positions=_frozen(pos_all),
                q_indptr=_frozen(q_indptr),
                indptr=table.indptr,
                indices=table.indices,
                last_page_len=table.last_page_len,
                kv_lens=table.kv_lens,
                max_q_len=max(counts, default=0),
                max_kv_len=table.max_kv_len,
                copies=tuple(copies),
            )

    def page_table(self, seq_ids: Sequence[int]) -> PageTable:
        """The CSR page table of ``seq_ids`` as they are now (no new tokens, no change).

        Parameters
        ----------
        seq_ids : sequence of int, [B]
            Distinct live sequences, in batch order.
        """
        with self._lock:
            ids, seqs, _ = self._validate_batch(seq_ids, None)
            return build_page_table(ids, [s.block_ids for s in seqs],
                                    [s.length for s in seqs], self.block_size)

    # ---- internals -------------------------------------------------------------------------

    def _get(self, seq_id: Any) -> _Sequence:
        seq_id = _int("seq_id", seq_id)
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise UnknownSequence(seq_id, freed=0 <= seq_id < self._next_seq_id)
        return seq

    def _validate_batch(self, seq_ids: Any, num_new_tokens: Any
                        ) -> tuple[list[int], list[_Sequence], list[int]]:
        """(ids, sequences, counts) after checking everything; changes nothing."""
        seq_ids = _as_list("seq_ids", seq_ids, "a sequence of ints")
        ids: list[int] = []
        seqs = []
        seen: set[int] = set()
        for i, sid in enumerate(seq_ids):
            sid = _int(f"seq_ids[{i}]", sid)
            if sid in seen:
                raise InvalidArgument(f"seq_ids: sequence {sid} appears twice in one batch")
            seen.add(sid)
            ids.append(sid)
            seqs.append(self._get(sid))
        if num_new_tokens is None:
            return ids, seqs, [0] * len(seqs)
        num_new_tokens = _as_list("num_new_tokens", num_new_tokens, "a sequence of ints")
        if len(num_new_tokens) != len(seqs):
            raise ShapeError(f"num_new_tokens: expected {len(seqs)} entries (one per seq_ids), "
                             f"got {len(num_new_tokens)}")
        counts = [_int(f"num_new_tokens[{i}]", n, low=0) for i, n in enumerate(num_new_tokens)]
        for seq, n in zip(seqs, counts):
            if seq.length + n > _INT32_MAX:
                raise InvalidArgument(f"a sequence would exceed {_INT32_MAX} tokens")
        return ids, seqs, counts

    def _validate_tokens(self, token_ids: Any, counts: list[int]) -> list[list[int] | None]:
        if token_ids is None:
            return [None] * len(counts)
        token_ids = _as_list("token_ids", token_ids, "one token list per sequence")
        if len(token_ids) != len(counts):
            raise ShapeError(f"token_ids: expected {len(counts)} entries (one per seq_ids), "
                             f"got {len(token_ids)}")
        out: list[list[int] | None] = []
        for i, (toks, n) in enumerate(zip(token_ids, counts)):
            if toks is None:
                out.append(None)
                continue
            toks = _as_tokens(f"token_ids[{i}]", toks)
            if len(toks) != n:
                raise ShapeError(f"token_ids[{i}]: expected {n} token ids (num_new_tokens[{i}]), "
                                 f"got {len(toks)}")
            out.append(toks)
        return out

    def _blocks_needed(self, seqs: list[_Sequence], counts: list[int]) -> int:
        bs = self.block_size
        needed = 0
        writers: "Counter[int] | None" = None   # shared partial last block -> writers in batch
        for seq, n in zip(seqs, counts):
            if n == 0:
                continue
            needed += _ceil_div(seq.length + n, bs) - len(seq.block_ids)
            if seq.length % bs and self.allocator.ref_count(seq.block_ids[-1]) > 1:
                writers = writers if writers is not None else Counter()
                writers[seq.block_ids[-1]] += 1
        # Writers copy in batch order while the block still has another holder.
        for block, m in (writers or {}).items():
            needed += min(m, self.allocator.ref_count(block) - 1)
        return needed

    def _record_tokens(self, seq: _Sequence, tokens: list[int] | None) -> None:
        """Extend the token history; cache every block that became full."""
        if not seq.tracked:
            return
        if tokens is None:
            seq.tracked = False
            seq.tail_tokens = []
            return
        bs = self.block_size
        tail = seq.tail_tokens + tokens
        while len(tail) >= bs:
            chunk, tail = tail[:bs], tail[bs:]
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block = seq.block_ids[len(seq.block_hashes)]
            h, _ = self.prefix_index.insert(block, parent, chunk)
            seq.block_hashes.append(h)
        seq.tail_tokens = tail

    # ---- consistency and state -------------------------------------------------------------

    def check_invariants(self) -> None:
        """Verify the whole bookkeeping; raise :class:`InvariantViolation` on the first flaw.

        Checked: every block is exactly one of free / referenced / cached-evictable; each
        ref count equals the number of sequences holding the block; no sequence holds a
        block twice; a sequence of length ``L`` holds ``ceil(L / block_size)`` blocks; no
        partially filled block is cached; token histories match lengths and cached hashes.
        """
        with self._lock:
            self.allocator.check_invariants()
            bs = self.block_size
            num_blocks = self.num_blocks
            holders = [0] * num_blocks
            index = self.prefix_index
            for sid, seq in self._seqs.items():
                def fail(msg: str) -> None:
                    raise InvariantViolation(f"sequence {sid}: {msg}")
                if not 0 <= sid < self._next_seq_id:
                    fail(f"id outside [0, {self._next_seq_id})")
                if len(set(seq.block_ids)) != len(seq.block_ids):
                    fail(f"holds a block twice: {seq.block_ids}")
                if len(seq.block_ids) != _ceil_div(seq.length, bs):
                    fail(f"length {seq.length} but {len(seq.block_ids)} blocks")
                for block in seq.block_ids:
                    if not 0 <= block < num_blocks:
                        fail(f"block {block} outside the pool")
                    holders[block] += 1
                if index is not None and seq.length % bs and index.contains_block(seq.block_ids[-1]):
                    fail(f"its partially filled last block {seq.block_ids[-1]} is cached")
                if seq.tracked:
                    if index is None:
                        fail("tracks tokens without a prefix index")
                    if len(seq.block_hashes) != seq.length // bs or len(seq.tail_tokens) != seq.length % bs:
                        fail(f"token history ({len(seq.block_hashes)} blocks + "
                             f"{len(seq.tail_tokens)} tokens) does not match length {seq.length}")
                    for block, h in zip(seq.block_ids, seq.block_hashes):
                        cached = index.hash_of(block)
                        if cached is not None and cached != h:
                            fail(f"block {block} is cached under another hash")
                elif seq.tail_tokens:
                    fail("keeps tail tokens while untracked")
            refs = self.allocator.state_dict()["ref_counts"]
            if refs != holders:
                bad = next(b for b in range(num_blocks) if refs[b] != holders[b])
                raise InvariantViolation(f"block {bad}: ref count {refs[bad]} but held by "
                                         f"{holders[bad]} sequences")

    def state_dict(self) -> dict:
        """The whole bookkeeping as a plain dict of ints and lists (JSON-serialisable).

        Two equal snapshots mean identical bookkeeping (free-queue order, LRU order, ref
        counts, sequences, token histories, counters). Restore with :meth:`from_state_dict`.
        """
        with self._lock:
            return {
                "version": STATE_VERSION,
                "block_size": self.block_size,
                "next_seq_id": self._next_seq_id,
                "allocator": self.allocator.state_dict(),
                "prefix_index": None if self.prefix_index is None else self.prefix_index.state_dict(),
                "sequences": [
                    {"seq_id": sid, "length": s.length, "block_ids": list(s.block_ids),
                     "block_hashes": list(s.block_hashes), "tail_tokens": list(s.tail_tokens),
                     "tracked": int(s.tracked)}
                    for sid, s in sorted(self._seqs.items())
                ],
            }

    snapshot = state_dict

    @classmethod
    def from_state_dict(cls, state: dict) -> "PagedBookkeeping":
        """Rebuild from :meth:`state_dict`; the result's snapshot equals ``state``.

        Raises
        ------
        kvcl.errors.InvalidArgument
            Malformed state (missing keys, wrong types, another version).
        InvariantViolation
            Well-formed but inconsistent state.
        """
        try:
            if state["version"] != STATE_VERSION:
                raise InvalidArgument(f"state version {state['version']!r}, expected {STATE_VERSION}")
            alloc_state = state["allocator"]
            book = cls(int(alloc_state["num_blocks"]), int(state["block_size"]),
                       enable_prefix_caching=state["prefix_index"] is not None)
            if book.prefix_index is not None:
                book.prefix_index = PrefixIndex.from_state_dict(state["prefix_index"])
                if book.prefix_index.block_size != book.block_size:
                    raise InvalidArgument("prefix index block_size differs from block_size")
            book.allocator = BlockAllocator.from_state_dict(
                alloc_state, prefix_index=book.prefix_index, lock=book._lock)
            book._next_seq_id = int(state["next_seq_id"])
            for s in state["sequences"]:
                sid = int(s["seq_id"])
                if sid in book._seqs:
                    raise InvariantViolation(f"sequence {sid} appears twice")
                book._seqs[sid] = _Sequence(
                    [int(b) for b in s["block_ids"]], int(s["length"]),
                    [int(h) for h in s["block_hashes"]], [int(t) for t in s["tail_tokens"]],
                    bool(s["tracked"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed paging state: {exc!r}") from exc
        book.check_invariants()
        return book
