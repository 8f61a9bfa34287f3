"""Structured outputs through the engine on random weights: the model is noise, so whatever it
produces is the constraint's doing. Constrained and free requests share batches; a constrained
request's n samples each get their own matcher. Near max_tokens the engine closes a constraint
(json_object, a schema with required fields, tool calls) so that the output parses. On the PyTorch
kernel path (QVL_KERNELS=torch): what is tested is the decoding, and the interpreter would make
these hundreds of steps slow."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from qwen_vl_triton.engine import structured
from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.outputs import CompletionOutput
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.engine.structured import StructuredOutput
from qwen_vl_triton.serving import tool_calls
from tests.engine.conftest import SMALL_IMAGE, random_image

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "label": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["colour", "count", "label", "tags"],
    "additionalProperties": False,
}


def run_all(llm: LLM, requests: dict[str, tuple[Prompt, SamplingParams]]) -> dict[tuple[str, int], CompletionOutput]:
    for request_id, (prompt, params) in requests.items():
        llm.add_request(request_id, llm.preprocessor.prepare(prompt, params))
    finals = {}
    while llm.has_unfinished():
        for out in llm.step():
            assert out.error is None, out.error
            for sample in out.outputs:
                if sample.finished:
                    finals[out.request_id, sample.index] = sample
    return finals


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with pytest.MonkeyPatch.context() as patch:  # read at call time by kernels._backend
        patch.setenv("QVL_KERNELS", "torch")
        yield LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128)


def test_constrained_requests_hold_on_noise_beside_free_ones(llm):
    image = Prompt("Describe the picture as JSON.", [Media(random_image(64, 40, seed=3), options=SMALL_IMAGE)])
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    requests = {
        "schema-greedy": (image, SamplingParams(max_tokens=200, temperature=0.0,
                                                structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))),
        "schema-sampled": (image, SamplingParams(max_tokens=200, temperature=1.0, seed=5, n=2,
                                                 structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))),
        "object": (Prompt("Any JSON object."), SamplingParams(max_tokens=60, temperature=0.8, seed=9,
                                                             structured=StructuredOutput("json_object"))),
        "regex": (Prompt("A date."), SamplingParams(max_tokens=40, temperature=1.0, seed=1,
                                                    structured=StructuredOutput("regex", r"20[0-9]{2}-[01][0-9]"))),
        "choice": (Prompt("Yes or no?"), SamplingParams(max_tokens=40, temperature=1.0, seed=2,
                                                        structured=StructuredOutput("choice", choices=("yes", "no")))),
        "free": (Prompt("Tell me a story."), free),
    }
    finals = run_all(llm, requests)
    for key in [("schema-greedy", 0), ("schema-sampled", 0), ("schema-sampled", 1)]:
        out = finals[key]
        assert out.finish_reason == "stop", (key, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMA)
    obj = finals["object", 0]  # free keys and values: noise may not close it within max_tokens
    assert obj.text.startswith("{") and (obj.finish_reason == "length" or isinstance(json.loads(obj.text), dict))
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]", finals["regex", 0].text), finals["regex", 0].text
    assert finals["choice", 0].text in ("yes", "no")
    # The free request beside them is untouched by their masks: it equals its run alone.
    alone = llm.generate([requests["free"][0]], [free])[0]
    assert finals["free", 0].token_ids == alone.outputs[0].token_ids


def test_a_schema_that_does_not_compile_is_the_requests_error(llm):
    bad = SamplingParams(max_tokens=4, structured=StructuredOutput("regex", "(unclosed"))
    with pytest.raises(ValueError):
        llm.add_request("bad", llm.preprocessor.prepare(Prompt("hi"), bad))
    assert not llm.has_unfinished()


# ---------------------------------------------------------------- closing within max_tokens

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"]}}}]
REQUIRED_FIELDS = {  # the shortest completion from the start: {"name":"xyz","values":[0,0,0,0]}
    "type": "object",
    "properties": {"name": {"type": "string", "minLength": 3},
                   "values": {"type": "array", "items": {"type": "integer"}, "minItems": 4}},
    "required": ["name", "values"],
    "additionalProperties": False,
}


def sampled(constraint: StructuredOutput, max_tokens: int, n: int = 10) -> SamplingParams:
    """n samples (seeds 0..n-1) at temperature 1: the random weights wander, in strings, for long."""
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0, n=n, logprobs=1, structured=constraint)


def closed_outputs(llm: LLM, constraint: StructuredOutput, max_tokens: int, n: int = 10) -> list[CompletionOutput]:
    finals = run_all(llm, {"closing": (Prompt("Answer in JSON."), sampled(constraint, max_tokens, n))})
    outs = [finals["closing", i] for i in range(n)]
    for out in outs:  # the forced tokens are sampled tokens like any other: logprobs and all
        assert len(out.token_ids) <= max_tokens
        assert len(out.token_logprobs) == len(out.top_logprobs) == len(out.token_ids)
    return outs


def test_json_object_closes_within_max_tokens(llm, monkeypatch):
    """Today's behaviour (no closing) leaves most of the 10 samples cut inside a string; closing, all
    10 parse, and those the budget ended say "length"."""
    constraint = StructuredOutput("json_object")
    with monkeypatch.context() as patch:
        patch.setattr(llm.structured, "close_window", 0)  # matchers never search: the cut at the budget
        cut = closed_outputs(llm, constraint, 24)
    assert sum(out.finish_reason == "length" for out in cut) >= 8
    assert not all(parses(out.text) for out in cut)
    outs = closed_outputs(llm, constraint, 24)
    assert all(isinstance(json.loads(out.text), dict) for out in outs), [out.text for out in outs]
    assert sum(out.finish_reason == "length" for out in outs) >= 8
    for out, before in zip(outs, cut, strict=True):
        if before.finish_reason == "stop":  # the model ended it before the budget: nothing changed
            assert out.token_ids == before.token_ids and out.finish_reason == "stop"
        else:  # closing keeps the model's tokens up to where it started
            assert out.finish_reason == "length"
            assert out.token_ids[:8] == before.token_ids[:8]


@pytest.mark.parametrize(("schema", "max_tokens"), [
    (REQUIRED_FIELDS, 40),  # its shortest completion takes 30 tokens of the tiny vocabulary from the start
    (tool_calls.named_schema(TOOLS, "get_weather"), 28),  # a named tool's arguments
    (tool_calls.required_schema(TOOLS, parallel=False), 56),  # tool_choice "required": [{"name", "arguments"}]
])
def test_schemas_close_with_required_fields_within_max_tokens(llm, schema: dict, max_tokens: int):
    outs = closed_outputs(llm, StructuredOutput("json_schema", json.dumps(schema)), max_tokens, n=4)
    for out in outs:
        jsonschema.validate(json.loads(out.text), schema)
    assert any(out.finish_reason == "length" for out in outs)


def test_a_budget_too_small_to_close_cuts_as_before(llm):
    """max_tokens 1 where the shortest completion takes 30 tokens: cut at the budget, no error; and
    max_tokens 2 for json_object is exactly its shortest completion, "{}"."""
    outs = closed_outputs(llm, StructuredOutput("json_schema", json.dumps(REQUIRED_FIELDS)), 1, n=2)
    assert [(out.text, out.finish_reason) for out in outs] == [("{", "length")] * 2
    outs = closed_outputs(llm, StructuredOutput("json_object"), 2, n=2)
    assert [(out.text, out.finish_reason) for out in outs] == [("{}", "length")] * 2


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_json_object_at_max_tokens_300_parses_in_10_of_10_seeds(llm):
    """The issue's acceptance check: seeds 0..9 at temperature 1, max_tokens 300 (without closing 3
    of them parse: the model ends those three itself)."""
    outs = closed_outputs(llm, StructuredOutput("json_object"), 300)
    assert all(isinstance(json.loads(out.text), dict) for out in outs), [out.text[-40:] for out in outs]
    assert all(out.finish_reason == "stop" or len(out.token_ids) >= 300 - structured.CLOSE_MARGIN for out in outs)
