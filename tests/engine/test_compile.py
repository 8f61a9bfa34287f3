"""LLM(compile=True): the forward pass through torch.compile (inductor, dynamic shapes) gives the
greedy tokens of the eager engine, over prefill and decode steps of changing batch sizes. On the
kernels' PyTorch references (the CPU path it compiles); the first call pays the compilation."""

from __future__ import annotations

from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.sampling import SamplingParams


def test_compiled_forward_gives_the_eager_tokens(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("QVL_KERNELS", "torch")
    prompts = [Prompt("Tell me a story about the sea."), Prompt("hi"), Prompt("Name three colours and count.")]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 3, 9)]  # batches shrink
    eager = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64).generate(prompts, params)
    compiled = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, compile=True).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in compiled] == [o.outputs[0].token_ids for o in eager]
