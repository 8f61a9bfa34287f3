"""qwen-vl-triton: Qwen2-VL, Qwen2.5-VL and QVQ inference on Triton kernels (Ascend NPUs, NVIDIA GPUs).

    from qwen_vl_triton import LLM, Media, Prompt, SamplingParams
    llm = LLM("/data/Qwen2.5-VL-7B-Instruct")
    llm.generate([Prompt("What is this?", [Media("cat.jpg")])], SamplingParams(max_tokens=64))

    qwen_vl_triton.kernels.rms_norm(x, weight, eps)    # every kernel op, with its PyTorch reference

The layers, one subpackage each (docs/DESIGN.md draws them): kernels (Triton ops), modeling (the
models, their checkpoints and processors), parallel (tensor parallelism), engine (requests, the
scheduler, the paged KV cache), serving (the OpenAI-compatible server), clients (load benchmark and
accuracy evals over HTTP). cli holds the command lines, testing the tiny random checkpoints of the
demo and the tests, benchmarks the measurements of `make bench`.

Names load on first use, so `import qwen_vl_triton` (and a command's start-up) pays for torch only
when something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen_vl_triton import kernels
    from qwen_vl_triton.engine.llm import LLM, Prompt, RequestOutput
    from qwen_vl_triton.engine.media import Media
    from qwen_vl_triton.engine.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "Media", "Prompt", "RequestOutput", "SamplingParams", "kernels"]

_EXPORTS = {
    "LLM": "qwen_vl_triton.engine.llm",
    "Prompt": "qwen_vl_triton.engine.llm",
    "RequestOutput": "qwen_vl_triton.engine.llm",
    "Media": "qwen_vl_triton.engine.media",
    "SamplingParams": "qwen_vl_triton.engine.sampling",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "kernels":
        return importlib.import_module("qwen_vl_triton.kernels")
    raise AttributeError(f"module 'qwen_vl_triton' has no attribute {name!r}")
