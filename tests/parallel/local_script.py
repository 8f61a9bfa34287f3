"""A plain Python process driving tensor-parallel workers it started itself (no launcher), run by
tests/parallel/test_tp_local.py. Prints one JSON line per event (`{"event": ..., ...}`).

    python local_script.py MODE [CKPT]

- lifecycle: one LLM greedy run on a single process, then three LLM(CKPT, tensor_parallel_size=2)
  runs of the same prompt, ended by shutdown(), by garbage collection and by the interpreter's
  exit; after the first two it reports whether their workers still run, before the exit every
  process it started (the worker, multiprocessing's resource tracker).
- kill: an LLM with 2 ranks steps a long request; the driver SIGKILLs its worker between two steps
  and steps on: the error the next step raises, how long it took, the error of the step after.
- orphan: a LocalWorld whose worker sleeps (as if loading a large checkpoint) and a driver that
  sleeps too; the test kills the driver.
- failing: a LocalWorld whose worker raises before following (as a bad checkpoint would); the
  driver's next collective raises.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time

from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.parallel import TPGroup, TPWorldError, barrier
from qwen_vl_triton.parallel.local import LocalWorld
from tests.parallel.launch import children, running

PROMPT = Prompt("Tell me about the sea.")
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
ENGINE = {"device": "cpu", "num_kv_blocks": 64}


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def worker_pids(llm: LLM) -> list[int]:
    return [p.pid for p in llm._world.workers]


def lifecycle(checkpoint: str) -> None:
    say("single", ids=LLM(checkpoint, **ENGINE).generate([PROMPT], GREEDY)[0].outputs[0].token_ids)
    for ending in ("shutdown", "gc", "exit"):
        llm = LLM(checkpoint, tensor_parallel_size=2, **ENGINE)
        pids = worker_pids(llm)
        say("tp", ending=ending, ids=llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids, pids=pids)
        if ending == "shutdown":
            llm.shutdown()
        elif ending == "gc":
            del llm
            gc.collect()
        else:  # the interpreter's exit ends this one: every process this one started is told
            say("children", pids=children(os.getpid()))
            return
        say("ended", ending=ending, running=[pid for pid in pids if running(pid)])


def kill(checkpoint: str) -> None:
    llm = LLM(checkpoint, tensor_parallel_size=2, **ENGINE)
    (pid,) = worker_pids(llm)
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    llm.add_request("long", llm.preprocessor.prepare(PROMPT, long))
    for _ in range(3):
        llm.step()
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    try:
        while llm.has_unfinished():
            llm.step()
    except TPWorldError as e:
        say("failed", pid=pid, error=str(e), seconds=time.monotonic() - started)
    started = time.monotonic()
    try:
        llm.step()
    except TPWorldError as e:
        say("failed again", error=str(e), seconds=time.monotonic() - started)
    llm.shutdown()
    say("shut down")


def sleep_forever(tp: TPGroup) -> None:
    time.sleep(3600)


def fail_to_load(tp: TPGroup) -> None:
    raise RuntimeError(f"injected: rank {tp.rank} cannot read its shard")


def orphan() -> None:
    world = LocalWorld(2, "cpu", sleep_forever)
    say("started", pids=[p.pid for p in world.workers])
    time.sleep(3600)


def failing() -> None:
    world = LocalWorld(2, "cpu", fail_to_load)
    started = time.monotonic()
    try:
        barrier(world.tp)
    except TPWorldError as e:
        say("failed", pid=world.workers[0].pid, error=str(e), seconds=time.monotonic() - started)
    world.close()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode in ("lifecycle", "kill"):
        {"lifecycle": lifecycle, "kill": kill}[mode](sys.argv[2])
    else:
        {"orphan": orphan, "failing": failing}[mode]()
