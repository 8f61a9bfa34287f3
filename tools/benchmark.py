"""Load-test a running server, like MindIE's `benchmark` client (see serving/benchmark.py).

    python tools/benchmark.py --url http://127.0.0.1:1025 --dataset_type textvqa \
        --dataset_path /data/textvqa/textvqa_val.jsonl --num_prompts 256 --concurrency 64 \
        --max_output_len 256 --save_path out/bench

Prints TTFT / TPOT / ITL / end-to-end latency percentiles and output tokens/s (GenerationSpeed);
with --save_path writes records.jsonl, summary.json and latency.png there.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from serving.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
