"""Continuous batching over a :class:`~kvcl.engine.PagedKVCache`.

Requests arrive (:meth:`Scheduler.add_request`) and leave (finished, or :meth:`Scheduler.abort`)
at any step. Each :meth:`Scheduler.step` packs one ragged forward: the next token of every
running sequence plus chunks of prompts still being read (chunked prefill), so that the rows
times the longest chunk stay within ``max_batch_tokens`` (the forward runs right-padded rows:
that product is what it computes). Then it samples a token for each sequence whose input is
all in the cache, and frees the blocks of each sequence that finished, at once.

- **Prefix sharing.** A request enters the cache with ``add_sequence(prefix_tokens=...)``: the
  full blocks of its prompt already cached (an earlier request's system prompt, say) are shared,
  not recomputed; every step hands the tokens it writes to ``plan`` so their full blocks join the
  prefix index for later requests.
- **Preemption by recompute.** When a step's tokens need more blocks than are free, prompt
  chunks are held back first, then the newest running request is preempted: its blocks are
  freed and it waits at the head of the queue, to be read again (prompt and the tokens it
  generated so far) when blocks free up; its next tokens are the ones it would have produced.
- **No model inside.** ``forward(step, tokens)`` runs the model on a planned
  :class:`~kvcl.step.Step` (``tokens[b]``: the new token ids of row ``b``) and returns the logits
  of each row's last token, ``[B, vocab]``; :meth:`kvcl.onnx.Generator.scheduler` makes one
  over onnxruntime. The scheduler imports neither onnxruntime nor pyopencl.

Thread safety: :meth:`add_request` and :meth:`abort` may be called from any thread while
another runs :meth:`step` (they queue their change for the next step); steps run one at a time.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import CapacityError, InvalidArgument, OutOfRangeError
from .sampling import SamplingParams, sample
from .validate import check_int

__all__ = ["Scheduler", "RequestOutput", "Request"]

#: finish reasons
STOP, LENGTH, ABORT, ERROR = "stop", "length", "abort", "error"


@dataclass
class Request:
    """A request's state (read-only for callers; see :meth:`Scheduler.request`)."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset
    arrival: int
    output_ids: list[int] = field(default_factory=list)
    seq_id: "int | None" = None
    computed: int = 0                 # tokens of prompt + output already in the cache
    finish_reason: "str | None" = None
    error: "str | None" = None
    num_preemptions: int = 0
    cached_tokens: int = 0            # prompt tokens found in the prefix cache at first admission
    admitted: bool = False
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first_token: "float | None" = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return len(self.prompt_ids) + len(self.output_ids) - self.computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What one step did for one request: the tokens it produced and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: "str | None" = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    cached_tokens: int = 0
    error: "str | None" = None


def _check_ids(name: str, ids: Any, vocab_size: "int | None") -> list[int]:
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or not ids:
        raise InvalidArgument(f"{name}: expected a non-empty list of int token ids, got {type(ids).__name__}")
    if any(isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) for t in ids):
        raise InvalidArgument(f"{name}: expected int token ids, got {[type(t).__name__ for t in ids][:4]}")
    ids = [int(t) for t in ids]
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise OutOfRangeError(f"{name}: token ids must be in {limit}, got {bad[:4]}")
    return ids


class Scheduler:
    """Continuous batching of requests over ``cache`` with a model's ``forward``.

    Parameters
    ----------
    cache : kvcl.PagedKVCache
        Its sequences are the scheduler's (do not plan on it meanwhile). Prefix sharing needs
        ``enable_prefix_caching=True``.
    forward : callable ``(step, tokens) -> logits [B, vocab]``
        Runs the model on the planned ``step`` (see the module notes).
    max_batch_tokens : int
        Tokens the forward computes per step, default 256: rows x the longest chunk when
        ``padded``, else the sum of the rows' tokens (decodes always run, 1 token each).
    max_num_seqs : int
        Rows per step (running sequences), default 32.
    min_chunk : int
        A further prompt joins a step only if each row may still take this many tokens.
    vocab_size : int, optional
        Token ids at or above it are refused.
    stop_ids : iterable of int
        Default end-of-sequence ids of every request.
    padded : bool
        True when ``forward`` runs the rows right-padded to the longest (its cost is rows x
        width); False when it packs them into one row of their total length
        (:meth:`kvcl.onnx.Generator.forward_step` does where the model takes ``position_ids``).
    """

    def __init__(self, cache: Any, forward: Callable[[Any, list[list[int]]], np.ndarray], *,
                 max_batch_tokens: int = 256, max_num_seqs: int = 32, min_chunk: int = 16,
                 vocab_size: "int | None" = None, stop_ids: Iterable[int] = (), padded: bool = True):
        self.cache = cache
        self.forward = forward
        self.max_batch_tokens = check_int("max_batch_tokens", max_batch_tokens, low=1)
        self.max_num_seqs = check_int("max_num_seqs", max_num_seqs, low=1)
        self.min_chunk = check_int("min_chunk", min_chunk, low=1)
        self.vocab_size = vocab_size
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.padded = bool(padded)
        self._lock = threading.Lock()        # guards the incoming queues and the request table
        self._step_lock = threading.Lock()   # one step at a time
        self._incoming: list[Request] = []
        self._aborts: list[str] = []
        self._requests: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._pending: list[RequestOutput] = []   # outputs of a failed step, given by the next
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.counters = {"steps": 0, "preemptions": 0, "prefill_tokens": 0, "decode_tokens": 0,
                         "padded_tokens": 0, "cached_prompt_tokens": 0, "max_running": 0,
                         "finished": 0, "aborted": 0}

    # ---- requests ------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.cache.num_blocks * self.cache.block_size

    def add_request(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 16,
                    sampling: "SamplingParams | None" = None, stop_ids: "Iterable[int] | None" = None,
                    request_id: "str | None" = None) -> str:
        """Queue a request; return its id. Validated here: a refused request changes nothing.

        Raises
        ------
        kvcl.CapacityError
            The prompt plus ``max_new_tokens`` would not fit in the whole cache.
        """
        ids = _check_ids("prompt_ids", prompt_ids, self.vocab_size)
        n = check_int("max_new_tokens", max_new_tokens, low=1)
        if sampling is None:
            sampling = SamplingParams()
        elif not isinstance(sampling, SamplingParams):
            raise InvalidArgument(f"sampling: expected a kvcl.sampling.SamplingParams, got {type(sampling).__name__}")
        stops = self.stop_ids if stop_ids is None else frozenset(_check_ids("stop_ids", list(stop_ids), None)
                                                                 if list(stop_ids) else [])
        bs = self.cache.block_size
        blocks = -(-(len(ids) + n) // bs)
        if blocks > self.cache.num_blocks:
            raise CapacityError(
                f"prompt_ids/max_new_tokens: {len(ids)} + {n} tokens need {blocks} blocks of {bs}; the cache "
                f"holds {self.cache.num_blocks} ({self.capacity_tokens} tokens) in all")
        with self._lock:
            if request_id is None:
                request_id = f"req-{next(self._ids)}"
            elif not isinstance(request_id, str) or not request_id:
                raise InvalidArgument(f"request_id: expected a non-empty str, got {request_id!r}")
            if request_id in self._requests:
                raise InvalidArgument(f"request_id: {request_id!r} is already in use")
            req = Request(request_id, ids, n, sampling, stops, next(self._arrivals))
            self._requests[request_id] = req
            self._incoming.append(req)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request at the next step (its blocks are freed then). False if unknown or done."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.finished:
                return False
            self._aborts.append(request_id)
            return True

    def request(self, request_id: str) -> Request:
        """The state of an unfinished request (a finished one is forgotten once its last
        :class:`RequestOutput` is returned)."""
        with self._lock:
            try:
                return self._requests[request_id]
            except KeyError:
                raise InvalidArgument(f"request_id: unknown request {request_id!r}") from None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._incoming)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._running or self._waiting or self._incoming or self._aborts or self._pending)

    def stats(self) -> dict:
        """Counters so far plus the cache's (blocks used, shared, prefix hits)."""
        cache = self.cache.stats()
        return {**self.counters, "running": len(self._running), "waiting": self.num_waiting,
                "free_blocks": self.cache.num_free_blocks, "num_blocks": self.cache.num_blocks,
                **{k: v for k, v in cache.items() if k.startswith("prefix_") or k in ("num_sequences", "num_tokens")}}

    # ---- a step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward over the batch it packs; return what each request got."""
        with self._step_lock:
            outputs, self._pending = self._pending, []
            outputs += self._drain()
            batch = self._schedule()
            if not batch:
                return outputs
            chunks = [r.all_ids[r.computed:r.computed + n] for r, n in batch]
            reqs = [r for r, _ in batch]
            step = self.cache.plan([r.seq_id for r in reqs], [len(c) for c in chunks], token_ids=chunks)
            try:
                logits = self.forward(step, chunks)
            except BaseException as exc:
                for r in reqs:   # their cached tokens are undefined now: drop the requests
                    self._finish(r, ERROR, error=f"{type(exc).__name__}: {exc}")
                    self._pending.append(self._output(r, []))
                raise
            self._count(batch)
            now = time.perf_counter()
            for i, (r, n) in enumerate(batch):
                r.computed += n
                if r.remaining:
                    continue      # a prompt chunk: no token yet
                tok = sample(logits[i], r.sampling)
                r.output_ids.append(tok)
                if r.t_first_token is None:
                    r.t_first_token = now
                if tok in r.stop_ids:
                    self._finish(r, STOP)
                elif len(r.output_ids) >= r.max_new_tokens:
                    self._finish(r, LENGTH)
                outputs.append(self._output(r, [tok]))
            return outputs

    def run(self, until: "Callable[[], bool] | None" = None) -> Iterable[RequestOutput]:
        """Step until no request is left (or ``until()`` is true); yield every output."""
        while self.has_unfinished() and not (until and until()):
            yield from self.step()

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 16,
                 sampling: "SamplingParams | None" = None) -> list[list[int]]:
        """Run ``prompts`` as concurrent requests to the end; their output ids, in order."""
        ids = [self.add_request(p, max_new_tokens=max_new_tokens, sampling=sampling) for p in prompts]
        got: dict[str, list[int]] = {rid: [] for rid in ids}
        for o in self.run():
            if o.request_id in got:
                got[o.request_id] += o.new_token_ids
                if o.finish_reason == ERROR:
                    raise RuntimeError(f"request {o.request_id} failed: {o.error}")
        return [got[rid] for rid in ids]

    # ---- internals -----------------------------------------------------------------------

    def _output(self, r: Request, new: list[int]) -> RequestOutput:
        return RequestOutput(r.request_id, new, r.finished, r.finish_reason, len(r.prompt_ids),
                             len(r.output_ids), r.cached_tokens, r.error)

    def _finish(self, r: Request, reason: str, error: "str | None" = None) -> None:
        r.finish_reason, r.error = reason, error
        if r.seq_id is not None:
            self.cache.free(r.seq_id)
            r.seq_id = None
        if r in self._running:
            self._running.remove(r)
        with self._lock:
            self._requests.pop(r.request_id, None)
        self.counters["aborted" if reason == ABORT else "finished"] += 1

    def _drain(self) -> list[RequestOutput]:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            aborts, self._aborts = self._aborts, []
        self._waiting.extend(incoming)
        out = []
        for rid in aborts:
            r = self._requests.get(rid)
            if r is None or r.finished:
                continue
            if r in self._waiting:
                self._waiting.remove(r)
            self._finish(r, ABORT)
            out.append(self._output(r, []))
        return out

    def _admit(self, r: Request) -> None:
        """Give a waiting request a cache sequence, sharing its cached prefix blocks."""
        r.seq_id = self.cache.add_sequence(prefix_tokens=r.all_ids)
        r.computed = self.cache.seq_len(r.seq_id)
        if not r.admitted:
            r.admitted = True
            r.cached_tokens = r.computed
            self.counters["cached_prompt_tokens"] += r.computed

    def _unadmit(self, r: Request, *, preempted: bool) -> None:
        self.cache.free(r.seq_id)
        r.seq_id, r.computed = None, 0
        if preempted:
            r.num_preemptions += 1
            self.counters["preemptions"] += 1
            self._running.remove(r)
        self._waiting.appendleft(r)

    def _widths(self, rows: list[Request], picks: list[Request]) -> list[tuple[Request, int]]:
        """Tokens per row: decodes 1; prompt chunks within the budget (see ``padded``)."""
        budget = self.max_batch_tokens
        batch = [(r, 1) for r in rows]
        if self.padded:   # rows x the longest chunk
            width = max(1, budget // max(1, len(rows) + len(picks)))
            return batch + [(r, min(r.remaining, width)) for r in picks]
        left = max(0, budget - len(rows))
        for r in picks:   # packed: the chunks take what the decodes leave, oldest first
            n = max(1, min(r.remaining, left))
            left = max(0, left - n)
            batch.append((r, n))
        return batch

    def _schedule(self) -> list[tuple[Request, int]]:
        """The rows of the next step: (request, tokens to feed), blocks guaranteed."""
        budget = self.max_batch_tokens
        decodes = [r for r in self._running if r.remaining == 1]
        prefilling = [r for r in self._running if r.remaining > 1]
        rows = list(decodes)
        picks: list[Request] = []
        new: list[Request] = []           # admitted by this call
        left = budget - len(rows)         # packed: tokens left for prompt chunks
        for r in itertools.chain(prefilling, list(self._waiting)):
            n_rows = len(rows) + len(picks) + 1
            if n_rows > self.max_num_seqs:
                break
            room = budget // n_rows if self.padded else left
            if picks and room < min(r.remaining, self.min_chunk):
                break
            if rows and room < 1:
                break
            if r.seq_id is None:
                self._waiting.remove(r)
                self._admit(r)
                new.append(r)
            picks.append(r)
            left -= min(r.remaining, max(left, 1))
        while True:
            batch = self._widths(rows, picks)
            if not batch:
                return []
            need = self.cache.blocks_needed([r.seq_id for r, _ in batch], [n for _, n in batch])
            if need <= self.cache.num_free_blocks:
                break
            if picks:                     # hold back the newest prompt chunk first
                r = picks.pop()
                if r in new:
                    new.remove(r)
                    self._unadmit(r, preempted=False)
                continue
            # only running sequences left: preempt the newest (recomputed later)
            victim = max(self._running, key=lambda q: q.arrival, default=None)
            if victim is None:   # pragma: no cover - add_request refuses what the cache cannot hold
                raise CapacityError(f"the cache ({self.cache.num_blocks} blocks) cannot hold one request")
            if victim in rows:
                rows.remove(victim)
            self._unadmit(victim, preempted=True)
        for r in new:
            self._running.append(r)
        self.counters["max_running"] = max(self.counters["max_running"], len(self._running))
        return batch

    def _count(self, batch: list[tuple[Request, int]]) -> None:
        c = self.counters
        c["steps"] += 1
        width = max(n for _, n in batch)
        c["padded_tokens"] += width * len(batch) if self.padded else sum(n for _, n in batch)
        for r, n in batch:
            if r.remaining == n and len(r.output_ids) and n == 1:
                c["decode_tokens"] += 1
            else:
                c["prefill_tokens"] += n
