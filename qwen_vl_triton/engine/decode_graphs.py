"""Decode steps with static shapes: persistent input buffers, batch buckets, and a captured graph
per bucket on CUDA / Ascend NPU.

A decode step (one new token per running sequence, no media) is the step a server runs most, and
on a GPU or NPU with a model of any size its time is mostly the host launching hundreds of small
kernels. Captured once as a graph (torch.cuda.CUDAGraph / torch.npu.NPUGraph), the whole forward
pass is one launch. A graph replays fixed shapes and fixed addresses, so:

- the step's inputs live in persistent device buffers (token ids, rope positions, slot mapping,
  context lengths, block tables), overwritten in place each step from one host staging tensor;
- the batch is padded up to a bucket (1, 2, 4, 8, then multiples of 8 up to max_batch_size) and
  the block tables' width up to a power of two blocks: one graph per (batch, width) pair, captured
  the first time that pair runs, then replayed. Padding rows write no K/V (slot -1), read one slot
  (context length 1) and their logits are dropped;
- the forward pass reads no value on the host (tests/engine/test_no_sync.py checks it under a
  torch dispatch mode, on the Triton kernels a device runs).

The LLM (engine/llm.py) uses this for decode-only batches when graphs are on: on a CUDA or NPU
device at tensor-parallel world size 1, unless `enforce_eager` (vLLM's flag of that name). Under
tensor parallelism the step runs eagerly: its all-reduces wait with a timeout on the host
(parallel/comm.py), which a graph cannot hold. On the CPU there is nothing to capture; `capture=False`
runs the same static-shape path eagerly, which is how the tests check it here.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen_vl_triton.modeling.attention_metadata import AttentionMetadata
from qwen_vl_triton.modeling.model import QwenVLModel

log = logging.getLogger(__name__)

BUCKET_STEP = 8  # batch buckets past 8 grow by this many rows

ForwardFn = Callable[..., torch.Tensor]  # QwenVLModel.forward, or its torch.compile'd version


def batch_buckets(max_batch_size: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, 16, 24, ... and max_batch_size itself as the last."""
    sizes = {1, 2, 4, *range(BUCKET_STEP, max_batch_size, BUCKET_STEP), max_batch_size}
    return sorted(s for s in sizes if s <= max_batch_size)


def width_bucket(blocks: int, max_blocks: int) -> int:
    """Block-table columns for a batch whose longest table has `blocks`: the next power of two,
    at most max_blocks."""
    return min(1 << max(blocks - 1, 0).bit_length(), max_blocks)


@dataclass
class DecodeRow:
    """One sequence's input to a decode step: its token, rope position (3 ints), the cache slot
    its K/V goes to, its context length after the step, and its block table."""

    token: int
    position: tuple[int, int, int]
    slot: int
    context_len: int
    table: list[int]


class DecodeGraphs:
    """Runs decode steps of up to max_batch_size sequences on static buffers; see the module doc.

    model, kv_caches: the LLM's; forward: the model's forward (or its compiled version);
    max_blocks: the longest block table a sequence can have (max_seq_len / block_size, rounded up);
    capture: record and replay a graph per (batch, width) bucket (CUDA / NPU only).
    """

    def __init__(self, model: QwenVLModel, kv_caches: list, forward: ForwardFn, max_batch_size: int,
                 max_blocks: int, capture: bool):
        device = model.device
        if capture and device.type not in ("cuda", "npu"):
            raise ValueError(f"graph capture needs a CUDA or NPU device, not {device.type}")
        self.model, self.kv_caches, self.forward_fn = model, kv_caches, forward
        self.buckets = batch_buckets(max_batch_size)
        self.max_blocks = max_blocks
        self.capture = capture
        rows = self.buckets[-1]
        # Rows of the staging tensor: token, 3 positions, slot, context length (int64, one copy per step).
        self.staging = torch.empty(6, rows, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.inputs = torch.zeros(6, rows, dtype=torch.int64, device=device)
        self._padding = torch.tensor([0, 0, 0, 0, -1, 1]).unsqueeze(1)  # a padding row's staging column
        self.context_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(rows, max_blocks, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(rows + 1, dtype=torch.int32, device=device)  # one query each
        self.graphs: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}  # (batch, width) -> (graph, logits)
        self._pool = None  # captured graphs share one memory pool

    def bucket(self, n: int) -> int:
        """The padded batch size for n sequences (n <= max_batch_size)."""
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def run(self, rows: list[DecodeRow]) -> torch.Tensor:
        """The decode step of `rows` (one per sequence, at most max_batch_size): fp32 logits [n, V]."""
        n = len(rows)
        batch = self.bucket(n)
        width = width_bucket(max(len(r.table) for r in rows), self.max_blocks)
        self._load(rows, batch, width)
        if not self.capture:
            return self.forward(batch, width)[:n]
        key = (batch, width)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._record(batch, width)
            except Exception as e:  # noqa: BLE001 - a device or kernel that cannot be captured: run eagerly
                log.warning("capturing the decode step as a graph failed (%s: %s); decode steps run eagerly "
                            "from now on (--enforce_eager skips the attempt)", type(e).__name__, e)
                self.capture = False
                return self.forward(batch, width)[:n]
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]

    def _load(self, rows: list[DecodeRow], batch: int, width: int) -> None:
        """Overwrite the first `batch` rows of the buffers in place: the real rows, then padding
        (token 0, position 0, slot -1: nothing written, context length 1)."""
        n = len(rows)
        staged = torch.tensor([(r.token, *r.position, r.slot, r.context_len) for r in rows], dtype=torch.int64)
        self.staging[:, :n] = staged.T
        self.staging[:, n:batch] = self._padding
        self.inputs[:, :batch].copy_(self.staging[:, :batch], non_blocking=True)
        self.context_lens[:batch].copy_(self.inputs[5, :batch])
        # One host tensor for all the tables (padding rows: block 0, never read past slot 0).
        tables = [r.table + [0] * (width - len(r.table)) for r in rows] + [[0] * width] * (batch - n)
        self.block_tables[:batch, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)

    def forward(self, batch: int, width: int) -> torch.Tensor:
        """The forward pass on the buffers' first `batch` rows and `width` table columns: fp32
        logits [batch, V]. Reads no value on the host: this is what a graph records."""
        meta = AttentionMetadata(slot_mapping=self.inputs[4, :batch], block_tables=self.block_tables[:batch, :width],
                                 context_lens=self.context_lens[:batch], cu_seqlens_q=self.cu_seqlens_q[:batch + 1],
                                 max_query_len=1)
        embeds = self.model.embed(self.inputs[0, :batch])
        hidden = self.forward_fn(self.inputs[1:4, :batch], meta, self.kv_caches, inputs_embeds=embeds)
        return self.model.compute_logits(hidden)

    def _record(self, batch: int, width: int) -> tuple[object, torch.Tensor]:
        """Capture the forward pass at (batch, width) as a graph; (graph, its logits buffer).

        The buffers hold this step's real inputs: the warm-up run (on a side stream, as capture
        requires; it also compiles the kernels) writes this step's K/V, and the replay that follows
        the capture writes the same values again."""
        backend = torch.cuda if self.model.device.type == "cuda" else torch.npu  # torch_npu mirrors the API
        graph_class = backend.CUDAGraph if self.model.device.type == "cuda" else backend.NPUGraph
        if self._pool is None:
            self._pool = backend.graph_pool_handle()
        side = backend.Stream()
        side.wait_stream(backend.current_stream())
        with backend.stream(side):
            self.forward(batch, width)
        backend.current_stream().wait_stream(side)
        graph = graph_class()
        with backend.graph(graph, pool=self._pool):
            logits = self.forward(batch, width)
        log.info("captured the decode graph for batch %d, block-table width %d", batch, width)
        return graph, logits
