"""One rank of a tensor-parallel engine run, launched by tests/parallel/test_tp_engine.py.

    RANK=r WORLD_SIZE=n LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tp_script.py CKPT OUT_DIR [tight]

Rank 0 drives the LLM by hand (add_request / step / abort, a request added between steps, one
aborted mid-run), the others follow in worker_loop; every rank writes what it saw to
OUT_DIR/rank{r}.json (finished outputs, free KV blocks, preemptions, cache and embedding shapes).
`tight`: a KV cache of 8 blocks and a prefill budget of 23 tokens per step, which force
preemption (and recompute) and chunked prefill (steps in which no sequence samples).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.llm import LLM, Prompt, RequestOutput  # noqa: E402
from engine.media import Media  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from modeling.processing import SAMPLE_IMAGE_PATH  # noqa: E402
from parallel import destroy, init_from_env  # noqa: E402

IMAGE = {"min_pixels": 16 * 28 * 28, "max_pixels": 36 * 28 * 28}  # 4x4 .. 6x6 merged tokens: 1-4 windows


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


REQUESTS = [
    ("image", Prompt("What is in this picture?", [Media(SAMPLE_IMAGE_PATH, options=IMAGE)]), greedy(6)),
    ("text", Prompt("Tell me a story about the sea."), greedy(5)),
    ("seeded", Prompt("hi"), SamplingParams(max_tokens=5, temperature=1.0, top_k=50, seed=7, ignore_eos=True)),
    ("unseeded", Prompt("Name three colours."), SamplingParams(max_tokens=4, temperature=0.8, ignore_eos=True)),
    ("aborted", Prompt("Count to ten."), greedy(50)),
]
LATE = ("late", Prompt("Describe it.", [Media(SAMPLE_IMAGE_PATH, options=IMAGE)]), greedy(4))  # after step 1


def main(checkpoint: str, out_dir: str, tight: bool) -> None:
    tp = init_from_env("cpu")
    num_blocks = 8 if tight else 64
    llm = LLM(checkpoint, device="cpu", num_kv_blocks=num_blocks, block_size=16, tp=tp,
              max_prefill_tokens=23 if tight else 8192)
    finished: dict[str, RequestOutput] = {}

    def collect(outputs: list[RequestOutput]) -> None:
        finished.update({o.request_id: o for o in outputs if o.finished})

    if tp.rank == 0:
        for request_id, prompt, params in REQUESTS:
            llm.add_request(request_id, llm.preprocessor.prepare(prompt, params))
        steps = 0
        while llm.has_unfinished():
            collect(llm.step())
            steps += 1
            if steps == 1:
                llm.add_request(LATE[0], llm.preprocessor.prepare(*LATE[1:]))
            if steps == 2:
                assert llm.abort("aborted")
        llm.shutdown()
    else:
        llm.worker_loop(collect)
    report = {
        "rank": tp.rank, "world_size": tp.world_size,
        "outputs": {k: {"ids": o.output_ids, "logprobs": o.output_logprobs, "finish_reason": o.finish_reason}
                    for k, o in sorted(finished.items())},
        "all_blocks_free": llm.blocks.num_free_blocks == llm.blocks.num_blocks == num_blocks,
        "preemptions": llm.scheduler.num_preemptions,
        "kv_cache_shape": list(llm.kv_caches[0][0].shape),
        "embed_rows": llm.model.weights.language.embed_tokens.shape[0],
    }
    Path(out_dir, f"rank{tp.rank}.json").write_text(json.dumps(report))
    destroy(tp)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], tight=sys.argv[3:] == ["tight"])
