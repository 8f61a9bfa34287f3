"""Tensor-parallel faults end the world, never hang it: when one of two gloo ranks on the CPU dies,
freezes or fails, the other exits with status 1 within 60 s (the issue's bound), saying which
rank it is and which peer it lost.

The engine cases run tests/parallel/fault_script.py (rank 0 stepping, or idle in the middle of a
run); the server cases run tools/serve.py as test_tp does (rank 0 serving HTTP, idle: its engine
thread steps every tp.heartbeat_s so that rank 1's wait for the next command never times out).
The 60 s bound is generous: a killed peer closes its connections, and the survivor's next
collective fails at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qwen_vl_triton.parallel.group import (
    DEFAULT_TIMEOUT_S,
    MAX_HEARTBEAT_S,
    SINGLE_PROCESS,
    TIMEOUT_ENV,
    TPGroup,
    init_from_env,
)
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.parallel.launch import ROOT, free_port, run_ranks
from tests.serving.conftest import server_env, wait_healthy

SCRIPT = Path(__file__).with_name("fault_script.py")
EXIT_BOUND_S = 60.0  # the bound on how long a rank may outlive its peer's fault
# Hang guards, not speed limits: loading two ranks on 2 loaded cores.
STARTUP_GUARD_S = 600.0


def fault_line(rank: int) -> str:
    return f"tensor parallel: rank {rank} of 2 exits (status 1): "


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp-faults"), "qwen2_5_vl", seed=3)


class Ranks:
    """Two ranks of a command, their logs, and the clean-up that kills what is left."""

    def __init__(self, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None):
        base = {**server_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT), **(env or {})}
        self.logs = [log_dir / f"rank{r}.log" for r in range(2)]
        self.procs: list[subprocess.Popen] = []
        for rank, log in enumerate(self.logs):
            with log.open("w") as f:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                                   env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def output(self) -> str:
        return "\n".join(f"--- rank {r} (exit {p.poll()}):\n{self.log(r)[-3000:]}" for r, p in enumerate(self.procs))

    def wait_for(self, ready: Callable[[], bool], what: str, exits_fail: bool = True) -> None:
        """Until ready(); fails at once if a rank exits first (unless not exits_fail), and after
        STARTUP_GUARD_S (a hang)."""
        deadline = time.monotonic() + STARTUP_GUARD_S
        while not ready():
            exited = [(r, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None]
            assert not (exits_fail and exited), f"rank(s) exited (rank, code) {exited} before {what}:\n{self.output()}"
            assert time.monotonic() < deadline, f"hang: no {what} after {STARTUP_GUARD_S:.0f} s:\n{self.output()}"
            time.sleep(0.1)

    def survivor_exit(self, survivor: int, since: float, what: str) -> float:
        """Seconds from `since` until rank `survivor` exited (EXIT_BOUND_S at most: then a hang); asserts status 1."""
        try:
            code = self.procs[survivor].wait(max(0.0, since + EXIT_BOUND_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"hang: rank {survivor} still running {EXIT_BOUND_S:.0f} s after {what}:\n"
                                 f"{self.output()}") from None
        took = time.monotonic() - since
        assert code == 1, f"rank {survivor} exited with {code} after {what}:\n{self.output()}"
        print(f"rank {survivor} exited {took:.1f} s after {what}")
        return took

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def launch() -> Iterator[Callable[..., Ranks]]:
    started: list[Ranks] = []

    def start(cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Ranks:
        started.append(Ranks(cmd, log_dir, env))
        return started[-1]

    yield start
    for ranks in started:
        ranks.kill()


def engine(launch: Callable[..., Ranks], checkpoint: Path, out: Path, mode: str) -> Ranks:
    out.mkdir()
    ranks = launch([sys.executable, str(SCRIPT), str(checkpoint), str(out), mode], out)
    if mode != "fail1":
        ranks.wait_for((out / "ready").exists, f"rank 0 {'stepping' if mode == 'steps' else 'idle'}")
    return ranks


def server(launch: Callable[..., Ranks], checkpoint: Path, out: Path, env: dict[str, str] | None = None
           ) -> tuple[Ranks, str]:
    out.mkdir()
    port = free_port()
    cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), "--model_path", str(checkpoint), "--port", str(port),
           "--kv_cache_gb", "0.05", "--log_level", "warning"]
    ranks = launch(cmd, out, env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, ranks.procs, "the 2-rank server", ranks.output, STARTUP_GUARD_S)
    return ranks, url


# ---------------------------------------------------------------------------- the engine, by hand


def test_rank1_killed_while_rank0_steps(launch, checkpoint, tmp_path):
    ranks = engine(launch, checkpoint, tmp_path / "run", "steps")
    ranks.procs[1].kill()
    ranks.survivor_exit(0, time.monotonic(), "rank 1 was killed mid-step")
    assert fault_line(0) in ranks.log(0) and "rank 1 exited, failed, or did not answer" in ranks.log(0), ranks.output()


def test_rank0_killed_while_rank1_waits_for_a_command(launch, checkpoint, tmp_path):
    ranks = engine(launch, checkpoint, tmp_path / "run", "idle")
    ranks.procs[0].kill()
    ranks.survivor_exit(1, time.monotonic(), "rank 0 was killed")
    assert fault_line(1) + "waiting for rank 0's next message failed: rank 0 exited" in ranks.log(1), ranks.output()


def test_a_step_that_fails_on_one_rank_ends_both(launch, checkpoint, tmp_path):
    """Rank 1's step raises: it cannot stay in lockstep, so it exits (with the traceback), and
    rank 0, whose collectives it left, follows."""
    ranks = engine(launch, checkpoint, tmp_path / "run", "fail1")
    ranks.wait_for(lambda: any(p.poll() is not None for p in ranks.procs), "a rank's exit", exits_fail=False)
    assert ranks.procs[1].poll() is not None, f"rank 0 exited before the failing rank 1:\n{ranks.output()}"
    ranks.survivor_exit(0, time.monotonic(), "rank 1's step failed")
    assert ranks.procs[1].returncode == 1, ranks.output()
    assert fault_line(1) + "following rank 0's step failed here: RuntimeError: injected fault" in ranks.log(1)
    assert "Traceback" in ranks.log(1), ranks.output()
    assert fault_line(0) in ranks.log(0) and "rank 1 exited" in ranks.log(0), ranks.output()


def test_shutdown_from_another_thread_lands_between_steps(checkpoint, tmp_path):
    """The server's main thread may shut down while its engine thread still steps: the broadcasts
    never interleave, rank 1 leaves its loop and both ranks exit 0."""
    run_ranks(SCRIPT, [str(checkpoint), str(tmp_path), "race"], 2, tmp_path, STARTUP_GUARD_S,
              env={"QVL_KERNELS": "torch"})


# ---------------------------------------------------------------------------- the server


def test_rank1_killed_while_rank0_serves(launch, checkpoint, tmp_path):
    """Rank 0's engine thread notices at its next (idle) step and ends the whole server process."""
    ranks, _ = server(launch, checkpoint, tmp_path / "run")
    ranks.procs[1].kill()
    ranks.survivor_exit(0, time.monotonic(), "rank 1 was killed while rank 0 served")
    assert fault_line(0) + "sending to the other ranks failed: rank 1 exited" in ranks.log(0), ranks.output()


def test_frozen_rank0_times_out_and_idle_heartbeats_do_not(launch, checkpoint, tmp_path):
    """With a 12 s timeout, an idle server keeps rank 1 waiting well past it (rank 0 steps every
    3 s); once rank 0 is frozen (SIGSTOP: alive, connections open), rank 1 times out."""
    timeout = 12
    ranks, _ = server(launch, checkpoint, tmp_path / "run", {TIMEOUT_ENV: str(timeout)})
    idle_until = time.monotonic() + timeout * 1.5
    ranks.wait_for(lambda: time.monotonic() > idle_until, f"{timeout * 1.5:.0f} s of idle serving")
    os.kill(ranks.procs[0].pid, signal.SIGSTOP)
    ranks.survivor_exit(1, time.monotonic(), "rank 0 was frozen")
    log = ranks.log(1)
    assert fault_line(1) + "waiting for rank 0's next message failed: rank 0 exited, failed, or did not answer " \
        f"within the {timeout} s timeout ({TIMEOUT_ENV})" in log, ranks.output()


# ---------------------------------------------------------------------------- the settings


def test_timeout_setting(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert init_from_env("cpu").timeout_s == DEFAULT_TIMEOUT_S
    monkeypatch.setenv(TIMEOUT_ENV, "42.5")
    assert init_from_env("cpu").timeout_s == 42.5
    assert init_from_env("cpu", timeout_s=7).timeout_s == 7  # the argument wins
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=TIMEOUT_ENV):
        init_from_env("cpu")
    with pytest.raises(ValueError, match="timeout"):
        TPGroup(timeout_s=0)


def test_heartbeat_well_inside_the_timeout():
    assert SINGLE_PROCESS.heartbeat_s == float("inf")  # one process: nobody waits
    assert TPGroup(rank=1, world_size=2, timeout_s=DEFAULT_TIMEOUT_S).heartbeat_s == MAX_HEARTBEAT_S
    assert TPGroup(rank=0, world_size=2, timeout_s=8).heartbeat_s == 2
