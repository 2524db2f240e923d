"""Smoke tests of the timing helpers the bench calls (figures are reported, not asserted)."""

from __future__ import annotations

import pytest
from bridge_fixtures import fixture_path, require_onnx

require_onnx()


@pytest.mark.parametrize("route", ["llama_dynamo18", "llama_genai_gqa"])   # kvcl::Attention, ::AttentionQKV
def test_bench_step_smoke(onnx_device, route):
    from kvcl.onnx import bench_step
    rows = bench_step(fixture_path(route), contexts=(8, 40), steps=2, warmup=1, device=onnx_device)
    assert [r["context"] for r in rows] == [8, 40]
    for r in rows:   # the time inside the kvcl ops is counted, whichever op the route uses
        assert r["bridge_ms"] > 0 and r["reference_ms"] > 0 and 0 < r["op_ms"] <= r["bridge_ms"]
        print(r)


def test_hook_overhead_smoke():
    from kvcl.onnx import hook_overhead_us
    r = hook_overhead_us((1, 4, 1, 16), 2, repeats=50)
    assert r["op_call_us"] > 0 and r["identity_call_us"] > 0
    print(r)
