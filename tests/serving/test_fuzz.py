"""Schema-driven fuzzing of a live server: schemathesis generates request bodies for the POST endpoints
from the server's own /openapi.json, bodies that fit the declared schemas (positive) and bodies that
break them (negative). A malformed body must get a 4xx with OpenAI's error body, never a 5xx (a 5xx
is a bug: the parser lets something through that a later stage cannot handle), and a well-formed
one a 200 or a 4xx. Afterwards the server is alive and serves a normal request.

The server runs with --max_iter_times 4, so that a body the fuzzer gets right generates at most 4
tokens: the run is bounded by the number of requests, not by what they ask for. Generation is
derandomized: every run sends the same cases, so a failure reproduces.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.serving.conftest import REQUEST_TIMEOUT_S, LiveServer, start_server, stop_server

EXAMPLES = 100         # per POST endpoint and generation mode: 3 endpoints x 2 modes x 100 = 600 requests
MIN_REQUESTS = 500
CASE_TIMEOUT_S = 60.0  # a hang guard per request (each is small: at most 4 tokens), generous for a loaded machine
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_server(serving_ckpt, media_dir, tmp_path_factory) -> Iterator[LiveServer]:
    live = start_server(serving_ckpt, media_dir, tmp_path_factory.mktemp("fuzz") / "server.log",
                        "--max_iter_times", "4")
    yield live
    stop_server(live)


def problem(response: requests.Response) -> str | None:
    """What is wrong with a response to a fuzzed request, or None: a 5xx; a 4xx without OpenAI's error
    body; a 200 stream carrying an internal error."""
    if response.status_code >= 500:
        return f"status {response.status_code}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"status {response.status_code} without OpenAI's error body"
        if not isinstance(error, dict) or set(error) != ERROR_FIELDS or error["type"] != "invalid_request_error":
            return f"status {response.status_code} with a malformed error body"
        return None
    if response.status_code != 200:
        return f"unexpected status {response.status_code}"
    if '"internal_error"' in response.text or '"engine_error"' in response.text:
        return "an internal error inside a 200 response"
    return None


@dataclass
class Tally:
    """What the fuzzed requests got: counts per (path, mode) and per status, and the problems found."""

    sent: Counter[tuple[str, str]] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def fuzz(op: schemathesis.APIOperation, mode: GenerationMode, url: str, session: requests.Session,
         tally: Tally) -> None:
    """Send EXAMPLES cases of `op` generated in `mode`, each checked by `problem`. Problems are
    collected rather than raised, so that Hypothesis neither stops at the first one nor spends the
    run shrinking it."""
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def send(case: schemathesis.Case) -> None:
        tally.sent[op.path, mode.value] += 1
        body = json.dumps(case.body, default=repr)[:2000]
        try:
            response = case.call(base_url=url, session=session, timeout=CASE_TIMEOUT_S)
        except requests.RequestException as e:  # a timeout (hang) or the server gone
            tally.failures.append(f"{op.path} ({mode.value}): {type(e).__name__}: {e}\n  body: {body}")
            return
        tally.statuses[response.status_code] += 1
        why = problem(response)
        if why is not None:
            tally.failures.append(f"{op.path} ({mode.value}): {why}: {response.text[:500]}\n  body: {body}")

    send()


def test_fuzzed_requests_never_get_a_5xx(fuzz_server: LiveServer):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json").include(method="POST")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert sorted(op.path for op in operations) == ["/generate", "/v1/chat/completions", "/v1/completions"]
    tally = Tally()
    started = time.perf_counter()
    with requests.Session() as session:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(op, mode, fuzz_server.url, session, tally)
    elapsed = time.perf_counter() - started
    total = sum(tally.sent.values())
    print(f"\nfuzzed {total} requests in {elapsed:.1f} s: {dict(sorted(tally.sent.items()))}; "
          f"statuses {dict(sorted(tally.statuses.items()))}")
    assert not tally.failures, f"{len(tally.failures)} of {total} fuzzed requests failed:\n" + \
        "\n".join(tally.failures[:20]) + f"\nserver log:\n{fuzz_server.log_tail()}"
    assert total >= MIN_REQUESTS, tally.sent
    statuses = tally.statuses
    assert statuses[200] > 0 and sum(n for code, n in statuses.items() if 400 <= code < 500) > 0, statuses
    assert httpx.get(fuzz_server.url + "/health", timeout=REQUEST_TIMEOUT_S).status_code == 200
    ok = httpx.post(fuzz_server.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                    json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3, ok.text
