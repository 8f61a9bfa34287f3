"""Prompts: the chat template over one user message, then one pad token per merged patch.

`build_prompt` renders the tokenizer's chat template over a single user message whose content is
the media in order and then the text (with the template's default system message and the
assistant's generation prompt), tokenizes it, and expands each single `<|image_pad|>` /
`<|video_pad|>` into t*h*w / merge_size**2 copies for the corresponding medium, exactly as
transformers' Qwen2-VL processor does. Pad ids come from the tokenizer (or the caller, from
config.json's image_token_id / video_token_id), never from constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MediaItem = tuple[str, Sequence[int]]  # ("image" | "video", grid (t, h, w))

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


def user_message(media: Sequence[MediaItem | str], text: str) -> dict[str, Any]:
    """The one user message: content parts {"type": "image"} / {"type": "video"} in media order,
    then {"type": "text", "text": text} (omitted when text is empty)."""
    parts: list[dict[str, Any]] = []
    for item in media:
        kind = item if isinstance(item, str) else item[0]
        if kind not in ("image", "video"):
            raise ValueError(f"media kind must be 'image' or 'video', got {kind!r}")
        parts.append({"type": kind})
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def render_prompt(tokenizer: Any, media: Sequence[MediaItem | str], text: str,
                  add_generation_prompt: bool = True, system: str | None = None) -> str:
    """The chat-template string (one pad token per medium). `system` replaces the template's
    default system message when given."""
    messages = [user_message(media, text)]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def num_media_tokens(grid_thw: Sequence[int], merge_size: int) -> int:
    """LLM tokens for a medium of grid (t, h, w): t * h * w / merge_size**2."""
    t, h, w = (int(x) for x in grid_thw)
    if (h % merge_size) or (w % merge_size):
        raise ValueError(f"grid {tuple(grid_thw)} is not divisible by merge_size {merge_size}")
    return t * h * w // (merge_size * merge_size)


def expand_media_pads(ids: Sequence[int], media: Sequence[MediaItem], merge_size: int,
                      image_token_id: int, video_token_id: int) -> list[int]:
    """Replace the k-th pad token (image or video) in `ids` by num_media_tokens copies of itself for
    the k-th medium. The pads' kinds must match the media's, in order."""
    out: list[int] = []
    k = 0
    for tok in ids:
        if tok in (image_token_id, video_token_id):
            if k >= len(media):
                raise ValueError(f"prompt has more media pads than the {len(media)} media given")
            kind, grid = media[k]
            want = image_token_id if kind == "image" else video_token_id
            if tok != want:
                raise ValueError(f"medium {k} is a {kind} but the prompt has a "
                                 f"{'video' if tok == video_token_id else 'image'} pad there")
            out.extend([tok] * num_media_tokens(grid, merge_size))
            k += 1
        else:
            out.append(tok)
    if k != len(media):
        raise ValueError(f"prompt has {k} media pads for {len(media)} media")
    return out


def build_prompt(tokenizer: Any, media: Sequence[MediaItem], text: str, merge_size: int,
                 image_token_id: int | None = None, video_token_id: int | None = None,
                 add_generation_prompt: bool = True, system: str | None = None) -> list[int]:
    """Token ids of the chat prompt for `media` [("image"|"video", (t, h, w)), ...] then `text`.

    Each medium becomes <|vision_start|> + t*h*w/merge_size**2 pads + <|vision_end|>, in order.
    Pad ids default to the tokenizer's ids of <|image_pad|> / <|video_pad|>; pass config.json's
    image_token_id / video_token_id to use those.
    """
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if video_token_id is None:
        video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    rendered = render_prompt(tokenizer, media, text, add_generation_prompt, system)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    return expand_media_pads(ids, media, merge_size, image_token_id, video_token_id)


def mm_token_type_ids(input_ids: Sequence[int], image_token_id: int, video_token_id: int) -> list[int]:
    """Per-token modality as transformers' processors return it: 0 text, 1 image pad, 2 video pad
    (vision_start / vision_end count as text). transformers 5.x builds 3D rope positions only when
    generate() gets these."""
    return [IMAGE_TYPE if t == image_token_id else VIDEO_TYPE if t == video_token_id else TEXT_TYPE
            for t in input_ids]
