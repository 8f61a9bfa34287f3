"""n samples per request (SamplingParams.n): they share the prompt's KV blocks (BlockManager.fork,
the partly filled last block copied) and each equals the request it stands for, run alone."""

from __future__ import annotations

import pytest

from qwen_vl_triton.engine.llm import LLM, Prompt, RequestOutput
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.sampling import SamplingParams
from tests.engine.conftest import SMALL_IMAGE, random_image

BLOCK = 16
PROMPT = Prompt("Describe this picture and everything in it, in as much detail as you can manage.",
                [Media(random_image(56, 84, seed=7), options=SMALL_IMAGE)])


def drain(llm: LLM, request_id: str, params: SamplingParams, prompt: Prompt = PROMPT,
          watch=None) -> dict[int, RequestOutput]:
    """Add one request and step until it ends; the final output of each sample, by index.
    watch(llm) runs after every step."""
    llm.add_request(request_id, llm.preprocessor.prepare(prompt, params))
    finals: dict[int, RequestOutput] = {}
    while llm.has_unfinished():
        for out in llm.step():
            assert out.request_id == request_id and out.error is None, out
            if out.finished:
                finals[out.index] = out
        if watch is not None:
            watch(llm)
    assert sorted(finals) == list(range(params.n))
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks  # every sample freed what it held
    return finals


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, block_size=BLOCK)


def test_samples_share_the_prompt_blocks_and_equal_requests_run_alone(llm):
    prompt_len = len(llm.preprocessor.prepare(PROMPT).ids)
    assert prompt_len % BLOCK, "the prompt must end inside a block, so that one is copied"
    full, n = prompt_len // BLOCK, 4
    peak = []

    def blocks_in_use(engine: LLM) -> None:
        samples = [s for s in engine.scheduler.running if s.request_id == "group"]
        if len(samples) == n and all(len(s.output_ids) == 1 for s in samples):
            peak.append(engine.blocks.num_used_blocks())

    params = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.95, seed=1234, n=n, ignore_eos=True)
    group = drain(llm, "group", params, watch=blocks_in_use)
    # After the fork: the prompt's full blocks once, and each sample's own copy of the last one.
    assert peak == [full + n], (peak, full)
    # Sample k draws with seed + k: it equals a request of n = 1 with that seed, run alone (which
    # also proves the copied block holds the right KV).
    for k in range(n):
        alone = drain(llm, f"alone{k}", SamplingParams(max_tokens=6, temperature=0.9, top_p=0.95, seed=1234 + k,
                                                       ignore_eos=True))[0]
        assert group[k].output_ids == alone.output_ids, k
        assert group[k].output_logprobs == pytest.approx(alone.output_logprobs, abs=1e-4)
    assert len({tuple(o.output_ids) for o in group.values()}) > 1  # they are different samples


def test_a_sample_without_a_block_to_copy_recomputes_its_prompt(tiny_checkpoint):
    """A cache too small to fork into: the samples that find no free block wait first in line and
    recompute (prefix-cache hits on the full blocks), and still give the tokens of greedy decoding."""
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=12, block_size=BLOCK)
    prompt_len = len(llm.preprocessor.prepare(PROMPT).ids)
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    alone = drain(llm, "alone", greedy)[0].output_ids
    needed = -(-(prompt_len + greedy.max_tokens) // BLOCK)
    assert 3 * needed > llm.blocks.num_blocks, "the cache must be too small for three samples at once"
    group = drain(llm, "group", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, n=3))
    assert [o.output_ids for o in group.values()] == [alone] * 3
    assert llm.scheduler.num_preemptions > 0


def test_abort_before_the_fork_ends_every_sample(llm):
    params = SamplingParams(max_tokens=4, temperature=1.0, n=3)
    llm.add_request("gone", llm.preprocessor.prepare(PROMPT, params))
    llm.step()  # admitted (its image encoding may take this step): no sample has a token yet
    assert llm.abort("gone")
    assert not llm.has_unfinished() and llm.blocks.num_free_blocks == llm.blocks.num_blocks
    assert not llm.abort("gone")


def test_offline_generate_refuses_n(llm):
    with pytest.raises(ValueError, match="n must be 1"):
        llm.generate(["hi"], SamplingParams(n=2))
