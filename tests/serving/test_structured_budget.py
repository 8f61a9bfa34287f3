"""Structured outputs that the budget ends: near max_tokens the engine closes the constraint, so a
chat request's JSON on the noisy test server parses, and says finish_reason "length"."""

from __future__ import annotations

import json

import jsonschema

from tests.serving.test_api import client

# The test server's random weights close a bare json_object at once ("{}"): a required string makes
# them write one, which runs on until the budget.
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def test_json_closes_within_max_tokens(server):
    resp = client(server).chat.completions.create(
        model="qwen2_vl", messages=[{"role": "user", "content": "Describe the sea as JSON."}], max_tokens=16,
        temperature=1.0, seed=0, n=4,
        response_format={"type": "json_schema", "json_schema": {"name": "sea", "schema": SCHEMA}})
    for choice in resp.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert [choice.finish_reason for choice in resp.choices] == ["length"] * 4
    assert resp.usage.completion_tokens <= 4 * 16
