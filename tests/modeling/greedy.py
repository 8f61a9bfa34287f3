"""A minimal greedy decode loop over the paged KV cache, for parity tests (the engine has the
real one): one sequence, blocks allocated in order, whole-prompt prefill then one token a step."""

from __future__ import annotations

import torch

from qwen_vl_triton.modeling.attention_metadata import AttentionMetadata
from qwen_vl_triton.modeling.model import QwenVLModel
from qwen_vl_triton.modeling.rope_index import decode_positions

BLOCK_SIZE = 16


one_sequence_metadata = AttentionMetadata.one_sequence


def embed_prompt(model: QwenVLModel, input_ids: torch.Tensor, image: tuple[torch.Tensor, torch.Tensor] | None = None,
                 video: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The prompt's embeddings [L, H] as the engine makes them: each kind's media encoded, in
    order, at that kind's pad rows (model.embed's media_rows)."""
    rows, embeds = [], []
    for media, pad in ((image, model.config.image_token_id), (video, model.config.video_token_id)):
        if media is not None:
            rows.append((input_ids == pad).nonzero().flatten())
            embeds.append(model.encode_media(*media))
    if not rows:
        return model.embed(input_ids)
    return model.embed(input_ids, torch.cat(rows), torch.cat(embeds))


def greedy_generate(model: QwenVLModel, input_ids: torch.Tensor, steps: int,
                    image: tuple[torch.Tensor, torch.Tensor] | None = None,
                    video: tuple[torch.Tensor, torch.Tensor] | None = None,
                    second_per_grid_ts: list[float] | None = None,
                    ) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy-decode `steps` tokens after the prompt input_ids [L].

    image / video: (pixel_values, grid_thw) of the prompt's images / videos, packed.
    Returns (the logits [V] fp32 each token was chosen from, the generated token ids).
    """
    n = input_ids.shape[0]
    max_blocks = -(-(n + steps) // BLOCK_SIZE)
    kv = model.allocate_kv_cache(max_blocks, BLOCK_SIZE)
    positions, delta = model.rope_index(input_ids, image[1] if image else None,
                                        video[1] if video else None, second_per_grid_ts)
    embeds = embed_prompt(model, input_ids, image, video)
    hidden = model.forward(positions, one_sequence_metadata(0, n, max_blocks), kv, inputs_embeds=embeds)
    logits = [model.compute_logits(hidden, torch.tensor([n - 1]))[0]]
    tokens = [int(logits[-1].argmax())]
    for step in range(1, steps):
        pos = n + step - 1  # index of the token fed in this step
        hidden = model.forward(decode_positions(pos, 1, delta), one_sequence_metadata(pos, 1, max_blocks),
                               kv, input_ids=torch.tensor([tokens[-1]]))
        logits.append(model.compute_logits(hidden)[0])
        tokens.append(int(logits[-1].argmax()))
    return logits, tokens
