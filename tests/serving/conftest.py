"""Serving fixtures: a tiny checkpoint, the hand-made datasets with their media, a live server.

The server runs as a real subprocess (`tools/serve.py`) on 127.0.0.1 and a free port. It runs
with QVL_KERNELS=torch: the kernels' PyTorch references keep these HTTP-level tests fast; the
Triton path of every kernel is covered by tests/kernels, tests/modeling and tests/engine.
OMP_NUM_THREADS=1 because on a 2-core machine torch's two OpenMP threads fight the engine,
event-loop and client threads (small ops then run several times slower).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.data.make_media import make_media

ROOT = Path(__file__).resolve().parents[2]

MAX_INPUT = 600       # the test server's --max_input_length
MAX_SEQ = 1024        # its --max_seq_len
IMAGE_LIMIT = 1024 * 28 * 28  # its --image_max_pixels
SMALL_IMAGE = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}

# Hang guards, not speed limits: no test asserts how fast anything runs. Each bound only ends a wait
# that would otherwise never end, is generous for a loaded 2-core machine, and is named in the failure
# with the process's output; a process that exits while waited on fails the wait at once.
STARTUP_TIMEOUT_S = 600.0   # a server until /health answers
REQUEST_TIMEOUT_S = 300.0   # one HTTP request, or the gap between two chunks of a stream
SHUTDOWN_TIMEOUT_S = 600.0  # a server's exit after SIGTERM
IDLE_TIMEOUT_S = 600.0      # the engine's queues and KV blocks emptying once the clients are done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(QVL_KERNELS="torch", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


@dataclass
class LiveServer:
    """A server subprocess and how to reach it."""

    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def wait_healthy(url: str, processes: list[subprocess.Popen], what: str, output: Callable[[], str],
                 timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Poll url/health until it answers 200. A process of `processes` that exits first fails the wait
    at once with `output()`; `timeout` only catches a hang, and the failure says what hung and how long."""
    deadline = time.monotonic() + timeout
    while True:
        for p in processes:
            if p.poll() is not None:
                raise AssertionError(f"{what} (pid {p.pid}) exited with code {p.returncode} before {url}/health "
                                     f"answered; its output:\n{output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"hang: {what} still running but {url}/health not answering 200 after "
                                 f"{timeout:.0f} s; its output:\n{output()}")
        time.sleep(0.25)


def start_server(ckpt: Path, media_dir: Path, log: Path, *extra: str, timeout: float = STARTUP_TIMEOUT_S,
                 script: Path = ROOT / "tools" / "serve.py") -> LiveServer:
    """Start tools/serve.py (or a script wrapping it) and wait until /health answers 200 (see wait_healthy)."""
    port = free_port()
    cmd = [sys.executable, str(script), "--model_path", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--allowed_media_dir", str(media_dir), "--kv_cache_gb", "0.05",
           "--max_input_length", str(MAX_INPUT), "--max_seq_len", str(MAX_SEQ), "--image_max_pixels", str(IMAGE_LIMIT),
           "--log_level", "warning", *extra]
    with log.open("w") as f:
        process = subprocess.Popen(cmd, cwd=ROOT, env=server_env(), stdout=f, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_healthy(server.url, [process], "the server (tools/serve.py)", server.log_tail, timeout)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: LiveServer, timeout: float = SHUTDOWN_TIMEOUT_S) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` (a hang guard); its exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
    return server.process.returncode


@pytest.fixture(scope="session")
def serving_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serving-tiny"), "qwen2_5_vl", seed=7)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """The hand-made datasets with generated media, plus a few loose files for bad requests."""
    root = make_media(tmp_path_factory.mktemp("serving-media"))
    (root / "notes.txt").write_text("this is not an image\n")
    return root


@pytest.fixture(scope="session")
def server(serving_ckpt, media_dir, tmp_path_factory) -> Iterator[LiveServer]:
    live = start_server(serving_ckpt, media_dir, tmp_path_factory.mktemp("server-log") / "server.log")
    yield live
    stop_server(live)


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics as a flat {"name{labels}": value} dict (comments and non-numbers skipped)."""
    values: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=REQUEST_TIMEOUT_S).text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            values[key] = float(value)
        except ValueError:
            continue
    return values


def wait_idle(server: LiveServer, timeout: float = IDLE_TIMEOUT_S) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks; those metrics. Fails at once if the
    server exits; `timeout` only catches a hang (the failure shows the last metrics and the log)."""
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited with code {server.process.returncode} while the test waited "
                                 f"for it to go idle; its log:\n{server.log_tail()}")
        m = metrics(server.url)
        if (m["qvl_kv_cache_blocks_used"] == 0 and m["qvl_num_requests_running"] == 0
                and m["qvl_num_requests_waiting"] == 0):
            return m
        if time.monotonic() > deadline:
            gauges = {k: v for k, v in m.items() if k.startswith(("qvl_num_requests", "qvl_kv_cache"))}
            raise AssertionError(f"hang: the server still busy {timeout:.0f} s after its clients were done: "
                                 f"{gauges}; its log:\n{server.log_tail()}")
        time.sleep(0.1)
