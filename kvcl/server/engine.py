"""One engine loop: a thread that steps a :class:`~kvcl.scheduler.Scheduler` while requests
are in flight and hands each request's outputs to the asyncio task waiting for them."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Any

from ..scheduler import RequestOutput, Scheduler

__all__ = ["EngineLoop"]

log = logging.getLogger("kvcl.server")


class EngineLoop:
    """Steps ``scheduler`` on a thread of its own (the only caller of ``step``).

    :meth:`submit` (from the event loop) registers the request's queue before the request can
    produce anything, so no output is lost; :meth:`abort` frees a request's blocks at the next
    step (a client that went away). When nothing is in flight the thread sleeps.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._ids = itertools.count()
        self._thread: "threading.Thread | None" = None
        self.steps = 0
        self.step_errors = 0
        self.busy_seconds = 0.0
        self.batch_sizes: list[int] = []   # requests that got a token, per step (last 1000)

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="kvcl-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompt_ids: list[int], **options: Any) -> tuple[str, asyncio.Queue]:
        """Queue a request (``options`` as :meth:`kvcl.scheduler.Scheduler.add_request`); return its id and the
        queue its :class:`~kvcl.scheduler.RequestOutput` objects arrive on. Raises what
        ``add_request`` raises (nothing is queued then)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = f"kvcl-{next(self._ids)}-{int(time.time() * 1e3) % 10**8}"
        with self._lock:
            self._streams[rid] = (loop, queue)
        try:
            self.scheduler.add_request(prompt_ids, request_id=rid, **options)
        except BaseException:
            with self._lock:
                self._streams.pop(rid, None)
            raise
        with self._wake:
            self._wake.notify_all()
        return rid, queue

    def abort(self, rid: str) -> None:
        """Drop a request (its queue gets no more outputs)."""
        with self._lock:
            self._streams.pop(rid, None)
        if self.scheduler.abort(rid):
            with self._wake:
                self._wake.notify_all()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def _run(self) -> None:
        sched = self.scheduler
        while True:
            with self._wake:
                while not self._stop and not sched.has_unfinished():
                    self._wake.wait(0.5)
                if self._stop:
                    return
            t0 = time.perf_counter()
            try:
                outputs = sched.step()
            except Exception:   # the failed requests get their error at the next step
                self.step_errors += 1
                log.exception("kvcl engine step failed")
                continue
            finally:
                self.busy_seconds += time.perf_counter() - t0
            self.steps += 1
            self.batch_sizes.append(sum(1 for o in outputs if o.new_token_ids))
            del self.batch_sizes[:-1000]
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for o in outputs:
            with self._lock:
                target = self._streams.get(o.request_id)
                if target is not None and o.finished:
                    del self._streams[o.request_id]
            if target is None:
                continue   # aborted by its client
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, o)
            except RuntimeError:   # pragma: no cover - the event loop closed meanwhile
                pass
