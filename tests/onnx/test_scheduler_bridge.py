"""Continuous batching through the bridge: a Scheduler over a Generator's cache and model.

Greedy tokens of requests batched (joining mid-flight, prompts read in chunks, prefix blocks
shared, preempted when blocks run out) equal each request run alone with the same KV dtype.
"""

from __future__ import annotations

import numpy as np
import pytest

from bridge_fixtures import ROUTES, fixture_path, require_onnx

require_onnx()

ROUTE = "llama_torchscript"
PROMPTS = [[5, 17, 33, 9, 100, 4, 61, 88, 12], [3], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83,
                                                        84, 85, 86, 87, 88, 89, 90], [9, 9, 9, 9, 9]]
STEPS = 8


def _run_all(sched, prompts, steps, join_after=None):
    """Add prompts (the last ones after ``join_after`` steps); their output ids."""
    first = prompts if join_after is None else prompts[:2]
    ids = [sched.add_request(p, max_new_tokens=steps) for p in first]
    got: dict = {}
    n = 0
    while sched.has_unfinished() or len(ids) < len(prompts):
        for o in sched.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        n += 1
        if join_after is not None and n == join_after:
            ids += [sched.add_request(p, max_new_tokens=steps) for p in prompts[2:]]
    return [got[i] for i in ids]


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "int8", "fp8_e4m3", "fp8_e5m2", "int4"])
def test_batched_requests_equal_each_alone(kv_dtype, onnx_device):
    from kvcl.onnx import Generator
    gen = Generator(fixture_path(ROUTE), kv_dtype=kv_dtype, device=onnx_device, max_tokens=512,
                    block_size=4, prefix_caching=True)
    try:
        alone = [gen.generate([p], STEPS).tokens[0].tolist() for p in PROMPTS]
        sched = gen.scheduler(max_batch_tokens=16, min_chunk=4)
        got = _run_all(sched, PROMPTS, STEPS, join_after=3)
        assert sched.counters["max_running"] >= 3
        assert sched.counters["prefill_tokens"] > 0
        # again: the same prompts now hit the prefix cache
        again = _run_all(sched, PROMPTS, STEPS)
        assert sched.counters["cached_prompt_tokens"] > 0
    finally:
        gen.close()
    assert got == alone
    assert again == alone


def test_preemption_through_the_bridge(onnx_device):
    from kvcl.onnx import Generator
    big = Generator(fixture_path(ROUTE), kv_dtype="fp32", device=onnx_device, max_tokens=256, block_size=4)
    try:
        alone = [big.generate([p], 20).tokens[0].tolist() for p in PROMPTS]
    finally:
        big.close()
    # 6 + 16 spare blocks of 4: the four requests need 10 + 8 + 6 + 7 blocks together
    gen = Generator(fixture_path(ROUTE), kv_dtype="fp32", device=onnx_device, max_tokens=24, block_size=4)
    try:
        assert gen.cache.num_blocks == 22
        sched = gen.scheduler(max_batch_tokens=64)
        got = _run_all(sched, PROMPTS, 20)
        assert sched.counters["preemptions"] >= 1, sched.counters
        assert gen.cache.num_free_blocks == gen.cache.num_blocks
    finally:
        gen.close()
    assert got == alone


def test_forward_step_logits_equal_forward(onnx_device):
    from kvcl.onnx import Generator
    gen = Generator(fixture_path(ROUTE), device=onnx_device, max_tokens=256)
    try:
        a, b = gen.cache.add_sequence(), gen.cache.add_sequence()
        want = gen.forward([a], [PROMPTS[0]])
        step = gen.cache.plan([b], [len(PROMPTS[0])], token_ids=[PROMPTS[0]])
        got = gen.forward_step(step, [PROMPTS[0]])
    finally:
        gen.close()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("packed", [True, False])
def test_every_route_packed_and_padded(route, packed, onnx_device):
    """Steps fed back to back in one row (packed) or right-padded: each request's tokens as alone."""
    from kvcl.onnx import Generator
    gen = Generator(fixture_path(route), device=onnx_device, max_tokens=512, block_size=4, packed="auto")
    if packed and not gen.packed:
        gen.close()
        pytest.skip(f"{route} takes no position_ids: never packed")
    gen.packed = packed
    try:
        alone = [gen.generate([p], 6).tokens[0].tolist() for p in PROMPTS]
        sched = gen.scheduler(max_batch_tokens=24, min_chunk=4)
        assert sched.padded is (not packed)
        got = _run_all(sched, PROMPTS, 6, join_after=2)
    finally:
        gen.close()
    assert got == alone
