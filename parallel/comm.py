"""The collectives the model and the engine call, as plain functions over a TPGroup.

Each is a no-op (returns its input) at world size 1, so single-process code paths run exactly the
operations they ran before tensor parallelism existed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from parallel.group import TPGroup


def all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Sum x over the ranks, in place; returns x (every rank gets the same values).

    The row-parallel layers' partial products [T, H] meet here (o_proj, down_proj, the ViT's
    proj / fc2, the vocab-parallel embedding).
    """
    if tp.world_size == 1:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=tp.group)
    return x


def all_gather(x: torch.Tensor, tp: TPGroup, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's x along `dim`, in rank order: [..., n, ...] -> [..., world * n, ...].

    Every rank must pass the same shape. Used for the vocab-parallel LM head's logits.
    """
    if tp.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=dim)


def broadcast_object(obj: Any, tp: TPGroup, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (the others' `obj` is ignored).

    Goes through the gloo object group, so it never waits on an accelerator stream.
    """
    if tp.world_size == 1:
        return obj
    box = [obj if tp.rank == src else None]
    dist.broadcast_object_list(box, src=src, group=tp.object_group)
    return box[0]


def all_gather_object(obj: Any, tp: TPGroup) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (a list of one at world size 1)."""
    if tp.world_size == 1:
        return [obj]
    out: list[Any] = [None] * tp.world_size
    dist.all_gather_object(out, obj, group=tp.object_group)
    return out


def barrier(tp: TPGroup) -> None:
    """Wait until every rank gets here (on the object group)."""
    if tp.world_size > 1:
        dist.barrier(group=tp.object_group)
