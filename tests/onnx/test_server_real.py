"""``kvcl serve`` with a real-weights model (SmolLM2-135M-Instruct), driven by the official
``openai`` client: text and chat, streaming, and a bounded load test.

Load test: 28 greedy requests of mixed lengths (half of them chats sharing the template's
system prompt) run one after another, then all at once as streaming clients together with 4
clients that disconnect mid-stream and 2 requests larger than the cache. Every request but the
refused ones completes, none is lost or mixed up, each text equals its sequential run, the
server stays up and frees every block. Skipped (saying so) without the exported model;
``KVCL_REQUIRE_REAL_MODEL=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge_fixtures import require_onnx

require_onnx()
pytest.importorskip("starlette", reason="kvcl serve needs starlette (pip install 'kvcl[serve]')")
pytest.importorskip("uvicorn", reason="kvcl serve needs uvicorn (pip install 'kvcl[serve]')")
openai = pytest.importorskip("openai", reason="the server tests use the openai client (pip install openai)")
httpx = pytest.importorskip("httpx")

from serving import running_server  # noqa: E402

CAPACITY = 3072


@pytest.fixture(scope="module")
def server(onnx_device, real_model):
    from kvcl.serve import build_app
    app, gen = build_app(real_model.parent, device=onnx_device, max_tokens=CAPACITY - 256, max_batch_tokens=256)
    with running_server(app) as url:
        yield url, gen, app.state.kvcl
    gen.close()


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_chat_answers_and_streams_the_same_text(server):
    url, _, _ = server
    client = _client(url)
    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=24)
    text = whole.choices[0].message.content
    assert "Paris" in text, text
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens == len(whole.choices[0].token_ids)
    parts = [c.choices[0].delta.content or "" for c in
             client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=24, stream=True)
             if c.choices]
    assert "".join(parts) == text


def test_text_completion_and_stop_strings(server):
    url, _, _ = server
    client = _client(url)
    r = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of Germany is",
                                  temperature=0, max_tokens=12)
    text = r.choices[0].text
    assert "Berlin" in text, text
    cut = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of Germany is",
                                    temperature=0, max_tokens=12, stop=["Berlin"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index("Berlin")]


def test_oversize_and_bad_requests_are_4xx(server):
    url, _, _ = server
    client = _client(url)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2-135m-instruct", prompt="hi", max_tokens=10 * CAPACITY)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")


TOPICS = ["the sea", "a small town", "bread", "the moon", "trains", "music", "winter", "a library",
          "bees", "mountains", "tea", "rivers", "clocks", "gardens"]


def _requests():
    reqs = []
    for i, topic in enumerate(TOPICS):
        words = " ".join([f"Tell me about {topic}."] * (1 + i % 5))
        reqs.append(("chat", [{"role": "user", "content": words}], 4 + (i * 3) % 17))
        reqs.append(("text", f"Here is a short note about {topic}. " * (1 + (i * 2) % 7), 4 + (i * 5) % 17))
    return reqs


async def _one(client, kind, prompt, n, stream, quit_after=None):
    kw = dict(model="smollm2-135m-instruct", temperature=0, max_tokens=n)
    if kind == "chat":
        if not stream:
            r = await client.chat.completions.create(messages=prompt, **kw)
            return r.choices[0].message.content
        s = await client.chat.completions.create(messages=prompt, stream=True, **kw)
    else:
        if not stream:
            r = await client.completions.create(prompt=prompt, **kw)
            return r.choices[0].text
        s = await client.completions.create(prompt=prompt, stream=True, **kw)
    parts, events = [], 0
    async for c in s:
        events += 1
        if c.choices:
            parts.append((c.choices[0].delta.content or "") if kind == "chat" else c.choices[0].text)
        if quit_after is not None and events >= quit_after:
            await s.close()          # the client goes away mid-stream
            return None
    return "".join(parts)


def test_load_32_streaming_clients_equal_the_sequential_run(server):
    url, gen, srv = server
    reqs = _requests()
    assert len(reqs) == 28

    async def sequential():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300) as c:
            return [await _one(c, *r, stream=False) for r in reqs]

    async def concurrent():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300) as c:
            jobs = [_one(c, *r, stream=True) for r in reqs]
            jobs += [_one(c, "chat", [{"role": "user", "content": f"Write a long story about {t}."}], 200, True,
                          quit_after=3)
                     for t in TOPICS[:4]]
            jobs += [_one(c, "text", "too long", 4 * CAPACITY, True) for _ in range(2)]
            return await asyncio.gather(*jobs, return_exceptions=True)

    t0 = time.perf_counter()
    want = asyncio.run(sequential())
    t_seq = time.perf_counter() - t0
    steps0 = srv.engine.steps
    t0 = time.perf_counter()
    got = asyncio.run(concurrent())
    t_conc = time.perf_counter() - t0
    done, dropped, refused = got[:28], got[28:32], got[32:]
    lost = [i for i, g in enumerate(done) if isinstance(g, BaseException) or g is None]
    mismatches = [i for i, (g, w) in enumerate(zip(done, want)) if i not in lost and g != w]
    assert all(isinstance(e, openai.BadRequestError) for e in refused), refused
    assert all(d is None for d in dropped), dropped
    # the server frees the dropped clients' blocks and stays up
    deadline = time.monotonic() + 60
    while (srv.engine.in_flight or srv.scheduler.has_unfinished()) and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = httpx.get(url + "/stats", timeout=10).json()
    batch = max(srv.engine.batch_sizes[-(srv.engine.steps - steps0):] or [0])
    print(f"load: 28 requests + 4 disconnecting + 2 oversize, 34 concurrent; sequential {t_seq:.1f} s, "
          f"concurrent {t_conc:.1f} s; lost {len(lost)}, mismatches {len(mismatches)}; largest batch {batch}; "
          f"prefix-cached prompt tokens {stats['cached_prompt_tokens']}; disconnects {stats['client_disconnects']}")
    assert not lost, [(i, done[i]) for i in lost]
    assert not mismatches, [(i, done[i], want[i]) for i in mismatches]
    assert stats["in_flight"] == 0 and stats["running"] == 0 and stats["num_sequences"] == 0
    assert stats["client_disconnects"] >= 4
    assert stats["cached_prompt_tokens"] > 0          # the chats shared the system prompt's blocks
    assert batch >= 8
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
