"""The numpy twin of common.h's storage formats, checked on its own (no OpenCL)."""

import numpy as np
import pytest

from kvcl.dtypes import INT8_MODE_AWAY, INT8_MODE_EVEN
from kvcl.reference import quantize as ref

FP8 = {"e4m3": (448.0, 0x7E), "e5m2": (57344.0, 0x7B)}  # max finite and its code


def _is_nan_code(code: int, fmt: str) -> bool:
    if fmt == "e4m3":
        return code & 0x7F == 0x7F
    return (code >> 2) & 0x1F == 31 and code & 0x3 != 0


def _is_inf_code(code: int, fmt: str) -> bool:
    return fmt == "e5m2" and code & 0x7F == 0x7C


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_decode_encode_round_trip_over_all_codes(fmt):
    codes = np.arange(256, dtype=np.uint8)
    values = ref.fp8_decode(codes, fmt)
    with np.errstate(invalid="ignore"):  # NaN codes: the reference casts NaN on a discarded branch
        again = ref.fp8_encode(values, fmt)
    max_value, max_code = FP8[fmt]
    for code, value, back in zip(codes.tolist(), values.tolist(), again.tolist()):
        sign = code & 0x80
        if _is_nan_code(code, fmt):
            assert np.isnan(value) and _is_nan_code(back, fmt) and back & 0x80 == sign
        elif _is_inf_code(code, fmt):  # e5m2 infinities saturate to the largest finite value
            assert np.isinf(value) and back == sign | max_code
        else:
            assert back == code, f"{fmt} code {code:#04x} -> {value} -> {back:#04x}"
            assert abs(value) <= max_value
    # -0.0 keeps its sign bit, and decoded values are strictly ordered along the codes
    assert ref.fp8_encode(np.float32(-0.0), fmt) == 0x80
    finite = values[:max_code + 1]
    assert np.all(np.diff(finite) > 0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_saturates_at_the_largest_finite_value(fmt):
    max_value, max_code = FP8[fmt]
    assert ref.fp8_decode(np.uint8(max_code), fmt) == max_value
    big = np.array([max_value, max_value * 1.03, max_value * 1.2, 1e30, np.inf], dtype=np.float32)
    assert ref.fp8_encode(big, fmt).tolist() == [max_code] * 5
    assert ref.fp8_encode(-big, fmt).tolist() == [0x80 | max_code] * 5
    assert ref.fp8_decode(ref.fp8_encode(-big, fmt), fmt).tolist() == [-max_value] * 5


def test_fp8_maxima_and_subnormals():
    assert float(ref.fp8_decode(np.uint8(0x7E), "e4m3")) == 448.0
    assert float(ref.fp8_decode(np.uint8(0x7B), "e5m2")) == 57344.0
    # smallest subnormals: 2^-9 (e4m3) and 2^-16 (e5m2); half of it is a tie that rounds to even (0)
    assert ref.fp8_encode(np.float32(2.0**-9), "e4m3") == 0x01
    assert ref.fp8_encode(np.float32(2.0**-10), "e4m3") == 0x00
    assert ref.fp8_encode(np.float32(1.5 * 2.0**-9), "e4m3") == 0x02  # 1.5 ulp -> 2 (even)
    assert ref.fp8_encode(np.float32(2.0**-16), "e5m2") == 0x01
    assert ref.fp8_encode(np.float32(3 * 2.0**-17), "e5m2") == 0x02


@pytest.mark.parametrize("fmt,name", [("e4m3", "float8_e4m3fn"), ("e5m2", "float8_e5m2")])
def test_fp8_encode_matches_ml_dtypes_within_range(fmt, name):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(7)
    max_value, _ = FP8[fmt]
    x = (rng.standard_normal(20000) * np.exp2(rng.uniform(-24, 18, 20000))).astype(np.float32)
    x = x[np.abs(x) <= max_value]
    theirs = x.astype(getattr(ml_dtypes, name)).view(np.uint8)
    assert np.array_equal(ref.fp8_encode(x, fmt), theirs)


def test_round_half_away_differs_from_numpy_half_even():
    ties = np.array([0.5, 1.5, 2.5, -2.5, 3.5, -0.5], dtype=np.float32)
    assert ref.round_half_away(ties).tolist() == [1, 2, 3, -3, 4, -1]
    assert np.round(ties).tolist() == [0, 2, 2, -2, 4, -0.0]
    assert ref.round_half_away(np.float32(2.5)) != np.round(np.float32(2.5))


def test_int8_modes_round_a_tie_differently():
    # absmax 127 gives scale 1.0 in both modes, so x / scale lands exactly on the tie 2.5
    row = np.array([[127.0, 2.5, -2.5, 0.5]], dtype=np.float32)
    q_away, s_away = ref.quantize_int8_rows(row, INT8_MODE_AWAY)
    q_even, s_even = ref.quantize_int8_rows(row, INT8_MODE_EVEN)
    assert q_away.tolist() == [[127, 3, -3, 1]] and s_away.tolist() == [1.0]
    assert q_even.tolist() == [[127, 2, -2, 0]]  # ferrum: rint, 2.5 -> 2
    assert s_even.dtype == np.uint16 and ref.fp16_decode(s_even).tolist() == [1.0]


def test_002_source_row_and_zero_row():
    q, s = ref.quantize_int8_rows(np.array([[127.0, -127.0, 0.0]], dtype=np.float32))
    assert s.tolist() == [1.0] and q.tolist() == [[127, -127, 0]]
    zero = np.zeros((1, 64), dtype=np.float32)
    q, s = ref.quantize_int8_rows(zero)
    assert s[0] == ref.FLT_EPSILON and not q.any()
    assert np.array_equal(ref.dequantize_int8_rows(q, s), zero)


def test_reference_quantize_rows_writes_only_its_rows():
    x = np.array([[1.0, -2.0], [0.0, 4.0]], dtype=np.float32)
    out = np.full((5, 2), 99, dtype=np.int8)
    scales = np.full(5, -1.0, dtype=np.float32)
    new_out, new_scales = ref.quantize_rows(x, out, scales=scales, kv_dtype="int8", out_row_offset=2)
    assert out.tolist() == [[99, 99]] * 5, "inputs are not modified"
    q, s = ref.encode_kv(x, "int8")
    assert np.array_equal(new_out[2:4], q) and np.array_equal(new_scales[2:4], s)
    assert new_out[[0, 1, 4]].tolist() == [[99, 99]] * 3 and new_scales[[0, 1, 4]].tolist() == [-1.0] * 3
    back = ref.dequantize_rows(new_out, scales=new_scales, kv_dtype="int8", row_offset=2, num_rows=2)
    assert np.allclose(back, x, atol=4 / 127)


def test_reference_quantize_rows_ferrum_scales_as_fp16_bits():
    x = np.array([[0.3, -1.0, 0.25]], dtype=np.float32)
    out = np.zeros((1, 1, 3), dtype=np.int8)  # any leading shape: treated as rows
    scales = np.zeros((1, 1), dtype=np.float16)
    new_out, new_scales = ref.quantize_rows(x, out, scales=scales, kv_dtype="int8", int8_mode=INT8_MODE_EVEN)
    q, s_bits = ref.quantize_int8_rows(x, INT8_MODE_EVEN)
    assert np.array_equal(new_out.reshape(1, 3), q)
    assert new_scales.dtype == np.float16 and new_scales.view(np.uint16).reshape(1).tolist() == s_bits.tolist()
    back = ref.dequantize_rows(new_out, scales=new_scales, kv_dtype="int8", int8_mode=INT8_MODE_EVEN)
    assert back.shape == (1, 3) and np.allclose(back, x, atol=1 / 127)


@pytest.mark.parametrize("name", ["fp32", "fp16", "fp8_e4m3", "fp8_e5m2"])
def test_reference_rows_round_trip_scale_free_formats(name):
    x = np.array([[0.5, -1.25, 3.0, 0.0]], dtype=np.float32)  # exact in every format
    data, scales = ref.quantize_rows(x, ref.encode_kv(np.zeros((3, 4), np.float32), name)[0],
                                     kv_dtype=name, out_row_offset=1)
    assert scales is None
    assert np.array_equal(ref.dequantize_rows(data, kv_dtype=name, row_offset=1, num_rows=1), x)
    assert not ref.dequantize_rows(data, kv_dtype=name, num_rows=1).any()


# ---- fp8 with a per-row scale (oxibonsai's Fp8KvLayer; FP8_ROW_SCALE in quantize.cl) ----------

def _crate_fp8_rows(x, fmt):
    """The crate's formula written out: float32 scale, x / scale, encode; decode * scale."""
    max_value, _ = FP8[fmt]
    scale = np.maximum(np.abs(x).max(axis=-1) / np.float32(max_value), ref.FLT_EPSILON).astype(np.float32)
    data = ref.fp8_encode((x / scale[:, None]).astype(np.float32), fmt)
    return data, scale, (ref.fp8_decode(data, fmt) * scale[:, None]).astype(np.float32)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_rows_scaled_is_the_crate_formula(fmt):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((40, 33)) * np.exp2(rng.uniform(-40, 40, (40, 1)))).astype(np.float32)
    x[0] = 0.0                                   # zero row: FLT_EPSILON scale, all bytes 0
    x[1, :4] = [1e-7, -1e-6, 1e-40, -0.0]        # subnormal after scaling, float32 denormal, -0
    x[2] = np.float32(3e38) * np.sign(rng.standard_normal(33)).astype(np.float32)
    data, scale = ref.quantize_fp8_rows_scaled(x, fmt)
    want_data, want_scale, want_back = _crate_fp8_rows(x, fmt)
    assert data.dtype == np.uint8 and scale.dtype == np.float32 and scale.shape == (40,)
    assert np.array_equal(data, want_data) and np.array_equal(scale, want_scale)
    assert np.array_equal(ref.dequantize_fp8_rows_scaled(data, scale, fmt), want_back)
    assert scale[0] == ref.FLT_EPSILON and not data[0].any()
    assert ref.fp8_decode(data[1, 3], fmt) == 0 and data[1, 3] == 0x80


def test_fp8_rows_scaled_e5m2_saturates_a_quotient_past_the_max():
    # x / (x / 57344) can round above 57344: the encoder saturates it (the crate returns Inf).
    c = np.float32(1.0) + np.arange(1, 20000, dtype=np.float32) * np.float32(2.0**-20)
    over = c[(c / (c / np.float32(57344.0)).astype(np.float32)).astype(np.float32) > np.float32(57344.0)]
    assert over.size
    data, scale = ref.quantize_fp8_rows_scaled(np.array([[over[0], 0.5]], np.float32), "e5m2")
    assert data[0, 0] == 0x7B
    back = ref.dequantize_fp8_rows_scaled(data, scale, "e5m2")
    assert np.isfinite(back).all() and abs(back[0, 0] - over[0]) <= over[0] * 2**-3


def test_fp8_rows_scaled_absmax_ignores_nan_and_empty_rows_get_the_floor():
    x = np.array([[np.nan, 2.0, -448.0]], np.float32)
    data, scale = ref.quantize_fp8_rows_scaled(x, "e4m3")
    assert scale.tolist() == [1.0] and data[0, 0] == 0x7F and data[0, 2] == 0xFE
    data, scale = ref.quantize_fp8_rows_scaled(np.zeros((3, 0), np.float32), "e5m2")
    assert data.shape == (3, 0) and scale.tolist() == [ref.FLT_EPSILON] * 3


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_reference_rows_fp8_row_scale_keyword(name):
    fmt = name.split("_")[1]
    x = np.array([[0.5, -1.25, 300.0, 0.0], [1e-3, 2e-3, -4e-3, 0.0]], dtype=np.float32)
    out = np.full((2, 2, 4), 0x5A, np.uint8)        # any leading shape: treated as rows
    scales = np.full((2, 2), -1.0, np.float32)
    new_out, new_scales = ref.quantize_rows(x, out, scales=scales, kv_dtype=name, out_row_offset=1,
                                            fp8_row_scale=True)
    assert out.tolist() == [[[0x5A] * 4] * 2] * 2 and scales.tolist() == [[-1.0] * 2] * 2
    data, s = ref.quantize_fp8_rows_scaled(x, fmt)
    assert np.array_equal(new_out.reshape(4, 4)[1:3], data) and np.array_equal(new_scales.reshape(4)[1:3], s)
    assert new_out.reshape(4, 4)[[0, 3]].tolist() == [[0x5A] * 4] * 2
    assert new_scales.reshape(4)[[0, 3]].tolist() == [-1.0] * 2
    back = ref.dequantize_rows(new_out, scales=new_scales, kv_dtype=name, row_offset=1, num_rows=2,
                               fp8_row_scale=True)
    assert np.array_equal(back, ref.dequantize_fp8_rows_scaled(data, s, fmt))
    # without the keyword: the unscaled formats, unchanged
    plain, none = ref.quantize_rows(x, out, kv_dtype=name, out_row_offset=1)
    assert none is None and np.array_equal(plain.reshape(4, 4)[1:3], ref.fp8_encode(x, fmt))


def test_reference_fp8_row_scale_refuses_other_dtypes_and_missing_scales():
    x = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="fp8_row_scale: only for kv_dtype fp8"):
        ref.quantize_rows(x, np.zeros((1, 4), np.int8), scales=np.zeros(1, np.float32), kv_dtype="int8",
                          fp8_row_scale=True)
    with pytest.raises(ValueError, match="scales: fp8_row_scale=True"):
        ref.quantize_rows(x, np.zeros((1, 4), np.uint8), kv_dtype="fp8_e4m3", fp8_row_scale=True)
    with pytest.raises(ValueError, match="scales: fp8_row_scale=True"):
        ref.dequantize_rows(np.zeros((1, 4), np.uint8), kv_dtype="fp8_e5m2", fp8_row_scale=True)
