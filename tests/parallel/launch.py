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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (exited, its parent not having reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state follows the command name, which may hold spaces


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: psutil is not a dependency)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_for_exit(procs: list[subprocess.Popen], timeout_s: float, what: str,
                  output: Callable[[list[int]], str]) -> None:
    """Wait until every process has exited 0. A process that exits non-zero fails
    the wait at once (its peers may otherwise block on it in a collective until the timeout), with
    `output(ranks)` for the failed ranks; `timeout_s` only catches a hang, and the failure names the
    ranks still running and how long it waited. Processes left running are killed either way."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c is not None and c != 0]
            if failed:
                raise AssertionError(f"{what}: rank(s) {failed} exited with code(s) {[codes[r] for r in failed]} "
                                     f"(the others were then stopped):\n{output(failed)}")
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                running = [r for r, c in enumerate(codes) if c is None]
                raise AssertionError(f"hang: {what}: rank(s) {running} still running after {timeout_s:.0f} s "
                                     f"(killed):\n{output(list(range(len(procs))))}")
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def run_ranks(script: Path, args: list[str], world: int, log_dir: Path, timeout_s: float,
              env: dict[str, str] | None = None) -> None:
    """Start `world` processes of `script args` and wait for all to exit 0; raise with their logs as
    soon as one fails, or if the job is still running after timeout_s, a hang guard (see wait_for_exit)."""
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

    def tails(ranks: list[int]) -> str:
        return "\n".join(f"--- rank {r} (exit {procs[r].poll()}):\n" + logs[r].read_text(errors="replace")[-3000:]
                         for r in ranks)

    wait_for_exit(procs, timeout_s, f"{world}-rank job of {script.name}", tails)
