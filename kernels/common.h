// kvcl/kernels/common.h — the KV storage formats shared by every kernel family.
//
// Build-time selection (pass with -D, see kvcl/dtypes.py for the same table in Python):
//   KV_DTYPE   0 fp32 | 1 fp16 | 2 int8 | 3 fp8_e4m3 | 4 fp8_e5m2 | 5 int4
//   int4: two codes per byte (KV_PER_ELEM 2): a row of head_dim values is head_dim / 2 bytes.
//         The row x is first rotated, y = H x / sqrt(P) (H the Sylvester Hadamard matrix of
//         order P, the largest power of two dividing head_dim, applied to each P-block; see
//         "int4" below), then coded asymmetrically: lo = fp16(min y), sc = fp16(max((max y -
//         lo) / 15, FLT_EPSILON)), c = clamp(round-half-away((y - lo) / sc), 0, 15), byte j =
//         c[2j] | c[2j+1] << 4; the row's 4-byte scale slot holds the two fp16 bit patterns,
//         sc in the low half, lo in the high half (INT8_MODE 0 only). A value reads back as
//         c * sc + lo in the rotated basis; the rotation is orthonormal and its own inverse, so
//         decode rotates q instead of K, and its output back. kv_load / kv_store address values,
//         not bytes; int4_store2 writes the byte of an even/odd pair.
//   INT8_MODE  0: scale = max(absmax/127, FLT_EPSILON) as float, q = round-half-away(x/scale)
//                 (kvcl's engine and oxibonsai's QuantizedKvLayer)
//              1: scale = max(absmax, 1e-8)/127 stored as half, q = round-half-even(x/scale)
//                 (ferrum's KvInt8); x/scale uses the float scale, dequantisation the stored half
//
// Every format round-trips through plain float arithmetic that is exact (power-of-two
// scaling, rint/round), so kvcl/reference/quantize.py reproduces the stored bytes bit for bit.
// fp16 storage uses vload_half/vstore_half, which are core OpenCL: no cl_khr_fp16 needed.
#ifndef KVCL_COMMON_H
#define KVCL_COMMON_H

#define KV_FP32 0
#define KV_FP16 1
#define KV_INT8 2
#define KV_FP8_E4M3 3
#define KV_FP8_E5M2 4
#define KV_INT4 5

#ifndef KV_DTYPE
#define KV_DTYPE KV_FP32
#endif
#ifndef INT8_MODE
#define INT8_MODE 0
#endif

// kv_t: the pool's element type.  scale_t: the per-(token, kv head) scale's storage type.
#if KV_DTYPE == KV_FP32
typedef float kv_t;
#elif KV_DTYPE == KV_FP16
typedef half kv_t;  // storage only; never used in arithmetic
#elif KV_DTYPE == KV_INT8
typedef char kv_t;
#else
typedef uchar kv_t;
#endif

#define KV_HAS_SCALE (KV_DTYPE == KV_INT8 || KV_DTYPE == KV_INT4)
// KV values per pool element: a row of HEAD_DIM values is HEAD_DIM / KV_PER_ELEM elements of kv_t
#if KV_DTYPE == KV_INT4
#define KV_PER_ELEM 2
#if INT8_MODE != 0
#error "int4 has one scale convention: build it with INT8_MODE 0"
#endif
#else
#define KV_PER_ELEM 1
#endif

#if INT8_MODE == 1
typedef half scale_t;
#define SCALE_LOAD(p, i) vload_half((i), (p))
#define SCALE_STORE(x, p, i) vstore_half_rte((x), (i), (p))
#else
typedef float scale_t;
#define SCALE_LOAD(p, i) ((p)[i])
#define SCALE_STORE(x, p, i) ((p)[i] = (x))
#endif

// ---- fp8 (OCP 8-bit floating point), software encode/decode ----------------------------------
// E4M3 ("fn"): bias 7, no infinities, 0x7F/0xFF are NaN, max 448.
// E5M2: bias 15, IEEE-like, max finite 57344.  Both saturate finite overflow and +-Inf to +-max.

inline uchar fp8_encode(float x, const int man_bits, const int emin, const int bias,
                        const float max_value, const uchar nan_code) {
    const uchar sign = signbit(x) ? (uchar)0x80 : (uchar)0;
    if (isnan(x)) return (uchar)(sign | nan_code);
    float a = fmin(fabs(x), max_value);
    int e;
    (void)frexp(a, &e);                       // a = m * 2^e with m in [0.5, 1): floor(log2 a) = e - 1
    const int ex = max(e - 1, emin);
    const float quantum = ldexp(1.0f, ex - man_bits);
    const float q = fmin(rint(a / quantum) * quantum, max_value);  // exact: power-of-two scaling
    if (q == 0.0f) return sign;
    (void)frexp(q, &e);
    const int qe = e - 1;
    if (qe < emin)                            // subnormal: exponent field 0
        return (uchar)(sign | (int)(q * ldexp(1.0f, man_bits - emin)));
    const int mant = (int)((q * ldexp(1.0f, -qe) - 1.0f) * (float)(1 << man_bits));
    return (uchar)(sign | ((qe + bias) << man_bits) | mant);
}

inline uchar fp8_e4m3_encode(float x) { return fp8_encode(x, 3, -6, 7, 448.0f, (uchar)0x7F); }
inline uchar fp8_e5m2_encode(float x) { return fp8_encode(x, 2, -14, 15, 57344.0f, (uchar)0x7E); }

inline float fp8_e4m3_decode(uchar b) {
    const uint ex = (b >> 3) & 0xFu, m = b & 0x7u;
    float v = ex ? as_float(((ex + 120u) << 23) | (m << 20)) : (float)m * 0x1p-9f;
    if ((b & 0x7Fu) == 0x7Fu) v = NAN;
    return (b & 0x80u) ? -v : v;
}

inline float fp8_e5m2_decode(uchar b) {
    const uint ex = (b >> 2) & 0x1Fu, m = b & 0x3u;
    float v = ex ? as_float(((ex + 112u) << 23) | (m << 21)) : (float)m * 0x1p-16f;
    if (ex == 31u) v = m ? NAN : INFINITY;
    return (b & 0x80u) ? -v : v;
}

// ---- int8 -------------------------------------------------------------------------------------

inline float int8_scale(float absmax) {
#if INT8_MODE == 1
    return fmax(absmax, 1e-8f) / 127.0f;
#else
    return fmax(absmax / 127.0f, FLT_EPSILON);
#endif
}

inline char int8_encode(float x, float scale) {
#if INT8_MODE == 1
    const float r = rint(x / scale);   // round half to even
#else
    const float r = round(x / scale);  // round half away from zero
#endif
    return (char)clamp(r, -127.0f, 127.0f);
}

// kvcl_half_bits_to_float(h): IEEE binary16 bits (low 16 bits of h) -> float, the scalar twin of
// vload_half without the library call: normals by re-biasing the exponent, subnormals as
// mantissa * 2^-24 (exact), Inf/NaN by forcing the exponent to all ones.
inline float kvcl_half_bits_to_float(uint h) {
    const uint e = h & 0x7C00u, m = h & 0x3FFu, sign = (h & 0x8000u) << 16;
    uint bits = ((h & 0x7FFFu) << 13) + (112u << 23);
    bits = e == 0x7C00u ? (0x7F800000u | (m << 13)) : bits;
    const float v = e == 0u ? (float)(int)m * 0x1p-24f : as_float(bits);
    return as_float(as_uint(v) | sign);
}

// ---- int4 -------------------------------------------------------------------------------------
// Why rotate and why asymmetric (tools/kv4_schemes.py, SmolLM2-135M, docs/formats.md): per-row
// symmetric absmax/7 codes cost +28.5 % perplexity through the bridge, these +5.3 % at the same
// bytes (36 a row at head_dim 64), +0.61 % with each query's own token read from float32
// (kvcl/ops/decode_attention.py, `fresh`). The rotation spreads a row's outlier channels over all P
// values; the minimum lets the 16 codes span the row's range, not twice its largest magnitude.

#define INT4_MAXABS 65504.0f   // the largest float16: |y| beyond it has no float16 minimum

// float32(1 / sqrt(p)) for p = 2^k, exactly as numpy rounds it: 2^-(k/2), times float32(1/sqrt 2)
// for odd k (a power-of-two scaling of a correctly rounded constant stays correctly rounded)
inline float kvcl_had_scale(const int p) {
    int k = 0;
    while ((1 << k) < p) ++k;
    return as_float((127 - k / 2) << 23) * ((k & 1) ? 0x1.6a09e6p-1f : 1.0f);
}

// x rounded to float16 (nearest even, overflow to Inf) as float, and its bit pattern in *bits
inline float kvcl_f16_round(const float x, uint *bits) {
    ushort h;
    vstore_half_rte(x, 0, (__private half *)&h);
    *bits = h;
    return kvcl_half_bits_to_float(h);
}

// The rotation of a row held in N vectors of W floats (type T, W a power of two), in place:
// the butterflies x[i], x[i + h] -> x[i] + x[i + h], x[i] - x[i + h] for h = 1, 2, .. P/2 within
// each P-block (as kvcl_fwht_local), then the 1/sqrt(P) scaling. Strides below W pair lanes of
// one vector; the others pair whole vectors (plain vector adds, no lane shuffles). The same tree
// of float adds and subtracts as kvcl.reference.quantize.hadamard_rows: the same bits.
#define KVCL_DEFINE_FWHT(NAME, T, N, W, P)                                                    \
inline void NAME(T *x) {                                                                     \
    const float sc = kvcl_had_scale(P);                                                      \
    _Pragma("unroll")                                                                        \
    for (int h = 1; h < (P) && h < (W); h <<= 1) {                                           \
        _Pragma("unroll")                                                                    \
        for (int k = 0; k < (N); ++k) {                                                      \
            float *e = (float *)&x[k];                                                       \
            _Pragma("unroll")                                                                \
            for (int i = 0; i < (W); ++i) {                                                  \
                if (i & h) continue;                                                         \
                const float a = e[i], b = e[i + h];                                          \
                e[i] = a + b;                                                                \
                e[i + h] = a - b;                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    _Pragma("unroll")                                                                        \
    for (int hv = 1; hv < (P) / (W); hv <<= 1) {                                             \
        _Pragma("unroll")                                                                    \
        for (int k = 0; k < (N); ++k) {                                                      \
            if (k & hv) continue;                                                            \
            const T a = x[k], c = x[k + hv];                                                 \
            x[k] = a + c;                                                                    \
            x[k + hv] = a - c;                                                               \
        }                                                                                    \
    }                                                                                        \
    _Pragma("unroll")                                                                        \
    for (int k = 0; k < (N); ++k) x[k] *= sc;                                                \
}

// The same rotation of a row of n floats in local memory by `lanes` work-items (every one of
// the work-group's work-items calls it: barriers; n, p and lanes uniform), in place.
inline void kvcl_fwht_local(__local float *row, const int n, const int p, const int lane,
                            const int lanes) {
    for (int h = 1; h < p; h <<= 1) {
        for (int b = lane; b < n / 2; b += lanes) {
            const int i = (b / h) * 2 * h + (b % h);   // bit h of i clear: i, i + h in one P-block
            const float x = row[i], y = row[i + h];
            row[i] = x + y;
            row[i + h] = x - y;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float sc = kvcl_had_scale(p);
    for (int i = lane; i < n; i += lanes) row[i] *= sc;
    barrier(CLK_LOCAL_MEM_FENCE);
}

// The code of a rotated value y of a row with minimum lo and scale sc (both float16 values)
inline uint int4_encode(const float y, const float lo, const float sc) {
    return (uint)(int)clamp(round((y - lo) / sc), 0.0f, 15.0f);
}

// The row's (lo, sc) from its rotated minimum and maximum (finite, |.| <= INT4_MAXABS), and the
// slot word (sc bits | lo bits << 16) for the scale array; a minimum of -0 is stored as +0.
inline uint int4_params(const float ymin, const float ymax, float *lo, float *sc) {
    uint lb, sb;
    *lo = kvcl_f16_round(ymin, &lb);
    if (lb == 0x8000u) { lb = 0u; *lo = 0.0f; }   // -0 (which of +-0 a min picks varies): +0
    *sc = kvcl_f16_round(fmax((ymax - *lo) / 15.0f, FLT_EPSILON), &sb);
    return sb | (lb << 16);
}

// the row scale of the selected symmetric format (int8) from the row's absmax
inline float row_scale(float absmax) { return int8_scale(absmax); }

// ---- element access for the selected KV_DTYPE ------------------------------------------------
// kv_load(p, i): the stored element as float, WITHOUT the row scale (callers fold the scale into
// the logit or the probability; see decode_attention.cl).
// kv_store(x, p, i, scale): encode x (a real value) into element i; for int8 `scale` is the row's
// float scale, ignored otherwise. Not for int4 (two values per byte): int4_store2 below.

inline float kv_load(__global const kv_t *p, size_t i) {
#if KV_DTYPE == KV_FP32
    return p[i];
#elif KV_DTYPE == KV_FP16
    return vload_half(i, p);
#elif KV_DTYPE == KV_INT8
    return (float)p[i];
#elif KV_DTYPE == KV_FP8_E4M3
    return fp8_e4m3_decode(p[i]);
#elif KV_DTYPE == KV_INT4
    return (float)((p[i >> 1] >> ((i & 1) * 4)) & 0xFu);   // the code; c * sc + lo, rotated
#else
    return fp8_e5m2_decode(p[i]);
#endif
}

#if KV_DTYPE != KV_INT4   // int4 stores two values per byte: int4_store2 only
inline void kv_store(float x, __global kv_t *p, size_t i, float scale) {
#if KV_DTYPE == KV_FP32
    p[i] = x;
#elif KV_DTYPE == KV_FP16
    vstore_half_rte(x, i, p);
#elif KV_DTYPE == KV_INT8
    p[i] = int8_encode(x, scale);
#elif KV_DTYPE == KV_FP8_E4M3
    p[i] = fp8_e4m3_encode(x);
#else
    p[i] = fp8_e5m2_encode(x);
#endif
}
#endif  // KV_DTYPE != KV_INT4

#if KV_DTYPE == KV_INT4
// int4_store2(y0, y1, p, j, lo, sc): code rotated values 2j and 2j+1 of a row into its byte j
inline void int4_store2(float y0, float y1, __global kv_t *p, size_t j, float lo, float sc) {
    p[j] = (uchar)(int4_encode(y0, lo, sc) | (int4_encode(y1, lo, sc) << 4));
}
#endif

// ---- inline math for hot loops ----------------------------------------------------------------
// Some implementations (PoCL 3.0) do not inline their built-in library: every exp2 / vload_half
// is a call costing ~10x the arithmetic.  These helpers are plain operators and bit tricks.

// kvcl_exp2(x) = 2^x for float, float4, float8 and float16: x = n + f with n = round(x) (the 1.5*2^23
// magic-number trick, which also leaves n in the low bits), f in [-0.5, 0.5]; 2^f by a degree-6
// minimax polynomial (max relative error 2.6e-9, ~1.0e-7 after float rounding), 2^n as two
// exponent-field scalings so gradual underflow and overflow are right: relative error <= 2e-7
// for normal results, 0 below ~2^-150 (-inf -> 0), +inf from 128 on, NaN -> NaN.
// kvcl_exp(x) = e^x the same way with n = round(x * log2(e)) and f = (x - n * ln2) * log2(e),
// ln2 split in a high part whose product with n is exact and a low part (Cody-Waite).
#define KVCL_POW2_POLY(T)                                                                      \
    T p = (T)(0x1.41d332p-13f);                                                                \
    p = p * f + (T)(0x1.5f456ap-10f);                                                          \
    p = p * f + (T)(0x1.3b2dbcp-7f);                                                           \
    p = p * f + (T)(0x1.c6aed4p-5f);                                                           \
    p = p * f + (T)(0x1.ebfbdap-3f);                                                           \
    p = p * f + (T)(0x1.62e430p-1f);                                                           \
    p = p * f + (T)(1.0f);
#define KVCL_POW2_PARTS(T, IT, AS_T)                                                           \
    const IT n1 = n >> 1, n2 = n - n1;                                                         \
    KVCL_POW2_POLY(T)                                                                          \
    return p * AS_T((n1 + (IT)(127)) << 23) * AS_T((n2 + (IT)(127)) << 23);
#define KVCL_EXP2_BODY(T, IT, AS_T, AS_IT)                                                    \
    x = x < (T)(-151.0f) ? (T)(-151.0f) : x;                                                   \
    x = x > (T)(129.0f) ? (T)(129.0f) : x;                                                     \
    const T big = x + (T)(0x1.8p23f);                                                          \
    const T f = x - (big - (T)(0x1.8p23f));                                                    \
    const IT n = AS_IT(big) - (IT)(0x4B400000);                                                \
    KVCL_POW2_PARTS(T, IT, AS_T)
#define KVCL_EXP_BODY(T, IT, AS_T, AS_IT)                                                     \
    x = x < (T)(-105.0f) ? (T)(-105.0f) : x;                                                   \
    x = x > (T)(90.0f) ? (T)(90.0f) : x;                                                       \
    const T big = x * (T)(0x1.715476p+0f) + (T)(0x1.8p23f);                                    \
    const T nf = big - (T)(0x1.8p23f);                                                         \
    const T f = ((x - nf * (T)(0x1.62e400p-1f)) - nf * (T)(0x1.7f7d1cp-20f)) * (T)(0x1.715476p+0f); \
    const IT n = AS_IT(big) - (IT)(0x4B400000);                                                \
    KVCL_POW2_PARTS(T, IT, AS_T)

inline float __attribute__((overloadable)) kvcl_exp2(float x) { KVCL_EXP2_BODY(float, int, as_float, as_int) }
inline float4 __attribute__((overloadable)) kvcl_exp2(float4 x) { KVCL_EXP2_BODY(float4, int4, as_float4, as_int4) }
inline float8 __attribute__((overloadable)) kvcl_exp2(float8 x) { KVCL_EXP2_BODY(float8, int8, as_float8, as_int8) }
inline float16 __attribute__((overloadable)) kvcl_exp2(float16 x) { KVCL_EXP2_BODY(float16, int16, as_float16, as_int16) }
// kvcl_exp2_nonpos(x) = 2^x for x <= 0 (a softmax term 2^(s - max)), cheaper: one exponent
// scaling, no upper clamp; results below 2^-126 flush to 0 (a term that small is below the fp32
// resolution of a softmax sum >= 1). -inf -> 0, NaN -> NaN; for x > 0 the result is wrong.
// In the serial decode kernel's softmax: arithmetic alone (pages in cache) 1.01-1.07x faster
// for fp16, int8 and fp32 (PoCL, 12-16 rounds in random order, three runs).
#define KVCL_EXP2_NONPOS_BODY(T, IT, AS_T, AS_IT)                                              \
    x = x < (T)(-127.0f) ? (T)(-127.0f) : x;                                                   \
    const T big = x + (T)(0x1.8p23f);                                                          \
    const T f = x - (big - (T)(0x1.8p23f));                                                    \
    const IT n = AS_IT(big) - (IT)(0x4B400000);                                                \
    KVCL_POW2_POLY(T)                                                                          \
    return p * AS_T((n + (IT)(127)) << 23);        /* n = -127: exponent field 0, the result 0 */
inline float __attribute__((overloadable)) kvcl_exp2_nonpos(float x) { KVCL_EXP2_NONPOS_BODY(float, int, as_float, as_int) }
inline float8 __attribute__((overloadable)) kvcl_exp2_nonpos(float8 x) { KVCL_EXP2_NONPOS_BODY(float8, int8, as_float8, as_int8) }
inline float __attribute__((overloadable)) kvcl_exp(float x) { KVCL_EXP_BODY(float, int, as_float, as_int) }
inline float4 __attribute__((overloadable)) kvcl_exp(float4 x) { KVCL_EXP_BODY(float4, int4, as_float4, as_int4) }
inline float8 __attribute__((overloadable)) kvcl_exp(float8 x) { KVCL_EXP_BODY(float8, int8, as_float8, as_int8) }

#endif  // KVCL_COMMON_H
