"""A request body's fields the server does not know are ignored, never silently: each name is logged
at WARNING once per process (as vLLM does), and the request still parses."""

from __future__ import annotations

import logging
import threading

import pytest

from qwen_vl_triton.serving import protocol
from qwen_vl_triton.serving.protocol import parse_chat_request, parse_completion_request, parse_generate_request

CHAT = {"model": "qwen2_vl", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def ignored(monkeypatch, caplog) -> pytest.LogCaptureFixture:
    """caplog at WARNING for the protocol's logger, with no field name logged yet in this process."""
    monkeypatch.setattr(protocol, "_ignored_names", set())
    caplog.set_level(logging.WARNING, logger="serving.protocol")
    return caplog


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "serving.protocol" and r.levelno == logging.WARNING]


def test_an_unknown_field_is_logged_once_and_the_request_parses(ignored):
    for _ in range(3):
        request = parse_chat_request({**CHAT, "max_tokens": 5, "frobnicate": True, "user_tag": "x"})
        assert request.params.max_tokens == 5
    assert _warnings(ignored) == ["The following fields were present in the request but ignored: "
                                  "{'frobnicate', 'user_tag'} (/v1/chat/completions; each name is logged once)"]
    parse_generate_request({"prompt": "Once", "frobnicate": 1, "mindie_field": 2})  # only the new name
    parse_completion_request({"prompt": "Once", "frobnicate": 1})
    assert _warnings(ignored)[1:] == ["The following fields were present in the request but ignored: "
                                      "{'mindie_field'} (/generate; each name is logged once)"]


def test_known_fields_are_not_logged(ignored):
    parse_chat_request({**CHAT, "max_tokens": 5, "temperature": 0.0, "stream": False, "cache_salt": "a",
                        "echo": False, "logit_bias": {}})  # refused fields, harmless when unset, are known
    parse_generate_request({"prompt": "Once", "do_sample": False, "max_tokens": 3})
    parse_completion_request({"prompt": "Once", "logprobs": 2, "return_token_ids": True})
    assert _warnings(ignored) == []


def test_each_name_is_logged_once_across_threads(ignored):
    threads = [threading.Thread(target=parse_chat_request, args=({**CHAT, "raced": i},)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_warnings(ignored)) == 1
