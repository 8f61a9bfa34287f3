"""Video at scale: chunked encoding equals one call, per-request controls give qwen-vl-utils' token
counts, limits and bad files give clear errors, video_start/video_end pick the right frames, and
videos over the context budget are shrunk as qwen-vl-utils' total-pixel budget does."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton.engine.llm import LLM, Prompt
from qwen_vl_triton.engine.media import Media, MediaLimits, prepare_media
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.modeling.processing import ImageProcessorConfig, MediaError, plan_video
from qwen_vl_triton.testing.media import write_synthetic_video
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint

CFG = ImageProcessorConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """4 s at 10 fps, 90x62 px: odd patch grids after resizing."""
    return write_synthetic_video(tmp_path_factory.mktemp("v") / "clip.mp4", seconds=4.0, fps=10, width=90, height=62)


# ------------------------------------------------------------------ chunked == one call

@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_chunked_encoding_equals_one_call(arch, clip, tmp_path):
    # Qwen2.5-VL with 56-px windows (2x2 merged tokens): each frame spans several windows, and the
    # chunks split the clip between frames whose windows the one call orders all together.
    extra = {"window_size": 56} if arch == "qwen2_5_vl" else {}
    llm = LLM(make_tiny_checkpoint(tmp_path / arch, arch, seed=7, **extra), device="cpu", num_kv_blocks=8,
              vision_chunk_patches=100)
    video = prepare_media(Media(clip, options={"nframes": 10, "min_pixels": 12 * 784, "max_pixels": 20 * 784}),
                          llm.image_cfg)
    t, h, w = video.grid
    assert t == 5 and 100 // (h * w) in (1, 2, 3)  # odd slice count, several chunks of >= 1 slice
    chunked = llm.encoder.encode([video])[0]
    one_call = llm.model.encode_media(video.pixel_values, torch.tensor([video.grid]))
    assert chunked.shape == one_call.shape == (video.num_tokens, llm.config.text.hidden_size)
    torch.testing.assert_close(chunked, one_call, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ controls -> token counts

def qwen_smart_resize(h: int, w: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """qwen-vl-utils' smart_resize, written out here as the oracle."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


@settings(max_examples=20)
@given(width=st.integers(28, 900), height=st.integers(28, 900), lo=st.integers(4, 64), span=st.integers(0, 512))
def test_image_controls_give_qwen_token_counts(width, height, lo, span):
    from PIL import Image

    image = Image.new("RGB", (width, height), (10, 200, 30))
    options = {"min_pixels": lo * 784, "max_pixels": (lo + span) * 784}
    m = prepare_media(Media(image, options=options), CFG)
    hb, wb = qwen_smart_resize(height, width, **options)
    assert m.num_tokens == hb * wb // 784


@pytest.mark.parametrize("options", [
    {},                                                    # 2 fps, 128..768 tokens a frame, total budget
    {"fps": 1.0, "min_pixels": 8 * 784, "max_pixels": 32 * 784},
    {"nframes": 6, "min_pixels": 4 * 784, "max_pixels": 16 * 784},
    {"fps": 4.0, "max_frames": 10, "min_pixels": 4 * 784, "total_pixels": 40 * 784},
    {"video_start": 1.0, "video_end": 3.0, "min_pixels": 16 * 784},
])
def test_video_controls_give_qwen_token_counts(clip, options):
    """Frames: duration * fps rounded to even, within [min_frames, max_frames]; per-frame pixel cap:
    max(min(768*784, total_pixels / frames * 2), min_pixels * 1.05) (qwen-vl-utils' formulas)."""
    m = prepare_media(Media(clip, options=dict(options)), CFG)
    fps_in, total = 10, 40  # the clip
    start = math.ceil(options.get("video_start", 0) * fps_in)
    end = min(math.floor(options["video_end"] * fps_in), total - 1) if "video_end" in options else total - 1
    count = end - start + 1
    if "nframes" in options:
        frames = round(options["nframes"] / 2) * 2
    else:
        lo, hi = 4, min(options.get("max_frames", 768), count) // 2 * 2
        frames = int(min(max(count / fps_in * options.get("fps", 2.0), lo), hi, count)) // 2 * 2
    min_pixels = options.get("min_pixels", 128 * 784)
    cap = max(min(768 * 784, options.get("total_pixels", int(128000 * 784 * 0.9)) / frames * 2), int(min_pixels * 1.05))
    cap = min(cap, options.get("max_pixels", cap))
    hb, wb = qwen_smart_resize(62, 90, min_pixels, int(cap))
    assert m.grid == (frames // 2, hb // 14, wb // 14)
    assert m.num_tokens == frames // 2 * hb * wb // 784


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize(("options", "message"), [
    ({"fps": 100.0}, "fps=100.0 is over the configured limit of 30.0"),
    ({"nframes": 2000}, "nframes=2000 must be in [2, 768]"),
    ({"max_pixels": 10**9}, "max_pixels=1000000000 is over the configured limit"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels=5000 is above max_pixels=4000"),
    ({"fps": 2.0, "nframes": 8}, "cannot be combined with fps"),
    ({"video_start": 3.0, "video_end": 1.0}, "video_start=3.0 must be before video_end=1.0"),
    ({"fps": "fast"}, "fps='fast' must be a number"),
    ({"nframes": 7.5}, "nframes=7.5 must be an integer"),
    ({"frames_per_second": 2}, "unknown video option(s) ['frames_per_second']"),
    ({"resized_height": 280}, "give both resized_height and resized_width"),
])
def test_out_of_range_controls_are_refused_by_name(clip, options, message):
    with pytest.raises(MediaError) as e:
        prepare_media(Media(clip, options=options), CFG)
    assert message in str(e.value) and str(clip) in str(e.value)


def test_configured_limits_apply(clip):
    limits = MediaLimits(video_max_frames=8, video_defaults={"fps": 1.0})
    m = prepare_media(Media(clip, options={"min_pixels": 4 * 784}), CFG, limits)
    assert m.grid[0] * 2 == 4  # 4 s at the default 1 fps
    with pytest.raises(MediaError, match=r"nframes=10 must be in \[2, 8\]"):
        prepare_media(Media(clip, options={"nframes": 10}), CFG, limits)


def test_unreadable_and_truncated_videos(clip, tmp_path):
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01 not a video" * 100)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty, tmp_path / "missing.mp4"):
        with pytest.raises(MediaError, match=bad.name):
            prepare_media(Media(bad), CFG)


# ------------------------------------------------------------------ video_start / video_end

def all_frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_video_start_end_select_the_right_frames(clip):
    """The streamed (seeking) decode returns exactly the planned frames of a full decode."""
    from PIL import Image

    from qwen_vl_triton.modeling.processing import iter_video_frames

    frames = all_frames(clip)
    for start, end in [(1.0, 3.0), (0.0, 1.5), (2.35, None), (None, 0.9)]:
        plan = plan_video(clip, CFG, video_start=start, video_end=end, min_pixels=4 * 784, max_pixels=8 * 784)
        first = 0 if start is None else math.ceil(start * 10)
        last = 39 if end is None else math.floor(end * 10)
        assert plan.indices[0] == first and plan.indices[-1] == last
        got = np.concatenate(list(iter_video_frames(plan, 4)))
        want = np.stack([np.asarray(Image.fromarray(frames[i]).resize((plan.width, plan.height),
                                                                      Image.Resampling.BICUBIC)) for i in plan.indices])
        assert np.array_equal(got, want)


# ------------------------------------------------------------------ context budget

def test_videos_over_the_budget_are_shrunk_and_reported(clip, tmp_path):
    llm = LLM(make_tiny_checkpoint(tmp_path / "c", "qwen2_5_vl", seed=1), device="cpu", num_kv_blocks=64,
              max_input_length=400)
    video = Media(clip)  # 8 frames at the default 128..768 tokens a frame: 4 x 140 tokens, too many
    assert prepare_media(video, llm.image_cfg).num_tokens == 4 * 140
    out = llm.generate([Prompt("What happens?", [video])], SamplingParams(max_tokens=2, temperature=0))[0]
    assert out.prompt_tokens <= 400
    (note,) = out.media_adjustments  # fewer pixels cannot help (140 tokens a frame is min_pixels): fewer frames
    assert note == "video 0: 8 frames of 392x280 (560 tokens) -> 4 frames of 392x280 (280 tokens) to fit " \
                   "max_input_length 400"
    small = LLM(llm.path, device="cpu", num_kv_blocks=64, max_input_length=300)
    with pytest.raises(MediaError, match=r"smallest \(4 frames at min_pixels: 280 tokens\) .* does not fit the "
                                         r"248 tokens left by max_input_length 300"):
        small.generate([Prompt("What happens?", [video])], SamplingParams(max_tokens=2))
