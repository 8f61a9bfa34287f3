"""Tensor-parallel serving: two gloo ranks on the CPU (the environment torchrun would give them),
rank 0 serving HTTP. Same tokens as the one-process server; SIGTERM to rank 0 drains, releases
rank 1 and both exit 0."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import httpx

from tests.serving.conftest import ROOT, free_port, server_env


def test_two_rank_server_matches_one_process(server, serving_ckpt, tmp_path):
    port, master = free_port(), free_port()
    env = {**server_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), "--model_path", str(serving_ckpt), "--port", str(port),
           "--kv_cache_gb", "0.05", "--log_level", "warning"]
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = []
    for rank in range(2):
        with logs[rank].open("w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))

    def tails() -> str:
        return "\n".join(f"--- rank {r}:\n{log.read_text()[-2000:]}" for r, log in enumerate(logs))

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), tails()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        else:
            raise AssertionError(f"tensor-parallel server not healthy in 90 s\n{tails()}")
        body = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 10,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        tp = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        one = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert tp["choices"][0]["token_ids"] == one["choices"][0]["token_ids"]
        assert tp["choices"][0]["message"]["content"] == one["choices"][0]["message"]["content"]
        procs[0].send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in procs] == [0, 0], tails()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
