"""The model runner: the device side of an engine step (nano-vllm's ModelRunner).

The engine (engine/llm.py) owns requests, the scheduler and the outputs; it hands the runner each
step's scheduled `Batch` and gets back a `StepResult`: which sequences were sampled, their tokens,
and which runs' logits were not finite. The runner owns everything on the device: the model's
weights, the paged KV cache, the input tensors of a step (token ids, rope positions, attention
metadata, the media embeddings' rows), the forward pass (eager, `torch.compile`d, or a captured
decode graph: engine/decode_graphs.py), the device part of sampling, and the KV copies that start
`n > 1` samples. Under tensor parallelism every rank runs its runner on the same batch.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_vl_triton.engine.config import EngineConfig
from qwen_vl_triton.engine.decode_graphs import DecodeGraphs, DecodeRow
from qwen_vl_triton.engine.kv_budget import kv_cache_budget
from qwen_vl_triton.engine.sampling import SampleOutput, sample
from qwen_vl_triton.engine.scheduler import Batch
from qwen_vl_triton.engine.sequence import Sequence
from qwen_vl_triton.engine.stats import EngineStats
from qwen_vl_triton.modeling.attention_metadata import AttentionMetadata
from qwen_vl_triton.modeling.model import load_model
from qwen_vl_triton.parallel.comm import all_gather_object
from qwen_vl_triton.parallel.group import TPGroup, detect_device_type
from qwen_vl_triton.parallel.sharding import local_kv_heads

# Starts the structured-output masks of the rows about to be sampled (None: no row is constrained);
# they are computed on llguidance's threads while the forward pass runs.
MaskStarter = Callable[[list[Sequence]], "Future[torch.Tensor] | None"]


@dataclass(frozen=True)
class StepResult:
    """What one batch gave: `sampled[i]` drew `output.token_ids[i]` (a run's sequence, then the
    samples waiting to fork off it, which draw from the same logits row); `not_finite` are the
    runs' sequences whose logits held NaN or inf (not sampled: their requests end with an error)."""

    sampled: list[Sequence]
    output: SampleOutput
    not_finite: list[Sequence]


def default_device() -> torch.device:
    """CUDA if present, then an Ascend NPU (torch_npu), else the CPU."""
    return torch.device(detect_device_type())


class ModelRunner:
    """The model on one device (this rank's shards), its KV cache once `allocate` has run, and
    `execute`: one batch's forward pass and sampling."""

    def __init__(self, model_path: Path, cfg: EngineConfig, tp: TPGroup, stats: EngineStats):
        if tp.world_size > 1:
            if cfg.device is not None and torch.device(cfg.device).type != tp.device.type:
                raise ValueError(f"device {cfg.device} differs from the tensor-parallel group's {tp.device}")
            self.device = tp.device
        else:
            self.device = torch.device(cfg.device) if cfg.device is not None else default_device()
        self.cfg, self.tp, self.stats = cfg, tp, stats
        self.model = load_model(model_path, cfg.dtype, self.device, tp, cfg.quantization)
        self.forward_fn = torch.compile(self.model.forward, dynamic=True) if cfg.compile else self.model.forward
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.decode_graphs: DecodeGraphs | None = None
        self.block_size = cfg.block_size

    # ------------------------------------------------------------------ the KV cache

    def num_kv_blocks(self, max_seq_len: int) -> tuple[int, str]:
        """KV blocks every rank can hold (the smallest rank's count: all schedule the same blocks),
        and how the cache was sized (for logs and errors)."""
        cfg = self.cfg
        if cfg.num_kv_blocks is not None:
            blocks, note = cfg.num_kv_blocks, f"num_kv_blocks {cfg.num_kv_blocks}"
        else:
            if cfg.kv_cache_gb is None:  # what the device has left beside the vision tower's peak and encoder cache
                budget, note = kv_cache_budget(self.model, chunk_patches=cfg.vision_chunk_patches,
                                               image_max_pixels=cfg.media_limits.image_max_pixels,
                                               encoder_cache_bytes=cfg.encoder_cache_bytes)
            else:
                budget, note = cfg.kv_cache_gb * (1 << 30), f"kv_cache_gb {cfg.kv_cache_gb}"
            blocks = self._blocks_for_budget(budget, max_seq_len, note)
        return min(all_gather_object(blocks, self.tp)), note

    def _blocks_for_budget(self, budget: float, max_seq_len: int, note: str) -> int:
        """KV blocks that `budget` bytes hold on this rank (its share of the kv heads), at most what
        every running sequence at full length could use."""
        t = self.model.config.text
        kv_heads = local_kv_heads(t.num_kv_heads, self.tp.world_size)  # this rank's share of the cache
        bytes_per_block = 2 * t.num_layers * self.block_size * kv_heads * t.head_dim * self.model.dtype.itemsize
        useful = self.cfg.max_batch_size * -(-max_seq_len // self.block_size)
        blocks = min(int(budget // bytes_per_block), useful)
        if blocks < 2:
            raise ValueError(f"KV cache budget {budget / (1 << 30):.3f} GiB ({note}) holds {blocks} "
                             f"blocks of {bytes_per_block} bytes; raise kv_cache_gb")
        return blocks

    def allocate(self, num_blocks: int, max_seq_len: int) -> None:
        """The KV cache, and on a CUDA or NPU device at world size 1 (unless enforce_eager) the decode
        graphs over it."""
        self.kv_caches = self.model.allocate_kv_cache(num_blocks, self.block_size)
        graphs = not self.cfg.enforce_eager and self.device.type in ("cuda", "npu") and self.tp.world_size == 1
        self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, self.forward_fn, self.cfg.max_batch_size,
                                          -(-max_seq_len // self.block_size), capture=True) if graphs else None

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy KV blocks (source, destination) in every layer: a forked sample's partly filled last block."""
        if not copies:
            return
        src, dst = (torch.tensor(c, device=self.device) for c in zip(*copies, strict=True))
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    # ------------------------------------------------------------------ one batch

    def execute(self, batch: Batch, block_tables: Callable[[int], list[int]], pad_ids: tuple[int, int],
                start_masks: MaskStarter) -> StepResult:
        """The forward pass over `batch`, then one token for each run that reaches its sequence's
        end and for the samples waiting to fork off it. `block_tables(seq_id)` is a sequence's
        cache blocks; `pad_ids` the image and video pad tokens whose rows take media embeddings.
        A row of logits that is not finite is not sampled (StepResult.not_finite). Structured
        outputs mask their rows: the masks depend only on the tokens accepted so far, so they are
        computed while the forward pass runs, and always waited for (never left computing)."""
        sampling_runs = [r for r in batch.runs if r.samples]
        candidates = [(i, seq) for i, r in enumerate(sampling_runs) for seq in (r.seq, *r.seq.forks)]
        masks = start_masks([seq for _, seq in candidates])
        try:
            logits = self.forward(batch, block_tables, pad_ids)
            with self.stats.timed("forward"):
                # Logits are all-gathered: every rank agrees. The .tolist() waits for the device,
                # which the masks' threads overlap too.
                finite = torch.isfinite(logits).all(dim=-1).tolist()
        finally:
            with self.stats.timed("sampling"):
                bitmask = masks.result() if masks is not None else None
        not_finite = [run.seq for run, ok in zip(sampling_runs, finite, strict=True) if not ok]
        kept = [j for j, (i, _) in enumerate(candidates) if finite[i]]
        if not kept:
            return StepResult([], SampleOutput([], [], []), not_finite)
        rows = [candidates[j][1] for j in kept]
        logit_rows = [candidates[j][0] for j in kept]
        if logit_rows != list(range(len(sampling_runs))):
            logits = logits[torch.tensor(logit_rows, device=logits.device)]
        if bitmask is not None and len(kept) != len(candidates):
            bitmask = bitmask[kept]
        with self.stats.timed("sampling"):
            out = sample(logits, [s.params for s in rows], [s.prompt_ids for s in rows],
                         [s.output_ids for s in rows], [s.generator for s in rows], token_bitmask=bitmask)
        return StepResult(rows, out, not_finite)

    def forward(self, batch: Batch, block_tables: Callable[[int], list[int]], pad_ids: tuple[int, int]
                ) -> torch.Tensor:
        """Run the model over the batch's runs; fp32 logits [n sampling runs, V]. A decode-only
        batch runs on the static buffers (and graphs) of self.decode_graphs when there is one."""
        if self.decode_graphs is not None and all(r.count == 1 and r.samples and r.start >= len(r.seq.prompt_ids)
                                                  for r in batch.runs):
            with self.stats.timed("inputs"):
                rows = self.decode_rows(batch, block_tables)
            with self.stats.timed("forward"):
                return self.decode_graphs.run(rows)
        with self.stats.timed("inputs"):
            ids, positions, meta, media_at, media_embeds, logit_rows = self.inputs(batch, block_tables, pad_ids)
        with self.stats.timed("forward"):
            embeds = self.model.embed(ids, media_at, media_embeds)
            hidden = self.forward_fn(positions, meta, self.kv_caches, inputs_embeds=embeds)
            return self.model.compute_logits(hidden, logit_rows)

    def decode_rows(self, batch: Batch, block_tables: Callable[[int], list[int]]) -> list[DecodeRow]:
        """The inputs of a decode-only batch (every run one generated token), one row per run."""
        bs = self.block_size
        rows = []
        for run in batch.runs:
            seq, at = run.seq, run.start
            table = block_tables(seq.seq_id)
            position = at + seq.rope_delta  # the same on all three rope axes after the prompt
            rows.append(DecodeRow(seq.output_ids[at - len(seq.prompt_ids)], (position,) * 3,
                                  table[at // bs] * bs + at % bs, at + 1, table))
        return rows

    def inputs(self, batch: Batch, block_tables: Callable[[int], list[int]], pad_ids: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None, torch.Tensor | None,
                           torch.Tensor]:
        """The forward pass's inputs for the batch's runs: token ids [T] (CPU), rope positions [3, T],
        attention metadata, the rows of media pads among the T tokens and their embeddings (or None),
        and the rows whose logits are sampled (on the device)."""
        bs = self.block_size
        ids, positions, slots, q_lens, ctx_lens, tables = [], [], [], [], [], []
        media_at, media_embeds = [], []  # rows among the step's tokens, and what goes there
        offset = 0
        for run in batch.runs:
            seq, start, end = run.seq, run.start, run.start + run.count
            ids.extend(seq.all_ids[start:end])
            positions.append(seq.positions_of(start, end))
            table = torch.tensor(block_tables(seq.seq_id), dtype=torch.int64)
            index = torch.arange(start, end)
            slots.append(table[index // bs] * bs + index % bs)
            if seq.media and start < len(seq.prompt_ids):
                at, rows = seq.media_rows(start, end, pad_ids)
                media_at.append(at + offset)
                media_embeds.append(seq.media_embeds[rows.to(seq.media_embeds.device)])
            offset += run.count
            q_lens.append(run.count)
            ctx_lens.append(end)
            tables.append(table)
        ends = torch.tensor(q_lens).cumsum(0)  # end of each run among the step's tokens
        width = max(len(t) for t in tables)
        block_table = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in tables])
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(self.device),
            block_tables=block_table.to(self.device, torch.int32),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor([0, *ends.tolist()], dtype=torch.int32, device=self.device),
            max_query_len=max(q_lens),
        )
        sampling = torch.tensor([r.samples for r in batch.runs])
        return (torch.tensor(ids), torch.cat(positions, dim=1), meta, torch.cat(media_at) if media_at else None,
                torch.cat(media_embeds) if media_embeds else None, (ends - 1)[sampling].to(self.device))
