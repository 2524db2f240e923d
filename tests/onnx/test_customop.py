"""The kvcl::Attention op: fast numpy hook, errors re-raised in Python (the process survives),
registry lock, idempotent steps."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from bridge_fixtures import fixture_path, require_onnx

require_onnx()

PROMPT = [5, 17, 33, 9, 100, 4, 61]


def test_hook_returns_numpy():
    from kvcl.onnx import customop
    op = customop._opdef
    calls = []
    saved = op.body
    op.body = lambda *a, **k: calls.append(1) or np.arange(6, dtype=np.float64).reshape(2, 3)
    try:
        res = customop._hook(id(op), [np.zeros((2, 3), np.float32)], {"handle": "x", "layer": "0", "scale": "1.0"})
    finally:
        op.body = saved
    assert res[0] == id(op) and tuple(res[1]) == (2, 3)
    assert isinstance(res[2], np.ndarray) and res[2].dtype == np.float32 and res[2].ndim == 1
    assert calls == [1]


def test_op_error_raises_in_python_and_generator_recovers(onnx_device):
    from kvcl import InvalidArgument
    from kvcl.onnx import Generator, ReferenceRunner
    gen = Generator(fixture_path("llama_dynamo18"), device=onnx_device, max_tokens=256)
    try:
        seq = gen.cache.add_sequence()
        # a step whose past length disagrees with the cache: raised inside the op, in onnxruntime
        with pytest.raises(InvalidArgument, match="past lengths must equal"):
            gen._run([seq], [3], [[1, 2]])
        gen.cache.free(seq)
        # an unknown handle
        from kvcl.onnx import customop
        customop.unregister_cache(gen.handle)
        with pytest.raises(InvalidArgument, match="no kvcl cache is registered"):
            gen.generate([PROMPT], 2)
        customop.register_cache(gen.handle, gen.cache)
        # the process and the generator go on
        got = gen.generate([PROMPT], 6, return_logits=True)
        ref = ReferenceRunner(fixture_path("llama_dynamo18")).generate(PROMPT, 6)
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        assert gen.cache.sequences == []
    finally:
        gen.close()


def test_op_exception_does_not_kill_the_process(tmp_path):
    """Without the hook's catch, onnxruntime would call std::terminate (exit 134)."""
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np
        from kvcl.onnx import Generator, OpError, customop
        gen = Generator({str(fixture_path("llama_torchscript"))!r}, max_tokens=128)
        def boom(*a, **k):
            raise ZeroDivisionError("boom inside the op")
        saved = customop._opdef.body
        customop._opdef.body = boom
        try:
            gen.generate([[1, 2, 3]], 2)
        except OpError as exc:
            print("caught:", exc, "| cause:", type(exc.__cause__).__name__)
        customop._opdef.body = saved
        print("tokens after:", gen.generate([[1, 2, 3]], 2).tokens.tolist())
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       cwd=str(Path(__file__).resolve().parents[2]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "caught: kvcl::Attention failed: ZeroDivisionError: boom inside the op | cause: ZeroDivisionError" in r.stdout
    assert "tokens after:" in r.stdout


def test_repeated_step_is_idempotent(onnx_device):
    """Running the same step twice (same kvcl_step) rewrites the same slots: same logits."""
    from kvcl.onnx import Generator
    gen = Generator(fixture_path("qwen3_dynamo18"), device=onnx_device, max_tokens=256)
    try:
        seq = gen.cache.add_sequence()
        a = gen._run([seq], [0], [PROMPT])
        b = gen._run([seq], [0], [PROMPT])
        assert gen.cache.seq_len(seq) == len(PROMPT)
        np.testing.assert_array_equal(a, b)
        c = gen._run([seq], [len(PROMPT)], [[7]])
        assert gen.cache.seq_len(seq) == len(PROMPT) + 1 and np.isfinite(c).all()
        gen.cache.free(seq)
    finally:
        gen.close()


def test_threads_with_separate_caches_match_serial(onnx_device):
    """Two generators driven from two threads (ops serialised under the GIL, registry locked)."""
    from kvcl.onnx import Generator
    gens = [Generator(fixture_path(r), device=onnx_device, max_tokens=256)
            for r in ("llama_torchscript", "qwen3_torchscript")]
    try:
        prompts = [[3, 4, 5, 6], [9, 8]]
        serial = [g.generate(prompts, 10, return_logits=True) for g in gens]
        results = [None, None]
        errors = []

        def work(i):
            try:
                for _ in range(3):
                    results[i] = gens[i].generate(prompts, 10, return_logits=True)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for s, r in zip(serial, results):
            np.testing.assert_array_equal(s.tokens, r.tokens)
            np.testing.assert_array_equal(s.logits, r.logits)
    finally:
        for g in gens:
            g.close()


def test_register_cache_checks():
    from kvcl import InvalidArgument
    from kvcl.onnx import register_cache, unregister_cache
    with pytest.raises(InvalidArgument, match="handle"):
        register_cache("", object())
    a, b = object(), object()
    register_cache("kvcl-test-handle", a)
    try:
        register_cache("kvcl-test-handle", a)  # same cache: fine
        with pytest.raises(InvalidArgument, match="already registered"):
            register_cache("kvcl-test-handle", b)
    finally:
        unregister_cache("kvcl-test-handle")


def test_rope_tables_are_registered_once_not_passed_per_call(onnx_device):
    # The QKV route's RoPE tables are named by the op, registered on the binding by the Generator
    # (onnxruntime copies op inputs on every call: a 2-layer step took 26 ms with 131072-position
    # tables, 1.9 ms with 1024). A model rewritten the old way, tables as inputs, still runs.
    import onnx

    import kvcl
    from kvcl import InvalidArgument, PagedKVCache
    from kvcl.onnx import Generator, ReferenceRunner, customop, rewrite
    route = fixture_path("llama_genai_gqa")
    want = ReferenceRunner(route).generate(PROMPT, 8).tokens
    m = rewrite(route)
    old = onnx.ModelProto()
    old.CopyFrom(m)
    for n in old.graph.node:
        if n.op_type == customop.OP_TYPE_QKV_ROPE:
            a = {x.name: x for x in n.attribute}
            n.op_type = customop.OP_TYPE_QKV
            n.input.extend([a["cos_table"].s.decode(), a["sin_table"].s.decode()])
            n.attribute.remove(a["cos_table"])
            n.attribute.remove(a["sin_table"])
    for model in (m, old):
        gen = Generator(model, device=onnx_device, max_tokens=64)
        try:
            np.testing.assert_array_equal(gen.generate([PROMPT], 8).tokens, want)
            if model is m:   # device copies made at registration; no op call uploaded a table
                assert sorted(gen.binding.tables) == ["cos_cache", "sin_cache"]
                assert all(kvcl.validate.is_device_array(t) for t in gen.binding.tables.values())
                assert not gen.binding.__dict__.get("_tables")
            else:            # tables as op inputs: uploaded on the first call, then reused
                assert sorted(gen.binding.__dict__["_tables"]) == ["cos", "sin"]
        finally:
            gen.close()
    # without register_tables the op says what is missing; a table that is no initializer is refused
    cache = PagedKVCache(2, 2, 16, 8, 16, device=onnx_device)
    customop.register_cache("rope-test", cache)
    try:
        with pytest.raises(InvalidArgument, match="register_tables"):
            customop.kvcl_attention_qkv_rope(np.zeros((1, 1, 128), np.float32), np.zeros((3, 1), np.int64),
                                             "rope-test", 0, 0.25, 4, "half", "cos_cache", "sin_cache")
        assert customop.register_tables("rope-test", m) == ["cos_cache", "sin_cache"]
        kept = dict(customop.get_binding("rope-test").tables)
        bad = onnx.ModelProto()
        bad.CopyFrom(m)
        sin = next(t for t in bad.graph.initializer if t.name == "sin_cache")
        arr = onnx.numpy_helper.to_array(sin).copy()
        arr[3, 1] = np.nan
        sin.CopyFrom(onnx.numpy_helper.from_array(arr, "sin_cache"))
        with pytest.raises(kvcl.NonFiniteError, match="sin_cache"):
            customop.register_tables("rope-test", bad)
        assert customop.get_binding("rope-test").tables == kept   # nothing replaced by the refused call
        del m.graph.initializer[:]
        with pytest.raises(InvalidArgument, match="not initializers"):
            customop.register_tables("rope-test", m)
        with pytest.raises(kvcl.DtypeError, match="ModelProto"):
            customop.register_tables("rope-test", str(route))
    finally:
        customop.unregister_cache("rope-test")


def test_rope_tables_from_constant_nodes_become_one_initializer_each(onnx_device):
    # tables produced by Constant nodes (read by every layer) are stored once, not per layer
    from onnx import helper

    from kvcl.onnx import Generator, ReferenceRunner, rewrite
    from kvcl.onnx.benchmodel import gqa_decoder
    m = gqa_decoder(num_layers=3, num_heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=64, max_positions=128)
    inits = {t.name: t for t in m.graph.initializer}
    for name in ("cos_cache", "sin_cache"):
        m.graph.initializer.remove(inits[name])
        m.graph.node.insert(0, helper.make_node("Constant", [], [name], value=inits[name]))
    r = rewrite(m)
    tables = sorted(t.name for t in r.graph.initializer if "cache" in t.name)
    assert tables == ["kvcl_const_cos_cache", "kvcl_const_sin_cache"]
    want = ReferenceRunner(m).generate([1, 2, 3, 4], 6).tokens
    gen = Generator(m, device=onnx_device, max_tokens=64)
    try:
        np.testing.assert_array_equal(gen.generate([[1, 2, 3, 4]], 6).tokens, want)
    finally:
        gen.close()


@pytest.mark.parametrize("op", ["kv", "qkv"])
def test_later_layers_of_a_step_skip_the_checks_not_the_inputs(onnx_device, op, monkeypatch):
    """The layers after a step's first take what the first checked (the step, the shapes, the
    op's attributes) when their inputs match it: the same results as checking every call, and
    every input the check would refuse is still refused (a non-finite value, another shape,
    another step), with the cache unchanged; another dtype takes the checked path again."""
    import pyopencl.array as cla
    from kvcl import InvalidArgument, NonFiniteError, ShapeError
    from kvcl.engine import PagedKVCache
    from kvcl.onnx import customop
    layers, hkv, hq, d = 3, 2, 4, 16
    caches = [PagedKVCache(layers, hkv, d, 32, block_size=4, device=onnx_device) for _ in range(2)]
    handles = [f"fast-path-{op}-{i}" for i in range(2)]
    bindings = [customop.register_cache(h, c) for h, c in zip(handles, caches)]
    rng = np.random.default_rng(1)
    cos, sin = (cla.to_device(onnx_device.queue, t.astype(np.float32))
                for t in (np.cos(rng.standard_normal((64, d // 2))), np.sin(rng.standard_normal((64, d // 2)))))
    name = "_attention_checked" if op == "kv" else "_attention_qkv_checked"
    checked, orig = [], getattr(customop, name)
    monkeypatch.setattr(customop, name, lambda binding, *a: checked.append(binding.handle) or orig(binding, *a))

    def inputs(n):
        if op == "kv":
            return (rng.standard_normal((1, hq, n, d), np.float32),
                    *(rng.standard_normal((1, hkv, n, d), np.float32) for _ in range(2)))
        return (rng.standard_normal((1, n, (hq + 2 * hkv) * d), np.float32),)

    def call(handle, xs, step, layer):
        if op == "kv":
            return customop.kvcl_attention(*xs, step, handle, layer, 0.25)
        return customop.kvcl_attention_qkv(*xs, step, cos, sin, handle, layer, 0.25, hq, "half")

    try:
        seqs = [c.add_sequence() for c in caches]
        assert seqs[0] == seqs[1]
        past = 0
        for n in (3, 1, 1):
            step = np.array([[seqs[0]], [past], [n]], np.int64)
            for layer in range(layers):
                xs = inputs(n)
                checked.clear()
                fast = call(handles[0], xs, step, layer)
                bindings[1].fast_kv = bindings[1].fast_qkv = None   # the twin checks every call
                slow = call(handles[1], xs, step, layer)
                np.testing.assert_array_equal(fast, slow)
                assert checked == ([handles[0]] if layer == 0 else []) + [handles[1]], (n, layer)
            past += n
        # a new step's first layer, then refusals in a later layer: nothing written
        step = np.array([[seqs[0]], [past], [1]], np.int64)
        call(handles[0], inputs(1), step, 0)
        before = caches[0].snapshot()
        bad = inputs(1)
        bad[-1].reshape(-1)[3] = np.nan
        with pytest.raises(NonFiniteError):
            call(handles[0], bad, step, 1)
        with pytest.raises(ShapeError):
            call(handles[0], tuple(x[..., :-2] if op == "qkv" else x[:, :, :, :-2] for x in inputs(1)), step, 1)
        with pytest.raises(InvalidArgument, match="past lengths must equal"):
            call(handles[0], inputs(1), np.array([[seqs[0]], [past + 5], [1]], np.int64), 1)
        assert caches[0].snapshot() == before
        checked.clear()   # float64 inputs: converted on the checked path, as before
        xs = inputs(1)
        got = call(handles[0], tuple(x.astype(np.float64) for x in xs), step, 1)
        assert checked == [handles[0]]
        np.testing.assert_array_equal(got, call(handles[0], xs, step, 1))
    finally:
        for h in handles:
            customop.unregister_cache(h)
