// kvcl/kernels/paged_write.cl — fused paged write: split QKV → optional RMS q/k-norm → RoPE →
// quantize to the pool's dtype → scatter into the paged pool by slot; Q comes out rotated.
//
// Idea: one "row" is one (token, head) vector of HEAD_DIM floats.  A work-group holds ROWS rows
// of one token (local size (LX, ROWS, 1), global (LX, ceil(nrows / ROWS)·ROWS, T)), where the
// rows of a token are its num_q_heads Q heads, then its num_kv_heads K heads, then its V heads.
// Each of the LX work-items of a row owns the rotation pairs p = lx, lx + LX, ... of that row
// ((p, p + HEAD_DIM/2) for half-split RoPE and for no RoPE, (2p, 2p+1) for interleaved), keeps
// them in registers from load to store, and the row's sum of squares (RMS norm) and
// absmax (int8 / int4 scale and the non-finite check) are reductions over the row's LX work-items in
// local memory (halving tree on GPUs, one barrier + serial sum on CPUs; none when LX = 1, the
// CPU default, where one work-item owns the whole row).
// Every byte is read once and written once: bytes in = T·(Hq + 2·Hkv)·D·4 (+ tables), bytes
// out = T·Hq·D·4 + 2·T·Hkv·(D·bytes_per_elem + scale bytes).
//
// The same kernel serves the fused path (Q, K, V rows cut from one qkv[T, (Hq+2Hkv)·D] buffer)
// and the plain write of already-computed keys/values[T, Hkv, D] (num_q_heads = 0, ROPE none,
// no norm): each source is passed as (buffer, element offset, token stride).
//
// Build options (-D): KV_DTYPE, INT8_MODE (common.h), HEAD_DIM (even), ROPE (0 none, 1 half,
// 2 interleaved), Q_NORM, K_NORM (0/1), LX (power of two: work-items per row), ROWS (rows per
// work-group).  The host (kvcl/ops/paged_write.py) derives LX and ROWS from the device limits.
// paged_write_rows (CPUs, below) takes ROW_VEC, ROWS and ROW_NT instead of LX.
//
// status[0] bits (atomic_or; never cleared here): 1 = a K/V row was non-finite after norm/RoPE
// and was not written; 2 = a slot >= num_slots (that token's K/V not written); 4 = a position
// outside [0, max_position) with RoPE on (nothing of that token written).  Negative slots are
// padding: K/V skipped silently, Q written.
//
// CPUs run paged_write_rows (end of this file, -DROW_VEC, chosen by the host for CPU devices
// when the vector width divides HEAD_DIM and every source offset/stride): one work-item per
// (token, head row), the row in HEAD_DIM/ROW_VEC float16 (or narrower) registers, vector-typed
// loads/stores, sum of squares / RoPE / absmax (as the largest |x| bit pattern) in registers,
// int8 rounding by trunc + exact fraction compares (bit-identical to round / rint, checked
// exhaustively for |r| <= 256), non-temporal stores for q_out and the pool rows; no barriers and
// no per-element builtin calls.  GPUs (and widths nothing fits) keep paged_write above.
//
// Measured (2048-token prefill, Hq=32, Hkv=8, D=128, qk-norm + half RoPE, shuffled slots; bytes
// = qkv in + cos/sin rows + q_out + K/V (+ scales) out + slots/positions: fp32 100.7 MB, int8
// 88.2 MB), as a fraction of kvcl's streaming read sampled in turn with it (kvcl bench):
//   PoCL 3.0, 2-core EPYC VM, paged_write_rows: fp32 5.6-5.8 ms = 69-86%, int8 4.4-6.3 ms =
//   67-82% (three runs); the work-group kernel on the same CPU (LX=1, ROWS=16) was 4x slower
//   than the row kernel in one interleaved A/B (80.2 vs 20.1 ms on a loaded machine).
//   NVIDIA H100 (OpenCL), paged_write: fp32 0.28-0.34 ms = 11-13%, int8 0.20-0.29 ms = 11-15%
//   of a 2.8 TB/s read: at 100 MB the launch is short and this kernel was not tuned for GPUs.
// Paired A/B of the row kernel's steps (PoCL): non-temporal stores 1.15-1.38x, ROW_VEC 16 vs 8
// 1.06-1.15x, ROW_VEC 4 1.3-1.5x slower than 8.
// Non-temporal stores are weakly ordered: they are made visible by the locked operations /
// mutexes with which the runtime ends the work-group and the command (x86 flushes
// write-combining buffers on locked instructions).
#include "common.h"

#pragma OPENCL FP_CONTRACT OFF  // a·c − b·s exactly as the numpy reference computes it

#ifndef HEAD_DIM
#error "paged_write.cl needs -DHEAD_DIM"
#endif
#if HEAD_DIM % 2 != 0
#error "HEAD_DIM must be even"
#endif
#ifndef ROPE
#define ROPE 1
#endif
#ifndef Q_NORM
#define Q_NORM 0
#endif
#ifndef K_NORM
#define K_NORM 0
#endif
#ifndef LX
#define LX 1
#endif
#ifndef ROWS
#define ROWS 1
#endif

#define ROPE_NONE 0
#define ROPE_HALF 1
#define ROPE_INTERLEAVED 2

#define HALF_DIM (HEAD_DIM / 2)
#define KV_ROW (HEAD_DIM / KV_PER_ELEM)  // pool elements of one (token, kv head) row
// int4 rotates a K/V row (common.h) before coding it: the row is staged in local memory after
// norm and RoPE, rotated there by the row's LX work-items (kvcl_fwht_local), its min / max /
// range reduced, and each work-item packs its bytes (elements 2p, 2p+1) from there.
#if KV_DTYPE == KV_INT4
#define INT4_STAGE 1
#else
#define INT4_STAGE 0
#endif
#define HAD_P (HEAD_DIM & -HEAD_DIM)      // int4's rotation order
#define NPAIR ((HALF_DIM + LX - 1) / LX)  // pairs per work-item
#if HALF_DIM % LX == 0
#define IN_ROW(p) 1
#else
#define IN_ROW(p) ((p) < HALF_DIM)
#endif

#define ROW_Q 0
#define ROW_K 1
#define ROW_V 2
#define ROW_NONE 3

// Whether a row of this kind gets the RMS norm (both kernels below).
inline bool row_is_normed(const int kind) {
    // Preprocessor, not (Q_NORM && ...) || ...: clang warns of constant operands of && and ||.
#if Q_NORM && K_NORM
    return kind == ROW_Q || kind == ROW_K;
#elif Q_NORM
    return kind == ROW_Q;
#elif K_NORM
    return kind == ROW_K;
#else
    return false;
#endif
}

// Where work-item row r of token t goes: which of Q/K/V, which head, its slot and RoPE row,
// and whether they are in range (both kernels below start with this).
typedef struct {
    int kind, h, slot, pos;
    bool pos_ok, slot_ok;
} row_site;

inline row_site locate_row(const int r, const int t, const int nq, const int nkv,
                           __global const int *slot_mapping,   // [T]
                           __global const int *positions,      // [T]
                           const int max_position, const int num_slots) {
    row_site site;
    site.kind = r < nq ? ROW_Q : r < nq + nkv ? ROW_K : r < nq + 2 * nkv ? ROW_V : ROW_NONE;
    site.h = site.kind == ROW_Q ? r : site.kind == ROW_K ? r - nq : r - nq - nkv;
    site.slot = slot_mapping[t];
#if ROPE != ROPE_NONE
    site.pos = positions[t];
    site.pos_ok = site.pos >= 0 && site.pos < max_position;
#else
    site.pos = 0;
    site.pos_ok = true;
#endif
    site.slot_ok = site.slot >= 0 && site.slot < num_slots;
    return site;
}

#define STATUS_NONFINITE 1
#define STATUS_BAD_SLOT 2
#define STATUS_BAD_POSITION 4

// element indices of rotation pair p
#if ROPE == ROPE_INTERLEAVED
#define LO(p) (2 * (p))
#define HI(p) (2 * (p) + 1)
#else
#define LO(p) (p)
#define HI(p) ((p) + HALF_DIM)
#endif

#if LX > 1
// Row reductions over the LX work-items of one row: red holds the row's LX partial values,
// *res the result.  Every work-item of the work-group calls them (uniform barriers).
// TREE_REDUCE 1: log2(LX) halving steps (GPUs).  0: work-item 0 sums the LX values after one
// barrier (CPUs: PoCL turns every barrier inside a loop into a costly work-item loop split).
#ifndef TREE_REDUCE
#define TREE_REDUCE 1
#endif
#define RED_OP_SUM(x, y) ((x) + (y))
#define RED_OP_MAX(x, y) fmax((x), (y))
#if TREE_REDUCE
#define DEFINE_ROW_REDUCE(NAME, OP)                                                       \
inline float NAME(__local float *red, __local float *res, const int lx, float v) {       \
    red[lx] = v;                                                                          \
    barrier(CLK_LOCAL_MEM_FENCE);                                                         \
    for (int s = LX / 2; s > 0; s >>= 1) {                                                \
        if (lx < s) red[lx] = OP(red[lx], red[lx + s]);                                   \
        barrier(CLK_LOCAL_MEM_FENCE);                                                     \
    }                                                                                     \
    const float r = red[0];                                                               \
    barrier(CLK_LOCAL_MEM_FENCE);  /* red is reused by the next reduction */              \
    return r;                                                                             \
}
#else
#define DEFINE_ROW_REDUCE(NAME, OP)                                                       \
inline float NAME(__local float *red, __local float *res, const int lx, float v) {       \
    red[lx] = v;                                                                          \
    barrier(CLK_LOCAL_MEM_FENCE);                                                         \
    if (lx == 0) {                                                                        \
        float acc = red[0];                                                               \
        for (int i = 1; i < LX; ++i) acc = OP(acc, red[i]);                               \
        *res = acc;                                                                       \
    }                                                                                     \
    barrier(CLK_LOCAL_MEM_FENCE);                                                         \
    return *res;  /* res is rewritten only after the next reduction's first barrier */    \
}
#endif
DEFINE_ROW_REDUCE(row_sum, RED_OP_SUM)
DEFINE_ROW_REDUCE(row_max, RED_OP_MAX)
#endif

__kernel __attribute__((reqd_work_group_size(LX, ROWS, 1)))
void paged_write(
    __global const float *q_src,       // Q head h of token t at q_src[q_off + t*q_stride + h*HEAD_DIM + d]
    const int q_off,                   // element offset of token 0's Q heads (unused if num_q_heads == 0)
    const int q_stride,                // elements between consecutive tokens' Q heads
    __global const float *k_src,       // K head h of token t at k_src[k_off + t*k_stride + h*HEAD_DIM + d]
    const int k_off,
    const int k_stride,
    __global const float *v_src,       // V head h of token t at v_src[v_off + t*v_stride + h*HEAD_DIM + d]
    const int v_off,
    const int v_stride,
    __global const int *slot_mapping,  // [T] block_id*block_size + offset; < 0: skip K/V
    __global const int *positions,     // [T] row of cos/sin (unused when ROPE == 0)
    __global const float *cos_tab,     // [max_position, HEAD_DIM/2] (unused when ROPE == 0)
    __global const float *sin_tab,     // [max_position, HEAD_DIM/2]
    const int max_position,
    __global const float *q_norm_w,    // [HEAD_DIM] (Q_NORM only)
    __global const float *k_norm_w,    // [HEAD_DIM] (K_NORM only)
    const float eps,
    __global float *q_out,             // [T, num_q_heads, HEAD_DIM]
    __global kv_t *k_pool,             // [num_blocks, num_kv_heads, block_size, HEAD_DIM]
    __global kv_t *v_pool,             // [num_blocks, num_kv_heads, block_size, HEAD_DIM]
    __global scale_t *k_scales,        // [num_blocks, num_kv_heads, block_size] (int8 only)
    __global scale_t *v_scales,        // [num_blocks, num_kv_heads, block_size] (int8 only)
    __global int *status,              // [1] error bits, see the header
    const int num_q_heads,             // 0 for the plain K/V write
    const int num_kv_heads,
    const int block_size,
    const int num_slots)               // num_blocks * block_size
{
    const int lx = get_local_id(0);
    const int r = get_global_id(1);    // row within the token: Q heads, K heads, V heads
    const int t = get_global_id(2);    // token
    const int nq = num_q_heads, nkv = num_kv_heads;
    const row_site site = locate_row(r, t, nq, nkv, slot_mapping, positions, max_position, num_slots);
    const int kind = site.kind, h = site.h, slot = site.slot, pos = site.pos;
    const bool pos_ok = site.pos_ok, slot_ok = site.slot_ok;
    const bool active = pos_ok && (kind == ROW_Q || (kind != ROW_NONE && slot_ok));

    if (lx == 0) {  // one report per token
        if (!pos_ok && r == 0) atomic_or(status, STATUS_BAD_POSITION);
        if (pos_ok && slot >= num_slots && r == nq) atomic_or(status, STATUS_BAD_SLOT);
    }

    // ---- load: this work-item's rotation pairs ------------------------------------------------
    float a[NPAIR], b[NPAIR];
    __global const float *src = 0;
    if (active) {
        src = kind == ROW_Q ? q_src + q_off + (size_t)t * q_stride
            : kind == ROW_K ? k_src + k_off + (size_t)t * k_stride
                            : v_src + v_off + (size_t)t * v_stride;
        src += h * HEAD_DIM;
    }
    if (active) {
        for (int j = 0; j < NPAIR; ++j) {
            const int p = lx + j * LX;
            a[j] = IN_ROW(p) ? src[LO(p)] : 0.0f;
            b[j] = IN_ROW(p) ? src[HI(p)] : 0.0f;
        }
    } else {
        for (int j = 0; j < NPAIR; ++j) a[j] = b[j] = 0.0f;
    }

#if LX > 1
    __local float red_all[ROWS * LX];
    __local float res_all[ROWS];
    __local float *red = red_all + get_local_id(1) * LX;
    __local float *res = res_all + get_local_id(1);
#endif
#if INT4_STAGE
    __local float stage_all[ROWS * HEAD_DIM];  // the row after norm and RoPE (int4 packing)
    __local float *stage = stage_all + get_local_id(1) * HEAD_DIM;
#endif

    // ---- RMS norm (Q and/or K rows) ----------------------------------------------------------
#if Q_NORM || K_NORM
    {
        const bool normed = row_is_normed(kind);
        float ss = 0.0f;
        for (int j = 0; j < NPAIR; ++j) ss += a[j] * a[j] + b[j] * b[j];
#if LX > 1
        ss = row_sum(red, res, lx, ss);
#endif
        if (normed && active) {
            const float inv = rsqrt(ss / (float)HEAD_DIM + eps);
            __global const float *w = kind == ROW_Q ? q_norm_w : k_norm_w;
            for (int j = 0; j < NPAIR; ++j) {
                const int p = lx + j * LX;
                if (IN_ROW(p)) {
                    a[j] = (a[j] * inv) * w[LO(p)];
                    b[j] = (b[j] * inv) * w[HI(p)];
                }
            }
        }
    }
#endif

    // ---- RoPE (Q and K rows) -----------------------------------------------------------------
#if ROPE != ROPE_NONE
    if (active && kind != ROW_V) {
        __global const float *c = cos_tab + (size_t)pos * HALF_DIM;
        __global const float *s = sin_tab + (size_t)pos * HALF_DIM;
        for (int j = 0; j < NPAIR; ++j) {
            const int p = lx + j * LX;
            if (IN_ROW(p)) {
                const float cp = c[p], sp = s[p];
                const float x0 = a[j], x1 = b[j];
                a[j] = x0 * cp - x1 * sp;
                b[j] = x1 * cp + x0 * sp;
            }
        }
    }
#endif

    // ---- absmax with the finiteness check folded in: any NaN/Inf makes it +Inf -------------
    float m = 0.0f;
    if (kind == ROW_K || kind == ROW_V) {
        for (int j = 0; j < NPAIR; ++j) {
            m = fmax(m, isfinite(a[j]) ? fabs(a[j]) : INFINITY);
            m = fmax(m, isfinite(b[j]) ? fabs(b[j]) : INFINITY);
        }
    }
#if LX > 1
    m = row_max(red, res, lx, m);
#endif
#if INT4_STAGE
    for (int j = 0; j < NPAIR; ++j) {
        const int p = lx + j * LX;
        if (IN_ROW(p)) {
            stage[LO(p)] = a[j];
            stage[HI(p)] = b[j];
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    kvcl_fwht_local(stage, HEAD_DIM, HAD_P, lx, LX);
    float ylo = INFINITY, yhi = -INFINITY, ybad = 0.0f;   // NaN: not in ylo/yhi, in ybad
    for (int i = lx; i < HEAD_DIM; i += LX) {
        const float y = stage[i];
        ylo = fmin(ylo, y);
        yhi = fmax(yhi, y);
        ybad = fabs(y) <= INT4_MAXABS ? ybad : 1.0f;
    }
#if LX > 1
    ylo = -row_max(red, res, lx, -ylo);
    yhi = row_max(red, res, lx, yhi);
    ybad = row_max(red, res, lx, ybad);
#endif
    m = ybad != 0.0f ? INFINITY : 0.0f;   // refused below like a non-finite row
#endif

    if (!active) return;  // after the last barrier

    // ---- store -------------------------------------------------------------------------------
    if (kind == ROW_Q) {
        __global float *dst = q_out + ((size_t)t * nq + h) * HEAD_DIM;
        for (int j = 0; j < NPAIR; ++j) {
            const int p = lx + j * LX;
            if (IN_ROW(p)) {
                dst[LO(p)] = a[j];
                dst[HI(p)] = b[j];
            }
        }
        return;
    }
    if (m == INFINITY) {  // non-finite K/V row: leave the slot as it was, tell the caller
        if (lx == 0) atomic_or(status, STATUS_NONFINITE);
        return;
    }
    const int block = slot / block_size;
    const size_t row = ((size_t)block * nkv + h) * block_size + (slot - block * block_size);
    __global kv_t *pool = kind == ROW_K ? k_pool : v_pool;
#if KV_DTYPE == KV_INT4  // byte p: rotated elements 2p, 2p+1 (HEAD_DIM/2 bytes, as many as pairs)
    float lo, sc;
    const uint word = int4_params(ylo, yhi, &lo, &sc);
    if (lx == 0) ((__global uint *)(kind == ROW_K ? k_scales : v_scales))[row] = word;
    for (int j = 0; j < NPAIR; ++j) {
        const int p = lx + j * LX;
        if (IN_ROW(p)) int4_store2(stage[2 * p], stage[2 * p + 1], pool, row * KV_ROW + p, lo, sc);
    }
#else
    float scale = 1.0f;
#if KV_HAS_SCALE
    scale = row_scale(m);
    if (lx == 0) {
        __global scale_t *sc = kind == ROW_K ? k_scales : v_scales;
        SCALE_STORE(scale, sc, row);
    }
#endif
    for (int j = 0; j < NPAIR; ++j) {
        const int p = lx + j * LX;
        if (IN_ROW(p)) {
            kv_store(a[j], pool, row * KV_ROW + LO(p), scale);
            kv_store(b[j], pool, row * KV_ROW + HI(p), scale);
        }
    }
#endif
}

// =============================================================================================
// CPU variant (-DROW_VEC=2|4|8|16): one work-item per (token, head row), the row held in
// HEAD_DIM / ROW_VEC vector registers from load to store, no local memory, no barriers.
// Every step is plain vector arithmetic, vector-typed pointer loads/stores, comparisons with
// vector ?:, and __builtin_convertvector: on PoCL these stay inline (builtins such as fmax,
// round, rint, vloadN, convert_* would each be a call per element).  Only per-row work calls
// a builtin (sqrt for the norm, the int8 scale, its fp16 store in INT8_MODE 1).
// The host picks ROW_VEC so that HEAD_DIM (and HEAD_DIM/2 for half RoPE), every source element
// offset and token stride are multiples of it: all vector accesses are then naturally aligned.
// Results: the reference's float operations per element in the same order (FP_CONTRACT off);
// the sum of squares is summed in another order (like the LX > 1 reductions) and the norm uses
// 1 / sqrt (correctly rounded, as numpy) instead of rsqrt: within the tests' bounds, and bit
// exact without norm and RoPE.  Build options: ROW_VEC, ROWS (rows a work-group, dim 1),
// ROW_NT (0: plain stores).
// =============================================================================================
#ifdef ROW_VEC

#define RV ROW_VEC
#define RV_CAT_(a, b) a##b
#define RV_CAT(a, b) RV_CAT_(a, b)
typedef RV_CAT(float, RV) rv_f;
typedef RV_CAT(int, RV) rv_i;
typedef RV_CAT(uint, RV) rv_u;
typedef RV_CAT(char, RV) rv_c;
#if RV == 2
typedef float rv_h;   // the RoPE cos/sin of the RV/2 interleaved pairs in one vector
#elif RV == 4
typedef float2 rv_h;
#elif RV == 8
typedef float4 rv_h;
#elif RV == 16
typedef float8 rv_h;
#else
#error "ROW_VEC must be 2, 4, 8 or 16"
#endif

#define RV_N (HEAD_DIM / RV)  // vectors per row
#if HEAD_DIM % RV != 0
#error "HEAD_DIM must be a multiple of ROW_VEC"
#endif
#if ROPE == ROPE_HALF && HALF_DIM % RV != 0
#error "half RoPE needs HEAD_DIM/2 to be a multiple of ROW_VEC"
#endif

#if defined(__has_builtin)
#if __has_builtin(__builtin_convertvector)
#define RV_CONVERT(x, T) __builtin_convertvector((x), T)
#endif
#endif
#ifndef RV_CONVERT
#define RV_CONVERT(x, T) RV_CAT(convert_, T)(x)  // round toward zero for float -> int, as above
#endif

// Streaming stores for the outputs (q_out, pool rows), which this kernel never reads back:
// non-temporal stores skip the read-for-ownership of every written cache line.
#ifndef ROW_NT
#define ROW_NT 1
#endif
#if ROW_NT && defined(__has_builtin)
#if __has_builtin(__builtin_nontemporal_store)
#define RV_STORE(v, p) __builtin_nontemporal_store((v), (p))
#endif
#endif
#ifndef RV_STORE
#define RV_STORE(v, p) (*(p) = (v))
#endif

// Vector arguments by pointer: a by-value float16 argument draws a clang ABI warning on AVX2.
inline float rv_hsum(const rv_f *pv) {
    const rv_f v = *pv;
#if RV == 16
    const float8 v8 = v.lo + v.hi;
#elif RV == 8
    const float8 v8 = v;
#endif
#if RV >= 8
    const float4 v4 = v8.lo + v8.hi;
#elif RV == 4
    const float4 v4 = v;
#endif
#if RV >= 4
    const float2 v2 = v4.lo + v4.hi;
#else
    const float2 v2 = v;
#endif
    return v2.x + v2.y;
}

inline uint rv_hmax(const rv_u *pv) {
    const rv_u v = *pv;
#if RV == 16
    const uint8 v8 = v.lo > v.hi ? v.lo : v.hi;
#elif RV == 8
    const uint8 v8 = v;
#endif
#if RV >= 8
    const uint4 v4 = v8.lo > v8.hi ? v8.lo : v8.hi;
#elif RV == 4
    const uint4 v4 = v;
#endif
#if RV >= 4
    const uint2 v2 = v4.lo > v4.hi ? v4.lo : v4.hi;
#else
    const uint2 v2 = v;
#endif
    return v2.x > v2.y ? v2.x : v2.y;
}

#if KV_HAS_SCALE
// The int8 (int4) code of every element of x / scale, bit for bit what int8_encode (common.h) gives:
// for |r| < 2^23, i = trunc(r) is exact and so is f = r - i (|f| < 1), hence
//   round-half-away(r) = i + (f >= 0.5) - (f <= -0.5)
//   rint(r)            = i + (f > 0.5 || f == 0.5 && i odd) - (f < -0.5 || f == -0.5 && i odd)
// Here |r| <= absmax / scale <= QMAX·(1 + 2^-22) (int8; int4 codes (y - lo) / sc <= 15·(1 + 2^-10)),
// so i is in range; the clamp keeps [QLO, QHI] (int8 +-127, int4 0..15, its INT8_MODE always 0).
#if KV_DTYPE == KV_INT4
#define QLO 0
#define QHI 15
#else
#define QLO (-127)
#define QHI 127
#endif
inline void rv_code_encode(const rv_f *x, float scale, rv_i *codes) {  // by pointer: see rv_hsum
    const rv_f r = *x / scale;                  // correctly rounded (build option), as in numpy
    rv_i i = RV_CONVERT(r, rv_i);              // trunc
    const rv_f f = r - RV_CONVERT(i, rv_f);    // exact
#if INT8_MODE == 1
    const rv_i odd = -(i & 1);                 // -1 where i is odd (also for negative i)
    i = i - ((f > 0.5f) | ((f == 0.5f) & odd)) + ((f < -0.5f) | ((f == -0.5f) & odd));
#else
    i = i - (f >= 0.5f) + (f <= -0.5f);        // comparisons give -1 (true) / 0 per element
#endif
    i = i > QHI ? (rv_i)(QHI) : i;
    i = i < QLO ? (rv_i)(QLO) : i;
    *codes = i;
}
#endif

#if KV_DTYPE == KV_INT4
// Vector x[j] of RV codes as its RV/2 int4 bytes: c[2i] | c[2i+1] << 4.
#if RV == 2
typedef uchar rv_b;
#define RV_PACK(c) ((uchar)((c).even | ((c).odd << 4)))
#else
#if RV == 4
typedef uchar2 rv_b;
#elif RV == 8
typedef uchar4 rv_b;
#else
typedef uchar8 rv_b;
#endif
#define RV_PACK(c) RV_CONVERT((c).even | ((c).odd << 4), rv_b)
#endif

KVCL_DEFINE_FWHT(rv_fwht, rv_f, RV_N, RV, HAD_P)   // the row's rotation, in registers

// the smallest and the largest element of the row (NaN ignored: the range check sees it)
inline void rv_minmax(const rv_f *x, float *lo, float *hi) {
    rv_f vl = x[0], vh = x[0];
    for (int j = 1; j < RV_N; ++j) {
        vl = x[j] < vl ? x[j] : vl;
        vh = x[j] > vh ? x[j] : vh;
    }
    const float *el = (const float *)&vl, *eh = (const float *)&vh;
    float l = el[0], h = eh[0];
    for (int i = 1; i < RV; ++i) {
        l = el[i] < l ? el[i] : l;
        h = eh[i] > h ? eh[i] : h;
    }
    *lo = l;
    *hi = h;
}
#endif

__kernel __attribute__((reqd_work_group_size(1, ROWS, 1)))
void paged_write_rows(
    __global const float *q_src, const int q_off, const int q_stride,
    __global const float *k_src, const int k_off, const int k_stride,
    __global const float *v_src, const int v_off, const int v_stride,
    __global const int *slot_mapping, __global const int *positions,
    __global const float *cos_tab, __global const float *sin_tab, const int max_position,
    __global const float *q_norm_w, __global const float *k_norm_w, const float eps,
    __global float *q_out, __global kv_t *k_pool, __global kv_t *v_pool,
    __global scale_t *k_scales, __global scale_t *v_scales, __global int *status,
    const int num_q_heads, const int num_kv_heads, const int block_size, const int num_slots)
{
    // Same arguments, grid (1, rows padded to ROWS, T) and status rules as paged_write (LX = 1).
    const int r = get_global_id(1);    // row within the token: Q heads, K heads, V heads
    const int t = get_global_id(2);    // token
    const int nq = num_q_heads, nkv = num_kv_heads;
    const row_site site = locate_row(r, t, nq, nkv, slot_mapping, positions, max_position, num_slots);
    const int kind = site.kind, h = site.h, slot = site.slot, pos = site.pos;
    const bool pos_ok = site.pos_ok, slot_ok = site.slot_ok;
    if (!pos_ok && r == 0) atomic_or(status, STATUS_BAD_POSITION);
    if (pos_ok && slot >= num_slots && r == nq) atomic_or(status, STATUS_BAD_SLOT);
    if (!pos_ok || kind == ROW_NONE || (kind != ROW_Q && !slot_ok)) return;

    __global const float *src =
        kind == ROW_Q ? q_src + q_off + (size_t)t * q_stride
      : kind == ROW_K ? k_src + k_off + (size_t)t * k_stride
                      : v_src + v_off + (size_t)t * v_stride;
    __global const rv_f *srcv = (__global const rv_f *)(src + h * HEAD_DIM);
    rv_f x[RV_N];
    for (int j = 0; j < RV_N; ++j) x[j] = srcv[j];

#if Q_NORM || K_NORM
    {
        const bool normed = row_is_normed(kind);
        if (normed) {
            rv_f acc = x[0] * x[0];
            for (int j = 1; j < RV_N; ++j) acc += x[j] * x[j];
            const float inv = 1.0f / sqrt(rv_hsum(&acc) / (float)HEAD_DIM + eps);
            __global const rv_f *w = (__global const rv_f *)(kind == ROW_Q ? q_norm_w : k_norm_w);
            for (int j = 0; j < RV_N; ++j) x[j] = (x[j] * inv) * w[j];
        }
    }
#endif

#if ROPE == ROPE_HALF
    if (kind != ROW_V) {
        __global const rv_f *c = (__global const rv_f *)(cos_tab + (size_t)pos * HALF_DIM);
        __global const rv_f *s = (__global const rv_f *)(sin_tab + (size_t)pos * HALF_DIM);
        for (int j = 0; j < RV_N / 2; ++j) {
            const rv_f cp = c[j], sp = s[j], x0 = x[j], x1 = x[j + RV_N / 2];
            x[j] = x0 * cp - x1 * sp;
            x[j + RV_N / 2] = x1 * cp + x0 * sp;
        }
    }
#elif ROPE == ROPE_INTERLEAVED
    if (kind != ROW_V) {
        __global const rv_h *c = (__global const rv_h *)(cos_tab + (size_t)pos * HALF_DIM);
        __global const rv_h *s = (__global const rv_h *)(sin_tab + (size_t)pos * HALF_DIM);
        for (int j = 0; j < RV_N; ++j) {
            const rv_h cp = c[j], sp = s[j], x0 = x[j].even, x1 = x[j].odd;
            x[j].even = x0 * cp - x1 * sp;
            x[j].odd = x1 * cp + x0 * sp;
        }
    }
#endif

    if (kind == ROW_Q) {
        __global rv_f *dst = (__global rv_f *)(q_out + ((size_t)t * nq + h) * HEAD_DIM);
        for (int j = 0; j < RV_N; ++j) RV_STORE(x[j], dst + j);
        return;
    }

#if KV_DTYPE == KV_INT4
    rv_fwht(x);   // rotate first: the range check and the codes are of the rotated row
    const uint limit = 0x477fe000u;   // INT4_MAXABS: beyond it no float16 minimum (NaN, Inf too)
#else
    const uint limit = 0x7f7fffffu;   // the largest finite float
#endif
    // absmax as the largest |x| bit pattern: NaN and +-Inf have the largest ones (>= 0x7f800000)
    rv_u mb = RV_CAT(as_uint, RV)(x[0]) & 0x7fffffffu;
    for (int j = 1; j < RV_N; ++j) {
        const rv_u b = RV_CAT(as_uint, RV)(x[j]) & 0x7fffffffu;
        mb = b > mb ? b : mb;
    }
    const uint mbits = rv_hmax(&mb);
    if (mbits > limit) {  // non-finite (int4: or out of range) K/V row: leave the slot as it was
        atomic_or(status, STATUS_NONFINITE);
        return;
    }
    const int block = slot / block_size;
    const size_t row = ((size_t)block * nkv + h) * block_size + (slot - block * block_size);
    __global kv_t *pool = kind == ROW_K ? k_pool : v_pool;
#if KV_DTYPE == KV_FP32
    __global rv_f *dst = (__global rv_f *)(pool + row * HEAD_DIM);
    for (int j = 0; j < RV_N; ++j) RV_STORE(x[j], dst + j);
#elif KV_DTYPE == KV_INT8
    const float scale = int8_scale(as_float(mbits));
    SCALE_STORE(scale, kind == ROW_K ? k_scales : v_scales, row);
#if RV == 8 && RV_N % 2 == 0  // 16-byte stores (one vmovntdq, not two 8-byte movnti)
    __global char16 *dst = (__global char16 *)(pool + row * HEAD_DIM);
    for (int j = 0; j < RV_N; j += 2) {
        rv_i c0, c1;
        rv_code_encode(&x[j], scale, &c0);
        rv_code_encode(&x[j + 1], scale, &c1);
        RV_STORE((char16)(RV_CONVERT(c0, rv_c), RV_CONVERT(c1, rv_c)), dst + j / 2);
    }
#else
    __global rv_c *dst = (__global rv_c *)(pool + row * HEAD_DIM);
    for (int j = 0; j < RV_N; ++j) {
        rv_i c;
        rv_code_encode(&x[j], scale, &c);
        RV_STORE(RV_CONVERT(c, rv_c), dst + j);
    }
#endif
#elif KV_DTYPE == KV_INT4
    float ylo, yhi, lo, sc;
    rv_minmax(x, &ylo, &yhi);
    ((__global uint *)(kind == ROW_K ? k_scales : v_scales))[row] = int4_params(ylo, yhi, &lo, &sc);
#if RV == 16 && RV_N % 2 == 0  // 16-byte stores, as int8 above
    __global uchar16 *dst = (__global uchar16 *)(pool + row * KV_ROW);
    for (int j = 0; j < RV_N; j += 2) {
        const rv_f y0 = x[j] - lo, y1 = x[j + 1] - lo;
        rv_i c0, c1;
        rv_code_encode(&y0, sc, &c0);
        rv_code_encode(&y1, sc, &c1);
        RV_STORE((uchar16)(RV_PACK(c0), RV_PACK(c1)), dst + j / 2);
    }
#else
    __global rv_b *dst = (__global rv_b *)(pool + row * KV_ROW);
    for (int j = 0; j < RV_N; ++j) {
        const rv_f y = x[j] - lo;
        rv_i c;
        rv_code_encode(&y, sc, &c);
        RV_STORE(RV_PACK(c), dst + j);
    }
#endif
#else
    for (int j = 0; j < RV_N; ++j) {
        const rv_f v = x[j];
        const float *e = (const float *)&v;
        for (int i = 0; i < RV; ++i) kv_store(e[i], pool, row * HEAD_DIM + j * RV + i, 0.0f);
    }
#endif
}
#endif  // ROW_VEC
