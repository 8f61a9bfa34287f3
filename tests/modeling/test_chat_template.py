"""The tiny checkpoints' chat templates and tokenizers: the Qwen2.5-VL one's tools support changes
nothing for conversations without tools. And the Preprocessor's choice of template: the fallback
in Qwen's function-calling format where the model's template renders no tools, --chat_template and a
request's own template."""

from __future__ import annotations

import json

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton.testing.tiny_checkpoint import CHAT_TEMPLATE, TOOL_TOKENS, TOOLS_CHAT_TEMPLATE, build_tokenizer

transformers.utils.logging.set_verbosity_error()

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def tokenizers():
    """(the Qwen2-VL tokenizer, the Qwen2.5-VL one)."""
    return build_tokenizer(), build_tokenizer(tools=True)


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_part = st.one_of(
    _text.map(lambda t: {"type": "text", "text": t}),
    st.sampled_from([{"type": "image"}, {"type": "image_url", "image_url": {"url": "x.png"}}, {"image": "x.png"},
                     {"type": "video"}, {"video": "x.mp4"}, {"type": "video", "video": "x.mp4"}]),
)
_content = st.one_of(_text, st.lists(_part, max_size=4))
_message = st.builds(lambda role, content: {"role": role, "content": content},
                     st.sampled_from(["user", "assistant", "system"]), _content)
_conversation = st.tuples(st.booleans(), _content, st.lists(_message, min_size=1, max_size=5)).map(
    lambda t: ([{"role": "system", "content": t[1]}] if t[0] else []) + t[2])


def _render(tok, messages, template, **kw):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


@settings(max_examples=150, deadline=None)
@given(messages=_conversation, vision_id=st.booleans(), generation=st.booleans())
def test_without_tools_the_tools_template_renders_as_the_plain_one(tokenizers, messages, vision_id, generation):
    """Byte-identical to CHAT_TEMPLATE for any conversation without tools: strings and parts, media
    of every spelling, a leading system message or none, vision ids, generation prompt."""
    _, tok = tokenizers
    kw = dict(add_vision_id=vision_id, add_generation_prompt=generation)
    plain = _render(tok, messages, CHAT_TEMPLATE, **kw)
    assert _render(tok, messages, TOOLS_CHAT_TEMPLATE, **kw) == plain
    assert _render(tok, messages, TOOLS_CHAT_TEMPLATE, tools=[], **kw) == plain
    # Qwen2-VL's template ignores tools, so a server can tell it cannot take them
    assert _render(tok, messages, CHAT_TEMPLATE, tools=TOOLS, **kw) == plain
    # and the tools template does not: its system turn lists them
    with_tools = _render(tok, messages, TOOLS_CHAT_TEMPLATE, tools=TOOLS, **kw)
    assert with_tools != plain and '\n<tools>\n{"type": "function", "function": {"name": "f"' in with_tools


def test_tool_messages_share_a_user_turn_and_the_media_count_runs_on(tokenizers):
    _, tok = tokenizers
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Sys "}, {"type": "image"}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Go."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Calling."}],
         "tool_calls": [{"function": {"name": "f", "arguments": {"a": [1, {"b": "ü"}]}}}]},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "done"}]},
        {"role": "tool", "content": "second"},
    ]
    text = _render(tok, messages, TOOLS_CHAT_TEMPLATE, tools=TOOLS, add_vision_id=True)
    assert text.startswith("<|im_start|>system\nSys Picture 1: <|vision_start|><|image_pad|><|vision_end|>\n\n# Tools")
    assert text.endswith(
        "<|im_start|>user\nVideo 1: <|vision_start|><|video_pad|><|vision_end|>Go.<|im_end|>\n"
        '<|im_start|>assistant\nCalling.\n<tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": "ü"}]}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nPicture 2: <|vision_start|><|image_pad|><|vision_end|>done\n"
        "</tool_response>\n<tool_response>\nsecond\n</tool_response><|im_end|>\n")
    # a tool message first, without tools: the default system turn, then the tool turn
    text = _render(tok, [{"role": "tool", "content": "r"}], TOOLS_CHAT_TEMPLATE)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<tool_response>\nr\n</tool_response><|im_end|>\n")


@settings(max_examples=100, deadline=None)
@given(text=st.lists(st.sampled_from([*"<>/_ toolcal\n{}\"Describe", "<|im_end|>", "<|image_pad|>", "ü",
                                     *TOOL_TOKENS]), max_size=30).map("".join))
def test_the_tool_tokens_change_no_other_tokenization(tokenizers, text):
    """Appended after the special tokens, the tags leave every other id alone: text without them
    encodes alike in both tokenizers, and each tag is its own token otherwise."""
    plain, tools = tokenizers
    ids = tools.encode(text, add_special_tokens=False)
    assert tools.decode(ids) == text
    if not any(t in text for t in TOOL_TOKENS):
        assert ids == plain.encode(text, add_special_tokens=False)
    tag_ids = set(tools.convert_tokens_to_ids(list(TOOL_TOKENS)))
    assert sum(i in tag_ids for i in ids) == sum(text.count(t) for t in TOOL_TOKENS)


# Tool turns: a tool result, or an assistant turn with calls (arguments as objects, as the server sends them).
_call = st.builds(lambda name, args: {"type": "function", "function": {"name": name, "arguments": args}},
                  st.sampled_from(["f", "get_weather"]),
                  st.dictionaries(st.sampled_from(["a", "city"]), st.one_of(st.integers(), _text), max_size=2))
_tool_turn = st.one_of(
    st.builds(lambda content: {"role": "tool", "content": content}, _content),
    st.builds(lambda content, calls: {"role": "assistant", "content": content, "tool_calls": calls},
              _content, st.lists(_call, min_size=1, max_size=2)),
)
_tool_conversation = st.tuples(st.booleans(), _content, st.lists(st.one_of(_message, _tool_turn), min_size=1,
                                                                 max_size=6)).map(
    lambda t: ([{"role": "system", "content": t[1]}] if t[0] else []) + t[2])


@settings(max_examples=150, deadline=None)
@given(messages=_tool_conversation, tools=st.sampled_from([None, TOOLS]), vision_id=st.booleans(),
       generation=st.booleans())
def test_the_fallback_tools_template_renders_as_qwen25s(tokenizers, messages, tools, vision_id, generation):
    """QWEN_TOOLS_TEMPLATE, the fallback for templates without tools, renders exactly what the
    Qwen2.5-VL template (TOOLS_CHAT_TEMPLATE, Qwen2.5's format) does: tools or none, tool results,
    calls, media of every spelling, vision ids, generation prompt."""
    from qwen_vl_triton.engine.preprocess import QWEN_TOOLS_TEMPLATE

    _, tok = tokenizers
    kw = dict(tools=tools, add_vision_id=vision_id, add_generation_prompt=generation)
    assert _render(tok, messages, QWEN_TOOLS_TEMPLATE, **kw) == _render(tok, messages, TOOLS_CHAT_TEMPLATE, **kw)


# --------------------------------------------------------------------------- the Preprocessor's templates

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TOOL_TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather?"}]},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "-3 C", "tool_call_id": "c1"},
    {"role": "tool", "content": "snow", "tool_call_id": "c1"},
]


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """The Preprocessor of a Qwen2-VL checkpoint (its template has no tools section)."""
    from qwen_vl_triton.engine.preprocess import Preprocessor
    from qwen_vl_triton.modeling.config import load_config
    from qwen_vl_triton.modeling.processing import ImageProcessorConfig
    from qwen_vl_triton.modeling.tokenizer import load_tokenizer
    from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("qwen2_vl"), "qwen2_vl")
    return Preprocessor(load_tokenizer(path), load_config(path), ImageProcessorConfig.from_pretrained(path), 4000)


def _text(pre, messages, tools=None, **kw) -> str:
    return pre.tokenizer.decode(pre.render(messages, tools, **kw))


def test_tools_reach_the_prompt_on_every_template(pre):
    """Qwen2-VL's template ignores tools, calls and tool results: a conversation with any of them is
    rendered in Qwen's function-calling format (what Qwen2.5's template renders), and one without
    them by the model's own template. A template that renders tools itself is used as it is."""
    tok = pre.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    for tools in ([WEATHER], None):
        expected = _render(tok, TOOL_TURNS, TOOLS_CHAT_TEMPLATE, tools=tools, add_generation_prompt=True)
        assert _text(pre, TOOL_TURNS, tools) == expected
    assert '"name": "get_weather"' in expected and "<tool_response>\n-3 C\n</tool_response>" in expected
    with_tools = _text(pre, TOOL_TURNS[:1], [WEATHER])
    assert with_tools == _render(tok, TOOL_TURNS[:1], TOOLS_CHAT_TEMPLATE, tools=[WEATHER], add_generation_prompt=True)
    assert "<tools>\n" + json.dumps(WEATHER) in with_tools
    assert _text(pre, TOOL_TURNS[:1]) == _render(tok, TOOL_TURNS[:1], CHAT_TEMPLATE, add_generation_prompt=True)
    own_tools = TOOLS_CHAT_TEMPLATE.replace("# Tools", "# Functions")  # renders tools: not replaced
    assert "# Functions" in _text(pre, TOOL_TURNS, [WEATHER], chat_template=own_tools)


def test_a_request_template_its_variables_and_its_errors(pre):
    """render's chat_template replaces the model's; template_kwargs are template variables (not the
    renderer's own arguments); text the template makes is length-checked before it is tokenized; a
    Jinja syntax error is raised, never taken for "renders no tools"."""
    from jinja2 import TemplateSyntaxError

    from qwen_vl_triton.engine.preprocess import ContextLengthError, TemplateKwargsError

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert _text(pre, messages, chat_template="{{ messages[0]['content'][1]['text'] }}!") == "Hi!"
    with pytest.raises(ContextLengthError, match="refused before tokenizing"):  # text the template made
        pre.render(messages, chat_template="{{ 'x' * 10000000 }}")
    assert "Picture 1: <|vision_start|>" in _text(pre, messages, template_kwargs={"add_vision_id": True})
    with pytest.raises(TemplateKwargsError, match="chat_template_kwargs: messages, tools"):
        pre.render(messages, template_kwargs={"tools": [], "messages": [], "add_vision_id": True})
    for tools in (None, [WEATHER]):
        with pytest.raises(TemplateSyntaxError):
            pre.render(messages, tools, chat_template="{% if %}")


def test_chat_template_setting_takes_a_file_or_the_text(pre, tmp_path):
    """EngineConfig.chat_template (--chat_template): a file's text, else Jinja text; anything else,
    or a template that cannot render a one-message conversation, is an error naming it."""
    from qwen_vl_triton.engine.preprocess import Preprocessor, load_chat_template

    template = "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert load_chat_template(str(path)) == template == load_chat_template(template)
    with pytest.raises(ValueError, match="chat_template: no such file 'missing.jinja'"):
        load_chat_template("missing.jinja")
    for value in (str(path), template):
        custom = Preprocessor(pre.tokenizer, pre.config, pre.image_cfg, 4000, chat_template=value)
        assert _text(custom, TOOL_TURNS[:1]) == "[user]"
        assert _text(custom, TOOL_TURNS[:1], [WEATHER]) == _text(pre, TOOL_TURNS[:1], [WEATHER])  # no tools: fallback
    with pytest.raises(ValueError, match="chat_template: cannot render a conversation: TemplateSyntaxError"):
        Preprocessor(pre.tokenizer, pre.config, pre.image_cfg, 4000, chat_template="{% if %}")
