"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Counters and histograms are updated by the engine thread (prometheus-client is thread-safe) and
the HTTP middleware; gauges read the engine's last published snapshot at scrape time.

    qvl_http_requests_total{endpoint, status}     HTTP requests by route and status code
    qvl_requests_finished_total{finish_reason}    stop | length | abort | error
    qvl_prompt_tokens_total                       prompt tokens of admitted requests (media included)
    qvl_generation_tokens_total                   tokens generated
    qvl_time_to_first_token_seconds               histogram: arrival in the engine -> first token
    qvl_time_per_output_token_seconds             histogram: (latency - ttft) / (tokens - 1), per request
    qvl_e2e_request_latency_seconds               histogram: arrival in the engine -> last token
    qvl_num_requests_running / _waiting           gauges (waiting: accepted, not yet running)
    qvl_kv_cache_blocks_used / _total, qvl_kv_cache_usage_ratio
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's metric objects over a private registry."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model_name = model_name
        self.http_requests = Counter("qvl_http_requests", "HTTP requests by route and status code",
                                     ["endpoint", "status"], registry=r)
        self.finished = Counter("qvl_requests_finished", "Requests finished in the engine, by reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("qvl_prompt_tokens", "Prompt tokens of requests added to the engine",
                                     registry=r)
        self.generation_tokens = Counter("qvl_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("qvl_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("qvl_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("qvl_e2e_request_latency_seconds", "Request latency in the engine",
                             buckets=_E2E_BUCKETS, registry=r)
        self.running = Gauge("qvl_num_requests_running", "Requests running in the engine", registry=r)
        self.waiting = Gauge("qvl_num_requests_waiting", "Requests accepted and not yet running", registry=r)
        self.kv_used = Gauge("qvl_kv_cache_blocks_used", "KV cache blocks referenced by sequences", registry=r)
        self.kv_total = Gauge("qvl_kv_cache_blocks_total", "KV cache blocks", registry=r)
        self.kv_ratio = Gauge("qvl_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)

    def bind_gauges(self, running: Callable[[], float], waiting: Callable[[], float], kv_used: Callable[[], float],
                    kv_total: Callable[[], float]) -> None:
        """Gauges read these callables at scrape time."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.kv_used.set_function(kv_used)
        self.kv_total.set_function(kv_total)
        self.kv_ratio.set_function(lambda: kv_used() / max(kv_total(), 1))

    def observe_finished(self, reason: str, ttft_s: float | None, latency_s: float, num_tokens: int) -> None:
        """Count a finished request and observe its time per output token and end-to-end latency."""
        self.finished.labels(finish_reason=reason).inc()
        if num_tokens > 1 and ttft_s is not None:
            self.tpot.observe((latency_s - ttft_s) / (num_tokens - 1))
        if num_tokens > 0:
            self.e2e.observe(latency_s)

    def render(self) -> bytes:
        """The registry in Prometheus' text format (the /metrics body)."""
        return generate_latest(self.registry)

