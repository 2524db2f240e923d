// kvcl/kernels/decode_loads.h — the K/V row decoders of decode_attention.cl (included there,
// after its VEC / floatV / CVT / CPU_BUILTINS definitions): vector i of a stored row as floats
// (kv_loadv), the int8 row scale (scale_load), int4's codes, scale and minimum, and its rotation.
#ifndef KVCL_DECODE_LOADS_H
#define KVCL_DECODE_LOADS_H

#if KV_DTYPE == KV_FP16
// IEEE binary16 bits -> float (vector twin of vload_half): normals by re-biasing the exponent,
// subnormals as mantissa * 2^-24 (exact), Inf/NaN by forcing the exponent to all ones.
inline floatV half_bits_to_float(uintV h) {
    const uintV e = h & 0x7C00u, m = h & 0x3FFu, sign = (h & 0x8000u) << 16;
    uintV bits = ((h & 0x7FFFu) << 13) + (112u << 23);
    bits = e == 0x7C00u ? (0x7F800000u | (m << 13)) : bits;
    const floatV sub = CVT(AS_INTV(m), floatV) * 0x1p-24f;
    const floatV v = e == 0u ? sub : AS_FLOATV(bits);
    return AS_FLOATV(AS_UINTV(v) | sign);
}
#endif

#if KV_DTYPE == KV_FP8_E4M3 || KV_DTYPE == KV_FP8_E5M2
// Vector twins of fp8_e4m3_decode / fp8_e5m2_decode in common.h (bit manipulation, no tables).
inline floatV fp8v_decode(uintV b) {
#if KV_DTYPE == KV_FP8_E4M3
    const uintV ex = (b >> 3) & 0xFu, m = b & 0x7u;
    floatV v = AS_FLOATV(((ex + 120u) << 23) | (m << 20));
    v = ex == 0u ? CVT(AS_INTV(m), floatV) * 0x1p-9f : v;
    v = (b & 0x7Fu) == 0x7Fu ? (floatV)(NAN) : v;
#else
    const uintV ex = (b >> 2) & 0x1Fu, m = b & 0x3u;
    floatV v = AS_FLOATV(((ex + 112u) << 23) | (m << 21));
    v = ex == 0u ? CVT(AS_INTV(m), floatV) * 0x1p-16f : v;
    v = ex == 31u ? (m != 0u ? (floatV)(NAN) : (floatV)(INFINITY)) : v;
#endif
    return AS_FLOATV(AS_UINTV(v) | ((b & 0x80u) << 24));
}
#endif

#if CPU_BUILTINS && VEC == 8 && defined(__has_builtin)
#if __has_builtin(__builtin_ia32_vcvtph2ps256)
#define F16C_8 1                       // ph8_to_float8: fp16 bits -> float, exact, Inf/NaN kept
#define ph8_to_float8(h) __builtin_ia32_vcvtph2ps256(as_short8(h))
#endif
#endif

#if KV_DTYPE == KV_FP8_E4M3 && defined(F16C_8)
// e4m3 -> fp16 bits with the same exponent field (bias 7 vs 15: the value times 2^-8), exact for
// subnormals too, from the sign-extended byte in one shift and one mask: the sign lands in bit
// 15 (from the extension), exponent and mantissa in bits 13..7; bit 14 (a copy of the sign) is
// cleared. The NaN codes 0x7F / 0xFF read as +-480 * 2^-8 (the largest finite is 448).
inline float8 e4m3_scaled(__global const kv_t *p, int i) {
    const short8 sb = CVT(((__global const char8 *)p)[i], short8);
    return ph8_to_float8((sb << (short)7) & (short)0xBFFF);
}

// E4M3_FAST (the serial variant with F16C): the hot loops take e4m3_scaled as it is, the logit
// times 2^8 and p times 2^8 for V (exact: powers of two), and a row holding a NaN code, found
// 8 codes at a time, makes its logit NaN (K) or takes the exact decode (V). Against decoding
// each vector exactly (rescale + NaN test per 8 codes): 1.08-1.22x faster (B=4 L=2048, PoCL,
// two runs of 16-20 rounds in random order with the previous kernel).
#define E4M3_FAST 1
inline bool row_has_nan(__global const kv_t *p) {
    ulong hit = 0;
    #pragma unroll
    for (int i = 0; i < HEAD_DIM / 8; ++i) {   // (code & 0x7F) + 1 carries into bit 7 for 0x7F only
        const ulong x = ((__global const ulong *)p)[i] & 0x7F7F7F7F7F7F7F7FUL;
        hit |= (x + 0x0101010101010101UL) & 0x8080808080808080UL;
    }
    return hit != 0;
}
#else
#define E4M3_FAST 0
#endif

#if KV_DTYPE == KV_INT4
// Values i * VEC .. i * VEC + VEC - 1 of an int4 row (VEC / 2 bytes, low nibble first) as the
// codes in [0, 15], without the row's scale and minimum: the bytes read as one word, broadcast,
// each lane shifted to its nibble (value 2j + 1 is bits 8j + 4 .. 8j + 7), masked, converted.
// Against unpacking the low and the high nibbles as two half vectors and interleaving them
// (shuffles): see docs/performance.md.
inline uintV int4v_codes(__global const kv_t *p, int i) {
#if VEC == 4
    const uint w = ((__global const ushort *)p)[i];
    return ((uint4)(w) >> (uint4)(0, 4, 8, 12)) & 0xFu;
#elif VEC == 8
    const uint w = ((__global const uint *)p)[i];
    return ((uint8)(w) >> (uint8)(0, 4, 8, 12, 16, 20, 24, 28)) & 0xFu;
#else
    const uint2 w = ((__global const uint2 *)p)[i];
    const uint8 sh = (uint8)(0, 4, 8, 12, 16, 20, 24, 28);
    return (uint16)(((uint8)(w.x) >> sh) & 0xFu, ((uint8)(w.y) >> sh) & 0xFu);
#endif
}
inline floatV int4v_decode(__global const kv_t *p, int i) { return CVT(AS_INTV(int4v_codes(p, i)), floatV); }

// int4 (common.h): a row decodes as c * sc + lo in the rotated basis, so
//   q . k = sc * (q' . c) + lo * sum(q')     with q' the rotated query (once per work-group),
//   sum_t p_t v_t = R (sum_t (p_t sc_t) c_t + (sum_t p_t lo_t) 1)
// : the K scale multiplies the code logit, the K minimum times the row sum of q' is added; the V
// scale goes into p as int8's does, and sum_t p_t lo_t is one more running sum per query row
// (rescaled with acc), added to every element before the output is rotated back (before the
// split-K workspace: the merge is linear). R is int4_fwht below.
#define HAD_P (HEAD_DIM & -HEAD_DIM)
KVCL_DEFINE_FWHT(int4_fwht, floatV, NV, VEC, HAD_P)

inline void int4_row_params(__global const scale_t *p, const int i, float *sc, float *lo) {
    const uint w = ((__global const uint *)p)[i];
    *sc = kvcl_half_bits_to_float(w & 0xFFFFu);
    *lo = kvcl_half_bits_to_float(w >> 16);
}
#endif

// Vector i (VEC elements) of a stored row starting at p, as float, without the int8 row scale.
inline floatV kv_loadv(__global const kv_t *p, int i) {
#if KV_DTYPE == KV_FP32
    return ((__global const floatV *)p)[i];
#elif KV_DTYPE == KV_FP16 && defined(F16C_8)
    return ph8_to_float8(((__global const ushort8 *)p)[i]);
#elif KV_DTYPE == KV_FP16
    return half_bits_to_float(CVT(((__global const ushortV *)p)[i], uintV));
#elif KV_DTYPE == KV_INT8
    return CVT(((__global const charV *)p)[i], floatV);
#elif KV_DTYPE == KV_INT4
    return int4v_decode(p, i);
#elif KV_DTYPE == KV_FP8_E5M2 && defined(F16C_8)
    // e5m2 is the high byte of an fp16
    return ph8_to_float8(CVT(((__global const uchar8 *)p)[i], ushort8) << (ushort)8);
#elif KV_DTYPE == KV_FP8_E4M3 && defined(F16C_8)
    // e4m3_scaled rescaled, NaN codes (the only ones at |v| = 480) made NaN. Measured against
    // masking both fields apart and widening the codes for the NaN test: 1.10-1.16x faster
    // decode (B=4 L=2048, PoCL 3.0, three interleaved A/B runs).
    const float8 v = e4m3_scaled(p, i) * 0x1p8f;
    return (as_int8(v) & 0x7FFFFFFF) == 0x43F00000 ? (float8)(NAN) : v;   // 0x43F00000 = 480.0f
#else
    return fp8v_decode(CVT(((__global const ucharV *)p)[i], uintV));
#endif
}


#if KV_HAS_SCALE
// The int8 row scale as float (INT8_MODE 1 stores it as fp16 bits: converted inline).
inline float scale_load(__global const scale_t *p, const int i) {
#if INT8_MODE == 1
    return kvcl_half_bits_to_float(((__global const ushort *)p)[i]);
#else
    return p[i];
#endif
}
#endif

#endif  // KVCL_DECODE_LOADS_H
