"""The bad-input matrix: every public entry point × every way a caller can get it wrong.

Each row makes a fresh, non-empty object, calls one entry point wrongly, and checks three
things: a kvcl exception of the expected class (a subclass of the natural built-in), a message
that names the argument, and a deep snapshot (host fields + every device buffer's bytes)
identical before and after. The suite summary prints the totals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyopencl.array as cla
import pytest

import kvcl
from kvcl import bitpolar, ferrum, forgellm, oxibonsai
from kvcl.engine import PagedKVCache, StaleStepError

from .state import state_of

F32 = np.float32


@dataclass
class Case:
    entry: str          # the public entry point
    category: str       # shape | dtype | non-finite | range | capacity | sequence | device | kind
    make: Callable      # device -> (object whose state is compared, context dict)
    call: Callable      # (object, context) -> None; must raise
    raises: type
    names: str          # a substring the message must contain (the argument's name)


def engine(device, dtype="int8"):
    cache = PagedKVCache(2, 2, 8, num_blocks=6, block_size=4, dtype=dtype, device=device)
    a, b = cache.add_sequence(), cache.add_sequence()
    step = cache.plan([a, b], [5, 3])
    rng = np.random.default_rng(0)
    cache.write(0, step, rng.standard_normal((8, 2, 8)).astype(F32), rng.standard_normal((8, 2, 8)).astype(F32))
    step = cache.plan([a], [2])
    other = kvcl.Device(device=device.device)          # same hardware, another OpenCL context
    return cache, {"a": a, "b": b, "step": step, "good": np.ones((2, 2, 8), F32), "other": other}


def engine_int4(device):
    return engine(device, "int4")


def engine_freed(device, dtype="int8"):
    """An engine whose planned step is stale (sequence a freed) and whose sequence b is freed."""
    cache, ctx = engine(device, dtype)
    cache.free(ctx["a"])
    cache.free(ctx["b"])
    return cache, ctx


def nan_like(x, where=(0,)):
    y = np.array(x, dtype=F32, copy=True)
    y[where] = np.nan
    return y


def foreign(ctx, shape):
    return cla.to_device(ctx["other"].queue, np.ones(shape, F32))


E = "PagedKVCache."
CASES = [
    # ---- the engine ---------------------------------------------------------------------------
    Case(E + "plan", "capacity", engine, lambda c, x: c.plan([x["a"], x["b"]], [30, 1]), kvcl.OutOfBlocks, "out of KV blocks"),
    Case(E + "plan", "sequence", engine, lambda c, x: c.plan([x["a"], 99], [1, 1]), IndexError, "99"),
    Case(E + "plan", "range", engine, lambda c, x: c.plan([x["a"]], [-1]), IndexError, "num_new_tokens"),
    Case(E + "plan", "shape", engine, lambda c, x: c.plan([x["a"], x["b"]], [1]), ValueError, "num_new_tokens"),
    Case(E + "plan", "kind", engine, lambda c, x: c.plan([x["a"]], [1.5]), TypeError, "num_new_tokens"),
    Case(E + "plan", "shape", engine, lambda c, x: c.plan([x["a"]], [2], token_ids=[[1]]), ValueError, "token_ids"),
    Case(E + "write", "shape", engine, lambda c, x: c.write(0, x["step"], np.ones((3, 2, 8), F32), x["good"]), kvcl.ShapeError, "keys"),
    Case(E + "write", "dtype", engine, lambda c, x: c.write(0, x["step"], x["good"], x["good"].astype(np.float64)), kvcl.DtypeError, "values"),
    Case(E + "write", "non-finite", engine, lambda c, x: c.write(0, x["step"], nan_like(x["good"]), x["good"]), kvcl.NonFiniteError, "keys"),
    Case(E + "write", "non-finite", engine, lambda c, x: c.write(0, x["step"], x["good"], x["good"] * np.inf), kvcl.NonFiniteError, "values"),
    Case(E + "write", "range", engine, lambda c, x: c.write(2, x["step"], x["good"], x["good"]), IndexError, "layer"),
    Case(E + "write", "kind", engine, lambda c, x: c.write(0, x["step"], x["good"].tolist(), x["good"]), TypeError, "keys"),
    Case(E + "write", "kind", engine, lambda c, x: c.write(0, "step", x["good"], x["good"]), TypeError, "step"),
    Case(E + "write", "device", engine, lambda c, x: c.write(0, x["step"], foreign(x, (2, 2, 8)), x["good"]), kvcl.DeviceMismatchError, "keys"),
    Case(E + "write_qkv", "shape", engine, lambda c, x: c.write_qkv(0, x["step"], np.ones((2, 60), F32), num_q_heads=4, rope="none"), kvcl.ShapeError, "qkv"),
    Case(E + "write_qkv", "kind", engine, lambda c, x: c.write_qkv(0, x["step"], np.ones((2, 64), F32), num_q_heads=4, rope="spiral"), kvcl.InvalidArgument, "rope"),
    Case(E + "write_qkv", "shape", engine, lambda c, x: c.write_qkv(0, x["step"], np.ones((2, 64), F32), num_q_heads=4, cos=np.ones((3, 4), F32), sin=np.ones((3, 4), F32)), kvcl.ShapeError, "cos"),
    Case(E + "write_qkv", "non-finite", engine, lambda c, x: c.write_qkv(0, x["step"], nan_like(np.ones((2, 64))), num_q_heads=4, rope="none"), kvcl.NonFiniteError, "qkv"),
    Case(E + "write_qkv", "shape", engine, lambda c, x: c.write_qkv(0, x["step"], np.ones((2, 64), F32), num_q_heads=4, rope="none", q_norm_weight=np.ones(7, F32)), kvcl.ShapeError, "q_norm_weight"),
    Case(E + "write_qkv", "range", engine, lambda c, x: c.write_qkv(0, x["step"], np.ones((2, 48), F32), num_q_heads=3, rope="none"), kvcl.InvalidArgument, "num_q_heads"),
    Case(E + "attend_qkv", "range", engine, lambda c, x: c.attend_qkv(0, x["step"], np.ones((2, 64), F32), num_q_heads=4, rope="none", window=-1), IndexError, "window"),
    Case(E + "attend_qkv", "non-finite", engine, lambda c, x: c.attend_qkv(0, x["step"], np.ones((2, 64), F32), num_q_heads=4, rope="none", scale=float("inf")), kvcl.NonFiniteError, "scale"),
    Case(E + "attend_qkv", "shape", engine, lambda c, x: c.attend_qkv(0, x["step"], np.ones((2, 60), F32), num_q_heads=4, rope="none"), kvcl.ShapeError, "qkv"),
    Case(E + "attend_qkv", "non-finite", engine, lambda c, x: c.attend_qkv(0, x["step"], nan_like(np.ones((2, 64))), num_q_heads=4, rope="none"), kvcl.NonFiniteError, "qkv"),
    Case(E + "attend_qkv", "sequence", engine_freed, lambda c, x: c.attend_qkv(0, x["step"], np.ones((2, 64), F32), num_q_heads=4, rope="none"), StaleStepError, "step"),
    Case(E + "attend", "shape", engine, lambda c, x: c.attend(0, x["step"], np.ones((2, 3, 8), F32)), kvcl.ShapeError, "queries"),
    Case(E + "attend", "non-finite", engine, lambda c, x: c.attend(0, x["step"], nan_like(np.ones((2, 4, 8)))), kvcl.NonFiniteError, "queries"),
    Case(E + "attend", "range", engine, lambda c, x: c.attend(0, x["step"], np.ones((2, 4, 8), F32), window=-1), IndexError, "window"),
    Case(E + "attend", "non-finite", engine, lambda c, x: c.attend(0, x["step"], np.ones((2, 4, 8), F32), scale=float("nan")), kvcl.NonFiniteError, "scale"),
    Case(E + "attend", "device", engine, lambda c, x: c.attend(0, x["step"], foreign(x, (2, 4, 8))), kvcl.DeviceMismatchError, "queries"),
    Case(E + "attend", "sequence", engine_freed, lambda c, x: c.attend(0, x["step"], np.ones((2, 4, 8), F32)), StaleStepError, "step"),
    Case(E + "write", "sequence", engine_freed, lambda c, x: c.write(0, x["step"], x["good"], x["good"]), StaleStepError, "step"),
    Case(E + "fork", "sequence", engine, lambda c, x: c.fork(1234), IndexError, "1234"),
    Case(E + "free", "sequence", engine_freed, lambda c, x: c.free(x["b"]), IndexError, "freed"),
    Case(E + "plan", "sequence", engine_freed, lambda c, x: c.plan([x["a"]], [1]), IndexError, "freed"),
    Case(E + "seq_len", "sequence", engine, lambda c, x: c.seq_len(77), IndexError, "77"),
    Case(E + "read", "range", engine, lambda c, x: c.read(5, x["a"]), IndexError, "layer"),
    Case(E + "read", "sequence", engine, lambda c, x: c.read(0, 42), IndexError, "42"),
    Case(E + "add_sequence", "shape", engine, lambda c, x: c.add_sequence(prefix_tokens="abc"), kvcl.ShapeError, "prefix_tokens"),
    Case(E + "add_sequence", "kind", engine, lambda c, x: c.add_sequence(prefix_tokens=[1.5, 2.0]), kvcl.DtypeError, "prefix_tokens"),
    # int4 pools (head_dim / 2 bytes a row): the same refusals, the same bytes kept
    Case(E + "write", "shape", engine_int4, lambda c, x: c.write(0, x["step"], np.ones((2, 2, 4), F32), x["good"]), kvcl.ShapeError, "keys"),
    Case(E + "write", "non-finite", engine_int4, lambda c, x: c.write(0, x["step"], x["good"], nan_like(x["good"], (1, 1, 7))), kvcl.NonFiniteError, "values"),
    Case(E + "write_qkv", "non-finite", engine_int4, lambda c, x: c.write_qkv(0, x["step"], nan_like(np.ones((2, 64)), (1, 40)), num_q_heads=4, rope="none"), kvcl.NonFiniteError, "qkv"),
    Case(E + "attend", "shape", engine_int4, lambda c, x: c.attend(0, x["step"], np.ones((2, 4, 4), F32)), kvcl.ShapeError, "queries"),
    # a row whose rotated values pass the float16 minimum (head_dim 8: 30000s rotate to 84853)
    Case(E + "write", "range", engine_int4, lambda c, x: c.write(0, x["step"], x["good"], np.full((2, 2, 8), 3e4, F32)), kvcl.OutOfRangeError, "values"),
    Case("StepCalls.write_attend", "range", engine_int4, lambda c, x: c.step_calls(x["step"], num_q_heads=4).write_attend(
        0, np.full((2, 2, 8), 3e4, F32), x["good"], np.ones((2, 4, 8), F32)), kvcl.OutOfRangeError, "keys"),
    Case(E + "attend_qkv", "sequence", lambda d: engine_freed(d, "int4"), lambda c, x: c.attend_qkv(0, x["step"], np.ones((2, 64), F32), num_q_heads=4, rope="none"), StaleStepError, "step"),
]


# ---- the mirrors ---------------------------------------------------------------------------------

def oxi_kv(device):
    cache = oxibonsai.KvCache(2, 2, 4, 8, device=device)
    cache.store_key(0, 1, 0, np.arange(4, dtype=F32))
    cache.advance()
    return cache, {}


def _full_oxi(device):
    cache, _ = oxi_kv(device)
    while cache.seq_len() < cache.max_seq_len():
        cache.advance()
    return cache, {}


def oxi_quant(device):
    layer = oxibonsai.QuantizedKvLayer(2, 2, 4, device=device)
    layer.push(np.ones(8, F32), np.ones(8, F32))
    return layer, {}


def _full_quant(device):
    layer, _ = oxi_quant(device)
    layer.push(np.ones(8, F32), np.ones(8, F32))
    return layer, {}


def oxi_quant_cache(device):
    cache = oxibonsai.QuantizedKvCache(2, 4, 2, 4, device=device)
    cache.push_step([np.ones(8, F32)] * 2, [np.ones(8, F32)] * 2)
    return cache, {}


def oxi_fp8(device):
    layer = oxibonsai.Fp8KvLayer.with_capacity(2, 4, 2, oxibonsai.Fp8KvFormat.E4M3, device=device)
    layer.push(np.ones(8, F32), np.ones(8, F32))
    return layer, {}


def oxi_prefix(device):
    cache = oxibonsai.PrefixCache(1, 4, 1, 1, 4, device=device)
    idx = cache.insert([1, 2, 3, 4], 0, [np.ones(16, F32)], [np.ones(16, F32)])
    cache.get_block(idx).ref_count = 1          # pinned, as the crate's own test does
    return cache, {}


def oxi_prefix_roomy(device):
    cache = oxibonsai.PrefixCache(4, 4, 1, 1, 4, device=device)
    cache.insert([1, 2, 3, 4], 0, [np.ones(16, F32)], [np.ones(16, F32)])
    return cache, {}


def forge(device):
    cache = forgellm.KVCache(2, 2, 4, device=device)
    cache.append(0, np.ones(8, F32), np.ones(8, F32))
    cache.advance()
    return cache, {}


def turbo(device):
    cfg = bitpolar.KvCacheConfig(head_dim=8, bits=4, projections=16, seed=42)
    cache = bitpolar.MultiHeadKvCache(2, cfg, device=device)
    cache.push_token(np.ones((2, 8), F32), np.ones((2, 8), F32))
    return cache, {}


def ferrum_int8(device):
    layer = ferrum.KvInt8.alloc_paged(2, 4, 2, 8, device=device)
    return layer, {"qkv": np.ones((3, (4 + 4) * 8), F32), "cos": np.ones((16, 4), F32), "sin": np.zeros((16, 4), F32)}


def ferrum_write(layer, x, **over):
    args = dict(q_norm_w=None, k_norm_w=None, cos=x["cos"], sin=x["sin"], q_out=None, tokens=3,
                num_q_heads=4, num_kv_heads=2, head_dim=8, pos_offset=0, eps=1e-6, qk_mode=2)
    args.update(over)
    qkv = args.pop("qkv", x["qkv"])
    return ferrum.KvInt8.paged_write(layer, qkv, **args)


Q = oxibonsai.kv_cache_quant
CASES += [
    Case("oxibonsai.KvCache.store_key", "range", oxi_kv, lambda c, x: c.store_key(0, 2, 0, np.ones(4, F32)), IndexError, "head"),
    Case("oxibonsai.KvCache.store_key", "range", oxi_kv, lambda c, x: c.store_key(0, 0, 8, np.ones(4, F32)), IndexError, "pos"),
    Case("oxibonsai.KvCache.store_value", "shape", oxi_kv, lambda c, x: c.store_value(0, 0, 0, np.ones(5, F32)), ValueError, "value"),
    Case("oxibonsai.KvCache.inject_block", "shape", oxi_kv, lambda c, x: c.inject_block(0, 0, 4, np.ones(3, F32), np.ones(3, F32)), ValueError, "keys"),
    Case("oxibonsai.KvCache.advance", "capacity", _full_oxi, lambda c, x: c.advance(), kvcl.CapacityError, "max_seq_len"),
    Case("oxibonsai.QuantizedKvLayer.push", "shape", oxi_quant, lambda c, x: c.push(np.ones(7, F32), np.ones(8, F32)), Q.ShapeMismatch, "expected 8, got 7"),
    Case("oxibonsai.QuantizedKvLayer.push", "capacity", _full_quant, lambda c, x: c.push(np.ones(8, F32), np.ones(8, F32)), Q.CapacityExceeded, "capacity 2"),
    Case("oxibonsai.QuantizedKvLayer.push", "non-finite", oxi_quant, lambda c, x: c.push(nan_like(np.ones(8)), np.ones(8, F32)), kvcl.NonFiniteError, "keys"),
    Case("oxibonsai.QuantizedKvLayer.get_key", "range", oxi_quant, lambda c, x: c.get_key(1, 0), Q.PositionOutOfRange, "position 1"),
    Case("oxibonsai.QuantizedKvLayer.get_value", "range", oxi_quant, lambda c, x: c.get_value(0, 2), Q.HeadOutOfRange, "head index 2"),
    Case("oxibonsai.QuantizedKvCache.push_step", "range", oxi_quant_cache, lambda c, x: c.push_step([np.ones(8, F32)] * 3, [np.ones(8, F32)] * 3), Q.LayerOutOfRange, "layer"),
    Case("oxibonsai.QuantizedKvCache.push_step", "shape", oxi_quant_cache, lambda c, x: c.push_step([np.ones(8, F32), np.ones(6, F32)], [np.ones(8, F32)] * 2), Q.ShapeMismatch, "expected 8, got 6"),
    Case("oxibonsai.Fp8KvLayer.push", "non-finite", oxi_fp8, lambda c, x: c.push(np.ones(8, F32), nan_like(np.ones(8))), kvcl.NonFiniteError, "value"),
    Case("oxibonsai.Fp8KvLayer.get_key", "range", oxi_fp8, lambda c, x: c.get_key(3), IndexError, "3"),
    Case("oxibonsai.PrefixCache.insert", "capacity", oxi_prefix, lambda c, x: c.insert([5, 6, 7, 8], 0, [np.ones(16, F32)], [np.ones(16, F32)]), kvcl.CapacityError, "pinned"),
    Case("oxibonsai.PrefixCache.insert", "range", oxi_prefix_roomy, lambda c, x: c.insert([5, 6, 7, 8], 5, [np.ones(16, F32)], [np.ones(16, F32)]), IndexError, "block_start"),
    Case("oxibonsai.PrefixCache.insert", "shape", oxi_prefix_roomy, lambda c, x: c.insert([5, 6, 7, 8], 0, [np.ones(15, F32)], [np.ones(16, F32)]), kvcl.ShapeError, "keys"),
    Case("forgellm.KVCache.append", "shape", forge, lambda c, x: c.append(0, np.ones(7, F32), np.ones(8, F32)), kvcl.ShapeError, "k"),
    Case("forgellm.KVCache.append", "range", forge, lambda c, x: c.append(2, np.ones(8, F32), np.ones(8, F32)), IndexError, "layer"),
    Case("forgellm.KVCache.append", "kind", forge, lambda c, x: c.append(0, "keys", np.ones(8, F32)), TypeError, "k"),
    Case("forgellm.KVCache.append", "shape", forge, lambda c, x: c.append(0, np.ones(8, F32), np.ones(9, F32)), kvcl.ShapeError, "v"),
    Case("bitpolar.MultiHeadKvCache.push_token", "shape", turbo, lambda c, x: c.push_token(np.ones((2, 8), F32), np.ones((2, 6), F32)), bitpolar.DimensionMismatch, "expects 8, got 6"),
    Case("bitpolar.MultiHeadKvCache.push_token", "shape", turbo, lambda c, x: c.push_token(np.ones((3, 8), F32), np.ones((3, 8), F32)), bitpolar.DimensionMismatch, "expects 2, got 3"),
    Case("bitpolar.MultiHeadKvCache.push_token", "non-finite", turbo, lambda c, x: c.push_token(np.ones((2, 8), F32), nan_like(np.ones((2, 8)), (1, 2))), bitpolar.NonFiniteInput, "index 2"),
    Case("bitpolar.MultiHeadKvCache.attention_scores", "shape", turbo, lambda c, x: c.attention_scores(np.ones((2, 7), F32)), bitpolar.DimensionMismatch, "expects 8, got 7"),
    Case("ferrum.KvInt8.paged_write", "capacity", ferrum_int8, lambda c, x: ferrum_write(c, x, pos_offset=7), kvcl.CapacityError, "capacity"),
    Case("ferrum.KvInt8.paged_write", "shape", ferrum_int8, lambda c, x: ferrum_write(c, x, qkv=np.ones((3, 60), F32)), kvcl.ShapeError, "qkv"),
    Case("ferrum.KvInt8.paged_write", "non-finite", ferrum_int8, lambda c, x: ferrum_write(c, x, qkv=nan_like(x["qkv"], (1, 40))), kvcl.NonFiniteError, "qkv"),
    Case("ferrum.KvInt8.paged_write", "range", ferrum_int8, lambda c, x: ferrum_write(c, x, qk_mode=7), kvcl.KvclError, "qk_mode"),
    Case("ferrum.KvInt8.set_len", "capacity", ferrum_int8, lambda c, x: ferrum.KvInt8.set_len(c, 9), IndexError, "new_len"),
    Case("ferrum.KvInt8.alloc_contig", "kind", lambda d: (None, {"d": d}), lambda c, x: ferrum.KvInt8.alloc_contig(16, 2, 8, device=x["d"]), kvcl.KvclError, "INT8"),
]


# ---- the kernel launchers (kvcl.ops): the state is every array the call may write -----------------

def ops_arrays(device):
    q = device.queue
    rng = np.random.default_rng(1)
    pool = lambda: cla.to_device(q, rng.standard_normal((4, 2, 4, 8)).astype(F32))  # noqa: E731
    i32 = lambda a: cla.to_device(q, np.asarray(a, np.int32))  # noqa: E731
    arrays = {"k": pool(), "v": pool(), "out": cla.zeros(q, (2, 4, 8), F32),
              "q_out": cla.zeros(q, (2, 4, 8), F32), "rows": cla.zeros(q, (3, 8), np.int8),
              "scales": cla.zeros(q, 3, F32)}
    ctx = {"queries": cla.to_device(q, rng.standard_normal((2, 4, 8)).astype(F32)),
           "indptr": i32([0, 1, 2]), "indices": i32([0, 3]), "last": i32([4, 2]), "q_indptr": i32([0, 1, 2]),
           "qkv": cla.to_device(q, rng.standard_normal((2, 64)).astype(F32)), "slots": i32([1, 6]),
           "positions": i32([0, 1]), "x": cla.to_device(q, rng.standard_normal((3, 8)).astype(F32)),
           "other": kvcl.Device(device=device.device)}
    return arrays, ctx


def recast(arr, dtype):
    """A device copy in another dtype, made on the host: a device-side astype would compile a
    conversion kernel, which fails on devices without fp64 (llvmpipe)."""
    return cla.to_device(arr.queue, arr.get().astype(dtype))


def attend(a, x, **over):
    from kvcl.ops.decode_attention import paged_attention
    args = dict(queries=x["queries"], k_pool=a["k"], v_pool=a["v"], indptr=x["indptr"], indices=x["indices"],
                last_page_len=x["last"], q_indptr=x["q_indptr"], out=a["out"])
    args.update(over)
    return paged_attention(**args, max_q_len=1, max_kv_len=4)


def write_qkv(a, x, **over):
    from kvcl.ops.paged_write import paged_write_qkv
    args = dict(qkv=x["qkv"], slot_mapping=x["slots"], positions=x["positions"], k_pool=a["k"], v_pool=a["v"],
                q_out=a["q_out"])
    kw = dict(num_q_heads=4, num_kv_heads=2, head_dim=8, block_size=4, rope="none")
    kw.update({k: over.pop(k) for k in list(over) if k in kw})
    args.update(over)
    return paged_write_qkv(**args, **kw)


def quantize(a, x, **over):
    from kvcl.ops.quantize import quantize_rows
    args = dict(x=x["x"], out=a["rows"], scales=a["scales"], kv_dtype="int8")
    args.update(over)
    return quantize_rows(**args)


def copy(a, x, src, dst):
    from kvcl.ops.blocks import copy_blocks
    return copy_blocks(a["k"], np.array(src, np.int32), np.array(dst, np.int32))


O = "kvcl.ops."
CASES += [
    Case(O + "paged_attention", "dtype", ops_arrays, lambda a, x: attend(a, x, queries=recast(x["queries"], np.float64)), kvcl.DtypeError, "queries"),
    Case(O + "paged_attention", "shape", ops_arrays, lambda a, x: attend(a, x, out=cla.zeros(x["queries"].queue, (2, 4, 4), F32)), kvcl.ShapeError, "out"),
    Case(O + "paged_attention", "dtype", ops_arrays, lambda a, x: attend(a, x, indices=recast(x["indices"], np.int64)), kvcl.DtypeError, "indices"),
    Case(O + "paged_attention", "device", ops_arrays, lambda a, x: attend(a, x, queries=foreign(x, (2, 4, 8))), kvcl.DeviceMismatchError, "another OpenCL context"),
    Case(O + "paged_attention", "kind", ops_arrays, lambda a, x: attend(a, x, queries=np.ones((2, 4, 8), F32)), kvcl.DtypeError, "queries"),
    Case(O + "paged_write_qkv", "shape", ops_arrays, lambda a, x: write_qkv(a, x, num_q_heads=2), kvcl.ShapeError, "qkv"),
    Case(O + "paged_write_qkv", "dtype", ops_arrays, lambda a, x: write_qkv(a, x, slot_mapping=recast(x["slots"], np.int64)), kvcl.DtypeError, "slot_mapping"),
    Case(O + "paged_write_qkv", "kind", ops_arrays, lambda a, x: write_qkv(a, x, rope="spiral"), kvcl.InvalidArgument, "rope"),
    Case(O + "quantize_rows", "shape", ops_arrays, lambda a, x: quantize(a, x, scales=cla.zeros(x["x"].queue, 2, F32)), kvcl.ShapeError, "scales"),
    Case(O + "quantize_rows", "range", ops_arrays, lambda a, x: quantize(a, x, out_row_offset=1), kvcl.KvclError, "out"),
    Case(O + "copy_blocks", "range", ops_arrays, lambda a, x: copy(a, x, [0], [4]), IndexError, "dst_ids"),
    Case(O + "copy_blocks", "kind", ops_arrays, lambda a, x: copy(a, x, [0, 1], [2, 2]), kvcl.InvalidArgument, "dst_ids"),
]


# ---- the ONNX bridge: the state is the generator's cache --------------------------------------------

def bridge(device):
    pytest.importorskip("onnxruntime_extensions", reason="the onnx extra is not installed")
    from pathlib import Path

    from kvcl.onnx.generate import Generator
    model = Path(__file__).resolve().parents[1] / "fixtures" / "onnx" / "llama_dynamo18.onnx"
    gen = Generator(model, device=device, max_tokens=128)
    gen.generate([[1, 2, 3]], 2)
    return gen.cache, {"gen": gen}


G = "onnx.Generator.generate"
CASES += [
    Case(G, "range", bridge, lambda c, x: x["gen"].generate([[1, 999]], 2), IndexError, "input_ids[0]"),
    Case(G, "range", bridge, lambda c, x: x["gen"].generate([[1, -5]], 2), IndexError, "input_ids[0]"),
    Case(G, "shape", bridge, lambda c, x: x["gen"].generate([[]], 2), kvcl.InvalidArgument, "input_ids[0]"),
    Case(G, "capacity", bridge, lambda c, x: x["gen"].generate([[1, 2]], 10_000), kvcl.InvalidArgument, "max_tokens"),
    Case(G, "kind", bridge, lambda c, x: x["gen"].generate([[1.5]], 2), kvcl.DtypeError, "input_ids[0]"),
    Case(G, "range", bridge, lambda c, x: x["gen"].generate([[1]], -1), kvcl.InvalidArgument, "max_new_tokens"),
    Case(G, "range", bridge, lambda c, x: x["gen"].generate([[1]], 2, do_sample=True, temperature=0.0), kvcl.InvalidArgument, "temperature"),
    Case(G, "range", bridge, lambda c, x: x["gen"].generate([[1]], 2, do_sample=True, top_k=0), kvcl.InvalidArgument, "top_k"),
]


# ---- the remaining launchers, mirror getters and persistence ---------------------------------------

def ops_more(device):
    arrays, ctx = ops_arrays(device)
    q = device.queue
    arrays["cache"] = cla.to_device(q, np.arange(2 * 8 * 4, dtype=F32).reshape(2, 8, 4))
    arrays["staged"] = cla.zeros(q, (2, 2, 4, 8), F32)
    from kvcl.ops.stream_read import empty_partial
    arrays["partial"] = empty_partial(q)
    arrays["partial"].fill(0)
    ctx["keys"] = cla.to_device(q, np.ones((2, 2, 8), F32))
    return arrays, ctx


def dequantize(a, x, **over):
    from kvcl.ops.quantize import dequantize_rows
    args = dict(data=a["rows"], out=cla.zeros(a["rows"].queue, (3, 8), F32), scales=a["scales"], kv_dtype="int8")
    args.update(over)
    return dequantize_rows(**args)


def blocks_op(name, *args):
    from kvcl.ops import blocks
    return getattr(blocks, name)(*args)


def contiguous(a, x, **over):
    from kvcl.ops.decode_attention import contiguous_attention
    args = dict(queries=x["queries"], k_cache=a["k"], v_cache=a["v"], kv_lens=x["last"], q_indptr=x["q_indptr"],
                out=a["out"])
    args.update(over)
    return contiguous_attention(**args, max_q_len=1, max_kv_len=4)


def write_kv(a, x, **over):
    from kvcl.ops.paged_write import paged_write_kv
    args = dict(keys=x["keys"], values=x["keys"], slot_mapping=x["slots"], k_pool=a["k"], v_pool=a["v"])
    args.update(over)
    return paged_write_kv(**args, block_size=4)


def stream(a, x, n):
    from kvcl.ops.stream_read import stream_read
    return stream_read(cla.zeros(a["partial"].queue, n, F32), a["partial"])


def saved_engine(device):
    import tempfile
    from pathlib import Path
    cache, ctx = engine(device)
    path = Path(tempfile.mkdtemp()) / "cache.kvcl"
    cache.save(path)
    ctx["path"] = path
    return cache, ctx


def damaged(path, keep):
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-1] + bytes([raw[-1] ^ 1]))
    return path


def oxi_paged(device):
    cache = oxibonsai.PagedKvCache.with_page_size(1, 2, 4, 16, 4, device=device)
    cache.store_key(0, 0, 0, np.ones(4, F32))
    return cache, {}


def turbo_one(device):
    comp = bitpolar.KvCacheCompressor(bitpolar.KvCacheConfig(head_dim=8, bits=4, projections=16, seed=1), device=device)
    comp.push(np.ones(8, F32), np.ones(8, F32))
    return comp, {}


def ferrum_fp16(device):
    layer = ferrum.KvFp16.alloc_contig(8, 2, 8, device=device)
    ferrum.KvFp16.set_len(layer, 4)
    return layer, {}


from kvcl.archive import ArchiveError  # noqa: E402

CASES += [
    Case(O + "dequantize_rows", "range", ops_more, lambda a, x: dequantize(a, x, row_offset=5, out=cla.zeros(a["rows"].queue, (1, 8), F32)), IndexError, "row_offset"),
    Case(O + "dequantize_rows", "kind", ops_more, lambda a, x: dequantize(a, x, scales=None), kvcl.KvclError, "scales"),
    Case(O + "contiguous_attention", "shape", ops_more, lambda a, x: contiguous(a, x, v_cache=a["staged"][:, :, :3]), kvcl.KvclError, "v_cache"),
    Case(O + "paged_write_kv", "shape", ops_more, lambda a, x: write_kv(a, x, values=cla.zeros(x["keys"].queue, (2, 2, 4), F32)), kvcl.ShapeError, "values"),
    Case(O + "extract_blocks", "range", ops_more, lambda a, x: blocks_op("extract_blocks", a["k"], np.array([0, 9], np.int32), a["staged"]), IndexError, "block_ids"),
    Case(O + "inject_blocks", "shape", ops_more, lambda a, x: blocks_op("inject_blocks", a["staged"][:1], np.array([0, 1], np.int32), a["k"]), kvcl.ShapeError, "src"),
    Case(O + "extract_positions", "range", ops_more, lambda a, x: blocks_op("extract_positions", a["cache"], -1, 2, cla.zeros(a["cache"].queue, (2, 2, 4), F32)), IndexError, "start_pos"),
    Case(O + "inject_positions", "dtype", ops_more, lambda a, x: blocks_op("inject_positions", cla.zeros(a["cache"].queue, (2, 2, 4), np.int32), 0, a["cache"]), kvcl.DtypeError, "src"),
    Case(O + "stream_read", "shape", ops_more, lambda a, x: stream(a, x, 24), kvcl.ShapeError, "src"),
    Case(E + "load", "persistence", saved_engine, lambda c, x: PagedKVCache.load(damaged(x["path"], 100)), ArchiveError, "truncated"),
    Case(E + "load", "persistence", saved_engine, lambda c, x: PagedKVCache.load(damaged(x["path"], -1)), ArchiveError, "checksum"),
    Case(E + "save", "path", saved_engine, lambda c, x: c.save(x["path"].parent / "missing" / "c.kvcl"), kvcl.InvalidArgument, "does not exist"),
    Case(E + "save", "path", saved_engine, lambda c, x: c.save(x["path"].parent), kvcl.InvalidArgument, "got the folder"),
    Case(E + "save", "path", saved_engine, lambda c, x: c.save(""), kvcl.InvalidArgument, "empty string"),
    Case("oxibonsai.KvCache.keys_for", "range", oxi_kv, lambda c, x: c.keys_for(0, 0, 9), kvcl.KvclError, "seq_len"),
    Case("oxibonsai.PagedKvCache.store_key", "range", oxi_paged, lambda c, x: c.store_key(0, 2, 0, np.ones(4, F32)), IndexError, "head"),
    Case("oxibonsai.PagedKvCache.store_value", "shape", oxi_paged, lambda c, x: c.store_value(0, 0, 1, np.ones(3, F32)), ValueError, "value"),
    Case("oxibonsai.QuantizedKvLayer.get_keys_at", "range", oxi_quant, lambda c, x: c.get_keys_at(5), Q.PositionOutOfRange, "position 5"),
    Case("oxibonsai.Fp8KvCache.layer", "range", lambda d: (oxibonsai.Fp8KvCache(2, 2, 4, 2, oxibonsai.Fp8KvFormat.E5M2, device=d), {}), lambda c, x: c.layer(2), IndexError, "2"),
    Case("forgellm.KVCache.k", "range", forge, lambda c, x: c.k(2), IndexError, "layer"),
    Case("bitpolar.KvCacheCompressor.push", "non-finite", turbo_one, lambda c, x: c.push(np.ones(8, F32), nan_like(np.ones(8), (3,))), bitpolar.NonFiniteInput, "index 3"),
    Case("bitpolar.KvCacheCompressor.attention_scores", "shape", turbo_one, lambda c, x: c.attention_scores(np.ones(6, F32)), bitpolar.DimensionMismatch, "expects 8, got 6"),
    Case("ferrum.KvFp16.contig_decode_attention", "shape", ferrum_fp16, lambda c, x: ferrum.KvFp16.contig_decode_attention(
        c, np.ones((1, 4, 6), F32), None, ferrum.AttnConfig(num_heads=4, num_kv_heads=2, head_dim=8), 1, 3), kvcl.KvclError, "q"),
    Case("ferrum.KvFp16.set_len", "capacity", ferrum_fp16, lambda c, x: ferrum.KvFp16.set_len(c, 99), IndexError, "new_len"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.entry}-{c.category}-{i}" for i, c in enumerate(CASES)])
def test_refusal_is_clear_and_changes_nothing(device, case, figures):
    obj, ctx = case.make(device)
    before = state_of(obj)
    figures["cases"][case.category] += 1
    figures["entry_points"].add(case.entry)
    with pytest.raises(Exception) as info:
        case.call(obj, ctx)
    exc = info.value
    ok_class = isinstance(exc, case.raises) and isinstance(exc, kvcl.KvclError)
    figures["raised_clear_error"] += ok_class and case.names.lower() in str(exc).lower()
    figures["wrong_exception"] += not ok_class
    assert isinstance(exc, kvcl.KvclError), f"{type(exc).__name__} is not a kvcl error: {exc}"
    assert isinstance(exc, case.raises), f"expected {case.raises.__name__}, got {type(exc).__name__}: {exc}"
    assert case.names.lower() in str(exc).lower(), f"message does not name {case.names!r}: {exc}"
    after = state_of(obj)
    figures["state_changes"] += after != before
    assert after == before, f"{case.entry}: state changed after a refused call"
