"""The cache engine: :class:`PagedKVCache`, kvcl's one paged KV cache.

Per layer it owns two device pools ``[num_blocks, num_kv_heads, block_size, head_dim]``
(K and V; int4: ``head_dim / 2`` bytes a row) in the chosen storage dtype, plus
``[num_blocks, num_kv_heads, block_size]`` float32 scales for int8 and int4. Host bookkeeping
(:mod:`kvcl.paging`) decides which slots each token uses;
the kernels (:mod:`kvcl.ops`) write and attend. A step's metadata (slot mapping, page table)
is uploaded once by :meth:`~kvcl.engine.PagedKVCache.plan` and reused by every layer.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .dtypes import INT8_MODE_AWAY, KvDtype, kv_dtype
from .errors import (
    DtypeError,
    InvalidArgument,
    NonFiniteError,
    ShapeError,
)
from .ops import blocks as block_ops
from .ops import decode_attention as attention_ops
from .ops import paged_write as write_ops
from .ops import quantize as quantize_ops
from .ops import write_checks as checks
from .ops._launch import element_base, read_host, to_host
from .paging import PagedBookkeeping, StepPlan
from .runtime import Device, resolve_device
from .step import StaleStepError, Step, inline_max_work
from .validate import check_array, check_float, check_int, check_int4_range, is_device_array

if TYPE_CHECKING:  # pragma: no cover
    from .stepcalls import StepCalls

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
    dtype : {"fp32", "fp16", "int8", "fp8_e4m3", "fp8_e5m2", "int4"}
        Storage of K and V (see :mod:`kvcl.dtypes`). int8 keeps one float32 scale per
        (token, kv head), ``max(absmax / 127, FLT_EPSILON)``, rounding half away from zero;
        int4 rotates each row by a Hadamard matrix and packs two codes 0..15 a byte, its
        float16 scale and minimum in the row's 4-byte scale slot.
    device : kvcl.Device or str, optional
        Default: :func:`kvcl.default_device`.
    enable_prefix_caching : bool
        Keep full blocks for reuse by later prompts with the same prefix (default True).

    Attributes
    ----------
    inline_max_work : int
        A step whose attention reads at most this many K/V elements per layer (cached tokens x
        query tokens x 2 x num_kv_heads x head_dim, summed over the step's sequences) runs on
        the device's in-thread companion when it has one (``kvcl.Device.inline_queue``:
        PoCL), where a blocking call costs ~2 µs instead of 35-70 µs, on one core; 0 turns
        that off. Default: :func:`inline_max_work` of the device.

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
        self._k = self._new_pools(self._pool_shape, self.dtype.storage, "K pool")
        self._v = self._new_pools(self._pool_shape, self.dtype.storage, "V pool")
        if self.dtype.has_scale:
            self._ks = self._new_pools(self._scale_shape, np.float32, "K scales")
            self._vs = self._new_pools(self._scale_shape, np.float32, "V scales")
        else:
            self._ks = self._vs = [None] * self.num_layers
        # the kernels' error bits; where host memory is device memory (PoCL), in a host array
        # of its own that a finished call reads directly (_read_shared)
        self._status_host = None
        if self.device.host_shared:
            self._status_host, buf = self.device.shared_array((1,), np.int32, what="the write status")
            self._status = cla.Array(queue, (1,), np.int32, data=buf)
        else:
            self._status = cla.zeros(queue, 1, np.int32)
        self._status_unread = False            # a write was queued since the status was last read
        self._scratch: dict[str, cl.Buffer] = {}   # see _scratch_buffer
        self._fresh: dict = {}   # int4: layer -> (step, K, V buffers) of its last write (_fresh_kv)
        self.inline_max_work = inline_max_work(self.device.info.compute_units)
        self._last_queue = queue    # the queue that got work last (see _use)
        self._epoch = 0             # bumped by plan / free: a StepCalls re-checks its step then
        # sub-buffer alignment of the step uploads, in int32 elements (a device query costs ~2 µs)
        self._align = max(4, self.device.device.mem_base_addr_align // 8) // 4

    # ---- construction helpers --------------------------------------------------------------

    @property
    def _pool_shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.num_kv_heads, self.block_size, self.dtype.row_elems(self.head_dim))

    @property
    def _scale_shape(self) -> tuple[int, int, int]:
        return (self.num_blocks, self.num_kv_heads, self.block_size)

    def _check_memory(self) -> None:
        """Refuse pools the device cannot hold before allocating any (:meth:`kvcl.Device.check_alloc`)."""
        pool = int(np.prod(self._pool_shape)) * self.dtype.bytes_per_elem
        self.device.check_alloc(f"one layer's K pool ({self.num_blocks} blocks)", pool)
        self.device.check_alloc(f"the KV pools ({self.num_layers} layers x K,V)", pool, total=self.memory_bytes())

    def _new_pools(self, shape, dtype, name: str) -> list:
        """One zeroed device array per layer (checked by :meth:`_check_memory` first)."""
        return [self.device.alloc(shape, dtype, what=f"layer {layer}'s {name}", zero=True)
                for layer in range(self.num_layers)]

    def _use(self, queue: cl.CommandQueue) -> cl.CommandQueue:
        """``queue``, once the other queue's work is done: the device's queue and its inline
        companion share the pools, and OpenCL orders nothing across queues (call with the lock)."""
        last = self._last_queue
        if last is not queue:
            last.finish()
            self._last_queue = queue
        return queue

    def _main(self) -> cl.CommandQueue:
        return self._use(self.device.queue)

    def _step_queue(self, plan: StepPlan) -> cl.CommandQueue:
        inline = self.device.inline_queue
        if inline is None or not self.inline_max_work:
            return self.device.queue
        q = plan.q_indptr.tolist()
        work = sum(kv * (q[i + 1] - q[i]) for i, kv in enumerate(plan.kv_lens.tolist()))
        work *= 2 * self.num_kv_heads * self.head_dim
        return inline if work <= self.inline_max_work else self.device.queue

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
            self._epoch += 1

    def seq_len(self, seq_id: int) -> int:
        """Tokens stored (or reserved by the last :meth:`plan`) for ``seq_id``."""
        with self._lock:
            return self._book.seq_len(seq_id)

    def blocks_needed(self, seq_ids: Sequence[int], num_new_tokens: Sequence[int]) -> int:
        """Blocks :meth:`plan` would take for this batch (a scheduler compares it with
        :attr:`num_free_blocks`); validates like :meth:`plan`, changes nothing."""
        with self._lock:
            return self._book.blocks_needed(seq_ids, num_new_tokens)

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
            queue = self._main()
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
            self._epoch += 1
            for s in plan.seq_ids:
                self._last_plan[int(s)] = self._serial

            # the metadata is uploaded when a call first reads it (Step.buffers), not here
            return Step(self, plan, self._serial, None, self._step_queue(plan))

    def _upload_packed(self, arrays) -> list[cl.Buffer]:
        """Copy several int32 arrays to the device in ONE buffer; return offset-0 sub-buffers.

        The buffer is filled when it is made (``COPY_HOST_PTR``): no queued command, which on a
        CPU OpenCL device costs ~25 µs each (creating the buffer: ~1 µs). Each part starts on
        the device's base-address alignment, as sub-buffers must.
        """
        align = self._align
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

    def step_calls(self, step: Step, *, num_q_heads: int, rope: str = "none", cos: Any = None,
                   sin: Any = None, q_norm_weight: Any = None, k_norm_weight: Any = None,
                   eps: float = 1e-6, window: int = 0, scale: "float | None" = None) -> "StepCalls":
        """The per-layer calls of ``step`` with every argument but each layer's inputs checked
        once (:class:`kvcl.stepcalls.StepCalls`): ``calls.attend_qkv(layer, qkv)`` and
        ``calls.write_attend(layer, keys, values, queries)``, bit-identical to
        :meth:`attend_qkv` and to :meth:`write` + :meth:`attend` on numpy inputs, at a fraction
        of their per-call cost (the ONNX bridge's path)."""
        from .stepcalls import StepCalls
        return StepCalls(self, step, num_q_heads=num_q_heads, rope=rope, cos=cos, sin=sin,
                         q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, eps=eps,
                         window=window, scale=scale)

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

    def _read_back(self, buf: cl.Buffer, shape, queue: cl.CommandQueue, result: "np.ndarray | None" = None) -> np.ndarray:
        """``buf`` as a host array, with the write status when a write was queued since the
        status was last read: the status copy is queued just before the blocking read, so both
        arrive for one round trip (each blocking call costs ~30 µs on PoCL, a queued one ~7)."""
        if result is None:
            result = np.empty(shape, np.float32)
        status = None
        if self._status_unread:   # a write since the last look: it may have refused rows
            status = np.zeros(1, np.int32)
            cl.enqueue_copy(queue, status, self._status.data, is_blocking=False)
        read_host(queue, result, buf)   # in order: the status arrived first
        if status is not None:
            self._status_unread = False
            if status[0]:
                self._refuse_status()
        return result

    def _read_shared(self, host: np.ndarray, queue: cl.CommandQueue, result: "np.ndarray | None" = None) -> np.ndarray:
        """``host`` (a :meth:`~kvcl.runtime.Device.shared_array` a kernel queued on ``queue``
        fills) once ``queue`` finished, copied into ``result`` when given, with the write status
        read from its own host array: no read command (a blocking read costs 25-55 µs on PoCL's
        in-thread device when a model's matmuls evicted the caches in between, a finish ~1)."""
        queue.finish()
        if self._status_unread:   # a write since the last look: it may have refused rows
            self._status_unread = False
            if self._status_host[0]:
                self._refuse_status()
        if result is None:
            return host
        np.copyto(result, host)
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
            numpy arrays (checked finite, and for int4 within its range, before anything is
            written) or ``pyopencl.array.Array`` on this cache's context (a non-finite or, int4,
            out-of-range row is left unwritten and the next synchronising call raises
            :class:`kvcl.NonFiniteError`).
        """
        with self._lock:
            layer = self._check_layer(layer)
            step = self._check_step(step)
            shape = (step.num_tokens, self.num_kv_heads, self.head_dim)
            check_array("keys", keys, shape=shape, dtype=np.float32, context=self.device.context, finite=True)
            check_array("values", values, shape=shape, dtype=np.float32, context=self.device.context, finite=True)
            if self.dtype.codes_per_elem > 1:
                check_int4_range("keys", keys)
                check_int4_range("values", values)
            if step.num_tokens == 0:
                return
            (kb, k0), (vb, v0) = self._input("keys", keys), self._input("values", values)
            if self.dtype.name == "int4":   # attend() reads the step's own tokens from these
                self._fresh[layer] = (step, kb, vb) if k0 == 0 and v0 == 0 else None
            on_device = is_device_array(keys) or is_device_array(values)   # made on the device's queue
            write_ops.launch_kv_buffers(self._use(self.device.queue if on_device else step.queue), kb, k0, vb, v0, step.buffers["slot_mapping"],
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
            return np.zeros(shape, np.float32) if q_buf is None else self._read_back(q_buf, shape, step.queue)

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
            if out is None:
                return self._read_back(out_buf, shape, step.queue)
            self._main()    # a device result is used on the device's queue
            return out

    def _write_qkv(self, layer, step, qkv, num_q_heads, cos, sin, q_norm_weight, k_norm_weight, eps, rope,
                   scratch: str):
        """Check everything, then launch the fused write. Returns (the checked step, q's shape,
        q's buffer: None for an empty step, q as a device Array: None for host input, whose q
        is in the ``scratch`` buffer)."""
        layer = self._check_layer(layer)
        step = self._check_step(step)
        num_q_heads = checks.check_q_heads(num_q_heads, self.num_kv_heads)
        rope = checks.check_rope(rope)
        eps = check_float("eps", eps)
        context = self.device.context
        width = checks.qkv_width(num_q_heads, self.num_kv_heads, self.head_dim)
        check_array("qkv", qkv, shape=(step.num_tokens, width), dtype=np.float32, context=context, finite=True)
        tables = checks.check_rope_tables(cos, sin, rope=rope, head_dim=self.head_dim, context=context,
                                          rows=step.plan.max_kv_len, why="the longest sequence in this step")
        weights = checks.check_norm_weights(q_norm_weight, k_norm_weight, head_dim=self.head_dim, context=context)
        host_out = not is_device_array(qkv)
        shape = (step.num_tokens, num_q_heads, self.head_dim)
        if step.num_tokens == 0:
            return step, shape, None, None if host_out else cla.empty(self.device.queue, shape, np.float32)
        # device inputs were made on the device's queue: run the step there (no inline handoff)
        queue = self._use(step.queue if host_out else self.device.queue)
        qb, q0 = self._input("qkv", qkv)
        extra = {name: None if value is None else self._input(name, value, whole=True)[0]
                 for name, value in (*tables.items(), *weights.items())}
        q_out = None
        if host_out:
            q_buf = self._scratch_buffer(scratch, 4 * math.prod(shape))
        else:
            q_out = cla.empty(self.device.queue, shape, np.float32)
            q_buf = q_out.data
        self._fresh.pop(layer, None)   # the fused write keeps no float32 K/V: attend reads the cache
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

        int4: each query row reads its own token from the float32 K/V the step's
        :meth:`write` of this layer was given (numpy, or device arrays starting their buffer),
        every other token from the cache (docs: formats).
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
            host_out = not is_device_array(queries)
            if step.num_tokens == 0:
                empty = np.zeros(queries.shape, np.float32)
                return empty if host_out else cla.to_device(self._main(), empty)
            qb, _ = self._input("queries", queries, whole=True)
            if host_out:
                out_buf = self._scratch_buffer("out", 4 * math.prod(queries.shape))
                self._launch_attention(layer, step, qb, num_q_heads, window, scale, out_buf, step.queue)
                return self._read_back(out_buf, queries.shape, step.queue)
            out = cla.empty(self.device.queue, queries.shape, np.float32)
            self._launch_attention(layer, step, qb, num_q_heads, window, scale, out.data, self.device.queue)
            return out

    def _launch_attention(self, layer: int, step: Step, queries: cl.Buffer, num_q_heads: int, window: int,
                          scale: "float | None", out: cl.Buffer, queue: "cl.CommandQueue | None" = None) -> None:
        """Enqueue the decode kernel on ``queue`` (default: the queue the write before it used)."""
        attention_ops.launch_buffers(
            self._use(queue or self._last_queue), queries, self._k[layer].data, self._v[layer].data, indptr=step.buffers["indptr"],
            indices=step.buffers["indices"], last_page_len=step.buffers["last_page_len"],
            q_indptr=step.buffers["q_indptr"], out=out, total_q=step.num_tokens,
            num_q_heads=num_q_heads, head_dim=self.head_dim, batch=len(step.plan.seq_ids),
            num_kv_heads=self.num_kv_heads, block_size=self.block_size, scale=scale,
            window=window, max_q_len=step.plan.max_q_len, max_kv_len=step.plan.max_kv_len,
            fresh=self._fresh_kv(layer, step), **self._pools(layer))

    def _fresh_kv(self, layer: int, step: Step) -> "tuple | None":
        """int4: the float32 K/V buffers this step's write of ``layer`` was given (attention reads
        the step's own tokens from them, the earlier ones from the cache), else None."""
        found = self._fresh.get(layer)
        if found is None or found[0] is not step:
            return None
        return found[1], found[2]

    # ---- errors recorded on the device -----------------------------------------------------

    def _raise_status(self) -> None:
        self._main()
        self._status_unread = False
        if int(to_host(self._status)[0]):
            self._refuse_status()

    def _refuse_status(self) -> None:
        self._main()
        self._status.fill(0)
        if self._status_host is not None:   # read by the host next (_read_shared): done by then
            self._main().finish()
        raise NonFiniteError(
            "keys/values: a device-array write held NaN or Inf (int4: or a rotated value beyond "
            "±65504); those rows were not written (the cache kept their previous contents)")

    def synchronize(self) -> None:
        """Wait for queued work; raise any error the kernels recorded since the last check."""
        with self._lock:
            self._main().finish()
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
            queue = self._main()
            ids = np.asarray(blocks, np.int32)    # host ids: validated and uploaded by the op
            n = len(blocks)
            result = []
            for pool, scales in ((self._k[layer], self._ks[layer]), (self._v[layer], self._vs[layer])):
                staged = cla.empty(queue, (n,) + self._pool_shape[1:], pool.dtype)
                block_ops.extract_blocks(pool, ids, staged, queue=queue)
                staged_scales = None
                if scales is not None:
                    staged_scales = cla.empty(queue, (n, self.num_kv_heads, self.block_size), np.float32)
                    block_ops.extract_blocks(scales, ids, staged_scales, queue=queue)
                rows = n * self.num_kv_heads * self.block_size
                decoded = cla.empty(queue, (rows, self.head_dim), np.float32)
                quantize_ops.dequantize_rows(
                    staged.reshape(rows, self._pool_shape[3]), decoded,
                    scales=None if staged_scales is None else staged_scales.reshape(rows),
                    kv_dtype=self.dtype.name, int8_mode=INT8_MODE_AWAY, queue=queue)
                host = to_host(decoded).reshape(n, self.num_kv_heads, self.block_size, self.head_dim)
                host = host.transpose(0, 2, 1, 3).reshape(n * self.block_size, self.num_kv_heads, self.head_dim)
                result.append(np.ascontiguousarray(host[:length]))
            return result[0], result[1]

    # ---- accounting ------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Device bytes held by the K/V pools and scales of every layer."""
        elems = self.num_blocks * self.num_kv_heads * self.block_size
        return self.num_layers * 2 * elems * self.dtype.row_bytes(self.head_dim)

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

    # ---- persistence (kvcl.persist) ---------------------------------------------------------

    def save(self, path) -> int:
        """Write config, bookkeeping and every pool to ``path`` (atomic); return its size.

        The format is documented in :mod:`kvcl.archive`; :meth:`load` restores it bit-exactly.
        """
        from .persist import save_cache
        with self._lock:
            return save_cache(self, path)

    @classmethod
    def load(cls, path, device: Any = None) -> "PagedKVCache":
        """Rebuild a cache saved by :meth:`save`; a damaged file raises before anything is built."""
        from .persist import load_cache
        return load_cache(cls, path, device)

    # ---- test support ----------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Bookkeeping plus the bytes of every device pool (for byte-identity checks)."""
        with self._lock:
            self._main().finish()
            snap = {"bookkeeping": self._book.state_dict()}
            for layer in range(self.num_layers):
                for name, arr in (("k", self._k[layer]), ("v", self._v[layer]),
                                  ("ks", self._ks[layer]), ("vs", self._vs[layer])):
                    if arr is not None:
                        snap[f"{name}.{layer}"] = to_host(arr).tobytes()
            return snap
