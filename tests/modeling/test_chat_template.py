"""The tiny checkpoints' chat templates and tokenizers: the Qwen2.5-VL one's tools support changes
nothing for conversations without tools."""

from __future__ import annotations

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


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_tools_reach_the_prompt_or_are_refused(tmp_path, arch):
    """The engine's Preprocessor renders tools through the checkpoint's own template; Qwen2-VL's has
    no tools section, and offering tools to it is an error rather than a prompt that omits them."""
    from transformers import AutoTokenizer

    from qwen_vl_triton.engine.preprocess import Preprocessor, ToolsNotRendered
    from qwen_vl_triton.modeling.config import load_config
    from qwen_vl_triton.modeling.processing import ImageProcessorConfig
    from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / arch, arch)
    tok = AutoTokenizer.from_pretrained(path)
    pre = Preprocessor(tok, load_config(path), ImageProcessorConfig.from_pretrained(path), 4000)
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What time is it?"}]}]
    if arch == "qwen2_vl":
        with pytest.raises(ToolsNotRendered, match="does not render tools"):
            pre.render(messages, [tool])
        return
    with_tools = tok.decode(pre.render(messages, [tool]))
    assert '"name": "get_time"' in with_tools and "<tools>" in with_tools
    assert pre.render(messages) == pre.render(messages, None) != pre.render(messages, [tool])
