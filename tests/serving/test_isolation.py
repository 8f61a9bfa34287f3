"""A request whose video fails while the engine decodes it gets its own 400 while long streams run
on to their full length; an engine whose steps keep failing is not ready, stops, and the server
exits non-zero saying why."""

from __future__ import annotations

import asyncio
import base64
import shutil

import httpx

from tests.engine.test_isolation import undecodable_video
from tests.serving.conftest import REQUEST_TIMEOUT_S, ROOT, SHUTDOWN_TIMEOUT_S, start_server, stop_server, wait_idle
from tests.serving.test_load import LIMITS, stream_chat

LONG = 200  # tokens each normal stream must produce in full


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url, "nframes": 4, "max_pixels": 16 * 28 * 28}}


def test_undecodable_video_fails_alone_while_streams_complete(server, media_dir, tmp_path):
    bad = undecodable_video(tmp_path / "garbled.mp4", "libx264", seed=5)
    shutil.copy(bad, media_dir / "garbled.mp4")
    data_uri = "data:video/mp4;base64," + base64.b64encode(bad.read_bytes()).decode()
    poisoned = [video_part("garbled.mp4"), video_part(data_uri)]

    async def run() -> tuple[list[dict], list[httpx.Response]]:
        async with httpx.AsyncClient(limits=LIMITS, timeout=REQUEST_TIMEOUT_S) as c:
            streams = [asyncio.ensure_future(stream_chat(c, server.url, {
                "messages": [{"role": "user", "content": f"Story {i}."}], "max_tokens": LONG, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}})) for i in range(4)]
            bad_requests = [c.post(server.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}],
                "max_tokens": 8, "stream": stream}) for part in poisoned for stream in (False, True)]
            answers = await asyncio.gather(*bad_requests)
            return await asyncio.gather(*streams), answers

    results, answers = asyncio.run(run())
    for r in results:
        assert r["finish"] == "length" and r["usage"]["completion_tokens"] == LONG, r
    for resp in answers:
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["code"] == "invalid_media" and error["param"] == "messages[0].content[0].video_url", error
        assert "decode" in error["message"], error
    after = wait_idle(server)
    assert after["qvl_kv_cache_blocks_used"] == 0
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(server.url + "/ready", timeout=REQUEST_TIMEOUT_S).status_code == 200


def test_failing_steps_make_the_server_unready_then_stop_it(serving_ckpt, media_dir, tmp_path):
    live = start_server(serving_ckpt, media_dir, tmp_path / "faulty.log",
                        script=ROOT / "tests" / "serving" / "faulty_serve.py")
    try:
        assert httpx.get(live.url + "/ready", timeout=REQUEST_TIMEOUT_S).status_code == 200
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        first = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        assert first.status_code == 500 and "injected fault" in first.json()["error"]["message"], first.text
        ready = httpx.get(live.url + "/ready", timeout=REQUEST_TIMEOUT_S)
        assert ready.status_code == 503 and "failed" in ready.json()["reason"], ready.text
        assert httpx.get(live.url + "/health", timeout=REQUEST_TIMEOUT_S).status_code == 200  # alive, not ready
        for _ in range(2):  # the third failing step in a row stops the engine, then the server
            resp = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
            assert resp.status_code in (500, 503), resp.text
        code = live.process.wait(timeout=SHUTDOWN_TIMEOUT_S)  # a hang guard: it exits at once
    finally:
        stop_server(live)
    log = live.log_tail(20000)
    assert code != 0, log
    assert "3 engine steps in a row failed" in log and "injected fault" in log, log


def test_cache_salt_separates_tenants(server):
    """The same long prompt under two salts: no cached tokens across salts; within one, a hit."""
    text = "Salted prompt. " + " ".join(f"word{i}" for i in range(60))

    def cached(salt: str | None) -> int:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 2}
        if salt is not None:
            body["cache_salt"] = salt
        resp = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        assert resp.status_code == 200, resp.text
        return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0
    assert cached("tenant-a") > 0
    # Unsalted requests share only unsalted blocks (the chat template's system prompt, from other tests):
    # the salted runs of this text gave them nothing, their own first run does.
    first = cached(None)
    assert cached(None) > first
    bad = httpx.post(server.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                     json={"messages": [{"role": "user", "content": "hi"}], "cache_salt": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt", bad.text
