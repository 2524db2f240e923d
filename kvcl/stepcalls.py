"""A planned step's per-layer calls, checked once per step: the engine's hot path for models.

A decoder calls the cache once per layer and step with the same step, the same heads, RoPE
tables and scale: only the layer index and that layer's new rows change. :class:`StepCalls`
checks everything else once, when it is made, and keeps each layer's kernel launches ready
(``kvcl.ops._launch.Launch``), so that a call costs what varies: the layer index, the
inputs' shape, dtype and finiteness, their upload, two enqueues and one blocking read.

Per step, :meth:`~kvcl.stepcalls.StepCalls.rebind` with ``prepare=True`` (what the ONNX bridge does before the
model runs) readies every layer at once: each layer's launches run on kernel objects of this
object's own, their arguments set then, so that a layer's call sets only its input buffers and
enqueues. Layer 0's argument changes since the last step are carried to the other layers
(their launches differ from layer 0's only in the pools). The step's tables (slots, page table)
are copied into a buffer of this object's own and the last step's launches are kept, so that a
decode step after another, which differs only in its lengths, changes no argument at all.

Results are bit-identical to :meth:`~kvcl.engine.PagedKVCache.attend_qkv` and to :meth:`~kvcl.engine.PagedKVCache.write`
then :meth:`~kvcl.engine.PagedKVCache.attend` (same kernels, same launch layout, same arguments). A call
refused for bad input changes nothing. Made by :meth:`~kvcl.engine.PagedKVCache.step_calls`; it stays
valid while its step does (a step is stale once one of its sequences is freed or planned
again: the call then raises :class:`kvcl.step.StaleStepError`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pyopencl as cl

from .dtypes import INT8_MODE_AWAY
from .errors import InvalidArgument, ShapeError
from .ops import decode_attention as attention_ops
from .ops import paged_write as write_ops
from .ops import write_checks as checks
from .ops._launch import same_scalar, sequence_lock, set_arg
from .step import Step
from .validate import check_array, check_float, check_int, check_int4_range, is_device_array

__all__ = ["StepCalls"]

_F32 = np.dtype(np.float32)
_RO_COPY = cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR
_UNSET = object()
# the arguments in which a layer's launches differ from layer 0's (the pools and their scales):
# of the fused write (launch 0), the attention (launch 1), and none of the rest
_PER_LAYER = ({write_ops.K_POOL_ARG, write_ops.V_POOL_ARG, write_ops.K_SCALES_ARG, write_ops.V_SCALES_ARG},
              {attention_ops.K_POOL_ARG, attention_ops.V_POOL_ARG, attention_ops.K_SCALES_ARG,
               attention_ops.V_SCALES_ARG}, set())


def _same(value, kept) -> bool:
    """Whether a kernel argument set from ``kept`` (held, so identity is meaningful) still holds
    ``value``: the same object, or a numpy scalar of the same type, value and sign."""
    return value is kept or (isinstance(value, np.generic) and same_scalar(value, kept))


def _check_kind(name: str, x: Any, shape: tuple) -> None:
    """Refuse ``x`` unless it is a float32 numpy array of ``shape`` (device arrays named as such)."""
    if type(x) is not np.ndarray or x.dtype != _F32 or x.shape != shape:
        if is_device_array(x):
            raise InvalidArgument(f"{name}: StepCalls takes numpy arrays; use PagedKVCache.attend_qkv "
                                  "or write / attend for device arrays")
        check_array(name, x, shape=shape, dtype=np.float32, allow_device=False)


def enqueue_ready(queue: cl.CommandQueue, ready: list, inputs: list) -> None:
    """Enqueue a layer's readied launches (``(kernel, global, local)``) in order, first setting
    ``inputs`` (``(launch index, arg index, buffer)``), the only arguments a call changes."""
    with sequence_lock(queue):
        for i, j, buf in inputs:
            ready[i][0].set_arg(j, buf)
        for kernel, gsize, lsize in ready:
            cl.enqueue_nd_range_kernel(queue, kernel, gsize, lsize)


class StepCalls:
    """The per-layer calls of one planned step: :meth:`attend_qkv` and :meth:`write_attend`.

    Every argument is checked here, once.

    Parameters
    ----------
    cache : PagedKVCache
    step : kvcl.step.Step
    num_q_heads : int
        A multiple of the cache's ``num_kv_heads``.
    rope : {"none", "half", "interleaved"}
        :meth:`attend_qkv` only, with ``cos`` / ``sin`` [max_position, head_dim / 2] float32
        (numpy or device arrays; host tables are uploaded here, once).
    q_norm_weight, k_norm_weight, eps
        :meth:`attend_qkv` only, as in :meth:`~kvcl.engine.PagedKVCache.write_qkv`.
    window : int
        Sliding window (0: none).
    scale : float, optional
        Logit scale, default ``1 / sqrt(head_dim)``.
    """

    def __init__(self, cache: Any, step: Any, *, num_q_heads: int, rope: str = "none", cos: Any = None,
                 sin: Any = None, q_norm_weight: Any = None, k_norm_weight: Any = None, eps: float = 1e-6,
                 window: int = 0, scale: "float | None" = None):
        with cache._lock:
            self.cache = cache
            hq = checks.check_q_heads(num_q_heads, cache.num_kv_heads)
            rope = checks.check_rope(rope)
            self.window = check_int("window", window, low=0)
            self.scale = None if scale is None else check_float("scale", scale)
            self.eps = check_float("eps", eps)
            self.num_q_heads, self.rope = hq, rope
            d = cache.head_dim
            context = cache.device.context
            # the rows the tables need are checked per step (_bind)
            self._tables = checks.check_rope_tables(cos, sin, rope=rope, head_dim=d, context=context)
            self._weights = checks.check_norm_weights(q_norm_weight, k_norm_weight, head_dim=d, context=context)
            self._buffers = {name: None if x is None else cache._input(name, x, whole=True)[0]
                             for name, x in (*self._tables.items(), *self._weights.items())}
            self._context = context
            self._scratch_bytes = 0
            # where host memory is device memory (PoCL): inputs staged in host arrays that the
            # kernels read, the output read where they wrote it (see _stage)
            self._shared = cache.device.host_shared
            self._stages: dict = {}   # input name -> (host array, buffer over it)
            self._used: set = set()     # which calls were made ("qkv", "kv"): what prepare() readies
            # this object's own kernel per (kind, layer, launch, shared kernel): their arguments
            # are set when a step is readied, a call sets only its inputs (see _ready); kept for
            # every shared kernel a launch used, so steps that alternate between the device's
            # queue and its in-thread companion (other builds) make none again
            self._own: dict = {}
            self._serial = 0
            self._meta_buf = None   # the step's int32 tables, in a buffer of this object's own (_write_meta)
            self._last: dict = {}     # kind -> (what they depend on, the launches): _last_launches
            self._owns: dict = {}     # (kind, layer) -> its launches' own kernel entries, as last readied
            # kind -> (serial, layer 0's launch sizes, {layer > 0: (ready, owns)}) of the last prepare
            self._prepared: dict = {}
            self._bind(step)

    def rebind(self, step: Any, prepare: bool = False) -> "StepCalls":
        """Take ``step`` (a later step planned on the same cache) in place of this one's: only
        the step is checked, the other arguments were when this object was made. ``prepare``:
        also :meth:`prepare` it. Returns self."""
        with self.cache._lock:
            self._bind(step)
            if prepare:
                self.prepare()
        return self

    def prepare(self) -> "StepCalls":
        """Make every layer's launches of the step ready now, for the kinds of call made before
        (:meth:`attend_qkv`, :meth:`write_attend`), so that each layer's call only looks them up.

        A model's layers call in turn between other work that evicts the CPU's caches; readied
        in one loop before the model runs, the launches cost 3-5 µs a layer, against ~23 µs a
        layer when each call made its own (measured in the bridge on PoCL), and setting each
        layer's kernel arguments here leaves a call only its inputs to set. Returns self."""
        with self.cache._lock:
            for kind in sorted(self._used):
                ready0, changes, since = self._ready(kind, 0)
                if not self._unchanged(kind, ready0, changes, since):
                    for layer in range(1, self.cache.num_layers):
                        if not self._follow(kind, layer, ready0, changes, since):
                            self._ready(kind, layer)
                    self._prepared[kind] = (self._serial, [r[1:3] for r in ready0],
                                            {layer: (self._ready_layers[(kind, layer)], self._owns[(kind, layer)])
                                             for layer in range(1, self.cache.num_layers)})
                else:
                    self._prepared[kind] = (self._serial, *self._prepared[kind][1:])
        return self

    def _unchanged(self, kind: str, ready0: list, changes: "list | None", since: list) -> bool:
        """Whether every layer but 0 is ready as the last :meth:`prepare` left it: layer 0's
        launches changed no argument (``changes`` empty) nor size, and were set at that prepare,
        like every other layer's (no call readied one of them since; only :meth:`_ready` and
        :meth:`_follow` set an own kernel). Then the other layers' launches are taken as they
        are, with no per-layer work but the bookkeeping (a decode step after another: ~3 µs a
        layer less than :meth:`_follow` finding nothing to set)."""
        last = self._prepared.get(kind)
        if changes != [] or last is None or any(s != last[0] for s in since):
            return False
        serial, sizes, layers = last
        if sizes != [r[1:3] for r in ready0]:
            return False
        if any(own[2] != serial for ready, owns in layers.values() for own in owns):
            return False
        for layer, (ready, owns) in layers.items():
            for own in owns:
                own[2] = self._serial
            self._ready_layers[(kind, layer)] = ready
        return True

    def _bind(self, step: Any) -> None:
        cache = self.cache
        step = cache._check_step(step)
        checks.check_table_rows(self._tables, step.plan.max_kv_len, "the longest sequence in this step")
        d, hkv, hq, t = cache.head_dim, cache.num_kv_heads, self.num_q_heads, step.num_tokens
        self.step, self._epoch = step, cache._epoch
        self.qkv_shape = (t, (hq + 2 * hkv) * d)
        self.kv_shape = (t, hkv, d)
        self.out_shape = (t, hq, d)
        self._queue = step.queue
        out_bytes = 4 * max(1, math.prod(self.out_shape))
        if out_bytes > self._scratch_bytes:   # this object's own: outputs are read back before a call returns
            self._q_buf = cl.Buffer(self._context, cl.mem_flags.READ_WRITE, out_bytes)
            if self._shared:
                self._out_host, self._out_buf = cache.device.shared_array(
                    (out_bytes // 4,), np.float32, what="the attention output")
            else:
                self._out_host = np.empty(out_bytes // 4, np.float32)
                self._out_buf = cl.Buffer(self._context, cl.mem_flags.READ_WRITE, out_bytes)
            self._scratch_bytes = out_bytes
        self._write_meta(step)
        # each layer's launches: layer 0's are planned in full, the others derived from them
        self._qkv_layers: dict[int, tuple] = {}
        self._kv_layers: dict[int, tuple] = {}
        self._ready_layers: dict[tuple, list] = {}   # (kind, layer) -> [(own kernel, global, local)]
        self._serial += 1

    def _write_meta(self, step: Any) -> None:
        """Copy the step's tables (slots, positions, page table; ``Step.FIELDS``) into this
        object's own device buffer, one region per table, grown (to powers of two) only when a
        step outgrows it.

        The kernels' table arguments then stay the same buffers from step to step, so a step
        readied after another changes none of them in any layer (a new step's own sub-buffers
        changed five or six arguments of every layer's launches: ~120 µs a step over 30 layers on
        PoCL), for one write a step (2-15 µs with the tables' packing on PoCL's in-thread
        companion, ~60 µs through the device's queue, where steps are larger), or none where
        host memory is device memory (:attr:`_shared`: the tables are packed in place)."""
        arrays = [np.asarray(getattr(step.plan, name), np.int32).ravel() for name in Step.FIELDS]
        if self._meta_buf is None or any(a.size > cap for a, cap in zip(arrays, self._meta_caps)):
            align = self.cache._align   # int32 elements: every region starts on it, as sub-buffers must
            caps = [-(-(1 << max(0, a.size - 1).bit_length()) // align) * align for a in arrays]
            starts = [0, *itertools.accumulate(caps)][:-1]
            if self._shared:   # the kernels read the host array itself
                self._meta_host, buf = self.cache.device.shared_array((sum(caps),), np.int32,
                                                                      what="the step's tables")
            else:
                self._meta_host = np.zeros(sum(caps), np.int32)
                buf = cl.Buffer(self._context, cl.mem_flags.READ_ONLY, 4 * sum(caps))
            self._meta_buf = buf
            self._meta = {name: buf.get_sub_region(4 * start, 4 * cap)
                            for name, start, cap in zip(Step.FIELDS, starts, caps)}
            self._meta_caps, self._meta_starts = caps, starts
        host = self._meta_host
        if self._shared:   # written in place once no kernel of an earlier step may read them
            self.cache._use(self._queue).finish()
        for a, start in zip(arrays, self._meta_starts):
            host[start:start + a.size] = a
        if self._shared:
            return
        # waited for (the host copy is rewritten by the next step; on its event, not as a blocking
        # write: see kvcl.ops._launch.read_host), queued after the last step's kernels on the
        # queue this step's calls use
        cl.enqueue_copy(self.cache._use(self._queue), self._meta_buf, host, is_blocking=False).wait()

    # ---- checks ------------------------------------------------------------------------------

    def _valid_step(self) -> None:
        cache = self.cache
        if cache._epoch != self._epoch:     # a plan / free since: is this step still current?
            cache._check_step(self.step)
            self._epoch = cache._epoch

    def _host(self, name: str, x: Any, shape: tuple) -> np.ndarray:
        """``x`` as a C-contiguous float32 numpy array of ``shape``, finite; refused otherwise."""
        _check_kind(name, x, shape)
        if not np.isfinite(x).all():
            check_array(name, x, finite=True)   # raises, naming the first bad index
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)

    def _stage(self, name: str, x: Any, shape: tuple) -> "tuple[np.ndarray, cl.Buffer]":
        """``x`` checked as :meth:`_host` does, in ``name``'s staging array (a host array that is
        the memory of the buffer returned with it, where :attr:`_shared`): one copy and no
        device command (a ``COPY_HOST_PTR`` buffer a call costs 13-18 µs on PoCL's in-thread
        device when a model's matmuls evicted the caches between calls), checked finite in the
        copy, which the copy left in the caches (the input itself: ~20 µs then)."""
        _check_kind(name, x, shape)
        n = math.prod(shape)
        found = self._stages.get(name)
        if found is None or found[0].size < n:
            size = 1 << max(0, n - 1).bit_length()   # grown to powers of two: few re-made buffers
            found = self._stages[name] = self.cache.device.shared_array((size,), np.float32,
                                                                        what=f"the staged {name}")
        stage = found[0][:n].reshape(shape)
        np.copyto(stage, x)
        if not np.isfinite(stage).all():
            check_array(name, x, finite=True)   # raises, naming the first bad index
        return stage, found[1]

    def _output(self, out: "np.ndarray | None", copy: bool) -> "np.ndarray | None":
        """Where a call's result goes: ``out``, a new array (``copy``), or this object's own
        output array (None where it is the kernels' output buffer itself: :attr:`_shared`)."""
        if out is not None or copy:
            return self._result(out)
        if self._shared:
            return None
        return self._out_host[:math.prod(self.out_shape)].reshape(self.out_shape)

    def _finish(self, queue: cl.CommandQueue, result: "np.ndarray | None") -> np.ndarray:
        cache = self.cache
        if self._shared:
            return cache._read_shared(self._out_host[:math.prod(self.out_shape)].reshape(self.out_shape),
                                      queue, result)
        return cache._read_back(self._out_buf, self.out_shape, queue, result)

    def _layer(self, layer: Any) -> int:
        if type(layer) is not int or not 0 <= layer < self.cache.num_layers:
            layer = check_int("layer", layer, low=0, high=self.cache.num_layers)
        return layer

    def _result(self, out: "np.ndarray | None") -> np.ndarray:
        if out is None:
            return np.empty(self.out_shape, np.float32)
        if type(out) is not np.ndarray or out.dtype != _F32 or out.shape != self.out_shape \
                or not out.flags.c_contiguous:
            check_array("out", out, shape=self.out_shape, dtype=np.float32, allow_device=False)
            raise ShapeError(f"out: expected a C-contiguous array, got strides {out.strides}")
        return out

    # ---- launches ----------------------------------------------------------------------------

    def _attention(self, layer: int, queries: cl.Buffer, fresh=None) -> list:
        cache, step, tables = self.cache, self.step, self._meta
        pools = cache._pools(layer)
        return attention_ops.launches(
            self._queue, queries, cache._k[layer].data, cache._v[layer].data, pools["k_scales"],
            pools["v_scales"], tables["indptr"], tables["indices"], tables["last_page_len"],
            tables["q_indptr"], self._out_buf, total_q=step.num_tokens, num_q_heads=self.num_q_heads,
            head_dim=cache.head_dim, batch=len(step.plan.seq_ids), kvd=cache.dtype, int8_mode=INT8_MODE_AWAY,
            num_kv_heads=cache.num_kv_heads, block_size=cache.block_size, scale=self.scale,
            window=self.window, max_q_len=step.plan.max_q_len, max_kv_len=step.plan.max_kv_len,
            fresh=fresh)

    def _derived(self, layers: dict, layer: int) -> "tuple | None":
        """Layer ``layer``'s launches from another layer's of this step: only the pools differ."""
        if not layers:
            return None
        write, attention = next(iter(layers.values()))
        cache = self.cache
        pools = cache._pools(layer)
        k, v = cache._k[layer].data, cache._v[layer].data
        changes = {write_ops.K_POOL_ARG: k, write_ops.V_POOL_ARG: v}
        attn = {attention_ops.K_POOL_ARG: k, attention_ops.V_POOL_ARG: v}
        if pools["k_scales"] is not None:
            changes.update({write_ops.K_SCALES_ARG: pools["k_scales"], write_ops.V_SCALES_ARG: pools["v_scales"]})
            attn.update({attention_ops.K_SCALES_ARG: pools["k_scales"], attention_ops.V_SCALES_ARG: pools["v_scales"]})
        found = layers[layer] = (write.with_args(changes), [attention[0].with_args(attn), *attention[1:]])
        return found

    def _last_launches(self, kind: str, layer: int) -> "tuple[tuple, tuple | None]":
        """``(key, launches)``: what ``layer``'s launches of ``kind`` depend on in this step,
        and the last step's launches if they were planned for the same (else None).

        A decode step differs from the last one in the lengths of its sequences alone, which
        reach the launches only through the attention's layout (the split-K partitions): with the
        step's tables in this object's own buffer (:meth:`_write_meta`), the same layout gives the
        same launches, planned once (30-130 µs a step on PoCL, in the first layer)."""
        cache, step = self.cache, self.step
        plan = step.plan
        layout = attention_ops.plan(
            self._context, batch=len(plan.seq_ids), num_q_heads=self.num_q_heads,
            num_kv_heads=cache.num_kv_heads, head_dim=cache.head_dim, block_size=cache.block_size,
            max_q_len=plan.max_q_len, max_kv_len=plan.max_kv_len, kv_dtype=cache.dtype,
            int8_mode=INT8_MODE_AWAY, device=self._queue.device)
        key = (layer, step.num_tokens, len(plan.seq_ids), plan.max_q_len, layout, self._queue, self._meta_buf,
               self._q_buf, self._out_buf, cache._k[layer].data, cache._v[layer].data)
        last = self._last.get(kind)
        return key, (last[1] if last is not None and last[0] == key else None)

    def _qkv_launches(self, layer: int) -> tuple:
        found = self._qkv_layers.get(layer) or self._derived(self._qkv_layers, layer)
        if found is None:
            key, found = self._last_launches("qkv", layer)
        if found is None:
            self._used.add("qkv")
            cache, step, b = self.cache, self.step, self._buffers
            pools = cache._pools(layer)
            write = write_ops.qkv_launch(
                self._queue, None, 0, self._meta["slot_mapping"], self._meta["positions"],
                cache._k[layer].data, cache._v[layer].data, self._q_buf, pools["k_scales"], pools["v_scales"],
                b["cos"], b["sin"], b["q_norm_weight"], b["k_norm_weight"], cache._status.data,
                num_tokens=step.num_tokens, num_q_heads=self.num_q_heads, num_kv_heads=cache.num_kv_heads,
                head_dim=cache.head_dim, block_size=cache.block_size,
                num_slots=cache.num_blocks * cache.block_size,
                max_position=0 if self._tables["cos"] is None else int(self._tables["cos"].shape[0]),
                eps=self.eps, rope=self.rope, kvd=cache.dtype, int8_mode=INT8_MODE_AWAY)
            found = (write, self._attention(layer, self._q_buf))
            self._last["qkv"] = (key, found)
        self._qkv_layers[layer] = found
        return found

    def _kv_launches(self, layer: int) -> tuple:
        found = self._kv_layers.get(layer) or self._derived(self._kv_layers, layer)
        if found is None:
            key, found = self._last_launches("kv", layer)
        if found is None:
            self._used.add("kv")
            cache, step = self.cache, self.step
            pools = cache._pools(layer)
            write = write_ops.kv_launch(
                self._queue, None, 0, None, 0, self._meta["slot_mapping"], cache._k[layer].data,
                cache._v[layer].data, pools["k_scales"], pools["v_scales"], cache._status.data,
                num_tokens=step.num_tokens, num_kv_heads=cache.num_kv_heads, head_dim=cache.head_dim,
                block_size=cache.block_size, kvd=cache.dtype, int8_mode=INT8_MODE_AWAY,
                num_slots=cache.num_blocks * cache.block_size)
            fresh = (self._out_buf, self._out_buf) if cache.dtype.name == "int4" else None
            found = (write, self._attention(layer, None, fresh))
            self._last["kv"] = (key, found)
        self._kv_layers[layer] = found
        return found

    def _ready(self, kind: str, layer: int) -> tuple:
        """``(kind, layer)``'s launches on this object's own kernels, every argument but a call's
        inputs set now. Returns ``(ready, changes, since)``: the launches, the arguments that
        changed, ``(launch index, arg index, value)``, and per launch the step its kernel's
        arguments were set at before (None where the kernel is new: ``changes`` is None then).

        A kernel object holds its arguments between enqueues; the engine's kernels are shared
        (one per program and name) and every layer sets its pools and every call its inputs
        again, comparing ~25 arguments each time (12-19 µs a launch inside a running model on
        PoCL). Kernels of its own per layer keep a layer's arguments from one call to the next;
        only the step's changes are set, once, when the step is readied."""
        launches = self._launches(kind, layer)
        inputs = self._inputs(kind)
        ready, changes, since, owns = [], [], [], []
        for i, launch in enumerate(launches):
            k = launch.kernel
            key = (kind, layer, i, k.int_ptr)   # shared kernels live as long as their context
            # [own kernel, args set, step they were set at, the launch they were all set from]
            own = self._own.get(key)
            if own is None:
                own = self._own[key] = [cl.Kernel(k.program, k.function_name), [_UNSET] * len(launch.args),
                                        None, None]
                changes = None
            kernel, kept = own[0], own[1]
            if own[3] is not launch:        # the same launch object (_last_launches): nothing to set
                own[3] = None
                skip = inputs[i] if i < len(inputs) else ()
                for j, value in enumerate(launch.args):
                    if j not in skip and not _same(value, kept[j]):
                        kept[j] = _UNSET          # unknown until the set succeeds
                        set_arg(kernel, j, value)
                        kept[j] = value
                        if changes is not None:
                            changes.append((i, j, value))
                own[3] = launch
            since.append(own[2])
            own[2] = self._serial
            owns.append(own)
            ready.append((kernel, launch.global_size, launch.local_size, k.int_ptr))
        self._ready_layers[(kind, layer)] = [r[:3] for r in ready]
        self._owns[(kind, layer)] = owns
        return ready, changes, since

    def _follow(self, kind: str, layer: int, ready0: list, changes: "list | None", since: list) -> bool:
        """Ready ``layer`` from layer 0's ``changes``: its launches are layer 0's with its own
        pools, so the arguments that changed in layer 0 changed in it too, if its kernels'
        arguments were set at the same steps as layer 0's were. False (nothing set) otherwise."""
        if changes is None or any(j in _PER_LAYER[min(i, 2)] for i, j, _ in changes):   # layer 0's own pools
            return False
        owns = [self._own.get((kind, layer, i, r[3])) for i, r in enumerate(ready0)]
        if any(own is None or own[2] != s for own, s in zip(owns, since)):
            return False
        for i, j, value in changes:
            own = owns[i]
            own[3] = own[1][j] = _UNSET    # set from no launch of its own now
            set_arg(own[0], j, value)
            own[1][j] = value
        for own in owns:
            own[2] = self._serial
        self._ready_layers[(kind, layer)] = [(own[0], g, l) for own, (_, g, l, _) in zip(owns, ready0)]
        self._owns[(kind, layer)] = owns
        return True

    def _launches(self, kind: str, layer: int) -> list:
        write, attention = self._qkv_launches(layer) if kind == "qkv" else self._kv_launches(layer)
        return [write, *attention]

    def _inputs(self, kind: str) -> tuple:
        """Per launch, the argument indices a call sets (its input buffers)."""
        if kind == "qkv":
            return (write_ops.QKV_ARGS,)
        inputs = (write_ops.KV_ARGS, (attention_ops.QUERY_ARG,))
        if self.cache.dtype.name == "int4":   # the own-token launch reads the step's K/V
            inputs += ((attention_ops.QUERY_ARG, attention_ops.K_POOL_ARG, attention_ops.V_POOL_ARG),)
        return inputs

    def _layer_ready(self, kind: str, layer: int) -> list:
        found = self._ready_layers.get((kind, layer))
        if found is None:
            self._ready(kind, layer)
            found = self._ready_layers[(kind, layer)]
        return found

    # ---- the calls ---------------------------------------------------------------------------

    def attend_qkv(self, layer: int, qkv: np.ndarray, out: "np.ndarray | None" = None, *,
                   copy: bool = True) -> np.ndarray:
        """:meth:`~kvcl.engine.PagedKVCache.attend_qkv` of this step's ``layer``: packed ``qkv`` [T, (Hq + 2 Hkv) D]
        float32 (numpy) -> the attention output [T, Hq, D] (into ``out`` when given). ``copy=False``:
        the result may be this object's own array, overwritten by its next call (the ONNX
        bridge's, which onnxruntime copies from at once)."""
        cache = self.cache
        with cache._lock:
            self._valid_step()
            layer = self._layer(layer)
            if self._shared:
                qkv, buf = self._stage("qkv", qkv, self.qkv_shape)
            else:
                qkv = self._host("qkv", qkv, self.qkv_shape)
            result = self._output(out, copy)
            if not self.step.num_tokens:
                result = self._result(out) if result is None else result
                result[...] = 0
                return result
            ready = self._layer_ready("qkv", layer)
            if not self._shared:
                buf = cl.Buffer(self._context, _RO_COPY, hostbuf=qkv)
            queue = cache._use(self._queue)
            enqueue_ready(queue, ready, [(0, i, buf) for i in write_ops.QKV_ARGS])
            cache._status_unread = True
            return self._finish(queue, result)

    def write_attend(self, layer: int, keys: np.ndarray, values: np.ndarray, queries: np.ndarray,
                     out: "np.ndarray | None" = None, *, copy: bool = True) -> np.ndarray:
        """:meth:`~kvcl.engine.PagedKVCache.write` then :meth:`~kvcl.engine.PagedKVCache.attend` of this step's ``layer``:
        ``keys`` / ``values`` [T, Hkv, D], ``queries`` [T, Hq, D] float32 (numpy) -> [T, Hq, D].
        int4: each query row reads its own token from ``keys`` / ``values``, as the engine does.
        ``copy`` as in :meth:`attend_qkv`."""
        cache = self.cache
        with cache._lock:
            self._valid_step()
            layer = self._layer(layer)
            if self._shared:
                (keys, kb), (values, vb) = self._stage("keys", keys, self.kv_shape), self._stage("values", values, self.kv_shape)
            else:
                keys = self._host("keys", keys, self.kv_shape)
                values = self._host("values", values, self.kv_shape)
            if cache.dtype.codes_per_elem > 1:   # int4: refused before anything is written, as the engine's write
                check_int4_range("keys", keys)
                check_int4_range("values", values)
            if self._shared:
                queries, qb = self._stage("queries", queries, self.out_shape)
            else:
                queries = self._host("queries", queries, self.out_shape)
            result = self._output(out, copy)
            if not self.step.num_tokens:
                result = self._result(out) if result is None else result
                result[...] = 0
                return result
            ready = self._layer_ready("kv", layer)
            if not self._shared:
                kb = cl.Buffer(self._context, _RO_COPY, hostbuf=keys)
                vb = cl.Buffer(self._context, _RO_COPY, hostbuf=values)
                qb = cl.Buffer(self._context, _RO_COPY, hostbuf=queries)
            k, v = write_ops.KV_ARGS
            inputs = [(0, k, kb), (0, v, vb), (1, attention_ops.QUERY_ARG, qb)]
            if self.cache.dtype.name == "int4":   # the step's own tokens from their float32 K/V
                inputs += [(2, attention_ops.QUERY_ARG, qb), (2, attention_ops.K_POOL_ARG, kb),
                           (2, attention_ops.V_POOL_ARG, vb)]
            queue = cache._use(self._queue)
            enqueue_ready(queue, ready, inputs)
            cache._status_unread = True
            return self._finish(queue, result)
