"""Process groups for tensor parallelism, from torchrun's environment or a driver's own launch.

    tp = init_from_env()          # under `torchrun --nproc-per-node N ...`: rank, world size, device
    model = load_model(path, "auto", tp.device, tp=tp)

torchrun (and any launcher that sets the same variables) gives every process RANK, WORLD_SIZE,
LOCAL_RANK (its index on this machine), MASTER_ADDR and MASTER_PORT. `init_from_env` reads them
and calls `join_world`, which binds the process to accelerator LOCAL_RANK, picks the backend by
device (hccl on Ascend NPUs, nccl on CUDA GPUs, gloo on the CPU) and returns a `TPGroup`: the small
context object the model and the engine are handed explicitly. Without WORLD_SIZE (or with
WORLD_SIZE=1) nothing is initialised and the group is the single-process one, on which every
collective is a no-op. parallel.local calls `join_world` too, with its own rendezvous store, for
the workers a driver starts on one machine (LLM(path, tensor_parallel_size=N)).

Tensor parallelism spans the whole world (every process holds 1 / world_size of each layer):
2/4/8-way on one machine, or across machines with torchrun's --nnodes / rendezvous flags.

Every collective has a timeout, `TPGroup.timeout_s` (QVL_TP_TIMEOUT_S, default 600 s): a rank that
hangs or becomes unreachable ends its peers within it (one that exits closes its connections, and
its peers' next collective fails at once; parallel.comm turns either into an exit, or into a
TPWorldError in a driver that started its own workers: TPGroup.on_fault). Ranks > 0
wait for rank 0's next command inside a collective, so a driver with nothing to do still steps
every `TPGroup.heartbeat_s` (serving/async_engine.py) to tell them it is alive.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}

TIMEOUT_ENV = "QVL_TP_TIMEOUT_S"
# Long enough for what rank 0 does alone between two steps (LLM.generate prepares its whole batch
# before the first one) and for ranks that load or compile at different speeds; a dead rank is
# noticed at once anyway, so this bounds only a rank that hangs or drops off the network.
DEFAULT_TIMEOUT_S = 600.0
# An idle driver's steps: frequent, so that a rank that dies while the server idles is noticed
# within seconds (an empty step is one small broadcast).
MAX_HEARTBEAT_S = 5.0
# A rank that joins through a driver's own store (parallel.local) sets this key once its device is
# bound, right before it joins: the driver waits for every rank's key while watching their processes.
JOINING_KEY = "qvl/joining/{rank}"


class TPWorldError(RuntimeError):
    """The tensor-parallel world can no longer run: a worker exited, failed or stopped answering.

    Raised, instead of an exit, in a driver that started its workers itself (parallel.local): at the
    fault, and again by every later call on the LLM that used the world."""


@dataclass(frozen=True)
class TPGroup:
    """Where this process sits in the tensor-parallel world.

    rank / world_size: this process's index and the number of processes (all tensor-parallel);
    local_rank: its index on this machine (the accelerator it is bound to);
    device: the device its weights, activations and KV cache live on;
    group: the process group of the tensor collectives (nccl / hccl / gloo); None at world size 1;
    object_group: a gloo group for python-object broadcasts (engine commands) kept off the
    accelerator's stream; None at world size 1;
    timeout_s: how long any collective (on either group) may wait for the other ranks before this
    rank gives up on them (parallel.comm);
    on_fault: what a fault does here (parallel.comm.fault). None: this process exits at once
    (parallel.comm.exit_rank), the only safe end for a launcher's rank; a driver that started its
    own workers (parallel.local) raises TPWorldError instead, since its process is the user's.
    The default instance is the single process: every collective on it is a no-op.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: dist.ProcessGroup | None = None
    object_group: dist.ProcessGroup | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    on_fault: Callable[[str], NoReturn] | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of size {self.world_size}")
        if not self.timeout_s > 0:
            raise ValueError(f"the tensor-parallel timeout must be > 0 seconds, got {self.timeout_s}")

    @property
    def heartbeat_s(self) -> float:
        """The longest rank 0's driver may go without a step: well inside the timeout the other
        ranks wait for its next command with (infinite on one process: nobody waits)."""
        return math.inf if self.world_size == 1 else min(MAX_HEARTBEAT_S, self.timeout_s / 4)


SINGLE_PROCESS = TPGroup()


def detect_device_type() -> str:
    """"cuda" if a GPU is visible, then "npu" (torch_npu), else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    try:
        import torch_npu  # noqa: F401

        if torch.npu.is_available():  # type: ignore[attr-defined]
            return "npu"
    except ImportError:
        pass
    return "cpu"


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"tensor parallelism: {name} is not set (launch with torchrun, which sets "
                               f"RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
        return default
    return int(value)


def launcher_world_size() -> int:
    """The world size a launcher (torchrun) gave this process: WORLD_SIZE, 1 when unset."""
    return _env_int("WORLD_SIZE", 1)


def _bind_device(device_type: str, local_rank: int) -> torch.device:
    """Make accelerator `local_rank` this process's current device (no-op on the CPU)."""
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type == "cuda":
        count = torch.cuda.device_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        if local_rank >= count:
            raise RuntimeError(f"local rank {local_rank} but only {count} CUDA device(s) are visible "
                               f"(CUDA_VISIBLE_DEVICES={visible}); run at most {count} ranks on this machine "
                               f"(torchrun --nproc-per-node, tensor_parallel_size)")
        torch.cuda.set_device(local_rank)
    elif device_type == "npu":
        import torch_npu  # noqa: F401

        count = torch.npu.device_count()  # type: ignore[attr-defined]
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "<unset>")
        if local_rank >= count:
            raise RuntimeError(f"local rank {local_rank} but only {count} NPU(s) are visible "
                               f"(ASCEND_RT_VISIBLE_DEVICES={visible}); run at most {count} ranks on this machine "
                               f"(torchrun --nproc-per-node, tensor_parallel_size)")
        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]
    else:
        raise ValueError(f"tensor parallelism on {device_type!r} devices is not supported; "
                         f"use one of {', '.join(BACKENDS)}")
    return torch.device(device_type, local_rank)


def resolve_timeout_s(timeout_s: float | None = None) -> float:
    """The collectives' timeout: the argument, else QVL_TP_TIMEOUT_S, else the default."""
    if timeout_s is not None:
        return timeout_s
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def init_from_env(device: str | torch.device | None = None, timeout_s: float | None = None) -> TPGroup:
    """Join the tensor-parallel world torchrun describes in the environment.

    device: "cuda" / "npu" / "cpu" (an index, if given, is replaced by LOCAL_RANK); default: the
    first accelerator found, else the CPU. timeout_s: how long a collective waits for the other
    ranks (default: QVL_TP_TIMEOUT_S, else 600 s; see TPGroup). At world size 1 (WORLD_SIZE unset
    or 1) no process group is made and the single-process TPGroup (on `device`, or the CPU) is
    returned. Calling it again after the world is up returns the same description.
    """
    timeout = resolve_timeout_s(timeout_s)
    world = launcher_world_size()
    device_type = device_type_of(device)
    if world == 1:
        return TPGroup(device=torch.device(device) if device is not None else torch.device(device_type),
                       timeout_s=timeout)
    return join_world(_env_int("RANK"), world, _env_int("LOCAL_RANK"), device_type, timeout)


def device_type_of(device: str | torch.device | None) -> str:
    """The type of `device` ("cuda", "npu", "cpu"), or of the first accelerator found (else "cpu")."""
    return torch.device(device).type if device is not None else detect_device_type()


def join_world(rank: int, world_size: int, local_rank: int, device_type: str, timeout_s: float, *,
               store: dist.Store | None = None,
               on_fault: Callable[[str], NoReturn] | None = None) -> TPGroup:
    """Bind this process to accelerator `local_rank`, join the world as `rank` and return its TPGroup.

    The one set-up of every tensor-parallel process: torchrun's ranks (init_from_env: rendezvous
    at MASTER_ADDR:MASTER_PORT from the environment) and the ranks of a driver's own launch
    (parallel.local: `store`, the driver's rendezvous store; each rank sets JOINING_KEY there once
    bound). timeout_s: TPGroup.timeout_s, also the time allowed for every rank to join; on_fault:
    TPGroup.on_fault. If this process already joined a world, its description is returned.
    """
    bound = _bind_device(device_type, local_rank)
    backend = BACKENDS[device_type]
    if not dist.is_initialized():
        kwargs = {"device_id": bound} if device_type == "cuda" else {}
        if store is None:
            kwargs["init_method"] = "env://"
        else:
            store.set(JOINING_KEY.format(rank=rank), "1")
            kwargs["store"] = store
        # The tensor collectives' group (also the time allowed for every rank to join).
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                **kwargs)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not "
                           f"match rank {rank} of a world of {world_size}")
    # A separate gloo group for pickled objects, CPU-side (off the accelerator's stream).
    object_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return TPGroup(rank=rank, world_size=world_size, local_rank=local_rank, device=bound,
                   group=dist.group.WORLD, object_group=object_group, timeout_s=timeout_s, on_fault=on_fault)


def check_world_size(requested: int | None, tp: TPGroup) -> None:
    """Raise ValueError if `requested` (EngineConfig.tensor_parallel_size; None: whatever the world
    is) differs from the size of the world a launcher started, which `tp` belongs to."""
    if requested is not None and requested != tp.world_size:
        raise ValueError(f"tensor_parallel_size is {requested}, but this process is rank {tp.rank} of a world of "
                         f"{tp.world_size} that its launcher started (torchrun --nproc-per-node "
                         f"{tp.world_size}): under a launcher leave tensor_parallel_size unset or equal to its "
                         f"world size")


def destroy(tp: TPGroup) -> None:
    """Leave the world (at the end of a run; no-op at world size 1)."""
    if tp.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def end_process(tp: TPGroup) -> None:
    """End a tensor-parallel rank's process with status 0, after a run that went well and
    `destroy`; no-op at world size 1 (the caller returns as usual).

    It skips the interpreter's finalization, on purpose: gloo's worker threads release a finished
    collective's tensors a moment after it returns, and that release takes the GIL; a thread that
    asks for it while the interpreter finalizes is ended inside C++, and the process aborts
    ("terminate called without an active exception") after a run that went well. Logs and output
    streams are flushed first.
    """
    if tp.world_size == 1:
        return
    exit_now()


def exit_now() -> None:
    """Exit with status 0 at once, skipping the interpreter's finalization (logs and output streams
    flushed first). For a finished command-line run: tearing torch down costs ~0.5 s of a 2-core
    machine's wall time, and a tensor-parallel rank must skip it anyway (end_process)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream must not stop the exit
            stream.flush()
    os._exit(0)
