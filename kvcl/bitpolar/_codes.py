"""The device side of the bitpolar mirror: the TurboQuant codes of ``num_heads`` heads.

:class:`DeviceCodes` owns the seeded matrices and the token-major code buffers on one device
(allocated through :meth:`kvcl.Device.alloc`, grown by doubling) and runs the kernels of
:mod:`kvcl.ops.turboquant` on them. The inputs it gets are already checked by the mirrors in
:mod:`kvcl.bitpolar`; nothing here validates or raises bitpolar's errors.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from ..ops import turboquant as ops
from ..reference import turboquant as ref
from ..runtime import Device, resolve_device
from ..ops._launch import to_host

_U64 = 2**64
_INITIAL_TOKENS = 16


def _nbytes(shape: tuple, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class DeviceCodes:
    """The codes of ``num_heads`` heads on one device, and the launches that make and use them.

    ``config`` is a checked :class:`kvcl.bitpolar.KvCacheConfig`. Callers hold :attr:`lock`
    around :meth:`push`, :meth:`scores`, :meth:`decode`, :meth:`read` and changes of
    :attr:`length`.
    """

    def __init__(self, num_heads: int, config: Any, device: Any):
        self.config = config
        self.num_heads = num_heads
        self.device: Device = resolve_device(device)
        d, m, heads = config.head_dim, config.projections, num_heads
        dev = self.device
        # allocated (size-checked) before the host draws them: a d = 4096 rotation takes seconds
        rotations = dev.alloc((heads, d, d), np.float32, what="rotation matrices [num_heads, d, d]")
        projections = dev.alloc((heads, m, d), np.float32, what="projection matrices [num_heads, m, d]")
        seeds = [(config.seed + h) % _U64 for h in range(heads)]
        rotations.set(np.stack([ref.rotation_matrix(d, s) for s in seeds]))
        projections.set(np.stack([ref.projection_matrix(d, m, s) for s in seeds]))
        self.rotations, self.projections = rotations, projections
        self.angle_table = cla.to_device(self.queue, ref.angle_table(config.bits))
        self._rotated = dev.alloc((2 * heads, d), np.float32, what="the encode scratch")
        self._residual = dev.alloc((2 * heads, d), np.float32, what="the residual scratch")
        self.lock = threading.RLock()
        self.length = 0
        self.capacity = 0
        self.codes = self.radii = self.signs = self.norms = None

    @property
    def queue(self) -> cl.CommandQueue:
        return self.device.queue

    def _reserve(self, tokens: int) -> None:
        """Grow the code buffers (doubling) to hold ``tokens``; the contents are kept. Every new
        buffer is checked before any is allocated; the old ones stay until all are made."""
        if tokens <= self.capacity:
            return
        capacity = max(tokens, 2 * self.capacity, _INITIAL_TOKENS)
        c, lead = self.config, (capacity, 2, self.num_heads)
        pairs = c.head_dim // 2
        wanted = ((f"angle codes ({capacity} tokens)", lead + (pairs,), ref.code_dtype(c.bits)),
                  (f"radii ({capacity} tokens)", lead + (pairs,), np.float32),
                  (f"QJL signs ({capacity} tokens)", lead + (ref.sign_bytes(c.projections),), np.uint8),
                  (f"residual norms ({capacity} tokens)", lead, np.float32))
        for what, shape, dtype in wanted:
            self.device.check_alloc(what, _nbytes(shape, dtype))
        fresh = tuple(self.device.alloc(shape, dtype, what=what) for what, shape, dtype in wanted)
        if self.capacity:
            for new, old in zip(fresh, (self.codes, self.radii, self.signs, self.norms)):
                cl.enqueue_copy(self.queue, new.base_data, old.base_data, byte_count=old.nbytes)
        self.codes, self.radii, self.signs, self.norms = fresh
        self.capacity = capacity

    def push(self, rows: np.ndarray) -> None:
        """Append one token: ``rows`` float32 [2, num_heads, head_dim] (keys, then values)."""
        heads = self.num_heads
        self._reserve(self.length + 1)
        x = cla.to_device(self.queue, rows.reshape(2 * heads, self.config.head_dim))
        offset = self.length * 2 * heads
        ops.matvec_rows(x, self.rotations, self._rotated, num_heads=heads)
        ops.polar_encode(self._rotated, self.angle_table, self.codes, self.radii, self._residual,
                         row_offset=offset)
        ops.qjl_sketch(self._residual, self.projections, self.signs, self.norms, num_heads=heads,
                       row_offset=offset)
        self.length += 1

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """float32 [num_heads, length] for queries float32 [num_heads, head_dim]."""
        heads, n = self.num_heads, self.length
        if n == 0:
            return np.zeros((heads, 0), np.float32)
        c, alloc = self.config, self.device.alloc
        q = cla.to_device(self.queue, queries)
        rotated = alloc((heads, c.head_dim), np.float32, what="the rotated queries")
        projected = alloc((heads, c.projections), np.float32, what="the projected queries")
        out = alloc((heads, n), np.float32, what=f"the scores of {n} tokens")
        ops.matvec_rows(q, self.rotations, rotated, num_heads=heads)
        ops.matvec_rows(rotated, self.projections, projected, num_heads=heads)
        ops.attention_scores(self.codes, self.radii, self.signs, self.norms, self.angle_table,
                             rotated, projected, out, num_tokens=n)
        return to_host(out)

    def decode(self, kind: int) -> np.ndarray:
        """``Rᵀ·polar_decode`` of every stored key (kind 0) or value (1): [length, num_heads, d]."""
        heads, n, d = self.num_heads, self.length, self.config.head_dim
        if n == 0:
            return np.zeros((0, heads, d), np.float32)
        polar = self.device.alloc((n, heads, d), np.float32, what=f"the decoded codes of {n} tokens")
        out = self.device.alloc((n * heads, d), np.float32, what=f"the decoded vectors of {n} tokens")
        ops.polar_decode(self.codes, self.radii, self.angle_table, polar, kind=kind, num_tokens=n)
        ops.matvec_rows(polar.reshape(n * heads, d), self.rotations, out, num_heads=heads,
                        transpose=True)
        return to_host(out).reshape(n, heads, d)

    def read(self, kind: int):
        """The stored codes of kind 0 (keys) or 1 (values), each [length, num_heads, ...], as a
        :class:`kvcl.bitpolar.TurboCodes` of numpy arrays."""
        from . import TurboCodes   # the public type, defined with the mirrors (imported by now)
        n, c, heads = self.length, self.config, self.num_heads
        if n == 0:
            pairs = c.head_dim // 2
            return TurboCodes(np.zeros((0, heads, pairs), ref.code_dtype(c.bits)),
                              np.zeros((0, heads, pairs), np.float32),
                              np.zeros((0, heads, ref.sign_bytes(c.projections)), np.uint8),
                              np.zeros((0, heads), np.float32))
        return TurboCodes(*(to_host(arr[:n])[:, kind] for arr in
                            (self.codes, self.radii, self.signs, self.norms)))
