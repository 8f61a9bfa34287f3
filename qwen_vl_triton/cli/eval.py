"""Accuracy evals: TextVQA (official VQA metric) and VideoBench (multiple choice); see clients/eval.py.

    python tools/eval.py --task textvqa --dataset_path /data/textvqa/textvqa_val.jsonl \
        --url http://127.0.0.1:1025 --save_path out/textvqa
    python tools/eval.py --task videobench --dataset_path /data/Video-Bench/Eval_QA \
        --model_path /data/Qwen2-VL-7B-Instruct --save_path out/videobench

Writes predictions.jsonl (one line per question), results.csv (accuracy per subset) and
summary.json under --save_path. The answers come from a server (--url) or from the engine in
this process (--model_path; imported only then, and only here: clients/ speaks HTTP).
"""

from __future__ import annotations

import argparse
from typing import Any

from qwen_vl_triton.cli.benchmark import add_engine_arguments, load_engine
from qwen_vl_triton.clients import eval as clients_eval
from qwen_vl_triton.clients.datasets import Sample
from qwen_vl_triton.clients.eval import add_eval_arguments, evaluate, outputs_from_server

EVAL_MAX_BATCH_SIZE = 16  # --model_path's running sequences unless --max_batch_size says otherwise


def outputs_from_engine(args: argparse.Namespace, samples: list[Sample]) -> list[str]:
    """Greedy outputs of each sample from the engine in this process."""
    from qwen_vl_triton.engine.sampling import SamplingParams

    llm, prompts = load_engine(args, samples, EVAL_MAX_BATCH_SIZE)
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_output_len, temperature=0.0), progress=True)
    return [o.outputs[0].text for o in outs]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the eval against --url or in-process on --model_path; returns the summary."""
    p = argparse.ArgumentParser(description=clients_eval.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_eval_arguments(p)
    add_engine_arguments(p, "no server: run the engine in this process on this checkpoint instead of --url",
                         str(EVAL_MAX_BATCH_SIZE))
    args = p.parse_args(argv)
    if (args.url is None) == (args.model_path is None):
        p.error("give one of --url (a running server) and --model_path (the engine in this process)")
    if args.url is not None:
        return evaluate(args, args.url, outputs_from_server)
    return evaluate(args, args.model_path, outputs_from_engine)


if __name__ == "__main__":
    main()
