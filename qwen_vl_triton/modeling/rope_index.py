"""MRoPE position ids: three rows (temporal, height, width) per token of a prompt.

Rules (Qwen's original get_rope_index, which vLLM follows):
  - text tokens get the same position on all three rows, counting on from the previous token;
  - the tokens of an image or video get its merged grid's (t, h, w) indices, each offset by the
    position after the preceding text (start); a Qwen2.5-VL video's temporal index is
    floor(t * second_per_grid_t * tokens_per_second), Qwen2-VL's is t;
  - the text after an image or video continues from the maximum over all three rows + 1.
    (transformers 5.x continues from start + max(h, w) instead; the two differ only when a
    video's temporal positions pass max(h, w), i.e. on longer clips.)
  - decoding continues with one position per step, the same on all rows: position of token
    i >= len(prompt) is i + delta, with delta = max(prompt positions) + 1 - len(prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen_vl_triton.modeling.config import ModelConfig


def _media_positions(start: int, t: int, h: int, w: int, t_step: float) -> torch.Tensor:
    """[3, t*h*w] positions of one item's merged grid (t, h, w), raster order, offset by start."""
    t_index = (torch.arange(t) * t_step).long()  # fp32 product, truncated (as Qwen and transformers)
    grid = torch.stack(torch.meshgrid(t_index, torch.arange(h), torch.arange(w), indexing="ij"))
    return grid.reshape(3, -1) + start


def _rows(grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    return [(int(t), int(h), int(w)) for t, h, w in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]


def get_rope_index(input_ids: Sequence[int] | torch.Tensor, config: ModelConfig,
                   image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
                   video_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
                   second_per_grid_ts: Sequence[float] | torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, int]:
    """3D positions of one prompt and its rope delta.

    input_ids:  [L] token ids, media already expanded to one pad token per merged patch.
    *_grid_thw: [n, 3] (t, h, w) in patches, one row per image / video, in prompt order.
    second_per_grid_ts: per video, seconds covered by one temporal patch (temporal_patch_size /
                fps); Qwen2.5-VL only; default 1.0 per video (transformers' default too).
    Returns (positions [3, L] int64, delta int).
    """
    ids = torch.as_tensor(input_ids).flatten().tolist()
    merge = config.vision.spatial_merge_size
    grids = {config.image_token_id: _rows(image_grid_thw), config.video_token_id: _rows(video_grid_thw)}
    seconds = [float(s) for s in second_per_grid_ts] if second_per_grid_ts is not None else []
    used = {config.image_token_id: 0, config.video_token_id: 0}
    pieces: list[torch.Tensor] = []
    next_pos, i, n = 0, 0, len(ids)
    while i < n:
        token = ids[i]
        if token not in grids:  # a run of text up to the next media token
            j = i
            while j < n and ids[j] not in grids:
                j += 1
            pieces.append(torch.arange(next_pos, next_pos + j - i).expand(3, -1))
            next_pos += j - i
            i = j
            continue
        k = used[token]
        if k >= len(grids[token]):
            kind = "image" if token == config.image_token_id else "video"
            raise ValueError(f"prompt has more {kind}s than {kind}_grid_thw rows ({len(grids[token])})")
        used[token] += 1
        t, h, w = grids[token][k]
        t_step = 1.0
        if token == config.video_token_id and config.model_type == "qwen2_5_vl":
            t_step = (seconds[k] if k < len(seconds) else 1.0) * config.vision.tokens_per_second
        item = _media_positions(next_pos, t, h // merge, w // merge, t_step)  # [3, t*h*w/merge^2]
        count = item.shape[1]
        if ids[i:i + count] != [token] * count:
            raise ValueError(f"media item at token {i} needs {count} consecutive pad tokens "
                             f"(grid {t}x{h}x{w}, merge {merge})")
        pieces.append(item)
        next_pos = int(item.max()) + 1  # Qwen's rule: max over all three rows + 1
        i += count
    for token, rows in grids.items():
        if used[token] != len(rows):
            raise ValueError(f"{len(rows)} grid rows given for token {token}, the prompt uses {used[token]}")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return positions, next_pos - n


def decode_positions(start: int, count: int, delta: int) -> torch.Tensor:
    """[3, count] positions of tokens start .. start+count-1 after the prompt (decode / text
    appended later): index + delta on every row."""
    return torch.arange(start + delta, start + delta + count).expand(3, -1).clone()
