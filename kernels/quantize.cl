// kvcl/kernels/quantize.cl — encode float32 rows into a KV storage dtype, and decode them back.
//
// Idea: a work-group of (lanes, rows_per_group) work-items handles rows_per_group rows, `lanes`
// work-items striding along each row. For the row-scaled formats (int8, and fp8 built with
// FP8_ROW_SCALE) the lanes of a row first reduce its absmax in local memory (max is exact and
// order-free, so the result equals numpy's whatever the tree; fmax ignores NaN), then every lane
// encodes its strided slice with kv_store(); the other formats skip the reduction. Decoding is
// element-wise: kv_load() times the row's scale. All the format maths (rounding, scale floor,
// fp8 encode/decode and saturation) lives in common.h only, so this file cannot drift from
// kvcl/reference/quantize.py; the one exception is FP8_ROW_SCALE's scale line below (a division
// and an fmax, twinned by kvcl.reference.quantize.fp8_row_scale).
//
// Build defines: KV_DTYPE, INT8_MODE (see common.h), and
//   FP8_ROW_SCALE  0 (default) | 1: only with KV_DTYPE fp8_e4m3 / fp8_e5m2. Each row gets a float32
//                  scale = fmax(absmax / FP8_MAX, FLT_EPSILON) (FP8_MAX 448 or 57344), stores
//                  fp8(x / scale) and decodes as fp8_decode(byte) * scale (oxibonsai's
//                  Fp8KvLayer). The division is correctly rounded (every program is built with
//                  -cl-fp32-correctly-rounded-divide-sqrt) and the encoder saturates x / scale
//                  values that round past FP8_MAX, so the bytes match kvcl.reference bit for bit.
// head_dim is a run-time argument: these are memory-bound one-pass kernels, and one program
// per (dtype, mode) serves every head size.
// Every `*_base` argument is an element offset into its buffer (a pyopencl array's byte offset
// divided by the element size, plus the first row times its elements: head_dim, int4 head_dim/2),
// so views of a larger pool work. int4 (two values per byte) needs an even head_dim; it rotates
// its rows (common.h), so quantize_rows stages each row in local memory and dequantize_rows
// decodes one row per work-item (launched over num_rows, not total, work-items).
// Requirements on the launch: local size (lanes, rows_per_group) with lanes a power of two,
// scratch holding lanes * rows_per_group floats; global size (lanes, round_up(num_rows, rows_per_group)).
// With a row scale, head_dim may be 0: the row's absmax is 0 and its scale is the floor.
#include "common.h"

#pragma OPENCL FP_CONTRACT OFF  // int4: c * sc + lo rounded twice, as kvcl.reference computes it

#ifndef FP8_ROW_SCALE
#define FP8_ROW_SCALE 0
#endif
#if FP8_ROW_SCALE
#if KV_DTYPE == KV_FP8_E4M3
#define FP8_MAX 448.0f
#elif KV_DTYPE == KV_FP8_E5M2
#define FP8_MAX 57344.0f
#else
#error "FP8_ROW_SCALE needs KV_DTYPE fp8_e4m3 or fp8_e5m2"
#endif
#if INT8_MODE != 0
#error "FP8_ROW_SCALE stores float scales: build it with INT8_MODE 0"
#endif
#endif
// ROW_SCALED: the rows carry a float (or, int8 mode 1, half) scale in `scales`.
#define ROW_SCALED (KV_HAS_SCALE || FP8_ROW_SCALE)

__kernel void quantize_rows(
    __global const float *x,      // [num_rows, head_dim] starting at element x_base
    const ulong x_base,
    __global kv_t *out,           // [R, head_dim / KV_PER_ELEM]; row r of x goes to elements
                                  // out_base + r * head_dim / KV_PER_ELEM .. (int4: bytes, two values each)
    const ulong out_base,
    __global scale_t *scales,     // [R] ROW_SCALED only (NULL otherwise); row r's scale at scales_base + r
    const ulong scales_base,
    const uint num_rows,
    const uint head_dim,
    __local float *scratch)       // [rows_per_group, lanes] absmax reduction
{
    const uint lane = get_local_id(0);
    const uint lanes = get_local_size(0);
    const uint row = get_global_id(1);
    const bool active = row < num_rows;   // padded rows still reach every barrier
    __global const float *src = x + x_base + (size_t)row * head_dim;
    const size_t dst = out_base + (size_t)row * (head_dim / KV_PER_ELEM);

#if KV_DTYPE == KV_INT4
    // int4: the row is staged in local memory (scratch holds rows_per_group x (head_dim + lanes)
    // floats), rotated there (kvcl_fwht_local), then its min, max and absmax-bits are reduced
    // and every lane codes its bytes. A row int4 cannot store (a rotated value non-finite or
    // beyond +-65504) gets codes 0 and sc = lo = NaN: it decodes as NaN.
    __local float *y = scratch + get_local_id(1) * (head_dim + lanes);
    __local float *partial = y + head_dim;
    for (uint i = lane; i < head_dim; i += lanes) y[i] = active ? src[i] : 0.0f;
    barrier(CLK_LOCAL_MEM_FENCE);
    kvcl_fwht_local(y, (int)head_dim, (int)(head_dim & (0u - head_dim)), (int)lane, (int)lanes);
    float lo_v = INFINITY, hi_v = -INFINITY;
    uint bad = 0;
    for (uint i = lane; i < head_dim; i += lanes) {
        lo_v = fmin(lo_v, y[i]);
        hi_v = fmax(hi_v, y[i]);
        bad |= !(fabs(y[i]) <= INT4_MAXABS);
    }
    float red[3] = {lo_v, hi_v, (float)bad};
    for (int k = 0; k < 3; ++k) {
        partial[lane] = red[k];
        barrier(CLK_LOCAL_MEM_FENCE);
        for (uint s = lanes / 2; s > 0; s >>= 1) {
            if (lane < s)
                partial[lane] = k == 0 ? fmin(partial[lane], partial[lane + s]) : fmax(partial[lane], partial[lane + s]);
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        red[k] = partial[0];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (!active) return;   // after the last barrier
    __global uint *slot = (__global uint *)(scales + scales_base) + row;
    if (red[2] != 0.0f) {
        for (uint j = lane; j < head_dim / 2; j += lanes) out[dst + j] = 0;
        if (lane == 0) *slot = 0x7E007E00u;   // fp16 NaN in both halves
        return;
    }
    float lo, sc;
    const uint word = int4_params(red[0], red[1], &lo, &sc);
    if (lane == 0) *slot = word;
    for (uint j = lane; j < head_dim / 2; j += lanes) int4_store2(y[2 * j], y[2 * j + 1], out, dst + j, lo, sc);
#else
#if ROW_SCALED
    __local float *partial = scratch + get_local_id(1) * lanes;
    float m = 0.0f;
    if (active)
        for (uint i = lane; i < head_dim; i += lanes) m = fmax(m, fabs(src[i]));
    partial[lane] = m;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint s = lanes / 2; s > 0; s >>= 1) {
        if (lane < s) partial[lane] = fmax(partial[lane], partial[lane + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
#if FP8_ROW_SCALE
    const float scale = fmax(partial[0] / FP8_MAX, FLT_EPSILON);
#else
    const float scale = row_scale(partial[0]);
#endif
    if (active && lane == 0) SCALE_STORE(scale, scales + scales_base, row);
#else
    const float scale = 1.0f;  // ignored by kv_store for scale-free formats
#endif
#if FP8_ROW_SCALE
    // kv_store's fp8 encoders ignore its scale argument: the value is divided here.
    if (active)
        for (uint i = lane; i < head_dim; i += lanes) kv_store(src[i] / scale, out, dst + i, scale);
#else
    if (active)
        for (uint i = lane; i < head_dim; i += lanes) kv_store(src[i], out, dst + i, scale);
#endif
#endif  // KV_DTYPE == KV_INT4
}

__kernel void dequantize_rows(
    __global const kv_t *data,       // [R, head_dim / KV_PER_ELEM]; the first decoded row starts at element data_base
    const ulong data_base,
    __global const scale_t *scales,  // [R] ROW_SCALED only (NULL otherwise); first row's scale at scales_base
    const ulong scales_base,
    __global float *out,             // [num_rows, head_dim] starting at element out_base
    const ulong out_base,
    const uint head_dim,
    const ulong total)               // num_rows * head_dim
{
#if KV_DTYPE == KV_INT4
    // one work-item per row: c * sc + lo into the row of out, then rotated back in place there
    // (the butterflies of kvcl_fwht_local in the same order, one work-item doing all of them)
    const size_t r = get_global_id(0);
    if (r >= total / head_dim) return;
    const uint word = ((__global const uint *)(scales + scales_base))[r];
    const float sc = kvcl_half_bits_to_float(word & 0xFFFFu), lo = kvcl_half_bits_to_float(word >> 16);
    __global const kv_t *src = data + data_base + r * (head_dim / 2);
    __global float *y = out + out_base + r * head_dim;
    for (uint j = 0; j < head_dim / 2; ++j) {
        const uint b = src[j];
        y[2 * j] = (float)(b & 0xFu) * sc + lo;
        y[2 * j + 1] = (float)(b >> 4) * sc + lo;
    }
    const uint p = head_dim & (0u - head_dim);
    for (uint h = 1; h < p; h <<= 1) {
        for (uint b = 0; b < head_dim / 2; ++b) {
            const uint i = (b / h) * 2 * h + (b % h);
            const float x0 = y[i], x1 = y[i + h];
            y[i] = x0 + x1;
            y[i + h] = x0 - x1;
        }
    }
    const float hs = kvcl_had_scale((int)p);
    for (uint i = 0; i < head_dim; ++i) y[i] *= hs;
#else
    const size_t i = get_global_id(0);
    if (i >= total) return;
    float v = kv_load(data + data_base, i);   // value i from the first row
#if ROW_SCALED
    v *= SCALE_LOAD(scales + scales_base, i / head_dim);
#endif
    out[out_base + i] = v;
#endif
}
