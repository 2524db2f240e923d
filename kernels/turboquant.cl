// kvcl/kernels/turboquant.cl — TurboQuant KV compression (PolarQuant + QJL), bitpolar's kv_cache.
//
// Idea: a head's vector x is rotated by a fixed Haar-random orthogonal R, which makes the angle
// of every coordinate pair uniform on [-pi, pi]; each pair is then stored as its float radius and
// a BITS-bit code of its angle (uniform Lloyd-Max cells on atan2/pi in [-1, 1]). What the polar
// code misses, the residual e = R x - polar_decode, is sketched by PROJECTIONS sign bits of G e
// (G Gaussian) plus ||e||, which gives an unbiased correction of inner products (QJL). A score
// needs only R q and G R q, computed once per query, then one pass over each stored code:
//   score = (<polar_decode(code), R q> + ||e|| sqrt(pi/2)/m sum_p (+-1)_p (G R q)_p) / sqrt(d).
// The maths and its numpy twin are in kvcl/reference/turboquant.py; every float sum below runs
// index-ascending from 0.0 with contraction off, so the twin reproduces it bit for bit (up to
// the device's atan2). Centroid cos/sin come from a host-built table for the same reason.
//
// Kernels, in pipeline order:
//   matvec_rows       out[r] = M_h x[r] (or M_h^T x[r]); rotation, unrotation, query projection.
//                     Generic: run-time sizes, built without defines.
//   polar_encode      rotated rows -> angle codes, radii, residual            (HEAD_DIM, BITS)
//   qjl_sketch        residual rows -> packed sign bytes, residual norms      (HEAD_DIM, PROJECTIONS)
//   polar_decode      stored codes -> rotated-space vectors                   (HEAD_DIM, BITS)
//   attention_scores  stored key codes x prepared queries -> scores           (all three)
// Storage (kvcl.bitpolar) keeps codes for every (token, kind, head), kind 0 = key, 1 = value:
// row ("slot") (token * 2 + kind) * num_heads + head of
//   codes [T, 2, H, HEAD_DIM/2] code_t, radii [T, 2, H, HEAD_DIM/2] float,
//   signs [T, 2, H, SIGN_BYTES] uchar (bit p of byte p/8, LSB first), norms [T, 2, H] float.
// Rows fed to matvec_rows / polar_encode / qjl_sketch are [..., num_heads] with the head
// fastest: row r belongs to head r % num_heads.
// One work-item per output element (matvec), per pair (polar), per sign byte (sketch) or per
// (token, head) score: memory-bound passes over small rows; no local memory, so any head_dim works.
#pragma OPENCL FP_CONTRACT OFF

#if defined(BITS)
#define LEVELS (1 << BITS)
#if BITS <= 8
typedef uchar code_t;
#else
typedef ushort code_t;
#endif
#endif

#if defined(HEAD_DIM)
#define PAIRS (HEAD_DIM / 2)
#endif

#if defined(PROJECTIONS)
#define SIGN_BYTES ((PROJECTIONS + 7) / 8)
#endif

__kernel void matvec_rows(
    __global const float *x,         // [num_rows, in_dim]
    __global const float *matrices,  // [num_heads, out_dim, in_dim]; transpose: [num_heads, in_dim, out_dim]
    __global float *out,             // [num_rows, out_dim]
    const uint num_rows,
    const uint num_heads,
    const uint in_dim,
    const uint out_dim,
    const uint transpose)            // 0: out = M x, 1: out = M^T x
{
    const uint i = get_global_id(0);
    const uint row = get_global_id(1);
    if (i >= out_dim || row >= num_rows) return;
    __global const float *m = matrices + (size_t)(row % num_heads) * in_dim * out_dim;
    __global const float *src = x + (size_t)row * in_dim;
    float acc = 0.0f;
    if (transpose) {
        for (uint j = 0; j < in_dim; ++j) acc += m[(size_t)j * out_dim + i] * src[j];
    } else {
        __global const float *mrow = m + (size_t)i * in_dim;
        for (uint j = 0; j < in_dim; ++j) acc += mrow[j] * src[j];
    }
    out[(size_t)row * out_dim + i] = acc;
}

#if defined(HEAD_DIM) && defined(BITS)

__kernel void polar_encode(
    __global const float *rotated,      // [num_rows, HEAD_DIM]
    __global const float *angle_table,  // [LEVELS, 2] cos, sin of each centroid angle
    __global code_t *codes,             // [R, PAIRS]; input row r goes to storage row row_offset + r
    __global float *radii,              // [R, PAIRS]
    __global float *residual,           // [num_rows, HEAD_DIM] rotated - polar_decode
    const ulong row_offset,
    const uint num_rows)
{
    const uint pair = get_global_id(0);
    const uint row = get_global_id(1);
    if (pair >= PAIRS || row >= num_rows) return;
    const size_t at = (size_t)row * HEAD_DIM + 2 * pair;
    const float x = rotated[at], y = rotated[at + 1];
    float r = sqrt(x * x + y * y);
    if (!isfinite(r)) r = FLT_MAX;  // |x| > ~1.8e19 overflows x*x: keep the radius finite
    // Uniform cells on a = atan2/pi: code = number of boundaries -1 + 2k/L strictly below a.
    // In u = a L/2 (exact scaling) the boundaries are the integers -L/2+1 .. L/2-1.
    const float u = atan2(y, x) / M_PI_F * (float)(LEVELS / 2);
    const int code = clamp((int)ceil(u) - 1 + LEVELS / 2, 0, LEVELS - 1);
    const float c = angle_table[2 * code], s = angle_table[2 * code + 1];
    const size_t slot = (row_offset + row) * PAIRS + pair;
    codes[slot] = (code_t)code;
    radii[slot] = r;
    residual[at] = x - r * c;
    residual[at + 1] = y - r * s;
}

__kernel void polar_decode(
    __global const code_t *codes,       // [T, 2, num_heads, PAIRS]
    __global const float *radii,        // [T, 2, num_heads, PAIRS]
    __global const float *angle_table,  // [LEVELS, 2]
    __global float *out,                // [num_tokens, num_heads, HEAD_DIM] rotated space
    const uint kind,                    // 0 keys, 1 values
    const uint num_tokens,
    const uint num_heads)
{
    const uint pair = get_global_id(0);
    const uint token_head = get_global_id(1);  // token * num_heads + head
    if (pair >= PAIRS || token_head >= num_tokens * num_heads) return;
    const uint token = token_head / num_heads, head = token_head % num_heads;
    const size_t slot = (((size_t)token * 2 + kind) * num_heads + head) * PAIRS + pair;
    const int code = codes[slot];
    const float r = radii[slot];
    const size_t at = (size_t)token_head * HEAD_DIM + 2 * pair;
    out[at] = r * angle_table[2 * code];
    out[at + 1] = r * angle_table[2 * code + 1];
}

#endif  // HEAD_DIM && BITS

#if defined(HEAD_DIM) && defined(PROJECTIONS)

__kernel void qjl_sketch(
    __global const float *residual,     // [num_rows, HEAD_DIM]
    __global const float *projections,  // [num_heads, PROJECTIONS, HEAD_DIM]
    __global uchar *signs,              // [R, SIGN_BYTES]; input row r goes to row row_offset + r
    __global float *norms,              // [R]
    const ulong row_offset,
    const uint num_rows,
    const uint num_heads)
{
    const uint byte = get_global_id(0);  // 0 .. SIGN_BYTES; the last work-item computes the norm
    const uint row = get_global_id(1);
    if (byte > SIGN_BYTES || row >= num_rows) return;
    __global const float *e = residual + (size_t)row * HEAD_DIM;
    if (byte == SIGN_BYTES) {
        float sq = 0.0f;
        for (uint j = 0; j < HEAD_DIM; ++j) sq += e[j] * e[j];
        norms[row_offset + row] = sqrt(sq);
        return;
    }
    __global const float *g = projections + (size_t)(row % num_heads) * PROJECTIONS * HEAD_DIM;
    uint bits = 0;
    for (uint k = 0; k < 8; ++k) {
        const uint p = byte * 8 + k;
        if (p >= PROJECTIONS) break;
        __global const float *gp = g + (size_t)p * HEAD_DIM;
        float dot = 0.0f;
        for (uint j = 0; j < HEAD_DIM; ++j) dot += gp[j] * e[j];
        if (dot >= 0.0f) bits |= 1u << k;  // NaN compares false: bit 0
    }
    signs[(row_offset + row) * SIGN_BYTES + byte] = (uchar)bits;
}

#endif  // HEAD_DIM && PROJECTIONS

#if defined(HEAD_DIM) && defined(BITS) && defined(PROJECTIONS)

__kernel void attention_scores(
    __global const code_t *codes,             // [T, 2, num_heads, PAIRS]   (keys: kind 0)
    __global const float *radii,              // [T, 2, num_heads, PAIRS]
    __global const uchar *signs,              // [T, 2, num_heads, SIGN_BYTES]
    __global const float *norms,              // [T, 2, num_heads]
    __global const float *angle_table,        // [LEVELS, 2]
    __global const float *rotated_queries,    // [num_heads, HEAD_DIM]     R_h q_h
    __global const float *projected_queries,  // [num_heads, PROJECTIONS]  G_h R_h q_h
    __global float *scores,                   // [num_heads, num_tokens]
    const uint num_tokens,
    const uint num_heads,
    const float qjl_constant,                 // sqrt(pi/2) as float
    const float inv_sqrt_dim)                 // 1 / sqrt(HEAD_DIM) as float
{
    const uint token = get_global_id(0);
    const uint head = get_global_id(1);
    if (token >= num_tokens || head >= num_heads) return;
    const size_t slot = (size_t)token * 2 * num_heads + head;  // kind 0
    __global const code_t *code = codes + slot * PAIRS;
    __global const float *radius = radii + slot * PAIRS;
    __global const float *rq = rotated_queries + (size_t)head * HEAD_DIM;
    float polar = 0.0f;
    for (uint i = 0; i < PAIRS; ++i) {
        const int c = code[i];
        const float r = radius[i];
        polar += (r * angle_table[2 * c]) * rq[2 * i];
        polar += (r * angle_table[2 * c + 1]) * rq[2 * i + 1];
    }
    const float norm = norms[slot];
    float qjl = 0.0f;
    if (!(norm < 1e-30f)) {
        __global const uchar *bytes = signs + slot * SIGN_BYTES;
        __global const float *gq = projected_queries + (size_t)head * PROJECTIONS;
        float sum = 0.0f;
        for (uint p = 0; p < PROJECTIONS; ++p)
            sum += ((bytes[p / 8] >> (p % 8)) & 1u) ? gq[p] : -gq[p];
        qjl = norm * qjl_constant / (float)PROJECTIONS * sum;
    }
    scores[(size_t)head * num_tokens + token] = (polar + qjl) * inv_sqrt_dim;
}

#endif  // HEAD_DIM && BITS && PROJECTIONS
