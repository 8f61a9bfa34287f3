"""One rank of a quantized checkpoint's engine run, launched by tests/parallel/test_tp_quantized.py.

    RANK=r WORLD_SIZE=n ... python quant_script.py CKPT OUT_DIR kernels|dequantized

`dequantized` runs the checkpoint's dequantized float reference (modeling.linear.dequantized)
instead of its int8 layers. Rank 0 generates REQUESTS greedily and writes OUT_DIR/outputs.json
(token ids per request); the other ranks follow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.modeling.linear import dequantized
from qwen_vl_triton.modeling.processing import SAMPLE_IMAGE_PATH
from qwen_vl_triton.parallel import SINGLE_PROCESS, TPGroup, destroy, end_process, init_from_env

IMAGE_TEXT = "What is shown here?"
CHAT_TEXT = "Tell me about the sea."
TOKENS = 8
REQUESTS = {"image": Prompt(IMAGE_TEXT, [Media(SAMPLE_IMAGE_PATH)]), "text": Prompt(CHAT_TEXT)}


def reference_tokens(checkpoint: str | Path, mode: str, tp: TPGroup = SINGLE_PROCESS) -> dict[str, list[int]] | None:
    """Greedy tokens of REQUESTS on this rank's engine (rank 0; None on the others, which follow)."""
    llm = LLM(checkpoint, device="cpu", kv_cache_gb=0.05, tp=tp)
    if mode == "dequantized":
        llm.model.weights = dequantized(llm.model.weights)
    if tp.rank != 0:
        llm.worker_loop()
        return None
    try:
        greedy = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
        outputs = llm.generate(list(REQUESTS.values()), greedy)
    finally:
        llm.shutdown()
    return {name: o.outputs[0].token_ids for name, o in zip(REQUESTS, outputs, strict=True)}


def main(checkpoint: str, out_dir: str, mode: str) -> None:
    tp = init_from_env("cpu")
    tokens = reference_tokens(checkpoint, mode, tp)
    if tokens is not None:
        Path(out_dir, "outputs.json").write_text(json.dumps(tokens))
    destroy(tp)
    end_process(tp)


if __name__ == "__main__":
    main(*sys.argv[1:4])
