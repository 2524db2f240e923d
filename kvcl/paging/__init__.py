"""Host bookkeeping of the paged KV cache (layer 5): no OpenCL here, only integers.

The cache engine drives one :class:`PagedBookkeeping` per pool; the device side receives
block ids, slot mappings, CSR page tables and copy-on-write actions in a :class:`StepPlan`.

Modules, one capability each:

* :mod:`kvcl.paging.allocator` — :class:`BlockAllocator`: FIFO free queue + ref counts.
* :mod:`kvcl.paging.prefix` — :class:`PrefixIndex`: hash chain of full blocks, LRU eviction.
* :mod:`kvcl.paging.page_table` — the page-table layout (defined once there),
  :class:`PageTable`, :class:`StepPlan`, :func:`build_page_table`.
* :mod:`kvcl.paging.sequences` — :class:`PagedBookkeeping`: add / fork / free / plan.
* :mod:`kvcl.paging.exceptions` — :class:`UnknownSequence`, :class:`InvariantViolation`.

Imports only the standard library, numpy, :mod:`kvcl.errors` and :mod:`kvcl.validate`.

Examples
--------
>>> from kvcl.paging import PagedBookkeeping
>>> book = PagedBookkeeping(num_blocks=8, block_size=4)
>>> prompt = [11, 12, 13, 14, 15]
>>> seq = book.add_sequence(prompt)               # nothing cached yet: seq_len 0
>>> plan = book.plan([seq], [len(prompt) - book.seq_len(seq)], token_ids=[prompt])
>>> plan.slot_mapping.tolist(), plan.indices.tolist(), plan.last_page_len.tolist()
([0, 1, 2, 3, 4], [0, 1], [1])
>>> again = book.add_sequence(prompt)             # block 0 (tokens 11..14) is reused
>>> book.seq_len(again), book.block_ids(again)
(4, [0])
"""

from .allocator import BlockAllocator
from .exceptions import InvariantViolation, UnknownSequence
from .page_table import PageTable, StepPlan, build_page_table
from .prefix import PrefixIndex, block_hash
from .sequences import PagedBookkeeping

__all__ = [
    "BlockAllocator", "InvariantViolation", "PageTable", "PagedBookkeeping", "PrefixIndex",
    "StepPlan", "UnknownSequence", "block_hash", "build_page_table",
]
