"""Accuracy evals: TextVQA (official VQA metric) and VideoBench (multiple choice); see serving/eval.py.

    python tools/eval.py --task textvqa --dataset_path /data/textvqa/textvqa_val.jsonl \
        --url http://127.0.0.1:1025 --save_path out/textvqa
    python tools/eval.py --task videobench --dataset_path /data/Video-Bench/Eval_QA \
        --model_path /data/Qwen2-VL-7B-Instruct --save_path out/videobench

Writes predictions.jsonl (one line per question), results.csv (accuracy per subset) and
summary.json under --save_path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from serving.eval import main  # noqa: E402

if __name__ == "__main__":
    main()
