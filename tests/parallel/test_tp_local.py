"""Tensor parallelism without a launcher: LLM(path, tensor_parallel_size=2) in a plain Python process
starts its worker itself (parallel.local), gives the single-process tokens, and no process it
started outlives it, whichever way it ends: shutdown(), garbage collection, the interpreter's exit,
the driver killed. A worker that dies makes the driver raise at once, naming it; nothing hangs.

The drivers are tests/parallel/local_script.py, as subprocesses (QVL_KERNELS=torch, as the other
tensor-parallel tests: what is under test is the processes, not the kernels). The server's case,
`tools/serve.py --tensor_parallel_size 2`, is in tests/serving/test_tp.py, beside the
single-process server it compares with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_vl_triton.cli.serve import parse_args as parse_serve_args
from qwen_vl_triton.engine.llm import LLM
from qwen_vl_triton.parallel import TPGroup
from qwen_vl_triton.parallel.local import LocalWorld
from qwen_vl_triton.serving.config import build_config
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.parallel.launch import ROOT, running

SCRIPT = Path(__file__).with_name("local_script.py")
# Hang guards, not speed limits: each run takes seconds; a bound only ends a driver that hangs.
RUN_GUARD_S = 300.0
GONE_WITHIN_S = 10.0  # an orphaned worker polls its parent every second (parallel.local.PARENT_POLL_S)
EXITED_WITHIN_S = 60.0  # the bound: no process a driver started runs 60 s after it returned
FAULT_BOUND_S = 10.0  # how long a driver may take to raise once its worker died (it is noticed at once)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp-local"), "qwen2_5_vl", seed=3)


def env() -> dict[str, str]:
    return {**os.environ, "QVL_KERNELS": "torch", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1"}


def run(*args: str, script: Path = SCRIPT, returncode: int = 0) -> tuple[list[dict], str]:
    """Run a driver script (local_script.py) to its end; it must exit with `returncode`. Its events
    (JSON lines) and its stderr."""
    try:
        done = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env(), capture_output=True,
                              text=True, timeout=RUN_GUARD_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"hang: {script.name} {' '.join(args)} still running after {RUN_GUARD_S:.0f} s:\n"
                             f"{e.stdout}\n{e.stderr}") from None
    assert done.returncode == returncode, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")], done.stderr


def wait_gone(pids: list[int], within_s: float) -> float:
    """Seconds until none of `pids` runs; fails after within_s."""
    started = time.monotonic()
    while alive := [pid for pid in pids if running(pid)]:
        assert time.monotonic() - started < within_s, f"processes {alive} still running after {within_s:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - started


def test_same_tokens_and_no_worker_outlives_shutdown_gc_or_exit(checkpoint):
    events, _ = run("lifecycle", str(checkpoint))
    single = next(e["ids"] for e in events if e["event"] == "single")
    runs = {e["ending"]: e for e in events if e["event"] == "tp"}
    assert set(runs) == {"shutdown", "gc", "exit"}
    for ending, tp in runs.items():
        assert tp["ids"] == single, ending
        assert len(tp["pids"]) == 1 and tp["pids"][0] != os.getpid(), ending
    ended = {e["ending"]: e["running"] for e in events if e["event"] == "ended"}
    assert ended == {"shutdown": [], "gc": []}  # both close() and join the workers before returning
    # The interpreter's exit (no shutdown, no del): the driver ended and reaped its worker before exiting,
    # and nothing else it started outlives it (multiprocessing's resource tracker ends as its pipe closes).
    assert not running(runs["exit"]["pids"][0])
    (started,) = [e["pids"] for e in events if e["event"] == "children"]
    assert runs["exit"]["pids"][0] in started
    wait_gone(started, EXITED_WITHIN_S)


def test_a_killed_worker_fails_the_driver_at_once_and_for_good(checkpoint):
    events, _ = run("kill", str(checkpoint))
    failed, again = (next(e for e in events if e["event"] == name) for name in ("failed", "failed again"))
    assert f"worker rank 1 (pid {failed['pid']}) was killed by SIGKILL" in failed["error"], failed
    assert "this LLM cannot run any more" in failed["error"]
    assert failed["seconds"] < FAULT_BOUND_S, failed
    assert again["error"] == failed["error"] and again["seconds"] < 0.5, again
    assert any(e["event"] == "shut down" for e in events)
    assert not running(failed["pid"])


def test_a_worker_that_fails_to_load_is_named_with_its_error():
    events, _ = run("failing")
    (failed,) = [e for e in events if e["event"] == "failed"]
    assert f"worker rank 1 (pid {failed['pid']}) exited with status 1: RuntimeError: injected: rank 1 cannot read " \
        "its shard" in failed["error"], failed
    assert failed["seconds"] < FAULT_BOUND_S, failed


def test_a_worker_that_dies_before_joining_fails_the_driver_at_once(tmp_path):
    """A script without the `__main__` guard: spawn runs it again in the worker, whose own start
    fails before it joins. The driver raises at once (not after the group's 600 s timeout), with the hint."""
    script = tmp_path / "unguarded.py"
    script.write_text("from qwen_vl_triton.parallel.local import LocalWorld\nLocalWorld(2, 'cpu', print)\n")
    _, stderr = run(script=script, returncode=1)
    assert "TPWorldError: tensor parallel: worker rank 1 (pid " in stderr, stderr
    assert 'before joining the world. If this process runs a script, its work must be under `if __name__ == ' \
        '"__main__":`' in stderr, stderr


def test_workers_of_a_killed_driver_exit(tmp_path):
    """The worker is not in a collective (it sleeps, as while loading a large checkpoint): it exits
    by noticing that its parent is gone."""
    log = tmp_path / "driver.log"
    with log.open("w") as f:
        driver = subprocess.Popen([sys.executable, str(SCRIPT), "orphan"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                  stderr=f, text=True)
    try:
        line = driver.stdout.readline()  # blocks until the world is up (or the driver exits: "")
        assert line, f"the driver exited with {driver.wait()} before starting its worker:\n{log.read_text()}"
        pids = json.loads(line)["pids"]
        assert all(running(pid) for pid in pids)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        wait_gone(pids, GONE_WITHIN_S)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)


# ---------------------------------------------------------------------------- the settings


def test_mindie_world_size_is_the_engines_tensor_parallel_size(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"BackendConfig": {"ModelDeployConfig": {"ModelConfig": [
        {"modelWeightPath": str(tmp_path), "worldSize": 2}]}}}))
    cfg, _ = build_config(parse_serve_args(["--config", str(config)]))
    assert cfg.engine.tensor_parallel_size == 2
    assert not hasattr(cfg, "world_size")  # one place decides the world size: the engine's config
    cfg, _ = build_config(parse_serve_args(["--config", str(config), "--tensor_parallel_size", "1"]))
    assert cfg.engine.tensor_parallel_size == 1  # the flag wins over the file


def test_a_tensor_parallel_size_other_than_the_launchers_is_an_error(checkpoint, monkeypatch):
    launched = TPGroup(rank=0, world_size=2)  # as init_from_env gives rank 0 under torchrun --nproc-per-node 2
    with pytest.raises(ValueError, match=r"tensor_parallel_size is 4, but this process is rank 0 of a world of 2 "
                                         r"that its launcher started \(torchrun --nproc-per-node 2\)"):
        LLM(checkpoint, tp=launched, tensor_parallel_size=4)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        LocalWorld(1, "cpu", print)
    # torchrun's environment but no tp handed in: no workers are started beside the launcher's ranks
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2: this process is a rank of a launcher's world"):
        LLM(checkpoint, tensor_parallel_size=2)
