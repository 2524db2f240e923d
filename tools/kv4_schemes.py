"""Which 4-bit KV scheme keeps a real model's perplexity within issue 19's +3 %? Simulated in numpy.

    python tools/kv4_schemes.py                      # every scheme on SmolLM2 (tools/export_real_model.sh)
    python tools/kv4_schemes.py tok-sym tok-asym-g32 --model PATH
    python tools/kv4_schemes.py had-tok-asym-f16 had-tok-asym-f16-g32 --topics execmodel
    python tools/kv4_schemes.py had-tok-asym-f16-g32 --corpus   # the judge's eight texts, pooled

The text of ``kvcl bench --perplexity`` (:func:`kvcl.onnx.perplexity.english_text`) goes through
the original export in onnxruntime one token a step, its ``past_key_values`` fed back; every K and
V value a step returns is replaced by what the scheme would store (quantised and decoded back) before
any later token reads it. So each token attends to its own K/V exactly and to every earlier one as
stored: the bridge at chunk 1, except that the arithmetic is onnxruntime's, not kvcl's kernels'.
Per-channel K schemes quantise a block of ``--block`` tokens once it is full, with one scale (and
zero point) per channel for the block, and keep the newest, unfilled block in float32 (KIVI's
residual); the other schemes quantise each token's row when it is written, as kvcl's int4 does.

Schemes: ``tok-sym`` was kvcl's first ``int4`` (symmetric absmax/7 per (token, kv head) row, codes
±7; ``had-tok-asym-f16`` is what ``int4`` stores now); ``-gN`` uses one scale per N channels of a row; ``asym`` codes 0..15 between the min and the
max (scale and zero point; ``-f16`` stores the two as float16, in a float32 scale's 4 bytes); ``chan`` K per channel within a block (V as the name's second half);
``had`` rotates each row by the orthonormal Hadamard matrix before quantising and back after
(QuaRot's incoherence processing: Q·K and p·V are unchanged, an outlier channel is spread out).
Prints perplexity, its change against fp32 KV, the bytes a token of one kv head costs (K+V, float32
scales and zero points), and seconds per scheme (about a minute each on the 2-core dev VM).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

EPS = np.float32(np.finfo(np.float32).eps)


def _groups(x, g):
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def tok_sym(x, g):
    """Symmetric per-token codes ±7, one scale per g channels: x [..., D]."""
    s = _groups(x, g)
    sc = np.maximum(np.abs(s).max(-1, keepdims=True) / np.float32(7), EPS)
    return (np.clip(np.round(s / sc), -7, 7) * sc).reshape(x.shape)


def tok_asym(x, g):
    """Asymmetric per-token codes 0..15 between each group's min and max."""
    s = _groups(x, g)
    lo, hi = s.min(-1, keepdims=True), s.max(-1, keepdims=True)
    sc = np.maximum((hi - lo) / np.float32(15), EPS)
    return (np.clip(np.round((s - lo) / sc), 0, 15) * sc + lo).reshape(x.shape)


def tok_asym_f16(x, g):
    """:func:`tok_asym` with the scale and the zero point stored as float16: the pair fits the
    4 bytes a row's float32 scale takes in kvcl's pools today."""
    s = _groups(x, g)
    lo = s.min(-1, keepdims=True).astype(np.float16).astype(np.float32)
    sc = np.maximum((s.max(-1, keepdims=True) - lo) / np.float32(15), EPS)
    sc = np.maximum(sc.astype(np.float16).astype(np.float32), np.float32(2.0 ** -24))
    return (np.clip(np.round((s - lo) / sc), 0, 15) * sc + lo).reshape(x.shape)


def chan_sym(x):
    """Symmetric per channel over the tokens of one block: x [..., T, D]."""
    sc = np.maximum(np.abs(x).max(-2, keepdims=True) / np.float32(7), EPS)
    return np.clip(np.round(x / sc), -7, 7) * sc


def chan_asym(x):
    lo, hi = x.min(-2, keepdims=True), x.max(-2, keepdims=True)
    sc = np.maximum((hi - lo) / np.float32(15), EPS)
    return np.clip(np.round((x - lo) / sc), 0, 15) * sc + lo


def hadamard(d):
    """The orthonormal Sylvester Hadamard matrix of order d (a power of two)."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(np.float32(d))).astype(np.float32)


def rotated(f):
    """``f`` applied to each row rotated by the Hadamard matrix, rotated back: Q.K and p.V are
    unchanged by the rotation (H is orthogonal), an outlier channel is spread over the row."""
    def g(x):
        h = hadamard(x.shape[-1])
        return f(x @ h) @ h.T
    return g


def _tok(kind, g=None):
    f = {"sym": tok_sym, "asym": tok_asym, "asym-f16": tok_asym_f16}[kind]
    return lambda x: f(x, g or x.shape[-1])


# name: (K per token or None, K per channel or None, V per token, bytes of one token's K+V row pair
#        for head_dim D and block B)
SCHEMES = {
    "tok-sym": (_tok("sym"), None, _tok("sym"), lambda d, b: 2 * (d // 2 + 4)),
    "tok-sym-g32": (_tok("sym", 32), None, _tok("sym", 32), lambda d, b: 2 * (d // 2 + 4 * d // 32)),
    "tok-sym-g16": (_tok("sym", 16), None, _tok("sym", 16), lambda d, b: 2 * (d // 2 + 4 * d // 16)),
    "tok-asym": (_tok("asym"), None, _tok("asym"), lambda d, b: 2 * (d // 2 + 8)),
    "tok-asym-g32": (_tok("asym", 32), None, _tok("asym", 32), lambda d, b: 2 * (d // 2 + 8 * d // 32)),
    "had-tok-sym": (rotated(_tok("sym")), None, rotated(_tok("sym")), lambda d, b: 2 * (d // 2 + 4)),
    "had-tok-asym": (rotated(_tok("asym")), None, rotated(_tok("asym")), lambda d, b: 2 * (d // 2 + 8)),
    "had-tok-asym-f16": (rotated(_tok("asym-f16")), None, rotated(_tok("asym-f16")), lambda d, b: 2 * (d // 2 + 4)),
    "had-tok-asym-f16-g32": (rotated(_tok("asym-f16", 32)), None, rotated(_tok("asym-f16", 32)),
                             lambda d, b: 2 * (d // 2 + 4 * d // 32)),
    "had-K-asym/V-sym": (rotated(_tok("asym")), None, rotated(_tok("sym")), lambda d, b: d + 12),
    "had-tok-sym-g32": (rotated(_tok("sym", 32)), None, rotated(_tok("sym", 32)),
                        lambda d, b: 2 * (d // 2 + 4 * d // 32)),
    "chan-sym/tok-sym": (None, chan_sym, _tok("sym"), lambda d, b: d // 2 + 4 * d / b + d // 2 + 4),
    "chan-asym/tok-asym": (None, chan_asym, _tok("asym"), lambda d, b: d // 2 + 8 * d / b + d // 2 + 8),
    "chan-sym/tok-sym-g32": (None, chan_sym, _tok("sym", 32), lambda d, b: d // 2 + 4 * d / b + d // 2 + 4 * d // 32),
}


def simulate(runner, ids, scheme, block):
    """Summed negative log-likelihood of ``ids`` (its first token unscored) with the stored K/V
    replaced as ``scheme`` stores them."""
    from kvcl.onnx.perplexity import token_nll
    k_tok, k_chan, v_tok = SCHEMES[scheme][:3] if scheme != "fp32" else (None, None, None)
    past, total = runner.empty_past(1), 0.0
    exact = {}   # per-channel K: the float32 rows of the newest, unfilled block
    for t, token in enumerate(ids[:-1]):
        logits, past = runner.step(np.asarray([[token]], np.int64), past, t)
        total += token_nll(logits[0, :1], np.asarray(ids[t + 1:t + 2]))
        for name, a in past.items():
            is_key = ".key" in name
            if scheme == "fp32":
                continue
            if is_key and k_chan is not None:
                exact.setdefault(name, []).append(a[:, :, t:t + 1].astype(np.float32))
                if (t + 1) % block == 0:          # block full: quantise it per channel
                    rows = np.concatenate(exact.pop(name), axis=2)
                    a[:, :, t + 1 - block:t + 1] = k_chan(rows)
                continue
            f = k_tok if is_key else v_tok
            a[:, :, t:t + 1] = f(a[:, :, t:t + 1].astype(np.float32))
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("schemes", nargs="*", default=list(SCHEMES), help=f"of: {', '.join(SCHEMES)}")
    ap.add_argument("--model", default="smollm2", help="an original export (path or 'smollm2')")
    ap.add_argument("--block", type=int, default=16, help="tokens a per-channel K block holds (default 16)")
    ap.add_argument("--topics", nargs="+", default=None,
                    help="the pydoc_data.topics sections of one text (default: english_text()'s)")
    ap.add_argument("--corpus", action="store_true",
                    help="the judge's eight segments (english_corpus()), each its own sequence, pooled "
                         "(about 12 minutes a scheme)")
    ap.add_argument("--tokens", type=int, default=None, help="score only the first N tokens of the text")
    args = ap.parse_args(argv)
    bad = [s for s in args.schemes if s not in SCHEMES]
    if bad:
        ap.error(f"unknown scheme(s) {bad}: expected some of {', '.join(SCHEMES)}")
    from kvcl.onnx.generate import ReferenceRunner
    from kvcl.onnx.modelio import load_model
    from kvcl.onnx.models import resolve_model
    from kvcl.onnx.perplexity import english_corpus, english_text
    from kvcl.tokenizer import Tokenizer, find_tokenizer
    if args.corpus and args.topics:
        ap.error("--corpus and --topics: give one of them")
    path = resolve_model(args.model)
    runner = ReferenceRunner(load_model(path))
    tok = Tokenizer(find_tokenizer(path))
    text = english_corpus() if args.corpus else english_text(tuple(args.topics)) if args.topics else english_text()
    segments = [tok.encode(t.text, add_special_tokens=False)[:args.tokens]
                for t in (text.texts if args.corpus else (text,))]
    scored = sum(len(ids) - 1 for ids in segments)
    d = int(runner.head_dim)
    print(f"{text.name}: {scored} tokens scored, one token a step; head_dim {d}, "
          f"per-channel K blocks of {args.block}")
    print(f"{'scheme':24s} {'ppl':>9s} {'vs fp32':>9s} {'B/token/head':>13s} {'s':>5s}")
    base = None
    for scheme in ["fp32"] + args.schemes:
        t0 = time.perf_counter()
        ppl = float(np.exp(sum(simulate(runner, ids, scheme, args.block) for ids in segments) / scored))
        base = base or ppl
        nbytes = 8 * d if scheme == "fp32" else SCHEMES[scheme][3](d, args.block)
        print(f"{scheme:24s} {ppl:9.4f} {100 * (ppl / base - 1):+8.2f}% {nbytes:13.1f} "
              f"{time.perf_counter() - t0:5.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
