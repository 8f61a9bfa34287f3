"""The collectives the model and the engine call, as plain functions over a TPGroup.

Each is a no-op (returns its input) at world size 1, so single-process code paths run exactly the
operations they ran before tensor parallelism existed.

A collective that fails ends this process (`exit_rank`: one log line naming this rank and the
peer, exit status 1) instead of raising. The ranks run in lockstep, so a rank that missed a
collective can never pair up with the others again: an exception that someone caught and stepped
on from (the server's engine thread does that for a single process) would leave the world hung
or, worse, pairing mismatched collectives. A peer that exits closes its connections and the next
collective here fails at once; one that hangs or drops off the network, after `tp.timeout_s`.
The peers of an exited rank fail the same way in turn, so the whole world ends. The one exception
is a driver that started its own workers (parallel.local), in the user's process: it ends them
and raises (`fault`: TPGroup.on_fault), and the world is never used again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from qwen_vl_triton.parallel.group import TIMEOUT_ENV, TPGroup

log = logging.getLogger("parallel")

FAULT_EXIT_STATUS = 1


def exit_rank(tp: TPGroup, why: str, error: BaseException | None = None) -> NoReturn:
    """Log `why` (naming this rank; with `error`'s traceback if given) and end the process at once
    with status 1.

    For faults after which this rank cannot stay in lockstep with the others. os._exit, not an
    exception: the caller may be any thread (the server's engine thread, whose process would
    otherwise serve on without a world), and no clean-up that could issue a collective may run.
    """
    log.critical("tensor parallel: rank %d of %d exits (status %d): %s", tp.rank, tp.world_size,
                 FAULT_EXIT_STATUS, why, exc_info=error)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream must not stop the exit
            stream.flush()
    os._exit(FAULT_EXIT_STATUS)


def fault(tp: TPGroup, why: str, error: BaseException | None = None) -> NoReturn:
    """This rank cannot stay in lockstep with the others: exit_rank(tp, why, error), or, in a driver
    that started its own workers, tp.on_fault(why), which raises TPWorldError naming the lost worker
    (called inside the `except` block of `error`, which becomes its __context__)."""
    if tp.on_fault is not None:
        tp.on_fault(why)
    exit_rank(tp, why, error)


def _failed(tp: TPGroup, what: str, error: Exception, peer: int | None = None) -> NoReturn:
    """A collective raised: the peer (if known: the source of a broadcast, the other rank of two),
    else one of the others, exited, failed or stopped answering."""
    others = [r for r in range(tp.world_size) if r != tp.rank]
    if peer is None and len(others) == 1:
        peer = others[0]
    who = f"rank {peer}" if peer is not None else "one of ranks " + ", ".join(map(str, others))
    cause = " ".join(f"{type(error).__name__}: {error}".split())  # one line: gloo's messages hold newlines
    fault(tp, f"{what} failed: {who} exited, failed, or did not answer within the {tp.timeout_s:g} s "
                  f"timeout ({TIMEOUT_ENV}). The error: {cause}")


def all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Sum x over the ranks, in place; returns x (every rank gets the same values).

    The row-parallel layers' partial products [T, H] meet here (o_proj, down_proj, the ViT's
    proj / fc2, the vocab-parallel embedding).
    """
    if tp.world_size == 1:
        return x
    try:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=tp.group)
    except Exception as e:  # noqa: BLE001 - whatever failed, the ranks are out of lockstep
        _failed(tp, "an all_reduce", e)
    return x


def all_gather(x: torch.Tensor, tp: TPGroup, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's x along `dim`, in rank order: [..., n, ...] -> [..., world * n, ...].

    Every rank must pass the same shape. Used for the vocab-parallel LM head's logits.
    """
    if tp.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    try:
        dist.all_gather(parts, x, group=tp.group)
    except Exception as e:  # noqa: BLE001 - whatever failed, the ranks are out of lockstep
        _failed(tp, "an all_gather", e)
    return torch.cat(parts, dim=dim)


def broadcast_object(obj: Any, tp: TPGroup, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (the others' `obj` is ignored).

    Goes through the gloo object group, so it never waits on an accelerator stream.
    """
    if tp.world_size == 1:
        return obj
    box = [obj if tp.rank == src else None]
    try:
        dist.broadcast_object_list(box, src=src, group=tp.object_group)
    except Exception as e:  # noqa: BLE001 - whatever failed, the ranks are out of lockstep
        what = "sending to the other ranks" if tp.rank == src else f"waiting for rank {src}'s next message"
        _failed(tp, what, e, peer=None if tp.rank == src else src)
    return box[0]


def all_gather_object(obj: Any, tp: TPGroup) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (a list of one at world size 1)."""
    if tp.world_size == 1:
        return [obj]
    out: list[Any] = [None] * tp.world_size
    try:
        dist.all_gather_object(out, obj, group=tp.object_group)
    except Exception as e:  # noqa: BLE001 - whatever failed, the ranks are out of lockstep
        _failed(tp, "an all_gather_object", e)
    return out


def barrier(tp: TPGroup) -> None:
    """Wait until every rank gets here (on the object group)."""
    if tp.world_size == 1:
        return
    try:
        dist.barrier(group=tp.object_group)
    except Exception as e:  # noqa: BLE001 - whatever failed, the ranks are out of lockstep
        _failed(tp, "a barrier", e)
