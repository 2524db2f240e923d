"""The model-level judge of quantized KV (issue 19): perplexity of real text through the bridge.

The real-weights tests use SmolLM2-135M-Instruct (``tools/export_real_model.sh``; skipped with the
reason when it is absent, a failure under ``KVCL_REQUIRE_REAL_MODEL=1``) on
:func:`kvcl.onnx.perplexity.english_corpus` (eight segments, each its own sequence, pooled),
through the rows ``kvcl bench --perplexity`` prints: fp32 KV through the bridge equals the
original export fed past_key_values to 1e-4 relative (the harness), fp16 stays within +0.2 % of
fp32 and int8 within +0.5 %, the cache in that dtype is what is read (the figure moves), and the
figure is one a 135M model gives on English (a broken harness gives ~the vocabulary size). int4
does not meet its +3 % (pooled +4.59 %, segments +2.91 to +7.28 %): its bound test is an expected
failure that turns red when int4 meets it (so the docs get the new figure), and a guard holds
int4 to what it measured. The fixture tests check the harness (chunking, scoring,
int8/fp8 read back) and the argument errors without the real model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bridge_fixtures import fixture_path, require_onnx

require_onnx()

CHUNK = 128


# ---- the harness on a fixture (no real model needed) --------------------------------------

@pytest.fixture(scope="module")
def tiny_ids():
    rng = np.random.default_rng(3)
    return rng.integers(0, 128, 70).tolist()    # vocab 128; 70 = 2 chunks of 32 + 6


@pytest.mark.parametrize("route", ["llama_dynamo18", "llama_genai_gqa"])   # kvcl::Attention, ::AttentionQKV
def test_fixture_bridge_equals_past_key_values(onnx_device, tiny_ids, route):
    from kvcl.onnx.perplexity import perplexity, reference_perplexity, token_nll
    path = fixture_path(route)
    ref = reference_perplexity(path, tiny_ids, chunk=32)
    got = perplexity(path, tiny_ids, kv_dtype="fp32", chunk=32, device=onnx_device)
    assert got.tokens == ref.tokens == len(tiny_ids) - 1
    assert got.ids_sha256 == ref.ids_sha256 and got.route == "bridge" and ref.route == "past_key_values"
    assert abs(got.ppl / ref.ppl - 1) <= 1e-4, (got.ppl, ref.ppl)
    # the chunking changes nothing: one chunk per token and one chunk for all
    for chunk in (1, 200):
        again = perplexity(path, tiny_ids, chunk=chunk, device=onnx_device)
        assert abs(again.nll_sum / got.nll_sum - 1) <= 1e-5, (chunk, again.nll_sum, got.nll_sum)
    # the scoring itself: the original model's logits of the whole text at once, scored here
    from kvcl.onnx import ReferenceRunner
    runner = ReferenceRunner(path)
    logits, _ = runner.step(np.array([tiny_ids]), runner.empty_past(1), 0)
    x = logits[0, :-1].astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    direct = -np.log(p[np.arange(len(tiny_ids) - 1), tiny_ids[1:]]).sum()
    assert token_nll(logits[0, :-1], np.array(tiny_ids[1:])) == pytest.approx(direct, rel=1e-12)
    assert ref.nll_sum == pytest.approx(direct, rel=1e-5)


def test_fixture_segments_are_sequences_of_their_own(onnx_device, tiny_ids):
    # several segments: each from an empty cache (its first token unscored), pooled; a segment's
    # figure is the one it gives alone, on both routes
    from kvcl.onnx.perplexity import perplexity, reference_perplexity
    path = fixture_path("llama_dynamo18")
    a, b = tiny_ids[:40], tiny_ids[40:]
    for route in ("bridge", "past_key_values"):
        def run(text, **kw):
            if route == "bridge":
                return perplexity(path, text, chunk=16, device=onnx_device, **kw)
            return reference_perplexity(path, text, chunk=16)
        both, alone_a, alone_b, whole = run([a, np.asarray(b)]), run(a), run(b), run(tiny_ids)
        assert both.tokens == len(a) - 1 + len(b) - 1 == whole.tokens - 1
        assert both.segments == ((len(a) - 1, pytest.approx(alone_a.nll_sum, rel=1e-6)),
                                 (len(b) - 1, pytest.approx(alone_b.nll_sum, rel=1e-6)))
        assert both.nll_sum == pytest.approx(alone_a.nll_sum + alone_b.nll_sum, rel=1e-6)
        assert both.nll_sum != pytest.approx(whole.nll_sum, rel=1e-6)   # b's start sees none of a
        assert both.ids_sha256 not in (whole.ids_sha256, alone_a.ids_sha256)
        assert run([tiny_ids]).ids_sha256 == whole.ids_sha256        # one segment: the plain hash
    base = perplexity(path, [a, b], chunk=16, device=onnx_device)
    q = perplexity(path, [a, b], kv_dtype="int8", chunk=16, device=onnx_device)
    d = q.segment_deltas(base)
    expect = [np.exp((q.segments[i][1] - base.segments[i][1]) / q.segments[i][0]) - 1 for i in (0, 1)]
    assert d == pytest.approx(expect, rel=1e-12) and d[0] != d[1]
    assert q.delta_stderr(base) == pytest.approx(abs(d[0] - d[1]) / 2, rel=1e-9)   # sd of two / sqrt(2)
    assert base.segment_deltas(base) == [0.0, 0.0] and base.delta_stderr(base) == 0.0
    one = perplexity(path, a, kv_dtype="int8", chunk=16, device=onnx_device)
    assert one.delta_stderr(perplexity(path, a, chunk=16, device=onnx_device)) is None
    with pytest.raises(Exception, match="other token ids"):
        q.segment_deltas(one)


def test_english_corpus_segments():
    import kvcl
    from kvcl.onnx.perplexity import TEXT_SEGMENTS, english_corpus, english_text
    corpus = english_corpus()
    assert len(corpus.texts) == len(TEXT_SEGMENTS) == 8 and corpus.texts[0] == english_text()
    assert [t.name for t in corpus.texts][1] == "pydoc_data.topics[execmodel]"
    assert len({t.sha256 for t in corpus.texts}) == 8 and corpus.sha256 not in {t.sha256 for t in corpus.texts}
    assert english_corpus([("try",)]).texts[0].text == english_text(("try",)).text
    for bad, match in [([], "non-empty"), ("objects", "non-empty"), (["objects"], "each segment"),
                       ([("objects",), ("no-such-topic",)], "topics")]:
        with pytest.raises(kvcl.InvalidArgument, match=match):
            english_corpus(bad)


def test_fixture_quantized_cache_is_read(onnx_device, tiny_ids):
    # int8 / fp8 KV move the figure: were the chunk attending to its fp32 inputs, they would not
    from kvcl.onnx.perplexity import perplexity
    path = fixture_path("llama_dynamo18")
    base = perplexity(path, tiny_ids, chunk=32, device=onnx_device)
    for dt in ("int8", "fp8_e5m2"):
        q = perplexity(path, tiny_ids, kv_dtype=dt, chunk=32, device=onnx_device)
        assert q.kv_dtype == dt and q.nll_sum != base.nll_sum, dt
        assert q.kv_bytes_per_token < base.kv_bytes_per_token
    assert base.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4       # layers x K,V x kv heads x D x 4


def test_bad_arguments_are_refused_naming_them(onnx_device, tiny_ids):
    import kvcl
    from kvcl.onnx import Generator
    from kvcl.onnx.perplexity import PerplexityResult, english_text, perplexity, reference_perplexity, within_bound
    path = fixture_path("llama_dynamo18")
    cases = [
        (dict(text=tiny_ids, chunk=0), kvcl.OutOfRangeError, "chunk: expected >= 1, got 0"),
        (dict(text=tiny_ids, chunk=2.5), kvcl.DtypeError, "chunk: expected an int"),
        (dict(text=tiny_ids, chunk=True), kvcl.DtypeError, "chunk: expected an int"),
        (dict(text=tiny_ids, kv_dtype="int3"), kvcl.InvalidArgument, "kv_dtype: expected one of fp32"),
        (dict(text=[5]), kvcl.InvalidArgument, "at least 2 tokens"),
        (dict(text=[]), kvcl.InvalidArgument, "at least 2 tokens"),
        (dict(text=[1, -2, 3]), kvcl.OutOfRangeError, "got -2 at index 1"),
        (dict(text=[1, 2, 128]), kvcl.OutOfRangeError, r"\[0, 128\), got 128 at index 2"),
        (dict(text=[1, 2.0, 3]), kvcl.DtypeError, "float at index 1"),
        (dict(text=np.zeros((2, 3), np.int64)), kvcl.DtypeError, r"token ids \[N\]"),
        (dict(text=42), kvcl.DtypeError, "a str, an EnglishText, an EnglishCorpus, a list of token ids or a "
                                         "list of segments, got int"),
        (dict(text=[[1, 2, 3], [4, 200]]), kvcl.OutOfRangeError, r"got 200 at index 1"),
        (dict(text=[[1, 2, 3], [4]]), kvcl.InvalidArgument, "at least 2 tokens"),
        (dict(text="no tokenizer beside this fixture"), kvcl.InvalidArgument, "tokenizer: text given"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            perplexity(path, device=onnx_device, **kw)
    with pytest.raises(kvcl.OutOfRangeError, match="got 128 at index 2"):
        reference_perplexity(path, [1, 2, 128])
    with pytest.raises(kvcl.OutOfRangeError, match="chunk"):
        reference_perplexity(path, tiny_ids, chunk=-1)
    with pytest.raises(kvcl.InvalidArgument, match="topics"):
        english_text(("objects", "no-such-topic"))
    gen = Generator(path, kv_dtype="int8", device=onnx_device, max_tokens=32)
    try:
        with pytest.raises(kvcl.InvalidArgument, match="stores int8 KV, got kv_dtype='fp32'"):
            perplexity(gen, tiny_ids, kv_dtype="fp32")
        with pytest.raises(kvcl.InvalidArgument, match="70 tokens need 5 blocks.*max_tokens=32"):
            perplexity(gen, tiny_ids, kv_dtype=None)
        free = gen.cache.num_free_blocks
        small = perplexity(gen, tiny_ids[:30], kv_dtype=None)       # a Generator is reused ...
        assert small.kv_dtype == "int8" and gen.cache.num_free_blocks == free   # ... and left empty
    finally:
        gen.close()
    other = perplexity(path, tiny_ids[:20], device=onnx_device)
    with pytest.raises(kvcl.InvalidArgument, match="other token ids"):
        within_bound(small, other)
    with pytest.raises(kvcl.DtypeError, match="base: expected a PerplexityResult"):
        small.delta(1.0)
    nan = PerplexityResult("int8", "bridge", float("nan"), 29, 8, 0.0, 1, None, None, small.ids_sha256)
    assert within_bound(nan, small)[2] is False          # a broken measure is outside the bound


# ---- the real model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_records(real_model, onnx_device):
    """The rows of ``kvcl bench --perplexity``: the English segments through the original model fed
    past_key_values, then through the bridge in fp32, fp16, int8 and int4 KV (the model read and
    rewritten once; one Generator per dtype)."""
    pytest.importorskip("tokenizers")
    from kvcl.bench_bridge import perplexity_records
    records = perplexity_records(real_model, onnx_device, kv_dtypes=("fp16", "int8", "int4"), chunk=CHUNK,
                                 print_fn=lambda msg: None)
    return {("reference" if r.shape["route"] == "past_key_values" else r.kv_dtype): r for r in records}


def test_real_fp32_bridge_equals_the_original_model(real_records, real_model):
    from kvcl.onnx.perplexity import TEXT_SEGMENTS, english_corpus
    from kvcl.tokenizer import Tokenizer
    assert list(real_records) == ["reference", "fp32", "fp16", "int8", "int4"]   # fp32 added: the base
    fp32, ref = real_records["fp32"], real_records["reference"]
    text = english_corpus()
    tok = Tokenizer(real_model.parent)
    scored = sum(len(tok.encode(t.text, add_special_tokens=False)) - 1 for t in text.texts)
    for r in real_records.values():
        assert r.shape["text"] == text.name and r.shape["text_sha256"] == text.sha256
        assert r.shape["segments"] == [t.name for t in text.texts] and len(r.shape["segments"]) == len(TEXT_SEGMENTS)
        assert r.shape["scored_tokens"] == scored > 10000 and r.extra["ids_sha256"] == fp32.extra["ids_sha256"]
        assert len(r.extra["segment_deltas"]) == len(TEXT_SEGMENTS)
    rel = abs(fp32.extra["ppl"] / ref.extra["ppl"] - 1)
    assert rel <= 1e-4, (fp32.extra["ppl"], ref.extra["ppl"])
    assert max(map(abs, ref.extra["segment_deltas"])) <= 1e-4        # every segment, not only the pool
    assert ref.extra["delta_vs_fp32"] == pytest.approx(ref.extra["ppl"] / fp32.extra["ppl"] - 1)
    print(f"{text.name} ({fp32.shape['scored_tokens']} tokens scored): original {ref.extra['ppl']:.4f}, "
          f"bridge fp32 {fp32.extra['ppl']:.4f}, relative {rel:.1e}")


def test_real_perplexity_is_that_of_a_small_model_reading_english(real_records):
    ppl = real_records["fp32"].extra["ppl"]
    assert 2 < ppl < 100, ppl                     # uniform over 49152 tokens would be 49152


#: int4 does not meet its bound (issue 19): pooled +4.59 % on SmolLM2, standard error 0.50 %
INT4_OVER = pytest.mark.xfail(strict=True, reason="int4 (rotated rows, per-token asymmetric codes) loses +4.59 % "
                              "pooled on SmolLM2, over its +3 % bound (issue 19; docs/formats.md lists what would "
                              "meet it): red once it passes, so the docs get the new figure")


@pytest.mark.parametrize("dtype", ["fp16", "int8", pytest.param("int4", marks=INT4_OVER)])
def test_real_quantized_kv_within_its_bound(real_records, dtype):
    got, base = real_records[dtype], real_records["fp32"]
    e = got.extra
    assert e["ppl_bound"] == {"fp16": 0.002, "int8": 0.005, "int4": 0.03}[dtype]
    print(f"{dtype}: ppl {e['ppl']:.4f} vs fp32 {base.extra['ppl']:.4f}: {100 * e['delta_vs_fp32']:+.3f}% "
          f"± {100 * e['delta_stderr']:.2f}% (segments {', '.join(f'{100 * d:+.2f}' for d in e['segment_deltas'])}; "
          f"bound +{100 * e['ppl_bound']:.1f}%), {e['kv_bytes_per_token']} KV bytes/token vs "
          f"{base.extra['kv_bytes_per_token']}")
    assert e["delta_stderr"] > 0                   # eight segments, not one draw
    assert e["within_bound"] is True and e["delta_vs_fp32"] <= e["ppl_bound"], (dtype, e)
    assert e["nll_sum"] != base.extra["nll_sum"]   # the cache in this dtype is what was read
    assert math.isfinite(e["ppl"])
    assert e["kv_bytes_per_token"] == {"fp16": 2 * 30 * 3 * 64 * 2, "int8": 2 * 30 * 3 * (64 + 4),
                                       "int4": 2 * 30 * 3 * (32 + 4)}[dtype]


def test_real_int4_loses_no_more_than_measured(real_records):
    # the guard while int4 is over its bound: pooled +4.59 % (s.e. 0.50 %) when measured; a
    # change of arithmetic moves it within the noise, a broken format far beyond
    e, base = real_records["int4"].extra, real_records["fp32"].extra
    assert 0 < e["delta_vs_fp32"] <= 0.06, e["delta_vs_fp32"]
    assert e["nll_sum"] != base["nll_sum"] and math.isfinite(e["ppl"])


def test_real_perplexity_table(real_records):
    from kvcl.bench import format_records
    text = format_records(list(real_records.values()), "a device")
    assert "Perplexity (issue 19)" in text and "original (past_key_values)" in text and "± s.e." in text
    assert text.count("pass") == 3 and text.count("FAIL") == 1   # the harness, fp16, int8; int4 over its bound
    assert "kvcl int4" in next(line for line in text.splitlines() if "FAIL" in line)
    print(text)


# ---- the bench options -------------------------------------------------------------------

def test_bench_perplexity_skips_a_model_not_exported(tmp_path, monkeypatch):
    from kvcl.bench_bridge import perplexity_records
    monkeypatch.setenv("KVCL_MODEL_DIR", str(tmp_path / "models"))
    said = []
    assert perplexity_records("smollm2", None, print_fn=said.append) == []
    assert "skipping the smollm2 perplexity case" in said[0] and "tools/export_real_model.sh" in said[0]


@pytest.mark.parametrize("argv,match", [(["--perplexity-kv-dtypes", "int3"], "perplexity_kv_dtypes: expected names"),
                                        (["--perplexity-chunk", "0"], "perplexity_chunk: expected >= 1")])
def test_bench_perplexity_options_refused_before_any_case(onnx_device, monkeypatch, capsys, argv, match):
    import kvcl
    from kvcl import bench
    from kvcl.cli import main

    def no_case(*args, **kwargs):
        raise AssertionError("a case ran before the options were checked")
    monkeypatch.setattr(bench, "StreamReader", no_case)
    spec = next(d.index for d in kvcl.devices() if d.name == onnx_device.info.name)
    assert main(["bench", "--quick", "--device", spec, "--perplexity", "smollm2", *argv]) == 2
    assert match in capsys.readouterr().err


def test_bench_perplexity_needs_a_tokenizer():
    import kvcl
    from kvcl.bench_bridge import perplexity_records
    with pytest.raises(kvcl.InvalidArgument, match="no tokenizer.json beside"):
        perplexity_records(fixture_path("llama_dynamo18"), None, print_fn=lambda m: None)
