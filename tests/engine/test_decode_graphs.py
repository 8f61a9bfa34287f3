"""Decode steps on static buffers (engine/decode_graphs.py): batch and width buckets, padding
rows that write nothing, and the same tokens as the plain path.

Graph capture itself needs a CUDA or NPU device (benchmarks/device_check.py runs it when one is
lent); what a graph would record, the static-shape forward on the persistent buffers, runs here
eagerly (capture=False), on the Triton kernels a device runs (interpreted)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qwen_vl_triton.engine.decode_graphs import DecodeGraphs, batch_buckets, width_bucket
from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.sampling import SamplingParams
from tests.engine.conftest import SMALL_IMAGE, random_image


@given(st.integers(1, 300), st.data())
def test_a_batch_pads_to_the_smallest_bucket_that_holds_it(max_batch_size, data):
    buckets = batch_buckets(max_batch_size)
    n = data.draw(st.integers(1, max_batch_size))
    chosen = min(b for b in buckets if b >= n)
    assert buckets[-1] == max_batch_size and buckets == sorted(set(buckets))
    assert chosen - n < max(n, 8)  # padding at most doubles a small batch, or adds under 8 rows
    assert len(buckets) <= 3 + max_batch_size // 8 + 1


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_table_width_is_a_power_of_two_within_the_limit(blocks, max_blocks):
    blocks = min(blocks, max_blocks)
    w = width_bucket(blocks, max_blocks)
    assert blocks <= w <= max_blocks
    assert w == max_blocks or (w & (w - 1) == 0 and w < 2 * blocks)


def test_the_cpu_has_nothing_to_capture(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=32)
    assert llm.runner.decode_graphs is None  # graphs are for CUDA / NPU devices
    with pytest.raises(ValueError, match="CUDA or NPU"):
        DecodeGraphs(llm.model, llm.runner.kv_caches, llm.model.forward, 4, 8, capture=True)


def _requests() -> tuple[list[Prompt], list[SamplingParams]]:
    """5 requests that end at different steps (the batch shrinks through 5, 4, 3, 1: buckets 8, 4,
    4, 1, so padding rows run), one with an image, one sampled with a seed; the longest outgrows
    its table past a power of two (the width bucket grows)."""
    prompts = [Prompt("Tell me a story about the sea."), Prompt("hi"),
               Prompt("Describe.", [Media(random_image(61, 47, 1), options=SMALL_IMAGE)]),
               Prompt("Name three colours and count to five."), Prompt("What is a cat?")]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 3, 9, 40, 4)]
    params[4] = SamplingParams(max_tokens=4, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    return prompts, params


def test_static_decode_gives_the_plain_paths_tokens(tiny_checkpoint):
    prompts, params = _requests()
    plain = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, block_size=16)
    expected = plain.generate(prompts, params)

    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, block_size=16, max_batch_size=8)
    llm.runner.decode_graphs = DecodeGraphs(llm.model, llm.runner.kv_caches, llm.model.forward, 8, 64 // 16 * 4,
                                            capture=False)
    shapes = []
    forward = llm.runner.decode_graphs.forward
    llm.runner.decode_graphs.forward = lambda batch, width: shapes.append((batch, width)) or forward(batch, width)
    got = llm.generate(prompts, params)

    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.tensor(g.outputs[0].token_logprobs), torch.tensor(e.outputs[0].token_logprobs),
                                   rtol=1e-4, atol=1e-4)
    assert {b for b, _ in shapes} >= {8, 4, 1}  # padded batches ran, and the last one alone
    assert len({w for _, w in shapes}) >= 2  # the table width grew with the longest sequence


def test_padding_rows_write_nothing_to_the_cache(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=16, block_size=16)
    graphs = DecodeGraphs(llm.model, llm.runner.kv_caches, llm.model.forward, 8, 4, capture=False)
    llm.add_request("r", llm.preprocessor.prepare(Prompt("hi"), SamplingParams(max_tokens=4, ignore_eos=True)))
    while len(llm.sequences["r"].output_ids) < 2:
        llm.step()
    before = [k.clone() for k, _ in llm.runner.kv_caches]
    batch = llm.scheduler.schedule()
    rows = llm.runner.decode_rows(batch, llm.blocks.block_table)
    logits = graphs.run(rows)  # one real row padded to 1: then the same row three times, padded to 4
    assert logits.shape[0] == 1 and torch.isfinite(logits).all()
    written = rows[0].slot
    for layer, k in enumerate(before):
        after = llm.runner.kv_caches[layer][0]
        same = (after == k) | (after.isnan() & k.isnan())  # unwritten slots may hold NaN (torch.empty)
        changed = (~same).flatten(0, 1).any(dim=(1, 2)).nonzero().flatten().tolist()
        assert changed in ([], [written])  # only the real row's slot (unchanged if written before)
    again = graphs.run(rows * 3)
    assert again.shape[0] == 3 and graphs.bucket(3) == 4
    # fp32 matmuls of 1 and of 4 rows may round differently (other kernels): not bit-equal
    torch.testing.assert_close(again, logits.expand(3, -1), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graph capture needs a CUDA device (make device-check)")
def test_captured_graphs_give_the_eager_tokens(tiny_checkpoint):
    prompts, params = _requests()
    eager = LLM(tiny_checkpoint, device="cuda", num_kv_blocks=64, enforce_eager=True).generate(prompts, params)
    llm = LLM(tiny_checkpoint, device="cuda", num_kv_blocks=64)
    got = llm.generate(prompts, params)
    graphs = llm.runner.decode_graphs
    assert graphs is not None and graphs.capture and len(graphs.graphs) >= 3
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in eager]
