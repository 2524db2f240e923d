"""``kvcl demo``: a paged cache in every KV dtype on the default device, checked against numpy.

Four sequences of different lengths are prefilled (chunked, through the page table), then one
decode step runs for all of them in a single launch. For each dtype the demo prints the
attention error against a float64 numpy reference of the unquantised K/V, the memory the
cache needs per token, and the decode step's time.
"""

from __future__ import annotations

import time

import numpy as np

from .dtypes import KV_DTYPES
from .engine import PagedKVCache
from .reference.decode_attention import _attend as reference_attend
from .runtime import resolve_device
from .table import format_table, human_bytes

SEQ_LENS = (1999, 700, 1024, 77)   # cached tokens before the decode step
NUM_KV_HEADS, NUM_Q_HEADS, HEAD_DIM, BLOCK_SIZE = 8, 32, 128, 16
PREFILL_CHUNK = 512


def _progress(iterable, **kw):
    try:
        from tqdm import tqdm
        return tqdm(iterable, **kw)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable


def run_demo(device=None, *, seq_lens=SEQ_LENS, repeats: int = 5, print_fn=print) -> dict:
    """Run the demo; print a table and return its rows keyed by dtype."""
    dev = resolve_device(device)
    info = dev.info
    print_fn(f"kvcl demo on {info.platform} / {info.name} ({info.compute_units} compute units)")
    print_fn(f"{len(seq_lens)} sequences of {', '.join(map(str, seq_lens))} cached tokens + 1 new each; "
             f"{NUM_Q_HEADS} query heads, {NUM_KV_HEADS} KV heads (GQA {NUM_Q_HEADS // NUM_KV_HEADS}), "
             f"head_dim {HEAD_DIM}, blocks of {BLOCK_SIZE}\n")
    rng = np.random.default_rng(0)
    total = [n + 1 for n in seq_lens]
    keys = [rng.standard_normal((n, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32) for n in total]
    values = [rng.standard_normal((n, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32) for n in total]
    # peaky attention, as in a trained model: queries aligned with a few cached keys
    queries = rng.standard_normal((len(total), NUM_Q_HEADS, HEAD_DIM)).astype(np.float32)
    group = NUM_Q_HEADS // NUM_KV_HEADS
    for b, n in enumerate(total):
        for h in range(NUM_Q_HEADS):
            queries[b, h] += 0.6 * keys[b][rng.integers(n), h // group]
    expected = np.concatenate([
        reference_attend(queries[b:b + 1], keys[b], values[b], 1 / np.sqrt(HEAD_DIM), 0)
        for b in range(len(total))
    ]).astype(np.float32)

    rows, results = [], {}
    blocks = sum(-(-n // BLOCK_SIZE) for n in total) + 8
    for name in _progress(list(KV_DTYPES), desc="KV dtypes", leave=False):
        cache = PagedKVCache(1, NUM_KV_HEADS, HEAD_DIM, num_blocks=blocks, block_size=BLOCK_SIZE,
                             dtype=name, device=dev)
        seqs = [cache.add_sequence() for _ in seq_lens]
        done = [0] * len(seqs)
        while any(d < n for d, n in zip(done, seq_lens)):     # chunked prefill, all sequences per step
            counts = [min(PREFILL_CHUNK, n - d) for d, n in zip(done, seq_lens)]
            step = cache.plan(seqs, counts)
            cache.write(0, step, np.concatenate([k[d:d + c] for k, d, c in zip(keys, done, counts)]),
                        np.concatenate([v[d:d + c] for v, d, c in zip(values, done, counts)]))
            done = [d + c for d, c in zip(done, counts)]
        step = cache.plan(seqs, [1] * len(seqs))
        cache.write(0, step, np.stack([k[-1] for k in keys]), np.stack([v[-1] for v in values]))
        out = cache.attend(0, step, queries)                  # warm-up (kernel build) and the result
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            cache.attend(0, step, queries)
            times.append(time.perf_counter() - t0)
        err = float(np.abs(out - expected).max() / np.abs(expected).max())
        cos = float((out.ravel() @ expected.ravel()) / (np.linalg.norm(out) * np.linalg.norm(expected)))
        per_token = cache.stats()["bytes_per_token"]
        results[name] = {"max_rel_error": err, "cosine": cos, "bytes_per_token": per_token,
                         "decode_ms": 1e3 * float(np.median(times))}
        rows.append((name, f"{err:.2e}", f"{cos:.6f}", human_bytes(per_token),
                     f"{KV_DTYPES['fp32'].row_bytes(HEAD_DIM) / KV_DTYPES[name].row_bytes(HEAD_DIM):.2f}x",
                     human_bytes(per_token * sum(total)), f"{results[name]['decode_ms']:.2f}"))
    print_fn(format_table(
        ["KV dtype", "max |err| / max |out|", "cosine", "bytes/token", "vs fp32", "cache for these seqs",
         "decode step ms"], rows, align="lrrrrrr"))
    print_fn("\nerror: attention output of the decode step vs a float64 numpy reference on the "
             "unquantised K/V;\nbytes/token: K+V of one layer incl. int8 scales; decode step: one "
             "launch for all sequences (median, host arrays in and out).")
    return results
