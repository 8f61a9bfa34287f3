"""Child process of test_video_memory: peak resident memory of one tools/generate.py run on a clip.

    python -m tests.engine.video_memory_child CHECKPOINT CLIP [generate.py flags...]

Warms up with one run on the clip's first seconds (so imports, the model and the KV cache are
resident and the allocator has its arenas), resets the kernel's peak-RSS mark (clear_refs 5),
runs generate.py on the whole clip, and prints {"growth_bytes", "embedding_bytes", "kv_bytes",
"prompt_tokens"} as JSON: growth is the peak resident set during the run above the resident set
before it; embedding_bytes and kv_bytes are what the prompt's embeddings and its KV cache entries
take (the CPU cache is allocated untouched, so its pages become resident as tokens are written).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    from qwen_vl_triton.cli import generate

    checkpoint, clip, *flags = sys.argv[1:]
    argv = ["--model_path", checkpoint, "--input_image", clip, "--max_output_length", "1", "--quiet",
            "--device", "cpu", *flags]
    generate.main([*argv, "--video_end", "2"])  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = rss_kib("VmRSS")
    report = generate.main(argv)
    growth = (rss_kib("VmHWM") - before) * 1024
    prompt_tokens = report["results"][0]["prompt_tokens"]
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    text = config.get("text_config", config)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    kv_per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 4  # fp32 K and V
    print(json.dumps({"growth_bytes": growth, "embedding_bytes": prompt_tokens * text["hidden_size"] * 4,
                      "kv_bytes": prompt_tokens * kv_per_token, "prompt_tokens": prompt_tokens}))


if __name__ == "__main__":
    main()
