"""The numpy twin of kernels/turboquant.cl (TurboQuant: PolarQuant + QJL), checked on its own."""

import numpy as np
import pytest

from kvcl.reference import turboquant as ref


def encode_and_score(d, bits, m, seed, count=20):
    """(estimated scores, polar-only scores, exact q·k/√d) for random keys and one query."""
    rotation, projections = ref.rotation_matrix(d, seed), ref.projection_matrix(d, m, seed)
    table = ref.angle_table(bits)
    rng = np.random.default_rng(1000 + seed)
    keys = rng.standard_normal((count, d)).astype(np.float32)
    query = rng.standard_normal(d).astype(np.float32)
    encoded = ref.encode(keys, rotation, projections, table)
    estimate = ref.scores(encoded, query, rotation, projections, table)
    polar_only = ref.scores(dict(encoded, norms=np.zeros_like(encoded["norms"])), query,
                            rotation, projections, table)
    return estimate, polar_only, keys.astype(np.float64) @ query / np.sqrt(d)


# ---- matrices ---------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [2, 8, 64])
def test_rotation_is_orthogonal_deterministic_and_sign_fixed(d):
    r = ref.rotation_matrix(d, 42)
    assert r.dtype == np.float32 and r.shape == (d, d)
    np.testing.assert_allclose(r.astype(np.float64) @ r.T, np.eye(d), atol=1e-5)
    np.testing.assert_array_equal(r, ref.rotation_matrix(d, 42))
    assert not np.array_equal(r, ref.rotation_matrix(d, 43))
    # Haar via QR: the Gaussian A = R·T with T upper triangular of positive diagonal
    gaussian = np.random.default_rng([42, 0]).standard_normal((d, d))
    t = r.astype(np.float64).T @ gaussian
    np.testing.assert_allclose(np.tril(t, -1), 0, atol=1e-4)
    assert (np.diag(t) > 0).all()


def test_projections_are_gaussian_and_from_their_own_stream():
    g = ref.projection_matrix(64, 512, 7)
    assert g.dtype == np.float32 and g.shape == (512, 64)
    np.testing.assert_array_equal(g, ref.projection_matrix(64, 512, 7))
    assert abs(g.mean()) < 0.02 and abs(g.std() - 1) < 0.02
    rotation_stream = np.random.default_rng([7, 0]).standard_normal(64).astype(np.float32)
    assert not np.array_equal(g[0], rotation_stream)
    # head h + 1's rotation does not reuse head h's projection stream (bitpolar's seed + 1 does)
    assert not np.array_equal(g[0], np.random.default_rng([8, 0]).standard_normal(64).astype(np.float32))


# ---- the angle codebook -----------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_codebook_is_the_lloyd_max_fixed_point_of_the_uniform_density(bits):
    centroids, boundaries = ref.angle_centroids(bits), ref.angle_boundaries(bits).astype(np.float64)
    levels = 1 << bits
    assert len(centroids) == levels and len(boundaries) == levels - 1
    edges = np.concatenate([[-1.0], boundaries, [1.0]])
    np.testing.assert_allclose(centroids, (edges[:-1] + edges[1:]) / 2)          # cell means
    np.testing.assert_allclose(boundaries, (centroids[:-1] + centroids[1:]) / 2)  # nearest-centroid cuts


def test_angle_table_holds_cos_sin_of_the_centroid_angles():
    table = ref.angle_table(4)
    theta = np.pi * ref.angle_centroids(4)
    np.testing.assert_allclose(table, np.stack([np.cos(theta), np.sin(theta)], -1), atol=1e-7)
    assert table.dtype == np.float32
    np.testing.assert_array_equal(ref.angle_table(1), [[0, -1], [0, 1]])


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 12, 16])
def test_quantize_angle_matches_bitpolars_partition_point(bits, rng):
    boundaries = ref.angle_boundaries(bits)
    values = np.concatenate([rng.uniform(-1, 1, 4000).astype(np.float32), boundaries,
                             np.float32([-1.0, 1.0, 0.0])])
    expected = np.searchsorted(boundaries, values, side="left")  # count(boundaries < a)
    np.testing.assert_array_equal(ref.quantize_angle(values, bits), expected)


# ---- PolarQuant -------------------------------------------------------------------------------

def test_polar_encode_known_pairs():
    rotated = np.float32([[3.0, 4.0, 0.0, 0.0, -1.0, -0.0, -1.0, 0.0, 1e20, 1e20]])
    codes, radii, residual = ref.polar_encode(rotated, ref.angle_table(4))
    assert codes.dtype == np.uint8
    # atan2(4, 3)/π = 0.295 → cell 10 of 16; (0, 0): angle 0 → cell 7 (boundary goes down);
    # (-1, -0): -π → cell 0; (-1, +0): +π → cell 15; overflow: radius FLT_MAX
    np.testing.assert_array_equal(codes[0], [10, 7, 0, 15, 9])
    np.testing.assert_array_equal(radii[0, :4], [5, 0, 1, 1])
    assert radii[0, 4] == np.finfo(np.float32).max
    np.testing.assert_array_equal(residual[0, 2:4], [0, 0])
    decoded = ref.polar_decode(codes, radii, ref.angle_table(4))
    np.testing.assert_array_equal(residual[0, :8], rotated[0, :8] - decoded[0, :8])


@pytest.mark.parametrize("bits", [1, 2, 4, 9, 16])
def test_polar_error_is_bounded_by_the_half_cell_angle(bits, rng):
    rotated = rng.standard_normal((50, 16)).astype(np.float32)
    codes, radii, residual = ref.polar_encode(rotated, ref.angle_table(bits))
    assert codes.dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert codes.max() < 1 << bits
    pair_error = np.hypot(residual[:, 0::2], residual[:, 1::2])
    bound = 2 * radii * np.sin(np.pi / (1 << bits) / 2) + 1e-5
    assert (pair_error <= bound).all()


# ---- QJL --------------------------------------------------------------------------------------

def test_sign_packing_is_lsb_first_with_zero_padding():
    positive = np.zeros((1, 9), bool)
    positive[0, [0, 3, 8]] = True
    packed = ref.pack_signs(positive)
    np.testing.assert_array_equal(packed, [[0b00001001, 0b00000001]])
    np.testing.assert_array_equal(ref.unpack_signs(packed, 9), np.where(positive, 1, -1))
    assert ref.sign_bytes(9) == 2 and ref.sign_bytes(16) == 2 and ref.sign_bytes(1) == 1


def test_qjl_sketch_signs_and_norms(rng):
    residual = rng.standard_normal((6, 8)).astype(np.float32)
    residual[5] = 0.0                                        # every dot product 0: bit set (≥ 0)
    g = rng.standard_normal((2, 13, 8)).astype(np.float32)   # 2 heads: row r uses head r % 2
    signs, norms = ref.qjl_sketch(residual, g, num_heads=2)
    assert signs.shape == (6, 2) and signs.dtype == np.uint8
    heads = np.arange(6) % 2
    dots = np.einsum("rpj,rj->rp", g[heads].astype(np.float64), residual)
    np.testing.assert_array_equal(ref.unpack_signs(signs, 13)[:5], np.where(dots >= 0, 1, -1)[:5])
    np.testing.assert_array_equal(signs[5], [0xFF, 0x1F])
    np.testing.assert_allclose(norms, np.linalg.norm(residual, axis=1), rtol=1e-6)


def test_matvec_rows_heads_and_transpose(rng):
    m = rng.standard_normal((3, 5, 4)).astype(np.float32)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    out = ref.matvec_rows(x, m, num_heads=3)
    np.testing.assert_allclose(out, np.einsum("roi,ri->ro", m[np.arange(6) % 3], x), rtol=1e-5, atol=1e-6)
    y = rng.standard_normal((3, 5)).astype(np.float32)
    back = ref.matvec_rows(y, m, num_heads=3, transpose=True)
    np.testing.assert_allclose(back, np.einsum("roi,ro->ri", m, y), rtol=1e-5, atol=1e-6)


# ---- scores -----------------------------------------------------------------------------------

def test_scores_formula_and_the_zero_norm_cutoff(rng):
    d, m, bits = 8, 16, 4
    table = ref.angle_table(bits)
    codes = rng.integers(0, 16, (3, 1, d // 2)).astype(np.uint8)
    radii = rng.uniform(0, 2, (3, 1, d // 2)).astype(np.float32)
    signs = rng.integers(0, 256, (3, 1, 2)).astype(np.uint8)
    norms = np.float32([[0.5], [1e-31], [0.0]])
    rq = rng.standard_normal((1, d)).astype(np.float32)
    gq = rng.standard_normal((1, m)).astype(np.float32)
    got = ref.attention_scores(codes, radii, signs, norms, table, rq, gq)
    polar = np.einsum("thj,hj->ht", ref.polar_decode(codes, radii, table).astype(np.float64), rq)
    qjl = norms.T * np.sqrt(np.pi / 2) / m * np.einsum("thp,hp->ht", ref.unpack_signs(signs, m), gq)
    qjl[:, 1:] = 0.0                                          # norm < 1e-30: no QJL term
    np.testing.assert_allclose(got, (polar + qjl) / np.sqrt(d), rtol=1e-5, atol=1e-6)


def test_qjl_term_removes_the_polar_shrinkage_bias():
    """Unbiased: estimate ≈ exact on average; polar alone shrinks by ~sinc(π/L) (0.90 at 2 bits)."""
    runs = [encode_and_score(32, 2, 64, seed) for seed in range(30)]
    estimate, polar_only, exact = (np.concatenate(part) for part in zip(*runs))
    slope = lambda y: (y @ exact) / (exact @ exact)   # noqa: E731
    assert abs(slope(estimate) - 1) < 0.05
    assert slope(polar_only) < 0.95
    assert np.abs(estimate - exact).mean() < np.abs(polar_only - exact).mean()


def test_error_shrinks_as_bits_grow():
    errors = []
    for bits in (1, 2, 4, 8):
        runs = [encode_and_score(32, bits, 32, seed) for seed in range(5)]
        estimate, _, exact = (np.concatenate(part) for part in zip(*runs))
        errors.append(np.abs(estimate - exact).mean())
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.05 * errors[0]


def test_decode_round_trip_improves_with_bits(rng):
    d = 16
    x = rng.standard_normal((10, d)).astype(np.float32)
    rotation = ref.rotation_matrix(d, 3)
    errors = []
    for bits in (2, 6, 12):
        table = ref.angle_table(bits)
        encoded = ref.encode(x, rotation, ref.projection_matrix(d, 8, 3), table)
        errors.append(np.abs(ref.decode(encoded, rotation, table) - x).max())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2
