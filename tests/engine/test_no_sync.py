"""The model forward of a decode step never waits for the device: no op that reads a tensor's
values on the host (`.item()`, `.tolist()`, `bool(t)`, `nonzero`) and no op whose output shape
depends on tensor values. That is what graph capture (CUDA / NPU graphs) needs, and it is checked
here on the CPU under a torch dispatch mode, on the Triton kernel path (the one devices run). The
kernels' PyTorch references (the CPU path) are not held to it: write_kv_cache's reference skips
padding slots (< 0) through a boolean mask.

What is checked is the forward pass only (embedding, the decoder, the logits): the step's inputs
are built before it, and the sampler reads the logits after it, as a captured graph would be
replayed between them."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwen_vl_triton.engine.decode_graphs import DecodeGraphs, width_bucket
from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.engine.scheduler import Batch
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.engine.conftest import SMALL_IMAGE, random_image

# Ops that copy a value to the host (and so wait for the device), or whose output shape depends on
# tensor values (a captured graph has static shapes).
HOST_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item", "equal", "nonzero", "nonzero_static", "masked_select",
                 "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave",
                 "bincount", "histc", "_assert_async", "masked_scatter"}


class HostSyncGuard(TorchDispatchMode):
    """Raises at the first op of HOST_SYNC_OPS, and at Tensor.tolist() / .numpy() (which read the
    values on the host without an aten op on the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self._patched: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.__name__.split(".")[0]
        masked = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                         for i in args[1])  # x[mask]: as many rows as the mask holds
        if name in HOST_SYNC_OPS or masked:
            raise AssertionError(f"the decode forward calls aten.{name}{' with a mask' if masked else ''}, which "
                                 f"waits for the device or has a data-dependent shape")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for method in ("tolist", "numpy"):
            self._patched[method] = getattr(torch.Tensor, method)

            def refuse(*args, _method=method, **kwargs):
                raise AssertionError(f"the decode forward calls Tensor.{_method}(), which waits for the device")

            setattr(torch.Tensor, method, refuse)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)


def guarded_forward(llm: LLM, batch: Batch) -> tuple[int, torch.Tensor]:
    """The batch's inputs built (outside the check: the engine prepares them on the host), then its
    model forward under HostSyncGuard; (aten ops seen, logits)."""
    ids, positions, meta, media_at, media_embeds, logit_rows = llm.runner.inputs(batch, llm.blocks.block_table,
                                                                                 llm.pad_ids)
    guard = HostSyncGuard()
    with guard:
        embeds = llm.model.embed(ids, media_at, media_embeds)
        hidden = llm.model.forward(positions, meta, llm.runner.kv_caches, inputs_embeds=embeds)
        logits = llm.model.compute_logits(hidden, logit_rows)
    return guard.ops, logits


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_the_decode_forward_has_no_host_sync(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_KERNELS", "triton")  # the kernels a GPU / NPU runs (interpreted here)
    llm = LLM(make_tiny_checkpoint(tmp_path / arch, arch), device="cpu", num_kv_blocks=64)
    prompts = [Prompt("Describe it.", [Media(random_image(60, 44, seed=1), options=SMALL_IMAGE)]),
               Prompt("hi"), Prompt("Tell me a story about the sea.")]
    for i, prompt in enumerate(prompts):
        llm.add_request(f"r{i}", llm.preprocessor.prepare(prompt, SamplingParams(max_tokens=8, ignore_eos=True)))
    while not all(len(s.output_ids) >= 2 for s in llm.sequences.values()):
        llm.step()
    batch = llm.scheduler.schedule()
    assert len(batch.runs) == 3 and all(r.count == 1 for r in batch.runs)  # a decode step of three sequences
    ops, logits = guarded_forward(llm, batch)
    assert ops > 0 and logits.shape[0] == 3 and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_the_static_decode_forward_has_no_host_sync(arch, tmp_path, monkeypatch):
    """The forward pass a graph records (engine/decode_graphs.py): on the persistent buffers,
    padded from 3 sequences to the bucket of 4."""
    monkeypatch.setenv("QVL_KERNELS", "triton")
    assert_static_forward_has_no_host_sync(make_tiny_checkpoint(tmp_path / arch, arch))


@pytest.mark.parametrize(("arch", "fmt"), [("qwen2_vl", "ascend-w8a8"), ("qwen2_5_vl", "compressed-tensors-w8a8"),
                                           ("qwen2_vl", "ascend-w8a16")])
def test_the_quantized_static_decode_forward_has_no_host_sync(arch, fmt, tmp_path, monkeypatch):
    """The same on the int8 kernels of a quantized checkpoint (each W8A8 / W8A16 scheme)."""
    from qwen_vl_triton.cli.quantize import quantize_checkpoint

    checkpoint = quantize_checkpoint(make_tiny_checkpoint(tmp_path / arch, arch), tmp_path / fmt, fmt, calib_prompts=1)
    monkeypatch.setenv("QVL_KERNELS", "triton")
    assert_static_forward_has_no_host_sync(checkpoint)


def assert_static_forward_has_no_host_sync(checkpoint) -> None:
    llm = LLM(checkpoint, device="cpu", num_kv_blocks=64)
    graphs = DecodeGraphs(llm.model, llm.runner.kv_caches, llm.model.forward, 8, 16, capture=False)
    for i, prompt in enumerate([Prompt("hi"), Prompt("Tell me a story about the sea."), Prompt("Count.")]):
        llm.add_request(f"r{i}", llm.preprocessor.prepare(prompt, SamplingParams(max_tokens=8, ignore_eos=True)))
    while not all(len(s.output_ids) >= 2 for s in llm.sequences.values()):
        llm.step()
    rows = llm.runner.decode_rows(llm.scheduler.schedule(), llm.blocks.block_table)
    batch, width = graphs.bucket(len(rows)), width_bucket(max(len(r.table) for r in rows), 16)
    graphs._load(rows, batch, width)
    guard = HostSyncGuard()
    with guard:
        logits = graphs.forward(batch, width)
    assert guard.ops > 0 and logits.shape[0] == batch == 4 and torch.isfinite(logits[:3]).all()


def test_the_guard_catches_what_it_names():
    x = torch.arange(6.0)
    for sync in (lambda: x.sum().item(), lambda: x.tolist(), lambda: torch.nonzero(x > 2),
                 lambda: bool(x[0] > 1), lambda: x[x > 2], lambda: int(x.max())):
        with pytest.raises(AssertionError, match="decode forward"), HostSyncGuard():
            sync()
    with HostSyncGuard():
        (x * 2).softmax(0)  # a plain op passes
