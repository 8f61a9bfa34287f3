"""Backend choice for every op (Triton kernel or the PyTorch reference), and the two tensor
helpers every launcher uses (its output allocation, a unit-stride head/row dim).

`QVL_KERNELS` (read at call time):
  auto   - Triton for tensors on a device (CUDA/NPU), the PyTorch reference for CPU tensors;
  triton - Triton everywhere (on the CPU this needs TRITON_INTERPRET=1, set before triton's import);
  torch  - the PyTorch references everywhere.

`launch_counts` counts how often each op took the Triton path: tests read it to prove the
kernels themselves ran, not the references.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import torch

BACKENDS = ("auto", "triton", "torch")
launch_counts: Counter[str] = Counter()
# Tests set this: every output a launcher allocates starts as NaN, so an element the kernel
# fails to write cannot pass a comparison by luck.
poison_outputs = False

F = TypeVar("F", bound=Callable)


def backend() -> str:
    """The backend named by QVL_KERNELS (default auto); raises on an unknown name."""
    mode = os.environ.get("QVL_KERNELS", "auto").strip().lower() or "auto"
    if mode not in BACKENDS:
        raise ValueError(f"QVL_KERNELS={mode!r} is not one of {', '.join(BACKENDS)}")
    return mode


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of `device` runs its Triton kernel."""
    mode = backend()
    if mode == "auto":
        return device.type != "cpu"
    return mode == "triton"


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a launcher's output (NaN-filled when `poison_outputs` is set)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs:
        out.fill_(float("nan"))
    return out


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride on its last dim (a copy only when needed): the kernels address rows and
    heads by stride but step along the last dim one element at a time."""
    return x if x.stride(-1) == 1 else x.contiguous()


def op(reference: Callable) -> Callable[[F], F]:
    """Make a public op from a Triton launcher and its PyTorch reference (same signature).

    The first tensor argument decides the device; the call goes to the launcher when
    `use_triton` says so (and is counted in `launch_counts`), else to the reference.
    """

    def wrap(launcher: F) -> F:
        @functools.wraps(launcher)
        def dispatch(*args, **kwargs):
            first = next(a for a in args if isinstance(a, torch.Tensor))
            if use_triton(first.device):
                launch_counts[launcher.__name__] += 1
                return launcher(*args, **kwargs)
            return reference(*args, **kwargs)

        dispatch.reference = reference  # type: ignore[attr-defined]
        return dispatch  # type: ignore[return-value]

    return wrap
