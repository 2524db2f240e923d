"""A/B the decode-attention kernel: versions of the source and launcher knobs, sampled in turn.

    python tools/decode_ab.py @HEAD~1 .                    # a git revision against the working tree
    python tools/decode_ab.py . .:_SERIAL_CHUNK=16 --dtype fp32 int8 --rounds 16
    python tools/decode_ab.py @HEAD~1 . --cached 2         # arithmetic alone: pages in cache
    python tools/decode_ab.py .:_INT8_DOT=float .:_INT8_DOT=integer --dtype int8 --vs-fp32

Each variant is ``SOURCE[:KNOB=VALUE,...]``: ``.`` is ``kernels/decode_attention.cl`` as it is,
``@REV`` that file at a git revision (built against today's ``common.h``), anything else a path
to a kernel file; knobs are module constants of ``kvcl.ops.decode_plan`` (``_SERIAL_CHUNK``,
``_SERIAL_MAX_HG``, ``_SERIAL_PART_MAX``, ...). Every round samples the streaming read and each
variant once, in a random order (in a fixed order the job right after the 256 MiB read measured
1.12x slower on the dev VM); a variant's utilisation and its speed against the first variant
are medians over the rounds of ratios taken in the same round. The first variant's output is
the reference the others are compared with (max abs difference).

``--cached N`` points every page of the table at the first N blocks, so K and V stay in the
caches and the kernel's arithmetic is what is timed (no streaming read then).

``--vs-fp32`` also samples kvcl's fp32 decode of the shape (the working tree, default knobs) in
every round, and prints each variant's speedup over it (the median of the rounds' ratios, as
``kvcl bench``'s ``speedup_vs_fp32``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcl import bench  # noqa: E402
from kvcl.ops import decode_plan as ops  # noqa: E402  (the layout knobs and the source)
from kvcl.runtime import resolve_device  # noqa: E402

KERNEL = "kernels/decode_attention.cl"


def parse_variant(spec: str, tmp: Path) -> tuple[str, str, dict]:
    """(label, source for kvcl.runtime.get_program, knobs)."""
    src, _, knobs = spec.partition(":")
    if src == ".":
        source = ops.SOURCE
    elif src.startswith("@"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{src[1:]}:{KERNEL}"], check=True,
                              capture_output=True, text=True).stdout
        path = tmp / f"decode_attention_{len(list(tmp.iterdir()))}.cl"
        path.write_text(text)
        source = str(path)            # an absolute path: kernel_dir() / source is the path itself
    else:
        source = str(Path(src).resolve())
    values = {}
    for item in filter(None, knobs.split(",")):
        name, _, value = item.partition("=")
        if not hasattr(ops, name):
            raise SystemExit(f"unknown knob {name!r} of kvcl.ops.decode_plan")
        try:
            values[name] = int(value)
        except ValueError:
            values[name] = value          # a string knob such as _INT8_DOT=integer
    return spec, source, values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help="SOURCE[:KNOB=VALUE,...]; the first is the baseline")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", nargs="+", default=["fp32"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--kv-len", type=int, default=2048)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cached", type=int, metavar="N", help="every page in the first N blocks")
    ap.add_argument("--vs-fp32", action="store_true", help="sample fp32 too; print speedups over it")
    args = ap.parse_args(argv)

    dev = resolve_device(args.device)
    shape = bench.DecodeShape(args.batch, args.q_heads, args.kv_heads, args.head_dim, args.kv_len)
    # the launcher's tuning constants (and the source), restored before every variant's launch
    defaults = {name: getattr(ops, name) for name in dir(ops) if name.startswith("_") and name[1:].isupper()}
    defaults["SOURCE"] = ops.SOURCE
    with tempfile.TemporaryDirectory() as tmp:
        variants = [parse_variant(v, Path(tmp)) for v in args.variants]
        reader = None if args.cached else bench.StreamReader(dev)
        for dtype in args.dtype:
            case = bench.DecodeCase(dev, shape, dtype)
            if args.cached:
                case = case.in_cache(args.cached)

            def make(source, knobs):
                def run():
                    for name, value in {**defaults, **knobs, "SOURCE": source}.items():
                        setattr(ops, name, value)
                    ops._configs.clear()
                    ops._plans.clear()
                    return case.run()
                return run

            runs = [make(source, knobs) for _, source, knobs in variants]
            outs = []
            for run in runs:
                run()
                outs.append(case.out.get())
            jobs = [(run, dev.queue.finish) for run in runs]
            if args.vs_fp32:
                base = bench.DecodeCase(dev, shape, "fp32")
                if args.cached:
                    base = base.in_cache(args.cached)

                def run_fp32(base=base):
                    for name, value in defaults.items():
                        setattr(ops, name, value)
                    ops._configs.clear()
                    ops._plans.clear()
                    return base.run()
                jobs.append((run_fp32, dev.queue.finish))
            if reader is not None:
                jobs.insert(0, (reader.run, reader.sync))
            times = bench.sample_interleaved(jobs, repeats=args.rounds, seed=args.seed)
            fp32_t = times.pop() if args.vs_fp32 else None
            nbytes = bench.decode_bytes(shape, dtype)
            head = f"{dtype}, B={shape.batch} L={shape.kv_len}"
            if reader is not None:
                read = reader.nbytes / times.pop(0)
                head += f": read {np.median(read) / 1e9:.1f} GB/s ({read.min() / 1e9:.1f}-{read.max() / 1e9:.1f})"
            else:
                head += f": pages in {args.cached} blocks (arithmetic)"
            if fp32_t is not None:
                head += f"; fp32 {np.median(fp32_t) * 1e3:.3f} ms"
            print(head)
            for (label, _, _), t, out in zip(variants, times, outs):
                line = f"  {label:40s} {np.median(t) * 1e3:8.3f} ms"
                if reader is not None:
                    line += f"  util {np.median(nbytes / t / read) * 100:5.1f}%"
                line += f"  vs first {bench.paired_ratio(times[0], t):.3f}x"
                if fp32_t is not None:
                    line += f"  vs fp32 {bench.paired_ratio(fp32_t, t):.2f}x"
                line += f"  max|diff| {float(np.abs(out - outs[0]).max()):.2g}"
                print(line, flush=True)
    for name, value in defaults.items():
        setattr(ops, name, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
