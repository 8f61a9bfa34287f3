"""One output-budget policy, the Preprocessor's: max_tokens against max_seq_len (and the server's
max_iter_times), set in `build`, the same offline and served, said the same way."""

from __future__ import annotations

import dataclasses

import pytest

from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.preprocess import OutputLengthError
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.serving.prompting import Preparer
from qwen_vl_triton.serving.protocol import APIError

MAX_SEQ = 64


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    engine = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=32, max_seq_len=MAX_SEQ)
    yield engine
    engine.shutdown()


def prompt_tokens(llm: LLM, text: str) -> int:
    return len(llm.preprocessor.prepare(Prompt(text), SamplingParams(max_tokens=1)).ids)


def test_max_tokens_none_is_the_room_left_and_a_cap_bounds_it(llm):
    text = "Tell me about the sea."
    used = prompt_tokens(llm, text)
    assert llm.preprocessor.prepare(Prompt(text), SamplingParams(max_tokens=None)).params.max_tokens == MAX_SEQ - used
    capped = llm.preprocessor.with_own_tokenizer(llm.path, "max_input_token_len", max_output_tokens=5)
    assert capped.prepare(Prompt(text), SamplingParams(max_tokens=None)).params.max_tokens == 5
    assert capped.prepare(Prompt(text), SamplingParams(max_tokens=9)).params.max_tokens == 5
    assert capped.prepare(Prompt(text), SamplingParams(max_tokens=3)).params.max_tokens == 3


def test_the_prepared_request_is_frozen_with_its_salt_and_the_caller_params_untouched(llm):
    params = SamplingParams(max_tokens=None)
    ids = llm.preprocessor.render([{"role": "user", "content": "hi"}])
    request = llm.preprocessor.build(ids, [], params, cache_salt="tenant-a")
    assert request.cache_salt == "tenant-a" and isinstance(request.params.max_tokens, int)
    assert params.max_tokens is None  # build made its own copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.cache_salt = "tenant-b"  # type: ignore[misc]


def test_offline_runs_get_exactly_the_room_left_and_an_over_budget_max_tokens_is_refused(llm):
    text = "Tell me about the sea."
    room = MAX_SEQ - prompt_tokens(llm, text)
    [out] = llm.generate([Prompt(text)], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == room
    with pytest.raises(OutputLengthError, match=f"max_tokens is {room + 1}: together over max_seq_len {MAX_SEQ}"):
        llm.generate([Prompt(text)], SamplingParams(max_tokens=room + 1))
    [refused] = llm.generate([Prompt(text)], SamplingParams(max_tokens=room + 1), errors="return")
    assert refused.outputs[0].finish_reason == "error" and isinstance(refused.error, OutputLengthError)
    assert not llm.has_unfinished()


def test_the_server_says_what_offline_says(llm):
    text = "Tell me about the sea."
    room = MAX_SEQ - len(llm.preprocessor.tokenize(text))
    params = SamplingParams(max_tokens=room + 1)
    with pytest.raises(OutputLengthError) as offline:
        llm.preprocessor.build(llm.preprocessor.tokenize(text), [], params)
    with pytest.raises(APIError) as served:
        Preparer.for_llm(llm, None, max_output_tokens=1024).prepare_raw(text, params)
    assert served.value.message == str(offline.value)
    assert (served.value.status, served.value.param, served.value.code) == (400, "max_tokens",
                                                                            "context_length_exceeded")


def test_an_unresolved_request_is_refused_by_the_engine(llm):
    request = llm.preprocessor.prepare(Prompt("hi"), SamplingParams(max_tokens=2))
    unresolved = dataclasses.replace(request, params=dataclasses.replace(request.params, max_tokens=None))
    with pytest.raises(ValueError, match="max_tokens is unresolved"):
        llm.add_request("r", unresolved)
