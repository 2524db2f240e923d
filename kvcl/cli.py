"""The ``kvcl`` command line: ``kvcl devices``, ``kvcl demo``, ``kvcl bench``, ``kvcl onnx ...``,
``kvcl generate``."""

from __future__ import annotations

import argparse
import sys



def code_paths(device) -> str:
    """The code paths kvcl takes on a usable ``pyopencl.Device``, in words."""
    from .ops.decode_attention import variant_for
    decode = {"serial": "serial (one work-item per sequence x kv-head group, a loop per thread)",
              "cooperative": "cooperative (work-groups share tokens across work-items)"}[variant_for(device)]
    from .runtime import work_items_are_threads
    write = ("one work-item per (token, head) row" if work_items_are_threads(device)
             else "work-groups of rows with local-memory reductions")
    subgroups = "reported but " if "subgroups" in device.extensions else ""
    return (f"decode attention {decode}, split-K when groups cannot fill the device; fused write "
            f"{write}; fp16 KV via vload_half/vstore_half (no cl_khr_fp16 needed); reductions in "
            f"local memory (subgroups {subgroups}not used)")


def _cmd_devices(args) -> int:
    from .runtime import devices
    from .table import format_table, human_bytes

    found = devices()
    if not found:
        from .runtime import _NO_DEVICE_HELP
        print(f"kvcl: {_NO_DEVICE_HELP}", file=sys.stderr)
        return 1
    from .runtime import _all_devices
    by_index = {f"{p}:{i}": dev for p, i, _, dev in _all_devices()}
    rows, notes = [], []
    for d in found:
        problems = d.unusable
        rows.append((d.index, d.platform, d.name, d.type,
                     d.opencl_version.split(" ")[1] if " " in d.opencl_version else d.opencl_version,
                     d.compute_units, human_bytes(d.global_mem_bytes), human_bytes(d.local_mem_bytes),
                     d.max_work_group_size, "yes" if d.fp16 else "no", "yes" if d.subgroups else "no",
                     "no (see below)" if problems else "yes"))
        if problems:
            notes.append(f"{d.index}: kvcl cannot run here: {'; '.join(problems)}")
        else:
            notes.append(f"{d.index}: {code_paths(by_index[d.index])}")
    print(format_table(["index", "platform", "device", "type", "OpenCL", "CUs", "global mem",
                        "local mem", "max WG", "fp16", "subgroups", "kvcl"], rows,
                       align="llllrrrrrlll"))
    print()
    for line in notes:
        print(line)
    print("\nSelect one with KVCL_DEVICE=<index or name substring> (e.g. KVCL_DEVICE=0:0).")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(device=args.device)
    return 0


def _cmd_bench(args) -> int:
    from .bench import format_records, plot, run_bench, write_json
    from .runtime import resolve_device

    dev = resolve_device(args.device)
    if args.perplexity:   # refused before any case runs, not minutes later
        from .bench_bridge import check_perplexity_options
        check_perplexity_options(args.perplexity_kv_dtypes, args.perplexity_chunk)
    models = list(args.onnx_model)
    if models == ["auto"]:   # the bridge cases on full runs, where the ONNX extras are installed
        from .onnx.customop import HAVE_EXTENSIONS
        models = ["synthetic"] if HAVE_EXTENSIONS and not args.quick else ["none"]
        if not HAVE_EXTENSIONS and not args.quick:
            print("kvcl bench: no ONNX bridge cases (pip install 'kvcl[onnx]' for them)", file=sys.stderr)
    models = [m for m in models if m not in ("none", "auto")]
    records = run_bench(dev, quick=args.quick, repeats=args.repeats, sampling=args.sampling,
                        onnx_model=models or None, onnx_contexts=args.onnx_contexts,
                        print_fn=lambda msg: print(msg, file=sys.stderr))
    if args.serving:
        from .bench_serving import serving_records
        records += serving_records(args.serving, dev, requests=args.serving_requests,
                                   kv_dtypes=args.serving_kv_dtypes, print_fn=lambda msg: print(msg, file=sys.stderr))
    if args.perplexity:
        from .bench_bridge import perplexity_records
        records += perplexity_records(args.perplexity, dev, kv_dtypes=args.perplexity_kv_dtypes,
                                      chunk=args.perplexity_chunk, print_fn=lambda msg: print(msg, file=sys.stderr))
    name = f"{dev.info.platform} / {dev.info.name}"
    print(format_records(records, name))
    if args.json:
        write_json(records, args.json, dev.info)
        print(f"wrote {args.json}")
    if args.plot:
        plot(records, args.plot, name)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .dtypes import KV_DTYPES
    parser = argparse.ArgumentParser(prog="kvcl", description="kvcl: a portable OpenCL KV-cache runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("devices", help="list OpenCL devices and their capabilities")
    p.set_defaults(func=_cmd_devices)
    p = sub.add_parser("demo", help="fill a paged cache and run decode attention in every KV dtype")
    p.add_argument("--device", default=None, help="device index 'P:D' or name substring (default: KVCL_DEVICE or auto)")
    p.set_defaults(func=_cmd_demo)
    from .onnx.cli import add_commands
    add_commands(sub)             # kvcl onnx rewrite | generate | bench, kvcl generate
    from .serve import add_command as add_serve
    add_serve(sub)                # kvcl serve
    p = sub.add_parser("bench", help="kernel speed vs the device's streaming-read bandwidth and vs peers")
    p.add_argument("--device", default=None, help="device index 'P:D' or name substring")
    p.add_argument("--json", metavar="PATH", help="write one JSON record per case")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of utilisation per case")
    p.add_argument("--quick", action="store_true", help="small shapes (seconds, for smoke tests)")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per case (median)")
    p.add_argument("--sampling", choices=("interleaved", "blocked"), default="interleaved",
                   help="interleaved: each case's samples alternate with the streaming read's "
                        "(default); blocked: each case alone, against one read at the start")
    p.add_argument("--onnx-model", metavar="MODEL", nargs="+", default=["auto"],
                   help="the ONNX bridge's decode step against the same model fed past_key_values, "
                        "where its time goes, and the custom op's overhead (needs kvcl[onnx]); one or "
                        "more of: an exported decoder's path, 'synthetic' (a decoder of realistic "
                        "attention width built in memory; the default on full runs), 'smollm2' (the "
                        "real-weights model tools/export_real_model.sh exports; skipped with a message "
                        "when it is not there) or 'none' (the default with --quick)")
    p.add_argument("--onnx-contexts", metavar="N", type=int, nargs="+", default=[16, 256, 4096],
                   help="context lengths of the bridge cases (default: 16 256 4096)")
    p.add_argument("--serving", metavar="MODEL", default=None,
                   help="also continuous-batching throughput: N requests through the scheduler at once vs "
                        "the original model fed past_key_values one by one (a model path, folder or 'smollm2')")
    p.add_argument("--serving-requests", metavar="N", type=int, default=16, help="requests of the serving case")
    p.add_argument("--serving-kv-dtypes", metavar="DTYPE", nargs="+", default=["fp32", "int8"],
                   help="KV dtypes of the serving case (default: fp32 int8)")
    p.add_argument("--perplexity", metavar="MODEL", default=None,
                   help="also the quality of each KV dtype: pooled perplexity of eight English texts shipped with Python, "
                        "teacher forced through the bridge, vs fp32 KV and issue 19's bounds (fp16 +0.2%%, "
                        "int8 +0.5%%, int4 +3%%); 'smollm2' or a model path/folder with tokenizer.json (skipped with a "
                        "message when smollm2 is not exported)")
    p.add_argument("--perplexity-kv-dtypes", metavar="DTYPE", nargs="+",
                   default=list(KV_DTYPES),
                   help="KV dtypes of the perplexity case (default: all six; fp32 is always added)")
    p.add_argument("--perplexity-chunk", metavar="N", type=int, default=128,
                   help="tokens per chunk of prefill in the perplexity case (default: 128)")
    p.set_defaults(func=_cmd_bench)
    from .onnx.cli import id_flags_with_negative_values
    args = parser.parse_args(id_flags_with_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error for the CLI user, not a traceback
        from .errors import KvclError
        if isinstance(exc, KvclError):
            print(f"kvcl: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.filename is not None:   # disk full, permissions, ...
            print(f"kvcl: {exc.strerror or exc}: {exc.filename!r}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
