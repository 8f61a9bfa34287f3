"""Structured outputs, n > 1 and tool calls through the official openai client against a live
server on random weights: whatever the noise model writes, constrained output must parse and
validate, n samples must share their prompt's KV blocks, and tool calls must come back as
OpenAI's objects, streamed or not. (Tool-call parsing of real model text is tested on scripted
outputs in test_tool_calls.py; here the calls come from constrained runs.)"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from tests.serving.conftest import REQUEST_TIMEOUT_S, SMALL_IMAGE, LiveServer, metrics, start_server, stop_server
from tests.serving.test_api import client, png_bytes

SCHEMA = {
    "type": "object",
    "properties": {
        "animal": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "colours": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "outdoors": {"type": "boolean"},
    },
    "required": ["animal", "count", "colours", "outdoors"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(serving_ckpt, media_dir, tmp_path_factory) -> Iterator[LiveServer]:
    """A server with room for tool prompts: the template lists the tools' JSON in the system turn, and
    the tiny tokenizer spends a token on every 1.5 characters of it (~650 tokens for two small tools)."""
    live = start_server(serving_ckpt, media_dir, tmp_path_factory.mktemp("features") / "server.log",
                        "--max_input_length", "1800", "--max_seq_len", "2048")
    yield live
    stop_server(live)


def image_message(text: str) -> list[dict]:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(60, 80, 0.7)).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri, **SMALL_IMAGE}},
                                         {"type": "text", "text": text}]}]


def test_json_schema_on_an_image_request_validates(server):
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA, "strict": True}}
    resp = c.chat.completions.create(model="qwen2_vl", messages=image_message("Describe it as JSON."),
                                     response_format=fmt, max_tokens=120, temperature=1.0, seed=3, n=2)
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    # the same, streamed: the streamed text is the whole object
    text, finish = "", None
    for chunk in c.chat.completions.create(model="qwen2_vl", messages=image_message("Describe it as JSON."),
                                           response_format=fmt, max_tokens=120, temperature=0.0, stream=True):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    # json_object and vLLM's guided_choice / guided_regex on completions
    obj = c.completions.create(model="qwen2_vl", prompt="JSON:", max_tokens=60, temperature=0.0,
                               extra_body={"response_format": {"type": "json_object"}})
    assert obj.choices[0].text.startswith("{")
    choice = c.completions.create(model="qwen2_vl", prompt="Pick:", max_tokens=10, temperature=1.0,
                                  extra_body={"guided_choice": ["alpha", "beta"]})
    assert choice.choices[0].text in ("alpha", "beta")
    regex = c.completions.create(model="qwen2_vl", prompt="A code:", max_tokens=10, temperature=1.0,
                                 extra_body={"guided_regex": "[A-F]{3}-[0-9]{2}"})
    assert len(regex.choices[0].text) == 6 and regex.choices[0].text[3] == "-"


def test_a_schema_that_does_not_compile_is_a_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "guided_regex": "(unclosed"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_n_samples_share_the_prompt_blocks(server):
    """A long prompt, n = 4, streamed: while all four decode, the KV blocks in use are the prompt's
    once plus a few per sample, far below four prompts' worth."""
    c = client(server)
    prompt = "Tell me about the sea, the sky and the mountains. " * 14  # under the server's max_input_length
    prompt_tokens = c.completions.create(model="qwen2_vl", prompt=prompt, max_tokens=1).usage.prompt_tokens
    block_size = 16  # the server's default --block_size
    prompt_blocks = prompt_tokens // block_size
    used: list[float] = []
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if len(seen) == 4:
                used.append(metrics(server.url)["qvl_kv_cache_blocks_used"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    texts = [""] * 4
    finishes: list[str | None] = [None] * 4
    usage = None
    try:
        for chunk in c.completions.create(model="qwen2_vl", prompt=prompt, max_tokens=60, n=4, temperature=1.0,
                                          seed=1, stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True}):
            usage = chunk.usage or usage
            for ch in chunk.choices:
                seen.add(ch.index)
                texts[ch.index] += ch.text
                finishes[ch.index] = ch.finish_reason or finishes[ch.index]
    finally:
        done.set()
        watcher.join()
    assert finishes == ["length"] * 4 and len(set(texts)) > 1
    assert usage is not None and usage.prompt_tokens == prompt_tokens and usage.completion_tokens == 4 * 60
    assert used, "no /metrics sample was taken while the four samples decoded"
    assert max(used) <= prompt_blocks + 4 * (60 // block_size + 2), (max(used), prompt_blocks)
    assert 4 * prompt_blocks > prompt_blocks + 4 * (60 // block_size + 2)  # the bound does tell sharing apart
    # non-streamed: n choices with their own indexes and finish reasons
    resp = c.chat.completions.create(model="qwen2_vl", messages=[{"role": "user", "content": "Hi!"}], n=3,
                                     max_tokens=5, temperature=1.0, seed=4)
    assert sorted(ch.index for ch in resp.choices) == [0, 1, 2]
    assert all(ch.finish_reason in ("stop", "length") for ch in resp.choices)
    assert 3 <= resp.usage.completion_tokens <= 15  # the three samples' tokens together
    gen = httpx.post(server.url + "/generate", json={"prompt": "Hi", "n": 2, "max_tokens": 3, "temperature": 1.0},
                     timeout=REQUEST_TIMEOUT_S)
    assert gen.status_code == 200 and len(gen.json()["text"]) == 2


def _assert_calls(calls, tools: list[dict]) -> None:
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_constrained_tool_calls_parse_streamed_or_not(server, tool_choice):
    c = client(server)
    messages = image_message("What is the weather where this was taken?")
    tools = [WEATHER, CLOCK]
    # One call: on noise an array of calls would grow until max_tokens.
    resp = c.chat.completions.create(model="qwen2_vl", messages=messages, tools=tools, tool_choice=tool_choice,
                                     parallel_tool_calls=False, max_tokens=150, temperature=0.0)
    choice = resp.choices[0]
    _assert_calls(choice.message.tool_calls, tools)
    assert choice.finish_reason == ("tool_calls" if tool_choice == "required" else "stop")
    if tool_choice != "required":
        assert [call.function.name for call in choice.message.tool_calls] == ["get_weather"]
    # streamed: delta.tool_calls pieces, assembled by index, give the same calls
    calls, finish = streamed_calls(c, messages=messages, tools=tools, tool_choice=tool_choice,
                                   parallel_tool_calls=False, max_tokens=150, temperature=0.0)
    assert finish == choice.finish_reason
    assert calls == [(call.function.name, json.loads(call.function.arguments)) for call in choice.message.tool_calls]


def streamed_calls(c: openai.OpenAI, **kw) -> tuple[list[tuple[str, dict]], str | None]:
    """The (name, arguments) calls of a streamed chat request, assembled by index from its
    delta.tool_calls pieces, and its finish reason."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in c.chat.completions.create(model="qwen2_vl", stream=True, **kw):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for piece in ch.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"name": "", "arguments": ""})
                call["name"] += piece.function.name or "" if piece.function else ""
                call["arguments"] += piece.function.arguments or "" if piece.function else ""
    return [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())], finish


def test_tool_results_are_accepted_on_the_next_turn_and_auto_is_plain_on_noise(server):
    c = client(server)
    first = c.chat.completions.create(model="qwen2_vl", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                      tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                      max_tokens=120, temperature=0.0)
    call = first.choices[0].message.tool_calls[0]
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": -3})}]
    second = c.chat.completions.create(model="qwen2_vl", messages=messages, tools=[WEATHER], max_tokens=8,
                                       temperature=0.0, extra_body={"ignore_eos": True})
    choice = second.choices[0]  # "auto" on noise: no <tool_call> block, so plain content
    assert choice.finish_reason == "length" and choice.message.tool_calls is None and choice.message.content
    # the tool result reached the prompt: it is longer than the same turn without it
    without = c.chat.completions.create(model="qwen2_vl", messages=messages[:2], tools=[WEATHER], max_tokens=1)
    assert second.usage.prompt_tokens > without.usage.prompt_tokens


def test_unknown_tool_choice_is_400(server):
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model="qwen2_vl", messages=[{"role": "user", "content": "hi"}],
                                               tools=[WEATHER], max_tokens=2,
                                               tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.body["param"] == "tool_choice"
