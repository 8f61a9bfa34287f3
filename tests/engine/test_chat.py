"""`LLM.chat` on whole conversations (engine/chat.py's parser, the server's) on the tiny Qwen2.5-VL,
against transformers: its tokenizer's chat template over the same messages, its PIL image
processor's pixels, its model's greedy generate. OpenAI parts and the model card's parts (path,
file:// URL, PIL image, data URI) give the same tokens; a video given as frames, and
`mm_processor_kwargs` (offline and over HTTP, in-process), give transformers' prompt and tokens;
mistakes are InputErrors naming the field (400s over HTTP)."""

from __future__ import annotations

import asyncio
import base64
import functools
import io

import httpx
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qwen_vl_triton.engine.chat import InputError, local_media, parse_conversation
from qwen_vl_triton.engine.llm import LLM
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.modeling.processing import SAMPLE_IMAGE_PATH
from qwen_vl_triton.serving.api_server import create_app
from qwen_vl_triton.serving.config import ServeConfig
from tests.engine.conftest import SMALL_IMAGE, random_image

transformers.utils.logging.set_verbosity_error()

STEPS = 8
GREEDY = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
TOKENS = 28 * 28  # pixels per merged token


@pytest.fixture(scope="module", autouse=True)
def torch_kernels():
    """The kernels' PyTorch references: these tests are about the messages (the Triton path of
    every kernel is tested in tests/kernels, tests/modeling and the rest of tests/engine)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QVL_KERNELS", "torch")
        yield


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(tiny_checkpoint, device="cpu", num_kv_blocks=96)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tokenizer):
    """transformers' greedy tokens for chat messages (media parts as {"type": "image" | "video"}),
    their images (PIL, with the image processor's kwargs) and videos given as pairs of frames:
    (prompt ids, tokens)."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    model.eval()

    def run(messages: list[dict], images: list[Image.Image] = (), videos: list[list[Image.Image]] = (),
            steps: int = STEPS, **image_kwargs) -> tuple[list[int], list[int]]:
        processor = transformers.Qwen2VLImageProcessorPil(**image_kwargs)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs: dict = {}
        if images:
            pixels = processor(images=list(images), return_tensors="pt")
            inputs.update(pixels)
            pieces = text.split("<|image_pad|>")
            text = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // 4) + rest
                                       for g, rest in zip(pixels["image_grid_thw"], pieces[1:], strict=True))
        if videos:
            # A video whose frames come in equal pairs: each temporal patch is its frame as an image
            # (the processor repeats an image over the temporal patch), patches in t-major order.
            (frames,) = videos
            pixels = processor(images=frames[::2], return_tensors="pt")
            grid = pixels["image_grid_thw"]
            inputs.update(pixel_values_videos=pixels["pixel_values"],
                          video_grid_thw=torch.tensor([[len(grid), *grid[0, 1:].tolist()]]),
                          second_per_grid_ts=torch.tensor([1.0]))  # 2 frames per patch at 2 fps
            text = text.replace("<|video_pad|>", "<|video_pad|>" * (int(grid.prod(-1).sum()) // 4))
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        kinds = (ids == model.config.image_token_id).long() + 2 * (ids == model.config.video_token_id).long()
        with torch.no_grad():
            out = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                                 mm_token_type_ids=kinds[None], max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, **inputs)
        return ids.tolist(), out[0, len(ids):].tolist()

    return run


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def conversation(first: dict, second: dict) -> list[dict]:
    """A system turn, a user turn with an image, an assistant turn, a user turn with an image
    between two paragraphs."""
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [first, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": [{"type": "text", "text": "Now this one:"}, second,
                                         {"type": "text", "text": "What changed?"}]}]


def test_a_conversation_in_any_part_form_gives_transformers_greedy_tokens(llm, reference, tmp_path):
    first, second = random_image(61, 47, 1), random_image(90, 130, 2)
    path = tmp_path / "first.png"
    path.write_bytes(png(first))
    uri = "data:image/png;base64," + base64.b64encode(png(first)).decode()
    openai_parts = conversation({"type": "image_url", "image_url": {"url": uri, **SMALL_IMAGE}},
                                {"type": "image_url", "image_url": str(tmp_path / "second.png"), **SMALL_IMAGE})
    second.save(tmp_path / "second.png")
    model_card = conversation({"type": "image", "image": f"file://{path}", **SMALL_IMAGE},
                              {"type": "image", "image": second, **SMALL_IMAGE})
    plain_path = conversation({"type": "image", "image": str(path), **SMALL_IMAGE},
                              {"type": "image", "image": second, **SMALL_IMAGE})
    outputs = llm.chat([openai_parts, model_card, plain_path], GREEDY)
    ids, tokens = reference(conversation({"type": "image"}, {"type": "image"}), [first, second], **SMALL_IMAGE)
    assert [o.outputs[0].token_ids for o in outputs] == [tokens] * 3
    assert [o.prompt_tokens for o in outputs] == [len(ids)] * 3
    # one conversation alone is a batch of one
    assert llm.chat(model_card, GREEDY)[0].outputs[0].token_ids == tokens


def test_a_video_given_as_frames_gives_transformers_greedy_tokens(llm, reference):
    a, b = random_image(84, 56, 5), random_image(84, 56, 6)  # 2 x 3 merged tokens: kept as they are
    frames = [a, a, b, b]
    controls = {"min_pixels": 4 * TOKENS, "max_pixels": 16 * TOKENS}

    def messages(video: object) -> list[dict]:
        return [{"role": "user", "content": [{"type": "video", "video": video, **controls},
                                             {"type": "text", "text": "What happens?"}]}]

    as_arrays = np.stack([np.asarray(f) for f in frames])
    outputs = llm.chat([messages(frames), messages(as_arrays), messages([np.asarray(f) for f in frames[:3]])],
                       GREEDY)
    template = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    ids, tokens = reference(template, videos=[frames], **controls)
    assert outputs[0].outputs[0].token_ids == tokens and outputs[0].prompt_tokens == len(ids)
    assert outputs[1].outputs[0].token_ids == tokens  # a uint8 [T, H, W, 3] array is the same video
    assert outputs[2].outputs[0].token_ids == tokens  # 3 frames: the last repeated to an even count, as qwen-vl-utils


@pytest.fixture(scope="module")
def bounded(reference):
    """transformers' prompt ids and greedy tokens for the sample image under max_pixels = 6 tokens."""
    max_pixels = 6 * TOKENS
    ids, tokens = reference([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
                            [Image.open(SAMPLE_IMAGE_PATH)], max_pixels=max_pixels)
    return max_pixels, ids, tokens


def test_mm_processor_kwargs_bound_the_media_as_transformers_does(llm, bounded):
    max_pixels, ids, tokens = bounded
    messages = [{"role": "user", "content": [{"type": "image", "image": str(SAMPLE_IMAGE_PATH)},
                                             {"type": "text", "text": "Describe."}]}]
    (out,) = llm.chat(messages, GREEDY, mm_processor_kwargs={"max_pixels": max_pixels})
    assert out.prompt_tokens == len(ids) and out.outputs[0].token_ids == tokens
    # a part's own control wins over the kwargs
    own = [{"role": "user", "content": [{"type": "image", "image": str(SAMPLE_IMAGE_PATH), "max_pixels": max_pixels},
                                        {"type": "text", "text": "Describe."}]}]
    parsed, objects = parse_conversation(own)
    request = llm.preprocessor.prepare_chat(parsed, GREEDY, resolve=functools.partial(local_media, objects=objects),
                                            mm_processor_kwargs={"max_pixels": 4 * TOKENS})
    assert len(request.ids) == len(ids)


def _user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "q"}]}]


IMAGE = {"type": "image", "image": str(SAMPLE_IMAGE_PATH)}


@pytest.mark.parametrize(("messages", "kwargs", "param", "code", "message"), [
    (_user(IMAGE), {"max_pixel": 1}, "mm_processor_kwargs", "invalid_value", r"unknown key\(s\) \['max_pixel'\]"),
    (_user(IMAGE), {"max_pixels": 16384 * TOKENS + 1}, "mm_processor_kwargs", "invalid_value",
     "over the configured limit of 12845056 pixels per image"),
    (_user({**IMAGE, "max_pixels": 16384 * TOKENS + 1}), None, "messages[0].content[0].image", "invalid_value",
     "over the configured limit"),
    (_user({"type": "audio", "audio": "a.wav"}), None, "messages[0].content[0].type", "invalid_value",
     "must be one of text, image_url, video_url, image, video"),
    (_user({"type": "image_url", "image_url": {"url": 3}}), None, "messages[0].content[0].image_url",
     "invalid_type", "must be a URL string"),
    (_user({"type": "image_url", "image_url": "https://example.com/a.png"}), None,
     "messages[0].content[0].image_url", "unsupported_url", "not supported offline"),
    (_user({"type": "image", "image": "/no/such/file.png"}), None, "messages[0].content[0].image", "file_not_found",
     "no such file"),
    (_user({"type": "video", "video": [np.zeros((28, 28), np.uint8)]}), None, "messages[0].content[0].video",
     "invalid_media", r"frame 0 must be a PIL image or a uint8 \[H, W, 3\] array"),
    ([{"role": "system", "content": "s"}], None, "messages", "invalid_value", "no user message"),
])
def test_mistakes_are_input_errors_naming_the_field(llm, messages, kwargs, param, code, message):
    with pytest.raises(InputError, match=message) as info:
        llm.chat(messages, GREEDY, mm_processor_kwargs=kwargs)
    assert (info.value.param, info.value.code) == (param, code)
    assert not llm.has_unfinished()


def test_mm_processor_kwargs_over_http(llm, bounded, tiny_checkpoint, monkeypatch):
    """In-process server over the same LLM: the field bounds chat's and /generate's media as
    transformers does; an unknown key and a value over a limit are 400s naming mm_processor_kwargs."""
    max_pixels, ids, tokens = bounded
    app = create_app(ServeConfig(model_path=str(tiny_checkpoint), allowed_media_dir=str(SAMPLE_IMAGE_PATH.parent)),
                     llm)
    server = app.state.server
    image = {"type": "image_url", "image_url": SAMPLE_IMAGE_PATH.name}
    chat = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "Describe."}]}],
            "max_tokens": STEPS, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "mm_processor_kwargs": {"max_pixels": max_pixels}}
    generate = {"prompt": [image, {"type": "text", "text": "Describe."}], "max_tokens": STEPS, "do_sample": False,
                "ignore_eos": True, "mm_processor_kwargs": {"max_pixels": max_pixels}}

    async def run() -> list[httpx.Response]:
        await server.startup()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as c:
                return [await c.post("/v1/chat/completions", json=chat),
                        await c.post("/generate", json=generate),
                        await c.post("/v1/chat/completions", json={**chat, "mm_processor_kwargs": {"fpss": 1}}),
                        await c.post("/generate", json={**generate, "mm_processor_kwargs": {"max_pixels": 1 << 40}}),
                        await c.post("/v1/chat/completions", json={**chat, "mm_processor_kwargs": {"fps": "x"}})]
        finally:
            await server.shutdown()

    ok, gen, unknown, over, wrong_type = asyncio.run(run())
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] == len(ids)
    assert ok.json()["choices"][0]["token_ids"] == tokens
    assert gen.status_code == 200, gen.text
    assert gen.json() == {"text": [ok.json()["choices"][0]["message"]["content"]]}
    for response, param, text in ((unknown, "mm_processor_kwargs", "unknown key(s) ['fpss']"),
                                  (over, "mm_processor_kwargs", "over the configured limit"),
                                  (wrong_type, "mm_processor_kwargs.fps", "must be a finite number")):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and text in error["message"], error
