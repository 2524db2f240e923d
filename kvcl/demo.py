"""``kvcl demo``: a paged cache in every KV dtype on the default device, checked against numpy,
then an exported model generating through the ONNX bridge.

1. Four sequences of different lengths are prefilled (chunked, through the page table), then
   one decode step runs for all of them in a single launch. For each dtype the demo prints the
   attention error against a float64 numpy reference of the unquantised K/V, the memory the
   cache needs per token, and the decode step's time.
2. With the ``onnx`` extra and a source checkout (the model is a test fixture), a tiny
   Llama export generates through ``kvcl::Attention`` in every KV dtype: the tokens, whether
   they equal the original model run in onnxruntime with past_key_values fed back, tokens per
   second and the cache's memory.
"""

from __future__ import annotations

import time

import numpy as np

from pathlib import Path

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


BRIDGE_MODEL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "onnx" / "llama_dynamo18.onnx"
BRIDGE_PROMPT = [5, 17, 42, 7, 99, 3]
BRIDGE_NEW_TOKENS = 24


def run_bridge_demo(device, *, print_fn=print) -> dict:
    """Generate with an exported model through the ONNX bridge in every KV dtype."""
    try:
        from .onnx import HAVE_EXTENSIONS
        from .onnx.generate import Generator, ReferenceRunner
    except ImportError as exc:  # pragma: no cover - the onnx extra is missing
        print_fn(f"\nONNX bridge part skipped: {exc} (pip install 'kvcl[onnx]')")
        return {}
    if not HAVE_EXTENSIONS:  # pragma: no cover
        print_fn("\nONNX bridge part skipped: onnxruntime-extensions is not installed (pip install 'kvcl[onnx]')")
        return {}
    if not BRIDGE_MODEL.is_file():  # an installed wheel carries no test fixtures
        print_fn(f"\nONNX bridge part skipped: {BRIDGE_MODEL.name} is a test fixture of the source checkout")
        return {}
    import onnx
    import time as _time

    original = onnx.load(str(BRIDGE_MODEL))
    ref = ReferenceRunner(original)
    past, tokens = ref.empty_past(1), np.array([BRIDGE_PROMPT], np.int64)
    logits, past = ref.step(tokens, past, 0)
    expected, length = [], len(BRIDGE_PROMPT)
    for _ in range(BRIDGE_NEW_TOKENS):
        nxt = int(logits[0, -1].argmax())
        expected.append(nxt)
        logits, past = ref.step(np.array([[nxt]], np.int64), past, length)
        length += 1
    print_fn(f"\nONNX bridge: {BRIDGE_MODEL.name} (tiny random Llama, GQA, exported by torch.onnx dynamo), "
             f"prompt {BRIDGE_PROMPT}, {BRIDGE_NEW_TOKENS} greedy tokens")
    print_fn(f"original model in onnxruntime, past_key_values fed back: {expected}")
    rows, results = [], {}
    for name in KV_DTYPES:
        gen = Generator(original, kv_dtype=name, device=device, max_tokens=256)
        gen.generate([BRIDGE_PROMPT], 2)                               # warm-up: kernel builds
        t0 = _time.perf_counter()
        out = gen.generate([BRIDGE_PROMPT], BRIDGE_NEW_TOKENS)
        seconds = _time.perf_counter() - t0
        got = [int(t) for t in out.tokens[0]]
        same = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(expected))
        results[name] = {"tokens": got, "equal_prefix": same, "tokens_per_s": BRIDGE_NEW_TOKENS / seconds,
                         "cache_bytes": gen.cache.memory_bytes()}
        rows.append((name, "yes" if same == len(expected) else f"first {same}",
                     f"{BRIDGE_NEW_TOKENS / seconds:.0f}", human_bytes(gen.cache.memory_bytes()),
                     " ".join(map(str, got[:10])) + " ..."))
    print_fn(format_table(["KV dtype", "tokens equal original", "tokens/s", "cache memory", "tokens"], rows,
                          align="llrrl"))
    print_fn("(a 2-layer toy with random weights: quantized KV changes its near-tied logits quickly; "
             "see docs/onnx.md)")
    return results


def run_demo(device=None, *, seq_lens=SEQ_LENS, repeats: int = 5, print_fn=print, bridge: bool = True) -> dict:
    """Run the demo; print the tables and return their rows keyed by dtype."""
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
             "unquantised K/V;\nbytes/token: K+V of one layer incl. int8 and int4 scales; decode step: one "
             "launch for all sequences (median, host arrays in and out).")
    if bridge:
        results["onnx_bridge"] = run_bridge_demo(dev, print_fn=print_fn)
    return results
