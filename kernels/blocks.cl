// kvcl/kernels/blocks.cl — block copy (copy-on-write fork), block gather/scatter, and positional
// extract/inject on the contiguous per-layer layout.
//
// Idea: these kernels move bytes and never look at values, so one program serves every storage
// dtype (fp32, fp16 bits, int8, fp8) and the scale arrays alike: a block (or a position's row) is
// `*_words` words of WORD_T, one work-item per word. The launcher picks 32-bit words when every
// byte size and offset involved is a multiple of 4, bytes otherwise (WORD_BYTES define), so no
// value is ever converted.
//
// Block views: a pool [num_blocks, num_kv_heads, block_size, head_dim] is [num_blocks, block_words];
// scales [num_blocks, num_kv_heads, block_size] are the same with head_dim 1.
// Position views: a cache [num_heads, capacity, head_dim] is [num_heads, capacity, row_words].
// Every `*_base` argument is an offset in words into its buffer (pyopencl array views).
// Launch: global (round_up(words, local0), n or count, [num_heads]); work-items past `words` exit.

#ifndef WORD_BYTES
#define WORD_BYTES 4
#endif
#if WORD_BYTES == 4
typedef uint word_t;
#elif WORD_BYTES == 1
typedef uchar word_t;
#else
#error "WORD_BYTES must be 1 or 4"
#endif

__kernel void copy_blocks(
    __global word_t *pool,          // [num_blocks, block_words] from word pool_base
    const ulong pool_base,
    __global const int *src_ids,    // [n] from element src_base
    const ulong src_base,
    __global const int *dst_ids,    // [n] from element dst_base; distinct, disjoint from src_ids
    const ulong dst_base,
    const ulong block_words)
{
    const size_t w = get_global_id(0);
    const size_t i = get_global_id(1);
    if (w >= block_words) return;
    const size_t from = pool_base + (size_t)src_ids[src_base + i] * block_words + w;
    const size_t to = pool_base + (size_t)dst_ids[dst_base + i] * block_words + w;
    pool[to] = pool[from];
}

__kernel void extract_blocks(
    __global const word_t *pool,    // [num_blocks, block_words] from word pool_base
    const ulong pool_base,
    __global const int *block_ids,  // [n] from element ids_base
    const ulong ids_base,
    __global word_t *out,           // [n, block_words] from word out_base
    const ulong out_base,
    const ulong block_words)
{
    const size_t w = get_global_id(0);
    const size_t i = get_global_id(1);
    if (w >= block_words) return;
    out[out_base + i * block_words + w] =
        pool[pool_base + (size_t)block_ids[ids_base + i] * block_words + w];
}

__kernel void inject_blocks(
    __global const word_t *src,     // [n, block_words] from word src_base
    const ulong src_base,
    __global const int *block_ids,  // [n] from element ids_base; distinct
    const ulong ids_base,
    __global word_t *pool,          // [num_blocks, block_words] from word pool_base
    const ulong pool_base,
    const ulong block_words)
{
    const size_t w = get_global_id(0);
    const size_t i = get_global_id(1);
    if (w >= block_words) return;
    pool[pool_base + (size_t)block_ids[ids_base + i] * block_words + w] =
        src[src_base + i * block_words + w];
}

__kernel void extract_positions(
    __global const word_t *cache,   // [num_heads, capacity, row_words] from word cache_base
    const ulong cache_base,
    __global word_t *out,           // [num_heads, count, row_words] from word out_base
    const ulong out_base,
    const ulong capacity,
    const ulong start_pos,
    const ulong count,
    const ulong row_words)
{
    const size_t w = get_global_id(0);
    const size_t p = get_global_id(1);
    const size_t h = get_global_id(2);
    if (w >= row_words) return;
    const ulong pos = start_pos + p;
    word_t v = (word_t)0;           // positions past the capacity read as zeros
    if (pos < capacity) v = cache[cache_base + (h * capacity + pos) * row_words + w];
    out[out_base + (h * count + p) * row_words + w] = v;
}

__kernel void inject_positions(
    __global const word_t *src,     // [num_heads, count, row_words] from word src_base
    const ulong src_base,
    __global word_t *cache,         // [num_heads, capacity, row_words] from word cache_base
    const ulong cache_base,
    const ulong capacity,
    const ulong start_pos,
    const ulong count,
    const ulong row_words)
{
    const size_t w = get_global_id(0);
    const size_t p = get_global_id(1);
    const size_t h = get_global_id(2);
    const ulong pos = start_pos + p;
    if (w >= row_words || pos >= capacity) return;  // positions past the capacity are skipped
    cache[cache_base + (h * capacity + pos) * row_words + w] = src[src_base + (h * count + p) * row_words + w];
}
