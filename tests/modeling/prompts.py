"""Prompts for tests: ids for grids without pixels, made by the engine's own Preprocessor
(engine/preprocess.py: render the chat template over one user message, expand the pads), so
tests check the path every request takes; and the modality ids transformers' oracle needs."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from qwen_vl_triton.engine.media import PreparedMedia
from qwen_vl_triton.engine.preprocess import Preprocessor
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.modeling.config import load_config
from qwen_vl_triton.modeling.processing import ImageProcessorConfig, MediaKind
from qwen_vl_triton.modeling.prompt import user_message


@functools.lru_cache(maxsize=8)
def preprocessor(path: str) -> Preprocessor:
    """The checkpoint's Preprocessor, without a length limit."""
    from transformers import AutoTokenizer

    return Preprocessor(AutoTokenizer.from_pretrained(path), load_config(path),
                        ImageProcessorConfig.from_pretrained(path), max_input_length=1 << 30)


def prompt_ids(path: str | Path, media: Sequence[tuple[str, Sequence[int]]], text: str) -> list[int]:
    """Token ids of one user message of `media` [(kind, grid (t, h, w)), ...] then `text`."""
    pre = preprocessor(str(path))
    ids = pre.render([user_message([kind for kind, _ in media], text)])
    prepared = [PreparedMedia(MediaKind(kind), tuple(grid), 1.0, "", pre.image_cfg) for kind, grid in media]
    return pre.build(ids, prepared, SamplingParams()).ids


def mm_token_type_ids(input_ids: Sequence[int], image_token_id: int, video_token_id: int) -> list[int]:
    """Per-token modality as transformers' processors return it: 0 text, 1 image pad, 2 video pad
    (vision_start / vision_end count as text). transformers 5.x builds 3D rope positions only when
    generate() gets these."""
    return [1 if t == image_token_id else 2 if t == video_token_id else 0 for t in input_ids]
