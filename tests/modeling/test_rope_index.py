"""MRoPE position ids against transformers' get_rope_index (given mm_token_type_ids, as the 5.x
API needs), on text, images and short videos; and Qwen's rule for text after long videos, where
transformers 5.x differs on purpose (docs/DESIGN.md, "Model facts")."""

from __future__ import annotations

import types
from functools import partial

import pytest
import torch

from qwen_vl_triton.modeling.config import load_config
from qwen_vl_triton.modeling.rope_index import decode_positions, get_rope_index
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def hf_rope_index(path, ids, image_grid=None, video_grid=None, seconds=None):
    """transformers' own get_rope_index, bound to the checkpoint's config without building a model."""
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(path)
    cls = (transformers.Qwen2VLModel if hf_config.model_type == "qwen2_vl"
           else transformers.Qwen2_5_VLModel)
    owner = types.SimpleNamespace(config=hf_config)
    owner.get_vision_position_ids = partial(cls.get_vision_position_ids, owner)
    cfg = load_config(path)
    ids = torch.tensor(ids)
    types_ = torch.zeros_like(ids)
    types_[ids == cfg.image_token_id] = 1
    types_[ids == cfg.video_token_id] = 2
    kwargs = {"second_per_grid_ts": torch.tensor(seconds)} if seconds is not None else {}
    pos, delta = cls.get_rope_index(owner, ids[None], types_[None], image_grid, video_grid, **kwargs)
    return pos[:, 0], int(delta)


def _media(cfg, token: int, grid) -> list[int]:
    t, h, w = grid
    n = t * h * w // cfg.vision.merge_unit
    return [cfg.vision_start_token_id] + [token] * n + [cfg.vision_end_token_id]


def _prompt(cfg, parts) -> tuple[list[int], list, list]:
    """parts: ints = that many text tokens, ("image", grid) / ("video", grid) media items."""
    ids, images, videos = [], [], []
    for part in parts:
        if isinstance(part, int):
            ids += [(7 * i + 3) % 500 for i in range(part)]
        elif part[0] == "image":
            ids += _media(cfg, cfg.image_token_id, part[1])
            images.append(part[1])
        else:
            ids += _media(cfg, cfg.video_token_id, part[1])
            videos.append(part[1])
    return ids, images, videos


CASES = {
    "text": [9],
    "image": [5, ("image", (1, 4, 6)), 4],
    "two_images": [3, ("image", (1, 6, 8)), 2, ("image", (1, 4, 6)), 5],
    "image_first_and_last": [("image", (1, 8, 4)), 3, ("image", (1, 4, 4))],
    "video": [4, ("video", (2, 6, 8)), 3],
    "video_and_image": [2, ("video", (3, 8, 8)), 2, ("image", (1, 4, 6)), 2],
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(checkpoint, case: str) -> None:
    cfg = load_config(checkpoint)
    ids, images, videos = _prompt(cfg, CASES[case])
    image_grid = torch.tensor(images) if images else None
    video_grid = torch.tensor(videos) if videos else None
    # Qwen2.5-VL: 0.5 s per temporal patch x 2 tokens/s = one position per temporal patch, so the
    # video's temporal positions stay below max(h, w), where transformers agrees with Qwen's rule.
    seconds = [0.5] * len(videos) if videos and cfg.model_type == "qwen2_5_vl" else None
    pos, delta = get_rope_index(ids, cfg, image_grid, video_grid, seconds)
    ref_pos, ref_delta = hf_rope_index(checkpoint, ids, image_grid, video_grid, seconds)
    assert pos.shape == (3, len(ids)) and pos.dtype == torch.int64
    assert torch.equal(pos, ref_pos)
    assert delta == ref_delta


def test_qwen25_video_temporal_scaling_and_text_after_long_video(tmp_path) -> None:
    """A 4-temporal-patch video at 1 s per patch, tokens_per_second 2: temporal positions 0, 2, 4, 6
    (+ start) on a 2x2 merged grid. The text after it starts at max over all axes + 1 (Qwen's
    rule, start + 7), not at start + max(h, w) = start + 2 as transformers 5.x has it."""
    cfg = load_config(make_tiny_checkpoint(tmp_path / "c", "qwen2_5_vl"))
    assert cfg.vision.tokens_per_second == 2
    ids, _, videos = _prompt(cfg, [3, ("video", (4, 4, 4)), 2])
    pos, delta = get_rope_index(ids, cfg, None, torch.tensor(videos), [1.0])
    start = 4  # 3 text tokens + <|vision_start|>
    video = pos[:, start:start + 16]
    assert video[0].tolist() == [start + 2 * t for t in range(4) for _ in range(4)]
    assert video[1].tolist() == [start + h for _ in range(4) for h in range(2) for _ in range(2)]
    assert video[2].tolist() == [start + w for _ in range(4) for _ in range(2) for w in range(2)]
    after = pos[:, start + 16:]
    assert after.tolist() == [[start + 7, start + 8, start + 9]] * 3  # <|vision_end|>, 2 text tokens
    assert delta == start + 10 - len(ids)
    ref, _ = hf_rope_index(tmp_path / "c", ids, None, torch.tensor(videos), [1.0])
    assert ref[0, start + 16] == start + 2  # transformers' rule, which we do not follow


def test_qwen2_video_uses_unscaled_temporal_index(tmp_path) -> None:
    cfg = load_config(make_tiny_checkpoint(tmp_path / "c", "qwen2_vl"))
    ids, _, videos = _prompt(cfg, [1, ("video", (5, 4, 4)), 1])
    pos, _ = get_rope_index(ids, cfg, None, torch.tensor(videos), [3.0])  # seconds ignored: Qwen2-VL
    assert pos[0, 2:22].tolist() == [2 + t for t in range(5) for _ in range(4)]
    assert pos[:, 22].tolist() == [2 + 5] * 3  # max over axes (t reached 6) + 1


def test_decode_positions_continue_from_delta(checkpoint) -> None:
    cfg = load_config(checkpoint)
    ids, images, _ = _prompt(cfg, [2, ("image", (1, 8, 8)), 1])
    pos, delta = get_rope_index(ids, cfg, torch.tensor(images))
    assert delta == int(pos.max()) + 1 - len(ids) and delta < 0
    nxt = decode_positions(len(ids), 3, delta)
    assert nxt.tolist() == [[int(pos.max()) + 1 + i for i in range(3)]] * 3


def test_mismatched_media_raise(checkpoint) -> None:
    cfg = load_config(checkpoint)
    ids, images, _ = _prompt(cfg, [2, ("image", (1, 4, 6)), 1])
    with pytest.raises(ValueError, match="more images"):
        get_rope_index(ids, cfg)
    with pytest.raises(ValueError, match="consecutive pad tokens"):
        get_rope_index(ids, cfg, torch.tensor([[1, 6, 6]]))
    with pytest.raises(ValueError, match="2 grid rows"):
        get_rope_index(ids, cfg, torch.tensor(images * 2))
