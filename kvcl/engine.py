"""The cache engine: :class:`PagedKVCache`, kvcl's one paged KV cache.

Per layer it owns two device pools ``[num_blocks, num_kv_heads, block_size, head_dim]``
(K and V) in the chosen storage dtype, plus ``[num_blocks, num_kv_heads, block_size]`` float32
scales for int8. Host bookkeeping (:mod:`kvcl.paging`) decides which slots each token uses;
the kernels (:mod:`kvcl.ops`) write and attend. A step's metadata (slot mapping, page table)
is uploaded once by :meth:`PagedKVCache.plan` and reused by every layer.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Sequence

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from . import archive
from .dtypes import INT8_MODE_AWAY, KvDtype, kv_dtype
from .errors import (
    DeviceMemoryError,
    DtypeError,
    InvalidArgument,
    KvclError,
    NonFiniteError,
    ShapeError,
)
from .ops import blocks as block_ops
from .ops import decode_attention as attention_ops
from .ops import paged_write as write_ops
from .ops import quantize as quantize_ops
from .ops._launch import element_base
from .paging import PagedBookkeeping, StepPlan
from .runtime import Device, resolve_device
from .validate import check_array, check_float, check_int, is_device_array

_ROPE_MODES = ("none", "half", "interleaved")


class StaleStepError(KvclError, ValueError):
    """A :class:`Step` is used after one of its sequences was freed or planned again."""


class Step:
    """One planned step: the slots of the new tokens and the page table after them.

    Made by :meth:`PagedKVCache.plan`; pass it to :meth:`~PagedKVCache.write`,
    :meth:`~PagedKVCache.write_qkv` and :meth:`~PagedKVCache.attend` for every layer.
    The metadata lives on the device once; the host copy is :attr:`plan`.

    Attributes
    ----------
    plan : kvcl.paging.StepPlan
        Host copy: ``slot_mapping``, ``positions``, ``indptr``, ``indices``,
        ``last_page_len``, ``q_indptr``, ``kv_lens``, ``max_q_len``, ``max_kv_len``, ``copies``.
    num_tokens : int
        New tokens in the step (rows of ``keys`` / ``queries``).
    slot_mapping, positions, indptr, indices, last_page_len, q_indptr : pyopencl.array.Array
        The device copies (int32), made on first access: the engine's own calls use the buffers
        beneath them.
    """

    FIELDS = ("slot_mapping", "positions", "indptr", "indices", "last_page_len", "q_indptr")

    def __init__(self, cache: "PagedKVCache", plan: StepPlan, serial: int, buffers: Sequence[cl.Buffer]):
        self.cache, self.plan, self.serial = cache, plan, serial
        self.buffers = dict(zip(self.FIELDS, buffers))   # int32 sub-buffers, each at offset 0
        self._arrays: dict[str, cla.Array] = {}

    def _array(self, name: str) -> cla.Array:
        found = self._arrays.get(name)
        if found is None:
            n = max(1, np.asarray(getattr(self.plan, name)).size)
            found = self._arrays[name] = cla.Array(self.cache.device.queue, (n,), np.int32,
                                                   data=self.buffers[name])
        return found

    slot_mapping = property(lambda self: self._array("slot_mapping"))
    positions = property(lambda self: self._array("positions"))
    indptr = property(lambda self: self._array("indptr"))
    indices = property(lambda self: self._array("indices"))
    last_page_len = property(lambda self: self._array("last_page_len"))
    q_indptr = property(lambda self: self._array("q_indptr"))

    @property
    def num_tokens(self) -> int:
        return int(self.plan.q_indptr[-1])

    @property
    def seq_ids(self) -> list[int]:
        return [int(s) for s in self.plan.seq_ids]


class PagedKVCache:
    """A paged, optionally quantized KV cache for every layer of a decoder, on one device.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        Model shape; ``head_dim`` must be even and a multiple of 4.
    num_blocks : int
        Blocks per layer pool.
    block_size : int
        Token slots per block (default 16).
    dtype : {"fp32", "fp16", "int8", "fp8_e4m3", "fp8_e5m2"}
        Storage of K and V (see :mod:`kvcl.dtypes`). int8 keeps one float32 scale per
        (token, kv head), ``max(absmax / 127, FLT_EPSILON)``, rounding half away from zero.
    device : kvcl.Device or str, optional
        Default: :func:`kvcl.default_device`.
    enable_prefix_caching : bool
        Keep full blocks for reuse by later prompts with the same prefix (default True).

    Examples
    --------
    >>> cache = kvcl.PagedKVCache(num_layers=1, num_kv_heads=2, head_dim=64,
    ...                           num_blocks=64, block_size=16, dtype="int8")   # doctest: +SKIP
    >>> seq = cache.add_sequence()                                              # doctest: +SKIP
    >>> step = cache.plan([seq], [5])                                           # doctest: +SKIP
    >>> cache.write(0, step, keys, values)     # [5, 2, 64] float32 each       # doctest: +SKIP
    >>> out = cache.attend(0, step, queries)   # [5, num_q_heads, 64]          # doctest: +SKIP
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype: "str | KvDtype" = "fp32", *, device: Any = None,
                 enable_prefix_caching: bool = True):
        self.num_layers = check_int("num_layers", num_layers, low=1)
        self.num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
        self.head_dim = check_int("head_dim", head_dim, low=4)
        if self.head_dim % 4:
            raise InvalidArgument(f"head_dim: expected a multiple of 4, got {head_dim}")
        self.num_blocks = check_int("num_blocks", num_blocks, low=1)
        self.block_size = check_int("block_size", block_size, low=1)
        self.dtype = kv_dtype(dtype)
        self.device: Device = resolve_device(device)
        self._book = PagedBookkeeping(self.num_blocks, self.block_size,
                                      enable_prefix_caching=enable_prefix_caching)
        self._lock = threading.RLock()
        self._serial = 0
        self._last_plan: dict[int, int] = {}  # seq id -> serial of the step that last planned it
        self._check_memory()
        queue = self.device.queue
        try:
            self._k = [self._zeros(self._pool_shape, self.dtype.storage) for _ in range(self.num_layers)]
            self._v = [self._zeros(self._pool_shape, self.dtype.storage) for _ in range(self.num_layers)]
            if self.dtype.has_scale:
                self._ks = [self._zeros(self._scale_shape, np.float32) for _ in range(self.num_layers)]
                self._vs = [self._zeros(self._scale_shape, np.float32) for _ in range(self.num_layers)]
            else:
                self._ks = self._vs = [None] * self.num_layers
        except cl.MemoryError as exc:  # pragma: no cover - depends on the device
            raise DeviceMemoryError("the KV pools", self.memory_bytes(), self.device.info.global_mem_bytes) from exc
        self._status = cla.zeros(queue, 1, np.int32)
        self._status_unread = False            # a write was queued since the status was last read
        self._scratch: dict[str, cl.Buffer] = {}   # see _scratch_buffer
        self._workspace: dict[int, cl.Buffer] = {}

    # ---- construction helpers --------------------------------------------------------------

    @property
    def _pool_shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def _scale_shape(self) -> tuple[int, int, int]:
        return (self.num_blocks, self.num_kv_heads, self.block_size)

    def _zeros(self, shape, dtype) -> cla.Array:
        arr = cla.empty(self.device.queue, shape, dtype)
        arr.fill(0)
        return arr

    def _check_memory(self) -> None:
        info = self.device.info
        total = self.memory_bytes()
        pool = int(np.prod(self._pool_shape)) * self.dtype.bytes_per_elem
        if pool > info.max_alloc_bytes:
            raise DeviceMemoryError(f"one layer's K pool ({self.num_blocks} blocks)", pool, info.max_alloc_bytes)
        if total > info.global_mem_bytes:
            raise DeviceMemoryError(f"the KV pools ({self.num_layers} layers x K,V)", total, info.global_mem_bytes)

    # ---- sequences -------------------------------------------------------------------------

    def add_sequence(self, prefix_tokens: "Sequence[int] | None" = None) -> int:
        """Start a sequence; return its id.

        With ``prefix_tokens``, full blocks already cached for that prefix are shared
        (no copy); :meth:`seq_len` then says how many tokens are already cached, and the
        caller plans and writes only the rest.
        """
        with self._lock:
            return self._book.add_sequence(prefix_tokens)

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every block of ``seq_id`` (copy-on-write on the next write)."""
        with self._lock:
            return self._book.fork(seq_id)

    def free(self, seq_id: int) -> None:
        """Release a sequence; its blocks return to the pool (full ones stay reusable as prefix)."""
        with self._lock:
            self._book.free(seq_id)
            self._last_plan.pop(int(seq_id), None)

    def seq_len(self, seq_id: int) -> int:
        """Tokens stored (or reserved by the last :meth:`plan`) for ``seq_id``."""
        with self._lock:
            return self._book.seq_len(seq_id)

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to new tokens (evictable cached prefix blocks included)."""
        with self._lock:
            return self._book.num_free

    @property
    def sequences(self) -> list[int]:
        with self._lock:
            return list(self._book.seq_ids)

    # ---- a step ----------------------------------------------------------------------------

    def plan(self, seq_ids: Sequence[int], num_new_tokens: Sequence[int],
             token_ids: "Sequence[Sequence[int] | None] | None" = None) -> Step:
        """Reserve slots for new tokens of a batch of sequences and upload the step's metadata.

        Parameters
        ----------
        seq_ids : sequence of int, [B]
        num_new_tokens : sequence of int, [B]
            New tokens per sequence (the rows of ``keys``/``queries`` for that sequence).
        token_ids : [B][num_new_tokens[b]] ints, optional
            The new tokens' ids; full blocks then join the prefix index.

        Returns
        -------
        Step
            Reused by :meth:`write` / :meth:`write_qkv` / :meth:`attend` for every layer.

        Raises
        ------
        kvcl.OutOfBlocks
            Not enough free blocks; nothing changed.
        """
        with self._lock:
            plan = self._book.plan(seq_ids, num_new_tokens, token_ids)
            queue = self.device.queue
            if plan.copies:  # copy-on-write: duplicate shared last blocks before any write
                # host ids: copy_blocks validates them on the host and uploads them itself; device
                # ids would be read back (a blocking round trip) by every one of these calls
                src = np.array([c[0] for c in plan.copies], np.int32)
                dst = np.array([c[1] for c in plan.copies], np.int32)
                for layer in range(self.num_layers):
                    for arr in (self._k[layer], self._v[layer], self._ks[layer], self._vs[layer]):
                        if arr is not None:
                            block_ops.copy_blocks(arr, src, dst, queue=queue)
            self._serial += 1
            for s in plan.seq_ids:
                self._last_plan[int(s)] = self._serial

            parts = self._upload_packed([getattr(plan, name) for name in Step.FIELDS])
            return Step(self, plan, self._serial, parts)

    def _upload_packed(self, arrays) -> list[cl.Buffer]:
        """Copy several int32 arrays to the device in ONE buffer; return offset-0 sub-buffers.

        The buffer is filled when it is made (``COPY_HOST_PTR``): no queued command, which on a
        CPU OpenCL device costs ~25 µs each (creating the buffer: ~1 µs). Each part starts on
        the device's base-address alignment, as sub-buffers must.
        """
        align = max(4, self.device.device.mem_base_addr_align // 8) // 4    # in int32 elements
        sizes = [max(1, np.asarray(a).size) for a in arrays]
        starts, total = [], 0
        for n in sizes:
            starts.append(total)
            total += -(-n // align) * align
        host = np.zeros(total, np.int32)
        for a, start in zip(arrays, starts):
            a = np.asarray(a, dtype=np.int32).ravel()
            host[start:start + a.size] = a
        packed = self._host_buffer(host)
        return [packed.get_sub_region(4 * start, 4 * n) for n, start in zip(sizes, starts)]

    def _check_step(self, step: Any) -> Step:
        if not isinstance(step, Step):
            raise DtypeError(f"step: expected a kvcl Step from PagedKVCache.plan, got {type(step).__name__}")
        if step.cache is not self:
            raise InvalidArgument("step: this step was planned on another PagedKVCache")
        for s in step.seq_ids:
            if self._last_plan.get(s) != step.serial:
                raise StaleStepError(
                    f"step: stale: sequence {s} was freed or planned again after this step was made; "
                    "plan a new step")
        return step

    def _check_layer(self, layer: Any) -> int:
        return check_int("layer", layer, low=0, high=self.num_layers)

    def _host_buffer(self, host: np.ndarray) -> cl.Buffer:
        """A read-only device copy of a (validated, non-empty) host array, filled when it is made
        (``COPY_HOST_PTR``): no queued command to wait for or to keep ``host`` alive for. A
        queued copy costs ~25 µs on PoCL and a pyopencl Array ~20 µs; this ~1 µs. The buffer
        lives while a queued kernel uses it (OpenCL retains it)."""
        return cl.Buffer(self.device.context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR,
                         hostbuf=np.ascontiguousarray(host))

    def _input(self, name: str, x: Any, *, whole: bool = False) -> tuple[cl.Buffer, int]:
        """(buffer, element offset of x[0]) of a validated input, host or device: a device array
        must be C-contiguous, and start its buffer when the kernel takes no offset (``whole``)."""
        if not is_device_array(x):
            return self._host_buffer(x), 0
        if not x.flags.c_contiguous:
            raise ShapeError(f"{name}: expected a C-contiguous array, got strides {x.strides}; pass a copy")
        if whole and x.offset:
            raise InvalidArgument(f"{name}: expected an array starting at its buffer's beginning "
                                  f"(offset 0), got a view at offset {x.offset} bytes; pass a copy")
        return x.base_data, element_base(x)

    def _scratch_buffer(self, name: str, nbytes: int) -> cl.Buffer:
        """Scratch for device results within one call ("out": read straight back to the host;
        "q": attend_qkv's queries), reused: every call that fills one ends in a blocking read."""
        buf = self._scratch.get(name)
        if buf is None or buf.size < nbytes:
            buf = self._scratch[name] = cl.Buffer(self.device.context, cl.mem_flags.READ_WRITE, max(nbytes, 64))
        return buf

    def _read_back(self, buf: cl.Buffer, shape) -> np.ndarray:
        """``buf`` as a host array, with the write status when a write was queued since the
        status was last read: the status copy is queued just before the blocking read, so both
        arrive for one round trip (each blocking call costs ~30 µs on PoCL, a queued one ~7)."""
        queue = self.device.queue
        result = np.empty(shape, np.float32)
        status = None
        if self._status_unread:   # a write since the last look: it may have refused rows
            status = np.zeros(1, np.int32)
            cl.enqueue_copy(queue, status, self._status.data, is_blocking=False)
        cl.enqueue_copy(queue, result, buf, is_blocking=True)   # in order: status arrived first
        if status is not None:
            self._status_unread = False
            if status[0]:
                self._refuse_status()
        return result

    def _pools(self, layer: int) -> dict:
        ks, vs = self._ks[layer], self._vs[layer]
        return dict(k_scales=None if ks is None else ks.data, v_scales=None if vs is None else vs.data,
                    kvd=self.dtype, int8_mode=INT8_MODE_AWAY)

    def write(self, layer: int, step: Step, keys: Any, values: Any) -> None:
        """Store the new tokens' K and V of one layer.

        Parameters
        ----------
        layer : int
        step : Step
        keys, values : float32 [step.num_tokens, num_kv_heads, head_dim]
            numpy arrays (checked finite before anything is written) or
            ``pyopencl.array.Array`` on this cache's context (a non-finite row is left
            unwritten and the next synchronising call raises :class:`kvcl.NonFiniteError`).
        """
        with self._lock:
            layer = self._check_layer(layer)
            step = self._check_step(step)
            shape = (step.num_tokens, self.num_kv_heads, self.head_dim)
            check_array("keys", keys, shape=shape, dtype=np.float32, context=self.device.context, finite=True)
            check_array("values", values, shape=shape, dtype=np.float32, context=self.device.context, finite=True)
            if step.num_tokens == 0:
                return
            (kb, k0), (vb, v0) = self._input("keys", keys), self._input("values", values)
            write_ops.launch_kv_buffers(self.device.queue, kb, k0, vb, v0, step.buffers["slot_mapping"],
                                self._k[layer].data, self._v[layer].data, status=self._status.data,
                                num_tokens=step.num_tokens, num_kv_heads=self.num_kv_heads,
                                head_dim=self.head_dim, block_size=self.block_size,
                                num_slots=self.num_blocks * self.block_size, **self._pools(layer))
            self._status_unread = True

    def write_qkv(self, layer: int, step: Step, qkv: Any, *, num_q_heads: int, cos: Any = None,
                  sin: Any = None, q_norm_weight: Any = None, k_norm_weight: Any = None,
                  eps: float = 1e-6, rope: str = "half") -> Any:
        """Fused write: split packed QKV, RMS-norm q/k, apply RoPE, store K/V, return Q.

        Parameters
        ----------
        qkv : float32 [step.num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim]
            All Q heads, then K heads, then V heads of each token.
        num_q_heads : int
            A multiple of ``num_kv_heads``.
        cos, sin : float32 [max_position, head_dim / 2], optional
            RoPE tables, indexed by each token's position in its sequence; required unless
            ``rope="none"``.
        q_norm_weight, k_norm_weight : float32 [head_dim], optional
            RMS-norm weights (``x * rsqrt(mean(x**2) + eps) * w``), applied before RoPE.
        rope : {"half", "interleaved", "none"}
            Half-split (Llama/NeoX) or interleaved pairs (GPT-J).

        Returns
        -------
        float32 [step.num_tokens, num_q_heads, head_dim]
            The normed, rotated queries, of the same kind (numpy / device) as ``qkv``.
        """
        with self._lock:
            _, shape, q_buf, q_out = self._write_qkv(layer, step, qkv, num_q_heads, cos, sin, q_norm_weight,
                                                     k_norm_weight, eps, rope, "out")
            if q_out is not None:
                return q_out
            return np.zeros(shape, np.float32) if q_buf is None else self._read_back(q_buf, shape)

    def attend_qkv(self, layer: int, step: Step, qkv: Any, *, num_q_heads: int, cos: Any = None,
                   sin: Any = None, q_norm_weight: Any = None, k_norm_weight: Any = None,
                   eps: float = 1e-6, rope: str = "half", window: int = 0,
                   scale: "float | None" = None) -> Any:
        """:meth:`write_qkv` then :meth:`attend` with its queries, which stay on the device: one
        round trip to the host where the two calls take two (~30 µs each on PoCL, plus a call's
        bookkeeping). Parameters as there; everything is checked before anything is written.

        Returns
        -------
        float32 [step.num_tokens, num_q_heads, head_dim]
            The attention output, of the same kind (numpy / device) as ``qkv``.
        """
        with self._lock:
            window = check_int("window", window, low=0)
            if scale is not None:
                scale = check_float("scale", scale)
            step, shape, q_buf, q_out = self._write_qkv(layer, step, qkv, num_q_heads, cos, sin, q_norm_weight,
                                                        k_norm_weight, eps, rope, "q")
            if q_buf is None:   # an empty step
                return np.zeros(shape, np.float32) if q_out is None else q_out
            if q_out is None:
                out = None
                out_buf = self._scratch_buffer("out", 4 * math.prod(shape))
            else:
                out = cla.empty(self.device.queue, shape, np.float32)
                out_buf = out.data
            self._launch_attention(int(layer), step, q_buf, shape[1], window, scale, out_buf)
            return self._read_back(out_buf, shape) if out is None else out

    def _write_qkv(self, layer, step, qkv, num_q_heads, cos, sin, q_norm_weight, k_norm_weight, eps, rope,
                   scratch: str):
        """Check everything, then launch the fused write. Returns (the checked step, q's shape,
        q's buffer: None for an empty step, q as a device Array: None for host input, whose q
        is in the ``scratch`` buffer)."""
        layer = self._check_layer(layer)
        step = self._check_step(step)
        num_q_heads = check_int("num_q_heads", num_q_heads, low=1)
        if num_q_heads % self.num_kv_heads:
            raise InvalidArgument(f"num_q_heads: expected a multiple of num_kv_heads={self.num_kv_heads}, got {num_q_heads}")
        if rope not in _ROPE_MODES:
            raise InvalidArgument(f"rope: expected one of {', '.join(_ROPE_MODES)}, got {rope!r}")
        eps = check_float("eps", eps)
        width = (num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        check_array("qkv", qkv, shape=(step.num_tokens, width), dtype=np.float32,
                    context=self.device.context, finite=True)
        max_pos = step.plan.max_kv_len
        tables = {}
        for name, t in (("cos", cos), ("sin", sin)):
            if rope == "none":
                tables[name] = None
                continue
            if t is None:
                raise InvalidArgument(f"{name}: required for rope={rope!r}")
            check_array(name, t, shape=(None, self.head_dim // 2), dtype=np.float32,
                        context=self.device.context, finite=True)
            if t.shape[0] < max_pos:
                raise ShapeError(f"{name}: expected at least {max_pos} rows (the longest sequence "
                                 f"in this step), got {t.shape[0]}")
            tables[name] = t
        weights = {}
        for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            if w is not None:
                check_array(name, w, shape=(self.head_dim,), dtype=np.float32,
                            context=self.device.context, finite=True)
            weights[name] = w
        queue = self.device.queue
        host_out = not is_device_array(qkv)
        shape = (step.num_tokens, num_q_heads, self.head_dim)
        if step.num_tokens == 0:
            return step, shape, None, None if host_out else cla.empty(queue, shape, np.float32)
        qb, q0 = self._input("qkv", qkv)
        extra = {name: None if value is None else self._input(name, value, whole=True)[0]
                 for name, value in (*tables.items(), *weights.items())}
        q_out = None
        if host_out:
            q_buf = self._scratch_buffer(scratch, 4 * math.prod(shape))
        else:
            q_out = cla.empty(queue, shape, np.float32)
            q_buf = q_out.data
        write_ops.launch_qkv_buffers(
            queue, qb, q0, step.buffers["slot_mapping"], step.buffers["positions"],
            self._k[layer].data, self._v[layer].data, q_buf, cos=extra["cos"], sin=extra["sin"],
            q_norm_weight=extra["q_norm_weight"], k_norm_weight=extra["k_norm_weight"],
            status=self._status.data, num_tokens=step.num_tokens, num_q_heads=num_q_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, block_size=self.block_size,
            num_slots=self.num_blocks * self.block_size,
            max_position=0 if tables["cos"] is None else int(tables["cos"].shape[0]),
            eps=eps, rope=rope, **self._pools(layer))
        self._status_unread = True
        return step, shape, q_buf, q_out

    def attend(self, layer: int, step: Step, queries: Any, *, window: int = 0,
               scale: "float | None" = None) -> Any:
        """Attention of the step's new tokens over their sequences' cached K/V (one launch).

        Each sequence's new tokens see every earlier token and themselves (bottom-right
        causal mask), within the last ``window`` positions when ``window > 0``.

        Parameters
        ----------
        queries : float32 [step.num_tokens, num_q_heads, head_dim]
            ``num_q_heads`` a multiple of ``num_kv_heads`` (GQA).
        window : int
            Sliding-window size in tokens; 0 = unlimited.
        scale : float, optional
            Logit scale, default ``1 / sqrt(head_dim)``.

        Returns
        -------
        float32 [step.num_tokens, num_q_heads, head_dim]
            Of the same kind (numpy / device array) as ``queries``.
        """
        with self._lock:
            layer = self._check_layer(layer)
            step = self._check_step(step)
            check_array("queries", queries, shape=(step.num_tokens, None, self.head_dim),
                        dtype=np.float32, context=self.device.context, finite=True)
            num_q_heads = queries.shape[1]
            if num_q_heads == 0 or num_q_heads % self.num_kv_heads:
                raise ShapeError(f"queries: expected a number of heads that is a multiple of "
                                 f"num_kv_heads={self.num_kv_heads}, got {num_q_heads}")
            window = check_int("window", window, low=0)
            if scale is not None:
                scale = check_float("scale", scale)
            queue = self.device.queue
            host_out = not is_device_array(queries)
            if step.num_tokens == 0:
                empty = np.zeros(queries.shape, np.float32)
                return empty if host_out else cla.to_device(queue, empty)
            qb, _ = self._input("queries", queries, whole=True)
            if host_out:
                out_buf = self._scratch_buffer("out", 4 * math.prod(queries.shape))
            else:
                out = cla.empty(queue, queries.shape, np.float32)
                out_buf = out.data
            self._launch_attention(layer, step, qb, num_q_heads, window, scale, out_buf)
            return self._read_back(out_buf, queries.shape) if host_out else out

    def _launch_attention(self, layer: int, step: Step, queries: cl.Buffer, num_q_heads: int, window: int,
                          scale: "float | None", out: cl.Buffer) -> None:
        attention_ops.launch_buffers(
            self.device.queue, queries, self._k[layer].data, self._v[layer].data, indptr=step.buffers["indptr"],
            indices=step.buffers["indices"], last_page_len=step.buffers["last_page_len"],
            q_indptr=step.buffers["q_indptr"], out=out, total_q=step.num_tokens,
            num_q_heads=num_q_heads, head_dim=self.head_dim, batch=len(step.plan.seq_ids),
            num_kv_heads=self.num_kv_heads, block_size=self.block_size, scale=scale,
            window=window, max_q_len=step.plan.max_q_len, max_kv_len=step.plan.max_kv_len,
            **self._pools(layer))

    # ---- errors recorded on the device -----------------------------------------------------

    def _raise_status(self) -> None:
        self._status_unread = False
        if int(self._status.get()[0]):
            self._refuse_status()

    def _refuse_status(self) -> None:
        self._status.fill(0)
        raise NonFiniteError(
            "keys/values: a device-array write held NaN or Inf; those rows were not written "
            "(the cache kept their previous contents)")

    def synchronize(self) -> None:
        """Wait for queued work; raise any error the kernels recorded since the last check."""
        with self._lock:
            self.device.queue.finish()
            self._raise_status()

    # ---- reading back ----------------------------------------------------------------------

    def read(self, layer: int, seq_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored K and V of one sequence, dequantised by the kernels.

        Returns
        -------
        (k, v) : float32 numpy arrays [seq_len, num_kv_heads, head_dim]
        """
        with self._lock:
            layer = self._check_layer(layer)
            length = self._book.seq_len(seq_id)
            blocks = self._book.block_ids(seq_id)
            self._raise_status()
            shape = (length, self.num_kv_heads, self.head_dim)
            if length == 0:
                return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            queue = self.device.queue
            ids = np.asarray(blocks, np.int32)    # host ids: validated and uploaded by the op
            n = len(blocks)
            result = []
            for pool, scales in ((self._k[layer], self._ks[layer]), (self._v[layer], self._vs[layer])):
                staged = cla.empty(queue, (n, self.num_kv_heads, self.block_size, self.head_dim), pool.dtype)
                block_ops.extract_blocks(pool, ids, staged, queue=queue)
                staged_scales = None
                if scales is not None:
                    staged_scales = cla.empty(queue, (n, self.num_kv_heads, self.block_size), np.float32)
                    block_ops.extract_blocks(scales, ids, staged_scales, queue=queue)
                rows = n * self.num_kv_heads * self.block_size
                decoded = cla.empty(queue, (rows, self.head_dim), np.float32)
                quantize_ops.dequantize_rows(
                    staged.reshape(rows, self.head_dim), decoded,
                    scales=None if staged_scales is None else staged_scales.reshape(rows),
                    kv_dtype=self.dtype.name, int8_mode=INT8_MODE_AWAY, queue=queue)
                host = decoded.get().reshape(n, self.num_kv_heads, self.block_size, self.head_dim)
                host = host.transpose(0, 2, 1, 3).reshape(n * self.block_size, self.num_kv_heads, self.head_dim)
                result.append(np.ascontiguousarray(host[:length]))
            return result[0], result[1]

    # ---- accounting ------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Device bytes held by the K/V pools and scales of every layer."""
        elems = self.num_blocks * self.num_kv_heads * self.block_size
        per_layer = 2 * elems * self.head_dim * self.dtype.bytes_per_elem
        if self.dtype.has_scale:
            per_layer += 2 * elems * 4
        return self.num_layers * per_layer

    def stats(self) -> dict:
        """Counters: blocks, sequences, tokens, prefix hits/misses/evictions, bytes."""
        with self._lock:
            book = self._book.stats()
            return {
                "dtype": self.dtype.name,
                "num_layers": self.num_layers,
                "block_size": self.block_size,
                "memory_bytes": self.memory_bytes(),
                "bytes_per_token": self.num_layers * 2 * self.num_kv_heads * self.dtype.row_bytes(self.head_dim),
                **book,
            }

    def __repr__(self) -> str:
        return (f"<PagedKVCache {self.num_layers} layers x {self.num_kv_heads} kv heads x {self.head_dim}, "
                f"{self.num_blocks} blocks of {self.block_size}, {self.dtype.name}, "
                f"{self.num_free_blocks} free, on {self.device.info.name}>")

    # ---- persistence -----------------------------------------------------------------------

    def _config(self) -> dict:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "num_blocks": self.num_blocks,
                "block_size": self.block_size, "dtype": self.dtype.name,
                "enable_prefix_caching": self._book.prefix_index is not None}

    def save(self, path) -> int:
        """Write config, bookkeeping and every pool to ``path`` (atomic); return its size.

        The format is documented in :mod:`kvcl.archive`; :meth:`load` restores it bit-exactly.
        """
        with self._lock:
            self.synchronize()
            arrays = {}
            for layer in range(self.num_layers):
                arrays[f"k.{layer}"] = self._k[layer].get()
                arrays[f"v.{layer}"] = self._v[layer].get()
                if self.dtype.has_scale:
                    arrays[f"k_scale.{layer}"] = self._ks[layer].get()
                    arrays[f"v_scale.{layer}"] = self._vs[layer].get()
            meta = {"kind": "kvcl.PagedKVCache", "config": self._config(),
                    "bookkeeping": self._book.state_dict()}
            return archive.write_archive(path, meta, arrays)

    @classmethod
    def load(cls, path, device: Any = None) -> "PagedKVCache":
        """Rebuild a cache saved by :meth:`save`; a damaged file raises before anything is built."""
        meta, arrays = archive.read_archive(path)
        if meta.get("kind") != "kvcl.PagedKVCache":
            raise archive.ArchiveError(f"{path}: holds {meta.get('kind')!r}, not a kvcl.PagedKVCache")
        cfg = meta["config"]
        dt = kv_dtype(cfg["dtype"])
        pool_shape = [cfg["num_blocks"], cfg["num_kv_heads"], cfg["block_size"], cfg["head_dim"]]
        expected = {}
        for layer in range(cfg["num_layers"]):
            expected[f"k.{layer}"] = (dt.storage, pool_shape)
            expected[f"v.{layer}"] = (dt.storage, pool_shape)
            if dt.has_scale:
                expected[f"k_scale.{layer}"] = (np.dtype(np.float32), pool_shape[:3])
                expected[f"v_scale.{layer}"] = (np.dtype(np.float32), pool_shape[:3])
        if set(arrays) != set(expected):
            raise archive.ArchiveError(f"{path}: arrays {sorted(arrays)} do not match the config (expected {sorted(expected)})")
        for name, (dtype, shape) in expected.items():
            if arrays[name].dtype != dtype or list(arrays[name].shape) != list(shape):
                raise archive.ArchiveError(
                    f"{path}: array {name!r} is {arrays[name].dtype} {list(arrays[name].shape)}, "
                    f"the config ({dt.name}) needs {np.dtype(dtype)} {shape}")
        try:
            book = PagedBookkeeping.from_state_dict(meta["bookkeeping"])
        except Exception as exc:
            raise archive.ArchiveError(f"{path}: bookkeeping is inconsistent: {exc}") from None
        cache = cls(cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"], cfg["num_blocks"],
                    cfg["block_size"], dt, device=device,
                    enable_prefix_caching=cfg.get("enable_prefix_caching", True))
        cache._book = book
        queue = cache.device.queue
        for layer in range(cache.num_layers):
            cache._k[layer].set(arrays[f"k.{layer}"], queue=queue)
            cache._v[layer].set(arrays[f"v.{layer}"], queue=queue)
            if dt.has_scale:
                cache._ks[layer].set(arrays[f"k_scale.{layer}"], queue=queue)
                cache._vs[layer].set(arrays[f"v_scale.{layer}"], queue=queue)
        queue.finish()
        return cache

    # ---- test support ----------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Bookkeeping plus the bytes of every device pool (for byte-identity checks)."""
        with self._lock:
            self.device.queue.finish()
            snap = {"bookkeeping": self._book.state_dict()}
            for layer in range(self.num_layers):
                for name, arr in (("k", self._k[layer]), ("v", self._v[layer]),
                                  ("ks", self._ks[layer]), ("vs", self._vs[layer])):
                    if arr is not None:
                        snap[f"{name}.{layer}"] = arr.get().tobytes()
            return snap
