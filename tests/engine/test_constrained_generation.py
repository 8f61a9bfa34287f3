"""Structured outputs through the engine on random weights: the model is noise, so whatever it
produces is the constraint's doing. Constrained and free requests share batches; a constrained
request's n samples each get their own matcher. On the PyTorch kernel path (QVL_KERNELS=torch):
what is tested is the decoding, and the interpreter would make these hundreds of steps slow."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from qwen_vl_triton.engine.llm import LLM, Prompt, RequestOutput
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.engine.structured import StructuredOutput
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


def run_all(llm: LLM, requests: dict[str, tuple[Prompt, SamplingParams]]) -> dict[tuple[str, int], RequestOutput]:
    for request_id, (prompt, params) in requests.items():
        llm.add_request(request_id, llm.preprocessor.prepare(prompt, params))
    finals = {}
    while llm.has_unfinished():
        for out in llm.step():
            assert out.error is None, out.error
            if out.finished:
                finals[out.request_id, out.index] = out
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
    assert finals["free", 0].output_ids == alone.output_ids


def test_a_schema_that_does_not_compile_is_the_requests_error(llm):
    bad = SamplingParams(max_tokens=4, structured=StructuredOutput("regex", "(unclosed"))
    with pytest.raises(ValueError):
        llm.add_request("bad", llm.preprocessor.prepare(Prompt("hi"), bad))
    assert not llm.has_unfinished()
