"""Write a tiny random Qwen2-VL / Qwen2.5-VL checkpoint that transformers itself loads.

    python tools/make_tiny_checkpoint.py OUT --arch qwen2_vl|qwen2_5_vl [--seed N] [--dtype ...]
        [--layout nested|flat] [--weight_names transformers|legacy|language_model] [--sharded]

The logic lives in qwen_vl_triton/testing/tiny_checkpoint.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwen_vl_triton.testing.tiny_checkpoint import ARCHS, DTYPES, LAYOUTS, WEIGHT_NAMES, make_tiny_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("out", type=Path, help="output directory (created; files it writes are replaced)")
    p.add_argument("--arch", choices=ARCHS, default="qwen2_vl", help="model family")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="dtype of the stored weights and of config.json's dtype")
    p.add_argument("--layout", choices=LAYOUTS, default="nested",
                   help="config.json layout: 'nested' as transformers 5.x saves it (text_config, "
                        "rope_parameters) or 'flat' as the released checkpoints (top-level text fields, "
                        "rope_scaling.mrope_section)")
    p.add_argument("--weight_names", choices=WEIGHT_NAMES, default="transformers",
                   help="tensor names: as save_pretrained writes them, 'legacy' (model.layers.*, visual.*) "
                        "or 'language_model' (model.language_model.*, model.visual.*)")
    p.add_argument("--sharded", action="store_true",
                   help="write model-0000i-of-0000N.safetensors shards plus model.safetensors.index.json")
    p.add_argument("--num_shards", type=int, default=2, help="shard count with --sharded")
    p.add_argument("--min_pixels", type=int, default=56 * 56, help="preprocessor_config.json min_pixels")
    p.add_argument("--max_pixels", type=int, default=28 * 28 * 1280,
                   help="preprocessor_config.json max_pixels")
    p.add_argument("--tie_word_embeddings", action="store_true", help="share lm_head with embed_tokens")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    out = make_tiny_checkpoint(
        a.out, a.arch, a.seed, dtype=a.dtype, layout=a.layout, weight_names=a.weight_names,
        sharded=a.sharded, num_shards=a.num_shards, min_pixels=a.min_pixels, max_pixels=a.max_pixels,
        tie_word_embeddings=a.tie_word_embeddings,
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
