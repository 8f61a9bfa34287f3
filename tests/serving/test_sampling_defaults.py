"""The model's sampling defaults (generation_config.json, --generation_config): a sampling field a
request leaves unset takes the file's value, on every endpoint and offline; a value the request sets
wins; `none` gives back OpenAI's defaults. Checked by tokens: an unset request gives exactly the
tokens of the same request with the file's values written out, on a seed where those differ from
the tokens of OpenAI's defaults (so the check could fail)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from qwen_vl_triton.cli.generate import TOOL_DEFAULTS, sampling_params
from qwen_vl_triton.engine.config import EngineConfig
from qwen_vl_triton.engine.llm import LLM
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.engine.sampling_defaults import NO_DEFAULTS, SamplingDefaults, read_sampling_defaults
from qwen_vl_triton.serving.api_server import create_app
from qwen_vl_triton.serving.config import ServeConfig
from qwen_vl_triton.serving.protocol import parse_chat_request, parse_completion_request, parse_generate_request
from tests.serving.conftest import REQUEST_TIMEOUT_S

# Qwen's instruct files set these four (with other values); max_new_tokens as some checkpoints do.
FILE_VALUES = {"temperature": 0.7, "top_p": 0.9, "top_k": 3, "repetition_penalty": 1.3, "max_new_tokens": 7}
AS_REQUEST = {"temperature": 0.7, "top_p": 0.9, "top_k": 3, "repetition_penalty": 1.3, "max_tokens": 7}
OPENAI = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "max_tokens": 7}


@pytest.fixture(scope="module")
def defaults_ckpt(serving_ckpt, tmp_path_factory) -> Path:
    """The serving checkpoint with FILE_VALUES added to its generation_config.json."""
    out = tmp_path_factory.mktemp("sampling-defaults") / "ckpt"
    shutil.copytree(serving_ckpt, out)
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, **FILE_VALUES}))
    return out


# ------------------------------------------------------------------------------------- reading the file


def test_read_auto_none_and_paths(defaults_ckpt, serving_ckpt, tmp_path):
    d = read_sampling_defaults("auto", defaults_ckpt)
    assert d.values() == AS_REQUEST and d.source == str(defaults_ckpt / "generation_config.json")
    assert read_sampling_defaults("none", defaults_ckpt) == NO_DEFAULTS
    assert read_sampling_defaults("auto", tmp_path) == NO_DEFAULTS  # no file: no defaults
    assert read_sampling_defaults("auto", serving_ckpt).values() == {}  # a file without sampling keys
    assert read_sampling_defaults(str(defaults_ckpt), tmp_path).values() == AS_REQUEST  # a folder
    assert read_sampling_defaults(str(defaults_ckpt / "generation_config.json"), tmp_path).values() == AS_REQUEST
    (tmp_path / "g.json").write_text(json.dumps({"top_k": 0, "do_sample": False}))
    assert read_sampling_defaults(str(tmp_path / "g.json"), tmp_path).values() == {"top_k": -1}  # 0 is off


@pytest.mark.parametrize("doc, words", [
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"max_new_tokens": 0}, "max_tokens must be an integer >= 1"),
    ([1, 2], "the top level must be an object"),
])
def test_bad_file_is_an_error_naming_it(tmp_path, doc, words):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="generation_config.json") as e:
        read_sampling_defaults(str(path), tmp_path)
    assert words in str(e.value)


def test_missing_path_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="generation_config must be auto, none or a path"):
        EngineConfig(generation_config=str(tmp_path / "nowhere.json"))


# ------------------------------------------------------------------------------------- parsing requests

DEFAULTS = SamplingDefaults(**AS_REQUEST, source="x")
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _fields(p: SamplingParams) -> dict:
    return {k: getattr(p, k) for k in AS_REQUEST}


@pytest.mark.parametrize("parse, body", [(parse_chat_request, CHAT), (parse_completion_request, {"prompt": "hi"}),
                                         (parse_generate_request, {"prompt": "hi"})])
def test_every_endpoint_fills_unset_fields_and_given_ones_win(parse, body):
    assert _fields(parse(body, DEFAULTS).params) == AS_REQUEST
    assert _fields(parse(body).params) == {**OPENAI, "max_tokens": None}
    given = {"temperature": 0.2, "top_p": 0.5, "top_k": 0, "repetition_penalty": 1.0, "max_tokens": 3}
    assert _fields(parse({**body, **given}, DEFAULTS).params) == {**given, "top_k": -1}  # top_k 0: off, given
    assert parse({**body, "max_completion_tokens": 5}, DEFAULTS).params.max_tokens == 5


def test_mindie_do_sample_false_is_greedy_whatever_the_defaults():
    assert parse_generate_request({"prompt": "hi", "do_sample": False}, DEFAULTS).params.temperature == 0.0


def test_generate_cli_takes_flags_then_model_then_its_own():
    args = argparse.Namespace(max_output_length=None, temperature=None, top_p=0.5, top_k=None, repetition_penalty=None,
                              seed=1, ignore_eos=False)
    with_file = sampling_params(args, SimpleNamespace(sampling_defaults=DEFAULTS))
    assert _fields(with_file) == {**AS_REQUEST, "top_p": 0.5}
    without = sampling_params(args, SimpleNamespace(sampling_defaults=NO_DEFAULTS))
    assert _fields(without) == {**TOOL_DEFAULTS, "top_p": 0.5}


# ------------------------------------------------------------------------------------- by tokens


@pytest.fixture(scope="module")
def engines(defaults_ckpt):
    """The checkpoint loaded with its defaults (auto) and without them (none)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QVL_KERNELS", "torch")  # references: fast (the Triton path is tested elsewhere)
    loaded = {mode: LLM(defaults_ckpt, kv_cache_gb=0.02, generation_config=mode) for mode in ("auto", "none")}
    yield loaded
    for llm in loaded.values():
        llm.shutdown()
    mp.undo()


def _tokens(llm: LLM, **params) -> list[int]:
    return llm.generate(["Say something."], SamplingParams(**params, ignore_eos=True))[0].outputs[0].token_ids


def prompt_text(llm: LLM, chat: dict) -> str:
    """The chat request's prompt as raw text (what /v1/completions and /generate take)."""
    return llm.tokenizer.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True)


def _distinguishing_seed(llm: LLM) -> int:
    """A seed whose tokens under the file's values differ from those under OpenAI's defaults."""
    for seed in range(20):
        if _tokens(llm, **AS_REQUEST, seed=seed) != _tokens(llm, **OPENAI, seed=seed):
            return seed
    raise AssertionError("the file's values and OpenAI's defaults sample alike on 20 seeds")


def test_offline_generate_uses_the_model_defaults(engines):
    auto, none = engines["auto"], engines["none"]
    assert auto.default_sampling_params() == SamplingParams(**AS_REQUEST)
    assert none.default_sampling_params() == SamplingParams()


def test_http_unset_fields_take_the_file_values_by_tokens(engines, defaults_ckpt, caplog):
    auto = engines["auto"]
    seed = _distinguishing_seed(auto)
    expected = _tokens(auto, **AS_REQUEST, seed=seed)
    app = create_app(ServeConfig(model_path=str(defaults_ckpt)), auto)
    server = app.state.server
    chat = {**CHAT, "messages": [{"role": "user", "content": "Say something."}]}

    async def run() -> dict[str, list]:
        with caplog.at_level(logging.INFO):
            await server.startup()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=REQUEST_TIMEOUT_S) as c:
                unset = {"seed": seed, "ignore_eos": True, "return_token_ids": True}
                got = {}
                for name, body in (("chat unset", {**chat, **unset}), ("chat given", {**chat, **unset, **OPENAI})):
                    r = await c.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    got[name] = r.json()["choices"][0]["token_ids"]
                prompt = prompt_text(auto, chat)
                r = await c.post("/v1/completions", json={"prompt": prompt, **unset})
                got["completion unset"] = r.json()["choices"][0]["token_ids"]
                r = await c.post("/generate", json={"prompt": prompt, "seed": seed, "ignore_eos": True})
                got["generate text"] = r.json()["text"]
                return got
        finally:
            await server.shutdown()

    got = asyncio.run(run())
    assert got["chat unset"] == expected and len(expected) == FILE_VALUES["max_new_tokens"]
    assert got["chat given"] == _tokens(auto, **OPENAI, seed=seed) != expected
    assert got["completion unset"] == expected
    assert got["generate text"] == [prompt_text(auto, chat) + auto.tokenizer.decode(expected)]  # prompt + output
    assert "temperature=0.7, top_p=0.9, top_k=3, repetition_penalty=1.3, max_tokens=7 (from " in caplog.text


def test_none_restores_openai_defaults_by_tokens(engines):
    none = engines["none"]
    seed = _distinguishing_seed(none)
    assert none.sampling_defaults == NO_DEFAULTS
    params = parse_chat_request({**CHAT, "seed": seed, "max_tokens": 7}, none.sampling_defaults).params
    assert _tokens(none, **_fields(params), seed=seed) == _tokens(none, **OPENAI, seed=seed)
