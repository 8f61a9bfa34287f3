"""Prompt facts of the Qwen-VL family: one pad token per merged patch.

`user_message` is the offline prompt's one user message (the media in order, then the text);
the engine's Preprocessor (engine/preprocess.py) renders the tokenizer's chat template over it
and `expand_media_pads` expands each single `<|image_pad|>` / `<|video_pad|>` into
t*h*w / merge_size**2 copies for the corresponding medium, exactly as transformers' Qwen2-VL
processor does. Pad ids come from config.json's image_token_id / video_token_id, never from
constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MediaItem = tuple[str, Sequence[int]]  # (a MediaKind or its value "image" | "video", grid (t, h, w))


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
