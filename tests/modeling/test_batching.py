"""What the engine relies on beyond one sequence: packed prefill of several sequences, chunked
prefill (the second chunk attends to the cached first), batched decode with scattered blocks,
and media of several items / kinds encoded in one vision call. Each must equal the same work
done one sequence (one item) at a time."""

from __future__ import annotations

import pytest
import torch

from qwen_vl_triton.modeling.attention_metadata import AttentionMetadata
from qwen_vl_triton.modeling.model import QwenVLModel, load_model
from qwen_vl_triton.modeling.rope_index import decode_positions
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.modeling.greedy import BLOCK_SIZE, embed_prompt, greedy_generate

TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> QwenVLModel:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("batch"), "qwen2_vl", seed=5)
    return load_model(path, dtype=torch.float32)


def _image_prompt(model: QwenVLModel) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    c = model.config
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, c.vision.patch_dim, generator=torch.Generator().manual_seed(1))
    ids = [5, 6, c.vision_start_token_id] + [c.image_token_id] * 4 + [c.vision_end_token_id]
    ids += list(range(9, 19))  # 18 tokens: two KV blocks of 16
    return torch.tensor(ids), (pixels, grid)


def _meta(new: list[int], done: list[int], tables: list[list[int]]) -> AttentionMetadata:
    """Sequences b with done[b] cached tokens and new[b] new ones, blocks tables[b]."""
    slots = [tables[b][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
             for b in range(len(new)) for p in range(done[b], done[b] + new[b])]
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        context_lens=torch.tensor([d + n for d, n in zip(done, new, strict=True)], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32),
        max_query_len=max(new),
    )


def test_packed_chunked_prefill_and_batched_decode(model: QwenVLModel) -> None:
    image_ids, image = _image_prompt(model)
    text_ids = torch.arange(40, 60)
    steps = 4
    alone = [greedy_generate(model, image_ids, steps, image=image), greedy_generate(model, text_ids, steps)]

    # Both prompts in one step; the image prompt in two chunks (the first ends inside the image),
    # each sequence over two KV blocks interleaved with the other's, so block tables matter.
    tables = [[3, 0], [1, 2]]
    kv = model.allocate_kv_cache(4, BLOCK_SIZE)
    pos_a, delta_a = model.rope_index(image_ids, image[1])
    pos_b, delta_b = model.rope_index(text_ids)
    embeds_a = embed_prompt(model, image_ids, image)
    embeds_b = model.embed(text_ids)
    model.forward(pos_a[:, :5], _meta([5], [0], tables[:1]), kv, inputs_embeds=embeds_a[:5])
    na, nb = len(image_ids), len(text_ids)
    hidden = model.forward(torch.cat([pos_a[:, 5:], pos_b], 1), _meta([na - 5, nb], [5, 0], tables), kv,
                           inputs_embeds=torch.cat([embeds_a[5:], embeds_b]))
    logits = model.compute_logits(hidden, torch.tensor([na - 5 - 1, na - 5 + nb - 1]))
    torch.testing.assert_close(logits[0], alone[0][0][0], **TOL)
    torch.testing.assert_close(logits[1], alone[1][0][0], **TOL)

    tokens = logits.argmax(-1)
    for step in range(1, steps):
        done = [na + step - 1, nb + step - 1]
        positions = torch.cat([decode_positions(done[0], 1, delta_a),
                               decode_positions(done[1], 1, delta_b)], 1)
        hidden = model.forward(positions, _meta([1, 1], done, tables), kv, input_ids=tokens)
        logits = model.compute_logits(hidden)
        for b in range(2):
            torch.testing.assert_close(logits[b], alone[b][0][step], **TOL)
        tokens = logits.argmax(-1)


def test_one_vision_call_for_mixed_media_equals_separate_calls(model: QwenVLModel) -> None:
    c = model.config
    grids = [(1, 4, 6), (2, 4, 4), (1, 6, 4)]  # image, 4-frame video, image of another shape
    g = torch.Generator().manual_seed(2)
    items = [torch.randn(t * h * w, c.vision.patch_dim, generator=g) for t, h, w in grids]
    together = model.encode_media(torch.cat(items), torch.tensor(grids))
    apart = torch.cat([model.encode_media(x, torch.tensor([grid]))
                       for x, grid in zip(items, grids, strict=True)])
    assert together.shape == (sum(t * h * w for t, h, w in grids) // 4, c.text.hidden_size)
    torch.testing.assert_close(together, apart, **TOL)
