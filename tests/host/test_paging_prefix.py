"""Prefix caching: hash chain, hits / misses / partial hits / eviction with exact counters."""

from __future__ import annotations

import numpy as np
import pytest

from kvcl.errors import InvalidArgument
from kvcl.paging import PagedBookkeeping, PrefixIndex, block_hash

PROMPT = [10, 11, 12, 13, 14, 15, 16, 17, 18]        # 9 tokens: 2 full blocks of 4 + 1


def ints(a):
    return np.asarray(a).tolist()


def counters(book):
    idx = book.prefix_index
    return idx.queries, idx.hits, idx.misses, idx.evictions


def prefill(book, tokens):
    """Add a sequence for ``tokens`` and compute whatever the cache did not hold."""
    seq = book.add_sequence(tokens)
    cached = book.seq_len(seq)
    book.plan([seq], [len(tokens) - cached], token_ids=[tokens[cached:]])
    return seq


def test_block_hash_is_a_chain_and_stable():
    h0 = block_hash(None, [1, 2])
    assert h0 == block_hash(None, np.array([1, 2], dtype=np.int32))
    assert h0 != block_hash(None, [2, 1])
    assert block_hash(h0, [3, 4]) != block_hash(None, [3, 4])
    assert 0 <= h0 < 2**63
    # Stable across processes and Python versions (blake2b, not hash()).
    assert h0 == block_hash(None, [1, 2])
    assert isinstance(h0, int)


def test_miss_then_hit():
    book = PagedBookkeeping(8, 4)
    a = prefill(book, PROMPT)
    assert counters(book) == (1, 0, 2, 0)            # 2 eligible blocks, none cached
    assert book.block_ids(a) == [0, 1, 2]
    assert len(book.prefix_index) == 2               # blocks 0 and 1 are full: cached
    assert book.prefix_index.hash_of(0) == block_hash(None, PROMPT[:4])
    assert book.prefix_index.hash_of(1) == block_hash(block_hash(None, PROMPT[:4]), PROMPT[4:8])
    assert book.prefix_index.hash_of(2) is None      # partial: never cached

    b = book.add_sequence(PROMPT)
    assert counters(book) == (2, 2, 2, 0)
    assert book.seq_len(b) == 8 and book.block_ids(b) == [0, 1]
    assert (book.ref_count(0), book.ref_count(1)) == (2, 2)
    plan = book.plan([b], [1], token_ids=[PROMPT[8:]])
    assert book.block_ids(b) == [0, 1, 3]
    assert ints(plan.slot_mapping) == [12] and ints(plan.positions) == [8]
    book.check_invariants()


def test_partial_hit():
    book = PagedBookkeeping(8, 4)
    prefill(book, PROMPT)
    other = PROMPT[:4] + [99, 98, 97, 96, 95]
    seq = book.add_sequence(other)
    assert counters(book) == (2, 1, 3, 0)
    assert book.block_ids(seq) == [0] and book.seq_len(seq) == 4
    book.check_invariants()


def test_hit_requires_the_same_parent_chain():
    book = PagedBookkeeping(8, 4)
    prefill(book, PROMPT)
    shifted = [0, 0, 0, 0] + PROMPT[4:8] + [1]       # block 2 tokens equal, parent differs
    seq = book.add_sequence(shifted)
    assert book.seq_len(seq) == 0
    assert counters(book) == (2, 0, 4, 0)


def test_whole_prompt_cached_leaves_the_last_token_to_compute():
    book = PagedBookkeeping(8, 4)
    prompt = PROMPT[:8]                              # exactly 2 full blocks
    prefill(book, prompt)
    assert counters(book) == (1, 0, 1, 0)            # only (8 - 1) // 4 = 1 block eligible
    seq = book.add_sequence(prompt)
    assert book.seq_len(seq) == 4 and book.block_ids(seq) == [0]
    assert counters(book) == (2, 1, 1, 0)
    # Recomputing block 2 does not replace the cached copy (block 1 stays the cached one).
    book.plan([seq], [4], token_ids=[prompt[4:]])
    assert book.block_ids(seq) == [0, 2]
    assert book.prefix_index.hash_of(2) is None and book.prefix_index.contains_block(1)
    book.check_invariants()


def test_short_prompts_query_nothing():
    book = PagedBookkeeping(8, 4)
    for tokens in ([], [1], [1, 2, 3, 4]):
        assert book.seq_len(book.add_sequence(tokens)) == 0
    assert counters(book) == (3, 0, 0, 0)


def test_freed_cached_blocks_stay_evictable_and_are_evicted_lru_first():
    book = PagedBookkeeping(4, 2)
    a = book.add_sequence()
    book.plan([a], [4], token_ids=[[1, 2, 3, 4]])    # blocks [0, 1], both cached
    book.free(a)                                     # released last block first
    assert book.allocator.free_queue() == [2, 3]
    assert book.prefix_index.evictable_blocks() == [1, 0]
    assert book.num_free == 4
    book.check_invariants()

    b = book.add_sequence()
    book.plan([b], [6], token_ids=[[9] * 6])         # free queue first, then evict block 1
    assert book.block_ids(b) == [2, 3, 1]
    assert counters(book) == (0, 0, 0, 1)
    assert book.prefix_index.evictable_blocks() == [0]
    book.check_invariants()

    c = book.add_sequence([1, 2, 3, 4, 5])           # block 0 revived, block 1 was evicted
    assert book.block_ids(c) == [0] and book.seq_len(c) == 2
    assert counters(book) == (1, 1, 1, 1)
    assert book.ref_count(0) == 1 and book.num_free == 0
    book.check_invariants()


def test_duplicate_blocks_are_not_cached_twice():
    book = PagedBookkeeping(8, 2)
    a = book.add_sequence()
    b = book.add_sequence()
    book.plan([a, b], [2, 2], token_ids=[[1, 2], [1, 2]])
    assert book.prefix_index.contains_block(0) and not book.prefix_index.contains_block(1)
    book.free(b)
    book.free(a)
    assert book.allocator.free_queue() == [2, 3, 4, 5, 6, 7, 1]
    assert book.prefix_index.evictable_blocks() == [0]
    book.check_invariants()


def test_plan_without_token_ids_stops_caching_for_that_sequence():
    book = PagedBookkeeping(8, 2)
    a = book.add_sequence()
    book.plan([a], [3], token_ids=[[1, 2, 3]])       # block 0 cached, token 3 pending
    book.plan([a], [1])                              # history lost from here on
    book.plan([a], [2], token_ids=[[5, 6]])
    assert len(book.prefix_index) == 1 and book.prefix_index.contains_block(0)
    child = book.fork(a)
    book.plan([child], [2], token_ids=[[7, 8]])
    assert len(book.prefix_index) == 1
    book.check_invariants()


def test_fork_inherits_token_history():
    book = PagedBookkeeping(8, 2)
    a = book.add_sequence()
    book.plan([a], [3], token_ids=[[1, 2, 3]])
    b = book.fork(a)
    plan = book.plan([b], [1], token_ids=[[4]])      # copy-on-write, then block becomes full
    assert plan.copies == ((1, 2),)
    assert book.prefix_index.hash_of(2) == block_hash(block_hash(None, [1, 2]), [3, 4])
    c = book.add_sequence([1, 2, 3, 4, 5])
    assert book.block_ids(c) == [0, 2]
    book.check_invariants()


def test_prefix_caching_disabled():
    book = PagedBookkeeping(8, 2, enable_prefix_caching=False)
    assert book.prefix_index is None
    a = book.add_sequence([1, 2, 3, 4, 5])
    assert book.seq_len(a) == 0
    book.plan([a], [5], token_ids=[[1, 2, 3, 4, 5]])
    book.free(a)
    assert book.allocator.free_queue() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert "prefix_hits" not in book.stats()
    book.check_invariants()


def test_bad_prefix_tokens():
    book = PagedBookkeeping(8, 2)
    before = book.snapshot()
    with pytest.raises(InvalidArgument):
        book.add_sequence([1, -2, 3])
    with pytest.raises(TypeError):
        book.add_sequence([1.5, 2.0])
    with pytest.raises(ValueError):
        book.add_sequence([[1, 2]])
    assert book.snapshot() == before


def test_index_alone():
    index = PrefixIndex(block_size=2)
    h, inserted = index.insert(3, None, [5, 6])
    assert inserted and index.lookup(None, [5, 6]) == 3 and index.lookup(h, [5, 6]) is None
    assert index.insert(4, None, [5, 6]) == (h, False)
    with pytest.raises(InvalidArgument):
        index.insert(3, h, [7, 8])                   # already cached
    with pytest.raises(InvalidArgument):
        index.insert(5, h, [7])                      # not a full block
    index.mark_evictable(3)
    assert index.evict_lru() == 3 and index.evictions == 1 and len(index) == 0
    state = index.state_dict()
    assert PrefixIndex.from_state_dict(state).state_dict() == state
