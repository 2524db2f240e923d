"""kvcl.bitpolar (bitpolar's TurboQuant KV cache) on the device, against kvcl.reference.turboquant."""

import numpy as np
import pyopencl.array as cla
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcl
from kvcl import bitpolar as bp
from kvcl.bitpolar import KvCacheCompressor, KvCacheConfig, MultiHeadKvCache, TurboQuantError
from kvcl.ops import turboquant as ops
from kvcl.reference import turboquant as ref

SOURCE = KvCacheConfig(head_dim=8, bits=4, projections=16, seed=42)  # bitpolar's own tests


def snapshot(cache):
    """Everything a cache holds: its length and every stored code, read back from the device."""
    codes = cache._codes
    return codes.length, [np.copy(a) for kind in (0, 1) for a in codes.read(kind)]


def assert_same_state(before, after):
    assert before[0] == after[0]
    for a, b in zip(before[1], after[1]):
        np.testing.assert_array_equal(a, b)


# ---- bitpolar's source tests (d=8, bits=4, proj=16, seed=42) -----------------------------------

def test_push_one(device):
    cache = KvCacheCompressor.new(SOURCE, device=device)
    assert cache.is_empty() and cache.len() == 0
    cache.push(np.full(8, 0.1), np.full(8, 0.2))
    assert cache.len() == 1 and len(cache) == 1 and not cache.is_empty()


def test_five_pushes_give_five_scores(device):
    cache = KvCacheCompressor(SOURCE, device=device)
    for i in range(5):
        cache.push(np.full(8, 0.1 * (i + 1)), np.full(8, 0.05 * (i + 1)))
    scores = cache.attention_scores(np.full(8, 0.1))
    assert scores.shape == (5,) and scores.dtype == np.float32 and np.isfinite(scores).all()


def test_decode_values_shape(device):
    cache = KvCacheCompressor(SOURCE, device=device)
    cache.push(np.arange(8.0), np.arange(8.0) * 0.5)
    values = cache.decode_values()
    assert values.shape == (1, 8) and values.dtype == np.float32


def test_compression_ratio(device):
    cache = KvCacheCompressor(SOURCE, device=device)
    assert cache.compression_ratio() == 1.0                   # empty
    cache.push(np.ones(8), np.ones(8))
    assert cache.compression_ratio() > 0
    assert cache.compression_ratio() == (2 * 8 * 4) / (2 * (3 * 8 + 1 + 2 + 6))


def test_clear(device):
    cache = KvCacheCompressor(SOURCE, device=device)
    cache.push(np.ones(8), np.ones(8))
    cache.clear()
    assert cache.is_empty() and cache.attention_scores(np.ones(8)).shape == (0,)
    assert cache.decode_values().shape == (0, 8) and cache.compression_ratio() == 1.0


def test_multi_head_push_token(device):
    cache = MultiHeadKvCache.new(4, SOURCE, device=device)
    keys = [np.full(8, 0.1 * (h + 1)) for h in range(4)]
    cache.push_token(keys, keys)
    assert cache.len() == 1 and cache.num_heads() == 4


def test_multi_head_scores_shape(device):
    cache = MultiHeadKvCache(2, SOURCE, device=device)
    cache.push_token(np.ones((2, 8)), np.ones((2, 8)))
    scores = cache.attention_scores(np.ones((2, 8)))
    assert scores.shape == (2, 1)


def test_nan_at_index_2(device):
    cache = KvCacheCompressor(SOURCE, device=device)
    key = [1.0, 2.0, float("nan"), 4.0, 5.0, 6.0, 7.0, 8.0]
    with pytest.raises(TurboQuantError.NonFiniteInput) as info:
        cache.push(key, np.ones(8))
    assert info.value.index == 2 and info.value.which == "key"
    assert cache.is_empty()


# ---- device == reference ----------------------------------------------------------------------

# (head_dim, bits, projections, heads): uint8 and uint16 codes, m not a multiple of 8, one pair
CASES = [(8, 4, 16, 1), (64, 8, 40, 3), (16, 12, 9, 2), (2, 16, 1, 1)]


@pytest.mark.parametrize("d,bits,m,heads", CASES, ids=[f"d{c[0]}-b{c[1]}-m{c[2]}-h{c[3]}" for c in CASES])
def test_encode_scores_decode_match_the_reference(device, d, bits, m, heads):
    check_against_reference(device, d, bits, m, heads, tokens=37, seed=11)  # past doublings 16, 32


@settings(deadline=None)
# kernels are specialised per (head_dim, bits, projections): draw those from small sets so the
# builds are reused, and let everything else vary freely
@given(d=st.sampled_from([2, 8, 18, 64]), bits=st.sampled_from([1, 3, 8, 16]), m=st.sampled_from([1, 9, 64]),
       heads=st.integers(1, 3), tokens=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_property_encode_scores_decode_match_the_reference(device, d, bits, m, heads, tokens, seed):
    check_against_reference(device, d, bits, m, heads, tokens=tokens, seed=seed)


def encode_like_device(x, rotation, projections, table, device_codes):
    """``ref.encode``, except that an angle the device put in the neighbouring cell is taken
    from the device when the exact angle lies on the cell boundary within the atan2 error that
    OpenCL allows (6 ulp; NVIDIA's and numpy's atan2 differ there). The residual, signs and
    norms are then recomputed from those codes, so everything else is still compared exactly.
    Any other difference in a code is left for the caller's assertion to report."""
    want = ref.encode(x, rotation, projections, table)
    codes = want["codes"]
    differ = codes != device_codes
    if not differ.any():
        return want
    levels = len(table)
    rotated = ref.matvec_rows(x, rotation[None], num_heads=1)
    u = np.arctan2(rotated[:, 1::2].astype(np.float64), rotated[:, 0::2]) / np.pi * (levels // 2)
    on_boundary = np.abs(u - np.round(u)) <= 2e-6 * np.maximum(1.0, np.abs(u))
    neighbour = np.isin((device_codes.astype(np.int64) - codes) % levels, (1, levels - 1))
    take = differ & on_boundary & neighbour
    if not take.any():
        return want
    codes = np.where(take, device_codes, codes).astype(codes.dtype)
    residual = rotated - ref.polar_decode(codes, want["radii"], table)
    signs, norms = ref.qjl_sketch(residual, projections[None], num_heads=1)
    return {"codes": codes, "radii": want["radii"], "signs": signs, "norms": norms}


def check_against_reference(device, d, bits, m, heads, *, tokens, seed):
    rng = np.random.default_rng(d * bits + seed)
    keys = rng.standard_normal((tokens, heads, d)).astype(np.float32)
    values = (3 * rng.standard_normal((tokens, heads, d))).astype(np.float32)
    keys[0] = 0.0                                  # zero residual: QJL term skipped
    cache = MultiHeadKvCache(heads, KvCacheConfig(d, bits, m, seed), device=device)
    for t in range(tokens):
        cache.push_token(keys[t], values[t])
    queries = rng.standard_normal((heads, d)).astype(np.float32)
    scores = cache.attention_scores(queries)
    stored = [cache._codes.read(kind) for kind in (0, 1)]
    decoded_values = cache._codes.decode(1)
    table = ref.angle_table(bits)
    for h in range(heads):
        rotation, projections = ref.rotation_matrix(d, seed + h), ref.projection_matrix(d, m, seed + h)
        for kind, x in ((0, keys), (1, values)):
            got = stored[kind]
            want = encode_like_device(x[:, h], rotation, projections, table, got.angle_indices[:, h])
            np.testing.assert_array_equal(got.angle_indices[:, h], want["codes"])
            assert got.angle_indices.dtype == ref.code_dtype(bits)
            np.testing.assert_array_equal(got.signs[:, h], want["signs"])
            np.testing.assert_allclose(got.radii[:, h], want["radii"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.norms[:, h], want["norms"], rtol=1e-5, atol=1e-6)
            if kind == 0:
                want_scores = ref.scores(want, queries[h], rotation, projections, table)
                scale = np.abs(want_scores).max()
                np.testing.assert_allclose(scores[h], want_scores, rtol=1e-4, atol=1e-4 * scale)
            else:
                np.testing.assert_allclose(decoded_values[:, h], ref.decode(want, rotation, table),
                                           rtol=1e-5, atol=1e-5)


def test_compressor_is_head_zero_of_a_multi_head_cache(device):
    rng = np.random.default_rng(5)
    keys, values = rng.standard_normal((2, 3, 8)).astype(np.float32)
    single = KvCacheCompressor(SOURCE, device=device)
    multi = MultiHeadKvCache(2, SOURCE, device=device)
    for t in range(3):
        single.push(keys[t], values[t])
        multi.push_token([keys[t], keys[t]], [values[t], values[t]])
    q = rng.standard_normal(8).astype(np.float32)
    np.testing.assert_array_equal(single.attention_scores(q), multi.attention_scores([q, q])[0])
    np.testing.assert_array_equal(single.value_codes().angle_indices,
                                  multi._codes.read(1).angle_indices[:, 0])
    assert single.decode_keys().shape == (3, 8)


# ---- quality: scores approximate q·k/√d ---------------------------------------------------------

def test_scores_correlate_with_exact_attention_logits(device):
    d, tokens = 64, 200
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((tokens, d)).astype(np.float32)
    values = rng.standard_normal((tokens, d)).astype(np.float32)
    cache = KvCacheCompressor(KvCacheConfig(head_dim=d, bits=4, projections=64, seed=1), device=device)
    for k, v in zip(keys, values):
        cache.push(k, v)
    q = rng.standard_normal(d).astype(np.float32)
    exact = keys @ q / np.sqrt(d)
    assert np.corrcoef(cache.attention_scores(q), exact)[0, 1] > 0.9
    assert np.corrcoef(cache.decode_values().ravel(), values.ravel())[0, 1] > 0.9


def test_error_shrinks_as_bits_grow(device):
    d, tokens = 16, 40
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((tokens, d)).astype(np.float32)
    q = rng.standard_normal(d).astype(np.float32)
    exact = keys.astype(np.float64) @ q / np.sqrt(d)
    errors = []
    for bits in (2, 4, 8):
        cache = KvCacheCompressor(KvCacheConfig(d, bits, 16, 9), device=device)
        for k in keys:
            cache.push(k, k)
        errors.append(np.abs(cache.attention_scores(q) - exact).mean())
    assert errors[0] > errors[1] > errors[2], errors


# ---- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,error,attrs", [
    ((0, 4, 16, 1), bp.ZeroDimension, {}),
    ((7, 4, 16, 1), bp.OddDimension, {"dimension": 7}),
    ((bp.MAX_HEAD_DIM + 2, 4, 16, 1), bp.DimensionTooLarge, {"dimension": 4098, "max": 4096}),
    ((8, 0, 16, 1), bp.InvalidBitWidth, {"bits": 0}),
    ((8, 17, 16, 1), bp.InvalidBitWidth, {"bits": 17}),
    ((8, 4, 0, 1), bp.ZeroProjections, {}),
    ((8, 4, 65536, 1), bp.DimensionTooLarge, {"dimension": 65536, "max": 65535}),
    ((0, 0, 0, 1), bp.ZeroDimension, {}),       # bitpolar's order: head_dim first
    ((8, 99, 0, 1), bp.InvalidBitWidth, {}),    # then bits, then projections
], ids=["zero-dim", "odd-dim", "dim-too-large", "bits-0", "bits-17", "zero-proj", "proj-too-large",
        "order-dim", "order-bits"])
def test_constructor_errors(fields, error, attrs):
    for build in (lambda c: KvCacheCompressor.new(c), lambda c: MultiHeadKvCache.new(2, c)):
        with pytest.raises(error) as info:
            build(KvCacheConfig(*fields))
        assert isinstance(info.value, TurboQuantError) and isinstance(info.value, ValueError)
        for name, value in attrs.items():
            assert getattr(info.value, name) == value


def test_constructor_argument_errors():
    with pytest.raises(bp.EmptyInput, match="num_heads must be > 0") as info:
        MultiHeadKvCache(0, SOURCE)
    assert info.value.message == "num_heads must be > 0"
    with pytest.raises(kvcl.DtypeError):
        KvCacheCompressor(KvCacheConfig(8.0, 4, 16, 1))
    with pytest.raises(kvcl.InvalidArgument):
        KvCacheCompressor(KvCacheConfig(8, 4, 16, -1))
    with pytest.raises(kvcl.InvalidArgument):
        KvCacheCompressor(KvCacheConfig(8, 4, 16, 2**64))
    with pytest.raises(kvcl.DtypeError):
        KvCacheCompressor((8, 4, 16, 1))


def test_error_hierarchy_and_fields():
    cases = [
        (bp.OddDimension(3), kvcl.InvalidArgument, ValueError, "dimension must be even, got 3"),
        (bp.DimensionMismatch(8, 7), kvcl.ShapeError, ValueError,
         "dimension mismatch: quantizer expects 8, got 7"),
        (bp.NonFiniteInput(2), kvcl.NonFiniteError, ValueError,
         "input contains non-finite values (NaN or Inf) at index 2"),
        (bp.IndexOutOfBounds(5, 3), kvcl.OutOfRangeError, IndexError, "index 5 out of bounds (length 3)"),
        (bp.DeserializationError("short"), kvcl.InvalidArgument, ValueError,
         "deserialization failed: short"),
        (bp.EmptyInput("x"), kvcl.InvalidArgument, ValueError, "empty input: x"),
    ]
    for exc, kvcl_class, builtin, message in cases:
        assert isinstance(exc, TurboQuantError) and isinstance(exc, kvcl.KvclError)
        assert isinstance(exc, kvcl_class) and isinstance(exc, builtin)
        assert str(exc) == message
        assert getattr(TurboQuantError, type(exc).__name__) is type(exc)
    assert bp.IndexOutOfBounds(5, 3).length == 3 and bp.DeserializationError("r").reason == "r"


def test_push_errors_follow_bitpolars_order_and_change_nothing(device):
    cache = KvCacheCompressor(SOURCE, device=device)
    rng = np.random.default_rng(2)
    for _ in range(16):                                        # full to capacity: a push would grow
        cache.push(rng.standard_normal(8), rng.standard_normal(8))
    before = snapshot(cache)
    bad_value = np.ones(8)
    bad_value[5] = np.inf
    with pytest.raises(bp.NonFiniteInput) as info:             # index within the value
        cache.push(np.ones(8), bad_value)
    assert (info.value.index, info.value.which) == (5, "value")
    with pytest.raises(bp.NonFiniteInput) as info:             # finiteness before length
        cache.push(np.ones(3), [0, 0, 0, -np.inf])
    assert info.value.index == 3
    with pytest.raises(bp.DimensionMismatch) as info:
        cache.push(np.ones(8), np.ones(9))
    assert (info.value.expected, info.value.actual) == (8, 9)
    with pytest.raises(bp.NonFiniteInput):                     # beyond float32: Inf, as `as f32`
        cache.push(np.full(8, 1e39), np.ones(8))
    with pytest.raises(kvcl.ShapeError):
        cache.push(np.ones((2, 4)), np.ones(8))
    with pytest.raises(kvcl.DtypeError):
        cache.push(["a"] * 8, np.ones(8))
    assert_same_state(before, snapshot(cache))
    with pytest.raises(bp.NonFiniteInput) as info:
        cache.attention_scores([0, np.nan] + [0] * 6)
    assert (info.value.index, info.value.which) == (1, "query")
    with pytest.raises(bp.DimensionMismatch):
        cache.attention_scores(np.ones(6))
    with pytest.raises(bp.DimensionMismatch):                  # checked even when empty (kvcl)
        KvCacheCompressor(SOURCE, device=device).attention_scores(np.ones(6))


def test_push_token_is_atomic(device):
    heads = 3
    cache = MultiHeadKvCache(heads, SOURCE, device=device)
    rng = np.random.default_rng(4)
    for _ in range(5):
        cache.push_token(rng.standard_normal((heads, 8)), rng.standard_normal((heads, 8)))
    before = snapshot(cache)
    good = rng.standard_normal((heads, 8))
    bad = good.copy()
    bad[2, 6] = np.nan                                         # the last head: Rust would push heads 0, 1
    with pytest.raises(bp.NonFiniteInput) as info:
        cache.push_token(good, bad)
    assert (info.value.index, info.value.head, info.value.which) == (6, 2, "value")
    short = [good[0], good[1], good[2][:7]]
    with pytest.raises(bp.DimensionMismatch) as info:
        cache.push_token(short, good)
    assert (info.value.expected, info.value.actual) == (8, 7)
    with pytest.raises(bp.DimensionMismatch) as info:
        cache.push_token(good, good[:2])
    assert (info.value.expected, info.value.actual) == (heads, 2)
    with pytest.raises(bp.DimensionMismatch) as info:
        cache.attention_scores(good[:1])
    assert (info.value.expected, info.value.actual) == (heads, 1)
    assert_same_state(before, snapshot(cache))
    assert cache.len() == 5
    cache.push_token(good, good)
    assert cache.len() == 6 and cache.attention_scores(good).shape == (heads, 6)
    cache.clear()
    assert cache.is_empty() and cache.attention_scores(good).shape == (heads, 0)


# ---- launchers --------------------------------------------------------------------------------

def test_launchers_refuse_bad_arguments(queue):
    table = cla.to_device(queue, ref.angle_table(4))
    rotated = cla.zeros(queue, (2, 8), np.float32)
    residual = cla.zeros(queue, (2, 8), np.float32)
    codes = cla.zeros(queue, (4, 2, 1, 4), np.uint8)
    radii = cla.zeros(queue, (4, 2, 1, 4), np.float32)
    ops.polar_encode(rotated, table, codes, radii, residual, row_offset=6).wait()
    with pytest.raises(kvcl.OutOfRangeError):                  # rows 7..8 do not exist
        ops.polar_encode(rotated, table, codes, radii, residual, row_offset=7)
    with pytest.raises(kvcl.DtypeError):                       # 4-bit codes are uint8
        ops.polar_encode(rotated, table, codes.astype(np.uint16), radii, residual)
    with pytest.raises(kvcl.ShapeError):                       # not a 2**bits table
        ops.polar_encode(rotated, cla.zeros(queue, (3, 2), np.float32), codes, radii, residual)
    big = cla.zeros(queue, (3, 8), np.float32)
    with pytest.raises(kvcl.ShapeError, match="offset"):       # the kernels index from the buffer start
        ops.polar_encode(big[1:], table, codes, radii, residual)
    with pytest.raises(kvcl.ShapeError):                       # 3 rows are not [..., 2 heads]
        ops.matvec_rows(big, cla.zeros(queue, (2, 8, 8), np.float32), big, num_heads=2)
