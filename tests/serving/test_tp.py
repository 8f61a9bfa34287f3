"""Tensor-parallel serving: two gloo ranks on the CPU (the environment torchrun would give them),
rank 0 serving HTTP. Same tokens as the one-process server; SIGTERM to rank 0 drains, releases
rank 1 and both exit 0. Without a launcher, `--tensor_parallel_size 2`: the server starts its
worker itself, serves the same tokens, and SIGTERM ends every process it started within 30 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.parallel.launch import children, running, wait_for_exit
from tests.serving.conftest import (
    REQUEST_TIMEOUT_S,
    ROOT,
    SHUTDOWN_TIMEOUT_S,
    free_port,
    server_env,
    start_server,
    stop_server,
    wait_healthy,
)

SIGTERM_BOUND_S = 30.0  # the bound: SIGTERM ends the server and every process it started within it


def post_while_running(url: str, body: dict, procs: list[subprocess.Popen], output: Callable[[], str]) -> dict:
    """POST and return the JSON answer, failing at once (with the ranks' output) if a rank exits
    meanwhile: rank 0 would otherwise wait in a collective on a dead rank 1 until the request timed out."""
    pool = ThreadPoolExecutor(1)
    try:
        answer = pool.submit(httpx.post, url, json=body, timeout=REQUEST_TIMEOUT_S)
        while True:
            try:
                return answer.result(timeout=0.1).json()
            except TimeoutError:  # still waiting: are both ranks alive?
                dead = [(r, p.returncode) for r, p in enumerate(procs) if p.poll() is not None]
                if dead:
                    raise AssertionError(f"rank(s) exited (rank, code) {dead} during a request:\n{output()}") from None
    finally:
        pool.shutdown(wait=False)  # on failure the caller kills the ranks, which ends the request


def start_two_rank_server(ckpt: Path, log_dir: Path, *extra: str
                          ) -> tuple[str, list[subprocess.Popen], Callable[..., str]]:
    """tools/serve.py as 2 gloo ranks (rank 0 serving on a free port, rank 1 following), healthy:
    (its URL, the rank processes, a function of rank indices giving their output's tails)."""
    port, master = free_port(), free_port()
    env = {**server_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), "--model_path", str(ckpt), "--port", str(port),
           "--kv_cache_gb", "0.05", "--log_level", "warning", *extra]
    logs = [log_dir / f"rank{r}.log" for r in range(2)]
    procs = []
    for rank in range(2):
        with logs[rank].open("w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))

    def tails(ranks: Sequence[int] = (0, 1)) -> str:
        return "\n".join(f"--- rank {r} (exit {procs[r].poll()}):\n{logs[r].read_text(errors='replace')[-2000:]}"
                         for r in ranks)

    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, procs, "the 2-rank server (rank 0 serving, rank 1 following)", tails)
    except BaseException:
        kill_all(procs)
        raise
    return url, procs, tails


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def stop_two_rank_server(procs: list[subprocess.Popen], tails: Callable[..., str]) -> None:
    """SIGTERM to rank 0: both ranks exit 0 (a rank that fails ends the wait at once, one that hangs
    after SHUTDOWN_TIMEOUT_S)."""
    procs[0].send_signal(signal.SIGTERM)
    wait_for_exit(procs, SHUTDOWN_TIMEOUT_S, "the 2-rank server after SIGTERM to rank 0", tails)


def test_two_rank_server_matches_one_process(server, serving_ckpt, tmp_path):
    url, procs, tails = start_two_rank_server(serving_ckpt, tmp_path)
    try:
        body = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 10,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        tp = post_while_running(url + "/v1/chat/completions", body, procs, tails)
        one = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S).json()
        assert tp["choices"][0]["token_ids"] == one["choices"][0]["token_ids"]
        assert tp["choices"][0]["message"]["content"] == one["choices"][0]["message"]["content"]
        stop_two_rank_server(procs, tails)
    finally:
        kill_all(procs)


def test_server_starting_its_own_worker_matches_one_process(server, serving_ckpt, media_dir, tmp_path):
    tp_server = start_server(serving_ckpt, media_dir, tmp_path / "server.log", "--tensor_parallel_size", "2")
    started = children(tp_server.process.pid)  # the worker (and multiprocessing's resource tracker)
    try:
        assert started, f"the server started no process:\n{tp_server.log_tail()}"
        body = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 10,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        tp = post_while_running(tp_server.url + "/v1/chat/completions", body, [tp_server.process], tp_server.log_tail)
        one = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S).json()
        assert tp["choices"][0]["token_ids"] == one["choices"][0]["token_ids"]
        assert tp["choices"][0]["message"]["content"] == one["choices"][0]["message"]["content"]
        sigterm = time.monotonic()
        assert stop_server(tp_server, timeout=SIGTERM_BOUND_S) == 0, tp_server.log_tail()
        while left := [pid for pid in started if running(pid)]:
            assert time.monotonic() - sigterm < SIGTERM_BOUND_S, f"still running after SIGTERM: {left}"
            time.sleep(0.1)
    finally:
        stop_server(tp_server, timeout=10)
        for pid in started:  # whatever failed above, nothing is left running (the worker ignores SIGTERM)
            if running(pid):
                os.kill(pid, signal.SIGKILL)
