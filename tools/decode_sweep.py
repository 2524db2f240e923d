"""Sweep the decode-attention launch layout on one device: which variant, work-group size and
split-K partition size is fastest for a shape. The defaults that kvcl picks are marked.

    python tools/decode_sweep.py --device nvidia --batch 16 --kv-len 4096 --dtype fp32 fp16

Prints one line per configuration (ms per call, GB/s, fraction of the streaming read measured
in the same run) and writes them as JSON with ``--json``. Timing is ``kvcl.bench.timeit``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from kvcl import bench
from kvcl.ops import decode_attention as ops
from kvcl.ops import decode_plan as layout
from kvcl.runtime import resolve_device


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--kv-len", type=int, default=4096)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", nargs="+", default=["fp32"])
    ap.add_argument("--variant", nargs="+", default=[None])
    ap.add_argument("--local-size", nargs="+", type=int, default=[None])
    ap.add_argument("--partition", nargs="+", type=int, default=[None])
    ap.add_argument("--unroll", nargs="+", default=[None],
                    help="K,V unroll factors of the cooperative kernel on GPUs, e.g. 0,4 (0: full)")
    ap.add_argument("--preferred-wg", nargs="+", type=int, default=[None],
                    help="cooperative work-group size before device limits (default: kvcl's)")
    ap.add_argument("--vec", nargs="+", type=int, default=[None],
                    help="VEC of the cooperative kernel on GPUs for every dtype (default: kvcl's)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    PREFERRED_WG, GPU_WG, GPU_UNROLL, GPU_VEC = layout._PREFERRED_WG, layout._GPU_WG, layout._GPU_UNROLL, layout._GPU_VEC
    dev = resolve_device(args.device)
    _, read_gbps = bench.measure_stream_read(dev)
    print(f"{dev.info.name}: stream_read {read_gbps:.1f} GB/s", flush=True)
    shape = bench.DecodeShape(args.batch, args.q_heads, args.kv_heads, args.head_dim, args.kv_len)
    rows = []
    for dtype in args.dtype:
        case = bench.DecodeCase(dev, shape, dtype)
        (k, ks), (v, vs) = case.pools
        for vec, unroll, pwg, variant, local, part in itertools.product(
                args.vec, args.unroll, args.preferred_wg, args.variant, args.local_size, args.partition):
            layout._GPU_VEC = {b: vec for b in (1, 2, 4)} if vec else GPU_VEC
            variant = None if variant in (None, "auto") else variant
            layout._GPU_UNROLL = ({b: tuple(int(x) for x in unroll.split(",")) for b in (1, 2, 4)}
                               if unroll else GPU_UNROLL)
            layout._PREFERRED_WG, layout._GPU_WG = pwg or PREFERRED_WG, pwg or GPU_WG
            try:
                p = ops.plan(dev.context, batch=shape.batch, num_q_heads=shape.num_q_heads,
                             num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                             block_size=shape.block_size, max_q_len=1, max_kv_len=shape.kv_len,
                             kv_dtype=dtype, partition_size=part, local_size=local, variant=variant)

                def run():
                    return ops.paged_attention(
                        case.queries, k, v, case.indptr, case.indices, case.last_page_len,
                        case.q_indptr, case.out, k_scales=ks, v_scales=vs, kv_dtype=dtype,
                        max_q_len=1, max_kv_len=shape.kv_len, partition_size=part,
                        _local_size=local, _variant=variant)

                seconds = bench.timeit(run, dev.queue.finish, repeats=args.repeats)
            except Exception as exc:  # a layout the device refuses: report and go on
                print(f"{dtype:8s} variant={variant} wg={local} part={part}: {type(exc).__name__}: {exc}")
                continue
            gbps = bench.decode_bytes(shape, dtype) / seconds / 1e9
            row = {"kv_dtype": dtype, "variant": variant or "auto", "unroll": unroll or "default", "vec": dict(p.defines)["VEC"], "local_size": p.local_size,
                   "partition_size": p.partition_size, "num_parts": p.num_parts,
                   "default": local is None and part is None and variant is None and pwg is None and unroll is None and vec is None,
                   "ms": seconds * 1e3, "gbps": gbps, "utilization": gbps / read_gbps}
            rows.append(row)
            print(f"{dtype:8s} {row['variant']:11s} v={row['vec']:2d} u={row['unroll']:7s} wg={p.local_size:4d} part={p.partition_size:6d} "
                  f"x{p.num_parts:<3d} {row['ms']:8.3f} ms {gbps:8.1f} GB/s {100 * row['utilization']:5.1f}%"
                  f"{'  (default)' if row['default'] else ''}", flush=True)
        del case
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.info.name, "stream_read_gbps": read_gbps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
