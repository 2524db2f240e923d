"""A planned step (:class:`Step`) and where its kernels run (:func:`inline_max_work`).

Made by :meth:`kvcl.engine.PagedKVCache.plan`; used by the cache's per-layer calls and by
:class:`kvcl.stepcalls.StepCalls`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .errors import KvclError
from .paging import StepPlan

if TYPE_CHECKING:  # pragma: no cover
    from .engine import PagedKVCache

__all__ = ["Step", "StaleStepError", "inline_max_work", "INLINE_WORK_MANY_CORES"]


class StaleStepError(KvclError, ValueError):
    """A :class:`Step` is used after one of its sequences was freed or planned again."""


class Step:
    """One planned step: the slots of the new tokens and the page table after them.

    Made by :meth:`~kvcl.engine.PagedKVCache.plan`; pass it to :meth:`~kvcl.engine.PagedKVCache.write`,
    :meth:`~kvcl.engine.PagedKVCache.write_qkv` and :meth:`~kvcl.engine.PagedKVCache.attend` for every layer.
    The metadata is uploaded once, when a call first needs it; the host copy is :attr:`plan`.

    Attributes
    ----------
    plan : kvcl.paging.StepPlan
        Host copy: ``slot_mapping``, ``positions``, ``indptr``, ``indices``,
        ``last_page_len``, ``q_indptr``, ``kv_lens``, ``max_q_len``, ``max_kv_len``, ``copies``.
    num_tokens : int
        New tokens in the step (rows of ``keys`` / ``queries``).
    slot_mapping, positions, indptr, indices, last_page_len, q_indptr : pyopencl.array.Array
        The device copies (int32), made on first access (:attr:`buffers`): the engine's own calls
        use the buffers beneath them.
    """

    FIELDS = ("slot_mapping", "positions", "indptr", "indices", "last_page_len", "q_indptr")

    def __init__(self, cache: "PagedKVCache", plan: StepPlan, serial: int,
                 buffers: "Sequence[cl.Buffer] | None" = None, queue: "cl.CommandQueue | None" = None):
        self.cache, self.plan, self.serial = cache, plan, serial
        self._buffers = None if buffers is None else dict(zip(self.FIELDS, buffers))
        self._arrays: dict[str, cla.Array] = {}
        #: the queue this step's kernels run on: the device's, or its inline companion's for a
        #: step too small to pay for a handoff to the device's worker threads (see PagedKVCache)
        self.queue = queue or cache.device.queue

    @property
    def buffers(self) -> dict:
        """The device copy of the metadata: ``FIELDS`` -> int32 sub-buffers (each at offset 0)
        of one buffer, uploaded on first use (:class:`~kvcl.stepcalls.StepCalls` keeps copies
        of its own and never asks)."""
        if self._buffers is None:
            parts = self.cache._upload_packed([getattr(self.plan, name) for name in self.FIELDS])
            self._buffers = dict(zip(self.FIELDS, parts))
        return self._buffers

    @property
    def inline(self) -> bool:
        """True when the step runs on the device's in-thread companion (``Device.inline_queue``)."""
        return self.queue is self.cache.device.inline_queue

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


#: K/V elements a step's attention reads per layer below which the in-thread companion wins on
#: a device of many compute units (see :func:`inline_max_work`)
INLINE_WORK_MANY_CORES = 3 << 19


def inline_max_work(compute_units: int) -> int:
    """The default :attr:`~kvcl.engine.PagedKVCache.inline_max_work` for a device of ``compute_units``.

    In-thread, a step of W elements takes W / r (r: one core's rate); on the worker threads
    L + W / (r · cu) (L: the handoff, 35-70 µs per blocking call). They cross at
    W = L · r · cu / (cu - 1). Measured on the 2-core dev VM (synthetic 4-layer decoder, fp32,
    8 kv heads x 128, one sequence, per step): in-thread 1.9 / 2.1 / 2.6 / 3.4 / 5.6 / 11.0 ms
    at 128 / 256 / 512 / 1024 / 2048 / 4096 tokens, worker threads 2.6 / 2.4 / 3.0 / 4.0 / 5.2 /
    7.5 ms: crossing near 1500 tokens, 3.1 M elements, so L · r ~ 1.5 M elements.
    """
    cu = max(1, int(compute_units))
    return 1 << 62 if cu == 1 else INLINE_WORK_MANY_CORES * cu // (cu - 1)
