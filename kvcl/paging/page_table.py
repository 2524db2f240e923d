"""The page table in CSR form, and the per-step plan handed to the device side.

The page table (the FlashInfer layout; this is the one place it is defined)
-------------------------------------------------------------------------------
For a batch of ``B`` sequences with ``kv_lens[b]`` cached tokens each, stored in blocks of
``block_size`` token slots:

``indptr`` : int32 [B + 1]
    ``indices[indptr[b]:indptr[b + 1]]`` are the blocks of sequence ``b``, in token order;
    ``indptr[b + 1] - indptr[b] == ceil(kv_lens[b] / block_size)``.
``indices`` : int32 [nnz]
    Block ids (``nnz == indptr[B]``). Token ``t`` of sequence ``b`` lives in block
    ``indices[indptr[b] + t // block_size]`` at offset ``t % block_size``.
``last_page_len`` : int32 [B]
    Tokens in the last block of each sequence, ``1 .. block_size``; 0 only for an empty
    sequence (``kv_lens[b] == 0``, no blocks).
``kv_lens`` : int32 [B]
    ``(indptr[b+1] - indptr[b] - 1) * block_size + last_page_len[b]`` (0 when empty).

A *slot* is ``block_id * block_size + offset``: the row of the flattened pool
``[num_blocks * block_size]`` a token's K/V lives in. ``slot_mapping`` lists the slots the
new tokens of a step are written to.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ShapeError


def _frozen(a, dtype=np.int32) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=dtype)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class PageTable:
    """CSR page table of a batch of sequences (see the module docstring for the layout).

    Attributes
    ----------
    block_size : int
    seq_ids : numpy.ndarray, int64 [B]
        The sequences, in batch order.
    indptr : numpy.ndarray, int32 [B + 1]
    indices : numpy.ndarray, int32 [nnz]
    last_page_len : numpy.ndarray, int32 [B]
    kv_lens : numpy.ndarray, int32 [B]
    max_kv_len : int
        ``max(kv_lens)`` (0 for an empty batch).

    All arrays are read-only. Equality is identity (arrays do not compare to a bool).
    """

    block_size: int
    seq_ids: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    last_page_len: np.ndarray
    kv_lens: np.ndarray
    max_kv_len: int

    @property
    def batch_size(self) -> int:
        """``B``."""
        return len(self.seq_ids)

    def block_table(self, pad: int = -1) -> np.ndarray:
        """The same table padded to a dense ``int32 [B, max_blocks]`` array (vLLM layout).

        Parameters
        ----------
        pad : int
            Value of the unused entries.
        """
        counts = np.diff(self.indptr)
        width = int(counts.max()) if len(counts) else 0
        table = np.full((self.batch_size, width), pad, dtype=np.int32)
        for b, (start, n) in enumerate(zip(self.indptr[:-1], counts)):
            table[b, :n] = self.indices[start:start + n]
        return table


def build_page_table(seq_ids: Sequence[int], block_lists: Sequence[Sequence[int]],
                     kv_lens: Sequence[int], block_size: int) -> PageTable:
    """Build a :class:`PageTable` from per-sequence block lists and lengths.

    Parameters
    ----------
    seq_ids : sequence of int, [B]
    block_lists : sequence of sequences of int, [B][ceil(kv_lens[b] / block_size)]
    kv_lens : sequence of int, [B]
    block_size : int

    Examples
    --------
    >>> t = build_page_table([0, 1], [[3, 4], [5]], [5, 2], block_size=4)
    >>> t.indptr.tolist(), t.indices.tolist(), t.last_page_len.tolist()
    ([0, 2, 3], [3, 4, 5], [1, 2])
    """
    # plain Python lists, one numpy array per field at the end: a decode step's table has a
    # handful of entries, where each numpy call costs more than the arithmetic (25 -> 6 µs)
    counts = [len(blocks) for blocks in block_lists]
    lens = np.asarray(kv_lens, dtype=np.int64).reshape(-1).tolist()
    if len(lens) != len(counts):
        raise ShapeError(f"kv_lens: expected {len(counts)} entries (one per block list), got {len(lens)}")
    indptr = [0, *itertools.accumulate(counts)]
    indices = [b for blocks in block_lists for b in blocks]
    last = [n - (c - 1) * block_size if n > 0 else 0 for n, c in zip(lens, counts)]
    return PageTable(
        block_size=int(block_size),
        seq_ids=_frozen(seq_ids, np.int64),
        indptr=_frozen(indptr),
        indices=_frozen(indices),
        last_page_len=_frozen(last),
        kv_lens=_frozen(lens),
        max_kv_len=max(lens, default=0),
    )


@dataclass(frozen=True, eq=False)
class StepPlan:
    """Everything the device side needs for one step, computed once on the host.

    Returned by :meth:`kvcl.paging.PagedBookkeeping.plan`; the reservation it describes is
    already committed (sequence lengths include the new tokens). The device side must

    1. perform every ``copies`` entry (copy block ``src`` to block ``dst``, all layers),
    2. write the K/V of new token ``i`` to slot ``slot_mapping[i]`` (RoPE at ``positions[i]``),
    3. attend with the page table (``indptr``, ``indices``, ``last_page_len``) and the query
       layout ``q_indptr``: queries ``q_indptr[b]:q_indptr[b+1]`` belong to sequence ``b``
       and are its last ``num_new_tokens[b]`` positions (causal within the step).

    Attributes
    ----------
    block_size : int
    seq_ids : numpy.ndarray, int64 [B]
    num_new_tokens : numpy.ndarray, int32 [B]
    slot_mapping : numpy.ndarray, int32 [total_new]
        ``block_id * block_size + offset`` of each new token, sequences in batch order.
    positions : numpy.ndarray, int32 [total_new]
        Position of each new token within its sequence.
    q_indptr : numpy.ndarray, int32 [B + 1]
        Prefix sums of ``num_new_tokens``.
    indptr, indices, last_page_len, kv_lens : numpy.ndarray
        The page table *after* the new tokens (layout in :mod:`kvcl.paging.page_table`).
    max_q_len : int
        ``max(num_new_tokens)`` (0 for an empty batch).
    max_kv_len : int
        ``max(kv_lens)`` (0 for an empty batch).
    copies : tuple of (int, int)
        Copy-on-write actions ``(src_block, dst_block)``, to run before any write.

    All arrays are read-only.
    """

    block_size: int
    seq_ids: np.ndarray
    num_new_tokens: np.ndarray
    slot_mapping: np.ndarray
    positions: np.ndarray
    q_indptr: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    last_page_len: np.ndarray
    kv_lens: np.ndarray
    max_q_len: int
    max_kv_len: int
    copies: tuple[tuple[int, int], ...]

    @property
    def batch_size(self) -> int:
        """``B``."""
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        """``total_new``: the number of new tokens in the step."""
        return len(self.slot_mapping)

    @property
    def copy_pairs(self) -> np.ndarray:
        """``copies`` as an int32 ``[num_copies, 2]`` array (columns src, dst)."""
        return np.asarray(self.copies, dtype=np.int32).reshape(-1, 2)

    @property
    def page_table(self) -> PageTable:
        """The attention page table of this step as a :class:`PageTable`."""
        return PageTable(self.block_size, self.seq_ids, self.indptr, self.indices,
                         self.last_page_len, self.kv_lens, self.max_kv_len)
