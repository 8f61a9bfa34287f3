"""Prompt building (the engine's Preprocessor) against the tiny checkpoint's transformers tokenizer."""

from __future__ import annotations

import json

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton.modeling.prompt import expand_media_pads, num_media_tokens
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.modeling.prompts import mm_token_type_ids, prompt_ids

transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(checkpoint dir, its tokenizer loaded by transformers, config.json dict) of the tiny Qwen2.5-VL."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("prompt"), "qwen2_5_vl")
    return path, transformers.AutoTokenizer.from_pretrained(path), json.loads((path / "config.json").read_text())


def _oracle(tok, media, text, merge_size=2):
    """What transformers' Qwen2-VL processor does: render the template, replace each pad by
    t*h*w/merge**2 pads in the text, then tokenize."""
    parts = [{"type": kind} for kind, _ in media] + ([{"type": "text", "text": text}] if text else [])
    rendered = tok.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                       add_generation_prompt=True)
    out, k, i = [], 0, 0
    while i < len(rendered):
        for pad in ("<|image_pad|>", "<|video_pad|>"):
            if rendered.startswith(pad, i):
                t, h, w = media[k][1]
                out.append(pad * (t * h * w // merge_size**2))
                k += 1
                i += len(pad)
                break
        else:
            out.append(rendered[i])
            i += 1
    assert k == len(media)
    return tok("".join(out), add_special_tokens=False)["input_ids"]


_even = st.integers(1, 6).map(lambda x: 2 * x)
_grid = st.tuples(st.integers(1, 3), _even, _even)


@settings(max_examples=25)
@given(media=st.lists(st.tuples(st.sampled_from(["image", "video"]), _grid), max_size=4),
       text=st.sampled_from(["", "Describe this.", "What happens in the video? Answer briefly.",
                             "  leading and trailing spaces  ", "ünïcödé and 数字 42"]))
def test_prompt_ids_match_transformers_tokenizer(ckpt, media, text):
    path, tok, config = ckpt
    media = [(kind, (1, h, w) if kind == "image" else (t, h, w)) for kind, (t, h, w) in media]
    ids = prompt_ids(path, media, text)
    assert ids == _oracle(tok, media, text)
    types = mm_token_type_ids(ids, config["image_token_id"], config["video_token_id"])
    assert types.count(1) == sum(num_media_tokens(g, 2) for k, g in media if k == "image")
    assert types.count(2) == sum(num_media_tokens(g, 2) for k, g in media if k == "video")


def test_prompt_structure(ckpt):
    path, tok, config = ckpt
    media = [("image", (1, 4, 6)), ("video", (2, 2, 4))]
    ids = prompt_ids(path, media, "Compare them.")
    img, vid = config["image_token_id"], config["video_token_id"]
    start, end = config["vision_start_token_id"], config["vision_end_token_id"]
    i = ids.index(start)
    assert ids[i + 1: i + 7] == [img] * 6 and ids[i + 7] == end
    assert ids[i + 8] == start and ids[i + 9: i + 13] == [vid] * 4 and ids[i + 13] == end
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("Compare them.<|im_end|>\n<|im_start|>assistant\n")
    types = mm_token_type_ids(ids, img, vid)
    assert types[i] == 0 and types[i + 1] == 1 and types[i + 9] == 2 and len(types) == len(ids)


def test_pad_mismatches_raise(ckpt):
    path, _, config = ckpt
    img, vid = config["image_token_id"], config["video_token_id"]
    with pytest.raises(ValueError, match="more media pads"):  # user text smuggling a pad token
        prompt_ids(path, [("image", (1, 2, 2))], "look <|image_pad|>")
    with pytest.raises(ValueError, match="is a video"):
        expand_media_pads([1, img, 2], [("video", (2, 2, 2))], 2, img, vid)
    with pytest.raises(ValueError, match="1 media pads for 2 media"):
        expand_media_pads([1, img, 2], [("image", (1, 2, 2)), ("image", (1, 2, 2))], 2, img, vid)
    with pytest.raises(ValueError, match="merge_size"):
        num_media_tokens((1, 3, 4), 2)
    with pytest.raises(ValueError, match="kind"):
        prompt_ids(path, [("audio", (1, 2, 2))], "x")
