"""Timing the bridge: a decode step against the original model (:func:`bench_step`), where the
step's time goes, and the custom-op hook's own cost (:func:`hook_overhead_us`).

Where a step goes (the fields of a :func:`bench_step` row, all per decode step unless named
per layer):

=========================  ============================================================================
``bridge_ms``              the rewritten model's step through :class:`~kvcl.onnx.Generator`
``reference_ms``           the original export fed past_key_values (numpy in, ``present.*`` back)
``graph_ms``               the rewritten model with the kvcl op bodies swapped for zeros of the right
                           shape: onnxruntime's own graph plus the custom-op hook, no kvcl work
``op_ms``                  inside the kvcl op bodies (what ``bridge_ms - graph_ms`` should be)
``plan_ms``                inside :meth:`~kvcl.engine.PagedKVCache.plan` (once per step, before the graph runs)
``prepare_ms``             what :meth:`~kvcl.onnx.Generator.forward` does outside the op bodies for the step
                           before the graph runs: ``plan`` and readying every layer's launches
``device_ms``              inside the device calls of the ops: the kernels' enqueue and the wait for
                           each output (its blocking read, or where host memory is device memory
                           the queue's finish; on PoCL's in-thread device, the kernels run there)
``python_us_per_layer``    ``(op_ms + prepare_ms - device_ms) / layers``: checks, bookkeeping, copies
``hook_us``                the custom-op hook per call (:func:`hook_overhead_us`, same run)
``fixed_us_per_layer``     ``python_us_per_layer + hook_us``: what the bridge adds to a layer
                           around its kernels (targets.md P8: <= 60 µs)
``inline``                 whether the decode steps ran on the device's in-thread companion
``speedup_ceiling``        ``reference_ms / graph_ms``: the speedup if the kvcl ops cost nothing (the
                           rest of the rewritten graph bounds it)
=========================  ============================================================================
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from . import customop
from .customop import STEP_INPUT

__all__ = ["bench_step", "hook_overhead_us"]


def bench_step(model: Any, *, contexts: Sequence[int] = (16, 256, 4096), batch: int = 1, steps: int = 20,
               warmup: int = 3, kv_dtype: str = "fp32", device: Any = None, seed: int = 0,
               breakdown: bool = True) -> list[dict]:
    """Per-decode-step time of the bridge vs the original model fed past_key_values.

    For each context length the past is filled with random K/V (the step's cost does not
    depend on the values; a real prefill at 4096 tokens would dominate the run), then
    ``warmup + steps`` single-token steps are timed and the median reported. The original
    model gets the past as numpy arrays and its ``present.*`` fed back each step, as a caller
    without IOBinding would. Returns one dict per context with the fields of the module
    docstring, plus ``context``, ``batch``, ``kv_dtype``, ``layers``, ``speedup``
    (reference / bridge) and ``kv_bytes`` (the cached K/V bytes one step's attention reads).
    ``breakdown=False`` skips the stub-graph run and the hook timing (``graph_ms``,
    ``hook_us`` and ``fixed_us_per_layer`` are then NaN).
    """
    from .generate import Generator, ReferenceRunner
    from .modelio import load_model
    _enable_timing()
    proto = load_model(model)
    ref = ReferenceRunner(proto)
    gen = Generator(proto, kv_dtype=kv_dtype, device=device,
                    max_tokens=batch * (max(contexts) + warmup + steps + 1) + 64)
    rng = np.random.default_rng(seed)
    layers = gen.info["num_layers"]
    hkv, d = gen.info["num_kv_heads"], gen.info["head_dim"]
    hook = hook_overhead_us()["hook_overhead_us"] if breakdown else float("nan")
    rows = []
    try:
        # warm up the device path (kernel builds, memory pools): the first steps of a fresh
        # cache are several times slower and would be charged to the first context otherwise
        gen.generate([[5, 6, 7, 8]] * batch, 2 * warmup + 8)
        for ctx in contexts:
            kv = [rng.standard_normal((batch, hkv, ctx, d), np.float32) for _ in range(2 * layers)]
            ref_ms = _reference_ms(ref, kv, layers, batch, ctx, warmup, steps, rng)
            seqs = [gen.cache.add_sequence() for _ in range(batch)]
            try:
                with gen._lock:
                    st = gen.cache.plan(seqs, [ctx] * batch)
                    for layer in range(layers):
                            k = np.ascontiguousarray(kv[2 * layer].transpose(0, 2, 1, 3).reshape(batch * ctx, hkv, d))
                            v = np.ascontiguousarray(kv[2 * layer + 1].transpose(0, 2, 1, 3).reshape(batch * ctx, hkv, d))
                            gen.cache.write(layer, st, k, v)
                    gen.cache.synchronize()
                    del kv
                    row = _bridge_step(gen, seqs, warmup, steps, rng)
                    row["graph_ms"] = _stub_graph_ms(gen, seqs, warmup, steps) if breakdown else float("nan")
            finally:
                gen.binding.step = gen.binding.step_key = None
                for s in seqs:
                    gen.cache.free(s)
            python_us = (row["op_ms"] + row["outside_ms"] - row["device_ms"]) / layers * 1e3
            rows.append({"context": ctx, "batch": batch, "kv_dtype": gen.kv_dtype, "layers": layers,
                             "bridge_ms": row["bridge_ms"], "reference_ms": ref_ms,
                             "speedup": ref_ms / row["bridge_ms"] if row["bridge_ms"] else float("nan"),
                             "graph_ms": row["graph_ms"], "op_ms": row["op_ms"], "plan_ms": row["plan_ms"],
                             "prepare_ms": row["outside_ms"],
                             "device_ms": row["device_ms"], "python_us_per_layer": python_us, "hook_us": hook,
                             "fixed_us_per_layer": python_us + hook, "inline": row["inline"],
                             "speedup_ceiling": ref_ms / row["graph_ms"] if row["graph_ms"] else float("nan"),
                             "kv_bytes": 2 * layers * batch * ctx * hkv * gen.cache.dtype.row_bytes(d)})
    finally:
        gen.close()
    return rows


def _reference_ms(ref, kv, layers, batch, ctx, warmup, steps, rng) -> float:
    """The original model's median step, its past fed back as numpy arrays."""
    tok = rng.integers(3, 100, size=(batch, 1))
    past = {f"past_key_values.{i}.{k}": kv[2 * i + j] for i in range(layers)
            for j, k in enumerate(("key", "value"))}
    n, times = ctx, []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        logits, past = ref.step(tok, past, n)
        times.append(time.perf_counter() - t0)
        n += 1
        tok = np.argmax(logits[:, -1], axis=-1)[:, None]
    return float(np.median(times[warmup:]) * 1e3)


def _bridge_step(gen, seqs, warmup, steps, rng) -> dict:
    """Median step of the bridge, and the medians of the instrumented parts within it."""
    toks = rng.integers(3, 100, size=len(seqs))
    samples = {"bridge_ms": [], "op_ms": [], "plan_ms": [], "device_ms": [], "outside_ms": []}
    for _ in range(warmup + steps):
        c0 = dict(_CLOCKS)
        t0 = time.perf_counter()
        last = gen.forward(seqs, [[int(t)] for t in toks])
        samples["bridge_ms"].append(time.perf_counter() - t0)
        for name in ("op", "plan", "device", "outside"):
            samples[f"{name}_ms"].append(_CLOCKS[name] - c0[name])
        toks = np.argmax(last, axis=-1)
    row = {k: float(np.median(v[warmup:]) * 1e3) for k, v in samples.items()}
    row["inline"] = bool(_LAST_STEP and getattr(_LAST_STEP[-1], "inline", False))
    return row


def _stub_graph_ms(gen, seqs, warmup, steps) -> float:
    """The same session and steps with every kvcl op body returning zeros: onnxruntime's graph
    and the hook alone. The cache is not touched (the steps are replayed at the same lengths)."""
    past = [gen.cache.seq_len(s) for s in seqs]

    def zeros_like_q(q, *args, **attrs):
        return np.zeros(np.shape(q), np.float32)

    def zeros_qkv(qkv, *args, handle, num_heads, **attrs):
        b, s, _ = np.shape(qkv)
        return np.zeros((b, s, int(num_heads) * customop.get_binding(handle).cache.head_dim), np.float32)

    saved = [(op, op.body) for op in (customop._opdef, customop._opdef_qkv, customop._opdef_qkv_rope)]
    customop._opdef.body = zeros_like_q
    customop._opdef_qkv.body = customop._opdef_qkv_rope.body = zeros_qkv
    times = []
    try:
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            gen._run(seqs, past, [[5]] * len(seqs))
            times.append(time.perf_counter() - t0)
    finally:
        for op, body in saved:
            op.body = body
    return float(np.median(times[warmup:]) * 1e3)


def hook_overhead_us(q_shape: Sequence[int] = (1, 32, 1, 128), kv_heads: int = 8, repeats: int = 2000) -> dict:
    """Cost of one ``kvcl::Attention`` call through onnxruntime minus the op's own work.

    Times a one-node graph whose op body is swapped for ``lambda q, ...: q`` against the same
    graph with a native ``Identity``; the difference is what the Python custom-op bridge
    (argument conversion, GIL, the numpy-returning hook) costs per layer and step.
    """
    from onnx import TensorProto, helper

    from .generate import _session

    b, h, s, d = q_shape
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, list(q_shape)),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [b, kv_heads, s, d]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, kv_heads, s, d]),
              helper.make_tensor_value_info(STEP_INPUT, TensorProto.INT64, [3, b])]
    out = [helper.make_tensor_value_info("o", TensorProto.FLOAT, list(q_shape))]

    def model(node):
        g = helper.make_graph([node], "hook", inputs, out)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(customop.OP_DOMAIN, 1)])
        m.ir_version = 9  # readable by onnxruntime releases older than this onnx
        return m.SerializeToString()

    op = helper.make_node(customop.OP_TYPE, ["q", "k", "v", STEP_INPUT], ["o"], domain=customop.OP_DOMAIN,
                              handle="unused", layer=0, scale=1.0)
    ident = helper.make_node("Identity", ["q"], ["o"])
    rng = np.random.default_rng(0)
    feed = {"q": rng.standard_normal(q_shape, np.float32),
            "k": rng.standard_normal((b, kv_heads, s, d), np.float32),
            "v": rng.standard_normal((b, kv_heads, s, d), np.float32),
            STEP_INPUT: np.zeros((3, b), np.int64)}
    saved = customop._opdef.body
    customop._opdef.body = lambda q, *a, **k: q
    try:
        res = {}
        for name, node in (("op", op), ("identity", ident)):
            sess = _session(model(node), custom_ops=True, threads=1)
            f = {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}}
            for _ in range(50):
                sess.run(None, f)
            t = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(repeats // 5):
                    sess.run(None, f)
                t.append((time.perf_counter() - t0) / (repeats // 5))
            res[name] = min(t) * 1e6
    finally:
        customop._opdef.body = saved
    return {"q_shape": list(q_shape), "op_call_us": res["op"], "identity_call_us": res["identity"],
            "hook_overhead_us": res["op"] - res["identity"]}


# ---- instrumentation (installed by bench_step, process-wide, once) ----------------------------

_CLOCKS = {"op": 0.0, "plan": 0.0, "device": 0.0, "bind": 0.0, "outside": 0.0}
_ENABLED = []
_IN_OP = [0]   # depth of op bodies running now
_LAST_STEP: list = []   # the step bind_planned bound last


def _clocked(fn, name, outside: bool = False):
    """``fn`` with its time added to ``_CLOCKS[name]``; ``outside``: also to ``_CLOCKS["outside"]``
    when it runs outside any op body (the step planned and bound before the graph runs)."""
    def timed(*args, **kwargs):
        inside = _IN_OP[0]
        if name == "op":
            _IN_OP[0] += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            _CLOCKS[name] += dt
            if name == "op":
                _IN_OP[0] -= 1
            elif outside and not inside:
                _CLOCKS["outside"] += dt
    timed.__wrapped__ = fn
    return timed


def _enable_timing() -> None:
    """Wrap the op bodies, :meth:`~kvcl.engine.PagedKVCache.plan` and the ops' device calls with clocks (a few
    100 ns per call), for :func:`bench_step`."""
    if _ENABLED or not customop.HAVE_EXTENSIONS:
        return
    from .. import stepcalls
    from ..engine import PagedKVCache
    from . import generate
    for opdef in (customop._opdef, customop._opdef_qkv, customop._opdef_qkv_rope):   # every kvcl op
        opdef.body = _clocked(opdef.body, "op")
    PagedKVCache.plan = _clocked(PagedKVCache.plan, "plan", outside=True)
    bind = _clocked(generate.bind_planned, "bind", outside=True)

    def bind_planned(binding, step_input, s, planned, packed=False):
        _LAST_STEP[:] = [planned]
        return bind(binding, step_input, s, planned, packed)
    generate.bind_planned = bind_planned
    stepcalls.enqueue_ready = _clocked(stepcalls.enqueue_ready, "device")
    PagedKVCache._read_back = _clocked(PagedKVCache._read_back, "device")
    PagedKVCache._read_shared = _clocked(PagedKVCache._read_shared, "device")
    _ENABLED.append(True)
