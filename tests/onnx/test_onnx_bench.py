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
        # where the step goes: planned and readied before the graph (prepare), the device calls
        # inside the ops, the stub graph runs without them
        assert 0 < r["plan_ms"] < r["prepare_ms"] and 0 < r["device_ms"] < r["op_ms"]
        assert 0 < r["graph_ms"] and r["hook_us"] == r["hook_us"]
        layers = r["layers"]
        assert r["python_us_per_layer"] == pytest.approx((r["op_ms"] + r["prepare_ms"] - r["device_ms"]) / layers * 1e3)
        assert r["fixed_us_per_layer"] == pytest.approx(r["python_us_per_layer"] + r["hook_us"])
        assert r["inline"] == (onnx_device.inline_queue is not None)   # tiny steps: in-thread on PoCL
        print(r)


def test_hook_overhead_smoke():
    from kvcl.onnx import hook_overhead_us
    r = hook_overhead_us((1, 4, 1, 16), 2, repeats=50)
    assert r["op_call_us"] > 0 and r["identity_call_us"] > 0
    print(r)


@pytest.mark.parametrize("model,kv_row_bytes", [("llama_dynamo18", 2 * 2 * 2 * 16 * 4),   # K+V, layers, kv heads x D
                                                 ("synthetic", 2 * 4 * 8 * 128 * 4)])
def test_kvcl_bench_takes_the_bridge_cases(onnx_device, tmp_path, capsys, model, kv_row_bytes):
    # `kvcl bench --onnx-model` puts P6's figures in the same run and JSON as the kernel cases
    # (full runs default to the synthetic decoder of realistic width; --quick to none)
    import json

    import kvcl
    from kvcl.cli import main
    spec = next(d.index for d in kvcl.devices() if d.name == onnx_device.info.name)
    out = tmp_path / "b.json"
    path = str(fixture_path(model)) if model != "synthetic" else model
    assert main(["bench", "--quick", "--repeats", "1", "--device", spec, "--json", str(out),
                 "--onnx-model", path, "--onnx-contexts", "8", "24"]) == 0
    printed = capsys.readouterr().out
    assert "than past_key_values" in printed and "fixed/layer" in printed   # the breakdown table
    records = json.loads(out.read_text())["records"]
    bridge = [r for r in records if r["case"] == "onnx_bridge"]
    assert [r["shape"]["context"] for r in bridge] == [8, 24]
    assert model in bridge[0]["shape"]["model"]
    for r in bridge:
        assert r["peer"] == "past_key_values" and r["seconds"] > 0
        assert r["speedup"] == pytest.approx(r["extra"]["reference_seconds"] / r["seconds"])
        assert r["bytes"] == kv_row_bytes * r["shape"]["context"]
    for r in bridge:
        assert {"graph_ms", "op_ms", "prepare_ms", "plan_ms", "device_ms", "fixed_us_per_layer", "inline"} <= set(r["extra"])
    hook = [r for r in records if r["case"] == "onnx_hook_overhead"]
    assert len(hook) == 1 and hook[0]["extra"]["op_call_us"] > 0
    assert main(["bench", "--quick", "--repeats", "1", "--device", spec, "--json", str(out)]) == 0
    assert not [r for r in json.loads(out.read_text())["records"] if r["case"].startswith("onnx")]



@pytest.mark.parametrize("model,contexts,match", [("llama_dynamo18", [0], "onnx_contexts"),
                                                  ("missing.onnx", [16], "no such file"),
                                                  ("README.md", [16], "not a readable ONNX model")])
def test_kvcl_bench_refuses_a_bad_model_before_any_case(onnx_device, monkeypatch, model, contexts, match):
    import kvcl
    from kvcl import bench

    def no_case(*args, **kwargs):
        raise AssertionError("a case ran before the model was checked")
    monkeypatch.setattr(bench, "StreamReader", no_case)
    path = fixture_path(model) if model == "llama_dynamo18" else fixture_path("llama_dynamo18").parent / model
    with pytest.raises(kvcl.InvalidArgument, match=match):
        bench.run_bench(onnx_device, quick=True, onnx_model=str(path), onnx_contexts=contexts)


def test_kvcl_bench_skips_a_real_model_not_exported(onnx_device, tmp_path, monkeypatch, capsys):
    # `--onnx-model smollm2` is opt-in; without the export it says how to make it and goes on
    import json

    import kvcl
    from kvcl.cli import main
    monkeypatch.setenv("KVCL_MODEL_DIR", str(tmp_path / "models"))
    spec = next(d.index for d in kvcl.devices() if d.name == onnx_device.info.name)
    out = tmp_path / "b.json"
    assert main(["bench", "--quick", "--repeats", "1", "--device", spec, "--json", str(out),
                 "--onnx-model", "smollm2"]) == 0
    err = capsys.readouterr().err
    assert "skipping the smollm2 bridge case" in err and "tools/export_real_model.sh" in err
    assert not [r for r in json.loads(out.read_text())["records"] if r["case"] == "onnx_bridge"]


def test_serving_case_rows(onnx_device):
    """kvcl bench --serving: one row per KV dtype, throughput and memory against the peer."""
    from bridge_fixtures import fixture_path

    from kvcl.bench_serving import format_serving, serving_records
    recs = serving_records(fixture_path("llama_torchscript"), onnx_device, requests=3, new_tokens=4,
                           kv_dtypes=("fp32", "int8"), print_fn=lambda m: None)
    assert [r.kv_dtype for r in recs] == ["fp32", "int8"]
    for r in recs:
        e = r.extra
        assert r.case == "serving" and r.speedup > 0 and e["tokens_per_s"] > 0 and e["reference_tokens_per_s"] > 0
        assert abs(r.speedup - e["reference_seconds"] / r.seconds) < 1e-9
    assert recs[0].extra["greedy_equal_to_reference"] == 3        # fp32: the same tokens as the peer
    assert recs[1].extra["kv_bytes"] < recs[0].extra["kv_bytes"] / 3   # int8 codes + one scale per row
    text = format_serving(recs)
    assert "Serving (P10" in text and "int8" in text
