"""The serving case of ``kvcl bench`` (``--serving MODEL``): continuous-batching throughput.

N greedy requests of mixed prompt lengths, each generating the same number of tokens (stop
tokens off, so both sides produce exactly that many):

- **peer**: the original export in onnxruntime, past_key_values fed back, the requests one
  after another (what a user of the plain model does);
- **kvcl, concurrent**: every request added at once to a :class:`kvcl.scheduler.Scheduler` over
  the bridge (chunked prefill, one ragged forward per step), per KV dtype asked for;
- **kvcl, one by one**: the same scheduler given one request at a time (the batching's share).

Tokens/s count generated tokens over wall time, prefill included. KV memory: the paged cache's
blocks for all N requests at once, per dtype, against the past_key_values of one padded
onnxruntime batch of them (fp32). Target P10: concurrent >= 3x the peer.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .bench import Record
from .dtypes import KV_DTYPES
from .table import format_table

__all__ = ["serving_records", "format_serving"]


def _requests(vocab: int, n: int, new_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = np.linspace(16, 256, n).astype(int)
    rng.shuffle(lengths)
    return [rng.integers(100, min(vocab, 30000), int(k)).tolist() for k in lengths]


def serving_records(spec, dev, *, requests: int = 16, new_tokens: int = 32, kv_dtypes=("fp32", "int8"),
                    print_fn=print) -> list[Record]:
    """The serving rows for ``spec`` (a model path, folder or known name; see module notes)."""
    from .onnx import Generator, ReferenceRunner
    from .onnx.models import resolve_model
    from .onnx.modelio import load_model
    from .onnx.rewrite import model_info, rewrite

    path = resolve_model(spec)
    original = load_model(path)
    rewritten = rewrite(original)
    info = model_info(rewritten)
    vocab = None
    prompts = None
    label = str(spec)
    layers, kvh, d = info["num_layers"], info["num_kv_heads"], info["head_dim"]
    total_new = requests * new_tokens

    print_fn(f"kvcl bench: serving {requests} requests x {new_tokens} tokens on {label}: past_key_values one by one")
    ref = ReferenceRunner(original)
    out = []
    gens = {}
    for dt in kv_dtypes:
        gens[dt] = Generator(rewritten, kv_dtype=dt, device=dev, max_tokens=requests * (256 + new_tokens) + 256,
                             tokenizer=None, prefix_caching=True)
    try:
        vocab = next(iter(gens.values())).vocab_size or 32000
        prompts = _requests(vocab, requests, new_tokens)
        ref.generate(prompts[0][:16], 2)          # warm up
        t0 = time.perf_counter()
        ref_tokens = [ref.generate(p, new_tokens).tokens[0].tolist() for p in prompts]
        t_ref = time.perf_counter() - t0
        ref_tps = total_new / t_ref
        longest = max(len(p) for p in prompts) + new_tokens
        ref_bytes = requests * longest * layers * 2 * kvh * d * 4
        for dt, gen in gens.items():
            sched = gen.scheduler(stop_ids=())
            sched.generate([prompts[0][:16]], max_new_tokens=2)     # warm up
            print_fn(f"kvcl bench: serving, kvcl {dt}: concurrent, then one by one")
            t0 = time.perf_counter()
            got = sched.generate(prompts, max_new_tokens=new_tokens)
            t_conc = time.perf_counter() - t0
            steps = sched.counters["steps"]
            t0 = time.perf_counter()
            for p in prompts[:max(2, requests // 4)]:        # a quarter of them suffices for the rate
                sched.generate([p], max_new_tokens=new_tokens)
            t_one = (time.perf_counter() - t0) / max(2, requests // 4) * requests
            bs = gen.cache.block_size
            blocks = sum(math.ceil((len(p) + new_tokens) / bs) for p in prompts)
            kv_bytes = blocks * bs * layers * 2 * kvh * KV_DTYPES[dt].row_bytes(d)
            agree = sum(a == b for a, b in zip(got, ref_tokens)) if dt == "fp32" else None
            out.append(Record(
                "serving", dt, {"requests": requests, "new_tokens": new_tokens,
                                "prompt_tokens": f"{min(map(len, prompts))}-{max(map(len, prompts))}",
                                "model": label, "max_batch_tokens": sched.max_batch_tokens},
                t_conc, kv_bytes, float("nan"), float("nan"), float("nan"),
                peer="past_key_values one by one", speedup=t_ref / t_conc,
                note="generated tokens / wall time of all requests, prefill included; speedup = the original "
                     "model fed past_key_values, requests one after another / kvcl with every request at once",
                extra={"tokens_per_s": total_new / t_conc, "reference_tokens_per_s": ref_tps,
                       "one_by_one_tokens_per_s": total_new / t_one, "reference_seconds": t_ref,
                       "steps": steps, "kv_bytes": kv_bytes, "reference_kv_bytes": ref_bytes,
                       "greedy_equal_to_reference": agree}))
    finally:
        for g in gens.values():
            g.close()
    return out


def format_serving(records: list[Record]) -> str:
    rows = []
    for r in records:
        if r.case != "serving":
            continue
        e = r.extra
        same = e.get("greedy_equal_to_reference")
        rows.append((r.kv_dtype, str(r.shape["requests"]), str(r.shape["new_tokens"]), r.shape["prompt_tokens"],
                     f"{e['tokens_per_s']:.1f}", f"{e['one_by_one_tokens_per_s']:.1f}",
                     f"{e['reference_tokens_per_s']:.1f}", f"{r.speedup:.2f}x",
                     f"{e['kv_bytes'] / 2**20:.1f}", f"{e['reference_kv_bytes'] / 2**20:.1f}",
                     "-" if same is None else f"{same}/{r.shape['requests']}"))
    if not rows:
        return ""
    return ("\n\nServing (P10 >= 3x): tokens/s of N requests through the scheduler at once, one by one, and "
            "through the original model fed past_key_values one by one (peer); KV MiB for all N at once "
            "(paged blocks per dtype vs one padded fp32 past_key_values batch); same = greedy outputs equal "
            "to the peer's\n"
            + format_table(["kv dtype", "requests", "new", "prompt", "kvcl tok/s", "one by one", "peer tok/s",
                            "speedup", "KV MiB", "peer KV MiB", "same"], rows, align="lrrrrrrrrrr"))
