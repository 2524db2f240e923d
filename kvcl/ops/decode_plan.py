"""How a decode-attention call is laid out: the kernel variant, its ``-D`` defines, the
work-group shape and split-K (:func:`plan`), for :mod:`kvcl.ops.decode_attention`'s launchers.

The layout constants below are the module's knobs: tools (``tools/decode_ab.py``,
``tools/decode_sweep.py``) and tests reassign them, and every memoized plan records the values it
was made with (``_knobs()``). Measured figures: the comments beside them and
``docs/performance.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyopencl as cl

from ..dtypes import kv_dtype as _kv_dtype
from ..errors import InvalidArgument
from ..runtime import get_kernel, work_items_are_threads

__all__ = ["INT8_DOTS", "Plan", "VARIANTS", "int8_dot_for", "plan", "variant_for"]

SOURCE = "decode_attention.cl"

VARIANTS = ("serial", "cooperative")
#: the ``int8_dot`` choices: how int8 KV's logits are computed (see :func:`~kvcl.ops.decode_attention.paged_attention`)
INT8_DOTS = ("auto", "float", "integer")
#: the KV dtypes with an integer path (int4: the serial variant only)
INTEGER_KV = ("int8", "int4")
# int8_dot=None means this (tools and tests reassign it; the engine passes None)
_INT8_DOT = "auto"
# bits of the query codes of the integer path (16 or 8; the INT8_DOT define). 16 measured at least
# as fast as 8 (decode 1.09-1.16x vs 1.07-1.20x float logits in the same runs, arithmetic
# 1.16-1.18x vs 1.11-1.13x) and 2.5x closer to the fp32-KV output on peaky inputs
# (docs/performance.md); int4's codes too: 16 bits 1.08-1.22x float logits, 8 bits 1.20-1.28x,
# but 8 bits took SmolLM2's pooled perplexity to +5.06 % (16: +4.59 %, float +4.44 %)
_INT8_DOT_BITS = 16
_INT8_DOT_MAX_HEAD_DIM = 512   # beyond it int32 sums of 16-bit x 8-bit codes could overflow
_PREFERRED_WG = 128     # cooperative: work-items per group before the device limits cut it down
_V_VECTORS = 1          # cooperative: head_dim vectors per work-item in the V phase (when they divide)
_SERIAL_CHUNK = 32      # serial: tokens per chunk (CT)
_SERIAL_ACC_VECTORS = 8  # serial: accumulator vectors (rows x SV) held in registers in the V phase
_SERIAL_MAX_HG = 8       # serial: kv heads per work-group, at most (HG)
_SERIAL_STATE_FLOATS = 4096  # serial: HG x rows x head_dim, at most (q and acc live on the stack)
# serial, PoCL: prefetch K rows too when one K run (a block's rows of one head) spans at most this
# many bytes; longer runs are left to the hardware prefetchers (see PREFETCH_K in the kernel):
# fp32 at D=128 with 16-token blocks (8 KiB runs) 0.97-1.08x at B=4 L=2048 and 1.08-1.10x at
# B=1 L=32768, B=64 L=512, B=16 L=4096 without; fp16 (4 KiB) 0.87-0.95x without
_SERIAL_K_PREFETCH_RUN = 4096
_MAX_ROWS = 16          # query rows (heads x tokens) per work-group when q_len > 1
_PART_MIN, _PART_MAX = 256, 512
# Serial variant (CPUs): the largest split-K partition. B=1 L=32768 fp32 on PoCL (2-core EPYC VM,
# 8 kv heads per work-group, 12 rounds in random order with the streaming read): 60% of the read
# with 512-token partitions, 69% with 2048
_SERIAL_PART_MAX = 2048
# Cooperative variant on GPU devices, by bytes per stored KV element: VEC, (UNROLL_K, UNROLL_V)
# and the work-group size. Chosen by tools/decode_sweep.py on an H100 through NVIDIA's OpenCL
# (B=16 Hq=32 Hkv=8 D=128 L=4096, 120 layouts per dtype; stream read 2776 GB/s in the same run):
# fp32 VEC 16, full unrolling, WG 32: 0.244 ms = 80% of the read (the CPU layout, VEC 8 loops
# WG 128: 0.323 ms, 58%); fp16 and int8 are bound by their conversions there, where loops are
# best (unrolled: 20-40% slower): fp16 0.223 ms, int8 0.185 ms with VEC 8, WG 32.
_GPU_VEC = {4: 16, 2: 8, 1: 8}
_GPU_UNROLL = {4: (0, 0), 2: (1, 1), 1: (1, 1)}
_GPU_WG = 32
# ... and the largest split-K partition there (tokens): fp16 / int8 0.22 / 0.19 ms with 256-token
# partitions vs 0.31 / 0.25 ms with 512; fp32 best with 512 (0.244 vs 0.262 ms with 256)
_GPU_PART_MAX = {4: 512, 2: 256, 1: 256}

# one partition's size is max_kv_len rounded up to a multiple of this (see _plan)
_ONE_PART_ROUND = 1024

_configs: dict = {}
_plans: dict = {}
# the plan keys (all but max_kv_len) whose automatic layout is one partition at any length: their
# plans are memoized per _ONE_PART_ROUND bucket of lengths, not per length (see plan)
_one_part: dict = {}   # key -> the knobs it was found with


@dataclass(frozen=True)
class Plan:
    """How one call is laid out on the device (returned by :func:`plan`)."""

    defines: tuple          # the -D build options, sorted (key, value) pairs
    local_size: int         # work-items per group (WG)
    q_tile: int             # query tokens per work-group
    q_tiles: int            # work-groups along the query axis
    partition_size: int     # tokens per split-K partition (one partition: >= max_kv_len)
    num_parts: int          # partitions per sequence (1: no merge kernel)
    kv_heads_per_group: int = 1  # kv heads each work-group serves (HG; the serial variant)

    @property
    def int8_dot(self) -> str:
        """``"integer"`` where the kernel computes int8 logits as integer dot products (the
        INT8_DOT define), else ``"float"``."""
        return "integer" if dict(self.defines).get("INT8_DOT") else "float"

    def workspace_floats(self, total_q: int, num_q_heads: int, head_dim: int) -> int:
        """float32 elements of the split-K workspace (0 without split)."""
        if self.num_parts == 1:
            return 0
        return total_q * num_q_heads * self.num_parts * (head_dim + 2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _local_bytes(rows: int, head_dim: int, chunk: int, has_scale: bool, integer: bool = False) -> int:
    return 4 * (rows * head_dim + rows * chunk + (5 if integer else 3) * rows + chunk * (2 if has_scale else 1))


def _divisor_at_least(n: int, low: int) -> int:
    """The smallest divisor of ``n`` that is >= ``low`` (``n`` itself at worst)."""
    return next(d for d in range(max(1, low), n + 1) if n % d == 0)


def _divisor_at_most(n: int, high: int) -> int:
    """The largest divisor of ``n`` that is <= ``high`` (1 at worst)."""
    return next(d for d in range(max(1, min(n, high)), 0, -1) if n % d == 0)


def _variant_for(dev, variant: str | None) -> str:
    """The serial variant where a work-item is a thread's loop iteration (CPU OpenCL such as PoCL);
    the cooperative one where the implementation spreads work-items over SIMD lanes: GPUs, and
    llvmpipe (a CPU device that vectorises across work-items: the serial variant measured 9x
    slower there, 1.28 s vs 0.14 s for fp32 B=4 L=512)."""
    if variant is None:
        return "serial" if work_items_are_threads(dev) else "cooperative"
    if variant not in VARIANTS:
        raise InvalidArgument(f"variant: expected one of {VARIANTS}, got {variant!r}")
    return variant


def variant_for(device: cl.Device) -> str:
    """The kernel variant this device gets by default: ``"serial"`` or ``"cooperative"``."""
    return _variant_for(device, None)


_PROBE_SRC = """
__kernel void probe(__global int *out) {
    int fast = 0;
#if defined(__AVX2__) && defined(__has_builtin)
#if __has_builtin(__builtin_ia32_pmaddwd256) && __has_builtin(__builtin_ia32_pmaddubsw256) \\
    && __has_builtin(__builtin_ia32_psignb256)
    fast = 1;
#endif
#endif
    out[0] = fast;
}
"""
_probes: dict = {}


def _x86_int_dot(context, dev) -> bool:
    """Whether the device's compiler offers the AVX2 multiply-adds the serial kernel's integer
    path uses (IDOT_X86 in the kernel: the same test, run once per device in a tiny program)."""
    key = (context.int_ptr, dev.int_ptr)
    found = _probes.get(key)
    if found is None:
        try:
            prg = cl.Program(context, _PROBE_SRC).build(options=["-cl-std=CL1.2"], devices=[dev])
            queue = cl.CommandQueue(context, dev)
            buf = cl.Buffer(context, cl.mem_flags.WRITE_ONLY, 4)
            prg.probe(queue, (1,), (1,), buf)
            got = np.zeros(1, np.int32)
            cl.enqueue_copy(queue, got, buf)
            queue.finish()
            found = bool(got[0])
        except cl.Error:
            found = False
        _probes[key] = found
    return found


def _check_int8_dot(int8_dot) -> str:
    if int8_dot is None:
        int8_dot = _INT8_DOT
    if not isinstance(int8_dot, str) or int8_dot not in INT8_DOTS:
        raise InvalidArgument(f"int8_dot: expected one of {INT8_DOTS} or None, got {int8_dot!r}")
    return int8_dot


def _int8_dot_for(dev, variant: str, kvd, head_dim: int, int8_dot, context) -> str:
    """``"integer"`` or ``"float"``: the logits int8 / int4 KV gets (see :func:`int8_dot_for`)."""
    explicit = int8_dot is not None   # the module default applies to int8 and int4 KV only
    int8_dot = _check_int8_dot(int8_dot)
    if kvd.name not in INTEGER_KV:     # the integer path reads integer codes only
        if int8_dot == "integer" and explicit:
            raise InvalidArgument(f"int8_dot: 'integer' needs kv_dtype int8 or int4, got {kvd.name}")
        return "float"
    if kvd.name == "int4" and variant != "serial":   # int4's integer path is the serial kernel's
        if int8_dot == "integer" and explicit:
            raise InvalidArgument(f"int8_dot: 'integer' for int4 KV needs the serial variant, got {variant}")
        return "float"
    if int8_dot == "integer" and head_dim > _INT8_DOT_MAX_HEAD_DIM:
        if not explicit:
            return "float"
        raise InvalidArgument(f"int8_dot: 'integer' supports head_dim <= {_INT8_DOT_MAX_HEAD_DIM} "
                              f"(int32 sums), got {head_dim}")
    if int8_dot != "auto":
        return int8_dot
    # measured faster: the serial variant on x86 PoCL with AVX2 (int8 and int4 B=4 L=2048 decode,
    # see docs/performance.md; int4 where head_dim is a multiple of 32, the vpmaddwd slices);
    # float elsewhere (GPUs, llvmpipe: not measured faster). int4 with 16-bit query codes keeps
    # SmolLM2's pooled perplexity where float logits do (+4.59 % vs +4.44 % over fp32 KV, 0.7
    # standard errors of the paired segments apart; 8-bit codes +5.06 %; docs/formats.md)
    fast = (variant == "serial" and "pocl" in dev.version.lower()
            and bool(dev.type & cl.device_type.CPU) and head_dim % (32 if kvd.name == "int4" else 16) == 0
            and head_dim <= _INT8_DOT_MAX_HEAD_DIM and _x86_int_dot(context, dev))
    return "integer" if fast else "float"


def int8_dot_for(device: cl.Device, *, head_dim: int = 128, kv_dtype="int8", int8_dot=None,
                 variant: str | None = None, context=None) -> str:
    """The logits int8 KV gets on ``device``: ``"integer"`` (the query quantized per token and
    head, integer multiply-adds on the codes) or ``"float"``, for ``int8_dot`` (None: the module
    default, ``"auto"``); ``"float"`` for the other KV dtypes."""
    context = context or cl.Context([device])
    return _int8_dot_for(device, _variant_for(device, variant), _kv_dtype(kv_dtype), head_dim, int8_dot, context)


def _config(context, head_dim: int, block_size: int, group: int, max_q_len: int,
            kvd, int8_mode: int, local_size: int | None = None, variant: str | None = None,
            num_kv_heads: int = 1, device=None, int8_dot=None):
    """(defines, WG, q_tile, HG) for this device and shape; kernels are built (memoized) here.

    ``variant``: ``"serial"`` (one work-item per work-group, the CPU-shaped kernel; the default on
    CPU devices except llvmpipe) or ``"cooperative"`` (WG work-items per tile; the default
    elsewhere), see :func:`_variant_for`. ``int8_dot``: see :func:`~kvcl.ops.decode_attention.paged_attention`.
    """
    dev = device or context.devices[0]
    key = (context.int_ptr, dev.int_ptr, head_dim, block_size, group, max_q_len, kvd.code, int8_mode, local_size,
           variant, num_kv_heads, _SERIAL_MAX_HG, _V_VECTORS, _SERIAL_CHUNK, _SERIAL_K_PREFETCH_RUN, _PREFERRED_WG,
           _GPU_WG, tuple(_GPU_UNROLL.items()), tuple(_GPU_VEC.items()),  # the sweep tool sets these
           int8_dot, _INT8_DOT, _INT8_DOT_BITS)
    found = _configs.get(key)
    if found is not None:
        return found
    variant = _variant_for(dev, variant)
    idot = _int8_dot_for(dev, variant, kvd, head_dim, int8_dot, context)
    gpu = variant == "cooperative" and bool(dev.type & cl.device_type.GPU)  # the per-format GPU layouts
    vec = 8 if head_dim % 8 == 0 else 4
    if gpu:
        want = _GPU_VEC.get(kvd.bytes_per_elem, 8)
        while local_size and want > max(4, local_size):  # WG is a multiple of VEC
            want //= 2
        vec = want if head_dim % want == 0 else vec
    nv = head_dim // vec
    q_tile = 1
    if max_q_len > 1:
        q_tile = min(_next_pow2(max_q_len), max(1, _MAX_ROWS // group))
        q_tile = 1 << (q_tile.bit_length() - 1)  # a power of two: few distinct builds
    base = {"KV_DTYPE": kvd.code, "INT8_MODE": int8_mode, "HEAD_DIM": head_dim,
            "BLOCK_SIZE": block_size, "GROUP": group, "VEC": vec}
    if idot == "integer":
        if _INT8_DOT_BITS not in (8, 16):
            raise InvalidArgument(f"_INT8_DOT_BITS: expected 8 or 16, got {_INT8_DOT_BITS!r}")
        base["INT8_DOT"] = _INT8_DOT_BITS
    if variant == "serial":
        rows = group * q_tile
        # the acc slice of the V phase (rows x SV vectors) should fit the vector registers
        sv = _divisor_at_most(nv, max(1, _SERIAL_ACC_VECTORS // rows))
        # clang target builtins (prefetch, F16C): PoCL compiles OpenCL C natively for the host and
        # lowers them; SPIR-V based compilers (rusticl) abort the whole process on them, so no
        # trial build: only devices whose version string names PoCL get them
        builtins = int("pocl" in dev.version.lower() and bool(dev.type & cl.device_type.CPU))
        # kv heads per work-group: a block's rows of neighbouring heads are adjacent in the pool,
        # so HG heads read HG x BLOCK_SIZE rows in one run instead of one head's BLOCK_SIZE rows
        hg = _divisor_at_most(num_kv_heads, max(1, min(_SERIAL_MAX_HG, _SERIAL_STATE_FLOATS // (rows * head_dim))))
        run = block_size * kvd.row_elems(head_dim) * kvd.bytes_per_elem   # bytes of one head's rows in a block
        defines = dict(base, SERIAL=1, WG=1, ROWS=rows, CT=_SERIAL_CHUNK, SV=sv, CPU_BUILTINS=builtins, HG=hg,
                       PREFETCH_K=int(run <= _SERIAL_K_PREFETCH_RUN))
        get_kernel(context, SOURCE, "paged_decode_attention", defines, dev)
        found = (tuple(sorted(defines.items())), 1, q_tile, hg)
        _configs[key] = found
        return found

    def cv_for(wg):  # head_dim vectors per work-item in the V phase: NV / CV <= WG
        return _divisor_at_least(nv, max(_V_VECTORS if nv % _V_VECTORS == 0 else 1, -(-nv // wg)))

    unit = vec  # WG is a multiple of VEC (the padded chunk must fit the work-group)
    limit = dev.max_work_group_size
    wg = min(local_size or (_GPU_WG if gpu else _PREFERRED_WG), limit)
    wg = max(unit, wg // unit * unit)
    while group * q_tile > wg and q_tile > 1:   # one work-item per row in the softmax phase
        q_tile //= 2
    if group > wg:
        wg = -(-group // unit) * unit
    local_limit = dev.local_mem_size - 1024  # headroom for the implementation's own use
    while True:
        rows = group * q_tile
        chunk = min(wg, wg // block_size * block_size) if block_size <= wg else wg
        if (_local_bytes(rows, head_dim, chunk + vec, kvd.has_scale, idot == "integer") <= local_limit
                or (q_tile == 1 and (wg <= unit or wg // 2 < rows))):
            break
        if q_tile > 1:
            q_tile //= 2
        else:
            wg = max(unit, (wg // 2) // unit * unit)
    while True:
        unroll_k, unroll_v = _GPU_UNROLL.get(kvd.bytes_per_elem, (1, 1)) if gpu else (1, 1)
        defines = dict(base, SERIAL=0, ROWS=group * q_tile, WG=wg, CV=cv_for(wg),
                       UNROLL_K=unroll_k, UNROLL_V=unroll_v)
        kernel = get_kernel(context, SOURCE, "paged_decode_attention", defines, dev)
        kwg = kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, dev)
        smaller = max(unit, min(kwg, wg // 2) // unit * unit)  # register pressure / device limits
        if kwg >= wg or smaller >= wg or smaller < group * q_tile:
            break
        wg = smaller
    if wg > min(limit, kwg):
        raise InvalidArgument(
            f"queries: {group} query heads per kv head need {wg} work-items per group in the "
            f"cooperative kernel; this device/kernel allows {min(limit, kwg)}")
    found = (tuple(sorted(defines.items())), wg, q_tile, 1)
    _configs[key] = found
    return found


def plan(context, *, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
         block_size: int, max_q_len: int, max_kv_len: int, kv_dtype="fp32", int8_mode: int = 0,
         partition_size: int | None = None, local_size: int | None = None,
         variant: str | None = None, device=None, int8_dot=None) -> Plan:
    """The launch layout :func:`~kvcl.ops.decode_attention.paged_attention` uses for these sizes on ``device`` (default:
    ``context``'s first).

    ``variant`` (``"serial"`` / ``"cooperative"``, default by device: serial on CPUs but llvmpipe) and
    ``local_size`` (cooperative only) override the kernel choice, for tests and measurements;
    ``int8_dot`` as in :func:`~kvcl.ops.decode_attention.paged_attention` (the plan's ``int8_dot`` says what it resolved to).

    ``partition_size=None`` picks split-K automatically: none when the
    ``batch · num_kv_heads / kv_heads_per_group · q_tiles`` work-groups already give every
    compute unit 2 (CPU) or 4 (GPU) of them, else partitions of 256–512 tokens (256–2048 with the
    serial variant; a multiple of ``block_size`` when that is at most the cap) enough to fill
    it; at most 256 for 1- and 2-byte formats on GPUs.
    """
    kvd = _kv_dtype(kv_dtype)
    device = device or context.devices[0]
    base = (context.int_ptr, device.int_ptr, batch, num_q_heads, num_kv_heads, head_dim, block_size, max_q_len,
            kvd.code, int8_mode, partition_size, local_size, variant, int8_dot)
    # a decode loop asks once a step, each time a token longer: where the automatic layout is one
    # partition (short contexts, or enough work-groups without split-K), the plan is the same for
    # every length of a bucket (the partition is the length rounded up), so it is memoized per bucket
    knobs = _knobs()
    length = max_kv_len
    if partition_size is None and (max_kv_len <= _PART_MAX or _one_part.get(base) == knobs):
        length = ("bucket", -(-max_kv_len // _ONE_PART_ROUND), max_kv_len <= _PART_MAX)
    key = (base, length)
    found = _plans.get(key)
    if found is not None and found[0] == knobs:
        return found[1]
    p = _plan(context, batch, num_q_heads, num_kv_heads, head_dim, block_size, max_q_len, max_kv_len,
              kvd, int8_mode, partition_size, local_size, variant, device, int8_dot)
    if partition_size is None and p.num_parts == 1 and max_kv_len > _PART_MAX:
        _one_part[base] = knobs   # enough work-groups at this length: at every length (see _plan)
    if len(_plans) >= 256:   # a decode loop over long contexts makes one per step: keep the recent
        _plans.clear()
    _plans[key] = (knobs, p)
    return p


def _knobs() -> tuple:
    """The module's layout settings (tools and tests reassign them): part of a memoized plan."""
    return (_SERIAL_MAX_HG, _SERIAL_STATE_FLOATS, _SERIAL_CHUNK, _SERIAL_K_PREFETCH_RUN, _SERIAL_ACC_VECTORS,
            _SERIAL_PART_MAX, _PREFERRED_WG, _V_VECTORS, _GPU_WG, _GPU_UNROLL, _GPU_VEC, _GPU_PART_MAX, _PART_MIN, _PART_MAX,
            _INT8_DOT, _INT8_DOT_BITS)


def _plan(context, batch, num_q_heads, num_kv_heads, head_dim, block_size, max_q_len, max_kv_len,
          kvd, int8_mode, partition_size, local_size, variant, dev, int8_dot=None) -> Plan:
    group = num_q_heads // num_kv_heads
    defines, wg, q_tile, hg = _config(context, head_dim, block_size, group, max_q_len, kvd, int8_mode,
                                      local_size, variant, num_kv_heads, dev, int8_dot)
    q_tiles = -(-max_q_len // q_tile)
    if partition_size is None:
        per_cu = 2 if work_items_are_threads(dev) else 4
        # a CPU device of one compute unit (PoCL's in-thread companion) runs one work-group at a
        # time: splitting only adds the merge (B=1 Hq=32 Hkv=8 D=128 L=1024 fp32: 243 + 33 µs
        # for two partitions and their merge against 230 for one, PoCL in-thread)
        want = 1 if dev.max_compute_units == 1 and work_items_are_threads(dev) else per_cu * dev.max_compute_units
        groups = batch * (num_kv_heads // hg) * q_tiles
        cap = _PART_MAX
        if wg == 1:                                        # the serial variant
            cap = _SERIAL_PART_MAX
        elif dev.type & cl.device_type.GPU:                # the cooperative variant on a GPU
            cap = _GPU_PART_MAX.get(kvd.bytes_per_elem, _PART_MAX)
        if groups >= want or max_kv_len <= _PART_MAX:
            partition_size = max_kv_len
        else:
            parts = -(-want // groups)
            size = min(max(-(-max_kv_len // parts), _PART_MIN), cap)
            step = block_size if block_size <= cap else 64
            partition_size = -(-size // step) * step
    num_parts = max(1, -(-max_kv_len // partition_size))
    if num_parts == 1:   # any size >= max_kv_len reads the same tokens: one that stays put as
        # max_kv_len grows by a token a step keeps the kernel's arguments unchanged from step to step
        partition_size = -(-max_kv_len // _ONE_PART_ROUND) * _ONE_PART_ROUND
    return Plan(defines, wg, q_tile, q_tiles, int(partition_size), num_parts, hg)
