"""The engine end to end on a tiny Qwen2.5-VL: batched == alone == transformers, under preemption,
chunked prefill and prefix caching; aborts free every block."""

from __future__ import annotations

import pytest
import torch

from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.sampling import SamplingParams
from tests.engine.conftest import mixed_requests


def greedy(max_tokens: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run(llm: LLM, requests) -> list[list[int]]:
    outs = llm.generate([p for p, _ in requests], [greedy(m) for _, m in requests])
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def requests():
    return mixed_requests()


@pytest.fixture(scope="module")
def batched_tokens(tiny_checkpoint, requests):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128, enable_prefix_caching=False)
    tokens = run(llm, requests)
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    return tokens


def transformers_greedy(checkpoint, llm: LLM, prompt: Prompt, steps: int) -> list[int]:
    """transformers' generate on the same prompt ids and pixels (with mm_token_type_ids, without
    which transformers 5.x silently falls back to 1D positions)."""
    import transformers

    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    request = llm.preprocessor.prepare(prompt)
    ids, media = torch.tensor(request.ids), request.media
    c = llm.config
    kwargs = {}
    images = [m for m in media if m.kind == "image"]
    videos = [m for m in media if m.kind == "video"]
    if images:
        kwargs.update(pixel_values=torch.cat([m.pixel_values for m in images]),
                      image_grid_thw=torch.tensor([m.grid for m in images]))
    if videos:
        kwargs.update(pixel_values_videos=torch.cat([m.pixel_values for m in videos]),
                      video_grid_thw=torch.tensor([m.grid for m in videos]),
                      second_per_grid_ts=torch.tensor([m.second_per_grid_t for m in videos]))
    mm_types = (ids == c.image_token_id).long() + 2 * (ids == c.video_token_id).long()
    with torch.no_grad():
        out = ref.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                           mm_token_type_ids=mm_types[None], max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def test_batched_equals_transformers(tiny_checkpoint, requests, batched_tokens):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64)
    for (prompt, max_tokens), tokens in zip(requests, batched_tokens, strict=True):
        assert tokens == transformers_greedy(tiny_checkpoint, llm, prompt, max_tokens), prompt.text


def test_batched_equals_alone(tiny_checkpoint, requests, batched_tokens):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, enable_prefix_caching=False)
    for request, tokens in zip(requests, batched_tokens, strict=True):
        assert run(llm, [request]) == [tokens]


def test_preemption_and_chunked_prefill_give_the_same_tokens(tiny_checkpoint, requests, batched_tokens):
    """A KV cache of 8 blocks (the longest request needs 7) forces preemption and recompute; a
    prefill budget of 23 tokens splits every prompt into chunks (media runs included)."""
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=8, max_prefill_tokens=23, enable_prefix_caching=False)
    assert run(llm, requests) == batched_tokens
    assert llm.scheduler.num_preemptions > 0
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_prefix_cache_hits_give_the_same_tokens(tiny_checkpoint, requests, batched_tokens):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, block_size=16)
    first = run(llm, requests[:2])
    hits_before = llm.blocks.prefix_hit_tokens
    again = llm.generate([p for p, _ in requests[:2]], [greedy(m) for _, m in requests[:2]])
    assert [o.outputs[0].token_ids for o in again] == first == batched_tokens[:2]
    assert all(o.cached_prompt_tokens >= 16 for o in again)
    assert llm.blocks.prefix_hit_tokens - hits_before == sum(o.cached_prompt_tokens for o in again)


def test_same_text_other_image_is_not_a_prefix_hit(tiny_checkpoint, requests):
    """Media pads are keyed by content: the same prompt text with another image must not reuse KV."""
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64)
    prompt_a, prompt_b = requests[2][0], requests[7][0]
    a = llm.generate([prompt_a], [greedy(2)])[0]
    b = llm.generate([Prompt(prompt_a.text, prompt_b.media)], [greedy(2)])[0]
    # Blocks before the image's first pad are shared; none after it.
    first_pad = llm.preprocessor.prepare(prompt_a).ids.index(llm.config.image_token_id)
    assert b.cached_prompt_tokens <= first_pad
    assert a.cached_prompt_tokens == 0


def test_abort_frees_every_block(tiny_checkpoint, requests):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64)
    for i, (prompt, _) in enumerate(requests):
        llm.add_request(f"r{i}", llm.preprocessor.prepare(prompt, greedy(50)))
    for _ in range(3):
        llm.step()
    assert llm.blocks.num_used_blocks() > 0
    for i in range(len(requests)):
        assert llm.abort(f"r{i}")
    assert not llm.abort("r0")
    assert llm.blocks.num_used_blocks() == 0
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    assert not llm.has_unfinished()


def test_limits_are_enforced_with_clear_errors(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=4, max_input_length=60)
    with pytest.raises(ValueError, match="max_input_length 60"):
        llm.preprocessor.prepare("word " * 200, greedy(4))
    with pytest.raises(ValueError, match="max_tokens"):
        llm.add_request("bad", llm.preprocessor.prepare("hi", SamplingParams(max_tokens=0)))
    assert not llm.has_unfinished()
    # The cache's capacity (4 blocks x 16) is max_seq_len: max_tokens=None fills it and finishes with
    # "length"; a max_tokens it cannot hold is refused up front, naming both (the output budget).
    out = llm.generate(["hi"], [greedy(None)])[0]
    assert out.outputs[0].finish_reason == "length" and out.prompt_tokens + len(out.outputs[0].token_ids) == 4 * 16
    with pytest.raises(ValueError, match="max_tokens is 1000: together over max_seq_len 64"):
        llm.generate(["hi"], [greedy(1000)])


def test_cache_salt_keeps_prefixes_apart(tiny_checkpoint, requests):
    """Requests with different cache salts never share cached blocks; the same salt does."""
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, block_size=16)
    prompt = requests[0][0]

    def cached_tokens(request_id: str, salt: str | None) -> int:
        llm.add_request(request_id, llm.preprocessor.prepare(prompt, greedy(2), cache_salt=salt))
        done = []
        while llm.has_unfinished():
            done += [o for o in llm.step() if o.finished]
        (out,) = done
        return out.cached_prompt_tokens

    assert cached_tokens("a1", "tenant-a") == 0
    assert cached_tokens("b1", "tenant-b") == 0
    assert cached_tokens("a2", "tenant-a") >= 16
    assert cached_tokens("n1", None) == 0
    assert cached_tokens("n2", None) >= 16


def test_a_prompt_may_carry_media_prepared_ahead(tiny_checkpoint, requests):
    """tools/generate.py prepares media while the engine loads: a prompt holding prepared media
    gives the request its plain media give; media prepared for another image config are refused."""
    import dataclasses

    from qwen_vl_triton.engine.media import prepare_media

    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=32)
    for prompt, _ in requests:
        ahead = Prompt(prompt.text, [prepare_media(m, llm.image_cfg) for m in prompt.media])
        plain, early = llm.preprocessor.prepare(prompt), llm.preprocessor.prepare(ahead)
        assert early.ids == plain.ids and [m.content_hash for m in early.media] == [m.content_hash for m in plain.media]
        for a, b in zip(early.media, plain.media, strict=True):
            assert (a.pixel_values is None) == (b.pixel_values is None)
            if a.pixel_values is not None:
                assert torch.equal(a.pixel_values, b.pixel_values)
    image = next(p for p, _ in requests if p.media)
    other = dataclasses.replace(llm.image_cfg, max_pixels=llm.image_cfg.max_pixels // 2)
    with pytest.raises(ValueError, match="another image processor config"):
        llm.preprocessor.prepare(Prompt(image.text, [prepare_media(m, other) for m in image.media]))
