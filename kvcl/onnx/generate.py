"""Generation through the bridge (:class:`Generator`), the past_key_values baseline
(:class:`ReferenceRunner`) and a per-step timing of both (:func:`bench_step`)."""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import DtypeError, InvalidArgument, OutOfRangeError
from . import customop
from .customop import STEP_INPUT, raise_pending, register_cache, unregister_cache

__all__ = ["Generator", "GenerationResult", "StepOutput", "ReferenceRunner", "bench_step", "hook_overhead_us"]

_HANDLES = itertools.count()
_NP_OF_ORT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _session(model_bytes: bytes, *, custom_ops: bool, threads: int | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    if custom_ops:
        so.register_custom_ops_library(customop.library_path())
        # onnxruntime's intra-op threads busy-wait for work after each node by default; while
        # a kvcl op runs its kernels on the OpenCL device's own threads (PoCL: the same cores)
        # they would take the cores from them. 4-layer model of realistic width (32 / 8 heads x
        # 128), 4096 tokens of context, dev VM, two runs each: 24.4-30.8 ms per step with
        # spinning (14.9-18.3 ms inside the kvcl ops), 16.8-17.8 ms without (8.5-8.6 ms).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _vocab_size(model) -> "int | None":
    """The vocabulary size: the last dimension of the ``logits`` output, or the rows of the
    embedding table gathered by ``input_ids`` (None if neither is static)."""
    for out in model.graph.output:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
                return int(dims[-1].dim_value)
    tables = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input_ids" and node.input[0] in tables:
            return int(tables[node.input[0]].dims[0])
    return None


def _check_prompts(input_ids, vocab_size: "int | None" = None) -> list[list[int]]:
    if isinstance(input_ids, np.ndarray):
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise InvalidArgument("input_ids: expected a non-empty list of prompts (lists of token ids)")
    if all(isinstance(t, (int, np.integer)) for t in input_ids):
        input_ids = [input_ids]  # one prompt
    prompts = []
    for i, p in enumerate(input_ids):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
            raise DtypeError(f"input_ids[{i}]: expected a list of int token ids, got {type(p).__name__}")
        if any(isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) for t in p):
            raise DtypeError(f"input_ids[{i}]: expected int token ids, got {[type(t).__name__ for t in p][:4]}")
        p = [int(t) for t in p]
        if not p:
            raise InvalidArgument(f"input_ids[{i}]: empty prompt")
        # ONNX Gather wraps negative ids to other tokens and fails inside the run on large ones:
        # refuse both before anything is planned
        bad = [t for t in p if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise OutOfRangeError(f"input_ids[{i}]: token ids must be in {limit}, got {bad[:4]}")
        prompts.append(p)
    return prompts


def _check_sampling(do_sample: bool, temperature: float, top_k: "int | None") -> None:
    """Refuse bad sampling options before a step runs (a refused call changes nothing)."""
    if do_sample and not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise InvalidArgument(f"temperature: expected a finite float > 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise InvalidArgument(f"top_k: expected None or an int >= 1, got {top_k!r}")


def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int | None, rng) -> np.ndarray:
    """Next token per row of ``logits`` [B, V]."""
    if not do_sample:
        return np.argmax(logits, axis=-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], np.int64)


@dataclass
class StepOutput:
    """One generated position: ``tokens`` [B] and, when asked for, ``logits`` [B, vocab]."""

    index: int
    tokens: np.ndarray
    logits: np.ndarray | None = None


@dataclass
class GenerationResult:
    """``tokens`` [B, new] int64; ``logits`` [B, new, vocab] float32 when ``return_logits``."""

    tokens: np.ndarray
    logits: np.ndarray | None = None
    prompt_lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0


class Generator:
    """Run an exported decoder with its KV cache in a :class:`kvcl.engine.PagedKVCache`.

    Parameters
    ----------
    model : str, Path or onnx.ModelProto
        An original export (``past_key_values.N.*`` I/O; rewritten on load) or a model
        :func:`kvcl.onnx.rewrite` produced.
    kv_dtype : str or None
        Cache storage: fp32, fp16, int8, fp8_e4m3, fp8_e5m2; ``None`` takes the one a rewritten
        model records (``rewrite(..., kv_dtype=...)``), else fp32.
    device : kvcl.Device or str, optional
    max_tokens : int
        Cache capacity in tokens, over all sequences of a call.
    block_size : int
    threads : int, optional
        onnxruntime intra-op threads.

    A Generator runs one call at a time (calls from several threads are serialised).
    """

    def __init__(self, model: Any, *, kv_dtype: "str | None" = "fp32", device: Any = None,
                 max_tokens: int = 4096, block_size: int = 16, threads: int | None = None):
        from ..engine import PagedKVCache
        from .rewrite import _load, is_rewritten, model_info, rewrite

        if not customop.HAVE_EXTENSIONS:
            raise ImportError("kvcl.onnx.Generator needs onnxruntime-extensions: pip install 'kvcl[onnx]'")
        proto = _load(model)
        if not is_rewritten(proto):
            proto = rewrite(proto, kv_dtype=kv_dtype or "fp32")
        self.info = model_info(proto)
        if kv_dtype is None:  # the storage recorded by rewrite(kv_dtype=...)
            kv_dtype = self.info.get("kv_dtype", "fp32")
        self.handle = f"kvcl-gen-{next(_HANDLES)}-{id(self):x}"
        for n in proto.graph.node:
            if n.domain == customop.OP_DOMAIN:
                for a in n.attribute:
                    if a.name == "handle":
                        a.s = self.handle.encode()
        if max_tokens < 1:
            raise InvalidArgument(f"max_tokens: expected >= 1, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        num_blocks = math.ceil(self.max_tokens / block_size) + 16
        self.cache = PagedKVCache(self.info["num_layers"], self.info["num_kv_heads"], self.info["head_dim"],
                                  num_blocks, block_size, kv_dtype, device=device,
                                  enable_prefix_caching=False)
        self.kv_dtype = self.cache.dtype.name
        self.binding = register_cache(self.handle, self.cache)
        customop.register_tables(self.handle, proto)   # RoPE tables of kvcl::AttentionQKVRope, once
        self.model = proto
        self.vocab_size = _vocab_size(proto)
        self.session = _session(proto.SerializeToString(), custom_ops=True, threads=threads)
        self._inputs = {i.name: _NP_OF_ORT.get(i.type, np.int64) for i in self.session.get_inputs()}
        unknown = set(self._inputs) - {"input_ids", "attention_mask", "position_ids", STEP_INPUT}
        if unknown or "input_ids" not in self._inputs:
            raise InvalidArgument(f"model: inputs {sorted(self._inputs)}; kvcl feeds input_ids, "
                                  f"attention_mask, position_ids and {STEP_INPUT} only")
        self._lock = threading.Lock()

    def close(self) -> None:
        unregister_cache(self.handle)

    def __del__(self):  # pragma: no cover - best effort
        try:
            unregister_cache(self.handle)
        except Exception:
            pass

    # ---- one forward pass ------------------------------------------------------------------

    def _run(self, seq_ids: Sequence[int], past: Sequence[int], tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Run the graph on right-padded new tokens; return logits [B, S, vocab]."""
        b = len(seq_ids)
        lens = [len(t) for t in tokens]
        s = max(lens)
        ids = np.zeros((b, s), np.int64)
        pos = np.zeros((b, s), np.int64)
        for i, (t, p) in enumerate(zip(tokens, past)):
            ids[i, :len(t)] = t
            pos[i] = p + np.arange(s)
        feed = {"input_ids": ids.astype(self._inputs["input_ids"], copy=False)}
        if "position_ids" in self._inputs:
            feed["position_ids"] = pos.astype(self._inputs["position_ids"], copy=False)
        if "attention_mask" in self._inputs:
            # left-padded like a batch of the original model, so that a graph deriving positions
            # from cumsum(mask) gets each row's own; kvcl masks attention itself
            mask = np.ones((b, max(past) + s), self._inputs["attention_mask"])
            for i, p in enumerate(past):
                mask[i, :max(past) - p] = 0
            feed["attention_mask"] = mask
        feed[STEP_INPUT] = np.array([list(seq_ids), list(past), lens], np.int64)
        try:
            (logits,) = self.session.run(["logits"], feed)
        except Exception as exc:
            raise_pending(self.binding, cause=exc)
            raise
        raise_pending(self.binding)
        return logits

    def forward(self, seq_ids, tokens) -> np.ndarray:
        """Append ``tokens`` [B][n_b] to cache sequences ``seq_ids``; logits of each last token [B, vocab]."""
        past = [self.cache.seq_len(s) for s in seq_ids]
        logits = self._run(seq_ids, past, tokens)
        return np.stack([logits[i, len(t) - 1] for i, t in enumerate(tokens)]).astype(np.float32, copy=False)

    # ---- generation ------------------------------------------------------------------------

    def stream(self, input_ids, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
               top_k: int | None = None, return_logits: bool = False, seed: int | None = None) -> Iterator[StepOutput]:
        """Yield one :class:`StepOutput` per generated position (all prompts advance together)."""
        prompts = _check_prompts(input_ids, self.vocab_size)
        _check_sampling(do_sample, temperature, top_k)
        if max_new_tokens < 0:
            raise InvalidArgument(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
        need = sum(len(p) for p in prompts) + len(prompts) * max_new_tokens
        bs = self.cache.block_size
        blocks = sum(-(-(len(p) + max_new_tokens) // bs) for p in prompts)
        if need > self.max_tokens or blocks > self.cache.num_free_blocks:
            raise InvalidArgument(
                f"input_ids/max_new_tokens: {len(prompts)} prompts need {need} tokens ({blocks} blocks of {bs}); "
                f"the cache holds max_tokens={self.max_tokens} ({self.cache.num_free_blocks} free blocks): "
                "make the Generator with a larger max_tokens")
        rng = np.random.default_rng(seed)
        with self._lock:
            seqs = [self.cache.add_sequence() for _ in prompts]
            try:
                if max_new_tokens == 0:
                    return
                logits = self.forward(seqs, prompts)
                for i in range(max_new_tokens):
                    tok = _pick(logits, do_sample, temperature, top_k, rng)
                    yield StepOutput(i, tok, logits if return_logits else None)
                    if i + 1 < max_new_tokens:
                        logits = self.forward(seqs, [[int(t)] for t in tok])
            finally:
                self.binding.step = self.binding.step_key = None
                for s in seqs:
                    self.cache.free(s)

    def generate(self, input_ids, max_new_tokens: int = 32, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, return_logits: bool = False, seed: int | None = None,
                 callback: Callable[[StepOutput], Any] | None = None, progress: bool = False) -> GenerationResult:
        """Generate ``max_new_tokens`` for each prompt of ``input_ids`` (a list of token-id lists
        of any lengths). Returns :class:`GenerationResult` (``tokens`` [B, new], ``logits``
        [B, new, vocab] with ``return_logits``). ``callback`` gets each :class:`StepOutput`."""
        prompts = _check_prompts(input_ids, self.vocab_size)
        t0 = time.perf_counter()
        toks, logs = [], []
        it = self.stream(prompts, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                         return_logits=return_logits, seed=seed)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=max_new_tokens, unit="tok", desc="generate")
        for out in it:
            toks.append(out.tokens)
            if return_logits:
                logs.append(out.logits)
            if callback is not None:
                callback(out)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        b = len(prompts)
        tokens = np.stack(toks, axis=1) if toks else np.zeros((b, 0), np.int64)
        logits = None
        if return_logits:
            logits = np.stack(logs, axis=1) if logs else np.zeros((b, 0, 0), np.float32)
        return GenerationResult(tokens, logits, [len(p) for p in prompts], time.perf_counter() - t0)


class ReferenceRunner:
    """The original export in onnxruntime, past_key_values fed back each step (the baseline)."""

    def __init__(self, model: Any, *, threads: int | None = None):
        from .rewrite import _PAST, _load
        proto = _load(model)
        self.session = _session(proto.SerializeToString(), custom_ops=False, threads=threads)
        ins = self.session.get_inputs()
        self._inputs = {i.name: _NP_OF_ORT.get(i.type, np.int64) for i in ins}
        self.past_names = [i.name for i in ins if _PAST.match(i.name)]
        p0 = next(i for i in ins if _PAST.match(i.name))
        self.kv_heads, self.head_dim = p0.shape[1], p0.shape[3]
        if not isinstance(self.head_dim, int) or not isinstance(self.kv_heads, int):
            self.kv_heads, self.head_dim = _gqa_dims(proto, p0.name)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.present_names = ["present." + n[len("past_key_values."):] for n in self.past_names]

    def empty_past(self, batch: int = 1) -> dict:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self._inputs[n]) for n in self.past_names}

    def step(self, tokens: np.ndarray, past: dict, past_len: int) -> tuple[np.ndarray, dict]:
        """tokens [B, S] -> (logits [B, S, V], new past)."""
        b, s = tokens.shape
        feed = {"input_ids": tokens.astype(self._inputs["input_ids"])}
        if "attention_mask" in self._inputs:
            feed["attention_mask"] = np.ones((b, past_len + s), self._inputs["attention_mask"])
        if "position_ids" in self._inputs:
            feed["position_ids"] = np.tile(np.arange(past_len, past_len + s), (b, 1)).astype(self._inputs["position_ids"])
        feed.update(past)
        outs = self.session.run(["logits"] + self.present_names, feed)
        return outs[0], dict(zip(self.past_names, outs[1:]))

    def generate(self, prompt: Sequence[int], max_new_tokens: int) -> GenerationResult:
        """Greedy generation of one prompt; logits [1, new, vocab] of every generated position."""
        past = self.empty_past(1)
        ids = np.array([list(prompt)], np.int64)
        n = ids.shape[1]
        toks, logs = [], []
        logits, past = self.step(ids, past, 0)
        last = logits[:, -1]
        for i in range(max_new_tokens):
            tok = int(np.argmax(last[0]))
            toks.append(tok)
            logs.append(last[0])
            if i + 1 < max_new_tokens:
                logits, past = self.step(np.array([[tok]]), past, n)
                n += 1
                last = logits[:, -1]
        return GenerationResult(np.array([toks], np.int64),
                                np.stack(logs)[None] if logs else np.zeros((1, 0, 0), np.float32), [len(prompt)])


def _gqa_dims(proto, past_name: str) -> tuple[int, int]:
    """(kv heads, head dim) of a model whose past inputs have symbolic dims (genai's GQA)."""
    from .rewrite import RewriteError, _attr, _Graph, _last_dim
    G = _Graph(proto)
    for n in G.cons.get(past_name, []):
        if n.op_type == "GroupQueryAttention":
            hq, hkv = int(_attr(n, "num_heads")), int(_attr(n, "kv_num_heads"))
            w = _last_dim(G, n.input[0])
            if w:
                return hkv, w // (hq + 2 * hkv)
            cos = G.const_value(n.input[7])
            if cos is not None:
                return hkv, 2 * int(cos.shape[1])
    raise RewriteError(f"{past_name}: symbolic KV heads / head dim and no GroupQueryAttention to read them from")


def bench_step(model: Any, *, contexts: Sequence[int] = (16, 2048), batch: int = 1, steps: int = 20,
               warmup: int = 3, kv_dtype: str = "fp32", device: Any = None, seed: int = 0) -> list[dict]:
    """Per-decode-step time of the bridge vs the original model fed past_key_values.

    For each context length the past is filled with random K/V (the step's cost does not
    depend on the values; a real prefill at 4096 tokens would dominate the run), then
    ``warmup + steps`` single-token steps are timed and the median reported. The original
    model gets the past as numpy arrays and its ``present.*`` fed back each step, as a caller
    without IOBinding would. Returns one dict per context: ``context``, ``batch``,
    ``bridge_ms``, ``reference_ms``, ``speedup`` (reference / bridge), ``op_ms`` (time inside
    the kvcl op bodies per step, so ``bridge_ms - op_ms`` is the rest of the graph plus hook
    overhead), ``layers``, ``kv_bytes`` (the cached K/V bytes one step's attention reads).
    """
    from .rewrite import _load
    _enable_op_timing()
    proto = _load(model)
    ref = ReferenceRunner(proto)
    gen = Generator(proto, kv_dtype=kv_dtype, device=device,
                    max_tokens=batch * (max(contexts) + warmup + steps + 1) + 64)
    rng = np.random.default_rng(seed)
    layers = gen.info["num_layers"]
    hkv, d = gen.info["num_kv_heads"], gen.info["head_dim"]
    rows = []
    try:
        # warm up the device path (kernel builds, memory pools): the first steps of a fresh
        # cache are several times slower and would be charged to the first context otherwise
        gen.generate([[5, 6, 7, 8]] * batch, 2 * warmup + 8)
        for ctx in contexts:
            kv = [rng.standard_normal((batch, hkv, ctx, d), np.float32) for _ in range(2 * layers)]
            tok = rng.integers(3, 100, size=(batch, 1))
            # the original model, past fed back
            past = {f"past_key_values.{i}.{k}": kv[2 * i + j] for i in range(layers)
                    for j, k in enumerate(("key", "value"))}
            n, times = ctx, []
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                logits, past = ref.step(tok, past, n)
                times.append(time.perf_counter() - t0)
                n += 1
                tok = np.argmax(logits[:, -1], axis=-1)[:, None]
            ref_ms = float(np.median(times[warmup:]) * 1e3)
            del past
            # the bridge: the same past written into the cache
            seqs = [gen.cache.add_sequence() for _ in range(batch)]
            try:
                with gen._lock:
                    st = gen.cache.plan(seqs, [ctx] * batch)
                    for layer in range(layers):
                        k = np.ascontiguousarray(kv[2 * layer].transpose(0, 2, 1, 3).reshape(batch * ctx, hkv, d))
                        v = np.ascontiguousarray(kv[2 * layer + 1].transpose(0, 2, 1, 3).reshape(batch * ctx, hkv, d))
                        gen.cache.write(layer, st, k, v)
                    gen.cache.synchronize()
                    toks = rng.integers(3, 100, size=batch)
                    times, op_s = [], []
                    for i in range(warmup + steps):
                        t0 = time.perf_counter()
                        c0 = _op_clock()
                        last = gen.forward(seqs, [[int(t)] for t in toks])
                        times.append(time.perf_counter() - t0)
                        op_s.append(_op_clock() - c0)
                        toks = np.argmax(last, axis=-1)
            finally:
                gen.binding.step = gen.binding.step_key = None
                for s in seqs:
                    gen.cache.free(s)
            br_ms = float(np.median(times[warmup:]) * 1e3)
            rows.append({"context": ctx, "batch": batch, "kv_dtype": gen.kv_dtype, "layers": layers,
                         "bridge_ms": br_ms, "reference_ms": ref_ms,
                         "speedup": ref_ms / br_ms if br_ms else float("nan"),
                         "op_ms": float(np.median(op_s[warmup:]) * 1e3),
                         "kv_bytes": 2 * layers * batch * ctx * hkv * gen.cache.dtype.row_bytes(d)})
    finally:
        gen.close()
    return rows


def hook_overhead_us(q_shape: Sequence[int] = (1, 32, 1, 128), kv_heads: int = 8, repeats: int = 2000) -> dict:
    """Cost of one ``kvcl::Attention`` call through onnxruntime minus the op's own work.

    Times a one-node graph whose op body is swapped for ``lambda q, ...: q`` against the same
    graph with a native ``Identity``; the difference is what the Python custom-op bridge
    (argument conversion, GIL, the numpy-returning hook) costs per layer and step.
    """
    from onnx import TensorProto, helper

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


_TIMING = {"on": False, "total": 0.0}


def _op_clock() -> float:
    return _TIMING["total"]


def _timed(body):
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return body(*args, **kwargs)
        finally:
            _TIMING["total"] += time.perf_counter() - t0
    return timed


def _enable_op_timing() -> None:
    """Wrap the op body so that :func:`bench_step` can report time spent inside it."""
    if _TIMING["on"] or not customop.HAVE_EXTENSIONS:
        return
    for opdef in (customop._opdef, customop._opdef_qkv, customop._opdef_qkv_rope):   # every kvcl op
        opdef.body = _timed(opdef.body)
    _TIMING["on"] = True
