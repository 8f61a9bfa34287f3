"""One rank of a tensor-parallel engine that tests/parallel/test_tp_faults.py breaks on purpose.

    RANK=r WORLD_SIZE=n LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python fault_script.py CKPT OUT_DIR MODE

Ranks > 0 follow rank 0 in worker_loop. Rank 0, by MODE:
- steps: steps without end (one long greedy request after another), and writes OUT_DIR/ready once
  it has stepped a few times; the test then kills a rank mid-step;
- idle: runs one short request (the world works), writes OUT_DIR/ready and sleeps without
  stepping, so that rank 1 waits in worker_loop for its next command;
- fail1: as steps, but rank 1's third step raises (a fault inside a forward pass, on one rank);
- race: a second thread steps without end while the main thread calls shutdown() (as the server's
  main thread may while its engine thread runs): the only mode that ends well, every rank with 0.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.parallel import destroy, end_process, init_from_env

READY_AFTER_STEPS = 3


def main(checkpoint: str, out_dir: str, mode: str) -> None:
    tp = init_from_env("cpu")
    llm = LLM(checkpoint, device="cpu", num_kv_blocks=64, block_size=16, tp=tp)
    if tp.rank != 0:
        if mode == "fail1":
            step, calls = llm._step, [0]

            def failing_step(work) -> list:
                calls[0] += 1
                if calls[0] == READY_AFTER_STEPS:
                    raise RuntimeError("injected fault in rank 1's step")
                return step(work)

            llm._step = failing_step  # type: ignore[method-assign]
        llm.worker_loop()
        assert mode == "race", "worker_loop returned, but rank 0 shuts down only in the race mode"
        destroy(tp)
        end_process(tp)
    prompt = Prompt("Tell me about the sea.")
    if mode == "idle":
        llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))
        Path(out_dir, "ready").write_text("idle")
        time.sleep(3600)  # no step: rank 1 waits for one (it gets killed long before its timeout)
        raise AssertionError("nobody ended the idle rank 0")
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)  # all the room: ends at max_seq_len
    if mode == "race":
        race(llm, prompt, params)
        destroy(tp)
        end_process(tp)
    steps = 0
    while True:
        if not llm.has_unfinished():
            llm.add_request(f"r{steps}", llm.preprocessor.prepare(prompt, params))
        llm.step()
        steps += 1
        if steps == READY_AFTER_STEPS:
            Path(out_dir, "ready").write_text("steps")


def race(llm: LLM, prompt: Prompt, params: SamplingParams) -> None:
    """shutdown() from this thread while another steps: it lands between two steps, and the
    stepping thread's next step() is refused."""
    refused: list[RuntimeError] = []

    def drive() -> None:
        llm.add_request("long", llm.preprocessor.prepare(prompt, params))
        try:
            while True:
                llm.step()
        except RuntimeError as e:
            refused.append(e)

    driver = threading.Thread(target=drive)
    driver.start()
    while llm.stats.steps < READY_AFTER_STEPS:
        time.sleep(0.01)
    llm.shutdown()
    driver.join()
    assert "step() after shutdown()" in str(refused[0]), refused


if __name__ == "__main__":
    main(*sys.argv[1:4])
