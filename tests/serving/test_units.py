"""The server's parts on hand-made cases, no server running: the MindIE config mapping, streamed-text
deltas, the engine's per-request streams, request parsing (every rule with its param and code) and
the OpenAPI description of the request bodies."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton.serving.api_server import TextDelta
from qwen_vl_triton.serving.config import ServeConfig, read_mindie_config, strip_json_comments

# ------------------------------------------------------------------------------------- MindIE config

MINDIE_7B = """
{
    "ServerConfig": {
        "port" : 1025,
        "managementPort" : 1026,
        "httpsEnabled": false,
    },
    "BackendConfig": {
        "npuDeviceIds": [
            [0,1]
        ],
        "ModelDeployConfig": {
            "maxSeqLen": 32768,
            "maxInputTokenLen": 32768,
            "ModelConfig": [
                {
                    "modelInstanceType": "Standard",
                    "modelName": "qwen2_vl",
                    "modelWeightPath": "/data/Qwen2-VL-7B-Instruct",
                    "worldSize": 2,
                    "npuMemSize": 10, #KV Cache的显存大小，单位是GB，请勿设置为-1，需要给vit预留空间。
                }
            ]
        },
        "ScheduleConfig": {
            "maxPrefillTokens": 32768,
            "maxIterTimes": 2048, # 模型最大输出长度
        }
    }
}
"""


def test_mindie_config_mapping(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(MINDIE_7B)
    values, ignored = read_mindie_config(path)
    assert values == {"port": 1025, "max_seq_len": 32768, "max_input_length": 32768,
                      "served_model_name": ["qwen2_vl"], "model_path": "/data/Qwen2-VL-7B-Instruct",
                      "kv_cache_gb": 10.0, "max_prefill_tokens": 32768, "max_iter_times": 2048,
                      "tensor_parallel_size": 2}
    assert "ServerConfig.managementPort" in ignored and "BackendConfig.npuDeviceIds" in ignored
    path.write_text(MINDIE_7B.replace('"httpsEnabled": false', '"httpsEnabled": true'))
    with pytest.raises(ValueError, match="httpsEnabled"):
        read_mindie_config(path)
    assert json.loads(strip_json_comments('{"a": "# not a comment", "b": [1, 2,], } // end')) == \
        {"a": "# not a comment", "b": [1, 2]}
    assert ServeConfig(model_path="/x/Qwen2-VL-7B").model_names() == ["Qwen2-VL-7B", "qwen2_vl"]


# ------------------------------------------------------------------------------------- stream deltas


def test_text_delta_holds_back_partial_characters_and_stop_prefixes():
    d = TextDelta([])
    assert d.update("ab\ufffd", False) == "ab"       # an unfinished UTF-8 character waits
    assert d.update("ab\u4e2d", False) == "\u4e2d"
    assert d.update("ab\u4e2d\ufffd", True) == "\ufffd"  # at the end it is what it is
    s = TextDelta(["STOP"])
    assert s.update("hello ST", False) == "hello"     # 3 characters held back
    assert s.update("hello STO", False) == " "
    assert s.update("hello ", True) == ""             # the engine cut the stop string away
    assert s.sent == "hello "


# ------------------------------------------------------------------------------------- request streams


def _output(n: int, finished: bool = False):
    from qwen_vl_triton.engine.outputs import CompletionOutput, RequestOutput

    sample = CompletionOutput(0, "x" * n, list(range(n)), [0.0] * n, [None] * n, "length" if finished else None,
                              [0.1] * n)
    return RequestOutput("r", 3, 0, [sample], finished, 0.1, 0.2)


def test_request_stream_keeps_the_newest_output_and_raises_errors():
    import asyncio

    from qwen_vl_triton.serving.async_engine import EngineError, RequestStream

    class FakeEngine:
        aborted: list[str] = []

        def abort(self, request_id: str) -> None:
            self.aborted.append(request_id)

    async def run() -> None:
        engine = FakeEngine()
        s = RequestStream(engine, "r")
        for n in (1, 2, 3):  # a slow reader: three steps arrive before it reads
            s.put(_output(n))
        assert len((await s.next()).outputs[0].token_ids) == 3
        s.put(_output(4, finished=True))
        assert (await s.next()).finished and s.finished
        s.close()
        assert engine.aborted == []  # finished: nothing to abort
        t = RequestStream(engine, "t")
        t.put(_output(1))
        t.put(EngineError("boom"))
        with pytest.raises(EngineError):
            await asyncio.wait_for(t.next(), 5)
        u = RequestStream(engine, "u")
        u.close()
        u.close()
        assert engine.aborted == ["u"]  # an unfinished stream aborts once

    asyncio.run(run())


# ------------------------------------------------------------------------------------- request parsing

CHAT_HI = {"messages": [{"role": "user", "content": "hi"}]}
IMAGE = {"type": "image_url", "image_url": "/data/img.jpg"}


def _chat(**fields):
    return {**CHAT_HI, **fields}


def _user(*parts):
    return {"messages": [{"role": "user", "content": list(parts)}]}


def test_mindie_bodies_parse():
    """MindIE's curl examples: /generate with a list prompt (image_url a plain string, no Content-Type
    needed: parse_json_body takes bytes), and the OpenAI-style chat body with a plain-string image_url."""
    from qwen_vl_triton.serving.protocol import MediaRef, parse_chat_request, parse_generate_request, parse_json_body

    raw = (b'{"prompt": [{"type": "image_url", "image_url": "/path/img.jpg"}, {"type": "text", '
           b'"text": "Describe it."}], "max_tokens": 512, "stream": false, "do_sample": false}')
    req = parse_generate_request(parse_json_body(raw))
    assert req.raw_prompt is None and len(req.messages) == 1 and req.messages[0].role == "user"
    image, text = req.messages[0].parts
    assert image == MediaRef("image", "/path/img.jpg", {}, "prompt[0].image_url") and text == "Describe it."
    assert req.params.max_tokens == 512 and req.max_tokens_given and req.params.greedy and not req.stream
    text_first = parse_generate_request({"prompt": [{"type": "text", "text": "Q"}, IMAGE], "do_sample": True})
    assert text_first.messages[0].parts[1].param == "prompt[1].image_url" and text_first.params.temperature == 1.0
    raw_text = parse_generate_request({"prompt": "Once upon", "temperature": 0.5, "do_sample": False})
    assert raw_text.raw_prompt == "Once upon" and raw_text.messages is None and raw_text.params.temperature == 0
    chat = parse_chat_request({"model": "qwen2_vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": "/path/img.jpg"}, {"type": "text", "text": "What is it?"}]}],
        "max_tokens": 512, "stream": False, "temperature": 0})
    assert chat.model == "qwen2_vl" and chat.messages[0].parts == [
        MediaRef("image", "/path/img.jpg", {}, "messages[0].content[0].image_url"), "What is it?"]
    assert chat.params.temperature == 0.0 and chat.tools is None and chat.tool_choice == "none"


def test_part_shapes_and_media_options():
    from qwen_vl_triton.serving.protocol import parse_chat_request

    parts = parse_chat_request(_user(
        {"type": "image_url", "image_url": {"url": "a.png", "max_pixels": 3136, "detail": "high"}, "min_pixels": 784},
        {"type": "image", "image": "b.png", "resized_height": 56, "fps": 2},   # fps: not an image option, ignored
        {"type": "image", "image_url": {"url": "c.png"}},                      # qwen-vl-utils' other spelling
        {"type": "video_url", "video_url": "v.mp4", "fps": 1.5, "nframes": 8},
        {"type": "video", "video": {"url": "w.mp4", "max_pixels": 100}, "max_pixels": 50},
        "bare text", {"type": "text"})).messages[0].parts
    a, b, c, v, w, bare, empty = parts
    assert (a.kind, a.url, a.options, a.param) == ("image", "a.png", {"min_pixels": 784, "max_pixels": 3136},
                                                  "messages[0].content[0].image_url")
    assert (b.url, b.options, b.param) == ("b.png", {"resized_height": 56}, "messages[0].content[1].image")
    assert (c.url, c.param) == ("c.png", "messages[0].content[2].image")
    assert (v.kind, v.options) == ("video", {"fps": 1.5, "nframes": 8}) and isinstance(v.options["nframes"], int)
    assert w.options == {"max_pixels": 100}  # the url object's option wins over the part's
    assert (bare, empty) == ("bare text", "")


# (name, parser, body, param, code): every rule the hand-written parser had keeps its param and code
BAD_BODIES = [
    ("messages missing", "chat", {}, "messages", "missing_required_parameter"),
    ("messages not a list", "chat", {"messages": "hello"}, "messages", "invalid_type"),
    ("messages empty", "chat", {"messages": []}, "messages", "empty_messages"),
    ("message not an object", "chat", {"messages": ["hi"]}, "messages[0]", "invalid_type"),
    ("bad role", "chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ("user content missing", "chat", {"messages": [{"role": "user"}]}, "messages[0].content",
     "missing_required_parameter"),
    ("content a number", "chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "invalid_type"),
    ("no user message", "chat", {"messages": [{"role": "system", "content": "x"}]}, "messages", "invalid_value"),
    ("system not first", "chat", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "messages", "invalid_value"),
    ("media in a system message", "chat", {"messages": [{"role": "system", "content": [IMAGE]},
                                                        {"role": "user", "content": "a"}]},
     "messages[0].content", "invalid_value"),
    ("part not an object", "chat", _user(5), "messages[0].content[0]", "invalid_type"),
    ("unknown part type", "chat", _user({"type": "audio", "audio": "x"}), "messages[0].content[0].type",
     "invalid_value"),
    ("part type missing", "chat", _user({"text": "x"}), "messages[0].content[0].type", "invalid_value"),
    ("audio part", "chat", _user({"type": "input_audio", "input_audio": {}}), "messages[0].content[0].type",
     "unsupported_content_type"),
    ("file part", "chat", _user({"type": "file", "file": {}}), "messages[0].content[0].type",
     "unsupported_content_type"),
    ("text not a string", "chat", _user({"type": "text", "text": 3}), "messages[0].content[0].text", "invalid_type"),
    ("image_url missing", "chat", _user({"type": "image_url"}), "messages[0].content[0].image_url", "invalid_type"),
    ("image_url empty", "chat", _user({"type": "image_url", "image_url": ""}), "messages[0].content[0].image_url",
     "invalid_type"),
    ("url object without url", "chat", _user({"type": "image_url", "image_url": {"detail": "low"}}),
     "messages[0].content[0].image_url", "invalid_type"),
    ("video as frames", "chat", _user({"type": "video", "video": ["f1.jpg", "f2.jpg"]}),
     "messages[0].content[0].video", "unsupported_media"),
    ("option not a number", "chat", _user({**IMAGE, "max_pixels": "big"}), "messages[0].content[0].max_pixels",
     "invalid_type"),
    ("option a bool, in the url object", "chat",
     _user({"type": "video_url", "video_url": {"url": "v.mp4", "fps": True}}),
     "messages[0].content[0].video_url.fps", "invalid_type"),
    ("option not finite", "chat", _user({**IMAGE, "min_pixels": float("inf")}), "messages[0].content[0].min_pixels",
     "invalid_type"),
    ("NUL in a url", "chat", _user({"type": "image_url", "image_url": "a\0.png"}), "messages[0].content[0].image_url",
     "invalid_value"),
    ("max_tokens a string", "chat", _chat(max_tokens="5"), "max_tokens", "invalid_type"),
    ("max_tokens a float", "chat", _chat(max_tokens=5.0), "max_tokens", "invalid_type"),
    ("top_p a bool", "chat", _chat(top_p=True), "top_p", "invalid_type"),
    ("temperature not finite", "chat", _chat(temperature=float("nan")), "temperature", "invalid_type"),
    ("top_k a bool", "chat", _chat(top_k=False), "top_k", "invalid_type"),
    ("seed negative", "chat", _chat(seed=-3), "seed", "invalid_value"),
    ("seed too large", "chat", _chat(seed=2**63), "seed", "invalid_value"),
    ("stop empty string", "chat", _chat(stop=""), "stop", "invalid_type"),
    ("stop list with a number", "chat", _chat(stop=["a", 1]), "stop", "invalid_type"),
    ("stop_token_ids with a bool", "chat", _chat(stop_token_ids=[1, True]), "stop_token_ids", "invalid_type"),
    ("cache_salt empty", "chat", _chat(cache_salt=""), "cache_salt", "invalid_value"),
    ("logprobs an int on chat", "chat", _chat(logprobs=2), "logprobs", "invalid_type"),
    ("top_logprobs without logprobs", "chat", _chat(top_logprobs=2), "top_logprobs", "invalid_value"),
    ("top_logprobs over 20", "chat", _chat(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
    ("stream_options without stream", "chat", _chat(stream_options={"include_usage": True}), "stream_options",
     "invalid_value"),
    ("stream_options not an object", "chat", _chat(stream=True, stream_options=1), "stream_options", "invalid_type"),
    ("include_usage not a bool", "chat", _chat(stream=True, stream_options={"include_usage": "yes"}),
     "stream_options.include_usage", "invalid_type"),
    ("model not a string", "chat", _chat(model=3), "model", "invalid_type"),
    ("echo", "completions", {"prompt": "a", "echo": True}, "echo", "unsupported_parameter"),
    ("suffix", "completions", {"prompt": "a", "suffix": "b"}, "suffix", "unsupported_parameter"),
    ("logit_bias", "chat", _chat(logit_bias={"1": 2}), "logit_bias", "unsupported_parameter"),
    ("functions", "chat", _chat(functions=[{"name": "f"}]), "functions", "unsupported_parameter"),
    ("function_call", "chat", _chat(function_call="auto"), "function_call", "unsupported_parameter"),
    ("refused before the rest", "completions", {"echo": True}, "echo", "unsupported_parameter"),
    ("completions without prompt", "completions", {"max_tokens": 3}, "prompt", "invalid_type"),
    ("completions prompt a number", "completions", {"prompt": 3}, "prompt", "invalid_type"),
    ("completions batched prompt", "completions", {"prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
    ("completions token prompt", "completions", {"prompt": [1, 2]}, "prompt", "unsupported_parameter"),
    ("completions empty prompt", "completions", {"prompt": ""}, "prompt", "invalid_value"),
    ("completions logprobs over 20", "completions", {"prompt": "a", "logprobs": 21}, "logprobs", "invalid_value"),
    ("completions tools", "completions", {"prompt": "a", "tools": [{"type": "function"}]}, "tools",
     "unsupported_parameter"),
    ("generate without prompt", "generate", {}, "prompt", "invalid_type"),
    ("generate empty prompt", "generate", {"prompt": ""}, "prompt", "invalid_value"),
    ("generate empty prompt list", "generate", {"prompt": []}, "prompt", "invalid_value"),
    ("generate bad part", "generate", {"prompt": [{"type": "image_url", "image_url": 5}]}, "prompt[0].image_url",
     "invalid_type"),
    ("generate do_sample not a bool", "generate", {"prompt": "a", "do_sample": 0}, "do_sample", "invalid_type"),
    # n, best_of
    ("n over the maximum", "chat", _chat(n=17), "n", "invalid_value"),
    ("n 0", "completions", {"prompt": "a", "n": 0}, "n", "invalid_value"),
    ("n a float", "generate", {"prompt": "a", "n": 2.0}, "n", "invalid_type"),
    ("best_of other than n", "chat", _chat(n=2, best_of=3), "best_of", "unsupported_parameter"),
    # structured outputs
    ("response_format unknown type", "chat", _chat(response_format={"type": "xml"}), "response_format.type",
     "invalid_value"),
    ("response_format not an object", "chat", _chat(response_format="json"), "response_format", "invalid_type"),
    ("json_schema without schema", "chat", _chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema.schema", "missing_required_parameter"),
    ("json_schema without name", "completions",
     {"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", "missing_required_parameter"),
    ("guided_json not JSON", "chat", _chat(guided_json="{not json"), "guided_json", "invalid_value"),
    ("guided_json an array", "chat", _chat(guided_json="[1]"), "guided_json", "invalid_value"),
    ("guided_json a number", "chat", _chat(guided_json=1), "guided_json", "invalid_type"),
    ("guided_regex empty", "generate", {"prompt": "a", "guided_regex": ""}, "guided_regex", "invalid_value"),
    ("guided_choice empty", "chat", _chat(guided_choice=[]), "guided_choice", "invalid_value"),
    ("guided_choice with an empty string", "chat", _chat(guided_choice=["a", ""]), "guided_choice", "invalid_value"),
    ("guided_grammar not a string", "chat", _chat(guided_grammar=["x"]), "guided_grammar", "invalid_type"),
    ("two constraints", "chat", _chat(response_format={"type": "json_object"}, guided_regex="a+"), "guided_regex",
     "invalid_value"),
    ("two guided constraints", "completions", {"prompt": "a", "guided_json": {}, "guided_choice": ["x"]},
     "guided_choice", "invalid_value"),
]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
BAD_BODIES += [
    ("tools not a list", "chat", _chat(tools={}), "tools", "invalid_type"),
    ("tools empty", "chat", _chat(tools=[]), "tools", "invalid_value"),
    ("tool type", "chat", _chat(tools=[{**TOOL, "type": "retrieval"}]), "tools[0].type", "invalid_value"),
    ("tool name with a space", "chat", _chat(tools=[{"type": "function", "function": {"name": "get weather"}}]),
     "tools[0].function.name", "invalid_value"),
    ("tool name too long", "chat", _chat(tools=[{"type": "function", "function": {"name": "f" * 65}}]),
     "tools[0].function.name", "invalid_value"),
    ("tool parameters not an object", "chat",
     _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
     "tools[0].function.parameters", "invalid_type"),
    ("tool names twice", "chat", _chat(tools=[TOOL, TOOL]), "tools[1].function.name", "invalid_value"),
    ("tool_choice unknown", "chat", _chat(tools=[TOOL], tool_choice="any"), "tool_choice", "invalid_value"),
    ("tool_choice a number", "chat", _chat(tools=[TOOL], tool_choice=1), "tool_choice", "invalid_type"),
    ("tool_choice without tools", "chat", _chat(tool_choice="auto"), "tool_choice", "invalid_value"),
    ("tool_choice names an unknown function", "chat",
     _chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}), "tool_choice",
     "invalid_value"),
    ("tool_choice required with a constraint", "chat",
     _chat(tools=[TOOL], tool_choice="required", guided_regex="a"), "tool_choice", "invalid_value"),
    ("named tool_choice with a constraint", "chat",
     _chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
           response_format={"type": "json_object"}), "tool_choice", "invalid_value"),
    ("parallel_tool_calls not a bool", "chat", _chat(tools=[TOOL], parallel_tool_calls="yes"), "parallel_tool_calls",
     "invalid_type"),
    ("tool message without tool_call_id", "chat",
     {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "sunny"}]},
     "messages[1].tool_call_id", "missing_required_parameter"),
    ("tool message with an image", "chat",
     {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "c", "content": [IMAGE]}]},
     "messages[1].content", "invalid_value"),
    ("tool call arguments not JSON", "chat",
     {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
         {**CALL, "function": {"name": "f", "arguments": "{city"}}]}]},
     "messages[1].tool_calls[0].function.arguments", "invalid_value"),
    ("tool call arguments not an object", "chat",
     {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
         {**CALL, "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[1].tool_calls[0].function.arguments", "invalid_value"),
    ("tool call without id", "chat",
     {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
         {"function": CALL["function"]}]}]}, "messages[1].tool_calls[0].id", "missing_required_parameter"),
    ("tool calls in a user message", "chat", {"messages": [{"role": "user", "content": "a", "tool_calls": [CALL]}]},
     "messages[0].tool_calls", "invalid_value"),
]


@pytest.mark.parametrize("name,parser,body,param,code", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_openai_400s(name, parser, body, param, code):
    from qwen_vl_triton.serving.protocol import (
        APIError,
        parse_chat_request,
        parse_completion_request,
        parse_generate_request,
    )

    parse = {"chat": parse_chat_request, "completions": parse_completion_request,
             "generate": parse_generate_request}[parser]
    with pytest.raises(APIError) as e:
        parse(body)
    error = e.value.body()["error"]
    assert (error["param"], error["code"], e.value.status) == (param, code, 400), error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_field_rules():
    from qwen_vl_triton.serving.protocol import parse_chat_request, parse_completion_request

    req = parse_chat_request(_chat(temperature=1, top_k=0, max_tokens=7, max_completion_tokens=9, stop="END",
                                   stop_token_ids=[3, 4], seed=2**63 - 1, cache_salt="tenant", ignore_eos=True,
                                   logprobs=True, top_logprobs=3, stream=True,
                                   stream_options={"include_usage": True}, return_token_ids=True,
                                   user="u-1", metadata={"x": 1}, store=False))  # OpenAI SDK fields: ignored
    p = req.params
    assert isinstance(p.temperature, float) and p.temperature == 1.0 and p.top_k == -1
    assert p.max_tokens == 9 and req.max_tokens_given  # max_completion_tokens wins
    assert p.stop == ["END"] and p.stop_token_ids == [3, 4] and p.seed == 2**63 - 1 and p.ignore_eos
    assert p.logprobs == 3 and req.logprobs and req.stream and req.include_usage and req.return_token_ids
    assert req.cache_salt == "tenant" and p.n == 1 and p.structured is None
    plain = parse_chat_request(_chat(echo=False, logit_bias={}, functions=None, n=None, best_of=None, seed=None))
    assert not plain.max_tokens_given and plain.params.temperature == 1.0 and plain.params.logprobs is None
    completion = parse_completion_request({"prompt": ["one string"], "logprobs": 0, "stop": ["a", "b"]})
    assert completion.raw_prompt == "one string" and completion.params.logprobs == 0 and completion.logprobs
    assert completion.params.stop == ["a", "b"] and completion.messages is None


def test_n_and_structured_outputs():
    import json

    from qwen_vl_triton.engine.structured import StructuredOutput
    from qwen_vl_triton.serving.protocol import parse_chat_request, parse_completion_request, parse_generate_request

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert parse_chat_request(_chat(n=16, best_of=16)).params.n == 16
    assert parse_generate_request({"prompt": "a", "n": 3}).params.n == 3
    cases = [
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}},
         StructuredOutput("json_schema", json.dumps(schema))),
        ({"guided_json": schema}, StructuredOutput("json_schema", json.dumps(schema))),
        ({"guided_json": json.dumps(schema, indent=2)}, StructuredOutput("json_schema", json.dumps(schema))),
        ({"guided_regex": "[0-9]+"}, StructuredOutput("regex", "[0-9]+")),
        ({"guided_choice": ["yes", "no"]}, StructuredOutput("choice", choices=("yes", "no"))),
        ({"guided_grammar": 'start: "a"+'}, StructuredOutput("grammar", 'start: "a"+')),
        ({"response_format": {"type": "text"}, "guided_regex": "a"}, StructuredOutput("regex", "a")),
    ]
    for fields, expected in cases:
        assert parse_chat_request(_chat(**fields)).params.structured == expected, fields
        assert parse_completion_request({"prompt": "a", **fields}).params.structured == expected, fields
        assert parse_generate_request({"prompt": "a", **fields}).params.structured == expected, fields


def test_tools_and_tool_messages():
    from qwen_vl_triton.serving.protocol import ChatMessage, parse_chat_request

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
                {"role": "assistant", "tool_calls": [{"id": "call_2", "function": CALL["function"]}]},
                {"role": "tool", "tool_call_id": "call_2", "content": "still sunny"}]
    req = parse_chat_request({"messages": messages, "tools": [TOOL], "parallel_tool_calls": False})
    assert req.tools == [TOOL] and req.tool_choice == "auto" and req.tool_name is None
    assert req.messages[2] == ChatMessage("assistant", [], [CALL], None)
    assert req.messages[3] == ChatMessage("tool", ["sunny"], None, "call_1")
    assert req.messages[4].tool_calls == [{**CALL, "id": "call_2"}]  # type defaults to "function"
    assert req.messages[5].parts == ["still sunny"]
    strict = {"type": "function", "function": {"name": "f-1", "strict": True}}
    named = parse_chat_request(_chat(tools=[TOOL, strict], tool_choice={"type": "function",
                                                                        "function": {"name": "f-1"}}))
    assert (named.tool_choice, named.tool_name) == ("function", "f-1") and named.tools[1] == strict
    assert parse_chat_request(_chat(tools=[TOOL], tool_choice="required")).tool_choice == "required"
    nulls = {"type": "function", "function": {"name": "g", "description": None,  # null fields dropped ...
                                              "parameters": {"properties": {"a": {"default": None}}}}}
    assert parse_chat_request(_chat(tools=[nulls])).tools == [  # ... but not the schema's own nulls
        {"type": "function", "function": {"name": "g", "parameters": {"properties": {"a": {"default": None}}}}}]
    none = parse_chat_request(_chat(tools=[TOOL], tool_choice="none", guided_regex="a"))
    assert none.tool_choice == "none" and none.tools == [TOOL] and none.params.structured is not None
    assert parse_chat_request(_chat(tools=None, tool_choice="none")).tool_choice == "none"


def test_json_body_errors():
    from qwen_vl_triton.serving.protocol import APIError, parse_json_body

    assert parse_json_body(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a surrogate pair is one character
    bad = {b"": ("invalid_json", None), b'{"messages": [': ("invalid_json", None), b"[1, 2]": ("invalid_json", None),
           b"\xff\xfe": ("invalid_json", None), b"[" * 100_000 + b"]" * 100_000: ("invalid_json", None),
           b'{"a": ' + b"1" * 5000 + b"}": ("invalid_json", None),   # over Python's int digit limit
           b'{"a": ["x", "\\ud800"]}': ("invalid_value", "a[1]"),   # a lone surrogate
           b'{"a": {"\\udc00": 1}}': ("invalid_value", "a")}        # in a key: the object is named
    for raw, (code, param) in bad.items():
        with pytest.raises(APIError) as e:
            parse_json_body(raw)
        assert (e.value.code, e.value.param) == (code, param), raw[:40]


def test_openapi_documents_the_request_bodies():
    """/openapi.json describes the three bodies (every field, with its type; no dangling $ref), the
    examples the parser accepts validate against it, and /docs serves Swagger UI."""
    import jsonschema
    from fastapi.testclient import TestClient

    from qwen_vl_triton.serving.api_server import create_app
    from qwen_vl_triton.serving.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest

    client = TestClient(create_app(ServeConfig(model_path="/models/tiny"), llm=object()))  # no lifespan: no model
    spec = client.get("/openapi.json").json()
    assert "$ref" not in json.dumps(spec["paths"])
    examples = {"/v1/chat/completions": (ChatCompletionRequest, _chat(tools=[TOOL], n=2, max_tokens=4, stop=["x"])),
                "/v1/completions": (CompletionRequest, {"prompt": "a", "guided_choice": ["x", "y"], "logprobs": 2}),
                "/generate": (GenerateRequest, {"prompt": [IMAGE, {"type": "text", "text": "q"}], "do_sample": False})}
    for path, (model, example) in examples.items():
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(schema["properties"]) == {f.alias or name for name, f in model.model_fields.items()}, path
        assert all("type" in p or "anyOf" in p or "oneOf" in p for p in schema["properties"].values()), path
        jsonschema.validate(example, schema)
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["required"] == ["messages"] and chat["properties"]["n"]["anyOf"][0]["maximum"] == 16
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@given(st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from("\x85\u2028\u2029\n\r"), max_size=40))
@settings(max_examples=200, deadline=None)
def test_wire_json_is_one_line_under_splitlines_and_decodes_to_the_same_text(text):
    """Output text with U+2028 and the like: each streamed event stays one line for clients that
    split lines as str.splitlines does (httpx's iter_lines), and decodes to the text sent."""
    from qwen_vl_triton.serving.api_server import ndjson, sse
    from qwen_vl_triton.serving.responses import GenerateResponse

    body = GenerateResponse(text=[text])
    event = sse(body)
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):]) == {"text": [text]}
    chunk = ndjson(body)
    assert len(chunk.splitlines()) == 1 and json.loads(chunk[:-1]) == {"text": [text]}
