// kvcl/kernels/quantize.cl — encode float32 rows into a KV storage dtype, and decode them back.
//
// Idea: a work-group of (lanes, rows_per_group) work-items handles rows_per_group rows, `lanes`
// work-items striding along each row. For int8 the lanes of a row first reduce its absmax in
// local memory (max is exact and order-free, so the result equals numpy's whatever the tree),
// then every lane encodes its strided slice with kv_store(); the other formats skip the
// reduction. Decoding is element-wise: kv_load() times the row's scale. All the format maths
// (rounding, scale floor, fp8 saturation) lives in common.h only, so this file cannot drift from
// kvcl/reference/quantize.py.
//
// Build defines: KV_DTYPE, INT8_MODE (see common.h). head_dim is a run-time argument: these are
// memory-bound one-pass kernels, and one program per (dtype, mode) serves every head size.
// Every `*_base` argument is an element offset into its buffer (a pyopencl array's byte offset
// divided by the element size, plus the first row times head_dim), so views of a larger pool work.
// Requirements on the launch: local size (lanes, rows_per_group) with lanes a power of two,
// scratch holding lanes * rows_per_group floats; global size (lanes, round_up(num_rows, rows_per_group)).
#include "common.h"

__kernel void quantize_rows(
    __global const float *x,      // [num_rows, head_dim] starting at element x_base
    const ulong x_base,
    __global kv_t *out,           // [R, head_dim]; row r of x goes to elements out_base + r*head_dim ..
    const ulong out_base,
    __global scale_t *scales,     // [R] int8 only (NULL otherwise); row r's scale at scales_base + r
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
    const size_t dst = out_base + (size_t)row * head_dim;

#if KV_HAS_SCALE
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
    const float scale = int8_scale(partial[0]);
    if (active && lane == 0) SCALE_STORE(scale, scales + scales_base, row);
#else
    const float scale = 1.0f;  // ignored by kv_store for scale-free formats
#endif
    if (active)
        for (uint i = lane; i < head_dim; i += lanes) kv_store(src[i], out, dst + i, scale);
}

__kernel void dequantize_rows(
    __global const kv_t *data,       // [R, head_dim]; the first decoded row starts at data_base
    const ulong data_base,
    __global const scale_t *scales,  // [R] int8 only (NULL otherwise); first row's scale at scales_base
    const ulong scales_base,
    __global float *out,             // [num_rows, head_dim] starting at element out_base
    const ulong out_base,
    const uint head_dim,
    const ulong total)               // num_rows * head_dim
{
    const size_t i = get_global_id(0);
    if (i >= total) return;
    float v = kv_load(data, data_base + i);
#if KV_HAS_SCALE
    v *= SCALE_LOAD(scales + scales_base, i / head_dim);
#endif
    out[out_base + i] = v;
}
