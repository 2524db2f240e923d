"""BlockAllocator: exact block ids, free-queue order, ref counts, all-or-nothing allocation."""

from __future__ import annotations

import pytest

from kvcl.errors import InvalidArgument, OutOfBlocks, OutOfRangeError
from kvcl.paging import BlockAllocator, InvariantViolation, PrefixIndex


def test_initial_state():
    alloc = BlockAllocator(5)
    assert alloc.num_blocks == 5
    assert alloc.num_free == 5
    assert alloc.free_queue() == [0, 1, 2, 3, 4]
    assert [alloc.ref_count(b) for b in range(5)] == [0] * 5
    alloc.check_invariants()


def test_allocate_takes_from_front_and_release_goes_to_back():
    alloc = BlockAllocator(6)
    assert alloc.allocate(2) == [0, 1]
    assert alloc.allocate(1) == [2]
    assert alloc.allocate(0) == []
    alloc.decref(1)
    alloc.decref(0)
    assert alloc.free_queue() == [3, 4, 5, 1, 0]
    assert alloc.allocate(4) == [3, 4, 5, 1]
    assert alloc.num_free == 1
    alloc.check_invariants()


def test_ref_counts():
    alloc = BlockAllocator(3)
    (b,) = alloc.allocate(1)
    alloc.incref(b)
    alloc.incref(b)
    assert alloc.ref_count(b) == 3
    alloc.decref(b)
    alloc.decref(b)
    assert alloc.ref_count(b) == 1 and alloc.num_free == 2
    alloc.decref(b)
    assert alloc.ref_count(b) == 0 and alloc.free_queue() == [1, 2, 0]
    alloc.check_invariants()


def test_out_of_blocks_changes_nothing():
    alloc = BlockAllocator(4)
    alloc.allocate(3)
    before = alloc.state_dict()
    with pytest.raises(OutOfBlocks) as info:
        alloc.allocate(2)
    assert (info.value.requested, info.value.available) == (2, 1)
    assert isinstance(info.value, MemoryError)
    assert alloc.state_dict() == before


def test_misuse_is_refused():
    alloc = BlockAllocator(3)
    with pytest.raises(InvalidArgument):
        alloc.decref(0)                 # no reference
    with pytest.raises(InvalidArgument):
        alloc.incref(0)                 # free: allocate it instead
    with pytest.raises(OutOfRangeError):
        alloc.ref_count(3)
    with pytest.raises(OutOfRangeError):
        alloc.incref(-1)
    with pytest.raises(OutOfRangeError):
        alloc.allocate(-1)
    with pytest.raises(OutOfRangeError):
        BlockAllocator(0)
    assert alloc.state_dict() == BlockAllocator(3).state_dict()


def test_cached_blocks_are_evictable_and_evicted_lru_first_only_when_needed():
    index = PrefixIndex(block_size=2)
    alloc = BlockAllocator(4, prefix_index=index)
    blocks = alloc.allocate(3)                        # [0, 1, 2]
    h0, _ = index.insert(0, None, [1, 2])
    index.insert(1, h0, [3, 4])
    alloc.decref(1)                                   # cached -> evictable, not free queue
    alloc.decref(0)
    alloc.decref(2)                                   # uncached -> back of the free queue
    assert blocks == [0, 1, 2]
    assert alloc.free_queue() == [3, 2]
    assert index.evictable_blocks() == [1, 0]
    assert alloc.num_free == 4
    alloc.check_invariants()
    # Plain free blocks go first; then the least recently released cached block.
    assert alloc.allocate(3) == [3, 2, 1]
    assert index.evictions == 1 and not index.contains_block(1) and index.contains_block(0)
    alloc.check_invariants()
    # Reviving an evictable block takes it out of the LRU.
    alloc.incref(0)
    assert alloc.num_free == 0 and alloc.ref_count(0) == 1
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)
    alloc.check_invariants()


def test_state_roundtrip_and_corruption():
    alloc = BlockAllocator(4)
    alloc.allocate(2)
    alloc.decref(0)
    state = alloc.state_dict()
    assert state == {"num_blocks": 4, "free_queue": [2, 3, 0], "ref_counts": [0, 1, 0, 0]}
    assert BlockAllocator.from_state_dict(state).state_dict() == state
    bad = dict(state, free_queue=[2, 3, 0, 1])        # block 1 both free and referenced
    with pytest.raises(InvariantViolation):
        BlockAllocator.from_state_dict(bad)
    with pytest.raises(InvalidArgument):
        BlockAllocator.from_state_dict({"num_blocks": 4})
