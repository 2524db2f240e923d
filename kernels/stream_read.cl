// kvcl/kernels/stream_read.cl — the device's streaming-read bandwidth: kvcl bench's yardstick.
//
// Idea: the simplest kernel that reads every byte of a large buffer once, as fast as the device
// allows: wide vector loads (float4 x UNROLL per iteration), a grid-stride loop over many
// work-groups, one float written per work-item so the loads cannot be optimised away.
// Utilisation of every other kernel = its bytes / time / this kernel's bytes / time.
// Measured: ~30 GB/s on PoCL, 2-core EPYC dev machine (targets.md).

#ifndef UNROLL
#define UNROLL 4
#endif

__kernel void stream_read(__global const float4 *src,   // [n_vec4]
                          const uint n_vec4,
                          __global float *partial)      // [global size]
{
    const uint gid = get_global_id(0);
    const uint stride = get_global_size(0);
    float4 acc = (float4)(0.0f);
    uint i = gid;
    for (; i + (UNROLL - 1) * stride < n_vec4; i += UNROLL * stride) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            acc += src[i + u * stride];
    }
    for (; i < n_vec4; i += stride)
        acc += src[i];
    partial[gid] = acc.x + acc.y + acc.z + acc.w;
}
