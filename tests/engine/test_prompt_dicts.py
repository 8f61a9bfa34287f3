"""vLLM's offline prompt dicts in `LLM.generate` / `Preprocessor.prepare`, on the tiny Qwen2.5-VL:
chat-template text with `multi_modal_data` gives transformers' greedy tokens (its tokenizer and
image processor make the oracle's ids and pixels), `prompt_token_ids` the same tokens as the text,
pads bind to the media in order, and every mistake is a clear error before any medium is read."""

from __future__ import annotations

import pytest
import torch
import transformers
from PIL import Image

from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media import Media, MediaOptionError
from qwen_vl_triton.engine.preprocess import ContextLengthError, PromptMediaMismatch
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.modeling.processing import SAMPLE_IMAGE_PATH, SAMPLE_VIDEO_PATH
from qwen_vl_triton.testing.media import synthetic_frame
from tests.engine.conftest import SMALL_IMAGE, SMALL_VIDEO, random_image

transformers.utils.logging.set_verbosity_error()

STEPS = 8
IMAGE_PAD = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PAD = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64)


def chat_text(tokenizer, kinds: list[str], text: str) -> str:
    """The prompt as the Qwen2.5-VL README's vLLM recipe makes it: the processor's chat template
    (the checkpoint's, which its tokenizer renders: transformers' processor needs torchvision here)
    over one user message of these media, then the text."""
    content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": text}]
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def transformers_prompt(tokenizer, text: str, images: list[Image.Image], **image_kwargs):
    """What transformers' Qwen2.5-VL processor makes of chat text and images: its image processor's
    pixels and grids, each image pad repeated t*h*w/4 times, tokenized."""
    pixels = transformers.Qwen2VLImageProcessorPil(**image_kwargs)(images=images, return_tensors="pt")
    grids = pixels["image_grid_thw"]
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == len(images) + 1
    expanded = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // 4) + rest
                                   for g, rest in zip(grids, pieces[1:], strict=True))
    return torch.tensor(tokenizer(expanded, add_special_tokens=False)["input_ids"]), pixels


@pytest.fixture(scope="module")
def two_images(tokenizer):
    """The vLLM-style dict (one image a PIL image, one a path), and its chat text."""
    text = chat_text(tokenizer, ["image", "image"], "Compare them.")
    return text, {"prompt": text, "multi_modal_data": {"image": [random_image(61, 47, 1), str(SAMPLE_IMAGE_PATH)]},
                  "mm_processor_kwargs": SMALL_IMAGE}


@pytest.fixture(scope="module")
def text_and_ids_outputs(llm, tokenizer, two_images):
    """Greedy tokens of the text dict and of its token-id twin, in one batch."""
    text, prompt = two_images
    ids = {**prompt, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
    del ids["prompt"]
    outs = llm.generate([prompt, ids], SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def test_vllm_prompt_dict_gives_transformers_greedy_tokens(tiny_checkpoint, tokenizer, two_images,
                                                           text_and_ids_outputs):
    text, prompt = two_images
    pil, path = prompt["multi_modal_data"]["image"]
    ids, pixels = transformers_prompt(tokenizer, text, [pil, Image.open(path)], **SMALL_IMAGE)
    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    image_pad = ref.config.image_token_id
    with torch.no_grad():
        out = ref.eval().generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                                  mm_token_type_ids=(ids == image_pad).long()[None], max_new_tokens=STEPS,
                                  min_new_tokens=STEPS, do_sample=False, **pixels)
    assert text_and_ids_outputs[0] == out[0, len(ids):].tolist()


def test_prompt_token_ids_give_the_text_forms_tokens(text_and_ids_outputs):
    assert text_and_ids_outputs[1] == text_and_ids_outputs[0]


def test_images_and_videos_interleaved_bind_in_order(llm, tokenizer):
    """Pads image, video, image: the dict's images fill the image pads in order and its video the
    video pad, exactly the request a Prompt with the media in that order makes."""
    first, second = random_image(61, 47, 1), random_image(90, 130, 2)
    kwargs = {**SMALL_IMAGE, "nframes": 4}  # nframes applies to the video alone
    text = chat_text(tokenizer, ["image", "video", "image"], "What changed?")
    from_dict = llm.preprocessor.prepare({"prompt": text, "mm_processor_kwargs": kwargs, "multi_modal_data": {
        "video": SAMPLE_VIDEO_PATH, "image": [first, second]}})
    from_prompt = llm.preprocessor.prepare(Prompt("What changed?", [Media(first, options=SMALL_IMAGE),
                                                                    Media(SAMPLE_VIDEO_PATH, options=kwargs),
                                                                    Media(second, options=SMALL_IMAGE)]))
    assert [m.kind for m in from_dict.media] == ["image", "video", "image"]
    assert from_dict.ids == from_prompt.ids
    assert [m.content_hash for m in from_dict.media] == [m.content_hash for m in from_prompt.media]


def test_a_video_as_frames_binds_like_a_file(llm, tokenizer):
    """A list of frames is one video (as vLLM reads it); in a list of videos it is one of them."""
    frames = [Image.fromarray(synthetic_frame(56, 84, t / 4)) for t in range(4)]
    two = llm.preprocessor.prepare({"prompt": chat_text(tokenizer, ["video", "video"], "Which moves?"),
                                    "multi_modal_data": {"video": [frames, SAMPLE_VIDEO_PATH]},
                                    "mm_processor_kwargs": SMALL_VIDEO})
    from_prompt = llm.preprocessor.prepare(Prompt("Which moves?", [Media(frames, "video", SMALL_VIDEO),
                                                                   Media(SAMPLE_VIDEO_PATH, options=SMALL_VIDEO)]))
    assert two.ids == from_prompt.ids
    assert [m.content_hash for m in two.media] == [m.content_hash for m in from_prompt.media]
    one = llm.preprocessor.prepare({"prompt": chat_text(tokenizer, ["video"], "What moves?"),
                                    "multi_modal_data": {"video": frames}, "mm_processor_kwargs": SMALL_VIDEO})
    assert [m.content_hash for m in one.media] == [two.media[0].content_hash]


@pytest.mark.parametrize("max_pixels", [4 * 28 * 28, 16 * 28 * 28])
def test_mm_processor_kwargs_bound_the_prompt_as_transformers_does(llm, tokenizer, max_pixels):
    text = chat_text(tokenizer, ["image"], "Describe it.")
    image = Image.open(SAMPLE_IMAGE_PATH)
    request = llm.preprocessor.prepare({"prompt": text, "multi_modal_data": {"image": image},
                                        "mm_processor_kwargs": {"max_pixels": max_pixels}})
    ids, _ = transformers_prompt(tokenizer, text, [image], max_pixels=max_pixels)
    assert request.ids == ids.tolist()


MISSING = "/no/such/image.png"  # never read: each error comes first


@pytest.mark.parametrize(("prompt", "error", "message"), [
    ({"prompt": f"{IMAGE_PAD}{IMAGE_PAD}{VIDEO_PAD} two?", "multi_modal_data": {"image": MISSING}},
     PromptMediaMismatch, r"2 image pad\(s\) and 1 video pad\(s\).*gives 1 image\(s\) and 0 video\(s\)"),
    ({"prompt": "no pads", "multi_modal_data": {"video": [MISSING]}}, PromptMediaMismatch,
     r"0 image pad\(s\) and 0 video pad\(s\).*gives 0 image\(s\) and 1 video\(s\)"),
    ({"prompt": "hi", "prompt_id": 3}, ValueError, r"unknown key\(s\) \['prompt_id'\]"),
    ({"prompt": "hi", "prompt_token_ids": [1]}, ValueError, "give one of 'prompt'"),
    ({"multi_modal_data": {}}, ValueError, "give one of 'prompt'"),
    ({"prompt": IMAGE_PAD, "multi_modal_data": {"audio": MISSING}}, ValueError, r"unknown key\(s\) \['audio'\]"),
    ({"prompt": IMAGE_PAD, "multi_modal_data": {"image": MISSING}, "mm_processor_kwargs": {"max_pixel": 1}},
     MediaOptionError, r"mm_processor_kwargs: unknown key\(s\) \['max_pixel'\]"),
    ({"prompt": IMAGE_PAD, "multi_modal_data": {"image": [SAMPLE_IMAGE_PATH, 3]}}, ValueError,
     r"multi_modal_data\['image'\]\[1\] must be a file path, the file's bytes or a PIL image, got int"),
    ({"prompt_token_ids": [1, 10**9]}, ValueError, r"prompt_token_ids\[1\] = 1000000000 is not a token id"),
    ({"prompt_token_ids": [1] * 100_000}, ContextLengthError, "100000 token ids, over max_input_length"),
    ({"prompt": ""}, ValueError, "the prompt is empty"),
])
def test_mistakes_are_clear_errors_before_any_medium_is_read(llm, prompt, error, message):
    with pytest.raises(error, match=message):
        llm.preprocessor.prepare(prompt)


def test_a_lone_prompt_is_a_batch_of_one_and_n_gives_n_samples(llm):
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    [out] = llm.generate({"prompt": "hi", "cache_salt": "tenant-a"}, greedy)
    assert len(out.outputs) == 1 and len(out.outputs[0].token_ids) == 2
    [pair] = llm.generate({"prompt": "hi"}, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, n=2))
    assert [o.index for o in pair.outputs] == [0, 1]
    assert [o.token_ids for o in pair.outputs] == [out.outputs[0].token_ids] * 2
