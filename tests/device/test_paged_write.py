"""Fused paged write (kernels/paged_write.cl) against its numpy reference, on every device.

Exactness: with rope "none" and no norm the stored bytes equal ``encode_kv`` of the input bit
for bit. With norm / RoPE the kernel's float rounding may differ from numpy's by an ulp, which
can move a value across a quantisation boundary: decoded values are compared within one step
of the format (int8: one scale; fp16 / fp8: one ulp of the format; fp32: rel 1e-5).
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

import kvcl
import kvcl.ops.paged_write as pw
from kvcl.reference import paged_write as ref
from kvcl.reference.quantize import decode_kv, dequantize_int4_rows, int4_params
from kvcl.runtime import work_items_are_threads

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st

# (kv_dtype, int8_mode)
DTYPES = [("fp32", 0), ("fp16", 0), ("int8", 0), ("int8", 1), ("fp8_e4m3", 0), ("fp8_e5m2", 0),
          ("int4", 0)]
DTYPE_IDS = [f"{d}-m{m}" if d == "int8" else d for d, m in DTYPES]

# (mantissa bits, smallest subnormal step) of the float formats
_ULP = {"fp16": (10, 2.0**-24), "fp8_e4m3": (3, 2.0**-9), "fp8_e5m2": (2, 2.0**-16)}

LARGEST_ERROR: dict = {}  # per dtype, for the report printed by the last test


# ---- building a case --------------------------------------------------------------------------

def make_case(rng, *, T, num_q_heads, num_kv_heads, head_dim, block_size, kv_dtype, int8_mode=0,
              rope="half", q_norm=False, k_norm=False, num_blocks=None, neg_slots=0,
              max_position=128, scale=1.0):
    D = head_dim
    dt = kvcl.kv_dtype(kv_dtype)
    if num_blocks is None:
        num_blocks = max(2, -(-T // block_size) + 2)  # spare blocks: some slots stay unwritten
    num_slots = num_blocks * block_size
    assert num_slots >= T
    slots = rng.permutation(num_slots)[:T].astype(np.int32)  # shuffled, across block boundaries
    if neg_slots:
        slots[rng.choice(T, size=min(neg_slots, T), replace=False)] = -1
    qkv = (rng.standard_normal((T, (num_q_heads + 2 * num_kv_heads) * D)) * scale).astype(np.float32)
    pool_shape = (num_blocks, num_kv_heads, block_size, dt.row_elems(D))
    # old contents: random bytes, so "untouched" is visible
    k_pool = rng.integers(0, 256, size=pool_shape[:-1] + (dt.row_elems(D) * dt.bytes_per_elem,), dtype=np.uint8)
    k_pool = k_pool.view(dt.storage).reshape(pool_shape)
    v_pool = rng.integers(0, 256, size=k_pool.nbytes, dtype=np.uint8).view(dt.storage).reshape(pool_shape)
    k_scales = v_scales = None
    if dt.has_scale:
        sdt = np.uint16 if int8_mode == 1 else np.float32
        k_scales = rng.uniform(0.5, 2.0, pool_shape[:-1]).astype(np.float32)
        v_scales = rng.uniform(0.5, 2.0, pool_shape[:-1]).astype(np.float32)
        if int8_mode == 1:
            k_scales = k_scales.astype(np.float16).view(sdt)
            v_scales = v_scales.astype(np.float16).view(sdt)
    ang = (np.arange(max_position)[:, None]
           * (10000.0 ** (-np.arange(D // 2) / (D // 2)))[None, :]).astype(np.float32)
    case = dict(
        qkv=qkv, slot_mapping=slots, positions=rng.integers(0, max_position, T).astype(np.int32),
        k_pool=k_pool, v_pool=v_pool,
        q_out=rng.standard_normal((T, num_q_heads, D)).astype(np.float32),
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=D, block_size=block_size,
        kv_dtype=kv_dtype, int8_mode=int8_mode, k_scales=k_scales, v_scales=v_scales,
        cos=np.cos(ang) if rope != "none" else None, sin=np.sin(ang) if rope != "none" else None,
        q_norm_weight=rng.uniform(0.5, 1.5, D).astype(np.float32) if q_norm else None,
        k_norm_weight=rng.uniform(0.5, 1.5, D).astype(np.float32) if k_norm else None,
        eps=1e-6, rope=rope, status=np.zeros(1, np.int32),
    )
    return case


_ARRAYS = ("qkv", "slot_mapping", "positions", "k_pool", "v_pool", "q_out", "k_scales", "v_scales",
           "cos", "sin", "q_norm_weight", "k_norm_weight", "status")


def run_both(device, case):
    """(device outputs, reference outputs) as dicts with q_out, k_pool, v_pool, k_scales, v_scales, status."""
    q = device.queue
    dev = {k: (cl_array.to_device(q, np.ascontiguousarray(v)) if k in _ARRAYS and v is not None else v)
           for k, v in case.items()}
    ev = pw.paged_write_qkv(dev["qkv"], dev["slot_mapping"], dev["positions"], dev["k_pool"],
                            dev["v_pool"], dev["q_out"],
                            **{k: v for k, v in dev.items() if k not in (
                                "qkv", "slot_mapping", "positions", "k_pool", "v_pool", "q_out")})
    assert isinstance(ev, cl.Event)
    ev.wait()
    names = ("q_out", "k_pool", "v_pool", "k_scales", "v_scales", "status")
    got = {k: None if dev[k] is None else dev[k].get() for k in names}
    want = dict(zip(names, ref.paged_write_qkv(**case)))
    return got, want


def written_rows(case):
    """Mask [num_blocks, num_kv_heads, block_size]: the pool rows this call targets."""
    bs = case["block_size"]
    nb = case["k_pool"].shape[0]
    mask = np.zeros(case["k_pool"].shape[:3], dtype=bool)
    for s in case["slot_mapping"]:
        if 0 <= s < nb * bs:
            mask[s // bs, :, s % bs] = True
    return mask


def _record(name, err):
    LARGEST_ERROR[name] = max(LARGEST_ERROR.get(name, 0.0), float(err))


def assert_matches(case, got, want, *, exact):
    name = case["kv_dtype"] + ("-m1" if case["int8_mode"] == 1 else "")
    np.testing.assert_array_equal(got["status"], want["status"])
    # Q: rel 1e-5 of each row's largest value (exact with neither norm nor RoPE)
    if exact:
        np.testing.assert_array_equal(got["q_out"], want["q_out"])
    else:
        rowmax = np.max(np.abs(want["q_out"]), axis=-1, keepdims=True)
        err = np.abs(got["q_out"] - want["q_out"])
        assert np.all(err <= 1e-5 * rowmax + 1e-30), f"q_out: max err {err.max()}"
        _record("q_out", (err / np.maximum(rowmax, 1e-30)).max())
    mask = written_rows(case)
    for pool, scales in (("k_pool", "k_scales"), ("v_pool", "v_scales")):
        g, w = got[pool], want[pool]
        # rows not targeted keep their old bytes exactly (reference == old contents there)
        np.testing.assert_array_equal(g[~mask], case[pool][~mask], err_msg=f"{pool}: untouched rows changed")
        if got[scales] is not None:
            np.testing.assert_array_equal(got[scales][~mask], case[scales][~mask])
        if exact:
            np.testing.assert_array_equal(g, w, err_msg=pool)
            if got[scales] is not None:
                np.testing.assert_array_equal(got[scales], want[scales], err_msg=scales)
            if mask.any():
                _record(name, 0.0)
            continue
        if not mask.any():
            continue
        gs = None if got[scales] is None else got[scales][mask]
        ws = None if want[scales] is None else want[scales][mask]
        if case["kv_dtype"] == "int4":   # compared in the rotated basis, where the codes live
            gd = dequantize_int4_rows(g[mask], gs, rotated=True).astype(np.float64)
            wd = dequantize_int4_rows(w[mask], ws, rotated=True).astype(np.float64)
        else:
            gd = decode_kv(g[mask], gs, case["kv_dtype"]).astype(np.float64)
            wd = decode_kv(w[mask], ws, case["kv_dtype"]).astype(np.float64)
        rowmax = np.max(np.abs(wd), axis=-1, keepdims=True)
        err = np.abs(gd - wd)
        dt = case["kv_dtype"]
        if dt == "fp32":
            tol = 1e-5 * rowmax + 1e-30
        elif dt == "int8":
            sg = decode_kv(np.ones_like(g[mask][..., :1]), gs, "int8").astype(np.float64)
            sw = decode_kv(np.ones_like(w[mask][..., :1]), ws, "int8").astype(np.float64)
            rel = 1e-5 if case["int8_mode"] == 0 else 2.0**-10
            assert np.all(np.abs(sg - sw) <= rel * sw), f"{scales}: scales differ"
            # one quantisation step (+ the effect of an fp16 scale rounding the other way)
            tol = np.maximum(sg, sw) * 1.0001 + 127 * np.abs(sg - sw)
            _record(name + " (in steps)", (err / np.maximum(sw, 1e-30)).max())
        elif dt == "int4":
            (sg, lg), (sw, lw) = [(a[..., None].astype(np.float64), b[..., None].astype(np.float64))
                                  for a, b in (int4_params(gs), int4_params(ws))]
            # the float16 scale and minimum: at most one float16 step apart (inputs within 1e-5)
            assert np.all(np.abs(sg - sw) <= 2.0**-10 * np.abs(sw)), f"{scales}: scales differ"
            assert np.all(np.abs(lg - lw) <= 2.0**-10 * np.abs(lw) + 2.0**-24), f"{scales}: minimums differ"
            tol = np.maximum(np.abs(sg), np.abs(sw)) * 1.0001 + 15 * np.abs(sg - sw) + np.abs(lg - lw)
            _record(name + " (in steps)", (err / np.maximum(sw, 1e-30)).max())
        else:
            man, sub = _ULP[dt]
            tol = np.maximum(np.abs(gd), np.abs(wd)) * 2.0**-man + sub + 1e-5 * rowmax
        assert np.all(err <= tol), f"{pool} ({dt}): max err {err.max()}, worst excess {(err - tol).max()}"
        _record(name, (err / np.maximum(rowmax, 1e-30)).max())


# ---- exact: rope none, no norm ------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 97])
@pytest.mark.parametrize("kv_dtype,int8_mode", DTYPES, ids=DTYPE_IDS)
def test_copy_is_bit_exact(device, kv_dtype, int8_mode, T, block_size):
    rng = np.random.default_rng(T * 31 + block_size)
    case = make_case(rng, T=T, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=block_size,
                     kv_dtype=kv_dtype, int8_mode=int8_mode, rope="none", neg_slots=T // 5)
    got, want = run_both(device, case)
    assert_matches(case, got, want, exact=True)


# ---- norm and RoPE ------------------------------------------------------------------------------

_SHAPES = [  # (T, num_q_heads, num_kv_heads, head_dim, block_size): GQA 1 / 4 / 8
    (17, 4, 4, 128, 16), (97, 8, 2, 64, 16), (15, 8, 1, 64, 1), (16, 16, 2, 128, 1), (1, 8, 1, 128, 16),
]


@pytest.mark.parametrize("norm", ["none", "qk"])
@pytest.mark.parametrize("rope", ["none", "half", "interleaved"])
@pytest.mark.parametrize("kv_dtype,int8_mode", DTYPES, ids=DTYPE_IDS)
def test_norm_rope_matches_reference(device, kv_dtype, int8_mode, rope, norm):
    i = DTYPES.index((kv_dtype, int8_mode)) + 3 * ["none", "half", "interleaved"].index(rope)
    T, Hq, Hkv, D, bs = _SHAPES[(i + (norm == "qk")) % len(_SHAPES)]
    rng = np.random.default_rng(i)
    case = make_case(rng, T=T, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=bs,
                     kv_dtype=kv_dtype, int8_mode=int8_mode, rope=rope, q_norm=norm == "qk",
                     k_norm=norm == "qk", neg_slots=2)
    got, want = run_both(device, case)
    assert_matches(case, got, want, exact=(rope == "none" and norm == "none"))


@pytest.mark.parametrize("q_norm,k_norm", [(True, False), (False, True)])
@pytest.mark.parametrize("kv_dtype", ["fp32", "int8"])
def test_one_sided_norm(device, kv_dtype, q_norm, k_norm):
    rng = np.random.default_rng(7)
    case = make_case(rng, T=33, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                     kv_dtype=kv_dtype, rope="half", q_norm=q_norm, k_norm=k_norm, scale=3.0)
    got, want = run_both(device, case)
    assert_matches(case, got, want, exact=False)


# GPU-shaped launches (several work-items per row, both reductions) on whatever device runs this
@pytest.mark.parametrize("config", [(8, 4, 0), (32, 2, 1), (4, 3, 1)],
                         ids=lambda c: f"LX{c[0]}-ROWS{c[1]}-tree{c[2]}")
def test_launch_shapes(device, monkeypatch, config):
    monkeypatch.setattr(pw, "_force_config", config)
    rng = np.random.default_rng(11)
    for kv_dtype, int8_mode, D, rope in (("int8", 0, 128, "half"), ("fp16", 0, 40, "interleaved"),
                                         ("int8", 1, 64, "none"), ("int4", 0, 128, "half"),
                                         ("int4", 0, 40, "interleaved"), ("int4", 0, 36, "none")):
        case = make_case(rng, T=19, num_q_heads=4, num_kv_heads=2, head_dim=D, block_size=16,
                         kv_dtype=kv_dtype, int8_mode=int8_mode, rope=rope, q_norm=True,
                         k_norm=True, neg_slots=3)
        case["qkv"][3, 4 * D: 5 * D] = np.nan  # one non-finite K row
        got, want = run_both(device, case)
        assert want["status"][0] == (ref.STATUS_NONFINITE if case["slot_mapping"][3] >= 0 else 0)
        assert_matches(case, got, want, exact=False)


# The CPU row kernel (paged_write_rows) in every vector width, on whatever device runs this
@pytest.mark.parametrize("vec", [2, 4, 8, 16], ids=lambda v: f"ROW_VEC{v}")
def test_row_kernel_widths(device, monkeypatch, vec):
    monkeypatch.setattr(pw, "_force_row_vec", vec)
    rng = np.random.default_rng(100 + vec)
    for kv_dtype, int8_mode in DTYPES:
        for rope, norm in (("none", False), ("half", True), ("interleaved", True), ("half", False)):
            case = make_case(rng, T=21, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                             kv_dtype=kv_dtype, int8_mode=int8_mode, rope=rope, q_norm=norm,
                             k_norm=norm, neg_slots=3, scale=float(rng.uniform(0.05, 20)))
            got, want = run_both(device, case)
            assert_matches(case, got, want, exact=(rope == "none" and not norm))
    # non-finite rows, a bad slot and a bad position through the row kernel
    case = make_case(rng, T=9, num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                     kv_dtype="int8", rope="half", q_norm=True, k_norm=True, max_position=16)
    case["qkv"][2, 5 * 32 + 7] = np.nan       # token 2, K head 1
    case["qkv"][6, 6 * 32 + 1] = -np.inf      # token 6, V head 0
    case["slot_mapping"][1] = case["k_pool"].shape[0] * 4
    case["positions"][4] = 16
    got, want = run_both(device, case)
    assert got["status"][0] == ref.STATUS_NONFINITE | ref.STATUS_BAD_SLOT | ref.STATUS_BAD_POSITION
    np.testing.assert_array_equal(got["q_out"][4], case["q_out"][4])
    assert_matches(case, got, want, exact=False)


def test_cpu_devices_use_the_row_kernel(device):
    """The fast path is what a thread-per-work-group CPU (PoCL) gets for the prefill shape of
    targets.md (P5); GPUs and llvmpipe (work-items as SIMD lanes) get the work-group kernel."""
    kernel, lx, rows = pw._kernel(device.context, device.device,
                                  {"KV_DTYPE": 2, "INT8_MODE": 0, "HEAD_DIM": 128, "ROPE": 1,
                                   "Q_NORM": 1, "K_NORM": 1}, 128, 48, "half", 48 * 128)
    want = "paged_write_rows" if work_items_are_threads(device.device) else "paged_write"
    assert kernel.function_name == want
    if want == "paged_write_rows":
        assert lx == 1 and 1 <= rows <= 48
    assert pw.row_vec(device.device, 128, "half", 48 * 128) == (0 if want == "paged_write" else
                                                                pw.row_vec(device.device, 128, "none", 128))
    # widths the data cannot be aligned to are never chosen
    assert pw.row_vec(device.device, 128, "half", 1) == 0
    assert pw.row_vec(device.device, 6, "half", 6 * 8) == 0


def _tricky_rows(rng, head_dim, qmax=127):
    """Rows whose x / scale land on, and one ulp either side of, every rounding boundary of a
    symmetric ``qmax`` code (127: int8)."""
    rows = []
    k = np.arange(-qmax, qmax, dtype=np.float32)
    top = np.nextafter(np.float32(qmax), np.float32(0))
    vals = np.concatenate([k + 0.5, k, np.float32([0.49999997, -0.49999997, 0.5, -0.5, 1e-30,
                                                   -1e-30, 0.0, -0.0, top, -top])])
    vals = np.concatenate([vals, np.nextafter(vals, np.float32(np.inf)),
                           np.nextafter(vals, np.float32(-np.inf))]).astype(np.float32)
    vals = vals[np.abs(vals) <= qmax]
    rng.shuffle(vals)
    body = head_dim - 1
    chunks = [vals[i:i + body] for i in range(0, len(vals), body)]
    for i, c in enumerate(chunks):  # absmax qmax · 2^e: scale exactly 2^e (both int8 modes)
        c = np.pad(c, (0, body - len(c)))
        e = np.float32(2.0 ** (i % 7 - 3))
        rows.append(np.concatenate([[np.float32(qmax) * (1 if i % 2 else -1)], c]) * e)
    for _ in range(8):  # random scales: x = (k + 0.5 ± a little) · scale
        scale = np.float32(rng.uniform(1e-3, 10))
        r = rng.integers(-qmax, qmax, head_dim) + np.float32(0.5)
        r += rng.choice([0, 1, -1], head_dim) * np.float32(2.0**-18)
        rows.append((r.astype(np.float32) * scale).astype(np.float32))
    rows.append(np.zeros(head_dim, np.float32))                       # scale floor, all zeros
    rows.append((rng.standard_normal(head_dim) * 1e-7).astype(np.float32))  # scale FLT_EPSILON
    rows.append(np.full(head_dim, 3.0e38, np.float32))                # huge but finite
    return np.stack(rows).astype(np.float32)


def _tricky_rows_int4(rng, head_dim=64):
    """Rows whose rotated values y land on, and 2^-10 of a step either side of, every rounding
    boundary of int4's codes: y = r * sc + lo with sc = 2^e, lo = -7 sc (float16-exact, and the
    row's min and max at r = 0 and 15, so the kernel finds this sc and lo), r multiples of 2^-10.
    The rows are x = H y / 8 (head_dim 64: P = 64, 1/sqrt(P) = 1/8 exact), which the rotation maps
    back to y exactly: every sum involved needs < 24 significant bits."""
    assert head_dim == 64
    h = np.ones((1, 1))
    while h.shape[0] < head_dim:
        h = np.block([[h, h], [h, -h]])
    k = np.arange(15, dtype=np.float64)
    vals = np.concatenate([k + 0.5, k, [15.0]])
    vals = np.concatenate([vals, vals + 2.0**-10, vals - 2.0**-10])
    vals = vals[(vals >= 0) & (vals <= 15)]
    rng.shuffle(vals)
    body = head_dim - 2
    rows = []
    for i in range(0, len(vals), body):
        c = np.pad(vals[i:i + body], (0, body - len(vals[i:i + body])), constant_values=7.0)
        r = np.concatenate([[0.0, 15.0], c])
        rng.shuffle(r)
        sc = 2.0 ** (i // body % 7 - 3)
        rows.append(h @ (r * sc - 7 * sc) / 8)
    for _ in range(6):   # random rows: codes anywhere, scales and minimums wherever they fall
        rows.append(rng.standard_normal(head_dim) * rng.uniform(1e-3, 30))
    rows.append(np.zeros(head_dim))                                   # scale floor, all zeros
    rows.append(rng.standard_normal(head_dim) * 1e-7)                 # scale FLT_EPSILON
    rows.append(np.full(head_dim, 8000.0))                            # rotated max 64000: in range
    out = np.stack(rows).astype(np.float32)
    assert np.array_equal(out[:-9].astype(np.float64), np.stack(rows[:-9]))   # exact in float32
    return out


@pytest.mark.parametrize("kernel", ["auto", "rows2", "rows8", "rows16", "workgroup"])
@pytest.mark.parametrize("kv_dtype,int8_mode", [("int8", 0), ("int8", 1), ("int4", 0)])
def test_rounding_boundaries_exact(device, monkeypatch, kv_dtype, int8_mode, kernel):
    """int8 / int4 bytes and scales equal the reference bit for bit on every rounding boundary."""
    if kernel.startswith("rows"):
        monkeypatch.setattr(pw, "_force_row_vec", int(kernel[4:]))
    elif kernel == "workgroup":
        monkeypatch.setattr(pw, "_force_config", (1, 4, 1))
    rng = np.random.default_rng(17 + int8_mode)
    D = 64
    rows = _tricky_rows(rng, D) if kv_dtype == "int8" else _tricky_rows_int4(rng, D)
    Hkv = 2
    T = -(-len(rows) // Hkv)
    rows = np.concatenate([rows, np.zeros((T * Hkv - len(rows), D), np.float32)])
    keys = rows.reshape(T, Hkv, D)
    values = -keys[::-1].copy()
    bs = 16
    nb = -(-T // bs) + 1
    slots = rng.permutation(nb * bs)[:T].astype(np.int32)
    q = device.queue
    dt = kvcl.kv_dtype(kv_dtype)
    pools = [np.zeros((nb, Hkv, bs, dt.row_elems(D)), dt.storage) for _ in range(2)]
    sdt = np.uint16 if int8_mode else np.float32
    scales = [np.zeros((nb, Hkv, bs), sdt) for _ in range(2)]
    d = [cl_array.to_device(q, a) for a in pools + scales]
    status = cl_array.zeros(q, 1, np.int32)
    pw.paged_write_kv(cl_array.to_device(q, keys), cl_array.to_device(q, values),
                      cl_array.to_device(q, slots), d[0], d[1], block_size=bs, kv_dtype=kv_dtype,
                      int8_mode=int8_mode, k_scales=d[2], v_scales=d[3], status=status).wait()
    want = ref.paged_write_kv(keys, values, slots, *pools, block_size=bs, kv_dtype=kv_dtype,
                              int8_mode=int8_mode, k_scales=scales[0], v_scales=scales[1])
    for name, g, w in zip(("k_pool", "v_pool", "k_scales", "v_scales"), d, want):
        np.testing.assert_array_equal(g.get(), w, err_msg=name)
    assert status.get()[0] == 0


@pytest.mark.parametrize("kv_dtype,int8_mode", [("fp32", 0), ("int8", 0), ("int8", 1), ("fp16", 0),
                                               ("int4", 0)])
def test_unaligned_sources_exact(device, kv_dtype, int8_mode):
    """Views at odd element offsets (no vector width fits): still exact, via the fallback."""
    rng = np.random.default_rng(23)
    T, Hkv, D, bs = 13, 2, 16, 4
    case = make_case(rng, T=T, num_q_heads=2, num_kv_heads=Hkv, head_dim=D, block_size=bs,
                     kv_dtype=kv_dtype, int8_mode=int8_mode, rope="none", neg_slots=2)
    keys = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    values = (rng.standard_normal((T, Hkv, D)) * 3).astype(np.float32)
    q = device.queue
    d = {k: None if case[k] is None else cl_array.to_device(q, case[k])
         for k in ("slot_mapping", "k_pool", "v_pool", "k_scales", "v_scales")}
    big_k = cl_array.to_device(q, np.concatenate([[np.float32(9)], keys.ravel()]))
    big_v = cl_array.to_device(q, np.concatenate([np.float32([9, 9, 9]), values.ravel()]))
    pw.paged_write_kv(big_k[1:].reshape(T, Hkv, D), big_v[3:].reshape(T, Hkv, D), d["slot_mapping"],
                      d["k_pool"], d["v_pool"], block_size=bs, kv_dtype=kv_dtype,
                      int8_mode=int8_mode, k_scales=d["k_scales"], v_scales=d["v_scales"]).wait()
    want = ref.paged_write_kv(keys, values, case["slot_mapping"], case["k_pool"], case["v_pool"],
                              block_size=bs, kv_dtype=kv_dtype, int8_mode=int8_mode,
                              k_scales=case["k_scales"], v_scales=case["v_scales"])
    for name, w in zip(("k_pool", "v_pool", "k_scales", "v_scales"), want):
        if w is not None:
            np.testing.assert_array_equal(d[name].get(), w, err_msg=name)
    # a fused qkv view at an odd offset (rope "none", no norm: exact)
    big = cl_array.to_device(q, np.concatenate([[np.float32(5)], case["qkv"].ravel()]))
    dev = {k: (cl_array.to_device(q, np.ascontiguousarray(v)) if k in _ARRAYS and v is not None else v)
           for k, v in case.items()}
    dev["qkv"] = big[1:].reshape(case["qkv"].shape)
    outs = ("q_out", "k_pool", "v_pool", "k_scales", "v_scales", "status")
    pw.paged_write_qkv(dev["qkv"], dev["slot_mapping"], dev["positions"], dev["k_pool"], dev["v_pool"],
                       dev["q_out"], **{k: v for k, v in dev.items() if k not in (
                           "qkv", "slot_mapping", "positions", "k_pool", "v_pool", "q_out")}).wait()
    got = {k: None if dev[k] is None else dev[k].get() for k in outs}
    assert_matches(case, got, dict(zip(outs, ref.paged_write_qkv(**case))), exact=True)


# ---- the plain write of computed keys / values --------------------------------------------------

@pytest.mark.parametrize("kv_dtype,int8_mode", DTYPES, ids=DTYPE_IDS)
def test_paged_write_kv_exact(device, kv_dtype, int8_mode):
    rng = np.random.default_rng(5)
    T, Hkv, D, bs = 37, 4, 64, 16
    case = make_case(rng, T=T, num_q_heads=1, num_kv_heads=Hkv, head_dim=D, block_size=bs,
                     kv_dtype=kv_dtype, int8_mode=int8_mode, rope="none", neg_slots=4)
    keys = (rng.standard_normal((T, Hkv, D)) * 2).astype(np.float32)
    values = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    keys[5, 1, 3] = np.inf  # row not written, status bit 0
    q = device.queue
    d = {k: None if case[k] is None else cl_array.to_device(q, case[k])
         for k in ("slot_mapping", "k_pool", "v_pool", "k_scales", "v_scales", "status")}
    # keys as a view at an offset inside a larger buffer: the (buffer, offset, stride) path
    big = cl_array.to_device(q, np.concatenate([np.zeros((1, Hkv, D), np.float32), keys]))
    ev = pw.paged_write_kv(big[1:], cl_array.to_device(q, values), d["slot_mapping"], d["k_pool"],
                           d["v_pool"], block_size=bs, kv_dtype=kv_dtype, int8_mode=int8_mode,
                           k_scales=d["k_scales"], v_scales=d["v_scales"], status=d["status"])
    ev.wait()
    want = ref.paged_write_kv(keys, values, case["slot_mapping"], case["k_pool"], case["v_pool"],
                              block_size=bs, kv_dtype=kv_dtype, int8_mode=int8_mode,
                              k_scales=case["k_scales"], v_scales=case["v_scales"])
    for name, w in zip(("k_pool", "v_pool", "k_scales", "v_scales", "status"), want):
        if w is None:
            assert d[name] is None
        else:
            np.testing.assert_array_equal(d[name].get(), w, err_msg=name)
    assert want[-1][0] == (ref.STATUS_NONFINITE if case["slot_mapping"][5] >= 0 else 0)


# ---- non-finite rows, bad slots and positions ----------------------------------------------------

@pytest.mark.parametrize("kv_dtype,int8_mode", [("fp32", 0), ("int8", 0), ("int8", 1), ("fp8_e4m3", 0),
                                               ("int4", 0)])
def test_nonfinite_row_not_written(device, kv_dtype, int8_mode):
    rng = np.random.default_rng(3)
    T, Hq, Hkv, D = 9, 4, 2, 64
    case = make_case(rng, T=T, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=4,
                     kv_dtype=kv_dtype, int8_mode=int8_mode, rope="half", q_norm=True, k_norm=True)
    case["qkv"][2, (Hq + 1) * D + 7] = np.nan        # token 2, K head 1
    case["qkv"][6, (Hq + Hkv) * D + 1] = np.inf      # token 6, V head 0
    case["qkv"][4, 3] = np.nan                       # token 4, Q head 0: written anyway
    got, want = run_both(device, case)
    assert got["status"][0] & ref.STATUS_NONFINITE
    bs = case["block_size"]
    s2, s6 = case["slot_mapping"][2], case["slot_mapping"][6]
    np.testing.assert_array_equal(got["k_pool"][s2 // bs, 1, s2 % bs], case["k_pool"][s2 // bs, 1, s2 % bs])
    np.testing.assert_array_equal(got["v_pool"][s6 // bs, 0, s6 % bs], case["v_pool"][s6 // bs, 0, s6 % bs])
    if case["k_scales"] is not None:
        assert got["k_scales"][s2 // bs, 1, s2 % bs] == case["k_scales"][s2 // bs, 1, s2 % bs]
    # the other rows of the same tokens were written
    assert not np.array_equal(got["k_pool"][s2 // bs, 0, s2 % bs], case["k_pool"][s2 // bs, 0, s2 % bs])
    assert not np.array_equal(got["v_pool"][s2 // bs, 1, s2 % bs], case["v_pool"][s2 // bs, 1, s2 % bs])
    assert np.isnan(got["q_out"][4, 0]).all()
    finite = np.isfinite(want["q_out"]).all(axis=-1)
    got["q_out"][~finite] = want["q_out"][~finite] = 0
    assert_matches(case, got, want, exact=False)


def test_bad_slot_and_position_set_status(device):
    rng = np.random.default_rng(4)
    case = make_case(rng, T=6, num_q_heads=2, num_kv_heads=1, head_dim=8, block_size=4,
                     kv_dtype="fp32", rope="half", num_blocks=2, max_position=16)
    case["slot_mapping"][1] = 8          # == num_slots: K/V of token 1 not written, Q written
    case["positions"][4] = 16            # == max_position: nothing of token 4 written
    got, want = run_both(device, case)
    assert got["status"][0] == ref.STATUS_BAD_SLOT | ref.STATUS_BAD_POSITION
    np.testing.assert_array_equal(got["q_out"][4], case["q_out"][4])
    assert not np.array_equal(got["q_out"][1], case["q_out"][1])
    assert_matches(case, got, want, exact=False)


def test_zero_tokens_returns_event(device):
    q = device.queue
    kp = cl_array.zeros(q, (2, 1, 4, 8), np.float32)
    ev = pw.paged_write_qkv(cl_array.zeros(q, (0, 24), np.float32), cl_array.zeros(q, 0, np.int32),
                            cl_array.zeros(q, 0, np.int32), kp, kp.copy(),
                            cl_array.zeros(q, (0, 1, 8), np.float32), num_q_heads=1,
                            num_kv_heads=1, head_dim=8, block_size=4, rope="none")
    ev.wait()


# ---- property test ------------------------------------------------------------------------------

@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 40), Hkv=st.integers(1, 3),
       group=st.sampled_from([1, 2, 4]), D=st.sampled_from([2, 6, 8, 64]),
       block_size=st.sampled_from([1, 3, 16]), dtype=st.sampled_from(DTYPES),
       rope=st.sampled_from(["none", "half", "interleaved"]), norm=st.booleans(),
       neg=st.integers(0, 5))
def test_property_matches_reference(device, seed, T, Hkv, group, D, block_size, dtype, rope, norm, neg):
    rng = np.random.default_rng(seed)
    case = make_case(rng, T=T, num_q_heads=Hkv * group, num_kv_heads=Hkv, head_dim=D,
                     block_size=block_size, kv_dtype=dtype[0], int8_mode=dtype[1], rope=rope,
                     q_norm=norm, k_norm=norm, neg_slots=neg, scale=float(rng.uniform(0.01, 10)))
    got, want = run_both(device, case)
    assert_matches(case, got, want, exact=(rope == "none" and not norm))


# ---- bad input: clear errors naming the argument, nothing enqueued -------------------------------

def _good_args(q):
    T, Hq, Hkv, D, bs = 3, 4, 2, 8, 4
    return dict(
        qkv=cl_array.zeros(q, (T, (Hq + 2 * Hkv) * D), np.float32),
        slot_mapping=cl_array.to_device(q, np.arange(T, dtype=np.int32)),
        positions=cl_array.zeros(q, T, np.int32),
        k_pool=cl_array.zeros(q, (2, Hkv, bs, D), np.int8),
        v_pool=cl_array.zeros(q, (2, Hkv, bs, D), np.int8),
        q_out=cl_array.zeros(q, (T, Hq, D), np.float32),
        num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=bs, kv_dtype="int8",
        k_scales=cl_array.zeros(q, (2, Hkv, bs), np.float32),
        v_scales=cl_array.zeros(q, (2, Hkv, bs), np.float32),
        cos=cl_array.zeros(q, (16, D // 2), np.float32), sin=cl_array.zeros(q, (16, D // 2), np.float32),
        q_norm_weight=cl_array.zeros(q, D, np.float32), rope="half",
    )


def _call(a):
    a = dict(a)
    return pw.paged_write_qkv(a.pop("qkv"), a.pop("slot_mapping"), a.pop("positions"), a.pop("k_pool"),
                              a.pop("v_pool"), a.pop("q_out"), **a)


@pytest.mark.parametrize("change,error,name", [
    (lambda a, q: a.update(qkv=cl_array.zeros(q, (3, 100), np.float32)), kvcl.ShapeError, "qkv"),
    (lambda a, q: a.update(qkv=cl_array.zeros(q, (3, 64), np.float64)), kvcl.DtypeError, "qkv"),
    (lambda a, q: a.update(slot_mapping=cl_array.zeros(q, 4, np.int32)), kvcl.ShapeError, "slot_mapping"),
    (lambda a, q: a.update(slot_mapping=cl_array.zeros(q, 3, np.int64)), kvcl.DtypeError, "slot_mapping"),
    (lambda a, q: a.update(positions=cl_array.zeros(q, 2, np.int32)), kvcl.ShapeError, "positions"),
    (lambda a, q: a.update(k_pool=cl_array.zeros(q, (2, 2, 4, 8), np.float32)), kvcl.DtypeError, "k_pool"),
    (lambda a, q: a.update(k_pool=cl_array.zeros(q, (2, 3, 4, 8), np.int8)), kvcl.ShapeError, "k_pool"),
    (lambda a, q: a.update(v_pool=cl_array.zeros(q, (3, 2, 4, 8), np.int8)), kvcl.ShapeError, "v_pool"),
    (lambda a, q: a.update(k_scales=None), kvcl.InvalidArgument, "k_scales"),
    (lambda a, q: a.update(v_scales=cl_array.zeros(q, (2, 2, 4), np.uint16)), kvcl.DtypeError, "v_scales"),
    (lambda a, q: a.update(q_out=cl_array.zeros(q, (3, 4, 6), np.float32)), kvcl.ShapeError, "q_out"),
    (lambda a, q: a.update(rope="neox"), kvcl.InvalidArgument, "rope"),
    (lambda a, q: a.update(cos=None), kvcl.InvalidArgument, "cos"),
    (lambda a, q: a.update(sin=cl_array.zeros(q, (16, 3), np.float32)), kvcl.ShapeError, "sin"),
    (lambda a, q: a.update(q_norm_weight=cl_array.zeros(q, 7, np.float32)), kvcl.ShapeError, "q_norm_weight"),
    (lambda a, q: a.update(kv_dtype="int3"), kvcl.InvalidArgument, "kv_dtype"),
    (lambda a, q: a.update(kv_dtype="int4", k_pool=cl_array.zeros(q, (2, 2, 4, 4), np.int8)),
     kvcl.DtypeError, "k_pool"),
    # int4 pools hold head_dim / 2 bytes a row, not head_dim
    (lambda a, q: a.update(kv_dtype="int4", k_pool=cl_array.zeros(q, (2, 2, 4, 8), np.uint8),
                           v_pool=cl_array.zeros(q, (2, 2, 4, 8), np.uint8)), kvcl.ShapeError, "k_pool"),
    (lambda a, q: a.update(kv_dtype="int4", int8_mode=1, k_pool=cl_array.zeros(q, (2, 2, 4, 4), np.uint8),
                           v_pool=cl_array.zeros(q, (2, 2, 4, 4), np.uint8)), kvcl.InvalidArgument, "int8_mode"),
    (lambda a, q: a.update(int8_mode=2), kvcl.OutOfRangeError, "int8_mode"),
    (lambda a, q: a.update(head_dim=7, qkv=cl_array.zeros(q, (3, 56), np.float32)), kvcl.InvalidArgument, "head_dim"),
    (lambda a, q: a.update(block_size=0), kvcl.OutOfRangeError, "block_size"),
    (lambda a, q: a.update(status=cl_array.zeros(q, 2, np.int32)), kvcl.ShapeError, "status"),
    (lambda a, q: a.update(kv_dtype="fp32", k_pool=cl_array.zeros(q, (2, 2, 4, 8), np.float32),
                           v_pool=cl_array.zeros(q, (2, 2, 4, 8), np.float32)), kvcl.InvalidArgument, "k_scales"),
    (lambda a, q: a.update(slot_mapping=cl_array.zeros(q, 6, np.int32)[3:]), kvcl.InvalidArgument, "slot_mapping"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_raises_naming_argument(device, change, error, name):
    q = device.queue
    a = _good_args(q)
    before = a["k_pool"].get().copy()
    change(a, q)
    with pytest.raises(error, match=rf"^{name}\b"):
        _call(a)
    np.testing.assert_array_equal(_good_args(q)["k_pool"].get(), before)


def test_bad_input_other_context(device):
    other = kvcl.Device(device=device.device)
    a = _good_args(device.queue)
    a["k_pool"] = cl_array.zeros(other.queue, (2, 2, 4, 8), np.int8)
    with pytest.raises(kvcl.DeviceMismatchError, match="^k_pool"):
        _call(a)


def test_bad_input_paged_write_kv(device):
    q = device.queue
    keys = cl_array.zeros(q, (3, 2, 8), np.float32)
    pool = cl_array.zeros(q, (2, 2, 4, 8), np.float32)
    slots = cl_array.zeros(q, 3, np.int32)
    with pytest.raises(kvcl.ShapeError, match="^values"):
        pw.paged_write_kv(keys, cl_array.zeros(q, (3, 2, 6), np.float32), slots, pool, pool.copy(), block_size=4)
    with pytest.raises(kvcl.InvalidArgument, match="^keys"):
        pw.paged_write_kv(cl_array.zeros(q, (3, 2, 7), np.float32), cl_array.zeros(q, (3, 2, 7), np.float32),
                          slots, pool, pool.copy(), block_size=4)
    with pytest.raises(kvcl.ShapeError, match="^k_pool"):
        pw.paged_write_kv(keys, keys.copy(), slots, pool, pool.copy(), block_size=2)


def test_report_largest_errors():
    """Not a check: prints the largest error seen per dtype (run with -s)."""
    for name, err in sorted(LARGEST_ERROR.items()):
        print(f"paged_write largest error {name}: {err:.3g} (relative to the row's absmax)")
