"""Tool calls in Qwen2.5's format (serving/tool_calls.py): whole, streamed over any split of the
output, forced by tool_choice, and back into the chat template."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qwen_vl_triton.engine.chat import tool_call_arguments
from qwen_vl_triton.serving.tool_calls import (
    CLOSE,
    OPEN,
    NamedCallStream,
    RequiredCallStream,
    ToolCallStream,
    named_call,
    named_schema,
    parse_required,
    parse_tool_calls,
    required_schema,
)

ID = re.compile(r"call_[0-9a-f]{24}")


def block(name: str, args: object, *, ws: str = "\n", ascii_: bool = False) -> str:
    """A call as Qwen2.5 writes it (`ws` around the object)."""
    return f"{OPEN}{ws}{json.dumps({'name': name, 'arguments': args}, ensure_ascii=ascii_)}{ws}{CLOSE}"


def calls_of(calls: list[dict]) -> list[tuple[str, str]]:
    """(name, arguments) of OpenAI call objects, checking their shape on the way."""
    for call in calls:
        assert ID.fullmatch(call["id"]) and call["type"] == "function", call
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def stream(text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]], ToolCallStream]:
    """Feed ToolCallStream the prefixes of `text` ending at `cuts` (sorted), then all of it
    finished; (the content sent, the calls sent, the stream)."""
    s = ToolCallStream()
    content, calls = [], []
    for update in [(text[:c], False) for c in sorted(cuts)] + [(text, True)]:
        for piece in s.update(*update):
            assert len(piece) == 1 and piece.keys() <= {"content", "tool_calls"}, piece
            if "content" in piece:
                assert piece["content"], "an empty content piece"
                content.append(piece["content"])
            else:
                [call] = piece["tool_calls"]
                assert call["index"] == len(calls)
                calls.append(call)
    return "".join(content), calls_of(calls), s


def assert_stream_matches(text: str, cuts: list[int]) -> None:
    content, calls = parse_tool_calls(text)
    streamed, streamed_calls, s = stream(text, cuts)
    assert streamed == (content or "")
    assert streamed_calls == calls_of(calls)
    assert s.has_calls == bool(calls)


# ----------------------------------------------------------------------------------- scripted outputs

WEATHER = '{"city": "Paris"}'
AS_WRITTEN = "the whole text, as written"  # the content of outputs that make no call
SCRIPTED = {
    "one call": (block("get_weather", {"city": "Paris"}), None, [("get_weather", WEATHER)]),
    "several calls, text around": (
        "Let me check.\n" + block("get_weather", {"city": "Paris"}) + "\n" + block("now", {}) + "\nOne moment.",
        "Let me check.\n\n\nOne moment.", [("get_weather", WEATHER), ("now", "{}")]),
    "text between calls": (
        block("a", {"x": 1}) + "\nand then\n" + block("b", {"y": [1, 2]}),
        "and then", [("a", '{"x": 1}'), ("b", '{"y": [1, 2]}')]),
    "no whitespace in the block": ('<tool_call>{"name":"f","arguments":{"k":true}}</tool_call>', None,
                                   [("f", '{"k": true}')]),
    "arguments as a JSON string": (block("f", json.dumps({"q": "x y", "n": 2})), None, [("f", '{"q": "x y", "n": 2}')]),
    "arguments missing": (f'{OPEN}\n{{"name": "now"}}\n{CLOSE}', None, [("now", "{}")]),
    "unicode arguments": (block("find", {"city": "Zürich", "q": "東京 😀"}, ascii_=True), None,
                          [("find", '{"city": "Zürich", "q": "東京 😀"}')]),
    "nested braces, brackets and braces in strings": (
        block("f", {"a": {"b": {"c": [1, {"d": "}{]["}]}}, "e": "\\\"}"}), None,
        [("f", '{"a": {"b": {"c": [1, {"d": "}{]["}]}}, "e": "\\\\\\"}"}')]),
    # the object's end is found outside strings, so a tag inside a string value is an argument
    "a close tag inside a string value": (block("echo", {"s": "</tool_call> and <tool_call>"}), None,
                                          [("echo", '{"s": "</tool_call> and <tool_call>"}')]),
    "raw newline inside a string": (f'{OPEN}\n{{"name": "code", "arguments": {{"src": "a\nb"}}}}\n{CLOSE}', None,
                                    [("code", '{"src": "a\\nb"}')]),
    "invalid JSON stays as written": (f"Hi {OPEN}\n{{name: f}}\n{CLOSE} bye", AS_WRITTEN, []),
    "a name missing": (f'{OPEN}\n{{"arguments": {{}}}}\n{CLOSE}', AS_WRITTEN, []),
    "a name not a string": (f'{OPEN}{{"name": 3}}{CLOSE}', AS_WRITTEN, []),
    "arguments not an object": (block("f", [1]), AS_WRITTEN, []),
    "arguments a string of a non-object": (block("f", "[1]"), AS_WRITTEN, []),
    "NaN is not JSON": (f'{OPEN}{{"name": "f", "arguments": {{"x": NaN}}}}{CLOSE}', AS_WRITTEN, []),
    "NaN in arguments given as a string": (block("f", '{"x": NaN}'), AS_WRITTEN, []),
    "text after the object": (f'{OPEN}{{"name": "f"}} ok{CLOSE}', AS_WRITTEN, []),
    "a brace short, then a call": (f'{OPEN}{{"name": "f", "arguments": {{"a": 1}}{CLOSE}\n' + block("g", {}),
                                   f'{OPEN}{{"name": "f", "arguments": {{"a": 1}}{CLOSE}', [("g", "{}")]),
    "unterminated block": ("Sure.\n" + block("f", {"a": 1})[:-3], AS_WRITTEN, []),
    "unterminated object": (f'{OPEN}\n{{"name": "f", "arguments": {{"a": "b', AS_WRITTEN, []),
    "a tag mentioned in prose": (f"Use {OPEN} tags. {CLOSE}", AS_WRITTEN, []),
    "only whitespace": (" \n\t ", None, []),
}


@pytest.mark.parametrize("name", list(SCRIPTED))
def test_scripted_outputs(name):
    text, content, calls = SCRIPTED[name]
    content = text if content == AS_WRITTEN else content
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert calls_of(got_calls) == calls
    for call in got_calls:  # arguments are JSON text of an object
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    assert_stream_matches(text, list(range(len(text) + 1)))  # one character a step


def test_ids_are_fresh():
    _, calls = parse_tool_calls(block("f", {}) * 50)
    assert len({c["id"] for c in calls}) == 50


@pytest.mark.parametrize("name", ["several calls, text around", "a close tag inside a string value",
                                  "a brace short, then a call", "unterminated block"])
def test_every_single_split_point(name):
    """Two steps, split at every position: the open and close tags split every way."""
    text = SCRIPTED[name][0]
    for i in range(len(text) + 1):
        assert_stream_matches(text, [i])


def test_what_is_held_back_and_when_it_is_sent():
    text = "Hi " + block("f", {"a": 1}) + " done"
    call_end = text.index(CLOSE) + len(CLOSE)
    s = ToolCallStream()
    assert s.update("Hi <tool_c", False) == [{"content": "Hi"}]  # the space and the partial tag wait
    assert s.update("Hi <tool_call>\n{\"name\": \"f\", \"argu", False) == []  # inside an open block
    assert not s.has_calls
    [piece] = s.update(text[:call_end], False)  # sent whole as its close tag arrives
    assert calls_of(piece["tool_calls"]) == [("f", '{"a": 1}')] and piece["tool_calls"][0]["index"] == 0
    assert s.has_calls
    assert s.update(text[:call_end + 1], False) == []  # whitespace waits for text
    assert s.update(text, False) == [{"content": "  done"}]
    assert s.update(text + "\n", True) == []  # trailing whitespace is stripped


def test_a_tag_that_turns_out_to_be_text_is_sent_when_decided():
    s = ToolCallStream()
    assert s.update("a <tool_call", False) == [{"content": "a"}]
    assert s.update("a <tool_call> is a tag", False) == [{"content": " <tool_call> is a tag"}]
    s = ToolCallStream()
    assert s.update('<tool_call>{"name": "f", "arguments": {"a": 1}', False) == []
    # `<` outside a string: this cannot become a JSON object any more
    assert s.update('<tool_call>{"name": "f", "arguments": {"a": 1}</tool', False) == [
        {"content": '<tool_call>{"name": "f", "arguments": {"a": 1}</tool'}]
    s = ToolCallStream()  # nor after a mismatched bracket
    assert s.update('<tool_call>{"a": [1}', False) == [{"content": '<tool_call>{"a": [1}'}]


# ----------------------------------------------------------------------------------- generated outputs

_json_text = st.lists(st.sampled_from([*'ab "\\{}[]:,\n', "ü", "東", "😀", OPEN, CLOSE, "\u2028"]),
                      max_size=6).map("".join)
_json = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | _json_text
                     | st.floats(allow_nan=False, allow_infinity=False),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_json_text, inner, max_size=3),
                     max_leaves=8)
_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,12}", fullmatch=True)


@st.composite
def _valid_block(draw) -> tuple[str, tuple[str, str]]:
    """(block text, the call it makes) in the formats models write."""
    name = draw(_name)
    args = draw(st.dictionaries(_json_text, _json, max_size=3))
    ws = draw(st.sampled_from(["\n", "", " \n  ", "\r\n"]))
    ascii_ = draw(st.booleans())
    style = draw(st.sampled_from(["object", "string", "missing"] if not args else ["object", "string"]))
    obj = {"name": name} if style == "missing" else {
        "name": name, "arguments": args if style == "object" else json.dumps(args, ensure_ascii=ascii_)}
    return f"{OPEN}{ws}{json.dumps(obj, ensure_ascii=ascii_)}{ws}{CLOSE}", (name, json.dumps(args, ensure_ascii=False))


BROKEN = [
    f"{OPEN}\nnot json\n{CLOSE}",
    f'{OPEN}\n{{"arguments": {{"a": 1}}}}\n{CLOSE}',
    f'{OPEN}\n{{"name": 3, "arguments": {{}}}}\n{CLOSE}',
    f'{OPEN}\n{{"name": "f", "arguments": [1, 2]}}\n{CLOSE}',
    f'{OPEN}\n{{"name": "f", "arguments": "{{bad"}}\n{CLOSE}',
    f'{OPEN}\n{{"name": "f"}} and more\n{CLOSE}',
    f'{OPEN}\n{{"name": "f", "arguments": {{"a": 1}}\n{CLOSE}',
    f'{OPEN}\n{{"name": "f", "arguments": {{"a": tru}}}}\n{CLOSE}',
    f'{OPEN}{{"name": "f", "arguments": {{}}}}}}{CLOSE}',
    f'{OPEN}\n["f"]\n{CLOSE}',
    f"{OPEN}{CLOSE}",
]
_prose = st.lists(st.sampled_from([*'ab <>/{}"\\:\n\t', "ü", "中", "<tool_call", "tool_call>", CLOSE, "<tool"]),
                  max_size=8).map("".join)
_segment = st.one_of(_prose.map(lambda t: ("prose", t, None)),
                     _valid_block().map(lambda b: ("call", b[0], b[1])),
                     st.sampled_from(BROKEN).map(lambda t: ("broken", t, None)))


@st.composite
def _output(draw) -> tuple[str, str | None, list[tuple[str, str]]]:
    """A scripted model output: prose, calls and broken blocks, maybe cut inside a last call
    (max_tokens); with the content and calls it must parse to."""
    segments = draw(st.lists(_segment, max_size=6))
    if draw(st.booleans()):
        text, _ = draw(_valid_block())
        segments.append(("cut", text[:draw(st.integers(0, len(text) - 1))], None))
    text = "".join(s for _, s, _ in segments)
    # no open tag in prose, nor formed with its neighbours: every tag is one the script placed, so
    # what the output must parse to is known (test_any_text_streams_what_it_parses_to has the rest)
    assume(text.count(OPEN) == sum(s.count(OPEN) for kind, s, _ in segments if kind != "prose"))
    content = "".join(s for kind, s, _ in segments if kind != "call").strip() or None
    return text, content, [call for kind, _, call in segments if kind == "call"]


@settings(max_examples=200, deadline=None)
@given(output=_output(), data=st.data())
def test_any_output_split_any_way_streams_what_it_parses_to(output, data):
    text, content, calls = output
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert calls_of(got_calls) == calls
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert_stream_matches(text, cuts)


_anything = st.lists(st.one_of(
    st.sampled_from([OPEN, CLOSE, "<tool", "{", "}", '"', "\\", "[", "]", ":", ",", " ", "\n", "1", "true", "x", "ü",
                     '{"name": "f"', ', "arguments": ', '{"a": 1}', "}", '"{\\"b\\": 2}"', "NaN"]),
    _valid_block().map(lambda b: b[0])), max_size=14).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=_anything, data=st.data())
def test_any_text_streams_what_it_parses_to(text, data):
    """Whatever the text (tags anywhere, calls and fragments of calls run together), the stream
    agrees with the whole parse, however the text arrives."""
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert_stream_matches(text, cuts)


# ----------------------------------------------------------------------------------- forced calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "no parameters"}},
]


def test_named_schema_and_call():
    assert named_schema(TOOLS, "get_weather") == TOOLS[0]["function"]["parameters"]
    assert named_schema(TOOLS, "now") == {"type": "object"}
    with pytest.raises(ValueError, match="'missing'"):
        named_schema(TOOLS, "missing")
    call = named_call("get_weather", WEATHER)
    assert calls_of([call]) == [("get_weather", WEATHER)]


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=20), cuts=st.lists(st.integers(0, 20), max_size=6))
def test_named_streaming_sends_the_head_then_the_arguments(text, cuts):
    s = NamedCallStream("get_weather")
    pieces = [p for c in sorted(cuts) for p in s.update(text[:c], False)] + s.update(text, True)
    head = pieces[0]["tool_calls"][0]
    assert head["index"] == 0 and head["function"] == {"name": "get_weather", "arguments": ""}
    assert calls_of([head]) == [("get_weather", "")]
    deltas = [p["tool_calls"][0] for p in pieces[1:]]
    assert all(d == {"index": 0, "function": {"arguments": d["function"]["arguments"]}} for d in deltas)
    assert all(d["function"]["arguments"] for d in deltas)  # no empty deltas
    assert "".join(d["function"]["arguments"] for d in deltas) == text


def test_required_schema_accepts_call_arrays_only():
    schema = required_schema(TOOLS)
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]
    jsonschema.validate(ok, schema)
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "other", "arguments": {}}],
                [{"name": "now"}], [{"name": "now", "arguments": {}, "extra": 1}], {"name": "now", "arguments": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert schema["items"]["anyOf"][1]["properties"] == {"name": {"const": "now"}, "arguments": {"type": "object"}}


def test_parse_required():
    text = json.dumps([{"name": "get_weather", "arguments": {"city": "Zürich"}},
                       {"name": "now", "arguments": "{}"}])
    assert calls_of(parse_required(text)) == [("get_weather", '{"city": "Zürich"}'), ("now", "{}")]
    for bad in ('[{"name": "now", "arguments": {}}', "[]", '{"name": "now"}', '[{"arguments": {}}]',
                '[{"name": "f", "arguments": [1]}]', '[{"name": "f", "arguments": {"x": NaN}}]'):
        with pytest.raises(ValueError):
            parse_required(bad)


def test_required_streaming_sends_the_calls_when_finished():
    text = json.dumps([{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}])
    s = RequiredCallStream()
    assert s.update(text[:10], False) == [] and s.update(text, False) == []
    pieces = s.update(text, True)
    assert [p["tool_calls"][0]["index"] for p in pieces] == [0, 1] and s.has_calls
    assert calls_of([p["tool_calls"][0] for p in pieces]) == [("now", "{}"), ("get_weather", '{"city": "Oslo"}')]
    s = RequiredCallStream()  # cut short by max_tokens: answered as content
    assert s.update(text[:-4], True) == [{"content": text[:-4]}] and not s.has_calls


# ----------------------------------------------------------------------------------- chat template


@pytest.fixture(scope="module")
def qwen25_tokenizer():
    from qwen_vl_triton.testing.tiny_checkpoint import build_tokenizer

    return build_tokenizer(tools=True)


def test_template_messages_round_trip(qwen25_tokenizer):
    """Calls the parser made, sent back by a client, render as the model wrote them and parse to
    the same calls."""
    output = "Checking.\n" + block("get_weather", {"city": "Zürich", "n": [1, {"a": None}]}) + "\n" + block("now", {})
    content, calls = parse_tool_calls(output)
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": content, "tool_calls": calls},
                {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"}]
    before = json.dumps(messages)
    prepared = tool_call_arguments(messages)
    assert json.dumps(messages) == before  # nothing changed in place
    assert prepared[0] is messages[0] and prepared[2] is messages[2]  # tool messages pass as they are
    assert prepared[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Zürich", "n": [1, {"a": None}]}
    assert prepared[1]["tool_calls"][0]["id"] == calls[0]["id"]
    text = qwen25_tokenizer.apply_chat_template(prepared, tools=TOOLS, tokenize=False)
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert turn == output
    again_content, again = parse_tool_calls(turn)
    assert again_content == content and calls_of(again) == calls_of(calls)
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in text


def test_template_messages_refuses_arguments_that_are_not_objects():
    assert tool_call_arguments([{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": {"a": 1}}}]}])[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    for args in ("[1]", "{bad", "3", None):
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "f", "arguments": "{}"}}, {"function": {"name": "g", "arguments": args}}]}]
        with pytest.raises(ValueError, match=re.escape("messages[1].tool_calls[1].function.arguments")):
            tool_call_arguments(messages)
