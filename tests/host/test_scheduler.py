"""The continuous-batching scheduler against a model whose cache is real bookkeeping.

No device: :class:`TokenCache` is :class:`kvcl.paging.PagedBookkeeping` plus a host array of
token slots, written through each step's slot mapping and read back through its page table
(copy-on-write copies applied), like the KV pools. The toy model's next token is a hash of
every token the cache holds for the row: a scheduler that fed a wrong chunk, shared a wrong
block, lost a preempted request's tokens or mixed rows would change the outputs. Each test
compares with every request run alone.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvcl.errors import CapacityError, InvalidArgument, OutOfRangeError
from kvcl.paging import PagedBookkeeping
from kvcl.sampling import SamplingParams
from kvcl.scheduler import Scheduler

VOCAB = 61


class _Step:
    def __init__(self, plan):
        self.plan = plan
        self.seq_ids = [int(s) for s in plan.seq_ids]


class TokenCache:
    """The parts of PagedKVCache a Scheduler uses, storing token ids instead of K/V."""

    def __init__(self, num_blocks: int, block_size: int, prefix: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._book = PagedBookkeeping(num_blocks, block_size, enable_prefix_caching=prefix)
        self.slots = np.full(num_blocks * block_size, -1, np.int64)
        self.plans = []

    def add_sequence(self, prefix_tokens=None):
        return self._book.add_sequence(prefix_tokens)

    def seq_len(self, s):
        return self._book.seq_len(s)

    def free(self, s):
        self._book.free(s)

    def blocks_needed(self, seq_ids, lens):
        return self._book.blocks_needed(seq_ids, lens)

    @property
    def num_free_blocks(self):
        return self._book.num_free

    def plan(self, seq_ids, lens, token_ids=None):
        plan = self._book.plan(seq_ids, lens, token_ids)
        bs = self.block_size
        for src, dst in plan.copies:
            self.slots[dst * bs:(dst + 1) * bs] = self.slots[src * bs:(src + 1) * bs]
        self.plans.append((list(seq_ids), list(lens)))
        return _Step(plan)

    def stats(self):
        return self._book.stats()


def toy_forward(cache: TokenCache):
    """Write each row's tokens to its slots; logits peak at a hash of the row's whole cache."""
    def forward(step, tokens):
        plan = step.plan
        flat = np.concatenate([np.asarray(t, np.int64) for t in tokens])
        cache.slots[plan.slot_mapping] = flat
        out = np.zeros((len(tokens), VOCAB), np.float32)
        for b in range(len(tokens)):
            blocks = plan.indices[plan.indptr[b]:plan.indptr[b + 1]]
            n = int(plan.kv_lens[b])
            rows = np.concatenate([np.arange(k * cache.block_size, (k + 1) * cache.block_size) for k in blocks])[:n]
            held = cache.slots[rows]
            assert (held >= 0).all(), "read a slot nobody wrote"
            h = int((held * (np.arange(n) * 7 + 3)).sum() % VOCAB)
            out[b] = np.linspace(0, 1, VOCAB) * 0.01
            out[b, h] = 5.0
        return out
    return forward


def alone(prompt, n, stop=()):
    cache = TokenCache(64, 4)
    s = Scheduler(cache, toy_forward(cache), stop_ids=stop)
    return s.generate([prompt], max_new_tokens=n)[0]


def make(num_blocks=64, block_size=4, **kw):
    cache = TokenCache(num_blocks, block_size)
    return cache, Scheduler(cache, toy_forward(cache), vocab_size=VOCAB, **kw)


PROMPTS = [[1, 2, 3], [5] * 11, [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [4], [9, 9]]


def test_batch_equals_each_alone_with_chunked_prefill():
    cache, s = make(max_batch_tokens=8, min_chunk=2)
    got = s.generate(PROMPTS, max_new_tokens=6)
    assert got == [alone(p, 6) for p in PROMPTS]
    # prompts were read in chunks (8 padded tokens a step) and rows ran together
    assert max(sum(lens) for _, lens in cache.plans) > 1
    assert max(len(ids) for ids, _ in cache.plans) >= 3
    assert s.counters["padded_tokens"] <= 8 * s.counters["steps"] + 5 * s.counters["steps"]
    assert cache.stats()["num_sequences"] == 0 and cache.num_free_blocks == 64


@pytest.mark.parametrize("budget", [5, 8, 40])
def test_packed_rows_stay_within_the_token_budget(budget):
    # a forward that packs its rows (no padding): the budget is the sum of the rows' tokens
    cache, s = make(max_batch_tokens=budget, min_chunk=2, padded=False)
    got = s.generate(PROMPTS, max_new_tokens=6)
    assert got == [alone(p, 6) for p in PROMPTS]
    for ids, lens in cache.plans:
        decodes = sum(1 for n in lens if n == 1)
        assert sum(lens) <= max(budget, decodes + 1), (ids, lens)
    assert s.counters["padded_tokens"] == s.counters["prefill_tokens"] + s.counters["decode_tokens"]


def test_requests_join_and_leave_mid_flight():
    cache, s = make()
    a = s.add_request(PROMPTS[0], max_new_tokens=10)
    out = {a: []}
    for _ in range(3):
        for o in s.step():
            out[o.request_id] += o.new_token_ids
    b = s.add_request(PROMPTS[2], max_new_tokens=4)
    out[b] = []
    for o in s.run():
        out[o.request_id] += o.new_token_ids
        if o.request_id == b and o.finished:
            assert o.finish_reason == "length" and o.num_output_tokens == 4
    assert out[a] == alone(PROMPTS[0], 10) and out[b] == alone(PROMPTS[2], 4)


def test_stop_ids_end_a_request_and_free_its_blocks():
    ref = alone(PROMPTS[1], 12)
    stop = ref[4]
    cache, s = make(stop_ids=[stop])
    rid = s.add_request(PROMPTS[1], max_new_tokens=12)
    outs = list(s.run())
    toks = [t for o in outs for t in o.new_token_ids]
    assert toks == ref[:ref.index(stop) + 1]
    assert outs[-1].finished and outs[-1].finish_reason == "stop" and outs[-1].request_id == rid
    assert cache.stats()["num_sequences"] == 0


def test_shared_system_prompt_shares_blocks():
    system = list(range(1, 17))    # 4 full blocks of 4
    cache, s = make()
    first = s.generate([system + [30, 31]], max_new_tokens=3)
    rid = s.add_request(system + [40], max_new_tokens=3)
    outs = list(s.run())
    assert {o.request_id for o in outs} == {rid}
    assert outs[0].cached_tokens == 16           # the system prompt's blocks were reused
    assert [t for o in outs for t in o.new_token_ids] == alone(system + [40], 3)
    assert first == [alone(system + [30, 31], 3)]
    assert s.counters["cached_prompt_tokens"] == 16


def test_preemption_when_blocks_run_out_gives_the_same_tokens():
    # 12 blocks of 4 = 48 slots; 4 requests of 6 + 8 tokens need 16 blocks together
    cache, s = make(num_blocks=12, block_size=4)
    prompts = [[i + 1] * 6 for i in range(4)]
    got = s.generate(prompts, max_new_tokens=8)
    assert got == [alone(p, 8) for p in prompts]
    assert s.counters["preemptions"] >= 1
    assert cache.num_free_blocks == 12


def test_abort_frees_and_reports():
    cache, s = make()
    a = s.add_request(PROMPTS[2], max_new_tokens=50)
    b = s.add_request(PROMPTS[0], max_new_tokens=5)
    outs = {}
    for o in s.step():
        outs.setdefault(o.request_id, []).append(o)
    assert s.abort(a) and not s.abort("nope")
    for o in s.run():
        outs.setdefault(o.request_id, []).append(o)
    assert outs[a][-1].finish_reason == "abort"
    assert [t for o in outs[b] for t in o.new_token_ids] == alone(PROMPTS[0], 5)
    assert not s.abort(a)     # finished: nothing to abort
    assert cache.stats()["num_sequences"] == 0


def test_abort_of_a_waiting_request():
    cache, s = make(max_num_seqs=1)
    a = s.add_request(PROMPTS[0], max_new_tokens=3)
    b = s.add_request(PROMPTS[1], max_new_tokens=3)
    assert s.abort(b)
    outs = list(s.run())
    assert {o.request_id for o in outs if o.finish_reason == "abort"} == {b}
    assert [t for o in outs if o.request_id == a for t in o.new_token_ids] == alone(PROMPTS[0], 3)


def test_bad_requests_are_refused_and_change_nothing():
    cache, s = make(num_blocks=8, block_size=4)
    with pytest.raises(CapacityError, match="prompt_ids/max_new_tokens"):
        s.add_request([1] * 30, max_new_tokens=3)        # 33 tokens > 32 slots
    with pytest.raises(OutOfRangeError, match="prompt_ids"):
        s.add_request([1, VOCAB], max_new_tokens=3)
    with pytest.raises(InvalidArgument, match="prompt_ids"):
        s.add_request([], max_new_tokens=3)
    with pytest.raises(InvalidArgument, match="prompt_ids"):
        s.add_request("hello", max_new_tokens=3)
    with pytest.raises(OutOfRangeError, match="max_new_tokens"):
        s.add_request([1], max_new_tokens=0)
    with pytest.raises(InvalidArgument, match="temperature"):
        s.add_request([1], sampling=SamplingParams(temperature=-1))
    s.add_request([1], request_id="x")
    with pytest.raises(InvalidArgument, match="request_id"):
        s.add_request([2], request_id="x")
    assert s.num_waiting == 1 and not cache.plans


def test_sampling_is_reproducible_per_request_whatever_the_batch():
    def run(batch):
        cache, s = make()
        ids = [s.add_request(p, max_new_tokens=6, sampling=SamplingParams(temperature=1.0, top_k=5, seed=i))
               for i, p in enumerate(batch)]
        got = {}
        for o in s.run():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        return [got[i] for i in ids]
    both = run(PROMPTS[:2])
    assert both[0] == run(PROMPTS[:1])[0]


def test_requests_added_from_other_threads():
    cache, s = make(num_blocks=200)
    ids, done = [], threading.Event()

    def client(p):
        ids.append((s.add_request(p, max_new_tokens=4), p))

    threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS * 3]
    got = {}
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or s.has_unfinished():
        for o in s.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    done.set()
    assert len(ids) == 15
    for rid, p in ids:
        assert got[rid] == alone(p, 4)


def test_a_failing_forward_fails_its_requests_only():
    cache = TokenCache(64, 4)
    inner = toy_forward(cache)
    calls = {"n": 0}

    def flaky(step, tokens):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return inner(step, tokens)

    s = Scheduler(cache, flaky)
    a = s.add_request(PROMPTS[0], max_new_tokens=4)
    s.step()
    with pytest.raises(RuntimeError, match="boom"):
        s.step()
    outs = list(s.run())
    assert outs[0].request_id == a and outs[0].finish_reason == "error" and "boom" in outs[0].error
    assert cache.stats()["num_sequences"] == 0
    b = s.add_request(PROMPTS[1], max_new_tokens=3)   # the scheduler goes on
    assert [t for o in s.run() for t in o.new_token_ids] == alone(PROMPTS[1], 3)
    assert b
