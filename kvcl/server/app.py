"""The OpenAI-compatible ASGI app of ``kvcl serve`` (Starlette), over one :class:`EngineLoop`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /stats`` (the scheduler's
counters: running, waiting, free blocks, prefix hits, preemptions). A request is checked
(:mod:`kvcl.server.protocol`) and sized against the cache before it is queued: too large gets
400 naming the field, never a hang. A client that disconnects has its request aborted (its
blocks freed) at the next step. Each completion choice carries ``token_ids`` besides ``text``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from ..errors import KvclError
from ..sampling import SamplingParams
from ..scheduler import Scheduler
from ..tokenizer import IncrementalDecoder, Tokenizer
from .engine import EngineLoop
from .protocol import GenerationRequest, RequestError, parse_chat, parse_completion

__all__ = ["create_app"]


class _Text:
    """Token ids -> text deltas, cut at the first stop string (held back while one may begin)."""

    def __init__(self, tokenizer: "Tokenizer | None", stops: list[str]):
        self.dec = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""       # emitted so far
        self.pending = ""
        self.stopped = False

    def _cut(self, final: bool) -> str:
        whole = self.text + self.pending
        hits = [i for i in (whole.find(s, max(0, len(self.text) - self.hold)) for s in self.stops) if i >= 0]
        if hits:
            out = whole[len(self.text):min(hits)]
            self.stopped, self.pending = True, ""
        elif final:
            out, self.pending = self.pending, ""
        else:
            keep = min(self.hold, len(self.pending))
            out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        self.text += out
        return out

    def push(self, token_id: int) -> str:
        if self.dec is None or self.stopped:
            return ""
        self.pending += self.dec.push(token_id)
        return self._cut(False)

    def finish(self) -> str:
        if self.dec is None or self.stopped:
            return ""
        self.pending += self.dec.flush()
        return self._cut(True)


class _Server:
    def __init__(self, scheduler: Scheduler, tokenizer: "Tokenizer | None", model_name: str,
                 default_max_tokens: int):
        self.engine = EngineLoop(scheduler)
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.served = 0
        self.disconnects = 0

    # ---- request -> scheduler --------------------------------------------------------------

    def _prompt(self, req: GenerationRequest, chat: bool) -> list[int]:
        tok = self.tokenizer
        if req.prompt_ids is not None:
            return req.prompt_ids
        param = "messages" if chat else "prompt"
        if tok is None:
            raise RequestError(f"{param}: this model has no tokenizer (no tokenizer.json beside it): send the "
                               "prompt as a list of token ids to /v1/completions", param)
        try:
            return tok.apply_chat_template(req.messages) if chat else tok.encode(req.prompt_text)
        except KvclError as exc:
            raise RequestError(str(exc), param) from None

    def _submit(self, req: GenerationRequest, chat: bool) -> tuple[str, asyncio.Queue, list[int], int]:
        if req.model is not None and req.model != self.model_name:
            raise RequestError(f"model: this server serves {self.model_name!r}, got {req.model!r}", "model",
                               status=404, kind="not_found_error")
        ids = self._prompt(req, chat)
        cap = self.scheduler.capacity_tokens
        param = "messages" if chat else "prompt"
        if len(ids) >= cap:
            raise RequestError(f"{param}: {len(ids)} prompt tokens leave no room in the cache "
                               f"({cap} tokens in all)", param)
        n = req.max_tokens if req.max_tokens is not None else min(self.default_max_tokens, cap - len(ids))
        if len(ids) + n > cap:
            raise RequestError(f"max_tokens: {len(ids)} prompt + {n} new tokens exceed the cache "
                               f"({cap} tokens in all): ask for at most {cap - len(ids)}",
                               "max_completion_tokens" if chat and req.max_tokens is not None else "max_tokens")
        stops = set(self.scheduler.stop_ids) | set(req.stop_token_ids)
        try:
            sampling = SamplingParams(req.temperature, req.top_k, req.top_p, req.seed)
            rid, queue = self.engine.submit(ids, max_new_tokens=n, sampling=sampling, stop_ids=sorted(stops))
        except KvclError as exc:
            text = str(exc)
            name = text.split(":")[0].split("/")[0] if ":" in text else param
            raise RequestError(text, {"prompt_ids": param, "max_new_tokens": "max_tokens"}.get(name, name)) from None
        return rid, queue, ids, n

    async def _tokens(self, rid: str, queue: asyncio.Queue, text: _Text) -> AsyncIterator[tuple[str, list[int], Any]]:
        """(text delta, token ids, finish reason or None) as the engine delivers them."""
        while True:
            o = await queue.get()
            if o.finish_reason == "error":
                raise RuntimeError(o.error or "the engine step failed")
            delta, ids = "", []
            for i, t in enumerate(o.new_token_ids):
                ids.append(t)
                if o.finish_reason == "stop" and i == len(o.new_token_ids) - 1:
                    continue   # the stop token ends the text, it is not part of it
                delta += text.push(t)
                if text.stopped:
                    break
            if text.stopped:   # a stop string: the request ends here
                self.engine.abort(rid)
                yield delta, ids, "stop"
                return
            if o.finished:
                delta += text.finish()
                yield delta, ids, "stop" if o.finish_reason == "stop" or text.stopped else "length"
                return
            if delta or ids:
                yield delta, ids, None

    # ---- responses -------------------------------------------------------------------------

    def _usage(self, prompt: list[int], completion: int) -> dict:
        return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                "total_tokens": len(prompt) + completion}

    async def completions(self, request, chat: bool):
        from starlette.responses import JSONResponse
        try:
            body = await request.json()
        except Exception:
            return _error(RequestError("the request body is not valid JSON", None))
        try:
            req = (parse_chat if chat else parse_completion)(body)
            rid, queue, prompt, _ = self._submit(req, chat)
        except RequestError as exc:
            return _error(exc)
        self.served += 1
        text = _Text(self.tokenizer, req.stop)
        oid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            return _Stream(self._sse(rid, queue, text, oid, chat, prompt, req.include_usage),
                           on_close=lambda: self._closed(rid))
        collect = asyncio.ensure_future(self._collect(rid, queue, text))
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if collect not in done:
            collect.cancel()
            self._closed(rid)
            return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
        try:
            out_text, ids, reason = collect.result()
        except RuntimeError as exc:
            return _error(RequestError(str(exc), None, status=500, kind="server_error"))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out_text}, "finish_reason": reason,
                      "logprobs": None, "token_ids": ids}
        else:
            choice = {"index": 0, "text": out_text, "finish_reason": reason, "logprobs": None, "token_ids": ids}
        return JSONResponse({"id": oid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": [choice],
                             "usage": self._usage(prompt, len(ids))})

    def _closed(self, rid: str) -> None:
        if self.engine.scheduler.abort(rid):
            self.disconnects += 1
        self.engine.abort(rid)

    async def _collect(self, rid, queue, text) -> tuple[str, list[int], str]:
        parts, ids, reason = [], [], None
        async for delta, new, reason in self._tokens(rid, queue, text):
            parts.append(delta)
            ids += new
        return "".join(parts), ids, reason

    async def _sse(self, rid, queue, text, oid, chat, prompt, include_usage) -> AsyncIterator[bytes]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str, ids: list[int], reason, first=False) -> bytes:
            if chat:
                d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta or ids else {})
                choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None, "token_ids": ids}
            else:
                choice = {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None, "token_ids": ids}
            msg = {"id": oid, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            if include_usage:
                msg["usage"] = None
            return b"data: " + json.dumps(msg).encode() + b"\n\n"

        n = 0
        try:
            if chat:
                yield chunk("", [], None, first=True)
            async for delta, ids, reason in self._tokens(rid, queue, text):
                n += len(ids)
                yield chunk(delta, ids, reason)
            if include_usage:
                msg = {"id": oid, "object": kind, "created": created, "model": self.model_name, "choices": [],
                       "usage": self._usage(prompt, n)}
                yield b"data: " + json.dumps(msg).encode() + b"\n\n"
        except RuntimeError as exc:
            err = RequestError(str(exc), None, status=500, kind="server_error").body()
            yield b"data: " + json.dumps(err).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    # ---- the other routes ------------------------------------------------------------------

    async def models(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kvcl",
             "max_model_len": self.scheduler.capacity_tokens}]})

    async def health(self, request):
        from starlette.responses import JSONResponse
        alive = self.engine._thread is not None and self.engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    async def stats(self, request):
        from starlette.responses import JSONResponse
        s = self.scheduler.stats()
        s.update({"engine_steps": self.engine.steps, "engine_step_errors": self.engine.step_errors,
                  "engine_busy_seconds": round(self.engine.busy_seconds, 3), "requests_served": self.served,
                  "client_disconnects": self.disconnects, "in_flight": self.engine.in_flight,
                  "recent_batch_sizes": self.engine.batch_sizes[-32:]})
        return JSONResponse(s)


async def _disconnected(request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


def _error(exc: RequestError):
    from starlette.responses import JSONResponse
    return JSONResponse(exc.body(), status_code=exc.status)


def _stream_class():
    from starlette.responses import StreamingResponse

    class Stream(StreamingResponse):
        """Server-sent events; ``on_close`` runs however the response ends (a client that went
        away included), so the request's blocks are freed."""

        def __init__(self, body, on_close):
            super().__init__(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self._on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._on_close()
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
    return Stream


def _Stream(body, on_close):
    return _stream_class()(body, on_close)


def create_app(scheduler: Scheduler, *, tokenizer: "Tokenizer | None" = None, model_name: str = "kvcl",
               default_max_tokens: int = 512):
    """The Starlette app serving ``scheduler`` (its engine thread runs while the app is up).

    Parameters
    ----------
    scheduler : kvcl.scheduler.Scheduler
        E.g. ``kvcl.onnx.Generator(folder, prefix_caching=True).scheduler()``.
    tokenizer : kvcl.Tokenizer, optional
        Text prompts, chat and text in the answers; without one, prompts are token ids.
    model_name : str
        What ``/v1/models`` lists and requests may name.
    default_max_tokens : int
        New tokens of a chat request that sets no ``max_tokens`` (less if the cache is fuller).
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    srv = _Server(scheduler, tokenizer, model_name, default_max_tokens)

    @asynccontextmanager
    async def lifespan(app):
        srv.engine.start()
        try:
            yield
        finally:
            srv.engine.stop()

    async def completions(request):
        return await srv.completions(request, chat=False)

    async def chat(request):
        return await srv.completions(request, chat=True)

    async def http_error(request, exc: HTTPException):
        return _error(RequestError(f"{request.method} {request.url.path}: {exc.detail}", None,
                                   status=exc.status_code, kind="not_found_error" if exc.status_code == 404
                                   else "invalid_request_error"))

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", srv.models, methods=["GET"]),
        Route("/health", srv.health, methods=["GET"]),
        Route("/stats", srv.stats, methods=["GET"]),
    ], lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.kvcl = srv
    return app
