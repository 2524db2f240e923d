"""Randomised checks of the paging bookkeeping against a simulated device pool.

A numpy array stands in for the KV pool: each slot stores the token id written there.
Applying a plan (copy-on-write copies, then the writes at ``slot_mapping``) and reading a
sequence back through its page table must give exactly that sequence's token history, which
checks slot mappings, copy-on-write and prefix hits at once.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvcl.errors import OutOfBlocks
from kvcl.paging import PagedBookkeeping, StepPlan

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402


class SimulatedDevice:
    """The device side of a plan, on token ids instead of K/V rows."""

    def __init__(self, book: PagedBookkeeping):
        self.bs = book.block_size
        self.pool = np.full(book.num_blocks * book.block_size, -1, dtype=np.int64)

    def apply(self, plan: StepPlan, new_tokens: list[list[int]]) -> None:
        for src, dst in plan.copies:
            self.pool[dst * self.bs:(dst + 1) * self.bs] = self.pool[src * self.bs:(src + 1) * self.bs]
        flat = [t for toks in new_tokens for t in toks]
        self.pool[plan.slot_mapping] = flat

    def read(self, book: PagedBookkeeping, seq_id: int) -> list[int]:
        return self.read_all(book, [seq_id])[seq_id]

    def read_all(self, book: PagedBookkeeping, seq_ids: list[int]) -> dict[int, list[int]]:
        """Every sequence's tokens, gathered through one page table."""
        table = book.page_table(seq_ids)
        lens = table.kv_lens.astype(np.int64)
        row = np.repeat(np.arange(len(seq_ids)), lens)
        pos = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        pages = table.indices[table.indptr[row] + pos // self.bs].astype(np.int64)
        tokens = self.pool[pages * self.bs + pos % self.bs].tolist()
        ends = np.cumsum(lens).tolist()
        return {sid: tokens[end - n:end] for sid, n, end in zip(seq_ids, lens.tolist(), ends)}


def check_plan(book: PagedBookkeeping, plan: StepPlan, before: dict[int, int]) -> None:
    """Every slot / position / page-table entry of ``plan`` is consistent."""
    bs = book.block_size
    seq_ids = plan.seq_ids.tolist()
    counts = plan.num_new_tokens.tolist()
    assert plan.q_indptr.tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
    assert len(set(plan.slot_mapping.tolist())) == plan.num_tokens   # no slot written twice
    assert plan.max_q_len == max(counts, default=0)
    assert plan.max_kv_len == max(plan.kv_lens.tolist(), default=0)
    copy_dst = {dst for _, dst in plan.copies}
    for b, sid in enumerate(seq_ids):
        pages = plan.indices[plan.indptr[b]:plan.indptr[b + 1]].tolist()
        kv_len = int(plan.kv_lens[b])
        assert pages == book.block_ids(sid)
        assert kv_len == before[sid] + counts[b] == book.seq_len(sid)
        assert len(pages) == -(-kv_len // bs)
        if kv_len:
            assert 1 <= plan.last_page_len[b] <= bs
            assert (len(pages) - 1) * bs + plan.last_page_len[b] == kv_len
        else:
            assert plan.last_page_len[b] == 0
        lo, hi = plan.q_indptr[b], plan.q_indptr[b + 1]
        for slot, pos in zip(plan.slot_mapping[lo:hi].tolist(), plan.positions[lo:hi].tolist()):
            assert before[sid] <= pos < kv_len
            assert slot // bs == pages[pos // bs] and slot % bs == pos % bs
            assert book.ref_count(slot // bs) == 1 or slot // bs in copy_dst  # never write a shared block
    assert plan.positions.tolist() == [p for sid, n in zip(seq_ids, counts)
                                       for p in range(before[sid], before[sid] + n)]


def run_random_ops(seed: int, num_ops: int, num_blocks: int, block_size: int) -> PagedBookkeeping:
    rng = random.Random(seed)
    book = PagedBookkeeping(num_blocks, block_size)
    device = SimulatedDevice(book)
    history: dict[int, list[int]] = {}
    templates = [[rng.randrange(4) for _ in range(3 * block_size + 2)] for _ in range(3)]

    def plan(seq_ids, new_tokens, pass_tokens):
        before = {s: book.seq_len(s) for s in seq_ids}
        counts = [len(t) for t in new_tokens]
        snap = book.snapshot()
        try:
            p = book.plan(seq_ids, counts, token_ids=new_tokens if pass_tokens else None)
        except OutOfBlocks as exc:
            assert exc.requested > exc.available == book.num_free
            assert book.snapshot() == snap
            return
        check_plan(book, p, before)
        device.apply(p, new_tokens)
        for s, t in zip(seq_ids, new_tokens):
            history[s].extend(t)

    for _ in range(num_ops):
        live = list(history)
        op = rng.random()
        if op < 0.2 and len(live) < 24:
            prompt = None
            if rng.random() < 0.7:
                base = rng.choice(templates)
                prompt = base[:rng.randrange(len(base) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(3))]
            seq = book.add_sequence(prompt)
            cached = book.seq_len(seq)
            history[seq] = list(prompt[:cached]) if prompt else []
            assert device.read(book, seq) == history[seq]      # a hit holds the right tokens
            if prompt and len(prompt) > cached:
                plan([seq], [prompt[cached:]], True)
        elif op < 0.65 and live:
            batch = rng.sample(live, rng.randint(1, min(4, len(live))))
            new_tokens = [[rng.randrange(4) for _ in range(rng.choice([0, 1, 1, 1, 2, 5]))]
                          for _ in batch]
            plan(batch, new_tokens, rng.random() < 0.9)
        elif op < 0.8 and live:
            parent = rng.choice(live)
            child = book.fork(parent)
            history[child] = list(history[parent])
        elif live:
            seq = rng.choice(live)
            book.free(seq)
            del history[seq]
        book.check_invariants()
        assert device.read_all(book, list(history)) == history

    for seq in list(history):
        book.free(seq)
    book.check_invariants()
    assert book.num_free == num_blocks and len(book) == 0
    idx = book.prefix_index
    assert sorted(book.allocator.free_queue() + idx.evictable_blocks()) == list(range(num_blocks))
    return book


def test_ten_thousand_random_operations():
    book = run_random_ops(seed=20240601, num_ops=10_000, num_blocks=48, block_size=4)
    stats = book.prefix_index.stats()
    # The run exercises every path: prefix hits, misses and evictions all happened.
    assert stats["hits"] > 0 and stats["misses"] > 0 and stats["evictions"] > 0


@pytest.mark.parametrize("block_size", [1, 16])
def test_random_operations_awkward_block_sizes(block_size):
    run_random_ops(seed=block_size, num_ops=1_500, num_blocks=24, block_size=block_size)


op_strategy = st.one_of(
    st.tuples(st.just("add"), st.lists(st.integers(0, 2), max_size=12)),
    st.tuples(st.just("plan"), st.lists(st.tuples(st.integers(0, 30), st.integers(0, 9)),
                                        min_size=0, max_size=4)),
    st.tuples(st.just("fork"), st.integers(0, 30)),
    st.tuples(st.just("free"), st.integers(0, 30)),
)


@given(block_size=st.sampled_from([1, 2, 3, 4, 16]), num_blocks=st.integers(1, 20),
       ops=st.lists(op_strategy, max_size=40))
def test_plan_property(block_size, num_blocks, ops):
    book = PagedBookkeeping(num_blocks, block_size)
    device = SimulatedDevice(book)
    history: dict[int, list[int]] = {}
    for kind, arg in ops:
        live = sorted(history)
        if kind == "add":
            seq = book.add_sequence(arg)
            history[seq] = list(arg[:book.seq_len(seq)])
        elif kind == "plan" and live:
            batch, counts = [], []
            for pick, n in arg:
                sid = live[pick % len(live)]
                if sid not in batch:
                    batch.append(sid)
                    counts.append(n)
            new_tokens = [[(sid + i) % 3 for i in range(n)] for sid, n in zip(batch, counts)]
            before = {s: book.seq_len(s) for s in batch}
            snap = book.snapshot()
            needed = book.blocks_needed(batch, counts)
            try:
                plan = book.plan(batch, counts, token_ids=new_tokens)
            except OutOfBlocks as exc:
                assert exc.requested == needed > book.num_free
                assert book.snapshot() == snap
                continue
            assert needed <= num_blocks
            check_plan(book, plan, before)
            device.apply(plan, new_tokens)
            for s, t in zip(batch, new_tokens):
                history[s].extend(t)
        elif kind == "fork" and live:
            parent = live[arg % len(live)]
            history[book.fork(parent)] = list(history[parent])
        elif kind == "free" and live:
            seq = live[arg % len(live)]
            book.free(seq)
            del history[seq]
        book.check_invariants()
        assert device.read_all(book, list(history)) == history
    # Snapshot round trip at the end of every example.
    assert PagedBookkeeping.from_state_dict(book.snapshot()).snapshot() == book.snapshot()
