"""What the model-level benchmarks run: random-weight checkpoints of named shapes, and requests.

`checkpoint_for(preset, dtype)` builds (once, cached) a Qwen2.5-VL checkpoint of one of PRESETS'
shapes; `make_requests(n)` gives the image+text prompts the end-to-end comparisons send
(e2e_vs_hf.py, e2e_peers.py). The other benches (bench_itl, bench_decode_graphs, bench_structured,
quant_accuracy) load the same checkpoints. Heavy imports (torch, the engine) happen on first call,
so a script's --help stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen_vl_triton.engine.llm import Prompt

PRESETS = {
    # Big enough on 2 CPU cores that the LLM dominates, small enough to finish in a minute or two.
    "cpu-small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=2, vision_embed_dim=256, vision_num_heads=4, vision_intermediate_size=512,
                      vision_depth=4, fullatt_block_indexes=[1, 3]),
    # The whole-process comparison's (benchmarks/e2e_peers.py): small enough that start-up and per-step
    # overhead show beside the matmuls.
    "cpu-peer": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=2, vision_embed_dim=256, vision_num_heads=4, vision_intermediate_size=512,
                     vision_depth=4, fullatt_block_indexes=[1, 3]),
    # Qwen2.5-VL-7B's shapes (benchmarks/model_shapes.json) with random weights.
    "qwen2.5-vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vision_embed_dim=1280, vision_num_heads=16,
                          vision_intermediate_size=3420, vision_depth=32, fullatt_block_indexes=[7, 15, 23, 31],
                          init_std=0.02),
}
IMAGE_SIZES = [(224, 224), (320, 240), (448, 336), (640, 480), (300, 400), (256, 512), (512, 384), (480, 640)]


def checkpoint_for(preset: str, dtype: str) -> Path:
    """The cached random-weight Qwen2.5-VL checkpoint of PRESETS[preset], saved in bfloat16 or float32."""
    from qwen_vl_triton.testing.tiny_checkpoint import cached_checkpoint

    return cached_checkpoint(f"bench-{preset}-{dtype}", "qwen2_5_vl", seed=0,
                             dtype="bfloat16" if dtype == "bfloat16" else "float32", **PRESETS[preset])


def make_requests(n: int) -> list[Prompt]:
    """n prompts of different lengths, each with one random image (sizes cycle through IMAGE_SIZES)."""
    import numpy as np
    from PIL import Image

    from qwen_vl_triton.engine.llm import Prompt
    from qwen_vl_triton.engine.media import Media

    rng = np.random.default_rng(0)
    words = "describe the picture in detail and count every object you can see in it please".split()
    prompts = []
    for i in range(n):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        text = " ".join(words[j % len(words)] for j in range(4 + 5 * (i % 7)))
        prompts.append(Prompt(text, [Media(image)]))
    return prompts
