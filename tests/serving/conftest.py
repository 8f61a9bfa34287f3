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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from modeling.tiny_checkpoint import make_tiny_checkpoint
from tests.data.make_media import make_media

ROOT = Path(__file__).resolve().parents[2]

MAX_INPUT = 600       # the test server's --max_input_length
MAX_SEQ = 1024        # its --max_seq_len
IMAGE_LIMIT = 1024 * 28 * 28  # its --image_max_pixels
SMALL_IMAGE = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}


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


def start_server(ckpt: Path, media_dir: Path, log: Path, *extra: str, timeout: float = 90.0) -> LiveServer:
    """Start tools/serve.py and wait (bounded) until /health answers 200."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), "--model_path", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--allowed_media_dir", str(media_dir), "--kv_cache_gb", "0.05",
           "--max_input_length", str(MAX_INPUT), "--max_seq_len", str(MAX_SEQ), "--image_max_pixels", str(IMAGE_LIMIT),
           "--log_level", "warning", *extra]
    with log.open("w") as f:
        process = subprocess.Popen(cmd, cwd=ROOT, env=server_env(), stdout=f, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"server not healthy within {timeout} s:\n{server.log_tail()}")


def stop_server(server: LiveServer, timeout: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL if it does not exit in time; its exit status."""
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
    from serving.metrics import parse_metrics

    return parse_metrics(httpx.get(url + "/metrics", timeout=10).text)


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = (m["qvl_kv_cache_blocks_used"] == 0 and m["qvl_num_requests_running"] == 0
                and m["qvl_num_requests_waiting"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)
