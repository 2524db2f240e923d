"""kvcl demo: every KV dtype within its accuracy bound, and the bridge's fp32 tokens equal the
original model's (small shapes; the CLI runs the full ones)."""

import pytest

from kvcl.demo import run_demo

BOUND = {"fp32": 1e-5, "fp16": 2e-3, "int8": 0.03}          # max |err| / max |out| (targets.md)
COSINE = {"fp8_e4m3": 0.995, "fp8_e5m2": 0.97, "int4": 0.95}   # int4: the peaky bound of test_int4_decode


def test_demo_reports_every_dtype_within_bounds(device):
    lines = []
    results = run_demo(device, seq_lens=(33, 1, 17), repeats=1, print_fn=lines.append)
    for name, bound in BOUND.items():
        assert results[name]["max_rel_error"] <= bound, (name, results[name])
    for name, bound in COSINE.items():
        assert results[name]["cosine"] >= bound, (name, results[name])
    assert results["int4"]["bytes_per_token"] < results["int8"]["bytes_per_token"] < results["fp16"]["bytes_per_token"] \
        < results["fp32"]["bytes_per_token"]
    assert any("KV dtype" in line for line in lines)
    bridge = results["onnx_bridge"]
    if not bridge:
        pytest.skip("ONNX bridge part skipped (no onnx extra or no fixture): " + lines[-1])
    assert bridge["fp32"]["equal_prefix"] == len(bridge["fp32"]["tokens"])
    assert bridge["fp16"]["cache_bytes"] * 2 == bridge["fp32"]["cache_bytes"]
