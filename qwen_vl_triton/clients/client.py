"""A small async client for the server's chat endpoint, timing each request as a benchmark needs.

`send_chat` posts one /v1/chat/completions request (streamed or not) and returns a
`RequestRecord`: time to first token (the first chunk with content), the gaps between content
chunks (inter-token latencies; a chunk may carry several tokens when the server coalesces), token
counts from the usage block, and the text.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass
class RequestRecord:
    """One request as the client saw it (times in seconds from the request's send)."""

    index: int
    sample_id: str
    success: bool = False
    error: str | None = None
    status: int | None = None
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    start_s: float = 0.0  # send time relative to the benchmark's start

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object, with the derived time per output token."""
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        return d


def media_part(kind: str, source: str | bytes, options: dict[str, Any] | None = None,
               as_base64: bool = False) -> dict[str, Any]:
    """An OpenAI content part for an image / video: a path (the server reads it inside its
    --allowed_media_dir) or a base64 data URI (the file is read here)."""
    default_mime = "image/png" if kind == "image" else "video/mp4"
    if isinstance(source, bytes):
        url = f"data:{default_mime};base64,{base64.b64encode(source).decode()}"
    elif as_base64:
        mime = mimetypes.guess_type(str(source))[0] or default_mime
        url = f"data:{mime};base64,{base64.b64encode(Path(source).read_bytes()).decode()}"
    else:
        url = str(Path(source).resolve())
    key = "image_url" if kind == "image" else "video_url"
    return {"type": key, key: {"url": url}, **(options or {})}


def chat_payload(model: str | None, content: list[dict[str, Any]], max_tokens: int, stream: bool,
                 temperature: float = 0.0, ignore_eos: bool = False, seed: int | None = None) -> dict[str, Any]:
    """The /v1/chat/completions body of one user message with `content` parts."""
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                               "temperature": temperature, "stream": stream}
    if model:
        payload["model"] = model
    if stream:
        payload["stream_options"] = {"include_usage": True}
    if ignore_eos:
        payload["ignore_eos"] = True
    if seed is not None:
        payload["seed"] = seed
    return payload


async def sse_data(resp: httpx.Response) -> AsyncIterator[str]:
    """The data fields of a server-sent event stream, line by line. Lines end at "\n" (or "\r\n")
    alone: httpx's aiter_lines also splits at U+2028 and the other characters str.splitlines takes
    for line ends, which a server may leave raw inside a JSON string, cutting an event in two."""
    pending = ""
    async for text in resp.aiter_text():
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            if line.startswith("data:"):
                yield line[5:].strip()
    if pending.startswith("data:"):
        yield pending[5:].strip()


async def send_chat(client: httpx.AsyncClient, url: str, payload: dict[str, Any], record: RequestRecord,
                    timeout: float = 600.0) -> RequestRecord:
    """POST payload to {url}/v1/chat/completions and fill `record`; never raises for HTTP or
    network errors (they land in record.error)."""
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    started = time.perf_counter()
    last = started
    try:
        if not payload.get("stream"):
            resp = await client.post(endpoint, json=payload, timeout=timeout)
            record.status = resp.status_code
            record.latency_s = time.perf_counter() - started
            body = resp.json()
            if resp.status_code != 200:
                record.error = body.get("error", {}).get("message", resp.text[:200])
                return record
            choice = body["choices"][0]
            record.text = choice["message"]["content"] or ""
            record.finish_reason = choice.get("finish_reason")
            record.prompt_tokens = body["usage"]["prompt_tokens"]
            record.output_tokens = body["usage"]["completion_tokens"]
            record.ttft_s = record.latency_s if record.output_tokens == 1 else None
            record.success = True
            return record
        async with client.stream("POST", endpoint, json=payload, timeout=timeout) as resp:
            record.status = resp.status_code
            if resp.status_code != 200:
                body_text = (await resp.aread()).decode(errors="replace")
                try:
                    record.error = json.loads(body_text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    record.error = body_text[:200]
                return record
            chunks = 0
            async for data in sse_data(resp):
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = event["error"].get("message")
                    return record
                if event.get("usage"):
                    record.prompt_tokens = event["usage"]["prompt_tokens"]
                    record.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    t = time.perf_counter()
                    if content:
                        chunks += 1
                        record.text += content
                        if record.ttft_s is None:
                            record.ttft_s = t - started
                        else:
                            record.itl_s.append(t - last)
                        last = t
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
            record.latency_s = time.perf_counter() - started
            if not record.output_tokens:
                record.output_tokens = chunks
            record.success = record.finish_reason is not None
            if not record.success:
                record.error = "stream ended without a finish_reason"
    except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
        record.error = f"{type(e).__name__}: {e}"
        record.latency_s = time.perf_counter() - started
    return record


async def first_model(client: httpx.AsyncClient, url: str) -> str:
    """The first model name the server lists; RuntimeError naming the URL when there is no answer."""
    models = url.rstrip("/") + "/v1/models"
    try:
        resp = await client.get(models, timeout=30)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise RuntimeError(f"no model list from {models} ({type(e).__name__}: {e}); is the server up? "
                           f"GET /health answers 200 once it has loaded the model") from None
