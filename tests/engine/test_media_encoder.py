"""Media work does not stall the running streams: a video is decoded on a background thread, ahead
of need and in bounded memory, and encoded over several steps (each step's share bounded) while the
other requests keep getting a token every step; the embeddings, and so the tokens, are those of
encoding the clip at once; an aborted request stops its decoding and frees what it held."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qwen_vl_triton.engine import media as media_module
from qwen_vl_triton.engine.frame_stream import FrameStream
from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.testing.media import write_synthetic_video

# 24 frames -> 12 temporal slices of 4 x 4 patches (16 patches, 4 merged tokens) each.
CLIP_OPTIONS = {"nframes": 24, "min_pixels": 4 * 784, "max_pixels": 4 * 784}
SLICES, SLICE_PATCHES = 12, 16


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_synthetic_video(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=6.0, fps=10, width=70,
                                 height=50)


def video_prompt(clip) -> Prompt:
    return Prompt("What happens in the clip?", [Media(clip, options=CLIP_OPTIONS)])


def record_work(llm: LLM) -> list:
    """Every step's EncodeWork, in order (the encoder's run is wrapped, not changed)."""
    seen = []
    run = llm.encoder.run

    def recording(work):
        seen.append(work)
        return run(work)

    llm.encoder.run = recording
    return seen


def slices_of(work, llm: LLM) -> int:
    return sum(len(v.frames) // llm.image_cfg.temporal_patch_size for v in work.videos)


def test_a_clip_is_encoded_over_steps_while_the_streams_decode(tiny_checkpoint, clip):
    alone = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128).generate([video_prompt(clip)], greedy(6))[0]

    # A tiny share: every step with streams running encodes the least it can, one temporal slice.
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128, vision_step_share=1e-6)
    for i in range(2):  # long enough to outlast the clip's admission however slowly its frames decode
        llm.add_request(f"text{i}", llm.preprocessor.prepare(Prompt(f"Tell me story {i}."), greedy(1000)))
    while not all(llm.sequences[f"text{i}"].output_ids for i in range(2)):
        llm.step()
    work = record_work(llm)
    llm.add_request("video", llm.preprocessor.prepare(video_prompt(clip), greedy(6)))
    video = llm.sequences["video"]
    steps = 0
    while not video.output_ids:
        before = [len(llm.sequences[f"text{i}"].output_ids) for i in range(2)]
        llm.step()
        steps += 1
        # Every step gives every running stream its token: none waits for the clip's media work.
        assert [len(llm.sequences[f"text{i}"].output_ids) for i in range(2)] == [b + 1 for b in before]
    encoding = [w for w in work if w.videos]
    assert [slices_of(w, llm) for w in encoding] == [1] * SLICES  # spread over 12 steps, one slice each
    assert steps > SLICES
    for i in range(2):
        llm.abort(f"text{i}")
    while llm.has_unfinished():
        llm.step()
    assert video.output_ids == alone.outputs[0].token_ids  # the same embeddings as one pass over the clip
    assert llm.blocks.num_used_blocks() == 0 and not llm.encoder.jobs


def test_an_idle_engine_encodes_whole_chunks(tiny_checkpoint, clip):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128, vision_chunk_patches=4 * SLICE_PATCHES)
    work = record_work(llm)
    out = llm.generate([video_prompt(clip)], greedy(3))[0]
    slices = [slices_of(w, llm) for w in work if w.videos]
    assert sum(slices) == SLICES and max(slices) <= 4 and len(slices) >= 3
    assert len(out.outputs[0].token_ids) == 3


def test_frames_are_decoded_off_the_calling_thread_in_bounded_memory(tiny_checkpoint, clip, monkeypatch):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=8)
    prepared = llm.preprocessor.prepare_media(Media(clip, options=CLIP_OPTIONS))
    expected = np.concatenate(list(prepared.frame_slices(SLICES)))  # the synchronous decode, all at once
    decoded: list[str] = []  # the thread that decoded each slice
    original = media_module.processing.iter_video_frames

    def watched(plan, chunk_frames):
        for frames in original(plan, chunk_frames):
            decoded.append(threading.current_thread().name)
            yield frames

    monkeypatch.setattr(media_module.processing, "iter_video_frames", watched)
    stream = FrameStream(prepared, max_slices=3)
    # The thread holds a decoded slice the full queue has no room for: it decodes nothing more until
    # a slice is taken, and by then it has decoded the 3 queued slices and the one it holds.
    assert stream.waiting_for_room.wait(30)
    assert len(decoded) == 4
    assert set(decoded) == {decoded[0]} and decoded[0] != threading.current_thread().name
    taken: list[np.ndarray] = []  # frames, 2 (temporal_patch_size) per slice
    while len(taken) < 2 * SLICES:
        frames = stream.take(5, timeout=10)
        assert frames is not None and len(frames) <= 5 * 2
        taken.extend(frames)
    assert stream.take(1, timeout=0.1) is None  # the clip is done
    np.testing.assert_array_equal(np.stack(taken), expected)
    assert stream.join(5)


def test_the_budget_sets_the_slices_of_a_step(tiny_checkpoint, clip):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128)
    llm.add_request("video", llm.preprocessor.prepare(video_prompt(clip), greedy(2)))
    llm.scheduler.schedule()  # admitted (its blocks held), no run until its media are encoded
    (job,) = llm.encoder.jobs.values()
    assert job.stream.waiting_for_room.wait(30)  # decoded as far ahead as the stream holds (8 of 12 slices)
    llm.encoder.seconds_per_patch = 0.001
    work = llm.encoder.plan(budget_s=0.001 * (3 * SLICE_PATCHES + 5))  # room for 3 slices, not 4
    assert slices_of(work, llm) == 3
    work = llm.encoder.plan(budget_s=0.0)  # no room at all: still one slice, so encoding goes on
    assert slices_of(work, llm) == 1
    work = llm.encoder.plan(budget_s=None, wait_s=10)  # nothing else running: a whole chunk's worth if ready
    assert 1 <= slices_of(work, llm) <= SLICES - 4
    llm.abort("video")


def test_an_aborted_request_stops_its_decoding(tiny_checkpoint, clip):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128, vision_step_share=1e-6)
    llm.add_request("text", llm.preprocessor.prepare(Prompt("Count to ten."), greedy(30)))
    llm.add_request("video", llm.preprocessor.prepare(video_prompt(clip), greedy(4)))
    (job,) = llm.encoder.jobs.values()
    stream = job.stream
    while job.rows == 0:  # the clip partly encoded (one slice a step, as its frames are decoded)
        llm.step()
    assert job.rows < job.media.num_tokens
    assert llm.abort("video")
    assert stream.join(5)  # its decoding thread has ended
    assert not llm.encoder.jobs and "video" not in llm.sequences
    while llm.has_unfinished():
        llm.step()
    assert llm.blocks.num_used_blocks() == 0


# ------------------------------------------------------------------ the prompt-token budget


def test_step_cost_estimates_from_the_steps_seen():
    from qwen_vl_triton.engine.stats import StepCost

    cost = StepCost()
    assert cost.prompt_tokens_within(1.0) is None  # nothing known yet
    for _ in range(30):
        cost.record(0.040, 0)             # decode-only steps: 40 ms
        cost.record(0.040 + 0.002 * 50, 50)  # 50 prompt tokens add 2 ms each
    assert abs(cost.decode_s - 0.040) < 1e-9 and abs(cost.per_prompt_token_s - 0.002) < 1e-9
    assert cost.prompt_tokens_within(0.25 * cost.decode_s) == 5 and cost.prompt_tokens_within(0.0) == 1
    assert cost.mixed_steps == 1


def test_the_prefill_share_chunks_a_long_prompt_while_streams_decode(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128, prefill_step_share=0.25, enable_prefix_caching=False)
    alone = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128)
    long_prompt = Prompt("Tell me everything about the sea and the ships on it. " * 3)
    expected = alone.generate([long_prompt], greedy(3))[0].outputs[0].token_ids
    llm.add_request("stream", llm.preprocessor.prepare(Prompt("Count to ten."), greedy(200)))
    while len(llm.sequences["stream"].output_ids) < 3:
        llm.step()
    # Known costs: a decode step 40 ms, a prompt token 1 ms -> 10 prompt tokens a step (0.25 x 40 / 1).
    llm.step_cost.decode_s, llm.step_cost.per_prompt_token_s = 0.040, 0.001
    llm.step_cost.record = lambda seconds, prompt_tokens: None  # hold the estimates still
    llm.add_request("long", llm.preprocessor.prepare(long_prompt, greedy(3)))
    long = llm.sequences["long"]
    chunks = []
    while not long.output_ids:
        before, stream_before = long.num_computed, len(llm.sequences["stream"].output_ids)
        llm.step()
        chunks.append(long.num_computed - before)
        assert len(llm.sequences["stream"].output_ids) == stream_before + 1  # the stream never waits
    assert len(long.prompt_ids) > 40 and set(chunks) == {10} | ({len(long.prompt_ids) % 10} - {0})
    while not long.is_finished:
        llm.step()
    assert long.output_ids == expected  # chunking changes when, not what
