"""modeling/tokenizer.py's QwenTokenizer against transformers' AutoTokenizer on the same
checkpoints (Qwen2-VL's template, Qwen2.5-VL's with tools, flat and nested layouts): the same ids,
texts, vocabulary, special tokens and rendered chats, on hypothesis text and conversations."""

from __future__ import annotations

import json

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton.modeling.tokenizer import QwenTokenizer, load_tokenizer
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint

transformers.utils.logging.set_verbosity_error()

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>",
            "<tool_call>", "</tool_call>", "<|box_start|>"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather: \u00e9t\u00e9 \u2603",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module", params=[("qwen2_vl", "nested", False), ("qwen2_5_vl", "flat", False),
                                        ("qwen2_5_vl", "nested", True)], ids=lambda p: f"{p[0]}-{p[1]}-{p[2]}")
def pair(request, tmp_path_factory):
    """(ours, transformers') tokenizers of one tiny checkpoint; template_in_config: the chat template
    in tokenizer_config.json, as checkpoints saved by transformers 4.x have it, not chat_template.jinja."""
    arch, layout, template_in_config = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, layout=layout)
    if template_in_config:
        template = path / "chat_template.jinja"
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template.read_text()}))
        template.unlink()
    ours = load_tokenizer(path)
    assert isinstance(ours, QwenTokenizer)
    return ours, transformers.AutoTokenizer.from_pretrained(path)


# Text with what tokenizers trip on: special tokens inside it, combining marks NFC composes,
# CJK, emoji, runs of whitespace and newlines.
_text = st.lists(st.one_of(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10),
                           st.sampled_from(SPECIALS), st.sampled_from(["e\u0301", "\u1100\u1161", "  \n\n ", "\t",
                                                                       "\u4f60\u597d", "\U0001f600", "'s", "123"])),
                 max_size=8).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=_text)
def test_encode_and_decode_as_transformers(pair, text):
    ours, theirs = pair
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == theirs.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.batch_decode([ids, ids[:1]], skip_special_tokens=True) == theirs.batch_decode(
        [ids, ids[:1]], skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)


def test_vocabulary_and_special_tokens_as_transformers(pair):
    ours, theirs = pair
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    assert ours.eos_token_id == theirs.eos_token_id is not None
    mine = {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()}
    assert mine == {i: (t.content, t.special) for i, t in theirs.added_tokens_decoder.items()}
    every = sorted(ours.get_vocab().values())
    assert ours.batch_decode([[i] for i in every]) == theirs.batch_decode([[i] for i in every])


_part = st.one_of(_text.map(lambda t: {"type": "text", "text": t}),
                  st.sampled_from([{"type": "image"}, {"type": "video"}, {"image": "x.png"}]))
_message = st.one_of(
    st.builds(lambda role, content: {"role": role, "content": content},
              st.sampled_from(["user", "system", "assistant"]), st.one_of(_text, st.lists(_part, max_size=3))),
    st.builds(lambda args: {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        st.fixed_dictionaries({"city": _text})),
    st.builds(lambda t: {"role": "tool", "content": t}, _text))


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(_message, min_size=1, max_size=5), tools=st.sampled_from([None, TOOLS]),
       generation=st.booleans())
def test_chat_template_as_transformers(pair, messages, tools, generation):
    ours, theirs = pair
    kw = dict(tools=tools, tokenize=False, add_generation_prompt=generation)
    try:
        expected = theirs.apply_chat_template(json.loads(json.dumps(messages)), **kw)
    except Exception as e:  # noqa: BLE001 - a conversation the template refuses: ours refuses it too
        with pytest.raises(type(e)):
            ours.apply_chat_template(messages, **kw)
        return
    assert ours.apply_chat_template(messages, **kw) == expected


def test_other_tokenizers_go_to_transformers(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt", "qwen2_vl")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    assert not isinstance(load_tokenizer(path), QwenTokenizer)
    with pytest.raises(ValueError, match="tokenize=False"):
        QwenTokenizer.from_pretrained(path).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
