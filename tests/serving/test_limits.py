"""Bounded work per request, checked before the work is done: a body over --max_request_bytes is
refused (413) as it streams in, text that cannot fit max_input_length before it is tokenized,
media over the count, byte and pixel limits (decompression bombs, videos whose header declares
absurd frames) before they are decoded; each a 4xx naming the limit, for that request alone while
others stream on. And the server's memory stays bounded under a flood of such requests."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from qwen_vl_triton.engine.media import Media, MediaOptionError, prepare_media
from qwen_vl_triton.engine.preprocess import ContextLengthError, Preprocessor, Prompt
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.modeling.config import load_config
from qwen_vl_triton.modeling.processing import (
    DECODE_MAX_PIXELS,
    SAMPLE_VIDEO_PATH,
    ImageProcessorConfig,
    MediaError,
    MediaTooLarge,
    is_image,
    open_image,
    plan_video,
)
from qwen_vl_triton.serving.config import ServeConfig, add_serve_arguments, build_config
from qwen_vl_triton.serving.limits import BodyLimitMiddleware
from qwen_vl_triton.testing.media import synthetic_frame
from tests.serving.conftest import (
    MAX_INPUT,
    MAX_SEQ,
    REQUEST_TIMEOUT_S,
    SMALL_IMAGE,
    LiveServer,
    metrics,
    start_server,
    stop_server,
)

MiB = 1 << 20

# ------------------------------------------------------------------------------------- poisoned media


def png_declaring(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with `idat` as its pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BOMB_IDAT = zlib.compress(bytes(4096))  # a few rows of zeros: the declared pixels are never there
GARBLED_IDAT = b"not a zlib stream " * 8


def y4m_declaring(width: int, height: int) -> bytes:
    """A YUV4MPEG2 video whose header declares width x height frames, followed by a few bytes."""
    return f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1 C420jpeg\nFRAME\n".encode() + bytes(1024)


def png(height: int = 56, width: int = 84) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_frame(height, width, 0.5)).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ------------------------------------------------------------------------------------- media headers


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns past its threshold
def test_image_headers_over_the_pixel_limit_are_refused_before_decoding():
    # PIL refuses 30000 x 30000 itself (twice its threshold); 10000 x 10000 only warns there, and is
    # refused by the limit. Both hold a few bytes of pixel data: a decode would fail as corrupt
    # instead, so MediaTooLarge shows nothing was decoded.
    for width, height in [(30000, 30000), (10000, 10000)]:
        bomb = png_declaring(width, height, BOMB_IDAT)
        assert is_image(bomb)  # still told apart from a video
        with pytest.raises(MediaTooLarge, match="decode_max_pixels"):
            open_image(bomb)
    with pytest.raises(MediaTooLarge, match=r"64x48 = 3072 pixels, over the configured limit of 3000"):
        open_image(png_declaring(64, 48, GARBLED_IDAT), max_pixels=3000)
    with pytest.raises(MediaError, match="cannot read image") as corrupt:  # a valid header over garbled data
        open_image(png_declaring(64, 48, GARBLED_IDAT))
    assert not isinstance(corrupt.value, MediaTooLarge)
    assert open_image(png(), max_pixels=84 * 56).size == (84, 56)


def test_video_headers_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    big = tmp_path / "big.y4m"
    big.write_bytes(y4m_declaring(12000, 12000))  # 144M pixels a frame declared, 1 KB of data
    with pytest.raises(MediaTooLarge, match=f"12000x12000 = 144000000 pixels.*limit of {DECODE_MAX_PIXELS}"):
        plan_video(big, max_frame_pixels=DECODE_MAX_PIXELS)
    with pytest.raises(MediaTooLarge, match="decode_max_pixels"):  # the engine applies the limit by default
        prepare_media(Media(big.read_bytes(), "video"), ImageProcessorConfig())
    plan = plan_video(SAMPLE_VIDEO_PATH, max_frame_pixels=10**6)
    with pytest.raises(MediaTooLarge):
        plan_video(SAMPLE_VIDEO_PATH, max_frame_pixels=plan.info.width * plan.info.height - 1)


# ------------------------------------------------------------------------------------- text before tokenizing


class CountingTokenizer:
    """A tokenizer that counts the calls that tokenize or render text."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.inner.encode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self.inner.apply_chat_template(*args, **kwargs)


@pytest.fixture(scope="module")
def counted(serving_ckpt) -> tuple[Preprocessor, CountingTokenizer]:
    from transformers import AutoTokenizer

    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(serving_ckpt))
    return Preprocessor(tokenizer, load_config(serving_ckpt), ImageProcessorConfig.from_pretrained(serving_ckpt),
                        MAX_INPUT), tokenizer


def test_characters_per_token_bound_holds(counted):
    """No text tokenizes to fewer tokens than its characters / chars_per_token: each token's own
    text repeated (the densest texts there are), and characters NFC composes 4 into 1."""
    pre, tokenizer = counted
    inner = tokenizer.inner
    texts = [inner.decode([i]) * 40 for i in sorted(set(inner.get_vocab().values()))]
    texts += ["\u03b1\u0313\u0301\u0345" * 200, " " * 5000, "\n" * 5000]  # ᾅ decomposed, whitespace runs
    for text in texts:
        assert len(text) <= pre.chars_per_token * len(inner.encode(text, add_special_tokens=False)), text[:40]
    assert pre.max_chars == pre.chars_per_token * MAX_INPUT


def test_the_bound_from_the_fast_decoder_is_transformers_decode_bound(counted):
    """max_chars_per_token decodes every id through the fast tokenizer's backend (4x faster for
    Qwen's vocabulary): the same texts as transformers' batch_decode."""
    pre, tokenizer = counted
    ids = [[i] for i in sorted(set(tokenizer.inner.get_vocab().values()))]
    longest = max(map(len, tokenizer.inner.batch_decode(ids, clean_up_tokenization_spaces=False)))
    assert pre.chars_per_token == 4 * (longest + 1)


def test_text_that_cannot_fit_is_refused_before_tokenizing(counted):
    pre, tokenizer = counted
    too_long = "x" * (pre.max_chars + 1)
    before = tokenizer.calls
    with pytest.raises(ContextLengthError, match=f"max_input_length {MAX_INPUT}.*refused before tokenizing"):
        pre.tokenize(too_long)
    with pytest.raises(ContextLengthError, match=f"{pre.max_chars + 1} characters"):
        pre.render([{"role": "user", "content": [{"type": "text", "text": too_long[:-10]}]},
                    {"role": "assistant", "content": "y" * 10}])
    # Offline prompts: the text is checked before any medium is read (these would not read).
    unreadable = Media(b"not an image or a video", "image")
    with pytest.raises(ContextLengthError):
        pre.prepare(Prompt(too_long, [unreadable]))
    with pytest.raises(MediaOptionError, match="33 images and videos in one prompt.*max_media_per_prompt"):
        pre.prepare(Prompt("hi", [unreadable] * 33))
    assert tokenizer.calls == before  # nothing was tokenized or rendered
    # Text within the character bound is tokenized, and refused by its token count.
    with pytest.raises(ContextLengthError, match=f"prompt has \\d+ tokens.*max_input_length {MAX_INPUT}"):
        pre.build(pre.tokenize("word " * (MAX_INPUT + 50)), [], SamplingParams())
    assert tokenizer.calls == before + 1


# ------------------------------------------------------------------------------------- the body limit


def test_body_limit_refuses_by_content_length_and_by_running_count():
    """The app is never called for a declared size over the limit, and reads no more than the limit
    of a chunked one, whose rest neither the app nor the middleware pulls."""
    limit, chunk = 10_000, b"z" * 1000
    seen = {"calls": 0, "bytes": 0}

    async def app(scope, receive, send):
        seen["calls"] += 1
        more = True
        while more:
            message = await receive()
            seen["bytes"] += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read"})

    pulled = {"chunks": 0}

    async def body(chunks: int) -> AsyncIterator[bytes]:
        for _ in range(chunks):
            pulled["chunks"] += 1
            yield chunk

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=BodyLimitMiddleware(app, limit))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            declared = await c.post("/x", content=chunk * 11)
            assert seen["calls"] == 0
            chunked = await c.post("/x", content=body(1000))
            assert seen["calls"] == 1 and seen["bytes"] <= limit and pulled["chunks"] <= limit // len(chunk) + 1
            fits = await c.post("/x", content=body(10))
            return [declared, chunked, fits]

    declared, chunked, fits = asyncio.run(run())
    for r in (declared, chunked):
        assert r.status_code == 413
        error = r.json()["error"]
        assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
        assert f"limit of {limit} bytes (--max_request_bytes)" in error["message"]
    assert "11000 bytes" in declared.json()["error"]["message"]
    assert fits.status_code == 200 and fits.text == "read"


def test_limit_flags_reach_the_config():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_serve_arguments(parser)

    def config(*flags: str) -> ServeConfig:
        return build_config(parser.parse_args(["--model_path", "ckpt", *flags]))[0]

    default = config()
    assert default.max_request_bytes == 64 * MiB
    limits = default.engine.media_limits
    assert (limits.decode_max_pixels, limits.max_media_per_prompt) == (DECODE_MAX_PIXELS, 32)
    given = config("--max_request_bytes", "1000", "--decode_max_pixels", "5000", "--max_media_per_prompt", "3")
    assert given.max_request_bytes == 1000
    assert (given.engine.media_limits.decode_max_pixels, given.engine.media_limits.max_media_per_prompt) == (5000, 3)
    with pytest.raises(ValueError, match="max_request_bytes must be >= 1"):
        config("--max_request_bytes", "0")


# ------------------------------------------------------------------------------------- a live server


async def chunks_of(total: int, size: int = MiB) -> AsyncIterator[bytes]:
    """`total` bytes of a JSON-ish body, streamed (the client never holds them)."""
    piece = b" " * size
    for _ in range(total // size):
        yield piece


def chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def video_part(data: bytes, **options) -> dict:
    return {"type": "video_url", "video_url": {"url": data_uri(data, "video/mp4")}, **options}


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data, "image/png")}}


BODY_LIMIT = 8 * MiB
# (name, path, body: a JSON object, or a function giving the streamed body, status, code, words in the message)
POISONED: list[tuple[str, str, dict | Callable[[], AsyncIterator[bytes]], int, str, str]] = [
    ("corrupt png", "/v1/chat/completions", chat([image_part(png_declaring(64, 48, GARBLED_IDAT))]),
     400, "invalid_media", "cannot read image"),
    ("decompression bomb", "/v1/chat/completions", chat([image_part(png_declaring(30000, 30000, BOMB_IDAT))]),
     400, "media_too_large", "decode_max_pixels"),
    ("image declaring 100M pixels", "/v1/chat/completions",
     chat([image_part(png_declaring(10000, 10000, BOMB_IDAT))]), 400, "media_too_large",
     f"over the configured limit of {DECODE_MAX_PIXELS} pixels"),
    ("video declaring 12000x12000 frames", "/v1/chat/completions", chat([video_part(y4m_declaring(12000, 12000))]),
     400, "media_too_large", "12000x12000"),
    ("video asking 10**9 frames", "/v1/chat/completions",
     chat([video_part(SAMPLE_VIDEO_PATH.read_bytes(), nframes=10**9)]), 400, "invalid_value", "nframes"),
    ("video asking 10**5 x 10**5 frames", "/v1/chat/completions",
     chat([video_part(SAMPLE_VIDEO_PATH.read_bytes(), resized_height=10**5, resized_width=10**5)]),
     400, "invalid_value", "resized_height"),
    ("33 media parts", "/v1/chat/completions", chat([image_part(png())] * 33), 400, "too_many_media",
     "max_media_per_prompt"),
    ("7 MB chat text", "/v1/chat/completions", chat("word " * (7 * MiB // 5)), 400, "context_length_exceeded",
     "refused before tokenizing"),
    ("7 MB raw prompt", "/v1/completions", {"prompt": "x" * 7 * MiB, "max_tokens": 4}, 400,
     "context_length_exceeded", "refused before tokenizing"),
    ("10 MB body, declared", "/v1/chat/completions", chat("y" * 10 * MiB), 413, "request_too_large",
     f"{BODY_LIMIT} bytes"),
    ("10 MB body, chunked", "/v1/chat/completions", lambda: chunks_of(10 * MiB), 413, "request_too_large",
     f"{BODY_LIMIT} bytes"),
]


async def stream_to_the_end(client: httpx.AsyncClient, url: str, i: int, streaming: asyncio.Event) -> dict:
    """A streamed chat request given all the room under max_seq_len (`streaming` set at its first
    token); its status, finish reason and usage."""
    body = {"messages": [{"role": "user", "content": f"Stream {i}: a long story."}], "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    result = {"status": None, "finish": None, "usage": None}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        result["status"] = resp.status_code
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                result["usage"] = event.get("usage") or result["usage"]
                for choice in event["choices"]:
                    result["finish"] = choice["finish_reason"] or result["finish"]
                    if choice["delta"].get("content"):
                        streaming.set()
    return result


async def send_poisoned(client: httpx.AsyncClient, url: str, path: str, body) -> httpx.Response:
    content = body() if callable(body) else json.dumps(body).encode()
    return await client.post(url + path, content=content)


@pytest.fixture(scope="module")
def limited_server(serving_ckpt, media_dir, tmp_path_factory):
    live = start_server(serving_ckpt, media_dir, tmp_path_factory.mktemp("limits") / "server.log",
                        "--max_request_bytes", str(BODY_LIMIT))
    yield live
    stop_server(live)


def test_poisoned_requests_get_4xx_while_long_streams_run(limited_server: LiveServer):
    url = limited_server.url
    before = metrics(url)

    async def run() -> tuple[list[dict], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as c:
            streaming = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.ensure_future(stream_to_the_end(c, url, i, streaming[i])) for i in range(4)]
            # Poisoned requests go once every stream runs (has streamed a token). A stream that ends
            # first ends the wait at once; the timeout only guards against a hang.
            all_streaming = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in streaming)))
            await asyncio.wait([all_streaming, *streams], timeout=REQUEST_TIMEOUT_S,
                               return_when=asyncio.FIRST_COMPLETED)
            assert all_streaming.done() and not any(s.done() for s in streams), \
                f"hang or early end: streams streaming {[e.is_set() for e in streaming]}, " \
                f"ended {[s.done() for s in streams]}"
            poisoned = await asyncio.gather(*(send_poisoned(c, url, path, body) for _, path, body, *_ in POISONED))
            return await asyncio.gather(*streams), poisoned

    streams, poisoned = asyncio.run(run())
    for (name, _, _, status, code, words), r in zip(POISONED, poisoned, strict=True):
        assert r.status_code == status, (name, r.text[:500])
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (name, error)
        assert error["type"] == "invalid_request_error" and error["code"] == code, (name, error)
        assert words in error["message"], (name, error["message"][:500])
    # The poisoned requests, sent while the streams ran, did not touch them: each ran to the end of
    # its room under max_seq_len.
    for s in streams:
        assert s["status"] == 200 and s["finish"] == "length", s
        assert s["usage"]["prompt_tokens"] + s["usage"]["completion_tokens"] == MAX_SEQ, s
    after = metrics(url)
    key = 'qvl_http_requests_total{endpoint="/v1/chat/completions",status="413"}'
    assert after[key] - before.get(key, 0) == 2  # the middleware's answers are counted too
    assert httpx.get(url + "/health", timeout=REQUEST_TIMEOUT_S).status_code == 200
    fresh = httpx.post(url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                       json=chat([{"type": "image_url", "image_url": {"url": data_uri(png(), "image/png"),
                                                                      **SMALL_IMAGE}},
                                  {"type": "text", "text": "What is it?"}]))
    assert fresh.status_code == 200 and fresh.json()["usage"]["completion_tokens"] == 4


# ------------------------------------------------------------------------------------- memory


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in kB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def test_peak_memory_under_oversized_bodies_and_prompts(serving_ckpt, media_dir, tmp_path):
    """With the default --max_request_bytes (64 MiB): 10 bodies of 400 MB (5 declaring their size,
    5 chunked, streamed from generators) and 10 chat prompts of 50 MB at once, while a normal stream
    runs. The 400 MB bodies get 413 (by Content-Length, or once 64 MiB have been read), the 50 MB
    prompts 400 before tokenizing, the stream finishes; the server's peak RSS stays within 2 GiB of
    its idle RSS (measured, printed: run with -s to see it)."""
    live = start_server(serving_ckpt, media_dir, tmp_path / "server.log")
    try:
        url, pid = live.url, live.process.pid
        warm = httpx.post(url + "/v1/chat/completions", json=chat("warm up"), timeout=REQUEST_TIMEOUT_S)
        assert warm.status_code == 200
        idle = memory_kb(pid)["VmRSS"]
        with contextlib.suppress(OSError):  # reset the peak to now (Linux >= 4.0); else the startup peak counts too
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        prompt = json.dumps(chat("a " * (25 * MiB))).encode()  # 50 MB of text, one buffer for all ten
        size = 400 * MiB

        async def run() -> tuple[list[httpx.Response], list[httpx.Response], dict]:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as c:
                stream = asyncio.ensure_future(c.post(url + "/v1/chat/completions",
                                                      json=chat("a normal stream", max_tokens=32, stream=True,
                                                                ignore_eos=True)))
                big = [c.post(url + "/v1/chat/completions", content=chunks_of(size),
                              headers={"Content-Length": str(size)} if i % 2 else {}) for i in range(10)]
                long = [c.post(url + "/v1/chat/completions", content=prompt) for _ in range(10)]
                answers = await asyncio.gather(*big, *long)
                streamed = await stream
                return answers[:10], answers[10:], {"status": streamed.status_code, "text": streamed.text}

        big, long, streamed = asyncio.run(run())
        peak = memory_kb(pid)["VmHWM"]
        assert [r.status_code for r in big] == [413] * 10, [r.text[:200] for r in big]
        assert all(r.json()["error"]["code"] == "request_too_large" for r in big)
        assert [r.status_code for r in long] == [400] * 10, [r.text[:200] for r in long]
        assert all("refused before tokenizing" in r.json()["error"]["message"] for r in long)
        assert streamed["status"] == 200 and '"finish_reason": "length"' in streamed["text"], streamed
        above = (peak - idle) / 1024
        print(f"\nserver RSS idle {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB: {above:.0f} MiB above idle")
        assert above < 2048, f"peak RSS {above:.0f} MiB above idle"
        assert httpx.get(url + "/health", timeout=REQUEST_TIMEOUT_S).status_code == 200
    finally:
        stop_server(live)
