"""Tensor parallelism on torch.distributed: process groups from torchrun's environment or started
by the driver on one machine (parallel.group, parallel.local), the collectives the model calls
(parallel.comm) and the sharding rules applied at load time (parallel.sharding). See README.md
("Tensor parallelism")."""

from qwen_vl_triton.parallel.comm import all_gather, all_gather_object, all_reduce, barrier, broadcast_object, exit_rank
from qwen_vl_triton.parallel.group import (
    SINGLE_PROCESS,
    TPGroup,
    TPWorldError,
    destroy,
    end_process,
    exit_now,
    init_from_env,
)
from qwen_vl_triton.parallel.sharding import TPSizeError, local_kv_heads

__all__ = ["SINGLE_PROCESS", "TPGroup", "TPSizeError", "TPWorldError", "all_gather", "all_gather_object", "all_reduce",
           "barrier", "broadcast_object", "destroy", "end_process", "exit_now", "exit_rank", "init_from_env",
           "local_kv_heads"]
