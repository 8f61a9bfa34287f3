"""The wire format of every response: each body and each stream chunk the server sends, streamed
or not, errors included, is validated against its pydantic model (serving/responses.py, strictly:
unknown fields are refused) and against the schema /openapi.json declares for that path, method,
status and media type, so that a drift of either shows here. Each test also pins what clients rely
on: which fields are null and which are left out."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from qwen_vl_triton.serving import responses as wire
from qwen_vl_triton.serving.api_server import create_app
from qwen_vl_triton.serving.async_engine import EngineError, EngineFull
from qwen_vl_triton.serving.config import ServeConfig
from tests.serving.conftest import REQUEST_TIMEOUT_S, LiveServer, start_server, stop_server

MAX_REQUEST_BYTES = 100_000
MESSAGES = [{"role": "user", "content": "Hi!"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}}}
POST_ROUTES = {"/v1/chat/completions": "text/event-stream", "/v1/completions": "text/event-stream",
               "/generate": "application/x-ndjson"}
FAILURES = ("400", "413", "500", "503")


@pytest.fixture(scope="module")
def server(serving_ckpt, media_dir, tmp_path_factory) -> Iterator[LiveServer]:
    """A server with room for a tool prompt (the tiny tokenizer spends a token on 1.5 characters of the
    tools' JSON) and a small body limit, for a 413."""
    live = start_server(serving_ckpt, media_dir, tmp_path_factory.mktemp("responses") / "server.log",
                        "--max_input_length", "1800", "--max_seq_len", "2048",
                        "--max_request_bytes", str(MAX_REQUEST_BYTES))
    yield live
    stop_server(live)


class Declared:
    """A server's /openapi.json, and checks of what it sends against it and the models."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec

    def content(self, path: str, method: str, status: int, media_type: str) -> dict[str, Any]:
        """The declared content of a response (KeyError: not declared)."""
        return self.spec["paths"][path][method]["responses"][str(status)]["content"][media_type]

    def body(self, r: httpx.Response, model: type[BaseModel], path: str, method: str = "post") -> dict[str, Any]:
        """r's JSON body, validated against `model` and the schema declared for r's status."""
        assert r.headers["content-type"] == "application/json", (r.status_code, r.text[:300])
        model.model_validate_json(r.content, strict=True)
        body = r.json()
        jsonschema.Draft202012Validator(self.content(path, method, r.status_code, "application/json")["schema"]
                                        ).validate(body)
        return body

    def sse(self, r: httpx.Response, chunk: type[BaseModel], path: str) -> list[dict[str, Any]]:
        """The chunks of an SSE stream, each validated as an event and its data as `chunk`; the
        stream ends with the data [DONE]."""
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text[:300]
        item = self.content(path, "post", 200, "text/event-stream")["itemSchema"]
        events = r.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], events[-3:]
        chunks = []
        for event in events[:-2]:
            assert event.startswith("data: "), event
            data = event.removeprefix("data: ")
            jsonschema.Draft202012Validator(item).validate({"data": data})
            chunk.model_validate_json(data, strict=True)
            chunks.append(json.loads(data))
            jsonschema.Draft202012Validator(item["properties"]["data"]["contentSchema"]).validate(chunks[-1])
        return chunks

    def ndjson(self, r: httpx.Response, path: str) -> list[dict[str, Any]]:
        """The chunks of a /generate stream (JSON, each followed by a NUL), validated."""
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson", r.text[:300]
        item = self.content(path, "post", 200, "application/x-ndjson")["itemSchema"]
        pieces = r.text.split("\0")
        assert pieces[-1] == "", pieces[-1]
        for piece in pieces[:-1]:
            wire.GenerateResponse.model_validate_json(piece, strict=True)
            jsonschema.Draft202012Validator(item).validate(json.loads(piece))
        return [json.loads(piece) for piece in pieces[:-1]]

    def error(self, r: httpx.Response, status: int, path: str, method: str = "post") -> dict[str, Any]:
        """r's OpenAI error object, checked as a declared `status` of path."""
        assert r.status_code == status, r.text[:300]
        return self.body(r, wire.ErrorResponse, path, method)["error"]


@pytest.fixture(scope="module")
def declared(server) -> Declared:
    return Declared(httpx.get(server.url + "/openapi.json", timeout=REQUEST_TIMEOUT_S).json())


def post(server: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=REQUEST_TIMEOUT_S)


def test_openapi_declares_every_response(declared):
    """Every path and method declares its 200 with a schema; the generation routes also their stream's
    items and their errors (OpenAI's error body), all inlined."""
    paths = declared.spec["paths"]
    assert set(paths) == {*POST_ROUTES, "/v1/models", "/health", "/ready", "/metrics"}
    for path, methods in paths.items():
        for method, operation in methods.items():
            responses = operation["responses"]
            assert "200" in responses, (path, method)
            for status, response in responses.items():
                assert response["description"] and response["content"], (path, method, status)
                for media_type, content in response["content"].items():
                    assert content.get("schema") or content.get("itemSchema"), (path, method, status, media_type)
    error = wire.json_schema(wire.ErrorResponse)
    for path, stream in POST_ROUTES.items():
        responses = paths[path]["post"]["responses"]
        assert set(responses["200"]["content"]) == {"application/json", stream}, path
        assert all(responses[status]["content"]["application/json"]["schema"] == error for status in FAILURES)
    assert set(paths["/health"]["get"]["responses"]) == set(paths["/ready"]["get"]["responses"]) == {"200", "503"}
    assert "$ref" not in json.dumps(paths)


def test_chat_completion_bodies(server, declared):
    """Not streamed: logprobs null unless asked, token_ids and tool_calls left out unless there are
    some; n choices; the usage block."""
    path = "/v1/chat/completions"
    body = declared.body(post(server, path, {"messages": MESSAGES, "max_tokens": 3, "temperature": 0}),
                         wire.ChatCompletionResponse, path)
    (choice,) = body["choices"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"} and choice["logprobs"] is None
    assert set(choice["message"]) == {"role", "content"}
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    body = declared.body(post(server, path, {"messages": MESSAGES, "max_tokens": 3, "n": 2, "seed": 1, "logprobs": True,
                                             "top_logprobs": 2, "return_token_ids": True, "ignore_eos": True}),
                         wire.ChatCompletionResponse, path)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert len(choice["token_ids"]) == len(choice["logprobs"]["content"]) == 3
        assert all(len(e["top_logprobs"]) == 2 for e in choice["logprobs"]["content"])


def test_chat_completion_streams(server, declared):
    """Streamed: the role first, then content pieces, an empty delta with the finish_reason; usage is
    left out without include_usage, else null in every chunk but the last (which has no choices)."""
    path = "/v1/chat/completions"
    request = {"messages": MESSAGES, "max_tokens": 4, "ignore_eos": True, "stream": True}
    chunks = declared.sse(post(server, path, {**request, "temperature": 0}), wire.ChatCompletionStreamResponse, path)
    assert all("usage" not in c and c["object"] == "chat.completion.chunk" for c in chunks)
    choices = [c["choices"][0] for c in chunks]
    assert all(len(c["choices"]) == 1 for c in chunks)
    assert choices[0]["delta"] == {"role": "assistant", "content": ""} and choices[-1]["delta"] == {}
    assert choices[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in choices[:-1])
    assert all(set(c) == {"index", "delta", "logprobs", "finish_reason"} and c["logprobs"] is None for c in choices)
    chunks = declared.sse(post(server, path, {**request, "n": 2, "seed": 2, "logprobs": True, "top_logprobs": 1,
                                              "return_token_ids": True, "stream_options": {"include_usage": True}}),
                          wire.ChatCompletionStreamResponse, path)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    ids: dict[int, list[int]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        ids[choice["index"]] += choice.get("token_ids", [])
        if "token_ids" in choice:
            assert len(choice["logprobs"]["content"]) == len(choice["token_ids"])
    assert [len(v) for v in ids.values()] == [4, 4]


def test_tool_call_bodies(server, declared):
    """tool_calls as sent: whole in the message (content null), and streamed as the call's head (id,
    type, name, arguments "") followed by pieces of its arguments; "auto" on noise is plain content."""
    path = "/v1/chat/completions"
    request = {"messages": MESSAGES, "tools": [WEATHER], "max_tokens": 60, "temperature": 0}
    body = declared.body(post(server, path, {**request, "tool_choice": "required", "parallel_tool_calls": False}),
                         wire.ChatCompletionResponse, path)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = declared.sse(post(server, path, {**request, "tool_choice": named, "stream": True}),
                          wire.ChatCompletionStreamResponse, path)
    pieces = [p for c in chunks for p in c["choices"][0]["delta"].get("tool_calls", [])]
    head, *rest = pieces
    assert set(head) == {"index", "id", "type", "function"} and head["function"] == {"name": "get_weather",
                                                                                      "arguments": ""}
    assert rest and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest)
    json.loads("".join(p["function"]["arguments"] for p in rest))
    body = declared.body(post(server, path, {**request, "max_tokens": 4, "ignore_eos": True}),
                         wire.ChatCompletionResponse, path)
    assert set(body["choices"][0]["message"]) == {"role", "content"}


def test_completion_bodies_and_streams(server, declared):
    """Completions: text choices, logprobs in the legacy layout (tokens, token_logprobs, top_logprobs
    as {token: logprob}, text_offset)."""
    path = "/v1/completions"
    request = {"prompt": "Once upon", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    body = declared.body(post(server, path, {**request, "return_token_ids": True}), wire.CompletionResponse, path)
    (choice,) = body["choices"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert set(choice) == {"index", "text", "logprobs", "finish_reason", "token_ids"}
    assert set(choice["logprobs"]) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert choice["logprobs"]["text_offset"][0] == 0 and len(choice["logprobs"]["top_logprobs"][0]) <= 2
    chunks = declared.sse(post(server, path, {**request, "stream": True, "stream_options": {"include_usage": True}}),
                          wire.CompletionStreamResponse, path)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-2]["choices"][0]["text"] == ""
    assert all(c["usage"] is None and "token_ids" not in c["choices"][0] for c in chunks[:-1])


def test_generate_bodies_and_streams(server, declared):
    """/generate: {"text": [...]} with the prompt before each sample's output; streamed, NUL-separated
    chunks of the whole texts so far."""
    request = {"prompt": "Hello", "max_tokens": 3, "n": 2, "seed": 5, "ignore_eos": True}
    body = declared.body(post(server, "/generate", request), wire.GenerateResponse, "/generate")
    assert len(body["text"]) == 2 and all(t.startswith("Hello") for t in body["text"])
    chunks = declared.ndjson(post(server, "/generate", {**request, "stream": True}), "/generate")
    assert chunks and all(len(c["text"]) == 2 for c in chunks)


def test_models_health_ready_and_metrics(server, declared):
    get = {path: httpx.get(server.url + path, timeout=REQUEST_TIMEOUT_S)
           for path in ("/v1/models", "/health", "/ready", "/metrics")}
    models = declared.body(get["/v1/models"], wire.ModelList, "/v1/models", "get")
    assert models["object"] == "list" and all(m["max_model_len"] == 2048 for m in models["data"])
    assert declared.body(get["/health"], wire.HealthStatus, "/health", "get") == {"status": "ok"}
    assert declared.body(get["/ready"], wire.HealthStatus, "/ready", "get") == {"status": "ok"}
    metrics = get["/metrics"]
    assert metrics.status_code == 200
    declared.content("/metrics", "get", 200, metrics.headers["content-type"])


def test_errors_as_served(server, declared):
    """400s (an invalid field, a model not served, a medium that does not decode), a 413, and a 404
    off the routes: OpenAI's error envelope, param and code null where they do not apply."""
    chat = "/v1/chat/completions"
    error = declared.error(post(server, chat, {"messages": [], "max_tokens": 2}), 400, chat)
    assert (error["param"], error["code"]) == ("messages", "empty_messages")
    error = declared.error(post(server, chat, {"messages": MESSAGES, "model": "nope"}), 400, chat)
    assert error["code"] == "model_not_found"
    undecodable = [{"type": "image_url", "image_url": "notes.txt"}, {"type": "text", "text": "q"}]
    error = declared.error(post(server, "/generate", {"prompt": undecodable, "max_tokens": 2}), 400, "/generate")
    assert error["code"] == "invalid_media"
    error = declared.error(post(server, "/v1/completions", {"prompt": "x" * MAX_REQUEST_BYTES}), 413, "/v1/completions")
    assert error["code"] == "request_too_large"
    missing = httpx.get(server.url + "/nope", timeout=REQUEST_TIMEOUT_S)
    assert missing.status_code == 404
    wire.ErrorResponse.model_validate_json(missing.content, strict=True)
    jsonschema.Draft202012Validator(wire.json_schema(wire.ErrorResponse)).validate(missing.json())
    assert missing.json()["error"] == {"message": "Not Found", "type": "not_found_error", "param": None, "code": None}


def raising(error: Exception) -> Callable[..., Awaitable[None]]:
    """A request handler that fails with `error`."""
    async def handle(*_: Any) -> None:
        raise error

    return handle


def test_errors_without_an_engine(monkeypatch):
    """In process, no model loaded: 503 (server_busy) from the generation routes, /health and /ready
    (with the reason), max_model_len null; and the 500 and 503 of engine failures."""
    app = create_app(ServeConfig(model_path="/models/tiny"))  # no lifespan: no model, no engine
    client = TestClient(app)
    declared = Declared(client.get("/openapi.json").json())
    chat = "/v1/chat/completions"
    request = {"messages": MESSAGES, "max_tokens": 2}
    r = client.post(chat, json=request)
    assert declared.error(r, 503, chat)["code"] == "server_busy"
    assert declared.body(client.get("/health"), wire.HealthStatus, "/health", "get") == {"status": "unavailable"}
    ready = declared.body(client.get("/ready"), wire.HealthStatus, "/ready", "get")
    assert ready == {"status": "unavailable", "reason": "not loaded"}
    models = declared.body(client.get("/v1/models"), wire.ModelList, "/v1/models", "get")
    assert all(m["max_model_len"] is None for m in models["data"])

    monkeypatch.setattr(app.state.server, "chat", raising(EngineError("a step failed")))
    error = declared.error(client.post(chat, json=request), 500, chat)
    assert (error["type"], error["code"]) == ("internal_error", "engine_error")
    monkeypatch.setattr(app.state.server, "chat", raising(EngineFull("the waiting queue is full")))
    r = client.post(chat, json=request)
    assert declared.error(r, 503, chat)["type"] == "server_busy_error" and r.headers["retry-after"] == "1"
