"""kvcl bench runs end to end and says what it measured (no timing assertions: speed is
reported by `kvcl bench`, never asserted in unit tests)."""

import json

import numpy as np

import pytest

import kvcl
from kvcl import bench
from kvcl.cli import main
from kvcl.ops import decode_attention as attention_ops


def test_bytes_formula_matches_targets_md():
    # Σ L·Hkv·(2·D·bytes + 2·scale_bytes): B=4, L=2048, Hkv=8, D=128
    kv = 4 * 2048 * 8 * 2 * 128 * 4
    assert bench.decode_bytes(bench.TARGET, "fp32") - kv == 4 * (4 * 128 + 2 * 4 + 1 + 4 + 1) + 2 * 4 * 32 * 128 * 4
    kv8 = 4 * 2048 * 8 * (2 * 128 + 2 * 4)
    assert bench.decode_bytes(bench.TARGET, "int8") - kv8 == bench.decode_bytes(bench.TARGET, "fp32") - kv


def test_quick_bench_json_and_plot(device, tmp_path, capsys):
    spec = next(d.index for d in __import__("kvcl").devices() if d.name == device.info.name)
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", "--quick", "--repeats", "2", "--device", spec, "--json", str(out_json),
                 "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "stream_read" in printed and "paged_decode" in printed
    doc = json.loads(out_json.read_text())
    cases = {(r["case"], r["kv_dtype"]) for r in doc["records"]}
    assert {("paged_decode", d) for d in ("fp32", "fp16", "int8", "fp8_e4m3", "fp8_e5m2", "int4")} <= cases
    assert {("paged_write", "fp32"), ("paged_write", "int4")} <= cases
    # int4 moves half int8's K/V bytes (+ the same scales): the bytes column counts d / 2 a row
    w = {r["kv_dtype"]: r for r in doc["records"] if r["case"] == "paged_write"}
    assert w["fp32"]["bytes"] - w["int4"]["bytes"] == 64 * 2 * 2 * (64 * 4 - (32 + 4))
    for r in doc["records"]:
        for key in ("case", "kv_dtype", "shape", "seconds", "bytes", "gbps", "device_read_gbps", "utilization"):
            assert key in r
        if r["peer"] and r["seconds"] == r["seconds"]:
            assert r["speedup"] > 0
        if r["case"] in ("paged_decode", "paged_write"):   # the samples' range brackets the median
            lo, hi = r["extra"]["seconds_range"]
            assert lo <= r["seconds"] <= hi
            lo, hi = r["extra"]["read_gbps_range"]
            assert 0 < lo <= hi
            assert r["utilization"] == pytest.approx(r["gbps"] / r["device_read_gbps"])
        if r["case"] == "paged_decode" and r["kv_dtype"] != "fp32":   # sampled in turn with fp32
            assert r["extra"]["speedup_vs_fp32"] > 0
        if r["case"] == "paged_decode":   # what bounds it, measured in the same run
            ex = r["extra"]
            floor = max(ex["compute_seconds"], ex["memory_seconds"])
            assert ex["compute_fraction"] > 0
            assert ex["compute_seconds"] == pytest.approx(ex["compute_fraction"] * r["seconds"])
            assert ex["memory_seconds"] == pytest.approx(r["bytes"] / r["device_read_gbps"] / 1e9)
            assert ex["bound"] == ("compute" if ex["compute_seconds"] > ex["memory_seconds"] else "memory")
            assert 0 < ex["utilization_ceiling"] <= 1
            assert ex["utilization_ceiling"] == pytest.approx(ex["memory_seconds"] / floor)
            if r["kv_dtype"] != "fp32":
                assert ex["speedup_vs_fp32_ceiling"] == pytest.approx(ex["speedup_vs_fp32"] * r["seconds"] / floor)
    # int8: a row per path (float and integer logits), each against fp32; "auto" picks one of them
    int8 = [r for r in doc["records"] if r["case"] == "paged_decode" and r["kv_dtype"] == "int8"]
    assert sorted(r["extra"]["int8_dot"] for r in int8) == ["float", "integer"]
    assert sum(r["extra"]["int8_dot_auto"] for r in int8) == 1
    assert "int8 integer" in printed and "int8 float" in printed
    # int4 likewise where its integer path exists (the serial kernel), float logits alone elsewhere
    int4 = [r for r in doc["records"] if r["case"] == "paged_decode" and r["kv_dtype"] == "int4"]
    serial = attention_ops.variant_for(device.queue.device) == "serial"
    assert sorted(r["extra"]["int8_dot"] for r in int4) == (["float", "integer"] if serial else ["float"])
    auto = attention_ops.int8_dot_for(device.queue.device, kv_dtype="int4", context=device.context)
    assert [r["extra"]["int8_dot"] for r in int4 if r["extra"]["int8_dot_auto"]] == [auto]
    fp32 = next(r for r in doc["records"] if r["case"] == "paged_decode" and r["kv_dtype"] == "fp32")
    for r in doc["records"]:
        if r["peer"] in ("onnxruntime_gqa", "numpy") and r["speedup"] == r["speedup"] and r["kv_dtype"] == "fp32":
            assert r["extra"]["speedup_ceiling"] == pytest.approx(r["seconds"] / fp32["extra"]["memory_seconds"])
    # onnxruntime's quantized caches: a row each, timed against kvcl's decode of that dtype (or
    # refused by an older onnxruntime, with the reason in the note)
    ort = {r["kv_dtype"]: r for r in doc["records"] if r["peer"] == "onnxruntime_gqa"}
    assert sorted(ort) == ["fp32", "int4", "int8"]
    for dt in ("int8", "int4"):
        r = ort[dt]
        assert (r["speedup"] is not None and r["speedup"] > 0 and f"kvcl {dt} paged_decode" in r["note"]) \
            or "does not" in r["note"], r
    assert "bound" in printed and "<=" in printed
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("dtype_name", ["fp32", "int8"])
def test_decode_case_in_cache_reads_only_its_first_blocks(device, dtype_name):
    from kvcl.reference.decode_attention import paged_attention as reference
    case = bench.DecodeCase(device, bench.QUICK, dtype_name)
    twin = case.in_cache(2)
    pages = twin.indices.get()
    assert pages.shape == case.indices.shape and pages.min() >= 0 and pages.max() < 2
    assert len(set(pages.tolist())) == 2            # both blocks, in random order
    assert twin.pools is case.pools and twin.out is not case.out
    twin.run().wait()
    (k, ks), (v, vs) = case.pools
    # the path the bench's case runs (int8: integer logits where they measured faster)
    int8_dot = bench.attention_ops.int8_dot_for(device.device, head_dim=bench.QUICK.head_dim, kv_dtype=dtype_name,
                                                context=device.context)
    want = reference(case.queries.get(), k.get(), v.get(), case.indptr.get(), pages, case.last_page_len.get(),
                     case.q_indptr.get(), k_scales=None if ks is None else ks.get(),
                     v_scales=None if vs is None else vs.get(), kv_dtype=dtype_name, int8_dot=int8_dot)
    got = twin.out.get()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    case.run().wait()   # the case itself still reads its own table
    assert not np.array_equal(case.out.get(), got)
    with pytest.raises(kvcl.InvalidArgument, match="blocks"):
        case.in_cache(0)


def test_blocked_sampling_divides_by_the_first_read(device, tmp_path, capsys):
    spec = next(d.index for d in __import__("kvcl").devices() if d.name == device.info.name)
    out_json = tmp_path / "b.json"
    assert main(["bench", "--quick", "--repeats", "2", "--sampling", "blocked", "--device", spec,
                 "--json", str(out_json)]) == 0
    assert "each case timed on its own" in capsys.readouterr().out
    records = json.loads(out_json.read_text())["records"]
    assert records[0]["extra"]["sampling"] == "blocked"
    for r in records[1:]:
        if r["peer"] is None:
            assert r["device_read_gbps"] == records[0]["gbps"]
    with pytest.raises(kvcl.InvalidArgument, match="sampling"):
        bench.run_bench(device, quick=True, sampling="random")


def test_interleaved_samples_take_every_job_once_per_round_in_random_orders():
    # a fixed order biased whichever job followed the streaming read (1.12x on the dev VM)
    log: list[int] = []
    jobs = [((lambda i=i: log.append(i)), lambda: None) for i in range(4)]
    times = bench.sample_interleaved(jobs, warmup=1, repeats=12, min_sample=0.0, max_inner=1)
    assert [len(t) for t in times] == [12] * 4
    samples = log[4:]   # after the 4 warm-up calls: each sample is an untimed lead-in call + 1
    assert len(samples) == 2 * 4 * 12 and samples[::2] == samples[1::2]
    rounds = [tuple(samples[8 * r: 8 * r + 8: 2]) for r in range(12)]
    assert all(sorted(r) == [0, 1, 2, 3] for r in rounds)
    assert len(set(rounds)) > 1 and len({r[0] for r in rounds}) > 1
    assert bench.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0


def test_onnxruntime_peer_threads_do_not_spin():
    # spinning onnxruntime threads slowed the kvcl sample taken after them: 5.1 vs 2.9 ms
    pytest.importorskip("onnxruntime")
    run = bench.ort_gqa_peer(bench.QUICK)
    options = run.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    run()


def test_decode_ab_tool_compares_versions(device, capsys):
    # tools/decode_ab.py: a git revision against the working tree and a knob, in one random-order run
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "tools" / "decode_ab.py"
    spec = importlib.util.spec_from_file_location("decode_ab", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from kvcl.ops import decode_plan as ops
    chunk = ops._SERIAL_CHUNK
    assert tool.main(["@HEAD", ".", ".:_SERIAL_CHUNK=8", "--device", device.info.name, "--cached", "2",
                      "--rounds", "2", "--batch", "2", "--kv-len", "40", "--q-heads", "4",
                      "--kv-heads", "2", "--head-dim", "32", "--dtype", "fp32", "int8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 4 and "vs first 1.000x" in lines[1]
    assert ops._SERIAL_CHUNK == chunk and ops.SOURCE == "decode_attention.cl"   # restored
    with pytest.raises(SystemExit, match="unknown knob"):
        tool.main([".:_NO_SUCH=1", "--cached", "1"])
