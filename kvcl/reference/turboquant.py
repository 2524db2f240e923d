"""Numpy reference of ``kernels/turboquant.cl``: TurboQuant (PolarQuant + QJL) KV compression.

The maths, for one head with rotation ``R`` [d, d], projections ``G`` [m, d] and ``L = 2**bits``
angle levels (d even, ``P = d/2`` pairs):

encode(x)
    ``x_rot = R·x``; for each pair ``(x_rot[2i], x_rot[2i+1]) = (u, w)``: radius
    ``r_i = sqrt(u² + w²)`` (float32, ``FLT_MAX`` if it overflows) and angle code
    ``c_i = quantize(atan2(w, u)/π)``; residual ``e = x_rot − polar_decode(r, c)``; sketch
    ``s_p = [G_p·e ≥ 0]`` for p < m (bit p of byte p // 8, LSB first) and ``‖e‖₂``.
polar_decode(r, c)
    pair i → ``(r_i·cos θ_c, r_i·sin θ_c)`` with ``θ_c = π·centroid[c]``.
score(q)
    ``(⟨polar_decode(r, c), R·q⟩ + ‖e‖·√(π/2)/m · Σ_p (±1)_p·(G_p·R·q)) / √d``, the QJL term
    being 0 when ``‖e‖ < 1e-30``. Not softmaxed.

The angle codebook: after a Haar-random rotation the two coordinates of a pair are a
rotationally symmetric pair, so the normalised angle ``a = atan2/π`` is *uniform* on [-1, 1]
for every input vector. The Lloyd-Max quantizer of a uniform density is the uniform one:
boundaries ``-1 + 2k/L`` (k = 1 .. L-1), centroids at the cell midpoints ``-1 + (2k+1)/L``.
(bitpolar computes a Lloyd-Max codebook for N(0, 1) and applies it to ``a``, which wastes most
levels outside [-1, 1]; kvcl uses the codebook of the distribution ``a`` actually has.)
A value on a boundary goes to the lower cell, as bitpolar's ``partition_point(|b| a > b)``.
The cosine and sine of every centroid angle are tabulated once (float64, rounded to float32),
so decoding is a table lookup and reads back the same on the host and on any device.

Every float32 sum here runs in the kernels' order (index ascending, from 0.0, no fused
multiply-add), so the reference reproduces the kernels' radii, codes and residuals exactly up
to the device's ``atan2`` (a few ulp: a code can differ only when the angle lies within
~1e-7 of a cell boundary).
"""

from __future__ import annotations

import numpy as np

#: float32 π, the value of OpenCL's ``M_PI_F``.
PI_F32 = np.float32(np.pi)
#: The QJL estimator's constant √(π/2), float32 (bitpolar: ``sqrtf(FRAC_PI_2)``).
QJL_CONSTANT = np.sqrt(np.float32(np.pi / 2))
#: Below this residual norm the QJL term is 0 (bitpolar's threshold).
QJL_MIN_NORM = np.float32(1e-30)
FLT_MAX = np.float32(np.finfo(np.float32).max)


# ---- the matrices (built once on the host, uploaded once) -------------------------------------

def rotation_matrix(head_dim: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal matrix ``R`` [head_dim, head_dim], float32, from ``seed``.

    QR of a standard Gaussian matrix drawn from ``numpy.random.default_rng([seed, 0])``, with
    the signs fixed so that ``diag(R_qr) > 0`` (``Q·diag(sign(diag(R_qr))))``): without the fix
    numpy's Householder QR is not Haar-distributed.

    Examples
    --------
    >>> R = rotation_matrix(4, 42)
    >>> bool(np.allclose(R @ R.T, np.eye(4), atol=1e-6))
    True
    """
    rng = np.random.default_rng([int(seed), 0])
    q, r = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return (q * signs).astype(np.float32)


def projection_matrix(head_dim: int, projections: int, seed: int) -> np.ndarray:
    """QJL's Gaussian projections ``G`` [projections, head_dim], float32, entries N(0, 1).

    Drawn from ``numpy.random.default_rng([seed, 1])``: a stream independent of the rotation's.

    Examples
    --------
    >>> projection_matrix(8, 16, 42).shape
    (16, 8)
    """
    rng = np.random.default_rng([int(seed), 1])
    return rng.standard_normal((projections, head_dim)).astype(np.float32)


def angle_centroids(bits: int) -> np.ndarray:
    """The ``2**bits`` Lloyd-Max centroids of the normalised angle (uniform on [-1, 1]), float64.

    Examples
    --------
    >>> angle_centroids(2)
    array([-0.75, -0.25,  0.25,  0.75])
    """
    levels = 1 << bits
    return -1.0 + (2.0 * np.arange(levels) + 1.0) / levels


def angle_boundaries(bits: int) -> np.ndarray:
    """The ``2**bits - 1`` decision boundaries ``-1 + 2k/L`` (exact in float32)."""
    levels = 1 << bits
    return (-1.0 + 2.0 * np.arange(1, levels) / levels).astype(np.float32)


def angle_table(bits: int) -> np.ndarray:
    """``[2**bits, 2]`` float32: (cos, sin) of each centroid angle ``π·centroid``.

    Examples
    --------
    >>> angle_table(1)   # centroids ±1/2: the angles ∓π/2
    array([[ 0., -1.],
           [ 0.,  1.]], dtype=float32)
    """
    theta = np.pi * angle_centroids(bits)
    table = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    table[np.abs(table) < 1e-15] = 0.0  # cos(±π/2) is 0, not 6e-17
    return table.astype(np.float32)


def quantize_angle(normalised: np.ndarray, bits: int) -> np.ndarray:
    """Index of the cell of ``normalised`` (float32 in [-1, 1]); boundary values go down.

    Exactly ``count(boundaries < a)`` (bitpolar's ``partition_point``), computed as in the
    kernel without any rounding: ``u = a·L/2`` is an exact power-of-two scaling, the boundaries
    are the integers ``-L/2 + 1 .. L/2 - 1`` in ``u``, and ``ceil(u) - 1 + L/2`` counts those
    strictly below ``u``; the result is clamped to ``[0, L-1]``.
    """
    levels = 1 << bits
    a = np.asarray(normalised, dtype=np.float32)
    u = a * np.float32(levels // 2)
    return np.clip(np.ceil(u).astype(np.int64) - 1 + levels // 2, 0, levels - 1)


def code_dtype(bits: int) -> np.dtype:
    """Storage of one angle code: uint8 up to 8 bits, uint16 above."""
    return np.dtype(np.uint8 if bits <= 8 else np.uint16)


def sign_bytes(projections: int) -> int:
    """Bytes of packed sign bits per vector: ⌈m/8⌉."""
    return (projections + 7) // 8


# ---- float32 sums in the kernels' order --------------------------------------------------------

def _sequential_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Σ_j a[..., j]·b[..., j] in float32, j ascending from 0.0 (no FMA), broadcasting."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    acc = np.zeros(np.broadcast_shapes(a.shape[:-1], b.shape[:-1]), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for j in range(a.shape[-1]):
            acc = acc + a[..., j] * b[..., j]
    return acc


# ---- the twins of kvcl.ops.turboquant ----------------------------------------------------------

def matvec_rows(x: np.ndarray, matrices: np.ndarray, *, num_heads: int,
                transpose: bool = False) -> np.ndarray:
    """Twin of :func:`kvcl.ops.turboquant.matvec_rows`: ``out[r] = M_h·x[r]`` (or ``M_hᵀ·x[r]``).

    Parameters
    ----------
    x : numpy.ndarray, float32, shape [num_rows, in_dim]
        Row ``r`` belongs to head ``r % num_heads`` (rows are ``[..., num_heads]``, head fastest).
    matrices : numpy.ndarray, float32, shape [num_heads, out_dim, in_dim] (``[num_heads, in_dim, out_dim]`` transposed)
    num_heads : int
    transpose : bool

    Returns
    -------
    numpy.ndarray, float32, shape [num_rows, out_dim]
    """
    x = np.asarray(x, dtype=np.float32)
    m = np.asarray(matrices, dtype=np.float32)
    if transpose:
        m = np.swapaxes(m, 1, 2)
    heads = np.arange(len(x)) % num_heads
    return _sequential_dot(m[heads], x[:, None, :])


def polar_encode(rotated: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Twin of :func:`kvcl.ops.turboquant.polar_encode` (returns the rows instead of scattering them).

    Parameters
    ----------
    rotated : numpy.ndarray, float32, shape [num_rows, head_dim]
        Already rotated vectors.
    table : numpy.ndarray, float32, shape [2**bits, 2]
        :func:`angle_table`.

    Returns
    -------
    codes : numpy.ndarray, uint8 (bits ≤ 8) or uint16, shape [num_rows, head_dim/2]
    radii : numpy.ndarray, float32, shape [num_rows, head_dim/2]
    residual : numpy.ndarray, float32, shape [num_rows, head_dim]
        ``rotated − polar_decode(codes, radii)``.

    Examples
    --------
    >>> codes, radii, res = polar_encode(np.array([[3.0, 4.0]], np.float32), angle_table(4))
    >>> int(codes[0, 0]), float(radii[0, 0])
    (10, 5.0)
    """
    rotated = np.asarray(rotated, dtype=np.float32)
    table = np.asarray(table, dtype=np.float32)
    bits = int(len(table)).bit_length() - 1
    x, y = rotated[:, 0::2], rotated[:, 1::2]
    with np.errstate(over="ignore"):
        radii = np.sqrt(x * x + y * y)
    radii = np.where(np.isfinite(radii), radii, FLT_MAX).astype(np.float32)
    codes = quantize_angle(np.arctan2(y, x) / PI_F32, bits)
    decoded = polar_decode(codes, radii, table)
    return codes.astype(code_dtype(bits)), radii, (rotated - decoded).astype(np.float32)


def polar_decode(codes: np.ndarray, radii: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Twin of :func:`kvcl.ops.turboquant.polar_decode`, in the rotated space.

    Parameters
    ----------
    codes : numpy.ndarray, integer, shape [..., head_dim/2]
    radii : numpy.ndarray, float32, shape [..., head_dim/2]
    table : numpy.ndarray, float32, shape [2**bits, 2]

    Returns
    -------
    numpy.ndarray, float32, shape [..., head_dim]: ``(r·cos θ, r·sin θ)`` interleaved per pair.
    """
    cs = np.asarray(table, dtype=np.float32)[np.asarray(codes, dtype=np.int64)]
    radii = np.asarray(radii, dtype=np.float32)
    out = np.empty(radii.shape[:-1] + (2 * radii.shape[-1],), dtype=np.float32)
    out[..., 0::2] = radii * cs[..., 0]
    out[..., 1::2] = radii * cs[..., 1]
    return out


def pack_signs(positive: np.ndarray) -> np.ndarray:
    """Pack booleans [..., m] into bytes [..., ⌈m/8⌉]: bit p in byte p // 8 at position p % 8."""
    return np.packbits(np.asarray(positive, dtype=bool), axis=-1, bitorder="little")


def unpack_signs(signs: np.ndarray, projections: int) -> np.ndarray:
    """±1.0 float32 [..., m] from packed sign bytes (1 → +1, 0 → −1)."""
    bits = np.unpackbits(np.asarray(signs, dtype=np.uint8), axis=-1, count=projections, bitorder="little")
    return np.where(bits == 1, np.float32(1.0), np.float32(-1.0))


def qjl_sketch(residual: np.ndarray, projections: np.ndarray, *, num_heads: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Twin of :func:`kvcl.ops.turboquant.qjl_sketch`: 1-bit signs of ``G_h·e`` and ``‖e‖₂``.

    Parameters
    ----------
    residual : numpy.ndarray, float32, shape [num_rows, head_dim]
        Row ``r`` belongs to head ``r % num_heads``.
    projections : numpy.ndarray, float32, shape [num_heads, m, head_dim]
    num_heads : int

    Returns
    -------
    signs : numpy.ndarray, uint8, shape [num_rows, ⌈m/8⌉]
        Bit p set when ``G_p·e ≥ 0`` (a NaN dot product gives 0); unused high bits 0.
    norms : numpy.ndarray, float32, shape [num_rows]
    """
    residual = np.asarray(residual, dtype=np.float32)
    g = np.asarray(projections, dtype=np.float32)
    heads = np.arange(len(residual)) % num_heads
    dots = _sequential_dot(g[heads], residual[:, None, :])
    with np.errstate(invalid="ignore"):
        positive = dots >= 0
    norms = np.sqrt(_sequential_dot(residual, residual)).astype(np.float32)
    return pack_signs(positive), norms


def attention_scores(codes: np.ndarray, radii: np.ndarray, signs: np.ndarray, norms: np.ndarray,
                     table: np.ndarray, rotated_queries: np.ndarray,
                     projected_queries: np.ndarray) -> np.ndarray:
    """Twin of :func:`kvcl.ops.turboquant.attention_scores` over stored *key* codes.

    Parameters
    ----------
    codes, radii : numpy.ndarray, shape [num_tokens, num_heads, head_dim/2]
    signs : numpy.ndarray, uint8, shape [num_tokens, num_heads, ⌈m/8⌉]
    norms : numpy.ndarray, float32, shape [num_tokens, num_heads]
    table : numpy.ndarray, float32, shape [2**bits, 2]
    rotated_queries : numpy.ndarray, float32, shape [num_heads, head_dim]
        ``R_h·q_h``.
    projected_queries : numpy.ndarray, float32, shape [num_heads, m]
        ``G_h·R_h·q_h``.

    Returns
    -------
    numpy.ndarray, float32, shape [num_heads, num_tokens]
        ``(⟨polar_decode, R q⟩ + ‖e‖·√(π/2)/m·Σ ±(G R q)) / √d``, not softmaxed.
    """
    rq = np.asarray(rotated_queries, dtype=np.float32)
    gq = np.asarray(projected_queries, dtype=np.float32)
    head_dim, m = rq.shape[-1], gq.shape[-1]
    decoded = polar_decode(codes, radii, table)                    # [T, H, d]
    polar = _sequential_dot(decoded, rq[None])                     # [T, H]
    pm = unpack_signs(signs, m)                                    # [T, H, m]
    total = _sequential_dot(pm, gq[None])
    norms = np.asarray(norms, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = norms * QJL_CONSTANT / np.float32(m)
        qjl = np.where(norms < QJL_MIN_NORM, np.float32(0.0), scale * total).astype(np.float32)
        inv_sqrt_dim = np.float32(1.0) / np.sqrt(np.float32(head_dim))
        scores = ((polar + qjl) * inv_sqrt_dim).astype(np.float32)
    return np.ascontiguousarray(scores.T)


# ---- the whole pipeline, for one head -----------------------------------------------------------

def encode(x: np.ndarray, rotation: np.ndarray, projections: np.ndarray, table: np.ndarray) -> dict:
    """Compress vectors ``x`` [n, d] of one head: ``{"codes", "radii", "signs", "norms"}``."""
    rotated = matvec_rows(x, rotation[None], num_heads=1)
    codes, radii, residual = polar_encode(rotated, table)
    signs, norms = qjl_sketch(residual, projections[None], num_heads=1)
    return {"codes": codes, "radii": radii, "signs": signs, "norms": norms}


def scores(encoded: dict, q: np.ndarray, rotation: np.ndarray, projections: np.ndarray,
           table: np.ndarray) -> np.ndarray:
    """Scores [n] of one head's ``encode`` output against the query ``q`` [d]."""
    rq = matvec_rows(np.asarray(q, np.float32)[None], rotation[None], num_heads=1)
    gq = matvec_rows(rq, projections[None], num_heads=1)
    return attention_scores(encoded["codes"][:, None], encoded["radii"][:, None],
                            encoded["signs"][:, None], encoded["norms"][:, None], table, rq, gq)[0]


def decode(encoded: dict, rotation: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``Rᵀ·polar_decode`` [n, d] of one head's ``encode`` output (the residual is ignored)."""
    return matvec_rows(polar_decode(encoded["codes"], encoded["radii"], table), rotation[None],
                       num_heads=1, transpose=True)
