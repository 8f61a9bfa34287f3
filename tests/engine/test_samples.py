"""n samples per request (SamplingParams.n): they share the prompt's KV blocks (BlockManager.fork,
the partly filled last block copied) and each equals the request it stands for, run alone."""

from __future__ import annotations

import pytest

from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.outputs import CompletionOutput
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.modeling.processing import MediaError
from tests.engine.conftest import SMALL_IMAGE, random_image

BLOCK = 16
PROMPT = Prompt("Describe this picture and everything in it, in as much detail as you can manage.",
                [Media(random_image(56, 84, seed=7), options=SMALL_IMAGE)])


def drain(llm: LLM, request_id: str, params: SamplingParams, prompt: Prompt = PROMPT,
          watch=None) -> dict[int, CompletionOutput]:
    """Add one request and step until it ends; the final output of each sample, by index.
    watch(llm) runs after every step."""
    llm.add_request(request_id, llm.preprocessor.prepare(prompt, params))
    finals: dict[int, CompletionOutput] = {}
    while llm.has_unfinished():
        for out in llm.step():
            assert out.request_id == request_id and out.error is None, out
            assert [o.index for o in out.outputs] == list(range(params.n))  # every sample, every step
            for sample in out.outputs:
                if sample.finished:
                    finals[sample.index] = sample
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
        assert group[k].token_ids == alone.token_ids, k
        assert group[k].token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)
    assert len({tuple(o.token_ids) for o in group.values()}) > 1  # they are different samples


def test_a_sample_without_a_block_to_copy_recomputes_its_prompt(tiny_checkpoint):
    """A cache too small to fork into: the samples that find no free block wait first in line and
    recompute (prefix-cache hits on the full blocks), and still give the tokens of greedy decoding."""
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=7, block_size=BLOCK)  # 6 hold the prompt: one fork fits
    prompt_len = len(llm.preprocessor.prepare(PROMPT).ids)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = drain(llm, "alone", greedy)[0].token_ids
    needed = -(-(prompt_len + greedy.max_tokens) // BLOCK)
    assert 3 * needed > llm.blocks.num_blocks, "the cache must be too small for three samples at once"
    group = drain(llm, "group", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, n=3))
    assert [o.token_ids for o in group.values()] == [alone] * 3
    assert llm.scheduler.num_preemptions > 0


def test_abort_before_the_fork_ends_every_sample(llm):
    params = SamplingParams(max_tokens=4, temperature=1.0, n=3)
    llm.add_request("gone", llm.preprocessor.prepare(PROMPT, params))
    llm.step()  # admitted (its image encoding may take this step): no sample has a token yet
    assert llm.abort("gone")
    assert not llm.has_unfinished() and llm.blocks.num_free_blocks == llm.blocks.num_blocks
    assert not llm.abort("gone")


# ---------------------------------------------------------------------------- n > 1 offline


def sampled(n: int, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=3, temperature=1.0, seed=seed, n=n, ignore_eos=True)


@pytest.mark.parametrize("seed", [0, 99])
def test_offline_generate_gives_n_samples_each_drawn_with_seed_plus_k(llm, seed):
    [out] = llm.generate(PROMPT, sampled(3, seed))
    assert out.finished and out.error is None and len(out.outputs) == 3
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 3 for o in out.outputs)
    assert out.completion_tokens == 9
    for k, sample in enumerate(out.outputs):
        [alone] = llm.generate(PROMPT, sampled(1, seed + k))
        assert len(alone.outputs) == 1 and alone.outputs[0].index == 0
        assert sample.token_ids == alone.outputs[0].token_ids, k
        assert sample.text == alone.outputs[0].text
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_offline_greedy_samples_equal_greedy_decoding(llm):
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    [alone] = llm.generate(PROMPT, greedy)
    [out] = llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, n=2))
    assert [o.token_ids for o in out.outputs] == [alone.outputs[0].token_ids] * 2
    assert [o.index for o in out.outputs] == [0, 1]


def test_offline_chat_gives_n_samples(llm):
    messages = [{"role": "user", "content": "Say something."}]
    [out] = llm.chat(messages, sampled(2, 5))
    assert [o.index for o in out.outputs] == [0, 1]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 3 for o in out.outputs)


def test_an_offline_batch_mixing_n_keeps_input_order(llm):
    prompts = [Prompt("hi"), PROMPT, Prompt("Tell me a story about the sea.")]
    outs = llm.generate(prompts, [sampled(1, 1), sampled(3, 2), sampled(1, 3)])
    assert [len(o.outputs) for o in outs] == [1, 3, 1]
    assert [[s.index for s in o.outputs] for o in outs] == [[0], [0, 1, 2], [0]]
    assert len({o.request_id for o in outs}) == 3
    assert all(o.finished and o.error is None for o in outs)
    # the same as each prompt alone
    assert outs[1].outputs[2].token_ids == llm.generate(PROMPT, sampled(1, 4))[0].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == llm.generate(prompts[2], sampled(1, 3))[0].outputs[0].token_ids


def test_a_prompt_that_cannot_be_prepared_fails_every_sample(llm, tmp_path):
    missing = Prompt("Look.", [Media(tmp_path / "missing.png")])
    bad, good = llm.generate([missing, Prompt("hi")], [sampled(2, 0), sampled(2, 1)], errors="return")
    assert bad.finished and len(bad.outputs) == 2 and [o.index for o in bad.outputs] == [0, 1]
    assert isinstance(bad.error, MediaError) and "missing.png" in str(bad.error)
    for sample in bad.outputs:
        assert sample.finish_reason == "error" and sample.error is bad.error and sample.token_ids == []
    assert bad.completion_tokens == 0
    assert good.error is None and [len(o.token_ids) for o in good.outputs] == [3, 3]
