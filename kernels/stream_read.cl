// kvcl/kernels/stream_read.cl — the device's streaming-read bandwidth: kvcl bench's yardstick.
//
// Idea: the simplest kernel that reads every byte of a large buffer once, as fast as the device
// allows, with wide vector loads and one float written per work-item so the loads cannot be
// optimised away. Utilisation of every other kernel = its bytes / time / this kernel's.
// Two access orders, chosen per device type with -D CONTIGUOUS:
//   0 (GPUs): grid-stride — neighbouring work-items read neighbouring vectors (coalesced).
//   1 (CPUs): each work-item streams one contiguous chunk. A CPU runtime such as PoCL runs a
//             work-item's whole loop before the next work-item, so a grid stride would touch a
//             new cache line (and soon a new page) on every load and use 16 of its 64 bytes.
// Measured on PoCL, 2-core EPYC, 256 MiB, one process: grid-stride float4 0.4-2.4 GB/s;
// contiguous float4 chunks 9-11 GB/s; contiguous float16, 64 work-items per core 14-15 GB/s
// (numpy's single-threaded sum: 10-12 GB/s in the same runs); 15-25 GB/s over later runs.
// NVIDIA H100 (OpenCL), grid-stride float4, 16 groups of 128 per compute unit, 256 MiB:
// 2776-2867 GB/s over five fresh machines.

#ifndef CONTIGUOUS
#define CONTIGUOUS 0
#endif
#ifndef VEC
#define VEC 4                     // floats per load: 4 (GPUs), 16 (CPUs: one 64-byte line)
#endif
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
typedef CAT(float, VEC) floatV;

__kernel void stream_read(__global const floatV *src,   // [n_vec]
                          const uint n_vec,
                          __global float *partial)      // [global size]
{
    const uint gid = get_global_id(0);
    const uint workers = get_global_size(0);
    floatV a0 = (floatV)(0.0f), a1 = (floatV)(0.0f), a2 = (floatV)(0.0f), a3 = (floatV)(0.0f);
#if CONTIGUOUS
    const uint chunk = (n_vec + workers - 1) / workers;
    const uint begin = min(gid * chunk, n_vec);
    const uint end = min(begin + chunk, n_vec);
    uint i = begin;
    for (; i + 4 <= end; i += 4) {      // four independent accumulators: 64 bytes per step
        a0 += src[i];
        a1 += src[i + 1];
        a2 += src[i + 2];
        a3 += src[i + 3];
    }
    for (; i < end; ++i)
        a0 += src[i];
#else
    uint i = gid;
    for (; i + 3 * workers < n_vec; i += 4 * workers) {
        a0 += src[i];
        a1 += src[i + workers];
        a2 += src[i + 2 * workers];
        a3 += src[i + 3 * workers];
    }
    for (; i < n_vec; i += workers)
        a0 += src[i];
#endif
    const floatV acc = (a0 + a1) + (a2 + a3);
    float sum = 0.0f;
    for (int k = 0; k < VEC; ++k)
        sum += ((const float *)&acc)[k];
    partial[gid] = sum;
}
