"""The server's endpoints against a live subprocess: the official openai client, MindIE's curl
shapes, streaming, logprobs, and answers equal to the engine run offline (greedy)."""

from __future__ import annotations

import base64
import io
import itertools
import json

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.testing.media import synthetic_frame
from tests.serving.conftest import MAX_INPUT, REQUEST_TIMEOUT_S, SMALL_IMAGE


def png_bytes(height: int, width: int, t: float) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_frame(height, width, t)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def offline(serving_ckpt):
    """The same checkpoint in this process, for reference outputs."""
    return LLM(serving_ckpt, kv_cache_gb=0.02)


def offline_run(llm: LLM, prompt: Prompt, params: SamplingParams, monkeypatch):
    """Greedy reference output with the server's kernel backend and thread count."""
    monkeypatch.setenv("QVL_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return llm.generate([prompt], params)[0]
    finally:
        torch.set_num_threads(threads)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def test_health_and_models(server):
    assert httpx.get(server.url + "/health", timeout=REQUEST_TIMEOUT_S).json() == {"status": "ok"}
    names = [m.id for m in client(server).models.list()]
    assert names[0].startswith("serving-tiny")
    assert "qwen2_vl" in names


def test_openai_chat_with_image_equals_offline(server, offline, monkeypatch):
    image = png_bytes(70, 90, 0.3)
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    text = "What is in this picture?"
    ref = offline_run(offline, Prompt(text, [Media(image, "image", SMALL_IMAGE)]),
                      SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2), monkeypatch)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri, **SMALL_IMAGE}},
                                             {"type": "text", "text": text}]}]
    c = client(server)
    resp = c.chat.completions.create(model="qwen2_vl", messages=messages, max_tokens=12, temperature=0,
                                     logprobs=True, top_logprobs=2,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = resp.choices[0]
    assert choice.model_extra["token_ids"] == ref.outputs[0].token_ids
    assert choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == ref.prompt_tokens and resp.usage.completion_tokens == 12
    got = [e.logprob for e in choice.logprobs.content]
    np.testing.assert_allclose(got, ref.outputs[0].token_logprobs, atol=1e-4)
    assert [len(e.top_logprobs) for e in choice.logprobs.content] == [2] * 12
    for e in choice.logprobs.content:  # the chosen token (greedy) is the most likely one
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)

    stream = c.chat.completions.create(model="qwen2_vl", messages=messages, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    content, ids, finish, usage = "", [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            content += ch.delta.content or ""
            ids += (ch.model_extra or {}).get("token_ids") or []
            finish = ch.finish_reason or finish
    assert ids == ref.outputs[0].token_ids
    assert content == ref.outputs[0].text
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 12 and usage.prompt_tokens == ref.prompt_tokens


def test_file_path_and_mindie_curl_shapes(server, media_dir, offline, monkeypatch):
    """MindIE's README curl bodies (no Content-Type, image_url as a plain path string)."""
    image = media_dir / "textvqa" / "train_images" / "sign_1.png"
    text = "Explain the contents of the picture."
    ref = offline_run(offline, Prompt(text, [Media(image, "image")]), SamplingParams(max_tokens=8, temperature=0),
                      monkeypatch)
    chat_body = {"model": "qwen2_vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": str(image)}, {"type": "text", "text": text}]}],
        "max_tokens": 8, "temperature": 0, "stream": False}
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(chat_body), timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == ref.outputs[0].text
    # vLLM interface: prompt parts in MindIE's order (text first) also work; greedy via do_sample false
    gen_body = {"prompt": [{"type": "image_url", "image_url": "file://" + str(image)}, {"type": "text", "text": text}],
                "max_tokens": 8, "do_sample": False, "stream": False, "model": "qwen2_vl"}
    r = httpx.post(server.url + "/generate", content=json.dumps(gen_body), timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert r.json() == {"text": [ref.outputs[0].text]}
    # relative paths are taken from --allowed_media_dir
    gen_body["prompt"][0]["image_url"] = "textvqa/train_images/sign_1.png"
    got = httpx.post(server.url + "/generate", json=gen_body, timeout=REQUEST_TIMEOUT_S).json()
    assert got == {"text": [ref.outputs[0].text]}
    mindie_text_first = dict(gen_body, prompt=[{"type": "text", "text": text},
                                               {"type": "image_url", "image_url": str(image)}])
    assert httpx.post(server.url + "/generate", json=mindie_text_first, timeout=REQUEST_TIMEOUT_S).status_code == 200


def test_system_and_multi_turn_use_the_chat_template(server, serving_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(serving_ckpt)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to three."}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in rendered and "You are a helpful assistant." not in rendered
    expected = len(tok.encode(rendered, add_special_tokens=False))
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2},
                   timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == expected
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_completions_and_streaming_generate(server, offline, monkeypatch):
    prompt = "The quick brown fox"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                         "ignore_eos": True, "logprobs": 1,
                                                         "return_token_ids": True}, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and len(choice["token_ids"]) == 6
    assert len(choice["logprobs"]["tokens"]) == 6 and len(choice["logprobs"]["top_logprobs"][0]) == 1
    tok = offline.tokenizer
    assert body["usage"]["prompt_tokens"] == len(tok.encode(prompt))
    assert choice["text"] == tok.decode(choice["token_ids"], skip_special_tokens=True)

    chunks = []
    with httpx.stream("POST", server.url + "/generate", json={"prompt": prompt, "max_tokens": 6, "stream": True,
                                                               "do_sample": False, "ignore_eos": True},
                      timeout=REQUEST_TIMEOUT_S) as resp:
        assert resp.status_code == 200
        buf = b""
        for data in resp.iter_bytes():
            buf += data
        chunks = [json.loads(x) for x in buf.split(b"\0") if x.strip()]
    assert chunks and all(c["text"][0].startswith(prompt) for c in chunks)
    assert chunks[-1]["text"][0] == prompt + choice["text"]  # vLLM's api_server: prompt + output
    texts = [c["text"][0] for c in chunks]
    assert all(a != b for a, b in itertools.pairwise(texts)), texts  # each chunk adds text


def test_stop_strings_cut_the_text_and_the_stream(server):
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 30, "temperature": 0,
            "ignore_eos": True}
    full = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S).json()
    text = full["choices"][0]["message"]["content"]
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and
                 "\ufffd" not in text[:i + 2]), None)
    # The seeded tiny model's greedy text is fixed: it must hold a stop string to cut at, or the
    # test would prove nothing.
    assert stop is not None, f"no 2-character stop string (not blank, no U+FFFD up to it) in {text!r}"
    expected = text[:text.find(stop)]
    cut = httpx.post(server.url + "/v1/chat/completions", json={**body, "stop": stop}, timeout=REQUEST_TIMEOUT_S).json()
    assert cut["choices"][0]["message"]["content"] == expected
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = ""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stop": [stop], "stream": True},
                      timeout=REQUEST_TIMEOUT_S) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    streamed += ch["delta"].get("content") or ""
    assert streamed == expected


def test_video_over_max_input_length_is_shrunk_and_reported(server):
    """256 tokens per temporal patch x 4 patches does not fit max_input_token_len: the server
    keeps fewer frames (as LLM.prepare does) and says so in usage.media_adjustments."""
    frame = 256 * 28 * 28
    part = {"type": "video_url", "video_url": {"url": "videobench/Eval_video/Synthetic/square_0.mp4", "nframes": 8,
                                               "min_pixels": frame, "max_pixels": frame}}
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What moves?"}]}],
            "max_tokens": 3, "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] <= MAX_INPUT
    assert len(usage["media_adjustments"]) == 1 and "8 frames" in usage["media_adjustments"][0]
