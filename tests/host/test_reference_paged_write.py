"""The numpy reference of the fused paged write, checked without OpenCL."""

from __future__ import annotations

import numpy as np
import pytest

from kvcl.reference.paged_write import (STATUS_BAD_POSITION, STATUS_BAD_SLOT, STATUS_NONFINITE,
                                        apply_rope, paged_write_kv, paged_write_qkv, rms_norm)
from kvcl.reference.quantize import encode_kv


@pytest.mark.parametrize("mode", ["none", "half", "interleaved"])
def test_rope_with_zero_angle_is_identity(rng, mode):
    x = rng.standard_normal((5, 3, 16)).astype(np.float32)
    out = apply_rope(x, np.ones((5, 1, 8), np.float32), np.zeros((5, 1, 8), np.float32), mode)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("mode", ["half", "interleaved"])
def test_rope_rotation_preserves_pair_norms(rng, mode):
    D = 12
    x = rng.standard_normal((7, D)).astype(np.float32)
    theta = rng.uniform(-np.pi, np.pi, (7, D // 2)).astype(np.float32)
    out = apply_rope(x, np.cos(theta), np.sin(theta), mode)
    pairs = (lambda v: (v[:, : D // 2], v[:, D // 2:])) if mode == "half" else (lambda v: (v[:, 0::2], v[:, 1::2]))
    (x0, x1), (y0, y1) = pairs(x), pairs(out)
    np.testing.assert_allclose(y0**2 + y1**2, x0**2 + x1**2, rtol=1e-5, atol=1e-6)
    # and it is the rotation by theta: rotating back recovers x
    back = apply_rope(out, np.cos(-theta), np.sin(-theta), mode)
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


def test_rope_half_by_quarter_turn():
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)  # pairs (1, 3), (2, 4)
    out = apply_rope(x, np.zeros(2, np.float32), np.ones(2, np.float32), "half")
    np.testing.assert_array_equal(out, [-3.0, -4.0, 1.0, 2.0])
    out = apply_rope(x, np.zeros(2, np.float32), np.ones(2, np.float32), "interleaved")
    np.testing.assert_array_equal(out, [-2.0, 1.0, -4.0, 3.0])


def test_rope_rejects_unknown_mode():
    with pytest.raises(ValueError, match="rope"):
        apply_rope(np.zeros(4, np.float32), np.ones(2), np.zeros(2), "neox")


@pytest.mark.parametrize("c", [-3.5, 0.25, 7.0])
def test_rms_norm_of_constant_row_is_unit(c):
    out = rms_norm(np.full((2, 64), c, np.float32), np.ones(64, np.float32), 0.0)
    np.testing.assert_allclose(out, np.sign(c), rtol=1e-6)


def test_rms_norm_weight_and_eps(rng):
    x = rng.standard_normal((4, 32)).astype(np.float32)
    w = rng.uniform(0.5, 2, 32).astype(np.float32)
    out = rms_norm(x, w, 1e-6)
    expect = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(out, expect, rtol=1e-5)
    assert rms_norm(x, None, 1e-6).dtype == np.float32
    # a zero row stays zero (eps keeps the rsqrt finite)
    np.testing.assert_array_equal(rms_norm(np.zeros((1, 8), np.float32), None, 1e-6), 0.0)


def _case(rng, T=6, Hq=4, Hkv=2, D=8, bs=4, nb=3):
    return dict(
        qkv=rng.standard_normal((T, (Hq + 2 * Hkv) * D)).astype(np.float32),
        slot_mapping=rng.permutation(nb * bs)[:T].astype(np.int32),
        positions=rng.integers(0, 10, T).astype(np.int32),
        k_pool=np.full((nb, Hkv, bs, D), -7.0, np.float32), v_pool=np.full((nb, Hkv, bs, D), -7.0, np.float32),
        q_out=np.zeros((T, Hq, D), np.float32), num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D,
        block_size=bs, cos=np.cos(np.arange(10 * D // 2, dtype=np.float32).reshape(10, D // 2)),
        sin=np.sin(np.arange(10 * D // 2, dtype=np.float32).reshape(10, D // 2)),
    )


def test_plain_copy_scatters_rows(rng):
    c = _case(rng)
    c["slot_mapping"][2] = -1
    q_out, k_pool, v_pool, ks, vs, status = paged_write_qkv(**c, rope="none")
    T, Hq, Hkv, D, bs = 6, 4, 2, 8, 4
    qkv = c["qkv"].reshape(T, Hq + 2 * Hkv, D)
    np.testing.assert_array_equal(q_out, qkv[:, :Hq])
    for t, s in enumerate(c["slot_mapping"]):
        if s < 0:
            continue
        np.testing.assert_array_equal(k_pool[s // bs, :, s % bs], qkv[t, Hq:Hq + Hkv])
        np.testing.assert_array_equal(v_pool[s // bs, :, s % bs], qkv[t, Hq + Hkv:])
    assert (k_pool == -7.0).sum() == (k_pool.size - 5 * Hkv * D)  # 5 tokens written, the pad skipped
    assert ks is None and vs is None and status[0] == 0
    assert (c["k_pool"] == -7.0).all(), "inputs are not modified"


def test_v_is_never_normed_or_rotated(rng):
    c = _case(rng)
    _, _, v_pool, *_ = paged_write_qkv(**c, rope="interleaved", q_norm_weight=np.full(8, 2, np.float32),
                                       k_norm_weight=np.full(8, 3, np.float32))
    qkv = c["qkv"].reshape(6, 8, 8)
    for t, s in enumerate(c["slot_mapping"]):
        np.testing.assert_array_equal(v_pool[s // 4, :, s % 4], qkv[t, 6:])


def test_norm_then_rope_order(rng):
    c = _case(rng)
    w = rng.uniform(0.5, 2, 8).astype(np.float32)
    q_out, k_pool, *_ = paged_write_qkv(**c, rope="half", q_norm_weight=w, k_norm_weight=w)
    qkv = c["qkv"].reshape(6, 8, 8)
    cs, sn = c["cos"][c["positions"]][:, None], c["sin"][c["positions"]][:, None]
    np.testing.assert_array_equal(q_out, apply_rope(rms_norm(qkv[:, :4], w, 1e-6), cs, sn, "half"))
    k = apply_rope(rms_norm(qkv[:, 4:6], w, 1e-6), cs, sn, "half")
    s = c["slot_mapping"][0]
    np.testing.assert_array_equal(k_pool[s // 4, :, s % 4], k[0])


def test_int8_scales_from_rows_after_rope(rng):
    c = _case(rng)
    c["k_pool"] = np.zeros(c["k_pool"].shape, np.int8)
    c["v_pool"] = np.zeros(c["v_pool"].shape, np.int8)
    scales = np.zeros(c["k_pool"].shape[:3], np.float32)
    q_out, k_pool, _, ks, _, _ = paged_write_qkv(**c, rope="half", kv_dtype="int8", k_scales=scales,
                                                 v_scales=scales)
    k = apply_rope(c["qkv"].reshape(6, 8, 8)[:, 4:6], c["cos"][c["positions"]][:, None],
                   c["sin"][c["positions"]][:, None], "half")
    data, sc = encode_kv(k, "int8")
    s = c["slot_mapping"][3]
    np.testing.assert_array_equal(k_pool[s // 4, :, s % 4], data[3])
    np.testing.assert_array_equal(ks[s // 4, :, s % 4], sc[3])


def test_status_bits(rng):
    c = _case(rng)
    c["qkv"][1, 4 * 8] = np.nan            # token 1, K head 0
    c["slot_mapping"][2] = 12              # == num_slots
    c["positions"][3] = 10                 # == max_position
    q_out, k_pool, *_, status = paged_write_qkv(**c, rope="half")
    assert status[0] == STATUS_NONFINITE | STATUS_BAD_SLOT | STATUS_BAD_POSITION
    s1 = c["slot_mapping"][1]
    assert (k_pool[s1 // 4, 0, s1 % 4] == -7.0).all() and (k_pool[s1 // 4, 1, s1 % 4] != -7.0).all()
    assert (q_out[3] == 0).all() and (q_out[2] != 0).all()
    s3 = c["slot_mapping"][3]
    assert (k_pool[s3 // 4, :, s3 % 4] == -7.0).all()


def test_paged_write_kv_matches_encode(rng):
    keys = rng.standard_normal((5, 2, 8)).astype(np.float32)
    values = rng.standard_normal((5, 2, 8)).astype(np.float32)
    slots = np.array([4, 0, -1, 11, 7], np.int32)
    pool = np.zeros((3, 2, 4, 8), np.uint16)
    k_pool, v_pool, ks, vs, status = paged_write_kv(keys, values, slots, pool, pool, block_size=4,
                                                    kv_dtype="fp16")
    for t, s in enumerate(slots):
        if s >= 0:
            np.testing.assert_array_equal(k_pool[s // 4, :, s % 4], encode_kv(keys[t], "fp16")[0])
            np.testing.assert_array_equal(v_pool[s // 4, :, s % 4], encode_kv(values[t], "fp16")[0])
    assert ks is None and status[0] == 0
