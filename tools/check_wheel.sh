#!/usr/bin/env bash
# Build kvcl's wheel, install it with the pocl extra into a brand-new venv outside the checkout,
# and from a neutral folder: import kvcl, list the devices, run one kernel against its reference.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" wheel -q --no-deps "$repo" -w "$work/dist"
wheel="$(ls "$work"/dist/kvcl-*.whl)"
echo "built $(basename "$wheel"): $(unzip -l "$wheel" | grep -c 'kvcl/kernels/') kernel files inside"
"$work/venv/bin/pip" install -q "$wheel[pocl]"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import numpy as np
import pyopencl.array as cla

import kvcl
from kvcl.ops.quantize import quantize_rows
from kvcl.reference.quantize import quantize_int8_rows

assert "site-packages" in kvcl.__file__, kvcl.__file__
print("kvcl", kvcl.__version__, "from", kvcl.__file__)
print("devices:", [f"{d.index} {d.platform} / {d.name}" for d in kvcl.devices()])
dev = kvcl.Device("pocl")
x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
out = cla.empty(dev.queue, (16, 64), np.int8)
scales = cla.empty(dev.queue, 16, np.float32)
quantize_rows(cla.to_device(dev.queue, x), out, scales=scales, kv_dtype="int8")
q, s = quantize_int8_rows(x)
assert np.array_equal(out.get(), q) and np.array_equal(scales.get(), s)
print("wheel check: quantize_rows on", dev.info.name, "is bit-exact with the reference")
PY
