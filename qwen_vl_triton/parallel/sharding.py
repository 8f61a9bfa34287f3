"""Sharding rules: which part of each checkpoint tensor a rank holds, and the sizes they need.

A `ShardSpec` says which rows (or columns) of a [out, in] linear weight, bias or embedding one
rank keeps; `read_shard` reads exactly that part through a slice reader (safetensors' get_slice),
never the whole tensor. `spec` turns a `ShardKind` into the ShardSpec of one rank; which kind
each checkpoint tensor has is said once, in modeling/weight_table.py. The kinds:

  COLUMN      split an MLP's output features (dim 0): gate/up, fc1, the merger's fc1 (+ their
              biases); the layer's output is this rank's slice of the features, no communication.
  ROW         split an MLP's input features (dim 1) the same way: down_proj, fc2, the merger's
              fc2; each rank computes a partial sum, one all-reduce completes it. MLP splits are
              balanced, not necessarily even (sizes differ by at most one: the first n % world
              ranks hold one more), so an intermediate size need not divide by the world size
              (Qwen2.5-VL-3B/7B's vision MLP has 3420 = 8 * 427.5).
  FIRST_RANK  a row-parallel layer's bias: rank 0 holds it, the others zeros of its shape, so the
              all-reduce adds it exactly once and the layer stays one F.linear + all_reduce.
  HEADS       rows by attention heads, which must divide evenly: q (this rank's Hq / world heads)
              and the ViT's fused qkv (the same heads of each of q, k and v).
  HEADS_IN    columns by attention heads (row-parallel): o_proj and the ViT's proj, whose inputs
              are the heads' outputs.
  KV_HEADS    rows of k and v by kv heads (see kv_head_range: replicated when fewer than ranks).
  VOCAB       the embedding / LM head rows, ceil(V / world) per rank, the last rank's tail padded
              with zero rows: any vocabulary size shards, the padded logits are cut after the
              all-gather.
  REPLICATED  norms, the patch embedding: every rank holds the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch

from qwen_vl_triton.parallel.group import TPGroup

Index = tuple[slice, ...]


class TPSizeError(ValueError):
    """The world size does not divide a size that tensor parallelism splits."""


class ShardKind(Enum):
    """How a checkpoint tensor is split over tensor-parallel ranks (see the module docstring)."""

    COLUMN = "column"
    ROW = "row"
    FIRST_RANK = "first_rank"
    HEADS = "heads"
    HEADS_IN = "heads_in"
    KV_HEADS = "kv_heads"
    VOCAB = "vocab"
    REPLICATED = "replicated"


class HeadLayout(NamedTuple):
    """The attention heads a HEADS / HEADS_IN / KV_HEADS tensor is made of (a ViT has Hk == Hq)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class ShardSpec:
    """The part of one tensor a rank holds.

    dim None: the whole tensor. Otherwise the rank holds, along `dim`, the ranges [a, b) in
    `ranges`, concatenated in order, then zeros up to `padded` entries along `dim` (None: no
    padding). first_rank_only: the whole tensor on rank 0 and zeros of its shape elsewhere
    (`on_first_rank` is this rank's side of that).
    """

    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()
    padded: int | None = None
    first_rank_only: bool = False
    on_first_rank: bool = True

    def indices(self) -> list[Index]:
        """The slice tuple of each non-empty range (what get_slice reads)."""
        assert self.dim is not None
        lead = (slice(None),) * self.dim
        return [(*lead, slice(a, b)) for a, b in self.ranges if b > a]


REPLICATED = ShardSpec()


def balanced_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[a, b): rank's share of n items, world_size shares in order whose sizes differ by at most
    one (the first n % world_size ranks hold one more)."""
    base, extra = divmod(n, world_size)
    a = rank * base + min(rank, extra)
    return a, a + base + (rank < extra)


def column(out_features: int, tp: TPGroup) -> ShardSpec:
    """This rank's balanced share of the rows of an [n, in] MLP weight or an [n] bias."""
    return ShardSpec(dim=0, ranges=(balanced_range(out_features, tp.rank, tp.world_size),))


def row(in_features: int, tp: TPGroup) -> ShardSpec:
    """This rank's balanced share of the columns of an [out, n] MLP weight (the same split as
    `column` of n, so gate/up's output features meet down's input features)."""
    return ShardSpec(dim=1, ranges=(balanced_range(in_features, tp.rank, tp.world_size),))


def first_rank(tp: TPGroup) -> ShardSpec:
    """The whole tensor on rank 0, zeros on the others (a row-parallel layer's bias)."""
    return ShardSpec(first_rank_only=True, on_first_rank=tp.rank == 0)


def heads(num_heads: int, head_dim: int, tp: TPGroup, parts: int = 1, dim: int = 0) -> ShardSpec:
    """This rank's num_heads / world heads along `dim` of a weight whose `dim` has `parts` blocks of
    num_heads * head_dim (rows, dim 0: 1 block for q_proj, 3 for the ViT's fused q | k | v;
    columns, dim 1: o_proj and the ViT's proj, whose inputs are the heads' outputs)."""
    if num_heads % tp.world_size:
        raise TPSizeError(f"{num_heads} attention heads do not divide by the world size {tp.world_size}")
    per = num_heads // tp.world_size
    a, b = tp.rank * per, (tp.rank + 1) * per
    block = num_heads * head_dim
    return ShardSpec(dim=dim, ranges=tuple((p * block + a * head_dim, p * block + b * head_dim)
                                           for p in range(parts)))


def kv_head_range(rank: int, num_heads: int, num_kv_heads: int, world_size: int) -> tuple[int, int]:
    """The kv heads [a, b) rank `rank` holds.

    num_kv_heads >= world: num_kv_heads / world each. Fewer kv heads than ranks (Qwen2.5-VL-3B has
    2): every rank holds one whole kv head, replicated over world / num_kv_heads ranks, namely the
    one its query heads attend to: rank r's query heads r * Hq/world ... all fall in GQA group
    r * Hk // world because the group of Hq/Hk query heads spans exactly world/Hk ranks.
    """
    if num_kv_heads >= world_size:
        per = num_kv_heads // world_size
        return rank * per, (rank + 1) * per
    head = rank * num_kv_heads // world_size
    return head, head + 1


def local_kv_heads(num_kv_heads: int, world_size: int) -> int:
    """kv heads each rank holds (and caches): Hk / world, or 1 when Hk < world."""
    return max(num_kv_heads // world_size, 1)


def kv_heads(num_heads: int, num_kv_heads: int, head_dim: int, tp: TPGroup) -> ShardSpec:
    """Rows of this rank's kv heads in a [num_kv_heads * head_dim, in] k_proj / v_proj weight."""
    a, b = kv_head_range(tp.rank, num_heads, num_kv_heads, tp.world_size)
    return ShardSpec(dim=0, ranges=((a * head_dim, b * head_dim),))


def vocab_rows_per_rank(vocab_size: int, world_size: int) -> int:
    """ceil(V / world): embedding / LM-head rows on each rank (the last one padded with zeros)."""
    return -(-vocab_size // world_size)


def vocab(vocab_size: int, tp: TPGroup) -> ShardSpec:
    """Rows [r * per, (r + 1) * per) of a [V, H] embedding / LM head, clipped to V and padded to per."""
    per = vocab_rows_per_rank(vocab_size, tp.world_size)
    a = min(tp.rank * per, vocab_size)
    return ShardSpec(dim=0, ranges=((a, min(a + per, vocab_size)),), padded=per)


def spec(kind: ShardKind, shape: Sequence[int], tp: TPGroup, attention: HeadLayout) -> ShardSpec:
    """The part of a tensor of kind `kind` and full shape `shape` that rank tp.rank holds.

    attention: the heads of the tower the tensor belongs to (read by the head kinds only). A HEADS
    tensor's dim 0 is one or more blocks of num_heads * head_dim (1 for q_proj, 3 for the ViT's
    q | k | v), so the block count is its length over one block.
    """
    if tp.world_size == 1 or kind is ShardKind.REPLICATED:
        return REPLICATED
    if kind is ShardKind.COLUMN:
        return column(shape[0], tp)
    if kind is ShardKind.ROW:
        return row(shape[1], tp)
    if kind is ShardKind.FIRST_RANK:
        return first_rank(tp)
    if kind is ShardKind.VOCAB:
        return vocab(shape[0], tp)
    if kind is ShardKind.KV_HEADS:
        return kv_heads(attention.num_heads, attention.num_kv_heads, attention.head_dim, tp)
    if kind is ShardKind.HEADS:
        parts = shape[0] // (attention.num_heads * attention.head_dim)
        return heads(attention.num_heads, attention.head_dim, tp, parts=parts)
    assert kind is ShardKind.HEADS_IN, kind
    return heads(attention.num_heads, attention.head_dim, tp, dim=1)


def read_shard(get: Callable[[Index | None], torch.Tensor], shape: Sequence[int], spec: ShardSpec,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Read a rank's part of a tensor of full `shape`: `get(index)` reads a slice (None: all).

    Only the spec's slices are read; zero parts (padding, first_rank_only off rank 0) are made,
    not read. dtype: the zeros' dtype when nothing is read (default: float32).
    """
    if spec.first_rank_only and not spec.on_first_rank:
        return torch.zeros(tuple(shape), dtype=dtype or torch.float32)
    if spec.dim is None:
        return get(None)
    parts = [get(index) for index in spec.indices()]
    size = sum(b - a for a, b in spec.ranges if b > a)
    if spec.padded is not None and spec.padded > size:
        pad_shape = list(shape)
        pad_shape[spec.dim] = spec.padded - size
        parts.append(torch.zeros(pad_shape, dtype=parts[0].dtype if parts else dtype or torch.float32))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=spec.dim)

