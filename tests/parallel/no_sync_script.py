"""One rank of the tensor-parallel no-sync check, launched by tests/parallel/test_tp_engine.py.

    RANK=r WORLD_SIZE=n ... python no_sync_script.py CKPT ARCH OUT_DIR

Every rank applies the same requests and runs the same steps (as a worker follows rank 0's
broadcasts, without the broadcasts), then runs one decode step's model forward under
tests.engine.test_no_sync's HostSyncGuard on the Triton kernel path, its collectives pairing with
the other ranks'; writes OUT_DIR/rank{r}.json with the ops seen and the logits' shape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qwen_vl_triton.engine.commands import Add, StepPlan
from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media_encoder import EncodeWork
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.parallel import destroy, end_process, init_from_env
from tests.engine.test_no_sync import guarded_forward


def main(checkpoint: str, out_dir: str) -> None:
    tp = init_from_env("cpu")
    llm = LLM(checkpoint, device="cpu", num_kv_blocks=64, tp=tp)
    for i, text in enumerate(["hi", "Tell me a story about the sea.", "Name three colours."]):
        request = llm.preprocessor.prepare(Prompt(text), SamplingParams(max_tokens=8, ignore_eos=True, temperature=0))
        llm._apply(Add(f"r{i}", request))
    idle = StepPlan(EncodeWork(), None)
    while not all(len(s.output_ids) >= 2 for s in llm.sequences.values()):
        llm._step(idle)
    batch = llm.scheduler.schedule()
    ops, logits = guarded_forward(llm, batch)
    Path(out_dir, f"rank{tp.rank}.json").write_text(json.dumps(
        {"ops": ops, "runs": [r.count for r in batch.runs], "logits": list(logits.shape)}))
    destroy(tp)
    end_process(tp)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
