"""``kvcl serve``'s app on 127.0.0.1, on the synthetic fixture (token-id prompts, no tokenizer).

Protocol: the routes, streaming, bad requests answered 4xx naming the field, a client that
disconnects mid-stream freeing its blocks. The real-weights model's tests (text, chat, the
official openai client, the load test) are in test_server_real.py.
"""

from __future__ import annotations

import json

import pytest

from bridge_fixtures import fixture_path, require_onnx

require_onnx()
pytest.importorskip("starlette", reason="kvcl serve needs starlette (pip install 'kvcl[serve]')")
pytest.importorskip("uvicorn", reason="kvcl serve needs uvicorn (pip install 'kvcl[serve]')")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from serving import running_server  # noqa: E402

ROUTE = "llama_torchscript"
PROMPT = [5, 17, 33, 9, 100, 4, 61, 88, 12]


@pytest.fixture(scope="module")
def served(onnx_device):
    from kvcl.serve import build_app
    app, gen = build_app(fixture_path(ROUTE), device=onnx_device, max_tokens=256, block_size=4,
                         max_batch_tokens=32, model_name="tiny")
    with running_server(app) as url:
        yield url, gen, app.state.kvcl
    gen.close()


@pytest.fixture(scope="module")
def alone(onnx_device):
    from kvcl.onnx import Generator
    gen = Generator(fixture_path(ROUTE), device=onnx_device, max_tokens=256)
    yield lambda prompt, n: gen.generate([prompt], n).tokens[0].tolist()
    gen.close()


def _post(url, path, body, **kw):
    return httpx.post(url + path, content=body if isinstance(body, (str, bytes)) else json.dumps(body),
                      timeout=60, **kw)


def test_health_and_models(served):
    url, _, _ = served
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] > 0


def test_token_id_completion_equals_the_generator(served, alone):
    url, _, _ = served
    r = _post(url, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["token_ids"] == alone(PROMPT, 12)
    assert choice["finish_reason"] == "length" and choice["text"] == ""     # no tokenizer: ids only
    assert body["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 12,
                             "total_tokens": len(PROMPT) + 12}


def test_streamed_completion_equals_the_whole(served, alone):
    url, _, _ = served
    ids, reasons = [], []
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        msg = json.loads(ln[6:])
        for c in msg["choices"]:
            ids += c["token_ids"]
            reasons.append(c["finish_reason"])
    assert ids == alone(PROMPT, 10)
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 10


BAD = [
    ("not json", "{", None),
    ("prompt missing", {"max_tokens": 3}, "prompt"),
    ("prompt empty", {"prompt": []}, "prompt"),
    ("prompt negative id", {"prompt": [1, -2]}, "prompt"),
    ("prompt id past the vocabulary", {"prompt": [1, 10**9]}, "prompt"),
    ("two prompts", {"prompt": [[1], [2]]}, "prompt"),
    ("text without tokenizer", {"prompt": "hello"}, "prompt"),
    ("max_tokens 0", {"prompt": [1], "max_tokens": 0}, "max_tokens"),
    ("max_tokens a string", {"prompt": [1], "max_tokens": "3"}, "max_tokens"),
    ("larger than the cache", {"prompt": [1], "max_tokens": 100000}, "max_tokens"),
    ("prompt fills the cache", {"prompt": [1] * 400}, "prompt"),
    ("temperature negative", {"prompt": [1], "temperature": -1}, "temperature"),
    ("temperature NaN-like", {"prompt": [1], "temperature": "hot"}, "temperature"),
    ("top_p 0", {"prompt": [1], "top_p": 0}, "top_p"),
    ("n 2", {"prompt": [1], "n": 2}, "n"),
    ("penalty", {"prompt": [1], "frequency_penalty": 0.5}, "frequency_penalty"),
    ("logprobs", {"prompt": [1], "logprobs": 2}, "logprobs"),
    ("echo", {"prompt": [1], "echo": True}, "echo"),
    ("stop not strings", {"prompt": [1], "stop": [1, 2]}, "stop"),
    ("five stops", {"prompt": [1], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("stream not a bool", {"prompt": [1], "stream": "yes"}, "stream"),
    ("body a list", [1, 2], None),
]


@pytest.mark.parametrize("name,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_completion_requests_get_400_naming_the_field(served, name, body, param):
    url, gen, srv = served
    free = gen.cache.num_free_blocks
    r = _post(url, "/v1/completions", body)
    assert r.status_code == 400, (name, r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"] and err["type"] == "invalid_request_error"
    assert gen.cache.num_free_blocks == free and srv.engine.in_flight == 0


def test_other_refusals(served):
    url, _, _ = served
    r = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"       # no tokenizer
    r = _post(url, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _post(url, "/v1/completions", {"model": "other", "prompt": [1]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405


def test_a_client_that_disconnects_mid_stream_frees_its_request(served, alone):
    import time
    url, gen, srv = served
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break        # leave after a few events: the response is closed here
    t0 = time.monotonic()
    while (srv.engine.in_flight or srv.scheduler.has_unfinished()) and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    assert srv.engine.in_flight == 0 and not srv.scheduler.has_unfinished()
    assert gen.cache.stats()["num_sequences"] == 0
    assert srv.scheduler.counters["aborted"] >= 1
    # and the server goes on serving
    r = _post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    assert r.json()["choices"][0]["token_ids"] == alone(PROMPT, 5)
    assert httpx.get(url + "/stats").json()["client_disconnects"] >= 1
