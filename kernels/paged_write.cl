// kvcl/kernels/paged_write.cl — fused paged write: split QKV → optional RMS q/k-norm → RoPE →
// quantize to the pool's dtype → scatter into the paged pool by slot; Q comes out rotated.
//
// Idea: one "row" is one (token, head) vector of HEAD_DIM floats.  A work-group holds ROWS rows
// of one token (local size (LX, ROWS, 1), global (LX, ceil(nrows / ROWS)·ROWS, T)), where the
// rows of a token are its num_q_heads Q heads, then its num_kv_heads K heads, then its V heads.
// Each of the LX work-items of a row owns the rotation pairs p = lx, lx + LX, ... of that row
// ((p, p + HEAD_DIM/2) for half-split RoPE and for no RoPE, (2p, 2p+1) for interleaved), keeps
// them in registers from load to store, and the row's sum of squares (RMS norm) and
// absmax (int8 scale and the non-finite check) are reductions over the row's LX work-items in
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
//
// status[0] bits (atomic_or; never cleared here): 1 = a K/V row was non-finite after norm/RoPE
// and was not written; 2 = a slot >= num_slots (that token's K/V not written); 4 = a position
// outside [0, max_position) with RoPE on (nothing of that token written).  Negative slots are
// padding: K/V skipped silently, Q written.
//
// Measured (PoCL 2-core CPU shared with other jobs, load ~2: numbers swing 2-3x between runs;
// 2048-token prefill, Hq=32, Hkv=8, D=128, qk-norm + half RoPE, shuffled slots, LX=1, ROWS=16,
// median of 9; bytes = qkv in + q_out + K/V (+ scales) out + slots/positions):
//   fp32: 100.7 MB in 37-67 ms = 1.5-2.8 GB/s (best run 3.8 GB/s)
//   int8:  88.2 MB in 54-92 ms = 1.0-1.6 GB/s
//   same run, clEnqueueCopyBuffer of the qkv bytes: 9-14 GB/s in+out.  Far from P5 (>= 50% of
//   streaming): on PoCL the per-row scalar loops do not vectorise; see the report / TODO below.
// TODO(perf, CPU): explicit float4/float8 vloads per row for LX=1, or one element per work-item
//   (PoCL vectorises across dim 0: a plain row copy that way reaches ~14.6 GB/s) with a cheaper
//   reduction than local-memory barriers (LX=64 with barriers measured 140-290 ms here).
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

    const int kind = r < nq ? ROW_Q : r < nq + nkv ? ROW_K : r < nq + 2 * nkv ? ROW_V : ROW_NONE;
    const int h = kind == ROW_Q ? r : kind == ROW_K ? r - nq : r - nq - nkv;

    const int slot = slot_mapping[t];
#if ROPE != ROPE_NONE
    const int pos = positions[t];
    const bool pos_ok = pos >= 0 && pos < max_position;
#else
    const bool pos_ok = true;
#endif
    const bool slot_ok = slot >= 0 && slot < num_slots;
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

    // ---- RMS norm (Q and/or K rows) ----------------------------------------------------------
#if Q_NORM || K_NORM
    {
        bool normed = false;
#if Q_NORM
        normed = normed || kind == ROW_Q;
#endif
#if K_NORM
        normed = normed || kind == ROW_K;
#endif
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
    float scale = 1.0f;
#if KV_HAS_SCALE
    scale = int8_scale(m);
    if (lx == 0) {
        __global scale_t *sc = kind == ROW_K ? k_scales : v_scales;
        SCALE_STORE(scale, sc, row);
    }
#endif
    for (int j = 0; j < NPAIR; ++j) {
        const int p = lx + j * LX;
        if (IN_ROW(p)) {
            kv_store(a[j], pool, row * HEAD_DIM + LO(p), scale);
            kv_store(b[j], pool, row * HEAD_DIM + HI(p), scale);
        }
    }
}
