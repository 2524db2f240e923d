"""Generation through the bridge (:class:`Generator`) and the past_key_values baseline
(:class:`ReferenceRunner`); :mod:`kvcl.onnx.timing` times a step of both."""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import DtypeError, InvalidArgument, OutOfRangeError
from ..sampling import SamplingParams, check_sampling, sample
from ..validate import check_int
from . import customop
from .customop import STEP_INPUT, bind_planned, raise_pending, register_cache, unregister_cache
from .modelio import configure_session, session_source

if TYPE_CHECKING:  # pragma: no cover
    from ..scheduler import Scheduler

__all__ = ["Generator", "GenerationResult", "StepOutput", "ReferenceRunner"]

_HANDLES = itertools.count()
_CPU_TYPE = 2   # CL_DEVICE_TYPE_CPU (kvcl.onnx stays importable without touching pyopencl)
_NP_OF_ORT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _session(model: Any, *, custom_ops: bool, threads: int | None = None, spinning: bool = True,
             worker_nice: "int | None" = None):
    """An onnxruntime CPU session of a ModelProto (its external data read by onnxruntime from
    where the model names it, :mod:`kvcl.onnx.modelio`) or of serialised bytes; ``worker_nice``
    lowers the priority of the intra-op worker threads it starts (Linux; see :class:`Generator`)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if isinstance(model, bytes):
        model_bytes = model
    else:
        model_bytes, folder = session_source(model)
        configure_session(so, folder)
    if custom_ops:
        so.register_custom_ops_library(customop.library_path())
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    before = _thread_ids() if worker_nice is not None else set()
    session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    session.kvcl_worker_threads = []
    if worker_nice is not None:
        for tid in sorted(_thread_ids() - before):   # the intra-op workers onnxruntime just started
            try:
                os.setpriority(os.PRIO_PROCESS, tid, worker_nice)
                session.kvcl_worker_threads.append(tid)
            except OSError:  # pragma: no cover - a thread that ended meanwhile
                pass
    return session


def _thread_ids() -> "set[int]":
    """This process's thread ids (Linux ``/proc``; empty elsewhere)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # pragma: no cover - not Linux
        return set()


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


def _check_sampling(do_sample: bool, temperature: float, top_k: "int | None") -> SamplingParams:
    """The :class:`~kvcl.sampling.SamplingParams` of the lockstep options (refused before a step runs)."""
    if do_sample:
        check_sampling(temperature, top_k, greedy_ok=False)
        return SamplingParams(float(temperature), top_k)
    check_sampling(1.0, top_k)
    return SamplingParams()


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
    #: generated tokens per prompt, the stop token included (rows after it repeat it)
    lengths: list[int] = field(default_factory=list)
    #: the decoded continuations, when the Generator has a tokenizer
    texts: "list[str] | None" = None


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
    worker_nice : int or None
        On a CPU device (PoCL) the kvcl ops share the cores with onnxruntime: its intra-op
        workers spin for work between nodes (which the short steps want: no wake-up per node),
        and while a long step's kernels run on PoCL's threads a spinning worker takes a core
        from them. The workers this Generator's session starts get this nice value (Linux; 19
        by default, the lowest priority), so they spin only on a core nobody else wants.
        Synthetic 4-layer decoder, dev VM, 5 rounds: 4096 tokens 9.5-12.6 ms per step spinning,
        7.7-9.1 ms not spinning, 7.4-7.9 ms spinning at nice 19; 16 tokens 1.7-2.6 ms spinning
        (either nice), 2.2-3.3 ms not. ``None`` leaves them alone (the default on other devices).
    tokenizer : "auto", str, Path, kvcl.Tokenizer or None
        Text in and out (:class:`kvcl.tokenizer.Tokenizer`): "auto" loads ``tokenizer.json``
        found beside the model file, if any; a path names the folder; None: token ids only.
    prefix_caching : bool
        Keep full blocks of finished sequences for later prompts with the same prefix (what the
        :meth:`scheduler` shares between requests); off by default for :meth:`generate`.
    packed : "auto" or bool
        :meth:`forward_step` feeds a step's sequences back to back in one row of the graph
        (``input_ids`` [1, total]) instead of right-padded rows [B, longest], so no padding is
        computed. "auto": where the model takes ``position_ids`` (each token then gets its own
        position; the kvcl ops attend per sequence). The tests check packed steps give the same
        tokens as each sequence alone on every fixture route and the real model.

    Attributes
    ----------
    stop_ids : list of int
        End-of-sequence ids of the model (its folder's ``generation_config.json`` /
        ``config.json``, or the tokenizer's ``eos_token``): where ``stop_ids="auto"`` stops.

    A Generator runs one call at a time (calls from several threads are serialised).
    """

    def __init__(self, model: Any, *, kv_dtype: "str | None" = "fp32", device: Any = None,
                 max_tokens: int = 4096, block_size: int = 16, threads: int | None = None,
                 worker_nice: "int | None | str" = "auto", tokenizer: Any = "auto",
                 prefix_caching: bool = False, packed: "str | bool" = "auto"):
        from ..engine import PagedKVCache
        from ..tokenizer import Tokenizer, find_tokenizer, stop_token_ids
        from .models import resolve_model
        from .modelio import load_model
        from .rewrite import is_rewritten, model_info, rewrite

        if not customop.HAVE_EXTENSIONS:
            raise ImportError("kvcl.onnx.Generator needs onnxruntime-extensions: pip install 'kvcl[onnx]'")
        if worker_nice not in ("auto", None):
            worker_nice = check_int("worker_nice", worker_nice, low=0, high=20)
        model = resolve_model(model)
        path = model if isinstance(model, (str, os.PathLike)) else None
        if tokenizer == "auto":
            folder = find_tokenizer(path) if path is not None else None
            tokenizer = Tokenizer(folder) if folder is not None else None
        elif tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer(tokenizer)
        self.tokenizer = tokenizer
        stops = stop_token_ids(path) if path is not None else []
        self.stop_ids: list[int] = stops or (list(tokenizer.stop_ids) if tokenizer is not None else [])
        proto = load_model(model)
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
                                  enable_prefix_caching=bool(prefix_caching))
        self.kv_dtype = self.cache.dtype.name
        self._binding = register_cache(self.handle, self.cache)
        customop.register_tables(self.handle, proto)   # RoPE tables of kvcl::AttentionQKVRope, once
        self.model = proto
        self.vocab_size = _vocab_size(proto)
        if worker_nice == "auto":
            worker_nice = 19 if self.cache.device.device.type & _CPU_TYPE else None
        self.session = _session(proto, custom_ops=True, threads=threads,
                                worker_nice=worker_nice)
        self._inputs = {i.name: _NP_OF_ORT.get(i.type, np.int64) for i in self.session.get_inputs()}
        unknown = set(self._inputs) - {"input_ids", "attention_mask", "position_ids", STEP_INPUT}
        if unknown or "input_ids" not in self._inputs:
            raise InvalidArgument(f"model: inputs {sorted(self._inputs)}; kvcl feeds input_ids, "
                                  f"attention_mask, position_ids and {STEP_INPUT} only")
        self.packed = ("position_ids" in self._inputs) if packed == "auto" else bool(packed)
        if self.packed and "position_ids" not in self._inputs:
            raise InvalidArgument("packed: this model takes no position_ids input, so packed rows would get "
                                  "wrong positions; use packed=False")
        self._lock = threading.Lock()

    @property
    def binding(self) -> "customop.CacheBinding":
        """The cache's binding in the op registry (the one registered under ``handle`` now:
        re-registering the cache makes a new one), or the first one while none is."""
        return customop.find_binding(self.handle) or self._binding

    def close(self) -> None:
        unregister_cache(self.handle)

    def __del__(self):  # pragma: no cover - best effort
        try:
            unregister_cache(self.handle)
        except Exception:
            pass

    # ---- one forward pass ------------------------------------------------------------------

    def _run(self, seq_ids: Sequence[int], past: Sequence[int], tokens: Sequence[Sequence[int]],
             planned: Any = None) -> np.ndarray:
        """Run the graph on right-padded new tokens; return logits [B, S, vocab]. ``planned``:
        the step, already planned on the cache by the caller (else the first op plans it)."""
        b = len(seq_ids)
        lens = [len(t) for t in tokens]
        s = max(lens)
        ids = np.zeros((b, s), np.int64)
        pos = np.zeros((b, s), np.int64)
        for i, (t, p) in enumerate(zip(tokens, past)):
            ids[i, :len(t)] = t
            pos[i] = p + np.minimum(np.arange(s), max(len(t), 1) - 1)   # padding repeats the last position
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
        if planned is not None:
            bind_planned(self.binding, feed[STEP_INPUT], s, planned)
        try:
            (logits,) = self.session.run(["logits"], feed)
        except Exception as exc:
            raise_pending(self.binding, cause=exc)
            raise
        raise_pending(self.binding)
        return logits

    def forward(self, seq_ids, tokens) -> np.ndarray:
        """Append ``tokens`` [B][n_b] to cache sequences ``seq_ids``; logits of each last token [B, vocab].

        The step is planned (its slots reserved) before the model runs: if the run fails, the
        sequences hold those tokens unwritten; free them (:meth:`generate` does)."""
        past = [self.cache.seq_len(s) for s in seq_ids]
        # planned here, before the graph runs (not by the first layer's op, between the graph's
        # nodes): in one go the step and every layer's launches cost a third of that there
        step = self.cache.plan(list(seq_ids), [len(t) for t in tokens])
        try:
            logits = self._run(seq_ids, past, tokens, planned=step)
        finally:
            self.binding.step = self.binding.step_key = None
        return np.stack([logits[i, len(t) - 1] for i, t in enumerate(tokens)]).astype(np.float32, copy=False)

    def forward_step(self, step: Any, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Run a step planned on ``self.cache`` (``cache.plan(seq_ids, lens, token_ids)``) with the
        new ``tokens`` [B][lens[b]]; logits of each row's last token [B, vocab]. The forward a
        :class:`kvcl.scheduler.Scheduler` calls."""
        plan = step.plan
        lens = [len(t) for t in tokens]
        past = [int(k) - n for k, n in zip(plan.kv_lens.tolist(), lens)]
        with self._lock:
            try:
                if self.packed:
                    logits = self._run_packed(step.seq_ids, past, tokens, step)
                    return logits[0, np.cumsum(lens) - 1].astype(np.float32, copy=False)
                logits = self._run(step.seq_ids, past, tokens, planned=step)
            finally:
                self.binding.step = self.binding.step_key = None
        return np.stack([logits[i, n - 1] for i, n in enumerate(lens)]).astype(np.float32, copy=False)

    def _run_packed(self, seq_ids, past, tokens, planned) -> np.ndarray:
        """Run a planned step with every sequence's tokens back to back in one row; logits [1, T, vocab]."""
        ids = np.concatenate([np.asarray(t, np.int64) for t in tokens])[None]
        pos = np.concatenate([p + np.arange(len(t)) for t, p in zip(tokens, past)])[None]
        t = ids.shape[1]
        feed = {"input_ids": ids.astype(self._inputs["input_ids"], copy=False),
                "position_ids": pos.astype(self._inputs["position_ids"], copy=False)}
        if "attention_mask" in self._inputs:   # kvcl masks attention per sequence itself
            feed["attention_mask"] = np.ones((1, max(past) + t), self._inputs["attention_mask"])
        feed[STEP_INPUT] = np.array([list(seq_ids), list(past), [len(x) for x in tokens]], np.int64)
        bind_planned(self.binding, feed[STEP_INPUT], t, planned, packed=True)
        try:
            (logits,) = self.session.run(["logits"], feed)
        except Exception as exc:
            raise_pending(self.binding, cause=exc)
            raise
        raise_pending(self.binding)
        return logits

    def scheduler(self, **options) -> "Scheduler":
        """A :class:`kvcl.scheduler.Scheduler` (continuous batching) over this Generator's cache and
        model; ``options`` go to it (``max_batch_tokens``, ``max_num_seqs``, ...). Make the Generator
        with ``prefix_caching=True`` for requests to share prompt blocks."""
        from ..scheduler import Scheduler
        options.setdefault("vocab_size", self.vocab_size)
        options.setdefault("stop_ids", self.stop_ids)
        options.setdefault("padded", not self.packed)
        return Scheduler(self.cache, self.forward_step, **options)

    def encode_prompts(self, prompts: Any, *, chat: bool = False) -> list[list[int]]:
        """Token ids of ``prompts``: a str, a list of str (tokenized; ``chat``: each wrapped as a user
        message by the chat template), or token ids as :meth:`generate` takes them."""
        texts = [prompts] if isinstance(prompts, str) else prompts
        if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
            if self.tokenizer is None:
                raise InvalidArgument("input_ids: text given but this Generator has no tokenizer "
                                      "(no tokenizer.json beside the model; pass tokenizer=FOLDER)")
            if chat:
                return [self.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
            return [self.tokenizer.encode(t) for t in texts]
        return _check_prompts(prompts, self.vocab_size)

    def _stop_set(self, stop_ids: Any) -> frozenset:
        if stop_ids == "auto":
            return frozenset(self.stop_ids)
        if stop_ids is None:
            return frozenset()
        ids = [stop_ids] if isinstance(stop_ids, (int, np.integer)) else list(stop_ids)
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 for t in ids):
            raise InvalidArgument(f"stop_ids: expected 'auto', None or token ids >= 0, got {stop_ids!r}")
        return frozenset(int(t) for t in ids)

    # ---- generation ------------------------------------------------------------------------

    def stream(self, input_ids, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
               top_k: int | None = None, return_logits: bool = False, seed: int | None = None,
               stop_ids: Any = None) -> Iterator[StepOutput]:
        """Yield one :class:`StepOutput` per generated position (all prompts advance together).

        ``stop_ids`` ("auto": :attr:`stop_ids`; None: never stop early; or token ids): a prompt
        that produced one stops being computed; its later positions repeat that token, and the
        stream ends when every prompt has stopped."""
        prompts = self.encode_prompts(input_ids)
        params = _check_sampling(do_sample, temperature, top_k)
        stops = self._stop_set(stop_ids)
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
        params.rng = np.random.default_rng(seed)
        with self._lock:
            seqs = [self.cache.add_sequence() for _ in prompts]
            try:
                if max_new_tokens == 0:
                    return
                logits = self.forward(seqs, prompts)
                live = list(range(len(prompts)))      # rows still generating
                tok = np.zeros(len(prompts), np.int64)
                full = None
                for i in range(max_new_tokens):
                    for j, row in enumerate(live):
                        tok[row] = sample(logits[j], params)
                    if return_logits:
                        full = np.zeros((len(prompts), logits.shape[-1]), np.float32) if full is None else full
                        full[live] = logits
                    yield StepOutput(i, tok.copy(), full.copy() if return_logits else None)
                    live = [row for row in live if int(tok[row]) not in stops]
                    if not live:
                        return
                    if i + 1 < max_new_tokens:
                        logits = self.forward([seqs[r] for r in live], [[int(tok[r])] for r in live])
            finally:
                self.binding.step = self.binding.step_key = None
                for s in seqs:
                    self.cache.free(s)

    def generate(self, input_ids, max_new_tokens: int = 32, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, return_logits: bool = False, seed: int | None = None,
                 stop_ids: Any = None, callback: Callable[[StepOutput], Any] | None = None,
                 progress: bool = False) -> GenerationResult:
        """Generate up to ``max_new_tokens`` for each prompt of ``input_ids``: lists of token ids of
        any lengths, or text (a str or a list of str) when the Generator has a tokenizer. Returns
        :class:`GenerationResult` (``tokens`` [B, steps], ``lengths``, ``texts``; ``logits``
        [B, steps, vocab] with ``return_logits``). ``stop_ids``: see :meth:`stream`.
        ``callback`` gets each :class:`StepOutput`."""
        prompts = self.encode_prompts(input_ids)
        stops = self._stop_set(stop_ids)
        t0 = time.perf_counter()
        toks, logs = [], []
        it = self.stream(prompts, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                         return_logits=return_logits, seed=seed, stop_ids=stops)
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
        lengths = []
        for row in tokens.tolist():
            hit = next((i for i, t in enumerate(row) if t in stops), None)
            lengths.append(len(row) if hit is None else hit + 1)
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(row[:n]) for row, n in zip(tokens.tolist(), lengths)]
        return GenerationResult(tokens, logits, [len(p) for p in prompts], time.perf_counter() - t0,
                                lengths, texts)


class ReferenceRunner:
    """The original export in onnxruntime, past_key_values fed back each step (the baseline)."""

    def __init__(self, model: Any, *, threads: int | None = None):
        from .graph import _PAST
        from .modelio import load_model
        proto = load_model(model)
        self.session = _session(proto, custom_ops=False, threads=threads)
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
    from .graph import RewriteError, _attr, _Graph, _last_dim
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
