// kvcl/kernels/decode_int8dot.h — INT8_DOT of decode_attention.cl (included there, after
// decode_loads.h): the query quantized to integer codes and Q.K as exact int32 sums.
#ifndef KVCL_DECODE_INT8DOT_H
#define KVCL_DECODE_INT8DOT_H

// ---- INT8_DOT: integer Q.K on the int8 codes (and int4's, below) -----------------------------
// INT8_DOT = 0: float logits (the query in float times the dequantised codes, as every format).
// INT8_DOT = 16 or 8: the query row (raw, per token and query head) is quantized once per
// work-group to signed codes of that many bits, c = clamp(rint(q / step), -QMAX, QMAX) with
// step = amax / QMAX (amax = max |q| of the row, QMAX = 32767 or 127; correctly rounded
// division, so kvcl/reference/decode_attention.py reproduces every code), and each logit is
//     (float)(sum_d c_d * k_d) * (step * qk_scale_log2) * k_scale
// with the sum in exact int32 arithmetic (|sum| <= HEAD_DIM * QMAX * 127 < 2^31 for HEAD_DIM
// <= 512) and the two products in that order. A NaN / Inf in the row makes its step NaN / Inf,
// its codes 0 and its logits NaN (its output NaN, as with float logits); an all-zero row has
// step 0, logits 0. The softmax, the V accumulation and the merge are unchanged.
// On x86 PoCL (CPU_BUILTINS, AVX2) the sums are vpmaddwd on the widened K codes (16-bit query:
// 16 codes per instruction), or for the 8-bit query vpmaddubsw on |k| and sign(k) * q, widened
// by vpmaddwd with ones (32 codes); elsewhere VEC-wide int multiply-adds (the compiler's own
// widening multiply-adds; cl_khr_integer_dot_product is not used: no device measured has it).
// Measured (PoCL 3.0 building for znver3 on a 2-core Zen 4 VM, int8 B=4 Hq=32 Hkv=8 D=128
// L=2048, random-order A/B): decode 1.09-1.16x faster than float logits (five runs of 20
// rounds; 2.63-3.27x kvcl fp32), arithmetic alone 1.16-1.19x; 8-bit codes no faster with 2.5x
// the error vs fp32; V in integers too (token pairs through vpmaddwd) no faster, not kept.
//
// int4 KV (INT8_DOT = 16 or 8, the serial variant): the same on the rotated query q' (the float
// path's q * qk_scale_log2 rotated, common.h) against the unsigned codes 0..15, the logit then
//     (float)(sum_d c_d * code_d) * step * k_scale + k_minimum * sum(q')
// (step from q', so qk_scale_log2 is inside it). On x86 PoCL with AVX2 a K row is read 16 bytes
// at a time, their low nibbles (even elements) and high nibbles (odd elements) side by side, so
// the query codes are stored in that order (QPOS): 8-bit codes as 32 unsigned bytes for
// vpmaddubsw (pair sums at most 2 * 15 * 127, no saturation), 16-bit codes as two vpmaddwd on
// the nibbles widened to 16 bits (low nibbles against the first 16 codes, high against the rest).
#ifndef INT8_DOT
#define INT8_DOT 0
#endif
#if INT8_DOT && KV_DTYPE != KV_INT8 && !(KV_DTYPE == KV_INT4 && SERIAL)
#error "INT8_DOT needs KV_DTYPE int8 (or int4 in the serial variant)"
#endif
#if INT8_DOT != 0 && INT8_DOT != 8 && INT8_DOT != 16
#error "INT8_DOT must be 0, 8 or 16"
#endif
#if INT8_DOT
#if HEAD_DIM > 512
#error "INT8_DOT: HEAD_DIM > 512 could overflow the int32 sums"
#endif
#define QMAX (INT8_DOT == 16 ? 32767.0f : 127.0f)
#if SERIAL && CPU_BUILTINS && defined(__AVX2__) && defined(__has_builtin)
#if __has_builtin(__builtin_ia32_pmaddwd256) && __has_builtin(__builtin_ia32_pmaddubsw256) \
    && __has_builtin(__builtin_ia32_psignb256)
#if (INT8_DOT == 16 && HEAD_DIM % (KV_DTYPE == KV_INT4 ? 32 : 16) == 0) \
    || (INT8_DOT == 8 && HEAD_DIM % 32 == 0)
#define IDOT_X86 1
#endif
#endif
#endif
#ifndef IDOT_X86
#define IDOT_X86 0
#endif
#define QPOS(d) (d)                    // where query code d is kept (int4 on x86: see below)
#if IDOT_X86 && KV_DTYPE == KV_INT4
// element 2j of a 32-element slice is byte j's low nibble, 2j + 1 its high one
#undef QPOS
#define QPOS(d) (((d) & ~31) + ((d) & 1) * 16 + (((d) & 31) >> 1))
#endif
#if IDOT_X86 && KV_DTYPE == KV_INT4 && INT8_DOT == 16
typedef short short32 __attribute__((ext_vector_type(32)));
typedef short qelem_t;
typedef short32 qcode_t;
typedef int8 iacc_t;
#define QN 32
// a slice's 16 bytes widened to 16 bits once per K row; low nibbles meet query codes 0..15 of the
// slice, high nibbles 16..31 (pair sums <= 2 * 15 * 32767 in int32 lanes)
#define KCODES(p, i) const short16 kw = CVT(((__global const uchar16 *)(p))[i], short16); \
                     const short16 klo = kw & (short)0xF, khi = kw >> (short)4;
#define IDOT(qv) (__builtin_ia32_pmaddwd256(klo, (qv).lo) + __builtin_ia32_pmaddwd256(khi, (qv).hi))
#elif IDOT_X86 && KV_DTYPE == KV_INT4
typedef char char32 __attribute__((ext_vector_type(32)));
typedef char qelem_t;
typedef char32 qcode_t;
typedef int8 iacc_t;
#define QN 32
#define KCODES(p, i) const char16 kb = ((__global const char16 *)(p))[i]; \
                     const char32 ka = __builtin_shufflevector(kb & (char)0xF, (kb >> (char)4) & (char)0xF, \
                         0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, \
                         23, 24, 25, 26, 27, 28, 29, 30, 31);
#if HEAD_DIM <= 256   // 16-bit lanes hold a row's pair sums: HEAD_DIM / 32 of them, each <= 3810
typedef short16 ipart_t;
#define IDOT(qv) __builtin_ia32_pmaddubsw256(ka, (qv))
#define IFINISH(a) __builtin_ia32_pmaddwd256((a), (short16)(1))
#else
#define IDOT(qv) __builtin_ia32_pmaddwd256(__builtin_ia32_pmaddubsw256(ka, (qv)), (short16)(1))
#endif
#elif KV_DTYPE == KV_INT4
typedef int qelem_t;
typedef intV qcode_t;
typedef intV iacc_t;
#define QN VEC
#define KCODES(p, i) const intV kc = AS_INTV(int4v_codes((p), (i)));
#define IDOT(qv) (kc * (qv))
#elif IDOT_X86 && INT8_DOT == 16
typedef short qelem_t;                 // one query code
typedef short16 qcode_t;               // QN query codes, the operand of one multiply-add step
typedef int8 iacc_t;                   // the step's partial sums
#define QN 16
#define KCODES(p, i) const short16 kc = CVT(((__global const char16 *)(p))[i], short16);
#define IDOT(qv) __builtin_ia32_pmaddwd256(kc, (qv))
#elif IDOT_X86 && INT8_DOT == 8
typedef char char32 __attribute__((ext_vector_type(32)));
typedef char qelem_t;
typedef char32 qcode_t;
typedef int8 iacc_t;
#define QN 32
// |k| (unsigned operand) once per K vector; per row sign(k) * q, pair sums (<= 2 * 127 * 127, no
// saturation: codes are within +-127), then pairs of pairs widened to int32
#define KCODES(p, i) const char32 kc = ((__global const char32 *)(p))[i]; \
                     const char32 ka = __builtin_ia32_psignb256(kc, kc);
#define IDOT(qv) __builtin_ia32_pmaddwd256(__builtin_ia32_pmaddubsw256(ka, __builtin_ia32_psignb256((qv), kc)), \
                                           (short16)(1))
#else
typedef int qelem_t;
typedef intV qcode_t;
typedef intV iacc_t;
#define QN VEC
#define KCODES(p, i) const intV kc = CVT(((__global const charV *)(p))[i], intV);
#define IDOT(qv) (kc * (qv))
#endif
#define NQ (HEAD_DIM / QN)             // multiply-add steps per K row
#ifndef IFINISH                        // a row's partial sums (ipart_t) to int32 lanes (iacc_t)
typedef iacc_t ipart_t;
#define IFINISH(a) (a)
#endif

inline int isum(iacc_t v) {
#if IDOT_X86 || VEC == 8
    const int4 h = v.lo + v.hi;
#elif VEC == 16
    const int4 h = (v.lo.lo + v.lo.hi) + (v.hi.lo + v.hi.hi);
#else
    const int4 h = v;
#endif
    return (h.x + h.y) + (h.z + h.w);
}

#if defined(HAVE_SHUFFLE) && (IDOT_X86 || VEC == 8)
// the int twin of vsum4x8: the sums of four int8 at once
DEFINE_SUM4X8(isum4x8, int8, int4)   // decode_attention.cl
#define HAVE_ISUM4 1
#endif

// The step of one query row (amax / QMAX, correctly rounded) from its amax, and its code of x:
// rint(x / step) clamped to +-QMAX (clamped first, then rounded with the 1.5 * 2^23 trick: the
// same value, as QMAX is an integer; rint() and fabs() are library calls on PoCL 3.0).
inline float qabs(float x) { return as_float(as_uint(x) & 0x7FFFFFFFu); }
inline float qstep(float amax) { return amax / QMAX; }
inline qelem_t qcode(float x, float step) {
    float c = x / step;                  // step 0 (0 / 0): NaN; step Inf: 0 or NaN
    c = c > QMAX ? QMAX : c;
    c = c < -QMAX ? -QMAX : c;
    c = (c + 0x1.8p23f) - 0x1.8p23f;     // round half to even, NaN stays NaN
    return (qelem_t)(c == c ? c : 0.0f); // NaN -> 0
}
#endif  // INT8_DOT

#endif  // KVCL_DECODE_INT8DOT_H
