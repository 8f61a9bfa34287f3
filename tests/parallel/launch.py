"""Run a script as `world` ranks of a torch.distributed job on 127.0.0.1 (gloo), bounded in time.

The environment is what torchrun gives each process (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so parallel.init_from_env is exercised as under
torchrun, without the launcher's own start-up cost.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, args: list[str], world: int, log_dir: Path, timeout_s: float,
              env: dict[str, str] | None = None) -> None:
    """Start `world` processes of `script args`, wait for all; raise with their logs if any fails
    or the whole job passes timeout_s (every process is killed then)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONPATH": str(ROOT), **(env or {})}
    procs, logs = [], []
    for rank in range(world):
        log = log_dir / f"rank{rank}.log"
        logs.append(log)
        with log.open("w") as f:
            procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, stdout=f,
                                          stderr=subprocess.STDOUT,
                                          env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r} (exit {rc}):\n" + logs[r].read_text()[-3000:] for r, rc in failed)
        raise AssertionError(f"{world}-rank job of {script.name} failed or passed {timeout_s} s:\n{tails}")
