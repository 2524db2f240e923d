"""``kvcl bench``: kernel speed as a fraction of the device's own streaming-read bandwidth,
and against peers on the same inputs, all measured in ONE run on one machine.

What is measured (each case: warm-up, then ``repeats`` rounds in which one sample of the case
and one of the streaming read are taken in turn; a sample is the wall clock around ``n``
back-to-back enqueues + one ``queue.finish()``, divided by ``n``, after one untimed lead-in
call, with ``n`` chosen after the warm-up so a sample lasts at least 5 ms — 1 on a CPU, tens on
a GPU where one launch takes ~0.1 ms and the host round trip would otherwise be timed; inputs
already on the device). A
case's ``seconds`` is the median of its samples; its utilisation is the median over rounds of
(case GB/s / read GB/s) of the same round — a ratio of two medians taken seconds apart would
carry the host's drift (the dev VM's read moves between 15 and 28 GB/s) — and its
``device_read_gbps`` is ``gbps / utilisation``, the read bandwidth that ratio implies:

* ``stream_read``: a plain wide-vector read kernel over a large buffer — the device limit.
* ``paged_decode``: one decode step of one layer (1 new query token per sequence, GQA), the
  shape of targets.md (B=4, Hq=32, Hkv=8, D=128, L=2048, block 16), in every KV dtype (int8
  and int4 twice: float logits and the integer path, ``int8_dot`` of :mod:`kvcl.ops.decode_attention`;
  ``extra["int8_dot"]`` says which, ``extra["int8_dot_auto"]`` whether ``"auto"`` picks it; int4
  with two values a byte); plus
  long context (B=1, L=32768, split-K), many sequences (B=64, L=512) and the GPU target shape
  of targets.md P7 (B=16, L=4096, fp32 and fp16).
* ``paged_write``: fused split-QKV → q/k RMS-norm → RoPE → quantize → scatter of a
  2048-token prefill.
* ``onnx_bridge`` (``onnx_model``; ``kvcl bench`` full runs use the synthetic decoder of
  :mod:`kvcl.onnx.benchmodel`, ``--onnx-model synthetic smollm2`` adds the real-weights model of
  :mod:`kvcl.onnx.models`): the ONNX bridge's decode step at 16, 256 and 4096 tokens against the
  same model fed past_key_values, each timed on its own, with where the step's time goes (a
  second table), and ``onnx_hook_overhead``, the custom op's cost per call (targets.md P6, P8).
* ``perplexity`` (``--perplexity MODEL``, opt-in): the quality of each KV dtype, the
  pooled perplexity of :func:`kvcl.onnx.perplexity.english_corpus` (eight segments) teacher
  forced through the bridge, against fp32 KV and the bounds of issue 19, with the original model fed past_key_values as
  the harness's check (a table of its own; :func:`kvcl.bench_bridge.perplexity_records`).
* peers on the decode shape: onnxruntime ``com.microsoft.GroupQueryAttention`` on the CPU
  with the KV cache bound in place (IOBinding) as fp32, int8 and int4 (its quantized caches,
  static per-channel scales; issue 19), and the grouped numpy reference (fp32), each sampled in
  turn with kvcl's decode of that shape and dtype; the speedup is the median of the rounds'
  ratios. The other KV dtypes of ``paged_decode`` are sampled in turn with the read and with
  the fp32 decode, for their ``speedup_vs_fp32`` (targets.md P3) the same way.

Each kvcl record's ``extra`` holds ``seconds_range`` and ``read_gbps_range``: the fastest and
slowest sample of the case and of the read sampled with it (how noisy the machine was).

What bounds each decode case is measured in the same run: ``compute_seconds`` is the time of
the case with its page table pointed into two blocks (K/V stay in the caches: the kernel's
arithmetic and page walk alone), as the median ratio to the case over rounds sampled in turn
(``compute_fraction``) times the case's seconds; ``memory_seconds`` its bytes at the read's
speed. The larger is the step's floor: ``bound`` says which, ``utilization_ceiling`` is the
utilisation at that floor. From them, the speedups' ceilings: ``speedup_vs_fp32_ceiling`` (kvcl
fp32 over this case at its floor: how far targets.md P3 can go with this kernel's arithmetic)
and, on peer rows, ``speedup_ceiling`` (peer seconds over the fp32 case's ``memory_seconds``: the
speedup of a kernel that read every byte at the streaming read's speed, P2's ceiling).

Bytes per decode case: ``Σ_seq L · H_kv · (2·D·bytes_per_elem + 2·scale_bytes)`` plus page table,
queries and output. Utilisation = (bytes / seconds) / stream-read bandwidth. Speedup of a peer
row = peer seconds / kvcl seconds (> 1: kvcl is faster).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import pyopencl.array as cla

from .dtypes import KV_DTYPES, kv_dtype
from .errors import InvalidArgument
from .ops import decode_attention as attention_ops
from .ops import paged_write as write_ops
from .ops.stream_read import empty_partial, stream_read
from .reference.quantize import encode_kv
from .runtime import Device, resolve_device
from .table import format_table


@dataclass
class Record:
    """One row of the results (also one JSON record)."""

    case: str
    kv_dtype: str
    shape: dict
    seconds: float
    bytes: int
    gbps: float
    device_read_gbps: float
    utilization: float
    peer: "str | None" = None
    speedup: "float | None" = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _calibrate(run: Callable[[], object], sync: Callable[[], object], warmup: int, min_sample: float,
               max_inner: int) -> int:
    """Back-to-back calls per sample so that one sample lasts at least ``min_sample`` seconds."""
    t_warm = float("inf")
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        run()
        sync()
        t_warm = min(t_warm, time.perf_counter() - t0)
    return int(min(max_inner, max(1, math.ceil(min_sample / max(t_warm, 1e-9)))))


def _sample(run: Callable[[], object], sync: Callable[[], object], inner: int) -> float:
    """Seconds per call of ``inner`` back-to-back calls, after one untimed lead-in call: a job
    sampled right after another one would otherwise pay for the switch (worker threads waking
    up, the other job's threads still spinning) on its first call; on the dev VM kvcl's fp32
    decode sampled in turn with numpy measured 3.25 ms without the lead-in, 2.87 ms with it, and
    2.67 ms alone."""
    run()
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        run()
    sync()
    return (time.perf_counter() - t0) / inner


def timeit(run: Callable[[], object], sync: Callable[[], object], *, warmup: int = 2, repeats: int = 7,
           min_sample: float = 5e-3, max_inner: int = 200) -> float:
    """Median seconds per ``run()``: ``warmup`` untimed calls, then ``repeats`` samples of ``n``
    back-to-back calls and one ``sync()`` each, ``n`` sized from the warm-up so a sample lasts
    at least ``min_sample`` seconds (at most ``max_inner`` calls)."""
    return timeit_interleaved([(run, sync)], warmup=warmup, repeats=repeats, min_sample=min_sample,
                              max_inner=max_inner)[0]


def sample_interleaved(jobs, *, warmup: int = 2, repeats: int = 7, min_sample: float = 5e-3,
                       max_inner: int = 200, seed: int = 0) -> list[np.ndarray]:
    """Every sample (seconds per call) of each ``(run, sync)`` in ``jobs``, taken in turn:
    ``repeats`` rounds of one sample per job, so sample ``i`` of every job comes from round ``i``
    and saw the same moment of the machine. Each round takes the jobs in a new random order
    (``seed``): in a fixed order, the job that always follows the 256 MiB streaming read measured
    1.12x slower on the dev VM than the identical kernel sampled later in the round."""
    inners = [_calibrate(run, sync, warmup, min_sample, max_inner) for run, sync in jobs]
    times: list[list[float]] = [[] for _ in jobs]
    order = list(range(len(jobs)))
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for i in order:
            run, sync = jobs[i]
            times[i].append(_sample(run, sync, inners[i]))
    return [np.asarray(t) for t in times]


def timeit_interleaved(jobs, *, warmup: int = 2, repeats: int = 7, min_sample: float = 5e-3,
                       max_inner: int = 200, spread: "list | None" = None) -> list[float]:
    """Median seconds per call of each ``(run, sync)`` in ``jobs``, their samples taken in turn
    (:func:`sample_interleaved`) so that every job sees the same machine: on a shared host the
    memory bandwidth available moves by 2x within minutes, and a ratio of two medians taken
    minutes apart would measure that, not the code. ``spread``, when given, receives each job's
    (fastest, slowest) sample."""
    times = sample_interleaved(jobs, warmup=warmup, repeats=repeats, min_sample=min_sample,
                               max_inner=max_inner)
    if spread is not None:
        spread.extend((float(t.min()), float(t.max())) for t in times)
    return [float(np.median(t)) for t in times]


def paired_ratio(num: np.ndarray, den: np.ndarray) -> float:
    """Median over rounds of ``num[i] / den[i]``: the ratio of two jobs sampled in turn, each
    round's pair taken at the same moment (steadier than a ratio of medians on a drifting host)."""
    return float(np.median(np.asarray(num) / np.asarray(den)))


# ---- the device limit ---------------------------------------------------------------------------

class StreamReader:
    """The streaming-read kernel over an ``nbytes`` buffer, ready to time (``run`` + ``sync``)."""

    def __init__(self, dev: Device, nbytes: int = 256 << 20):
        self.nbytes = min(nbytes, dev.info.max_alloc_bytes // 2) // 16 * 16
        self.src = cla.empty(dev.queue, self.nbytes // 4, np.float32)
        self.src.fill(1.0)
        self.partial = empty_partial(dev.queue)
        self.sync = dev.queue.finish

    def run(self):
        return stream_read(self.src, self.partial)


def measure_stream_read(dev: Device, *, nbytes: int = 256 << 20, repeats: int = 7) -> tuple[float, float]:
    """(seconds, GB/s) of reading ``nbytes`` once with the streaming-read kernel."""
    reader = StreamReader(dev, nbytes)
    seconds = timeit(reader.run, reader.sync, repeats=repeats)
    return seconds, reader.nbytes / seconds / 1e9


# ---- decode attention ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeShape:
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    kv_len: int
    block_size: int = 16

    def as_dict(self) -> dict:
        return asdict(self)


def decode_bytes(shape: DecodeShape, dtype_name: str) -> int:
    """Bytes a decode step must move: every cached K/V byte + page table + q + out."""
    dt = kv_dtype(dtype_name)
    kv = shape.batch * shape.kv_len * shape.num_kv_heads * 2 * dt.row_bytes(shape.head_dim)   # scales included
    pages = shape.batch * math.ceil(shape.kv_len / shape.block_size)
    table = 4 * (pages + 2 * shape.batch + 1 + shape.batch + 1)
    q_and_out = 2 * shape.batch * shape.num_q_heads * shape.head_dim * 4
    return kv + table + q_and_out


class DecodeCase:
    """Random pools in ``dtype`` with a shuffled page table, ready to launch on ``dev``;
    ``int8_dot`` is passed to the launcher (int8: ``"float"`` / ``"integer"`` logits, None its
    default)."""

    def __init__(self, dev: Device, shape: DecodeShape, dtype_name: str, seed: int = 0, int8_dot=None):
        self.dev, self.shape, self.dtype = dev, shape, kv_dtype(dtype_name)
        self.int8_dot = int8_dot
        rng = np.random.default_rng(seed)
        s = shape
        pages_per_seq = math.ceil(s.kv_len / s.block_size)
        num_blocks = s.batch * pages_per_seq
        queue = dev.queue
        value_shape = (s.num_kv_heads, s.block_size, s.head_dim)   # one block's values (int4: 2 a byte)
        self.pools = []
        for _ in range(2):
            # encode a modest random slab and tile it: generating GBs of normals is slow
            slab_blocks = min(num_blocks, 64)
            data, scales = encode_kv(rng.standard_normal((slab_blocks,) + value_shape).astype(np.float32), self.dtype)
            reps = -(-num_blocks // slab_blocks)
            pool = cla.to_device(queue, np.ascontiguousarray(np.tile(data, (reps, 1, 1, 1))[:num_blocks]))
            sc = None
            if scales is not None:
                sc = cla.to_device(queue, np.ascontiguousarray(np.tile(scales, (reps, 1, 1))[:num_blocks]))
            self.pools.append((pool, sc))
        indices = rng.permutation(num_blocks).astype(np.int32)
        self.indptr = cla.to_device(queue, (np.arange(s.batch + 1) * pages_per_seq).astype(np.int32))
        self.indices = cla.to_device(queue, indices)
        last = s.kv_len - (pages_per_seq - 1) * s.block_size
        self.last_page_len = cla.to_device(queue, np.full(s.batch, last, np.int32))
        self.q_indptr = cla.to_device(queue, np.arange(s.batch + 1, dtype=np.int32))
        self.queries = cla.to_device(queue, rng.standard_normal((s.batch, s.num_q_heads, s.head_dim)).astype(np.float32))
        self.out = cla.empty(queue, (s.batch, s.num_q_heads, s.head_dim), np.float32)

    def in_cache(self, blocks: int = 2) -> "DecodeCase":
        """A twin over the same pools whose page table points into the first ``blocks`` blocks
        only (random pages of them, the same number of pages): its K/V stay in the caches, so
        timing it times the kernel's arithmetic and the page walk, not memory traffic."""
        if blocks < 1:
            raise InvalidArgument(f"blocks: expected >= 1, got {blocks}")
        twin = copy.copy(self)
        n = self.indices.shape[0]
        rng = np.random.default_rng(1)
        pages = rng.integers(0, min(blocks, n), n).astype(np.int32)
        twin.indices = cla.to_device(self.dev.queue, pages)
        twin.out = cla.empty(self.dev.queue, self.out.shape, np.float32)
        return twin

    def run(self):
        (k, ks), (v, vs) = self.pools
        return attention_ops.paged_attention(
            self.queries, k, v, self.indptr, self.indices, self.last_page_len, self.q_indptr, self.out,
            k_scales=ks, v_scales=vs, kv_dtype=self.dtype.name, max_q_len=1, max_kv_len=self.shape.kv_len,
            int8_dot=self.int8_dot)


# ---- fused paged write ----------------------------------------------------------------------------

def write_bytes(tokens: int, hq: int, hkv: int, d: int, dtype_name: str) -> int:
    """Bytes in + out of the fused write: qkv in, cos/sin rows in, q out, K/V (+ scales) out."""
    dt = kv_dtype(dtype_name)
    qkv_in = tokens * (hq + 2 * hkv) * d * 4
    tables = 2 * tokens * (d // 2) * 4
    q_out = tokens * hq * d * 4
    kv_out = tokens * hkv * 2 * dt.row_bytes(d)   # scales included; int4 rows are d / 2 bytes
    return qkv_in + tables + q_out + kv_out + 2 * tokens * 4


class WriteCase:
    def __init__(self, dev: Device, tokens: int, hq: int, hkv: int, d: int, block_size: int, dtype_name: str):
        rng = np.random.default_rng(1)
        queue = dev.queue
        self.dtype = kv_dtype(dtype_name)
        self.kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=block_size,
                       kv_dtype=self.dtype.name, rope="half")
        num_blocks = -(-tokens // block_size) + 1
        pool_shape = (num_blocks, hkv, block_size, self.dtype.row_elems(d))
        self.k = cla.zeros(queue, pool_shape, self.dtype.storage)
        self.v = cla.zeros(queue, pool_shape, self.dtype.storage)
        self.ks = self.vs = None
        if self.dtype.has_scale:
            self.ks = cla.zeros(queue, pool_shape[:3], np.float32)
            self.vs = cla.zeros(queue, pool_shape[:3], np.float32)
        self.qkv = cla.to_device(queue, rng.standard_normal((tokens, (hq + 2 * hkv) * d)).astype(np.float32))
        self.slots = cla.to_device(queue, rng.permutation(num_blocks * block_size)[:tokens].astype(np.int32))
        self.positions = cla.to_device(queue, np.arange(tokens, dtype=np.int32))
        angles = np.arange(tokens)[:, None] / (10000.0 ** (np.arange(d // 2) / (d // 2)))
        self.cos = cla.to_device(queue, np.cos(angles).astype(np.float32))
        self.sin = cla.to_device(queue, np.sin(angles).astype(np.float32))
        self.qn = cla.to_device(queue, np.ones(d, np.float32))
        self.kn = cla.to_device(queue, np.ones(d, np.float32))
        self.q_out = cla.empty(queue, (tokens, hq, d), np.float32)
        self.status = cla.zeros(queue, 1, np.int32)

    def run(self):
        return write_ops.paged_write_qkv(
            self.qkv, self.slots, self.positions, self.k, self.v, self.q_out, k_scales=self.ks,
            v_scales=self.vs, cos=self.cos, sin=self.sin, q_norm_weight=self.qn,
            k_norm_weight=self.kn, status=self.status, **self.kw)


# ---- peers -----------------------------------------------------------------------------------------

#: onnxruntime's quantized GroupQueryAttention caches (2026 releases): kvcl dtype -> (cache element,
#: TensorProto name, kv_cache_bit_width); both with static PER_CHANNEL scales ([1, kv_heads, 1, D])
ORT_QUANT = {"int8": (np.int8, "INT8", 8), "int4": (np.uint8, "UINT8", 4)}


def ort_gqa_peer(shape: DecodeShape, *, threads: int | None = None, kv_dtype: str = "fp32"):
    """onnxruntime GroupQueryAttention (CPU) with the KV cache bound in place: fp32, or the
    int8 / int4 cache of ``k_quant_type`` / ``v_quant_type`` ``PER_CHANNEL`` with
    ``kv_cache_bit_width`` 8 / 4 (int4: two codes a byte, ``head_dim / 2`` bytes a row; one
    static float32 scale per channel and kv head, as onnxruntime's quantized cache has, where
    kvcl's int8 / int4 scale each (token, kv head) row as it is written).

    Returns a zero-argument callable running one decode step (its ``session`` attribute is the
    onnxruntime session), or ``None`` when onnxruntime is not installed. An onnxruntime that
    does not take the quantized cache raises ``RuntimeError`` saying so.
    """
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    b, hq, hkv, d, length = shape.batch, shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.kv_len
    cap = length + 1
    f32 = TensorProto.FLOAT
    inputs = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"]
    attrs = dict(num_heads=hq, kv_num_heads=hkv, scale=1.0 / math.sqrt(d))
    cache_np, cache_t, width = np.float32, f32, d
    scale_inputs = []
    vi = helper.make_tensor_value_info
    if kv_dtype != "fp32":
        if kv_dtype not in ORT_QUANT:
            raise InvalidArgument(f"kv_dtype: expected fp32 or one of {', '.join(ORT_QUANT)}, got {kv_dtype!r}")
        cache_np, tname, bits = ORT_QUANT[kv_dtype]
        cache_t = getattr(TensorProto, tname)
        width = d if bits == 8 else d // 2
        inputs += ["", "", "", "", "", "k_scale", "v_scale"]   # cos/sin, position_ids, bias, head_sink
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=bits)
        scale_inputs = [vi("k_scale", f32, [1, hkv, 1, d]), vi("v_scale", f32, [1, hkv, 1, d])]
    node = helper.make_node("GroupQueryAttention", inputs, ["output", "present_key", "present_value"],
                            domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "gqa", [
        vi("query", f32, [b, 1, hq * d]), vi("key", f32, [b, 1, hkv * d]), vi("value", f32, [b, 1, hkv * d]),
        vi("past_key", cache_t, [b, hkv, cap, width]), vi("past_value", cache_t, [b, hkv, cap, width]),
        vi("seqlens_k", TensorProto.INT32, [b]), vi("total_sequence_length", TensorProto.INT32, [])] + scale_inputs,
        [vi("output", f32, [b, 1, hq * d]), vi("present_key", cache_t, [b, hkv, cap, width]),
         vi("present_value", cache_t, [b, hkv, cap, width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9  # readable by onnxruntime releases older than this onnx
    options = ort.SessionOptions()
    # Its intra-op threads would otherwise busy-wait after every run and take the cores from
    # whatever is sampled next: kvcl's fp32 decode measured 5.1 ms sampled in turn with this
    # session against 2.9 ms with spinning off (2.7 ms alone), while onnxruntime's own time
    # stayed the same (6.1 vs 6.0 ms; dev VM, 12 rounds).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    rng = np.random.default_rng(2)

    def cache():
        if cache_np is np.float32:
            return ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((b, hkv, cap, d)).astype(np.float32))
        info = np.iinfo(cache_np)
        return ort.OrtValue.ortvalue_from_numpy(rng.integers(info.min, info.max + 1, (b, hkv, cap, width)).astype(cache_np))

    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if kv_dtype == "fp32":
            raise
        raise RuntimeError(f"onnxruntime {ort.__version__} does not take a {kv_dtype} GroupQueryAttention "
                           f"cache: {str(exc).splitlines()[0][:200]}") from None
    past_k, past_v = cache(), cache()
    io = session.io_binding()
    if scale_inputs:
        for name in ("k_scale", "v_scale"):
            io.bind_cpu_input(name, np.full((1, hkv, 1, d), 0.02, np.float32))
    io.bind_cpu_input("query", rng.standard_normal((b, 1, hq * d)).astype(np.float32))
    io.bind_cpu_input("key", rng.standard_normal((b, 1, hkv * d)).astype(np.float32))
    io.bind_cpu_input("value", rng.standard_normal((b, 1, hkv * d)).astype(np.float32))
    io.bind_ortvalue_input("past_key", past_k)
    io.bind_ortvalue_input("past_value", past_v)
    io.bind_cpu_input("seqlens_k", np.full(b, length, np.int32))
    io.bind_cpu_input("total_sequence_length", np.array(length + 1, np.int32))
    io.bind_output("output")
    io.bind_ortvalue_output("present_key", past_k)      # in place: present is the past buffer
    io.bind_ortvalue_output("present_value", past_v)

    def run():
        return session.run_with_iobinding(io)

    try:
        run()   # a release that builds the session may still refuse the cache at run time
    except Exception as exc:
        if kv_dtype == "fp32":
            raise
        raise RuntimeError(f"onnxruntime {ort.__version__} does not run a {kv_dtype} GroupQueryAttention "
                           f"cache: {str(exc).splitlines()[0][:200]}") from None
    run.session = session
    return run


def numpy_peer(shape: DecodeShape):
    """The grouped numpy reference (einsum over a contiguous fp32 cache)."""
    rng = np.random.default_rng(3)
    b, hq, hkv, d, length = shape.batch, shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.kv_len
    k = rng.standard_normal((b, hkv, length, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, length, d)).astype(np.float32)
    q = rng.standard_normal((b, hkv, hq // hkv, d)).astype(np.float32)
    scale = np.float32(1.0 / math.sqrt(d))

    def run():
        s = np.einsum("bhgd,bhld->bhgl", q, k) * scale
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        return np.einsum("bhgl,bhld->bhgd", s / s.sum(axis=-1, keepdims=True), v)

    return run


# ---- the run ---------------------------------------------------------------------------------------

TARGET = DecodeShape(batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128, kv_len=2048)
LONG = DecodeShape(batch=1, num_q_heads=32, num_kv_heads=8, head_dim=128, kv_len=32768)
MANY = DecodeShape(batch=64, num_q_heads=32, num_kv_heads=8, head_dim=128, kv_len=512)
GPU = DecodeShape(batch=16, num_q_heads=32, num_kv_heads=8, head_dim=128, kv_len=4096)  # P7
QUICK = DecodeShape(batch=2, num_q_heads=8, num_kv_heads=2, head_dim=64, kv_len=256)


def _decode_cases(shape: DecodeShape) -> list[tuple]:
    """paged_decode in every KV dtype; int8 twice: float logits and the integer path (the
    launcher's ``int8_dot``), each sampled in turn with fp32."""
    cases = []
    for name in KV_DTYPES:
        if name in ("int8", "int4"):   # the formats with an integer path: both paths
            cases += [("paged_decode", "decode", (shape, name, dot)) for dot in ("float", "integer")]
        else:
            cases.append(("paged_decode", "decode", (shape, name)))
    return cases


def plan_cases(quick: bool) -> list[tuple]:
    """(name, kind, args) of every case in run order."""
    if quick:
        return _decode_cases(QUICK) + [
            ("paged_write", "write", (64, 8, 2, 64, 16, "fp32")),
            ("paged_write", "write", (64, 8, 2, 64, 16, "int4"))] + _peer_cases(QUICK)
    cases = _decode_cases(TARGET)
    cases += [("long_context", "decode", (LONG, "fp32")), ("many_sequences", "decode", (MANY, "fp32")),
              ("batch16_4k", "decode", (GPU, "fp32")), ("batch16_4k", "decode", (GPU, "fp16")),
              ("paged_write", "write", (2048, 32, 8, 128, 16, "fp32")),
              ("paged_write", "write", (2048, 32, 8, 128, 16, "int8")),
              ("paged_write", "write", (2048, 32, 8, 128, 16, "int4"))]
    return cases + _peer_cases(TARGET)


def _peer_cases(shape: DecodeShape) -> list[tuple]:
    """onnxruntime's GroupQueryAttention with an fp32, int8 and int4 cache (each paired with
    kvcl's decode of that dtype), and numpy (fp32)."""
    return ([("peer:onnxruntime_gqa", "ort", (shape, dt)) for dt in ("fp32", *ORT_QUANT)]
            + [("peer:numpy", "numpy", (shape, "fp32"))])


SAMPLING = ("interleaved", "blocked")


def run_bench(device=None, *, quick: bool = False, repeats: int = 7, progress: bool = True,
              print_fn=print, sampling: str = "interleaved", onnx_model=None,
              onnx_contexts=(16, 256, 4096)) -> list[Record]:
    """Run every case; return the records (the caller prints, writes JSON and plots).

    ``onnx_model`` (a path or ModelProto of an exported decoder, ``"synthetic"``: the
    realistic-width decoder of :func:`kvcl.onnx.benchmodel.gqa_decoder`, the name of a real model
    of :mod:`kvcl.onnx.models` such as ``"smollm2"`` (skipped with a message when not exported),
    or a list of them): also the ONNX bridge's decode step at each of ``onnx_contexts`` tokens
    against the same model fed past_key_values, with where the step's time goes
    (:func:`kvcl.onnx.timing.bench_step`; each timed on its own, median of 20 steps), and the
    custom-op hook's overhead per call (targets.md P6, P8).

    ``sampling="interleaved"`` (default): every kvcl case is timed interleaved with the streaming
    read (sample by sample), and its utilisation uses that read; every peer is timed interleaved
    with kvcl's fp32 decode of the same shape, and its speedup uses that kvcl time.
    ``"blocked"``: each case is timed on its own and divided by the first, stand-alone read (the
    first record either way) — to check whether interleaving changes a device's figures.
    """
    if sampling not in SAMPLING:
        raise InvalidArgument(f"sampling: expected one of {SAMPLING}, got {sampling!r}")
    interleave = sampling == "interleaved"
    dev = resolve_device(device)
    cases = plan_cases(quick)
    if onnx_model is not None:   # refused before any case runs: not minutes later
        onnx_contexts = [int(c) for c in onnx_contexts]
        if not onnx_contexts or min(onnx_contexts) < 1:
            raise InvalidArgument(f"onnx_contexts: expected context lengths >= 1, got {onnx_contexts}")
        from .bench_bridge import bridge_model
        specs = onnx_model if isinstance(onnx_model, (list, tuple)) else [onnx_model]
        for spec in specs:
            model, label = bridge_model(spec, onnx_contexts, print_fn)
            if model is not None:
                cases.append(("onnx_bridge", "onnx", (model, label, tuple(onnx_contexts))))
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(cases) + 1, desc="kvcl bench", unit="case", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    reader = StreamReader(dev, (32 << 20) if quick else (256 << 20))
    stream_seconds = timeit(reader.run, reader.sync, repeats=repeats)
    read_gbps = reader.nbytes / stream_seconds / 1e9
    records = [Record("stream_read", "-", {"bytes": reader.nbytes}, stream_seconds, reader.nbytes,
                      read_gbps, read_gbps, 1.0, note="wide-vector streaming read: the device limit",
                      extra={"sampling": sampling})]
    if bar:
        bar.update()

    def with_read(run, nbytes, also=None):
        """(seconds, GB/s of the read it is divided by, fp32 speedup or None, sample ranges): the
        run sampled in turn with the read (and with ``also``, kvcl's fp32 decode of the shape,
        when given); the utilisation is the median over rounds of the pair's ratio."""
        jobs = [(reader.run, reader.sync), (run, dev.queue.finish)]
        if also is not None:
            jobs.append((also.run, dev.queue.finish))
        if not interleave:
            jobs = jobs[1:]
        times = sample_interleaved(jobs, repeats=repeats)
        if not interleave:
            times = [None] + times
        seconds = float(np.median(times[1]))
        extra = {"seconds_range": [float(times[1].min()), float(times[1].max())]}
        if interleave:
            util = paired_ratio(times[0], times[1]) * nbytes / reader.nbytes
            gbps = nbytes / seconds / 1e9 / util   # so that utilisation = gbps / device_read_gbps
            extra["read_gbps_range"] = [reader.nbytes / times[0].max() / 1e9, reader.nbytes / times[0].min() / 1e9]
        else:
            gbps = read_gbps
            extra["read_gbps_range"] = [read_gbps, read_gbps]
        speedup = paired_ratio(times[2], times[1]) if also is not None else None
        return seconds, gbps, speedup, extra

    kvcl_fp32: dict[str, float] = {}
    peer_base = {}
    for name, kind, args in cases:
        if bar:
            bar.set_postfix_str(f"{name} {' '.join(map(str, args[1:])) if kind in ('decode', 'write') else ''}")
        if kind == "decode":
            shape, dtype_name, *dot = args
            if dot == ["integer"] and dtype_name == "int4" and attention_ops.variant_for(dev.device) != "serial":
                continue   # int4's integer path is the serial kernel's: none on this device
            case = DecodeCase(dev, shape, dtype_name, int8_dot=dot[0] if dot else None)
            nbytes = decode_bytes(shape, dtype_name)
            base = peer_base.get(shape) if name == "paged_decode" and dtype_name != "fp32" else None
            seconds, gbps, vs_fp32, ranges = with_read(case.run, nbytes, base)
            records.append(_record(name, dtype_name, shape.as_dict(), seconds, nbytes, gbps))
            records[-1].extra.update(ranges)
            if dot:   # the path this row ran, and whether int8_dot="auto" picks it on this device
                auto = attention_ops.int8_dot_for(dev.device, head_dim=shape.head_dim, kv_dtype=dtype_name,
                                                  context=dev.context, int8_dot="auto")
                records[-1].extra.update(int8_dot=dot[0], int8_dot_auto=auto == dot[0])
            records[-1].extra.update(_bound(case, records[-1], repeats))
            if vs_fp32 is not None:   # P3: sampled in turn with kvcl's fp32 decode of the shape
                ex = records[-1].extra
                ex["speedup_vs_fp32"] = vs_fp32
                # fp32's time over this case's floor: the paired ratio times (case / floor)
                ex["speedup_vs_fp32_ceiling"] = vs_fp32 * seconds / max(ex["compute_seconds"], ex["memory_seconds"])
            if dtype_name == "fp32":
                kvcl_fp32[name] = seconds
                if name == "paged_decode":
                    peer_base[shape] = case   # the peers and other dtypes are timed against this one
            if name == "paged_decode" and dtype_name in ORT_QUANT and (not dot or records[-1].extra["int8_dot_auto"]):
                peer_base[(shape, dtype_name)] = case   # onnxruntime's int8 / int4 cache is timed against it
            del case
        elif kind == "onnx":
            from .bench_bridge import bridge_records
            records.extend(bridge_records(*args, dev, read_gbps))
        elif kind == "write":
            tokens, hq, hkv, d, bs, dtype_name = args
            case = WriteCase(dev, tokens, hq, hkv, d, bs, dtype_name)
            nbytes = write_bytes(tokens, hq, hkv, d, dtype_name)
            seconds, gbps, _, ranges = with_read(case.run, nbytes)
            records.append(_record(name, dtype_name, {"tokens": tokens, "num_q_heads": hq, "num_kv_heads": hkv,
                                                      "head_dim": d, "block_size": bs, "rope": "half",
                                                      "qk_norm": True},
                                   seconds, nbytes, gbps))
            records[-1].extra.update(ranges)
        else:
            records.append(_peer_record(name, kind, *args, dev=dev, records=records, kvcl_cases=peer_base,
                                        kvcl_fp32=kvcl_fp32, read_gbps=read_gbps, interleave=interleave,
                                        repeats=repeats))
        if bar:
            bar.update()
    if bar:
        bar.close()
    return records


def _peer_record(name, kind, shape, dtype_name, *, dev, records, kvcl_cases, kvcl_fp32, read_gbps,
                 interleave, repeats) -> Record:
    """A peer's row: timed in turn with kvcl's decode of the same shape and dtype (the kvcl case
    in ``kvcl_cases``: ``shape`` for fp32, ``(shape, dtype)`` for int8 / int4)."""
    peer = name.split(":")[1]
    try:
        run = ort_gqa_peer(shape, kv_dtype=dtype_name) if kind == "ort" else numpy_peer(shape)
    except RuntimeError as exc:    # this onnxruntime does not take the quantized cache
        return Record(name, dtype_name, shape.as_dict(), float("nan"), 0, float("nan"), read_gbps,
                      float("nan"), peer=peer, note=str(exc))
    if run is None:
        return Record(name, dtype_name, shape.as_dict(), float("nan"), 0, float("nan"), read_gbps,
                      float("nan"), peer=peer, note="onnxruntime not installed")
    ours = kvcl_cases.get(shape if dtype_name == "fp32" else (shape, dtype_name))
    if not interleave or ours is None:
        ours_rec = next((r for r in records if r.case == "paged_decode" and r.kv_dtype == dtype_name
                         and r.shape == shape.as_dict() and r.extra.get("int8_dot_auto", True)), None)
        ours_s = ours_rec.seconds if ours_rec is not None else kvcl_fp32.get("paged_decode")
        seconds = timeit(run, lambda: None, repeats=repeats)
        speedup = seconds / ours_s if ours_s else None
    else:
        ours_t, peer_t = sample_interleaved([(ours.run, dev.queue.finish), (run, lambda: None)], repeats=repeats)
        ours_s, seconds = float(np.median(ours_t)), float(np.median(peer_t))
        speedup = paired_ratio(peer_t, ours_t)
    rec = _record(name, dtype_name, shape.as_dict(), seconds, decode_bytes(shape, dtype_name), read_gbps)
    rec.peer = peer
    rec.speedup = speedup
    rec.extra["kvcl_seconds"] = ours_s
    fp32_rec = next((r for r in records if r.case == "paged_decode" and r.kv_dtype == "fp32"
                     and r.shape == shape.as_dict()), None)
    if dtype_name == "fp32" and fp32_rec is not None and "memory_seconds" in fp32_rec.extra:
        # a kernel reading every byte at the streaming read's speed against this peer
        rec.extra["speedup_ceiling"] = seconds / fp32_rec.extra["memory_seconds"]
    rec.note = (f"speedup = peer seconds / kvcl {dtype_name} paged_decode seconds"
                + (", median of the pairs sampled in turn" if interleave else "")
                + ("" if dtype_name == "fp32" else
                   f"; onnxruntime's {dtype_name} cache: static per-channel scales, bytes counted as kvcl's"))
    return rec


def _bound(case: DecodeCase, rec: Record, repeats: int) -> dict:
    """What bounds a decode case: its arithmetic alone (the case with its pages in cache,
    sampled in turn with the case: ``compute_fraction`` is the median over rounds of the two
    samples' ratio, ``compute_seconds`` that fraction of the case's seconds) against its bytes
    at the streaming read's speed. The larger is the floor of the step; ``utilization_ceiling``
    is the utilisation at that floor (1.0 when the bytes are the bound)."""
    twin = case.in_cache()
    sync = case.dev.queue.finish
    full, cached = sample_interleaved([(case.run, sync), (twin.run, sync)], repeats=repeats)
    fraction = paired_ratio(cached, full)   # of the same rounds: the machine's drift cancels
    compute = rec.seconds * fraction
    memory = rec.bytes / (rec.device_read_gbps * 1e9)
    return {"compute_seconds": compute, "compute_fraction": fraction, "memory_seconds": memory,
            "bound": "compute" if compute > memory else "memory",
            "utilization_ceiling": memory / max(compute, memory)}


def _record(case, dtype_name, shape, seconds, nbytes, read_gbps) -> Record:
    gbps = nbytes / seconds / 1e9
    return Record(case, dtype_name, shape, seconds, int(nbytes), gbps, read_gbps, gbps / read_gbps)


def format_records(records: list[Record], device_name: str) -> str:
    rows = []
    for r in records:
        shape = r.shape
        if "kv_len" in shape:
            desc = f"B={shape['batch']} L={shape['kv_len']} Hq={shape['num_q_heads']} Hkv={shape['num_kv_heads']} D={shape['head_dim']}"
        elif "tokens" in shape:
            desc = f"T={shape['tokens']} Hq={shape['num_q_heads']} Hkv={shape['num_kv_heads']} D={shape['head_dim']}"
        elif "context" in shape:
            desc = (f"{str(shape.get('model', '')).split(':')[0]}, context {shape['context']}, "
                    f"B={shape['batch']}, {shape['layers']} layers")
        elif "q_shape" in shape:
            desc = f"per op call, q {tuple(shape['q_shape'])}"
        elif "requests" in shape:
            desc = f"{shape['model']}, {shape['requests']} requests x {shape['new_tokens']} tokens"
        elif "text_sha256" in shape:
            desc = (f"{str(shape['model']).split(':')[0]}, {shape['scored_tokens']} tokens scored, ppl {r.extra['ppl']:.4f}"
                    + (" (past_key_values)" if shape.get("route") == "past_key_values" else ""))
        else:
            desc = f"{shape.get('bytes', 0) / 2**20:.0f} MiB"
        extra = ""
        if r.speedup is not None:
            extra = f"kvcl {r.speedup:.2f}x faster" if r.speedup >= 1 else f"kvcl {1 / r.speedup:.2f}x slower"
            if r.peer == "past_key_values":
                extra += " than past_key_values"
            if "speedup_ceiling" in r.extra:
                extra += f" (<= {r.extra['speedup_ceiling']:.2f}x)"
        elif "speedup_vs_fp32" in r.extra:
            extra = f"{r.extra['speedup_vs_fp32']:.2f}x vs kvcl fp32"
            if "speedup_vs_fp32_ceiling" in r.extra:   # runs recorded before the bound columns lack it
                extra += f" (<= {r.extra['speedup_vs_fp32_ceiling']:.2f}x)"
        bound = "-"
        if "bound" in r.extra:
            bound = r.extra["bound"]
            if bound == "compute":
                bound += f" ({100 * r.extra['utilization_ceiling']:.0f}%)"
        dtype = r.kv_dtype
        if "int8_dot" in r.extra:   # int8's two paths: float or integer logits
            dtype += f" {r.extra['int8_dot']}" + (" (auto)" if r.extra.get("int8_dot_auto") else "")
        rows.append((r.case, dtype, desc, f"{r.seconds * 1e3:.3f}", f"{r.gbps:.1f}" if r.bytes and r.gbps == r.gbps else "-",
                     f"{100 * r.utilization:.0f}%" if r.utilization == r.utilization else "-", bound, extra))
    if records and records[0].extra.get("sampling") == "blocked":
        header = (f"kvcl bench on {device_name}: utilisation = GB/s / GB/s of the streaming read "
                  "(first row); each case timed on its own\n")
    else:
        header = (f"kvcl bench on {device_name}: utilisation = GB/s / GB/s of the streaming read "
                  "sampled in turn with that case; peers sampled in turn with kvcl paged_decode of their kv dtype\n")
    if any("bound" in r.extra for r in records):
        header += ("bound: what the step's floor is, its arithmetic alone (pages in cache) or its bytes at the "
                   "read's speed, with the utilisation at that floor; <=: the speedup with this case at its floor "
                   "(fp32 peers: a kernel reading every fp32 byte at the read's speed)\n")
    table = format_table(["case", "kv dtype", "shape", "ms", "GB/s", "util", "bound", "vs"], rows,
                         align="lllrrrll")
    from .bench_bridge import format_bridge, format_perplexity
    from .bench_serving import format_serving
    return header + table + format_bridge(records) + format_serving(records) + format_perplexity(records)


def write_json(records: list[Record], path, device_info) -> None:
    doc = {"device": device_info.as_row(), "records": [asdict(r) for r in records]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)


def plot(records: list[Record], path, device_name: str) -> None:
    """Utilisation per case against the device limit (1.0), as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.case != "stream_read" and r.utilization == r.utilization]
    labels = [f"{r.case}\n{r.kv_dtype}{' ' + r.extra['int8_dot'] if 'int8_dot' in r.extra else ''}"
              if not r.peer else f"{r.peer}\nfp32" for r in rows]
    colors = ["#999999" if r.peer else "#2a7ab9" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    ax.bar(range(len(rows)), [r.utilization for r in rows], color=colors)
    ax.axhline(1.0, color="#c0392b", linestyle="--", label="streaming-read bandwidth (measured)")
    capped = [(i, r.extra["utilization_ceiling"]) for i, r in enumerate(rows)
              if r.extra.get("bound") == "compute"]
    if capped:
        ax.scatter([i for i, _ in capped], [c for _, c in capped], marker="_", s=400, color="#333333",
                   zorder=3, label="ceiling: the kernel's arithmetic alone (pages in cache)")
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("fraction of device read bandwidth")
    ax.set_title(f"kvcl bench: {device_name}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
