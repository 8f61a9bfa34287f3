"""Chat templates at the server: tools on a checkpoint whose template has no tools section (Qwen2-VL's),
`--chat_template`, and a request's own `chat_template` / `chat_template_kwargs` (vLLM's fields).

One live server on the tiny Qwen2-VL checkpoint, started with `--chat_template FILE` (Qwen2-VL's
template with another default system message: still no tools section). What reaches the model is
checked through usage.prompt_tokens against the same conversation rendered here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from qwen_vl_triton.engine.preprocess import QWEN_TOOLS_TEMPLATE, Preprocessor
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.modeling.config import load_config
from qwen_vl_triton.modeling.processing import ImageProcessorConfig
from qwen_vl_triton.modeling.tokenizer import load_tokenizer
from qwen_vl_triton.serving.prompting import Preparer
from qwen_vl_triton.serving.protocol import APIError, ChatMessage, parse_chat_request
from qwen_vl_triton.testing.tiny_checkpoint import CHAT_TEMPLATE, DEFAULT_SYSTEM_MESSAGE, make_tiny_checkpoint
from tests.serving.conftest import REQUEST_TIMEOUT_S, LiveServer, start_server, stop_server
from tests.serving.test_api import client
from tests.serving.test_openai_features import CLOCK, WEATHER, _assert_calls, streamed_calls

SERVER_TEMPLATE = CHAT_TEMPLATE.replace(DEFAULT_SYSTEM_MESSAGE, "You are a tiny test model.")
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def qwen2_vl_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen2-vl-tiny"), "qwen2_vl", seed=7)


@pytest.fixture(scope="module")
def server(qwen2_vl_ckpt, media_dir, tmp_path_factory) -> Iterator[LiveServer]:
    """Room for tool prompts, as test_openai_features' server; --chat_template from a file."""
    folder = tmp_path_factory.mktemp("templates")
    (folder / "chat.jinja").write_text(SERVER_TEMPLATE)
    live = start_server(qwen2_vl_ckpt, media_dir, folder / "server.log", "--max_input_length", "1800",
                        "--max_seq_len", "2048", "--chat_template", str(folder / "chat.jinja"),
                        "--trust_request_chat_template")
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def tokenizer(qwen2_vl_ckpt):
    return load_tokenizer(qwen2_vl_ckpt)


def _prompt_tokens(tokenizer, template: str, messages: list[dict], tools: list[dict] | None = None) -> int:
    """Tokens of `messages` rendered here (user text as a text part, as the server passes it)."""
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} if m["role"] == "user" else m
             for m in messages]
    text = tokenizer.apply_chat_template(parts, tools=tools, chat_template=template, add_generation_prompt=True)
    return len(tokenizer.encode(text))


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_forced_tool_calls_on_a_template_without_tools(server, tokenizer, tool_choice):
    """Named and required tool choice on Qwen2-VL's template, streamed or not: the tools reach the
    prompt in Qwen's format (the fallback template), and the calls come back."""
    c = client(server)
    messages = [{"role": "user", "content": "What is the weather in Oslo, and the time?"}]
    tools = [WEATHER, CLOCK]
    kw = dict(messages=messages, tools=tools, tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=150,
              temperature=0.0)
    resp = c.chat.completions.create(model="qwen2_vl", **kw)
    choice = resp.choices[0]
    _assert_calls(choice.message.tool_calls, tools)
    assert choice.finish_reason == ("tool_calls" if tool_choice == "required" else "stop")
    assert resp.usage.prompt_tokens == _prompt_tokens(tokenizer, QWEN_TOOLS_TEMPLATE, messages, tools)
    calls, finish = streamed_calls(c, **kw)
    assert finish == choice.finish_reason
    assert calls == [(call.function.name, json.loads(call.function.arguments)) for call in choice.message.tool_calls]


def test_auto_and_tool_results_on_a_template_without_tools(server, tokenizer):
    """tool_choice auto offers the tools in Qwen's format; an assistant call and its tool results
    on the next turn are rendered as Qwen2.5 renders them (one user turn of <tool_response>s);
    without tools or tool turns the server's --chat_template renders the conversation."""
    c = client(server)
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    plain = c.chat.completions.create(model="qwen2_vl", messages=question, max_tokens=1)
    assert plain.usage.prompt_tokens == _prompt_tokens(tokenizer, SERVER_TEMPLATE, question)
    auto = c.chat.completions.create(model="qwen2_vl", messages=question, tools=[WEATHER], max_tokens=4,
                                     temperature=0.0)
    assert auto.usage.prompt_tokens == _prompt_tokens(tokenizer, QWEN_TOOLS_TEMPLATE, question, [WEATHER])
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Oslo", "unit": "C"}'}}
    turns = [*question, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "-3"},
             {"role": "tool", "tool_call_id": "call_1", "content": "snow"}]
    text, finish = "", None
    for chunk in c.chat.completions.create(model="qwen2_vl", messages=turns, tools=[WEATHER], max_tokens=4,
                                           temperature=0.0, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert finish in ("stop", "length", "tool_calls")
    rendered = [*question, {**turns[1], "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}}]}, *turns[2:]]
    assert usage.prompt_tokens == _prompt_tokens(tokenizer, QWEN_TOOLS_TEMPLATE, rendered, [WEATHER])


def test_a_request_chat_template(server, tokenizer):
    """A request's chat_template replaces the server's for it, chat_template_kwargs reach it, and one
    that cannot render (a syntax error, or raising) is a 400 naming chat_template."""
    c = client(server)
    messages = [{"role": "user", "content": "Hi there"}]
    own = "{{ greeting }}{{ messages[0]['content'][0]['text'] }}"
    resp = c.chat.completions.create(model="qwen2_vl", messages=messages, max_tokens=1, extra_body={
        "chat_template": own, "chat_template_kwargs": {"greeting": "Hello. "}})
    assert resp.usage.prompt_tokens == len(tokenizer.encode("Hello. Hi there"))
    for bad in ("{% if %}", "{{ raise_exception('no') }}"):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="qwen2_vl", messages=messages, max_tokens=1,
                                      extra_body={"chat_template": bad})
        assert err.value.body["param"] == "chat_template", err.value.body
    r = httpx.post(server.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S, json={
        "messages": messages, "max_tokens": 1, "chat_template_kwargs": {"tools": []}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text


def test_chat_template_fields_parse_and_refuse(qwen2_vl_ckpt):
    """The request fields as parsed, and the Preparer's 400s, without a server."""
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ x }}",
            "chat_template_kwargs": {"x": 1}}
    req = parse_chat_request(body)
    assert (req.chat_template, req.chat_template_kwargs) == ("{{ x }}", {"x": 1})
    for field, value in (("chat_template", ""), ("chat_template", 3), ("chat_template_kwargs", [1])):
        with pytest.raises(APIError) as err:
            parse_chat_request({**body, field: value})
        assert err.value.param == field, err.value
    pre = Preprocessor(load_tokenizer(qwen2_vl_ckpt), load_config(qwen2_vl_ckpt),
                       ImageProcessorConfig.from_pretrained(qwen2_vl_ckpt), 1000)
    preparer = Preparer(pre, None)
    messages = [ChatMessage("user", ["hi"])]
    params = SamplingParams(max_tokens=1)
    prepared = preparer.prepare_chat(messages, params, chat_template="{{ x }}", chat_template_kwargs={"x": "ab"})
    assert prepared.ids == pre.tokenizer.encode("ab")
    for kw, param in ((dict(chat_template="{% for %}"), "chat_template"),
                      (dict(chat_template_kwargs={"add_generation_prompt": False}), "chat_template_kwargs")):
        with pytest.raises(APIError) as err:
            preparer.prepare_chat(messages, params, **kw)
        assert err.value.param == param and err.value.status == 400, err.value



def test_a_request_chat_template_needs_the_operators_trust():
    """Without --trust_request_chat_template a request's template is a 400 naming it, before any work."""
    from fastapi.testclient import TestClient

    from qwen_vl_triton.engine.sampling_defaults import NO_DEFAULTS
    from qwen_vl_triton.serving.api_server import create_app
    from qwen_vl_triton.serving.config import ServeConfig

    no_model = SimpleNamespace(sampling_defaults=NO_DEFAULTS)  # no lifespan: no model, no engine
    client = TestClient(create_app(ServeConfig(model_path="/models/tiny"), llm=no_model))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "chat_template": "{{ messages }}"})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("chat_template", "untrusted_chat_template")
