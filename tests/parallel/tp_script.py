"""One rank of a tensor-parallel engine run, launched by tests/parallel/test_tp_engine.py.

    RANK=r WORLD_SIZE=n LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tp_script.py CKPT OUT_DIR [tight]

Rank 0 drives the LLM by hand (add_request / step / abort, a request added between steps, one
aborted mid-run), the others follow in worker_loop; every rank writes what it saw to
OUT_DIR/rank{r}.json (finished outputs, free KV blocks, preemptions, cache and embedding shapes).
A video (sent as bytes, so rank 0 holds it in a temporary file) is encoded a few temporal slices
per step, its frames shipped by rank 0, and prompts are chunked by rank 0's timings (its
StepPlan); the other ranks' video decoder raises, so a rank > 0 that read a file would fail the
run. A clip whose frames do not decode ends alone, on every rank.
`tight`: a KV cache of 8 blocks and a prefill budget of 23 tokens per step, which force
preemption (and recompute) and chunked prefill (steps in which no sequence samples).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qwen_vl_triton.engine.llm import LLM, Prompt, RequestOutput
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.outputs import CompletionOutput
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.engine.structured import StructuredOutput
from qwen_vl_triton.modeling import processing
from qwen_vl_triton.modeling.processing import SAMPLE_IMAGE_PATH, SAMPLE_VIDEO_PATH
from qwen_vl_triton.parallel import destroy, end_process, init_from_env

IMAGE = {"min_pixels": 16 * 28 * 28, "max_pixels": 36 * 28 * 28}  # 4x4 .. 6x6 merged tokens: 1-4 windows
VIDEO = {"nframes": 8, "min_pixels": 16 * 28 * 28, "max_pixels": 24 * 28 * 28}  # 4 temporal slices


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 22]}},
          "required": ["ok", "n"], "additionalProperties": False}
REQUESTS = [
    ("image", Prompt("What is in this picture?", [Media(SAMPLE_IMAGE_PATH, options=IMAGE)]), greedy(6)),
    ("text", Prompt("Tell me a story about the sea."), greedy(5)),
    ("seeded", Prompt("hi"), SamplingParams(max_tokens=5, temperature=1.0, top_k=50, seed=7, ignore_eos=True)),
    ("unseeded", Prompt("Name three colours."), SamplingParams(max_tokens=4, temperature=0.8, ignore_eos=True)),
    ("aborted", Prompt("Count to ten."), greedy(50)),
    # 3 samples sharing the prompt's blocks, and a JSON constraint: every rank forks and masks alike
    ("samples", Prompt("Name a colour."), SamplingParams(max_tokens=4, temperature=1.0, seed=11, n=3,
                                                          ignore_eos=True)),
    ("json", Prompt("Answer in JSON."), SamplingParams(max_tokens=40, temperature=1.0, seed=3,
                                                       structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))),
]
VIDEO_REQUEST = ("video", Prompt("What happens in the clip?", [
    Media(SAMPLE_VIDEO_PATH.read_bytes(), kind="video", options=VIDEO)]), greedy(5))
LATE = ("late", Prompt("Describe it.", [Media(SAMPLE_IMAGE_PATH, options=IMAGE)]), greedy(4))  # after step 1


def main(checkpoint: str, out_dir: str, tight: bool) -> None:
    tp = init_from_env("cpu")
    num_blocks = 8 if tight else 64
    # 2 temporal slices per vision call at most: the clip takes several steps' work. Not tight: prompt
    # tokens bounded by rank 0's timings while others decode, and every rank must follow its budget.
    llm = LLM(checkpoint, device="cpu", num_kv_blocks=num_blocks, block_size=16, tp=tp,
              max_prefill_tokens=23 if tight else 8192, vision_chunk_patches=2 * 8 * 12,
              prefill_step_share=None if tight else 0.5)
    finished: dict[str, CompletionOutput] = {}

    def collect(outputs: list[RequestOutput]) -> None:
        # the n samples of a request as request_id, request_id#1, ...
        finished.update({o.request_id + (f"#{s.index}" if s.index else ""): s
                         for o in outputs if o.finished for s in o.outputs})

    if tp.rank == 0:
        from tests.engine.test_isolation import undecodable_video

        corrupt = Prompt("And this one?", [Media(undecodable_video(Path(out_dir, "corrupt.mp4"), "mpeg4", 3),
                                                 options=VIDEO)])
        for request_id, prompt, params in [*REQUESTS, VIDEO_REQUEST, ("corrupt", corrupt, greedy(5))]:
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
        def no_decoding(*args, **kwargs):
            raise AssertionError(f"rank {tp.rank} decoded a video: only rank 0 reads media")

        processing.iter_video_frames = no_decoding
        llm.worker_loop(collect)
    report = {
        "rank": tp.rank, "world_size": tp.world_size,
        "outputs": {k: {"ids": o.token_ids, "logprobs": o.token_logprobs, "finish_reason": o.finish_reason,
                        "text": o.text,
                        "error": repr(o.error) if o.error is not None else None}
                    for k, o in sorted(finished.items())},
        "all_blocks_free": llm.blocks.num_free_blocks == llm.blocks.num_blocks == num_blocks,
        "preemptions": llm.scheduler.num_preemptions,
        "kv_cache_shape": list(llm.runner.kv_caches[0][0].shape),
        "embed_rows": llm.model.weights.language.embed_tokens.shape[0],
    }
    Path(out_dir, f"rank{tp.rank}.json").write_text(json.dumps(report))
    destroy(tp)
    end_process(tp)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], tight=sys.argv[3:] == ["tight"])
