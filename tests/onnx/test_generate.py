"""End to end: each exported route through the bridge equals the original model in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from bridge_fixtures import MANIFEST, ROUTES, fixture_path, require_onnx

require_onnx()

STEPS = 32
PROMPT = [5, 17, 33, 9, 100, 4, 61, 88, 12]
_GEN: dict = {}
_REF: dict = {}


def generator(route, device, kv_dtype="fp32"):
    from kvcl.onnx import Generator
    key = (route, kv_dtype)
    if key not in _GEN:
        _GEN[key] = Generator(fixture_path(route), kv_dtype=kv_dtype, device=device, max_tokens=1024)
    return _GEN[key]


def reference(route, prompt=tuple(PROMPT), steps=STEPS):
    from kvcl.onnx import ReferenceRunner
    key = (route, tuple(prompt), steps)
    if key not in _REF:
        _REF[key] = ReferenceRunner(fixture_path(route)).generate(list(prompt), steps)
    return _REF[key]


def test_fixtures_present():
    assert {"llama_dynamo18", "llama_torchscript", "qwen3_dynamo18", "qwen3_torchscript", "llama_dynamo23",
            "llama_genai_gqa", "llama_optimum"} <= set(ROUTES)


@pytest.mark.parametrize("route", ROUTES)
def test_route_matches_original(route, onnx_device):
    """Greedy tokens equal and max logit difference <= 1e-4 over 32 steps (fp32 KV)."""
    ref = reference(route)
    got = generator(route, onnx_device).generate([PROMPT], STEPS, return_logits=True)
    assert got.tokens.shape == (1, STEPS) and got.logits.shape == ref.logits.shape
    diff = float(np.abs(got.logits - ref.logits).max())
    print(f"{route}: max logit diff {diff:.2e} over {STEPS} steps (logit scale {np.abs(ref.logits).max():.2f})")
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    assert diff <= 1e-4
    # the comparison is sensitive: the model's greedy output is not a constant cycle
    assert len(set(ref.tokens[0].tolist())) > 8


@pytest.mark.parametrize("route", ["llama_dynamo18"])
def test_wrong_scale_is_detected(route, onnx_device):
    """Sanity: the fixtures' attention is peaky enough that a 10% scale error shows in the logits."""
    import onnx

    from kvcl.onnx import Generator, rewrite
    m = rewrite(fixture_path(route))
    for n in m.graph.node:
        if n.op_type == "Attention" and n.domain == "kvcl":
            for a in n.attribute:
                if a.name == "scale":
                    a.f *= 1.1
    gen = Generator(m, device=onnx_device, max_tokens=256)
    try:
        got = gen.generate([PROMPT], 8, return_logits=True)
    finally:
        gen.close()
    ref = reference(route, steps=STEPS)
    assert float(np.abs(got.logits - ref.logits[:, :8]).max()) > 1e-2
    assert isinstance(m, onnx.ModelProto)


@pytest.mark.parametrize("kv_dtype", ["fp16", "int8", "fp8_e4m3", "fp8_e5m2", "int4"])
def test_quantized_kv_logit_error(kv_dtype, onnx_device):
    """Reported, with loose bounds: int8 / fp8 change the logits but not wildly."""
    route = "llama_dynamo18"
    ref = reference(route)
    got = generator(route, onnx_device, kv_dtype).generate([PROMPT], STEPS, return_logits=True)
    diff = np.abs(got.logits - ref.logits)
    # compare logits only up to the first token that differs (after it the inputs differ)
    same = np.cumprod(got.tokens[0] == ref.tokens[0])
    upto = int(same.sum()) + 1 if same.sum() < STEPS else STEPS
    err = float(diff[0, :upto].max())
    rel = err / float(np.abs(ref.logits).max())
    print(f"{kv_dtype}: max logit diff {err:.3e} (rel {rel:.2e}) over the first {upto} steps; "
          f"tokens equal for {int(same.sum())}/{STEPS}")
    assert np.isfinite(got.logits).all()
    bound = {"fp16": 1e-2, "int8": 0.1, "fp8_e4m3": 0.5, "fp8_e5m2": 1.0, "int4": 1.0}[kv_dtype]
    assert rel < bound


def test_batched_prompts_equal_each_alone(onnx_device):
    """Different-length prompts generated together equal each generated alone."""
    gen = generator("qwen3_dynamo18", onnx_device)
    prompts = [[7, 8, 9], PROMPT, [44] * 13 + [2, 3], [120]]
    together = gen.generate(prompts, 12, return_logits=True)
    assert together.tokens.shape == (4, 12)
    for i, p in enumerate(prompts):
        alone = gen.generate([p], 12, return_logits=True)
        np.testing.assert_array_equal(together.tokens[i], alone.tokens[0])
        assert float(np.abs(together.logits[i] - alone.logits[0]).max()) <= 1e-5
    # and each equals the original model
    ref = reference("qwen3_dynamo18", prompts[2], 12)
    np.testing.assert_array_equal(together.tokens[2], ref.tokens[0])
    assert float(np.abs(together.logits[2] - ref.logits[0]).max()) <= 1e-4


def test_stream_and_callback(onnx_device):
    gen = generator("llama_torchscript", onnx_device)
    prompts = [[3, 4, 5], [6, 7]]
    full = gen.generate(prompts, 6)
    seen = []
    streamed = list(gen.stream(prompts, 6))
    gen.generate(prompts, 6, callback=lambda out: seen.append(out.tokens.copy()))
    assert [s.index for s in streamed] == list(range(6))
    np.testing.assert_array_equal(np.stack([s.tokens for s in streamed], 1), full.tokens)
    np.testing.assert_array_equal(np.stack(seen, 1), full.tokens)
    assert gen.cache.sequences == []  # every sequence freed
    # an abandoned stream frees its sequences too
    it = gen.stream(prompts, 6)
    next(it)
    it.close()
    assert gen.cache.sequences == []


def test_sampling(onnx_device):
    gen = generator("llama_torchscript", onnx_device)
    a = gen.generate([PROMPT], 10, do_sample=True, temperature=0.8, top_k=5, seed=3)
    b = gen.generate([PROMPT], 10, do_sample=True, temperature=0.8, top_k=5, seed=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.tokens.min() >= 0 and a.tokens.max() < MANIFEST["llama_torchscript"]["vocab_size"]
    g1 = gen.generate([PROMPT], 10, do_sample=True, top_k=1, seed=5)  # top_k=1 is greedy
    np.testing.assert_array_equal(g1.tokens, reference("llama_torchscript").tokens[:, :10])


def test_rewritten_model_round_trip(tmp_path, onnx_device):
    import onnx

    from kvcl.onnx import Generator, rewrite
    path = tmp_path / "m.kvcl.onnx"
    onnx.save(rewrite(fixture_path("qwen3_torchscript")), str(path))
    gen = Generator(path, device=onnx_device, max_tokens=256)
    try:
        got = gen.generate([PROMPT], 8, return_logits=True)
    finally:
        gen.close()
    ref = reference("qwen3_torchscript")
    np.testing.assert_array_equal(got.tokens, ref.tokens[:, :8])
    assert float(np.abs(got.logits - ref.logits[:, :8]).max()) <= 1e-4


def test_bad_arguments(onnx_device):
    from kvcl import InvalidArgument
    gen = generator("llama_torchscript", onnx_device)
    with pytest.raises(InvalidArgument, match="input_ids"):
        gen.generate([], 3)
    with pytest.raises(InvalidArgument, match="empty prompt"):
        gen.generate([[1, 2], []], 3)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        gen.generate([[1] * 1000, [2] * 100], 3)
    assert gen.generate([[1, 2]], 0).tokens.shape == (1, 0)
    assert gen.cache.sequences == []


def test_kvcl_session_workers_spin_at_the_lowest_priority(onnx_device):
    # onnxruntime's intra-op workers keep spinning between nodes (short steps want no wake-up
    # per node), but on a CPU device they run at nice 19, so that a long step's PoCL threads
    # win the cores from them (synthetic decoder, 4096 tokens: 9.5-12.6 ms spinning at nice 0,
    # 7.4-7.9 ms at 19); the reference session keeps onnxruntime's defaults
    import os
    import sys

    from kvcl.onnx import Generator, ReferenceRunner
    entry = "session.intra_op.allow_spinning"
    mine = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None
    gen = Generator(fixture_path("llama_dynamo18"), device=onnx_device, max_tokens=64)
    try:
        with pytest.raises(RuntimeError, match="does not have"):   # not set: spinning, the default
            gen.session.get_session_options().get_session_config_entry(entry)
        cpu = bool(onnx_device.device.type & 2)
        if cpu and sys.platform.startswith("linux"):
            assert gen.session.kvcl_worker_threads, "the session's worker threads were not found"
            for tid in gen.session.kvcl_worker_threads:
                assert os.getpriority(os.PRIO_PROCESS, tid) == 19
            assert os.getpriority(os.PRIO_PROCESS, 0) == mine     # the caller's thread untouched
        elif not cpu:
            assert gen.session.kvcl_worker_threads == []
        assert gen.generate([PROMPT], 4).tokens.shape == (1, 4)
    finally:
        gen.close()
    off = Generator(fixture_path("llama_dynamo18"), device=onnx_device, max_tokens=64, worker_nice=None)
    try:
        assert off.session.kvcl_worker_threads == []
    finally:
        off.close()
    with pytest.raises(Exception, match="worker_nice"):
        Generator(fixture_path("llama_dynamo18"), device=onnx_device, max_tokens=64, worker_nice=25)
    ref = ReferenceRunner(fixture_path("llama_dynamo18"))
    with pytest.raises(RuntimeError, match="does not have"):
        ref.session.get_session_options().get_session_config_entry(entry)


def test_bench_decoder_through_the_bridge_matches_onnxruntime(onnx_device):
    # kvcl bench's synthetic decoder (GroupQueryAttention route, RoPE): what the bridge runs
    # equals onnxruntime's GroupQueryAttention, token for token, logits within 1e-4
    from kvcl.onnx import Generator, ReferenceRunner, model_info, rewrite
    from kvcl.onnx.benchmodel import gqa_decoder
    small = gqa_decoder(num_layers=2, num_heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=64,
                        max_positions=256)
    prompt = [t % 64 for t in PROMPT]
    ref = ReferenceRunner(small).generate(prompt, 16)
    gen = Generator(small, device=onnx_device, max_tokens=64)
    try:
        got = gen.generate([prompt], 16, return_logits=True)
    finally:
        gen.close()
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    assert float(np.abs(got.logits - ref.logits).max()) <= 1e-4
    assert len(set(ref.tokens[0].tolist())) > 4          # not a constant cycle
    info = model_info(rewrite(gqa_decoder(max_positions=64)))   # the bench's own size
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"]) == (4, 8, 128)
    import kvcl
    for kw, match in (({"num_heads": 6, "kv_heads": 4}, "num_heads"), ({"head_dim": 15}, "head_dim"),
                      ({"num_layers": 0}, "num_layers")):
        with pytest.raises(kvcl.KvclError, match=match):
            gqa_decoder(**kw)
