"""PagedBookkeeping: plans with exact block ids and slots, fork / copy-on-write, free order,
all-or-nothing planning, validation, page tables, snapshots, threads."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from kvcl.errors import (DtypeError, InvalidArgument, KvclError, OutOfBlocks, OutOfRangeError,
                         ShapeError)
from kvcl.paging import InvariantViolation, PagedBookkeeping, UnknownSequence


def ints(a) -> list[int]:
    return np.asarray(a).tolist()


@pytest.fixture
def book():
    return PagedBookkeeping(num_blocks=8, block_size=4)


def test_first_plan_exact(book):
    seq = book.add_sequence()
    assert seq == 0 and book.seq_len(seq) == 0 and book.block_ids(seq) == []
    plan = book.plan([seq], [5])
    assert book.block_ids(seq) == [0, 1]
    assert book.seq_len(seq) == 5
    assert ints(plan.seq_ids) == [0]
    assert ints(plan.num_new_tokens) == [5]
    assert ints(plan.slot_mapping) == [0, 1, 2, 3, 4]
    assert ints(plan.positions) == [0, 1, 2, 3, 4]
    assert ints(plan.q_indptr) == [0, 5]
    assert ints(plan.indptr) == [0, 2]
    assert ints(plan.indices) == [0, 1]
    assert ints(plan.last_page_len) == [1]
    assert ints(plan.kv_lens) == [5]
    assert (plan.max_q_len, plan.max_kv_len) == (5, 5)
    assert plan.copies == () and plan.copy_pairs.shape == (0, 2)
    assert plan.num_tokens == 5 and plan.batch_size == 1
    for name in ("slot_mapping", "positions", "q_indptr", "indptr", "indices", "last_page_len",
                 "kv_lens", "num_new_tokens"):
        arr = getattr(plan, name)
        assert arr.dtype == np.int32 and not arr.flags.writeable, name
    assert book.num_free == 6
    book.check_invariants()


def test_batch_plan_exact(book):
    a = book.add_sequence()
    book.plan([a], [5])
    b = book.add_sequence()
    assert b == 1
    plan = book.plan([a, b], [1, 3])
    assert ints(plan.slot_mapping) == [5, 8, 9, 10]      # a: block 1 offset 1; b: block 2
    assert ints(plan.positions) == [5, 0, 1, 2]
    assert ints(plan.q_indptr) == [0, 1, 4]
    assert ints(plan.indptr) == [0, 2, 3]
    assert ints(plan.indices) == [0, 1, 2]
    assert ints(plan.last_page_len) == [2, 3]
    assert ints(plan.kv_lens) == [6, 3]
    assert (plan.max_q_len, plan.max_kv_len) == (3, 6)
    # Crossing a block boundary in the middle of a step.
    plan = book.plan([b], [6])
    assert book.block_ids(b) == [2, 3, 4]
    assert ints(plan.slot_mapping) == [11, 12, 13, 14, 15, 16]
    assert ints(plan.positions) == [3, 4, 5, 6, 7, 8]
    assert ints(plan.last_page_len) == [1]
    book.check_invariants()


def test_zero_new_tokens_and_empty_sequences(book):
    a = book.add_sequence()
    book.plan([a], [4])
    b = book.add_sequence()
    plan = book.plan([a, b], [0, 0])
    assert ints(plan.slot_mapping) == [] and ints(plan.positions) == []
    assert ints(plan.q_indptr) == [0, 0, 0]
    assert ints(plan.indptr) == [0, 1, 1]
    assert ints(plan.last_page_len) == [4, 0]       # 0 only for an empty sequence
    assert ints(plan.kv_lens) == [4, 0]
    assert plan.max_q_len == 0
    plan = book.plan([], [])
    assert plan.batch_size == 0 and ints(plan.indptr) == [0] and plan.max_kv_len == 0
    book.check_invariants()


def test_free_releases_last_block_first(book):
    a = book.add_sequence()
    b = book.add_sequence()
    book.plan([a, b], [9, 2])                        # a: [0, 1, 2], b: [3]
    assert book.block_ids(a) == [0, 1, 2] and book.block_ids(b) == [3]
    book.free(a)
    assert book.allocator.free_queue() == [4, 5, 6, 7, 2, 1, 0]
    assert book.num_free == 7
    c = book.add_sequence()
    assert c == 2                                    # ids are never reused
    book.plan([c], [8])
    assert book.block_ids(c) == [4, 5]
    book.free(b)
    book.free(c)
    assert book.allocator.free_queue() == [6, 7, 2, 1, 0, 3, 5, 4]
    assert book.num_free == 8 and len(book) == 0
    book.check_invariants()


def test_fork_shares_blocks_and_copy_on_write(book):
    parent = book.add_sequence()
    book.plan([parent], [5])                         # [0, 1], block 1 holds 1 token
    child = book.fork(parent)
    assert child == 1
    assert book.block_ids(child) == [0, 1] and book.seq_len(child) == 5
    assert book.ref_count(0) == 2 and book.ref_count(1) == 2
    assert book.num_free == 6                        # fork allocates nothing
    book.check_invariants()

    plan = book.plan([child], [1])
    assert plan.copies == ((1, 2),)
    assert ints(plan.copy_pairs) == [[1, 2]]
    assert book.block_ids(child) == [0, 2] and book.block_ids(parent) == [0, 1]
    assert ints(plan.slot_mapping) == [2 * 4 + 1]
    assert ints(plan.indices) == [0, 2]
    assert (book.ref_count(0), book.ref_count(1), book.ref_count(2)) == (2, 1, 1)
    # The parent is now the only holder of block 1: it writes in place.
    plan = book.plan([parent], [1])
    assert plan.copies == () and ints(plan.slot_mapping) == [5]
    book.check_invariants()


def test_fork_both_write_in_one_step(book):
    parent = book.add_sequence()
    book.plan([parent], [5])
    child = book.fork(parent)
    assert book.blocks_needed([parent, child], [1, 1]) == 1
    plan = book.plan([parent, child], [1, 1])
    # The first writer in batch order copies; the last holder writes in place.
    assert plan.copies == ((1, 2),)
    assert book.block_ids(parent) == [0, 2] and book.block_ids(child) == [0, 1]
    assert ints(plan.slot_mapping) == [9, 5]
    book.check_invariants()


def test_three_way_fork_copies_twice(book):
    a = book.add_sequence()
    book.plan([a], [6])                              # [0, 1]
    b = book.fork(a)
    c = book.fork(a)
    assert book.ref_count(1) == 3
    assert book.blocks_needed([c, a, b], [1, 3, 1]) == 3   # 2 copies + 1 new block for a
    plan = book.plan([c, a, b], [1, 1, 1])
    assert plan.copies == ((1, 2), (1, 3))
    assert book.block_ids(c) == [0, 2] and book.block_ids(a) == [0, 3] and book.block_ids(b) == [0, 1]
    assert ints(plan.slot_mapping) == [10, 14, 6]
    book.check_invariants()


def test_fork_with_full_last_block_needs_no_copy(book):
    a = book.add_sequence()
    book.plan([a], [8])
    b = book.fork(a)
    plan = book.plan([a, b], [1, 1])
    assert plan.copies == ()
    assert book.block_ids(a) == [0, 1, 2] and book.block_ids(b) == [0, 1, 3]
    assert ints(plan.slot_mapping) == [8, 12]
    book.check_invariants()


def test_copy_on_write_skipped_when_sequence_does_not_write(book):
    a = book.add_sequence()
    book.plan([a], [3])
    b = book.fork(a)
    plan = book.plan([a, b], [0, 2])
    assert plan.copies == ((0, 1),)                  # b writes first (a adds nothing)
    assert book.block_ids(b) == [1, 2] and book.block_ids(a) == [0]
    book.check_invariants()


def test_out_of_blocks_leaves_state_identical():
    book = PagedBookkeeping(num_blocks=4, block_size=4)
    a = book.add_sequence()
    book.plan([a], [12])                             # 3 of 4 blocks
    b = book.add_sequence()
    before = book.snapshot()
    with pytest.raises(OutOfBlocks) as info:
        book.plan([a, b], [1, 8])                    # a fits (block 3), b does not
    assert (info.value.requested, info.value.available) == (3, 1)
    assert book.snapshot() == before
    assert book.seq_len(a) == 12
    book.check_invariants()


def test_out_of_blocks_counts_copy_on_write():
    book = PagedBookkeeping(num_blocks=2, block_size=4)
    a = book.add_sequence()
    book.plan([a], [5])
    b = book.fork(a)
    before = book.snapshot()
    with pytest.raises(OutOfBlocks) as info:
        book.plan([a, b], [1, 1])                    # one copy but no block left
    assert info.value.requested == 1 and info.value.available == 0
    assert book.snapshot() == before
    book.free(b)
    plan = book.plan([a], [1])                       # sole holder again: in place
    assert plan.copies == () and ints(plan.slot_mapping) == [5]


def test_unknown_and_freed_ids_raise(book):
    a = book.add_sequence()
    book.plan([a], [2])
    book.free(a)
    for call in (lambda: book.seq_len(a), lambda: book.block_ids(a), lambda: book.fork(a),
                 lambda: book.free(a), lambda: book.plan([a], [1]), lambda: book.page_table([a])):
        with pytest.raises(UnknownSequence) as info:
            call()
        assert info.value.seq_id == a and info.value.freed
        assert "freed" in str(info.value) and str(a) in str(info.value)
    with pytest.raises(UnknownSequence) as info:
        book.seq_len(7)
    assert not info.value.freed and "never added" in str(info.value)
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, IndexError)
    assert isinstance(err, OutOfRangeError) and isinstance(err, KvclError)
    with pytest.raises(UnknownSequence):
        book.seq_len(-1)
    with pytest.raises(DtypeError):
        book.seq_len("0")
    with pytest.raises(DtypeError):
        book.seq_len(1.0)


def test_bad_plan_arguments_change_nothing(book):
    a = book.add_sequence()
    b = book.add_sequence()
    book.plan([a], [3])
    before = book.snapshot()
    bad_calls = [
        (ShapeError, lambda: book.plan([a, b], [1])),
        (InvalidArgument, lambda: book.plan([a, a], [1, 1])),
        (OutOfRangeError, lambda: book.plan([a, b], [1, -1])),
        (DtypeError, lambda: book.plan([a], [1.5])),
        (DtypeError, lambda: book.plan(a, [1])),
        (UnknownSequence, lambda: book.plan([a, 9], [1, 1])),
        (ShapeError, lambda: book.plan([a, b], [1, 2], token_ids=[[1], [2]])),
        (ShapeError, lambda: book.plan([a, b], [1, 2], token_ids=[[1]])),
        (DtypeError, lambda: book.plan([a], [1], token_ids=[[1.0]])),
        (InvalidArgument, lambda: book.plan([a], [1], token_ids=[[-3]])),
        (ShapeError, lambda: book.plan([a], [2], token_ids=[[[1, 2]]])),
        (InvalidArgument, lambda: book.page_table([b, b])),
    ]
    for exc, call in bad_calls:
        with pytest.raises(exc):
            call()
        assert book.snapshot() == before
    book.check_invariants()


def test_numpy_arguments_are_accepted(book):
    a = book.add_sequence()
    plan = book.plan(np.array([a]), np.array([3], dtype=np.int32),
                     token_ids=[np.array([5, 6, 7], dtype=np.uint16)])
    assert ints(plan.slot_mapping) == [0, 1, 2]


def test_iterables_and_scalars(book):
    a = book.add_sequence()
    plan = book.plan((s for s in [a]), iter([2]), token_ids=iter([[1, 2]]))
    assert ints(plan.seq_ids) == [a] and ints(plan.slot_mapping) == [0, 1]
    before = book.snapshot()
    with pytest.raises(DtypeError):
        book.plan(np.array(a), [1])
    with pytest.raises(DtypeError):
        book.plan([a], 1)
    with pytest.raises(DtypeError):
        book.plan([a], [True])
    with pytest.raises(DtypeError):
        book.plan([a], [1], token_ids="x")
    assert book.snapshot() == before


def test_page_table_subset_and_block_table(book):
    a, b, c = (book.add_sequence() for _ in range(3))
    book.plan([a, b, c], [5, 4, 9])                  # a [0,1] b [2] c [3,4,5]
    table = book.page_table([c, a])
    assert ints(table.seq_ids) == [c, a]
    assert ints(table.indptr) == [0, 3, 5]
    assert ints(table.indices) == [3, 4, 5, 0, 1]
    assert ints(table.last_page_len) == [1, 1]
    assert ints(table.kv_lens) == [9, 5] and table.max_kv_len == 9
    assert ints(table.block_table()) == [[3, 4, 5], [0, 1, -1]]
    assert book.page_table([]).batch_size == 0
    plan = book.plan([b], [1])
    assert ints(plan.page_table.indices) == ints(book.page_table([b]).indices) == [2, 6]


def test_snapshot_roundtrip_json_and_determinism():
    book = PagedBookkeeping(num_blocks=8, block_size=2)
    a = book.add_sequence()
    book.plan([a], [5], token_ids=[[1, 2, 3, 4, 5]])
    b = book.fork(a)
    c = book.add_sequence([1, 2, 3, 9])
    book.plan([b, c], [1, 2], token_ids=[[6], None])
    book.free(a)
    state = book.snapshot()
    text = json.dumps(state)
    clone = PagedBookkeeping.from_state_dict(json.loads(text))
    assert clone.snapshot() == state
    # Same operations on both: same plans, same snapshots.
    for bk in (book, clone):
        bk.plan([b, c], [3, 1], token_ids=[[7, 8, 9], [4]])
        bk.free(b)
    assert book.snapshot() == clone.snapshot()
    assert book.prefix_index.stats() == clone.prefix_index.stats()


def test_corrupted_state_is_refused():
    book = PagedBookkeeping(num_blocks=4, block_size=2)
    a = book.add_sequence()
    book.plan([a], [3], token_ids=[[1, 2, 3]])
    state = book.snapshot()
    bad = json.loads(json.dumps(state))
    bad["allocator"]["ref_counts"][0] = 2
    with pytest.raises(InvariantViolation):
        PagedBookkeeping.from_state_dict(bad)
    bad = json.loads(json.dumps(state))
    bad["sequences"][0]["length"] = 7
    with pytest.raises(InvariantViolation):
        PagedBookkeeping.from_state_dict(bad)
    bad = json.loads(json.dumps(state))
    bad["prefix_index"]["entries"][0][2] = [2, 1]   # tokens no longer match the hash chain
    bad_book = None
    with pytest.raises(InvariantViolation):
        bad_book = PagedBookkeeping.from_state_dict(bad)
    assert bad_book is None
    bad = json.loads(json.dumps(state))
    del bad["next_seq_id"]
    with pytest.raises(InvalidArgument):
        PagedBookkeeping.from_state_dict(bad)
    with pytest.raises(InvalidArgument):
        PagedBookkeeping.from_state_dict(dict(state, version=99))


def test_constructor_validation():
    with pytest.raises(OutOfRangeError):
        PagedBookkeeping(0, 4)
    with pytest.raises(OutOfRangeError):
        PagedBookkeeping(4, 0)
    with pytest.raises(InvalidArgument):
        PagedBookkeeping(2**20, 2**12)               # slot ids would overflow int32
    book = PagedBookkeeping(1, 1)                    # block size 1: one token per block
    a = book.add_sequence()
    assert ints(book.plan([a], [1]).last_page_len) == [1]
    with pytest.raises(OutOfBlocks):
        book.plan([a], [1])


def test_threads_keep_invariants():
    book = PagedBookkeeping(num_blocks=64, block_size=4)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(100):
                seq = book.add_sequence(rng.integers(0, 3, size=9).tolist())
                try:
                    for _ in range(3):
                        n = int(rng.integers(0, 6))
                        book.plan([seq], [n], token_ids=[rng.integers(0, 3, size=n).tolist()])
                    child = book.fork(seq)
                    book.plan([child], [1], token_ids=[[1]])
                    book.free(child)
                except OutOfBlocks:
                    pass
                book.free(seq)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    book.check_invariants()
    assert book.num_free == 64 and len(book) == 0


def test_small_and_large_plans_agree(monkeypatch):
    """plan computes a small step's slots with Python ints and a large one's with numpy: the
    two give the same plan (values, dtypes, read-only arrays) through forks, copy-on-write,
    empty sequences and zero-token entries."""
    from kvcl.paging import sequences

    def run(threshold):
        monkeypatch.setattr(sequences, "_SMALL_STEP", threshold)
        book = PagedBookkeeping(num_blocks=64, block_size=4)
        a, b = book.add_sequence(), book.add_sequence()
        plans = [book.plan([a, b], [5, 2])]
        c = book.fork(a)
        plans.append(book.plan([c, a, b], [1, 3, 0]))    # copy-on-write of a's shared last block
        plans.append(book.plan([b], [9]))
        plans.append(book.plan([a, b, c], [0, 0, 0]))
        return plans

    fields = ("seq_ids", "num_new_tokens", "slot_mapping", "positions", "q_indptr", "indptr",
              "indices", "last_page_len", "kv_lens")
    for small, large in zip(run(1 << 30), run(0)):
        for name in fields:
            x, y = getattr(small, name), getattr(large, name)
            assert x.dtype == y.dtype and not x.flags.writeable, name
            np.testing.assert_array_equal(x, y, err_msg=name)
        assert (small.max_q_len, small.max_kv_len, small.copies) == (large.max_q_len, large.max_kv_len, large.copies)
    assert run(1 << 30)[1].copies   # the copy-on-write case is in there
