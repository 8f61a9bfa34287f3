"""The transformers side of the e2e benchmark: batched `generate`, as a transformers user runs it.

    python qwen_vl_triton/benchmarks/peers/transformers_side.py CKPT IMAGE_DIR --text T --max_tokens 128

One request per image in IMAGE_DIR (sorted by name): the checkpoint's chat template over the image
and --text, its image processor (the PIL one: PyPI's torchvision does not load beside the CPU
torch, and the Qwen-VL processor class insists on a torchvision video processor, so the image pad
is expanded here as that class does), and all requests go to one left-padded greedy `generate` of
--max_tokens tokens each (EOS ignored). Prints one JSON line: the generation's wall
time (processor included), the start-up before it and each request's token ids. Imports nothing
of this project.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()


from side_io import image_files, parse_args, report  # noqa: E402 - beside this file, in any venv


def main() -> None:
    args = parse_args(__doc__)

    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, padding_side="left")  # generation appends right
    image_processor = AutoImageProcessor.from_pretrained(args.checkpoint, backend="pil")
    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    files = image_files(args.images)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.text}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # EOS ignored as vLLM's ignore_eos does: generated like any token, never stopping. (min_new_tokens
    # would instead forbid it, and change the greedy tokens.)
    model.generation_config.pad_token_id = tokenizer.pad_token_id or model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    started = time.perf_counter()
    pixels = image_processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt")
    merge = image_processor.merge_size ** 2
    texts = [prompt.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // merge))
             for grid in pixels["image_grid_thw"]]
    inputs = {**tokenizer(texts, padding=True, return_tensors="pt"), **pixels}
    # What the Qwen-VL processor adds: which tokens are media pads (the model's 3-D rope index reads it).
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).long()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_tokens, do_sample=False)
    generation_s = time.perf_counter() - started
    width = inputs["input_ids"].shape[1]
    report("transformers", generation_s, started - STARTED, inputs["attention_mask"].sum(1).tolist(),
           out[:, width:].tolist())


if __name__ == "__main__":
    main()
