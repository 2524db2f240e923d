// kvcl/kernels/decode_attention.cl — decode attention over a paged (or contiguous) KV cache.
//
// Two algorithms behind one kernel signature, chosen at build time by kvcl/ops/decode_attention.py
// from the device type (see the header comment of each below); they share the tile set-up, the
// K/V decoders, the result store and the split-K merge kernel:
//   SERIAL=1  CPU-shaped: one work-item per work-group owns a whole (q-row tile, kv head,
//             sequence x partition) and walks its tokens in order with wide vector code
//             (default on CPU devices where a work-item is a loop iteration: PoCL);
//   SERIAL=0  cooperative (GPU-shaped): a work-group of WG work-items shares one such tile
//             (default on GPUs and on llvmpipe, which vectorises across work-items).
//
// Build-time specialisation (-D), chosen from the device limits:
//   KV_DTYPE, INT8_MODE   storage format (common.h)
//   HEAD_DIM              head dimension, a multiple of VEC
//   BLOCK_SIZE            tokens per page (the capacity for a contiguous cache: one page per sequence)
//   GROUP                 query heads per kv head (GQA ratio)
//   ROWS                  query rows per work-group = GROUP * query tokens per tile
//   VEC                   4, 8 or 16 (cooperative only): vector width of the loads along head_dim
//   SERIAL                1: the CPU-shaped variant (WG = 1), 0: the cooperative one
//   WG                    work-group size (reqd_work_group_size): a multiple of VEC, at least
//                         HEAD_DIM / VEC / CV and ROWS (cooperative); 1 (serial)
//   CV                    cooperative: head_dim vectors per work-item in the V phase (divides NV)
//   CT                    serial: tokens per chunk (a multiple of 8)
//   HG                    serial: kv heads per work-group (divides num_kv_heads; grid dim 1 is
//                         num_kv_heads / HG)
//   SV                    serial: head_dim vectors per slice of the V phase (divides NV)
//
// Runtime arguments keep everything that changes per call (window, scale, partition size and
// count, the page table) out of the build key, so one program serves every step of a model.
// part_base / ws_parts place a launch's partitions in a workspace shared with another launch,
// and self_out = 1 leaves each query row's own token out: int4 reads that token from the step's
// float32 K/V in a second launch of this kernel (fp32, one-token pages, window 1), merged with
// this one's partitions (kvcl/ops/decode_attention.py, `fresh`).
//
// Numerics: the softmax scale and log2(e) are folded into q once, so logits live in the log2
// domain and every exponential is exp2 (kvcl_exp2 / kvcl_exp2_nonpos of common.h: inline, no
// library call); the running max m, the sum l and the accumulator are fp32.
// int8 and int4: the K row scale multiplies the logit, the V row scale multiplies the probability
// (after it was added to l) — no dequantised copy of K or V exists anywhere. int4 rows are
// HEAD_DIM / 2 bytes (KV_ROW pool elements), unpacked VEC values at a time (int4v_decode).
#include "common.h"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#define KV_ROW (HEAD_DIM / KV_PER_ELEM)   // pool elements per (token, kv head) row
#ifndef BLOCK_SIZE
#error "BLOCK_SIZE must be defined"
#endif
#ifndef GROUP
#define GROUP 1
#endif
#ifndef ROWS
#define ROWS GROUP
#endif
#ifndef SERIAL
#define SERIAL 0
#endif
#ifndef HG
#define HG 1
#endif
#ifndef WG
#if SERIAL
#define WG 1
#else
#define WG 64
#endif
#endif
#ifndef VEC
#define VEC 4
#endif

#define QTILE (ROWS / GROUP)           // query tokens per work-group tile
#define NV (HEAD_DIM / VEC)            // vectors per K/V row

#if (HEAD_DIM % VEC) != 0 || (ROWS % GROUP) != 0
#error "inconsistent HEAD_DIM / VEC / ROWS / GROUP"
#endif

#if SERIAL
#ifndef CT
#define CT 32
#endif
#ifndef SV
#define SV 1
#endif
#define CT8 (CT / 8)                   // float8 logits per row and chunk
#define ROW_BYTES (KV_ROW * (int)sizeof(kv_t))
#define PD (BLOCK_SIZE < 16 ? BLOCK_SIZE : 16)  // prefetch distance of K rows, in tokens
#if WG != 1 || (CT % 8) != 0 || (NV % SV) != 0
#error "inconsistent WG / CT / SV for the serial variant"
#endif
#else
#ifndef CV
#define CV 1
#endif
#define NVC (NV / CV)                  // work-items per token in the V phase (CV vectors each)
#define NJ (WG / NVC)                  // token lanes of the V phase (work-items beyond NJ*NVC idle)
#if BLOCK_SIZE <= WG
#define PPC (WG / BLOCK_SIZE)          // pages per chunk
#define SLOTS BLOCK_SIZE               // token slots per page in a chunk
#else
#define PPC 1
#define SLOTS WG
#endif
#define CHUNK (PPC * SLOTS)            // tokens per chunk (<= WG)
#define CHUNKP ((CHUNK + VEC - 1) / VEC * VEC)  // padded to whole vectors (<= WG)
#if (NV % CV) != 0 || NVC > WG || (WG % VEC) != 0 || ROWS > WG
#error "inconsistent HEAD_DIM / VEC / CV / WG / ROWS for the cooperative variant"
#endif
#endif

#pragma OPENCL FP_CONTRACT ON

// Hot loops use plain operators, vector-typed pointers (every row starts on a multiple of
// HEAD_DIM elements, so VEC-element vectors are naturally aligned) and clang's vector
// conversion where available: some implementations (PoCL 3.0) do not inline their built-in
// library, and a call per fma / vload / convert costs ~10x the arithmetic.
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define floatV CAT(float, VEC)
#define intV CAT(int, VEC)
#define uintV CAT(uint, VEC)
#define ushortV CAT(ushort, VEC)
#define charV CAT(char, VEC)
#define ucharV CAT(uchar, VEC)
#define AS_FLOATV CAT(as_float, VEC)
#define AS_UINTV CAT(as_uint, VEC)
#define AS_INTV CAT(as_int, VEC)
#if defined(__has_builtin)
#if __has_builtin(__builtin_convertvector)
#define CVT(x, T) __builtin_convertvector((x), T)
#endif
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLE 1
#endif
#endif
#ifndef CVT
#define CVT(x, T) CAT(convert_, T)(x)
#endif

inline float sum4(float4 h) { return (h.x + h.y) + (h.z + h.w); }

// max that keeps a NaN from either side (a compare-select alone drops it when it is the second
// operand): a NaN logit (a NaN or Inf stored in K) must make its row NaN, as in the reference,
// not vanish from the running max. Scalars and vectors alike.
#define NMAX(a, b) ((((a) > (b)) | ((a) != (a))) ? (a) : (b))

inline float max4(float4 h) {
    const float2 a = NMAX(h.lo, h.hi);
    return NMAX(a.x, a.y);
}

inline float vsum(floatV v) {
#if VEC == 16
    return sum4((v.lo.lo + v.lo.hi) + (v.hi.lo + v.hi.hi));
#elif VEC == 8
    return sum4(v.lo + v.hi);
#else
    return sum4(v);
#endif
}

inline float max8(float8 v) { return max4(NMAX(v.lo, v.hi)); }

#ifdef HAVE_SHUFFLE
// The sums of four float8 at once: a 4 x 8 transpose-add in shuffles that stay within 128-bit
// halves, then one add of the halves (11 vector operations where four vsum take 28). In the
// serial variant's logit step (with max() gone from that loop: a library call on PoCL 3.0):
// arithmetic alone (pages in cache) 1.11x faster for int8, 1.09x for fp32; decode B=4 L=2048
// fp16 1.13-1.18x, int8 1.09-1.12x, e4m3 1.06x, e5m2 1.07x faster, fp32 unchanged (memory-bound;
// PoCL, 16 rounds each in random order, two runs for fp16 and int8).
// the sums of four 8-vectors at once (T8 float8 or int8 -> T4): pairwise shuffles, no horizontal adds
#define DEFINE_SUM4X8(NAME, T8, T4)                                                           \
inline T4 NAME(T8 x0, T8 x1, T8 x2, T8 x3) {                                                  \
    const T8 t01 = __builtin_shufflevector(x0, x1, 0, 8, 1, 9, 4, 12, 5, 13)                  \
                 + __builtin_shufflevector(x0, x1, 2, 10, 3, 11, 6, 14, 7, 15);               \
    const T8 t23 = __builtin_shufflevector(x2, x3, 0, 8, 1, 9, 4, 12, 5, 13)                  \
                 + __builtin_shufflevector(x2, x3, 2, 10, 3, 11, 6, 14, 7, 15);               \
    const T8 u = __builtin_shufflevector(t01, t23, 0, 1, 8, 9, 4, 5, 12, 13)                  \
               + __builtin_shufflevector(t01, t23, 2, 3, 10, 11, 6, 7, 14, 15);               \
    return u.lo + u.hi;                                                                       \
}
DEFINE_SUM4X8(vsum4x8, float8, float4)
#endif

inline float vmax(floatV v) {
#if VEC == 16
    return max8(NMAX(v.lo, v.hi));
#elif VEC == 8
    return max8(v);
#else
    return max4(v);
#endif
}

// CPU_BUILTINS=1 lets the serial variant use clang target builtins: __builtin_prefetch, and the
// x86 F16C conversion (8 fp16 -> 8 float in one instruction) where __has_builtin reports it.
// The launcher sets it on PoCL only (SPIR-V based compilers, rusticl's, abort on them).
#ifndef CPU_BUILTINS
#define CPU_BUILTINS 0
#endif
// PREFETCH_K (serial variant, with CPU_BUILTINS): also prefetch the K row each token slot reads
// next. V is read across rows (a line of every row, then the next line), which the hardware
// prefetchers do not follow, so its rows are always prefetched; K is read row after row, runs
// of BLOCK_SIZE rows, which they do follow once the runs span more than a 4 KiB page. Leaving
// K to them (PoCL 3.0, 2-core EPYC VM, 10-20 rounds in random order with the streaming read):
// fp32 B=4 L=2048 0.97-1.08x over seven runs (eleven `kvcl bench` runs after it: 78-93% of the
// read, 73-80% in nine before), B=1 L=32768 1.08x, B=64 L=512 1.10x, B=16 L=4096 1.10x; fp16
// (one-page runs) 0.87-0.95x; int8 1.00-1.02x, fp8 1.00x. The launcher sets it from the run
// length. (Prefetching V every other line, for an adjacent-line prefetcher to complete: 0.82x.)
#ifndef PREFETCH_K
#define PREFETCH_K 1
#endif
// UNROLL_K, UNROLL_V (cooperative variant): unrolling of the K-row loop (phase A) and of the
// token loop of phase C — 1 (a loop), 4, or 0 (full). GPUs want loads in flight (each work-item
// is in-order); llvmpipe wants loops. vload_halfN instead of half_bits_to_float measured 2x
// slower on NVIDIA's OpenCL (H100, fp16 B=16 L=4096: 0.45 vs 0.23 ms), so it is not used.
#ifndef UNROLL_K
#define UNROLL_K 1
#endif
#ifndef UNROLL_V
#define UNROLL_V 1
#endif
#include "decode_loads.h"     // the K/V row decoders: kv_loadv, scale_load, int4
#include "decode_int8dot.h"   // INT8_DOT: integer Q.K on int8 codes

// One result element of query row qh: normalised into `out` with one partition, else the
// partition's unnormalised accumulator and (m, l) into the split-K workspace for the merge.
inline void store_result(__global float *out, __global float *ws, const ulong acc_offset,
                         const int num_parts, const int part, const size_t qh, const int d,
                         const float acc, const float m, const float l) {
    if (num_parts == 1) {
        out[qh * HEAD_DIM + d] = l != 0.0f ? acc / l : 0.0f;   // NaN l (a NaN logit) stays NaN
    } else {
        const size_t w = qh * num_parts + part;
        ws[acc_offset + w * HEAD_DIM + d] = acc;
        if (d == 0) { ws[2 * w] = m; ws[2 * w + 1] = l; }
    }
}

// paged_decode_attention, common part: one work-group per (q-row tile, kv head, sequence x
// split-K partition).  Its ROWS rows are every query head of the GQA group times QTILE query
// tokens, so each K/V byte of the partition is read from global memory once per group and tile.
// Query row i of the tile attends [lo_i, hi_i); the work-group walks the union [t0, t1) of the
// tile's rows clipped to its partition and masks per row.  Empty partitions / fully masked rows
// store m = -inf, l = 0, acc = 0.
//
// SERIAL=1 (CPU devices) — the idea: one work-item is the whole work-group, so there are no
// barriers and no local memory (on PoCL each barrier splits the kernel into work-item loops), and
// all its arithmetic is explicit VEC-wide vector code.  It serves HG kv heads (each with its
// GROUP x QTILE query rows) and walks its tokens in chunks of CT: once per chunk the page walk
// finds each token's pool row (page id loaded once per page, no division), then per head:
//     A  per token: ROWS dot products with the scaled q held in private memory (VEC-wide loads
//        along head_dim, fused dequantisation), reduced four rows at a time (vsum4x8), the K
//        scale (int8), the mask; logits into a private float8 array; prefetches of this token's
//        V row and of the K row read next;
//     B  per row: chunk max, one rescale factor, p = 2^(s - m) with the inline vector
//        kvcl_exp2_nonpos, l update, then the V scale (int8) folded into p;
//     C  head_dim slice (SV vectors) outer, tokens inner: the slice of acc for all ROWS rows sits
//        in registers while the chunk's V rows stream through it (each V byte read once).
//   Why HG heads: a block's rows of neighbouring kv heads are adjacent in the pool, so HG heads
//   read HG x BLOCK_SIZE rows as one run (64 KiB for 8 heads, 16 fp32 tokens, D=128) where one
//   head reads 8 KiB and jumps to the next page.  On the 2-core EPYC VM a core keeps too few
//   misses in flight on short scattered runs (a C loop over shuffled 8 KiB runs with the same
//   prefetching reads at 68% of a sequential stream, over 64 KiB runs at 92%), though less so in
//   this kernel (128-token blocks, one head: 63% of the read against 59% with 16).  Measured
//   against the one-head kernel before it (PoCL 3.0, Hq=32 Hkv=8 D=128, 12-24 rounds of samples
//   in random order with the streaming read, medians of the paired ratios): B=4 L=2048 fp32
//   1.03-1.06x, int8 1.08x, fp16 1.03x; B=1 L=32768 1.20x with 512-token partitions and 1.35x
//   with 2048 (52% -> 69% of the read; one head per work-item gains nothing from either).
//   Split-K (flash-decoding) only when B * Hkv / HG * q_tiles work-items cannot fill the
//   compute units.
//   Now 2.3-3.1 ms = 78-90% of the read (B=4 L=2048 fp32, six `kvcl bench` runs), since K rows
//   are left to the hardware prefetchers where their runs span more than a page (PREFETCH_K
//   above: 73-80% in nine runs before; software prefetches hold the core's few miss buffers).
//   The arithmetic alone (pages in cache) takes 1.0-1.3 ms of it: logits ~0.4, V ~0.46,
//   softmax ~0.13 and the rest ~0.2 ms, against 0.69 ms for the FMAs alone; fp16/int8/fp8
//   are bound by it.
//   Before the head groups (five runs): 4.3-6.6 ms = 53-64% of the read (the cooperative variant
//   on the same CPU: 14.4 ms in an earlier session). What bounded it then: alone, the arithmetic
//   takes 1.5-1.7 ms (pages in cache) and time was close to arithmetic + memory. Without the
//   prefetches: 41-45%. Prefetch distances 8-96 tokens, other prefetch schemes, huge pages,
//   16-wide loads and two tokens per logit step measured no better (docs/performance.md).
//
// SERIAL=0 (GPUs) — the idea: the work-group's WG work-items cooperate on the tile.  The token
//   range is walked page group by page group (PPC pages of BLOCK_SIZE tokens, or WG-token slices
//   of one large page), so the page id is one load per page and no per-token division happens.
//   Per chunk:
//     A  one work-item per token: ROWS dot products against q held in local memory (vector
//        loads along head_dim, fused dequantisation), causal / window mask, logits to local;
//     B  one work-item per row: online-softmax update (max, rescale factor, probabilities);
//     C  work-items split as (token lane, head_dim vectors): accumulate p * v for all ROWS rows
//        in private vectors, rescaled by the chunk's factor.
//   At the end the token lanes are summed in local memory; with one partition the normalised
//   result goes straight to `out`, otherwise (m, l, acc) go to the workspace for the merge.
//   On GPUs (-D UNROLL_K/UNROLL_V, VEC and WG set per storage format by the launcher): NVIDIA
//   H100 through NVIDIA's OpenCL, B=16 Hq=32 Hkv=8 D=128 L=4096, fp32 VEC 16, unrolled, WG 32:
//   0.244 ms = 77-80% of the streaming read on two machines, 53% on a third (docs/performance.md);
//   the llvmpipe layout (VEC 8, loops, WG 128) 0.323 ms, 58%. fp16 / int8 are conversion-bound
//   there: 0.22 / 0.19 ms at best (loops, VEC 8, WG 32, 256-token partitions).
//   Measured on PoCL 3.0 before the serial variant existed (2-core EPYC VM, fp32, B=4, Hq=32,
//   Hkv=8, D=128, L=2048, WG=128, VEC=8): 9.9 ms per layer vs 3.6 ms for a streaming read of
//   the same bytes (36%); fp16 10.3 ms, int8 9.0 ms — instruction-bound on a CPU (phases A and C
//   and the per-chunk barrier skeleton about a third each), hence the serial variant there.
__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void paged_decode_attention(
    __global const float *queries,        // [total_q, num_q_heads, HEAD_DIM]
    __global const kv_t *k_pool,          // [num_blocks, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
    __global const kv_t *v_pool,          // [num_blocks, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
    __global const scale_t *k_scales,     // [num_blocks, num_kv_heads, BLOCK_SIZE] (int8; else [1])
    __global const scale_t *v_scales,     // [num_blocks, num_kv_heads, BLOCK_SIZE] (int8; else [1])
    __global const int *indptr,           // [B + 1]
    __global const int *indices,          // [nnz]
    __global const int *last_page_len,    // [B]
    __global const int *q_indptr,         // [B + 1]
    __global float *out,                  // [total_q, num_q_heads, HEAD_DIM]
    __global float *ws,                   // split-K workspace: ws_ml [total_q, num_q_heads, num_parts, 2]
                                          // then, at ws + acc_offset, [total_q, num_q_heads, num_parts, HEAD_DIM]
    const ulong acc_offset,               // scalar: float offset of the accumulators in ws
    const int num_kv_heads,               // scalar
    const float qk_scale_log2,            // scalar: softmax scale * log2(e)
    const int window,                     // scalar: sliding window (0 = none)
    const int partition_size,             // scalar: tokens per split-K partition
    const int num_parts,                  // scalar: split-K partitions per sequence of this launch
    const int part_base,                  // scalar: this launch's first partition in the workspace
    const int ws_parts,                   // scalar: partitions per row in the workspace (1: none,
                                          // the result goes to out)
    const int self_out)                   // scalar: 1: each query row leaves out its own token
                                          // (another launch reads it from its float32 K/V)
{
#if !SERIAL
    __local floatV q_locv[ROWS * NV];      // scaled queries; reused for the final lane reduction
    __local floatV p_locv[ROWS * CHUNKP / VEC];  // logits, then probabilities (x V scale for int8)
    __local float alpha_loc[ROWS];          // per-row rescale factor of the current chunk
    __local float m_loc[ROWS], l_loc[ROWS];
#if INT8_DOT
    __local float qstep_loc[ROWS], qsc_loc[ROWS];  // per row: the query's step, step * qk_scale_log2
#endif
    __local int row_loc[CHUNKP];            // pool row of each chunk slot, -1 when not in range
#if KV_HAS_SCALE
    __local floatV vs_locv[CHUNKP / VEC];   // V row scale of each chunk slot (0 when not in range)
    __local float *vs_loc = (__local float *)vs_locv;
#endif
#if KV_DTYPE == KV_INT4
    __local floatV vm_locv[CHUNKP / VEC];   // V row minimum of each chunk slot (0 when not in range)
    __local float *vm_loc = (__local float *)vm_locv;
    __local float qsum_loc[ROWS];           // sum of each rotated query row
#endif
    __local float *q_loc = (__local float *)q_locv;
    __local float *p_loc = (__local float *)p_locv;
    const int lid = get_local_id(0);
#endif

    const int tile = get_group_id(0);
    const int kvh = get_group_id(1) * HG;  // the work-group's first kv head
    const int b = get_group_id(2) / num_parts;  // once per work-group
    const int part = get_group_id(2) - b * num_parts;
    const int num_q_heads = num_kv_heads * GROUP;

    const int q0 = q_indptr[b];
    const int q_len = q_indptr[b + 1] - q0;
    const int i_first = tile * QTILE;
    if (i_first >= q_len) return;  // uniform: the whole work-group leaves
    const int n_qt = min(QTILE, q_len - i_first);
    const int p0 = indptr[b];
    const int npages = indptr[b + 1] - p0;
    const int kv_len = (npages - 1) * BLOCK_SIZE + last_page_len[b];
    const int hi_first = kv_len - q_len + 1 + i_first;  // exclusive end for the tile's first row
    const int hi_last = hi_first + n_qt - 1;
    const int lo_first = window > 0 ? max(0, hi_first - window) : 0;
    const int part_lo = part * partition_size;
    const int t0 = max(part_lo, lo_first);
    const int t1 = min(part_lo + partition_size, hi_last - self_out);  // hi_last <= kv_len
    const size_t qh0 = (size_t)(q0 + i_first) * num_q_heads + kvh * GROUP;  // row 0 of the tile

#if SERIAL
    // kv heads kvh .. kvh + HG - 1 (kvh = get_group_id(1) * HG); per head: hq = h * ROWS + r
#if INT8_DOT
    qcode_t qc[HG * ROWS * NQ];            // query codes (0 for rows past the tile's end)
    float qsc[HG * ROWS];                  // their step * qk_scale_log2
#else
    floatV q[HG * ROWS * NV];              // scaled queries (0 for rows past the tile's end)
#endif
    floatV acc[HG * ROWS * NV];            // unnormalised output rows
    float m[HG * ROWS], l[HG * ROWS];      // running max (log2 domain) and sum per row
#if KV_DTYPE == KV_INT4
    float qsum[HG * ROWS], pm[HG * ROWS];  // sum of the rotated query; sum of p * (V minimum)
#endif
    for (int h = 0; h < HG; ++h) {
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int qt = r / GROUP;
            __global const floatV *qp = (__global const floatV *)(queries + (qh0 + (size_t)qt * num_q_heads + h * GROUP + r % GROUP) * HEAD_DIM);
            for (int v = 0; v < NV; ++v) {
#if !INT8_DOT
                q[(h * ROWS + r) * NV + v] = qt < n_qt ? qp[v] * qk_scale_log2 : (floatV)(0.0f);
#endif
                acc[(h * ROWS + r) * NV + v] = (floatV)(0.0f);
            }
#if KV_DTYPE == KV_INT4
            {   // the rotated query (int4's basis) and its sum
#if INT8_DOT
                floatV qrot[NV];
                floatV *qr = qrot;
                for (int v = 0; v < NV; ++v) qr[v] = qt < n_qt ? qp[v] * qk_scale_log2 : (floatV)(0.0f);
#else
                floatV *qr = q + (h * ROWS + r) * NV;
#endif
                int4_fwht(qr);
                floatV sv = qr[0];
                for (int v = 1; v < NV; ++v) sv += qr[v];
                qsum[h * ROWS + r] = vsum(sv);
                pm[h * ROWS + r] = 0.0f;
#if INT8_DOT
                const float *qs = (const float *)qr;   // quantized below: step includes qk_scale_log2
#define QSC_SCALE 1.0f
#endif
#elif INT8_DOT
            {
                __global const float *qs = (__global const float *)qp;
#define QSC_SCALE qk_scale_log2
#endif
#if INT8_DOT
                qelem_t *codes = (qelem_t *)(qc + (h * ROWS + r) * NQ);
                float amax = 0.0f;
                for (int d = 0; d < HEAD_DIM; ++d) {
                    const float a = qt < n_qt ? qabs(qs[d]) : 0.0f;
                    amax = ((a > amax) | (a != a)) ? a : amax;   // a NaN stays
                }
                const float step = qstep(amax);
                for (int d = 0; d < HEAD_DIM; ++d)
                    codes[QPOS(d)] = qt < n_qt ? qcode(qs[d], step) : (qelem_t)0;
                qsc[h * ROWS + r] = step * QSC_SCALE;
#undef QSC_SCALE
#endif
#if INT8_DOT || KV_DTYPE == KV_INT4
            }
#endif
            m[h * ROWS + r] = -INFINITY;
            l[h * ROWS + r] = 0.0f;
        }
    }

    // Page walk: the pool row of head 0 of each token of the chunk (rows[]) and of the next
    // chunk (ahead[], the prefetch targets; -1 past t1), advanced once per chunk for all HG
    // heads. The pass before the loop fills ahead[] with the first chunk.
    int pg = t0 / BLOCK_SIZE, off = t0 - pg * BLOCK_SIZE;  // the only division
    int ahead[CT] = {0}, rows[CT];
    for (int tc = t0 - CT; tc < t1; tc += CT) {
        #pragma unroll 1
        for (int t = 0; t < CT; ++t) {
            rows[t] = ahead[t];
            ahead[t] = tc + CT + t < t1 ? indices[p0 + pg] * num_kv_heads * BLOCK_SIZE + off : -1;
            if (++off == BLOCK_SIZE) { off = 0; ++pg; }
        }
        if (tc < t0) continue;
        const int n = min(CT, t1 - tc);    // tokens in this chunk, all in the pool
        for (int h = 0; h < HG; ++h) {
        const int kh = (kvh + h) * BLOCK_SIZE;  // row offset of this head inside a block
#if INT8_DOT
        const qcode_t *qch = qc + h * ROWS * NQ;
        const float *qsch = qsc + h * ROWS;
#else
        const floatV *qh = q + h * ROWS * NV;
#endif
        float8 s8[ROWS * CT8];             // logits, then probabilities (x V scale for int8)
        float *s = (float *)s8;
#if KV_HAS_SCALE
        float8 vsc8[CT8];                  // V row scale per token
        float *vsc = (float *)vsc8;
        #pragma unroll
        for (int j = 0; j < CT8; ++j) vsc8[j] = (float8)(0.0f);
#endif
#if KV_DTYPE == KV_INT4
        float8 vmn8[CT8];                  // V row minimum per token
        float *vmn = (float *)vmn8;
        #pragma unroll
        for (int j = 0; j < CT8; ++j) vmn8[j] = (float8)(0.0f);
        const float *qsh = qsum + h * ROWS;
#endif
#if E4M3_FAST
        bool vnan[CT];                     // the token's V row holds a NaN code
#endif
        #pragma unroll
        for (int j = 0; j < ROWS * CT8; ++j) s8[j] = (float8)(-INFINITY);

        // ---- A: logits ----
        #pragma unroll 1
        for (int t = 0; t < n; ++t) {
            const int row = rows[t] + kh;
            __global const kv_t *kp = k_pool + (size_t)row * KV_ROW;
#if CPU_BUILTINS
            {   // phase C reads this V row slice by slice (line j of every row, then line j + 1):
                // start all its cache lines now; and (PREFETCH_K) the K row this slot reads next:
                // the next head's (the same block, BLOCK_SIZE rows on), or the first head's in
                // the next chunk
                __global const char *vb = (__global const char *)(v_pool + (size_t)row * KV_ROW);
#if PREFETCH_K
                const int nx = h + 1 < HG ? row + BLOCK_SIZE : ahead[t] + kvh * BLOCK_SIZE;
                const int nxt = nx < 0 ? 0 : nx;   // max() is a library call on PoCL 3.0
                __global const char *kb = (__global const char *)(k_pool + (size_t)nxt * KV_ROW);
#endif
                #pragma unroll
                for (int o = 0; o < ROW_BYTES; o += 64) {
                    __builtin_prefetch(vb + o);
#if PREFETCH_K
                    __builtin_prefetch(kb + o);
#endif
                }
                if (ROW_BYTES % 64) {   // rows that end inside a line the loop did not reach
                    __builtin_prefetch(vb + ROW_BYTES - 1);
#if PREFETCH_K
                    __builtin_prefetch(kb + ROW_BYTES - 1);
#endif
                }
            }
#endif
#if INT8_DOT
            ipart_t ai[ROWS];                  // exact partial sums per row (IFINISH: int32)
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) ai[r] = (ipart_t)(0);
            #pragma unroll
            for (int v = 0; v < NQ; ++v) {
                KCODES(kp, v)
                #pragma unroll
                for (int r = 0; r < ROWS; ++r) ai[r] += IDOT(qch[r * NQ + v]);
            }
#else
            floatV a[2 * ROWS];                // two FMA chains per row (latency)
            #pragma unroll
            for (int r = 0; r < 2 * ROWS; ++r) a[r] = (floatV)(0.0f);
            #pragma unroll
            for (int v = 0; v < NV; ++v) {
#if E4M3_FAST
                const floatV kv = e4m3_scaled(kp, v);
#else
                const floatV kv = kv_loadv(kp, v);
#endif
                #pragma unroll
                for (int r = 0; r < ROWS; ++r) a[2 * r + (v & 1)] += qh[r * NV + v] * kv;
            }
#endif
#if KV_DTYPE == KV_INT4
            float ks, km;
            int4_row_params(k_scales, row, &ks, &km);
            int4_row_params(v_scales, row, &vsc[t], &vmn[t]);
#define LOGIT(x, r) ((x) * ks + km * qsh[r])
#elif KV_HAS_SCALE
            const float ks = scale_load(k_scales, row);
            vsc[t] = scale_load(v_scales, row);
#elif E4M3_FAST
            const float ks = row_has_nan(kp) ? NAN : 0x1p8f;
            vnan[t] = row_has_nan(v_pool + (size_t)row * KV_ROW);
#else
            const float ks = 1.0f;
#endif
#ifndef LOGIT
#define LOGIT(x, r) ((x) * ks)
#endif
            const int tok = tc + t;
            float d[ROWS];                     // the logits of this token
            int r = 0;
#if INT8_DOT
#ifdef HAVE_ISUM4
            #pragma unroll
            for (; r + 4 <= ROWS; r += 4) {
                const float4 d4 = CVT(isum4x8(IFINISH(ai[r]), IFINISH(ai[r + 1]), IFINISH(ai[r + 2]),
                                              IFINISH(ai[r + 3])), float4)
                                * (float4)(qsch[r], qsch[r + 1], qsch[r + 2], qsch[r + 3]);
                d[r] = d4.x; d[r + 1] = d4.y; d[r + 2] = d4.z; d[r + 3] = d4.w;
            }
#endif
            #pragma unroll
            for (; r < ROWS; ++r) d[r] = (float)isum(IFINISH(ai[r])) * qsch[r];
#else
#if defined(HAVE_SHUFFLE) && VEC == 8
            #pragma unroll
            for (; r + 4 <= ROWS; r += 4) {
                const float4 d4 = vsum4x8(a[2 * r] + a[2 * r + 1], a[2 * r + 2] + a[2 * r + 3],
                                          a[2 * r + 4] + a[2 * r + 5], a[2 * r + 6] + a[2 * r + 7]);
                d[r] = d4.x; d[r + 1] = d4.y; d[r + 2] = d4.z; d[r + 3] = d4.w;
            }
#endif
            #pragma unroll
            for (; r < ROWS; ++r) d[r] = vsum(a[2 * r] + a[2 * r + 1]);
#endif
#if QTILE == 1
            // one query token: every row sees [lo_first, hi_first), which [t0, t1) lies in, so
            // no mask (arithmetic alone, pages in cache: fp32 1.05x, int8 1.04x, fp16 1.01x)
            (void)tok;
            #pragma unroll
            for (r = 0; r < ROWS; ++r) s[r * CT + t] = LOGIT(d[r], r);
#else
            #pragma unroll
            for (r = 0; r < ROWS; ++r) {
                const int hi = hi_first + r / GROUP;
                const int lo = window > 0 ? hi - window : 0;
                if (tok < hi - self_out && tok >= lo) s[r * CT + t] = LOGIT(d[r], r);
            }
#endif
#undef LOGIT
        }

        // ---- B: online softmax per row ----
        float alpha[ROWS];
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float8 mv = s8[r * CT8];
            #pragma unroll
            for (int j = 1; j < CT8; ++j) mv = NMAX(s8[r * CT8 + j], mv);
            const float cm = max8(mv);
            const float mo = m[h * ROWS + r];
            const float mx = NMAX(cm, mo);
            alpha[r] = 1.0f;
            if (mx != -INFINITY) {  // else the row saw nothing yet: p = 2^-inf = 0 below
                alpha[r] = kvcl_exp2_nonpos(mo - mx);   // mo <= mx
                float8 sv = (float8)(0.0f);
#if KV_DTYPE == KV_INT4
                float8 pmv = (float8)(0.0f);
#endif
                #pragma unroll
                for (int j = 0; j < CT8; ++j) {
                    const float8 p = kvcl_exp2_nonpos(s8[r * CT8 + j] - mx);   // s <= mx
                    sv += p;
#if KV_DTYPE == KV_INT4
                    pmv += p * vmn8[j];
#endif
#if KV_HAS_SCALE
                    s8[r * CT8 + j] = p * vsc8[j];
#elif E4M3_FAST
                    s8[r * CT8 + j] = p * 0x1p8f;   // V is read as value * 2^-8
#else
                    s8[r * CT8 + j] = p;
#endif
                }
                l[h * ROWS + r] = l[h * ROWS + r] * alpha[r] + sum4(sv.lo + sv.hi);
                m[h * ROWS + r] = mx;
#if KV_DTYPE == KV_INT4
                pm[h * ROWS + r] = pm[h * ROWS + r] * alpha[r] + sum4(pmv.lo + pmv.hi);
#endif
            } else {
                #pragma unroll
                for (int j = 0; j < CT8; ++j) s8[r * CT8 + j] = (float8)(0.0f);
            }
        }

        // ---- C: acc = acc * alpha + p . V, head_dim slice outer, tokens inner ----
        floatV *acch = acc + h * ROWS * NV;
        #pragma unroll 1
        for (int sl = 0; sl < NV; sl += SV) {
            floatV a[ROWS * SV];
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                #pragma unroll
                for (int c = 0; c < SV; ++c) a[r * SV + c] = acch[r * NV + sl + c] * alpha[r];
            }
            #pragma unroll 1
            for (int t = 0; t < n; ++t) {
                __global const kv_t *vp = v_pool + (size_t)(rows[t] + kh) * KV_ROW;
                floatV vv[SV];
#if E4M3_FAST
                #pragma unroll
                for (int c = 0; c < SV; ++c) vv[c] = e4m3_scaled(vp, sl + c);
                if (vnan[t]) {
                    #pragma unroll
                    for (int c = 0; c < SV; ++c)   // 0x3FF00000 = 480.0f * 2^-8
                        vv[c] = (as_int8(vv[c]) & 0x7FFFFFFF) == 0x3FF00000 ? (float8)(NAN) : vv[c];
                }
#else
                #pragma unroll
                for (int c = 0; c < SV; ++c) vv[c] = kv_loadv(vp, sl + c);
#endif
                #pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const float p = s[r * CT + t];
                    #pragma unroll
                    for (int c = 0; c < SV; ++c) a[r * SV + c] += p * vv[c];
                }
            }
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                #pragma unroll
                for (int c = 0; c < SV; ++c) acch[r * NV + sl + c] = a[r * SV + c];
            }
        }
        }  // heads
    }

    for (int h = 0; h < HG; ++h) {
        for (int r = 0; r < ROWS; ++r) {
            const int qt = r / GROUP;
            if (qt >= n_qt) break;
            const size_t qh = qh0 + (size_t)qt * num_q_heads + h * GROUP + r % GROUP;
#if KV_DTYPE == KV_INT4
            for (int v = 0; v < NV; ++v) acc[(h * ROWS + r) * NV + v] += pm[h * ROWS + r];
            int4_fwht(acc + (h * ROWS + r) * NV);   // back from the rotated basis
#endif
            const float *ar = (const float *)(acc + (h * ROWS + r) * NV);
            for (int d = 0; d < HEAD_DIM; ++d)
                store_result(out, ws, acc_offset, ws_parts, part_base + part, qh, d, ar[d], m[h * ROWS + r], l[h * ROWS + r]);
        }
    }
#else
    for (int e = lid; e < ROWS * HEAD_DIM; e += WG) {
        const int r = e / HEAD_DIM, d = e - r * HEAD_DIM;  // constant divisors
        const int qt = r / GROUP, g = r - qt * GROUP;
        float x = 0.0f;
        if (qt < n_qt)
#if INT8_DOT
            x = queries[(qh0 + (size_t)qt * num_q_heads + g) * HEAD_DIM + d];
#else
            x = queries[(qh0 + (size_t)qt * num_q_heads + g) * HEAD_DIM + d] * qk_scale_log2;
#endif
        q_loc[e] = x;
    }
#if INT8_DOT
    // one work-item per row finds the row's step; then every element becomes its code (int bits
    // in q_loc; rows past the tile's end are 0: step 0, codes 0)
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < ROWS) {
        float amax = 0.0f;
        for (int d = 0; d < HEAD_DIM; ++d) {
            const float a = qabs(q_loc[lid * HEAD_DIM + d]);
            amax = ((a > amax) | (a != a)) ? a : amax;
        }
        const float step = qstep(amax);
        qstep_loc[lid] = step;
        qsc_loc[lid] = step * qk_scale_log2;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int e = lid; e < ROWS * HEAD_DIM; e += WG)
        q_loc[e] = as_float((int)qcode(q_loc[e], qstep_loc[e / HEAD_DIM]));
#endif

#if KV_DTYPE == KV_INT4
    // one work-item per row rotates it (private copy) and sums it
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < ROWS) {
        floatV qr[NV];
        for (int v = 0; v < NV; ++v) qr[v] = q_locv[lid * NV + v];
        int4_fwht(qr);
        floatV sv = (floatV)(0.0f);
        for (int v = 0; v < NV; ++v) { q_locv[lid * NV + v] = qr[v]; sv += qr[v]; }
        qsum_loc[lid] = vsum(sv);
    }
    float pm_r = 0.0f;                                  // phase B (lid < ROWS): sum of p * V minimum
#endif

    // fixed roles of this work-item
    const int lp = lid / SLOTS, lt = lid - lp * SLOTS;  // phase A: page in chunk, slot in page
    const int dv = lid % NVC, jp = lid / NVC;           // phase C: head_dim vectors, token lane
    float m_r = -INFINITY, l_r = 0.0f;                  // phase B state (lid < ROWS)
    floatV acc[ROWS * CV];                              // phase C: rows x CV vectors
    #pragma unroll
    for (int r = 0; r < ROWS * CV; ++r) acc[r] = (floatV)(0.0f);
    barrier(CLK_LOCAL_MEM_FENCE);

    if (t0 < t1) {
        const int pg_lo = t0 / BLOCK_SIZE, pg_hi = (t1 + BLOCK_SIZE - 1) / BLOCK_SIZE;
        for (int pg = pg_lo; pg < pg_hi; pg += PPC) {
#if PPC == 1
            const int so_lo = max(t0 - pg * BLOCK_SIZE, 0);
            const int so_hi = min(t1 - pg * BLOCK_SIZE, BLOCK_SIZE);
#else
            const int so_lo = 0, so_hi = SLOTS;
#endif
            for (int so = so_lo; so < so_hi; so += SLOTS) {
                // ---- A: logits of one token for every row ----
                if (lid < CHUNKP) {
                    const int page = pg + lp, off = so + lt;
                    const int tok = page * BLOCK_SIZE + off;
                    const bool valid = lid < CHUNK && off < BLOCK_SIZE && tok >= t0 && tok < t1;
                    if (valid) {
                        const int blk = indices[p0 + page];
                        const int row = (blk * num_kv_heads + kvh) * BLOCK_SIZE + off;
                        __global const kv_t *kp = k_pool + (size_t)row * KV_ROW;
#if INT8_DOT
                        intV s[ROWS];              // exact int32 partial sums
                        #pragma unroll
                        for (int r = 0; r < ROWS; ++r) s[r] = (intV)(0);
#else
                        floatV s[ROWS];
                        #pragma unroll
                        for (int r = 0; r < ROWS; ++r) s[r] = (floatV)(0.0f);
#endif
#if UNROLL_K == 0
                        #pragma unroll    // GPUs: the row's loads in flight together
#elif UNROLL_K == 4
                        #pragma unroll 4
#else
                        #pragma unroll 1  // CPUs: unrolled, llvmpipe turns each lane's VEC-wide loads into gathers
#endif
                        for (int v = 0; v < NV; ++v) {
#if INT8_DOT
                            KCODES(kp, v)
                            #pragma unroll
                            for (int r = 0; r < ROWS; ++r) s[r] += IDOT(AS_INTV(q_locv[r * NV + v]));
#else
                            const floatV kv = kv_loadv(kp, v);
                            #pragma unroll
                            for (int r = 0; r < ROWS; ++r) s[r] += q_locv[r * NV + v] * kv;
#endif
                        }
#if KV_DTYPE == KV_INT4
                        float ks, km, vsc, vmn;
                        int4_row_params(k_scales, row, &ks, &km);
                        int4_row_params(v_scales, row, &vsc, &vmn);
                        vs_loc[lid] = vsc;
                        vm_loc[lid] = vmn;
#define LOGIT(x, r) ((x) * ks + km * qsum_loc[r])
#elif KV_HAS_SCALE
                        const float ks = scale_load(k_scales, row);
                        vs_loc[lid] = scale_load(v_scales, row);
#else
                        const float ks = 1.0f;
#endif
#ifndef LOGIT
#define LOGIT(x, r) ((x) * ks)
#endif
                        #pragma unroll
                        for (int r = 0; r < ROWS; ++r) {
                            const int hi = hi_first + r / GROUP;
                            const int lo = window > 0 ? hi - window : 0;
#if INT8_DOT
                            p_loc[r * CHUNKP + lid] = (tok < hi - self_out && tok >= lo) ? (float)isum(s[r]) * qsc_loc[r] * ks : -INFINITY;
#else
                            p_loc[r * CHUNKP + lid] = (tok < hi - self_out && tok >= lo) ? LOGIT(vsum(s[r]), r) : -INFINITY;
#endif
                        }
#undef LOGIT
                        row_loc[lid] = row;
                    } else {
                        #pragma unroll
                        for (int r = 0; r < ROWS; ++r) p_loc[r * CHUNKP + lid] = -INFINITY;
                        row_loc[lid] = -1;
#if KV_HAS_SCALE
                        vs_loc[lid] = 0.0f;
#endif
#if KV_DTYPE == KV_INT4
                        vm_loc[lid] = 0.0f;
#endif
                    }
                }
                barrier(CLK_LOCAL_MEM_FENCE);
                // ---- B: online softmax, one work-item per row, VEC slots at a time ----
                if (lid < ROWS) {
                    __local floatV *pr = p_locv + lid * (CHUNKP / VEC);
                    floatV mv = pr[0];
                    for (int j = 1; j < CHUNKP / VEC; ++j) mv = NMAX(pr[j], mv);
                    const float cm = vmax(mv);
                    const float mx = NMAX(cm, m_r);
                    float alpha = 1.0f, sum = 0.0f;
                    if (mx == -INFINITY) {
                        for (int j = 0; j < CHUNKP / VEC; ++j) pr[j] = (floatV)(0.0f);
                    } else {
                        alpha = kvcl_exp2(m_r - mx);
                        floatV sv = (floatV)(0.0f);
#if KV_DTYPE == KV_INT4
                        floatV pmv = (floatV)(0.0f);
#endif
                        for (int j = 0; j < CHUNKP / VEC; ++j) {
                            const floatV pv = kvcl_exp2(pr[j] - mx);
                            sv += pv;
#if KV_DTYPE == KV_INT4
                            pmv += pv * vm_locv[j];
#endif
#if KV_HAS_SCALE
                            pr[j] = pv * vs_locv[j];
#else
                            pr[j] = pv;
#endif
                        }
                        sum = vsum(sv);
#if KV_DTYPE == KV_INT4
                        pm_r = pm_r * alpha + vsum(pmv);
#endif
                    }
                    l_r = l_r * alpha + sum;
                    m_r = mx;
                    alpha_loc[lid] = alpha;
                }
                barrier(CLK_LOCAL_MEM_FENCE);
                // ---- C: acc += p * v, one head_dim vector per work-item, tokens over lanes ----
                if (jp < NJ) {
                    #pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        const float a = alpha_loc[r];
                        #pragma unroll
                        for (int c = 0; c < CV; ++c) acc[r * CV + c] *= a;
                    }
#if UNROLL_V == 0
                    #pragma unroll
#elif UNROLL_V == 4
                    #pragma unroll 4
#else
                    #pragma unroll 1
#endif
                    for (int j = jp; j < CHUNK; j += NJ) {
                        const int row = row_loc[j];
                        if (row >= 0) {
                            __global const kv_t *vp = v_pool + (size_t)row * KV_ROW;
                            floatV vv[CV];
                            #pragma unroll
                            for (int c = 0; c < CV; ++c) vv[c] = kv_loadv(vp, dv * CV + c);
                            #pragma unroll
                            for (int r = 0; r < ROWS; ++r) {
                                const float pj = p_loc[r * CHUNKP + j];
                                #pragma unroll
                                for (int c = 0; c < CV; ++c) acc[r * CV + c] += pj * vv[c];
                            }
                        }
                    }
                }
                barrier(CLK_LOCAL_MEM_FENCE);
            }
        }
    }

    // ---- sum the token lanes into q_loc (no longer needed), then write ----
    if (lid < ROWS) { m_loc[lid] = m_r; l_loc[lid] = l_r; }
    for (int k = 0; k < NJ; ++k) {
        if (jp == k) {
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                #pragma unroll
                for (int c = 0; c < CV; ++c) {
                    const int i = r * NV + dv * CV + c;
                    q_locv[i] = k == 0 ? acc[r * CV + c] : q_locv[i] + acc[r * CV + c];
                }
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
#if KV_DTYPE == KV_INT4
    if (lid < ROWS) {   // + sum p * V minimum, then back from the rotated basis
        floatV ar[NV];
        for (int v = 0; v < NV; ++v) ar[v] = q_locv[lid * NV + v] + pm_r;
        int4_fwht(ar);
        for (int v = 0; v < NV; ++v) q_locv[lid * NV + v] = ar[v];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
#endif
    for (int e = lid; e < ROWS * HEAD_DIM; e += WG) {
        const int r = e / HEAD_DIM, d = e - r * HEAD_DIM;
        const int qt = r / GROUP, g = r - qt * GROUP;
        if (qt >= n_qt) continue;
        store_result(out, ws, acc_offset, ws_parts, part_base + part, qh0 + (size_t)qt * num_q_heads + g, d,
                     q_loc[e], m_loc[r], l_loc[r]);
    }
#endif
}

// paged_decode_attention_merge — the idea: one work-item per (q row, q head, head_dim element)
// combines the split-K partitions with log-sum-exp weights: M = max m_p, out = sum 2^(m_p - M)
// acc_p / sum 2^(m_p - M) l_p.  Empty partitions (m = -inf, l = 0) weigh nothing.
__kernel void paged_decode_attention_merge(
    __global const float *ws,             // ws_ml [total_q, num_q_heads, num_parts, 2], then at
                                          // acc_offset [total_q, num_q_heads, num_parts, HEAD_DIM]
    __global float *out,                  // [total_q, num_q_heads, HEAD_DIM]
    const ulong acc_offset,               // scalar
    const int num_q_heads,                // scalar
    const int num_parts)                  // scalar
{
    const int d = get_global_id(0);
    const size_t qh = (size_t)get_global_id(2) * num_q_heads + get_global_id(1);
    if (d >= HEAD_DIM) return;
    __global const float *ml = ws + qh * num_parts * 2;
    __global const float *a = ws + acc_offset + qh * num_parts * HEAD_DIM + d;
    float mx = -INFINITY;
    for (int p = 0; p < num_parts; ++p) mx = NMAX(ml[2 * p], mx);
    float num = 0.0f, den = 0.0f;
    if (mx != -INFINITY) {
        for (int p = 0; p < num_parts; ++p) {
            const float m = ml[2 * p];
            if (m == -INFINITY) continue;
            const float w = kvcl_exp2(m - mx);
            num += w * a[(size_t)p * HEAD_DIM];
            den += w * ml[2 * p + 1];
        }
    }
    out[qh * HEAD_DIM + d] = den != 0.0f ? num / den : 0.0f;
}
