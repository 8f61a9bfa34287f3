"""Behaviour under load and faults: many concurrent streams, clients that leave mid-stream, bad
requests, a full waiting queue, SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from qwen_vl_triton.engine.config import EngineConfig
from qwen_vl_triton.engine.llm import LLM
from qwen_vl_triton.serving.api_server import create_app
from qwen_vl_triton.serving.config import ServeConfig
from tests.serving.conftest import (
    IDLE_TIMEOUT_S,
    IMAGE_LIMIT,
    MAX_INPUT,
    MAX_SEQ,
    REQUEST_TIMEOUT_S,
    SHUTDOWN_TIMEOUT_S,
    SMALL_IMAGE,
    LiveServer,
    metrics,
    start_server,
    stop_server,
    wait_idle,
)

LIMITS = httpx.Limits(max_connections=128, max_keepalive_connections=128)
ABORTED = 'qvl_requests_finished_total{finish_reason="abort"}'
LENGTH = 'qvl_requests_finished_total{finish_reason="length"}'

# No test here bounds how fast anything runs: on a shared machine the engine thread may step far ahead
# of the HTTP side or far behind it. Assertions count requests, tokens and blocks; timeouts only end
# waits that would otherwise hang (tests/serving/conftest.py). Where a request must outlast something
# the client does, it gets all the room under max_seq_len (no max_tokens: ~1000 tokens here), some 20
# times the most a request was seen to run while its client acted on a loaded 2-core machine (~50).


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict, stop_after: int | None = None) -> dict:
    """Stream one chat request; stop reading (closing the connection) after `stop_after` content
    chunks. Returns content, chunk count, finish reason and usage."""
    result = {"content": "", "chunks": 0, "finish": None, "usage": None}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            result["usage"] = event.get("usage") or result["usage"]
            for ch in event["choices"]:
                if ch["delta"].get("content"):
                    result["content"] += ch["delta"]["content"]
                    result["chunks"] += 1
                result["finish"] = ch["finish_reason"] or result["finish"]
            if stop_after is not None and result["chunks"] >= stop_after:
                break  # leaving the context manager closes the connection mid-stream
    return result


def long_stream(text: str) -> dict:
    """A streamed chat request given all the room under max_seq_len (no max_tokens)."""
    return {"messages": [{"role": "user", "content": text}], "ignore_eos": True, "stream": True}


async def hold_stream(client: httpx.AsyncClient, url: str, body: dict, streamed: asyncio.Event) -> str | None:
    """Stream one chat request, setting `streamed` at its first content chunk, and read on until the
    server ends the stream (its finish reason) or the caller cancels the task (closing the connection)."""
    finish = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    if ch["delta"].get("content"):
                        streamed.set()
                    finish = ch["finish_reason"] or finish
    return finish


def finish_counts(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Requests that ended by abort and by running to their end (length) between two /metrics reads."""
    return {reason: after.get(key, 0) - before.get(key, 0) for reason, key in (("abort", ABORTED), ("length", LENGTH))}


def ended_streams(tasks: list[asyncio.Future]) -> list[tuple[int, str]]:
    """(index, how it ended) of the held streams that ended on their own."""
    return [(i, repr(t.exception()) if t.exception() else f"finish_reason={t.result()!r}")
            for i, t in enumerate(tasks) if t.done() and not t.cancelled()]


def assert_streams_share_the_running_batch(server: LiveServer, n: int) -> None:
    """Batched, not one after another, shown by counts: n long streams are held open until each
    has streamed a token, and then the engine's running batch holds all n. One at a time, the second
    could not stream a token before the first had run to its end (~1000 tokens). The streams are then
    closed: all n end by abort, none by running to the end."""
    before = metrics(server.url)

    async def run() -> dict[str, float]:
        async with httpx.AsyncClient(limits=LIMITS, timeout=REQUEST_TIMEOUT_S) as c:
            streamed = [asyncio.Event() for _ in range(n)]
            tasks = [asyncio.ensure_future(hold_stream(c, server.url, long_stream(f"Stream {i}: a long story."),
                                                       streamed[i])) for i in range(n)]
            all_streamed = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in streamed)))
            try:
                # Ends at once if a stream ends first (finished, or failed); each read is hang-guarded.
                await asyncio.wait([all_streamed, *tasks], return_when=asyncio.FIRST_COMPLETED)
                assert not ended_streams(tasks), f"streams ended before all {n} streamed: {ended_streams(tasks)}"
                # The engine publishes its batch after each step: poll until it has stepped past the
                # last stream's admission (an ended stream fails the wait at once; a hang guard bounds it).
                deadline = time.monotonic() + IDLE_TIMEOUT_S
                while (held := await asyncio.to_thread(metrics, server.url))["qvl_num_requests_running"] != n:
                    assert not ended_streams(tasks), f"streams ended while held: {ended_streams(tasks)}"
                    assert time.monotonic() < deadline, f"hang: running batch not {n} after {IDLE_TIMEOUT_S} s: {held}"
                    await asyncio.sleep(0.05)
                return held
            finally:
                all_streamed.cancel()
                for t in tasks:
                    t.cancel()  # closes its connection: the server aborts the request
                await asyncio.gather(all_streamed, *tasks, return_exceptions=True)

    held = asyncio.run(run())
    after = wait_idle(server)
    assert held["qvl_num_requests_running"] == n, held
    ended = finish_counts(before, after)
    assert ended == {"abort": n, "length": 0}, f"how the {n} held streams ended: {ended}"
    assert after["qvl_generation_tokens_total"] - before["qvl_generation_tokens_total"] >= n


def test_64_concurrent_streams_batch_and_metrics_agree(server, media_dir):
    before = metrics(server.url)
    image = str(media_dir / "textvqa" / "train_images" / "sign_2.png")

    def body(i: int) -> dict:
        content = [{"type": "text", "text": f"Request {i}: describe."}]
        if i % 2:
            content.insert(0, {"type": "image_url", "image_url": {"url": image, **SMALL_IMAGE}})
        return {"messages": [{"role": "user", "content": content}], "max_tokens": 6 + i % 5, "temperature": 0.7,
                "seed": i, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    async def run() -> list[dict]:
        async with httpx.AsyncClient(limits=LIMITS, timeout=REQUEST_TIMEOUT_S) as c:
            return await asyncio.gather(*(stream_chat(c, server.url, body(i)) for i in range(64)))

    results = asyncio.run(run())
    for i, r in enumerate(results):
        assert r["finish"] == "length" and r["usage"]["completion_tokens"] == 6 + i % 5, (i, r)
    after = wait_idle(server)
    want_tokens = sum(6 + i % 5 for i in range(64))
    assert after["qvl_generation_tokens_total"] - before["qvl_generation_tokens_total"] == want_tokens
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in results)
    assert after["qvl_prompt_tokens_total"] - before["qvl_prompt_tokens_total"] == prompt_tokens
    assert after[LENGTH] - before.get(LENGTH, 0) == 64
    key = 'qvl_http_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert after[key] - before.get(key, 0) == 64
    assert after["qvl_time_to_first_token_seconds_count"] - before["qvl_time_to_first_token_seconds_count"] == 64
    assert after["qvl_kv_cache_blocks_used"] == 0
    # Batched, not serialised: 64 streams in the engine's running batch at once (a count, not a time).
    assert_streams_share_the_running_batch(server, 64)


def test_100_cancelled_streams_free_every_kv_block(server):
    """Each client closes its stream after 2 content chunks. How many tokens the engine generates
    before an abort takes effect depends on scheduling: the engine thread steps on while the server
    sends the chunks, the client reads them and the server notices the closed connection (under load,
    from ~4 to over 50 tokens a request). So what is counted is how the requests ended: given all the
    room under max_seq_len, every one ends by abort and none runs to its end."""
    before = metrics(server.url)
    body = long_stream("Write a very long essay.")

    async def run() -> list[dict]:
        async with httpx.AsyncClient(limits=LIMITS, timeout=REQUEST_TIMEOUT_S) as c:
            return await asyncio.gather(*(stream_chat(c, server.url, body, stop_after=2) for _ in range(100)))

    results = asyncio.run(run())
    assert all(r["chunks"] == 2 and r["finish"] is None for r in results)
    after = wait_idle(server)
    assert after["qvl_kv_cache_blocks_used"] == 0, after
    assert after["qvl_num_requests_running"] == 0 and after["qvl_num_requests_waiting"] == 0
    # Cancellation stopped generation: every request ended by abort, none ran to its end (each made
    # fewer than max_seq_len tokens), each made at least the 2 tokens its client read...
    ended = finish_counts(before, after)
    assert ended == {"abort": 100, "length": 0}, f"how the 100 cancelled requests ended: {ended}"
    generated = after["qvl_generation_tokens_total"] - before["qvl_generation_tokens_total"]
    assert 2 * 100 <= generated < 100 * MAX_SEQ, generated
    # ...and nothing generates after the aborts: the next request moves the counter by its own tokens.
    ok = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 3}, timeout=REQUEST_TIMEOUT_S)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    moved = metrics(server.url)["qvl_generation_tokens_total"] - after["qvl_generation_tokens_total"]
    assert moved == ok.json()["usage"]["completion_tokens"]


def _chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def _image(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]


BAD_REQUESTS = [
    # (name, path, raw body or json body, expected param (None: not checked), expected code)
    ("malformed json", "/v1/chat/completions", b'{"messages": [', None, "invalid_json"),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", None, "invalid_json"),
    ("empty body", "/v1/chat/completions", b"", None, "invalid_json"),
    ("messages wrong type", "/v1/chat/completions", {"messages": "hello"}, "messages", "invalid_type"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, "messages", "empty_messages"),
    ("unknown model", "/v1/chat/completions", _chat("hi", model="gpt-4"), "model", "model_not_found"),
    ("max_tokens 0", "/v1/chat/completions", _chat("hi", max_tokens=0), "max_tokens", "invalid_value"),
    ("max_tokens string", "/v1/chat/completions", _chat("hi", max_tokens="5"), "max_tokens", "invalid_type"),
    ("temperature negative", "/v1/chat/completions", _chat("hi", temperature=-1), "temperature", "invalid_value"),
    ("top_p bool", "/v1/chat/completions", _chat("hi", top_p=True), "top_p", "invalid_type"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]},
     "messages[0].role", "invalid_value"),
    ("bad part type", "/v1/chat/completions", _chat([{"type": "audio", "audio": "x"}]),
     "messages[0].content[0].type", "invalid_value"),
    ("invalid base64", "/v1/chat/completions", _chat(_image("data:image/png;base64,not base64!!")),
     "messages[0].content[0].image_url", "invalid_base64"),
    ("base64 not an image", "/v1/chat/completions",
     _chat(_image("data:image/png;base64," + base64.b64encode(b"plain text, no pixels").decode())),
     "messages[0].content[0].image_url", "invalid_media"),
    ("file not an image", "/v1/chat/completions", _chat(_image("notes.txt")),
     "messages[0].content[0].image_url", "invalid_media"),
    ("image as video", "/v1/chat/completions",
     _chat([{"type": "video_url", "video_url": {"url": "textvqa/train_images/sign_0.png"}}]),
     "messages[0].content[0].video_url", "invalid_media"),
    ("path outside allowed dir", "/v1/chat/completions", _chat(_image("/etc/hostname")),
     "messages[0].content[0].image_url", "path_not_allowed"),
    ("dot-dot escape", "/v1/chat/completions", _chat(_image("../../../../etc/hostname")),
     "messages[0].content[0].image_url", "path_not_allowed"),
    ("missing file", "/v1/chat/completions", _chat(_image("nope.png")),
     "messages[0].content[0].image_url", "file_not_found"),
    ("directory as image", "/v1/chat/completions", _chat(_image("textvqa")),
     "messages[0].content[0].image_url", "file_not_found"),
    ("http url to a loopback address", "/v1/chat/completions", _chat(_image("http://127.0.0.1:9/cat.png")),
     "messages[0].content[0].image_url", "media_address_not_allowed"),
    ("unknown media option", "/v1/chat/completions",
     _chat([{"type": "image_url", "image_url": {"url": "textvqa/train_images/sign_0.png"}, "max_pixels": "big"}]),
     "messages[0].content[0].max_pixels", "invalid_type"),
    ("image over the server's pixel limit", "/v1/chat/completions",
     _chat([{"type": "image_url", "image_url": {"url": "textvqa/train_images/sign_0.png",
                                                "max_pixels": 2 * IMAGE_LIMIT}}]),
     "messages[0].content[0].image_url", "invalid_value"),
    ("prompt over max_input_token_len", "/v1/chat/completions", _chat("word " * (MAX_INPUT + 50)),
     "messages", "context_length_exceeded"),
    ("max_tokens over max_seq_len", "/v1/chat/completions", _chat("hi", max_tokens=MAX_SEQ),
     "max_tokens", "context_length_exceeded"),
    ("n over the maximum", "/v1/chat/completions", _chat("hi", n=17), "n", "invalid_value"),
    ("negative seed", "/v1/chat/completions", _chat("hi", seed=-3), "seed", "invalid_value"),
    ("top_logprobs without logprobs", "/v1/chat/completions", _chat("hi", top_logprobs=2), "top_logprobs",
     "invalid_value"),
    ("completions without prompt", "/v1/completions", {"max_tokens": 3}, "prompt", "invalid_type"),
    ("generate empty prompt list", "/generate", {"prompt": []}, "prompt", "invalid_value"),
    ("generate bad part", "/generate", {"prompt": [{"type": "image_url", "image_url": 5}]},
     "prompt[0].image_url", "invalid_type"),
    ("stream_options without stream", "/v1/chat/completions", _chat("hi", stream_options={"include_usage": True}),
     "stream_options", "invalid_value"),
]


@pytest.mark.parametrize("name,path,body,param,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_openai_400_and_server_keeps_serving(server, name, path, body, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    if code == "context_length_exceeded" and param == "messages":
        assert f"max_input_token_len {MAX_INPUT}" in error["message"]
    if name.startswith("image over"):
        assert f"configured limit of {IMAGE_LIMIT}" in error["message"] and "cannot read" not in error["message"]
    if name == "base64 not an image":
        assert "not a format PIL knows" in error["message"] and "BytesIO" not in error["message"]
    if name == "directory as image":
        assert "a directory, not a file" in error["message"]
    ok = httpx.post(server.url + "/v1/chat/completions", json=_chat("hello"), timeout=REQUEST_TIMEOUT_S)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_route_is_openai_404(server):
    r = httpx.get(server.url + "/v2/nothing", timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


async def until(condition: Callable[[], bool], what: str, ended: Callable[[], str | None] = lambda: None) -> None:
    """Poll `condition` on the event loop until it holds. Fails at once when `ended()` names why it
    never will; IDLE_TIMEOUT_S only catches a hang, named in the failure."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while not condition():
        why = ended()
        assert why is None, f"waiting for {what}: {why}"
        assert time.monotonic() < deadline, f"hang: {what} not reached after {IDLE_TIMEOUT_S:.0f} s"
        await asyncio.sleep(0.01)


def test_full_waiting_queue_gets_503(serving_ckpt, monkeypatch):
    """In-process app: one running sequence, one waiting; the third request is refused. The two long
    requests get all the room under the output cap (no max_tokens: 1024 tokens), so the first still
    runs while the second is queued and the third sent."""
    monkeypatch.setenv("QVL_KERNELS", "torch")  # references: fast (the Triton path is tested elsewhere)
    llm = LLM(serving_ckpt, kv_cache_gb=0.02, max_batch_size=1)
    cfg = ServeConfig(model_path=str(serving_ckpt), engine=EngineConfig(max_batch_size=1), max_waiting=1)
    app = create_app(cfg, llm)
    server = app.state.server
    long_body = {"messages": [{"role": "user", "content": "a long one"}], "ignore_eos": True}

    async def run() -> None:
        await server.startup()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=REQUEST_TIMEOUT_S) as c:
                engine = server.engine
                long_requests: list[asyncio.Future] = []

                def ended() -> str | None:
                    done = [t.exception() or t.result() for t in long_requests if t.done()]
                    return f"a long request ended first: {done}" if done else None

                running = asyncio.ensure_future(c.post("/v1/chat/completions", json=long_body))
                long_requests.append(running)
                await until(lambda: engine.num_running == 1, "the first request running", ended)
                waiting = asyncio.ensure_future(c.post("/v1/chat/completions", json=long_body))
                long_requests.append(waiting)
                await until(lambda: engine.num_waiting == 1, "the second request waiting", ended)
                assert engine.num_running == 1
                refused = await c.post("/v1/chat/completions", json=_chat("hi"))
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "server_busy"
                metrics_text = (await c.get("/metrics")).text
                assert 'qvl_http_requests_total{endpoint="/v1/chat/completions",status="503"} 1.0' in metrics_text
                running.cancel()
                waiting.cancel()
                await asyncio.gather(running, waiting, return_exceptions=True)
                # The cancelled requests are aborted: the queue drains.
                await until(lambda: engine.num_waiting == 0 and engine.num_running == 0, "the queue draining")
                ok = await c.post("/v1/chat/completions", json=_chat("hi"))
                assert ok.status_code == 200, ok.text
                # The engine publishes its block count after each step.
                await until(lambda: engine.kv_blocks_used == 0, "every KV block free")
        finally:
            await server.shutdown()

    asyncio.run(run())


def test_sigterm_finishes_in_flight_then_exits_0(serving_ckpt, media_dir, tmp_path):
    """SIGTERM while a long stream (all the room under max_seq_len) is in flight: it runs to its end,
    then the server exits 0. The grace period is a hang guard, far beyond the ~1000 tokens' run."""
    grace = SHUTDOWN_TIMEOUT_S / 2
    live = start_server(serving_ckpt, media_dir, tmp_path / "server.log", "--graceful_timeout", str(int(grace)))
    result: dict = {}
    first_chunk = threading.Event()

    def stream() -> None:
        body = long_stream("go on")
        content = ""
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    for ch in json.loads(line[6:])["choices"]:
                        content += ch["delta"].get("content") or ""
                        result["finish"] = ch["finish_reason"] or result.get("finish")
                    first_chunk.set()
                elif line == "data: [DONE]":
                    result["done"] = True
        result["content"] = content

    try:
        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(REQUEST_TIMEOUT_S), f"hang: no chunk in {REQUEST_TIMEOUT_S} s:\n{live.log_tail()}"
        code = stop_server(live, timeout=SHUTDOWN_TIMEOUT_S)  # SIGTERM; SIGKILL (code -9) only on a hang
        reader.join(REQUEST_TIMEOUT_S)  # the server has exited: its last chunk is already sent
        assert not reader.is_alive(), f"hang: the stream still open after the server exited:\n{live.log_tail()}"
        assert result.get("done") and result.get("finish") == "length", (result, live.log_tail())
        assert code == 0, live.log_tail()
        with pytest.raises(httpx.ConnectError):
            httpx.get(live.url + "/health", timeout=5)
    finally:
        stop_server(live)
