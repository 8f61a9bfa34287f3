"""Image/video preprocessing: bit-identical to transformers' PIL image processor; qwen-vl-utils'
frame-count and pixel-budget rules; PyAV decoding of only the sampled frames."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qwen_vl_triton.engine.media import Media, prepare_media
from qwen_vl_triton.modeling.processing import (
    FPS_MAX_FRAMES,
    SAMPLE_IMAGE_PATH,
    SAMPLE_VIDEO_PATH,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    ImageProcessorConfig,
    MediaError,
    image_grid_thw,
    image_target_size,
    iter_video_frames,
    media_kind,
    patchify,
    plan_video,
    probe_media_kind,
    probe_video,
    process_image,
    smart_nframes,
    smart_resize,
    video_frame_indices,
    video_frame_range,
    video_max_pixels,
)
from qwen_vl_triton.testing.media import synthetic_frame, write_synthetic_video

transformers.utils.logging.set_verbosity_error()
HFImageProcessor = transformers.Qwen2VLImageProcessorPil  # the PIL backend; the default one needs torchvision


def _hf(image: Image.Image, min_pixels: int, max_pixels: int):
    proc = HFImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=image, return_tensors="pt")
    return out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


def _random_image(rng: np.random.Generator, h: int, w: int, mode: str) -> Image.Image:
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
    return img


# ----------------------------------------------------------------------------------- images


@st.composite
def _image_case(draw):
    h = draw(st.integers(1, 700))
    lo, hi = max(1, math.ceil(h / 200)), min(700, h * 200)
    w = draw(st.integers(lo, hi))
    min_pixels = draw(st.sampled_from([56 * 56, 28 * 28 * 4, 28 * 28 * 64]))
    max_pixels = draw(st.sampled_from([28 * 28 * 64, 28 * 28 * 256, 28 * 28 * 1280]))
    mode = draw(st.sampled_from(["RGB", "RGB", "RGBA", "L", "P"]))
    seed = draw(st.integers(0, 2**31))
    return h, w, min_pixels, max(min_pixels, max_pixels), mode, seed


@settings(max_examples=40)
@given(_image_case())
def test_process_image_equals_transformers(case):
    h, w, min_pixels, max_pixels, mode, seed = case
    img = _random_image(np.random.default_rng(seed), h, w, mode)
    cfg = ImageProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    pixel_values, grid = process_image(img, cfg)
    ref, ref_grid = _hf(img, min_pixels, max_pixels)
    assert grid == ref_grid
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == ref.shape
    assert torch.equal(pixel_values, ref)  # bit-identical, not just close
    assert image_grid_thw(h, w, cfg) == grid


def test_per_request_pixel_overrides_and_paths():
    cfg = ImageProcessorConfig()  # 3136 .. 1003520
    img = Image.open(SAMPLE_IMAGE_PATH)
    pv, grid = process_image(SAMPLE_IMAGE_PATH, cfg, min_pixels=28 * 28 * 100, max_pixels=28 * 28 * 200)
    ref, ref_grid = _hf(img, 28 * 28 * 100, 28 * 28 * 200)
    assert grid == ref_grid and torch.equal(pv, ref)
    assert 100 <= grid[1] * grid[2] // 4 <= 200
    pv, grid = process_image(img, cfg, resized_height=100, resized_width=300)
    assert grid == (1, 112 // 14, 308 // 14) and pv.shape == (8 * 22, 1176)
    with pytest.raises(ValueError):
        process_image(img, cfg, resized_height=100)


def test_image_config_reads_both_preprocessor_layouts(tmp_path):
    old = {"min_pixels": 1000, "max_pixels": 5000, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
           "rescale_factor": 0.00392156862745098}
    new = {"size": {"shortest_edge": 1000, "longest_edge": 5000}, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    a, b = ImageProcessorConfig.from_dict(old), ImageProcessorConfig.from_dict(new)
    assert a == b and (a.min_pixels, a.max_pixels) == (1000, 5000) and a.rescale_factor == 1 / 255
    assert a.factor == 28 and a.patch_dim == 1176
    assert ImageProcessorConfig.from_pretrained(tmp_path) == ImageProcessorConfig()  # no file: defaults


@settings(max_examples=200)
@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([(56 * 56, 28 * 28 * 1280),
                                                                     (28 * 28 * 4, 28 * 28 * 16384),
                                                                     (128 * 28 * 28, 768 * 28 * 28)]))
def test_smart_resize_properties(h, w, bounds):
    min_pixels, max_pixels = bounds
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(h, w, 28, min_pixels, max_pixels)
        return
    rh, rw = smart_resize(h, w, 28, min_pixels, max_pixels)
    assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
    assert rh * rw >= min_pixels
    if min(rh, rw) > 28:  # a side clamped to one factor can push a thin image over the cap
        assert rh * rw <= max_pixels
    # both sides come from one scale s, each rounded by less than a factor: |rh - s h| <= 28, same for w
    if min(rh, rw) > 28:
        assert abs(rh / h - rw / w) <= 28 / h + 28 / w + 1e-9
    # already-fitting multiples of 28 are untouched
    if h % 28 == 0 and w % 28 == 0 and min_pixels <= h * w <= max_pixels:
        assert (rh, rw) == (h, w)


def test_smart_resize_known_values():
    assert smart_resize(120, 160, 28, 56 * 56, 28 * 28 * 1280) == (112, 168)
    assert smart_resize(10, 10, 28, 56 * 56, 28 * 28 * 1280) == (56, 56)       # scaled up, ceil
    assert smart_resize(4000, 3000, 28, 56 * 56, 28 * 28 * 1280) == (1148, 840)  # scaled down, floor
    assert smart_resize(42, 70, 28) == (56, 56)   # round(1.5) = 2, round(2.5) = 2: Python's rounding
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201)
    with pytest.raises(ValueError):
        smart_resize(0, 10)
    assert image_target_size(120, 160, ImageProcessorConfig()) == (112, 168)


# ---------------------------------------------------------------------------------------- layout


def test_two_frame_video_of_a_still_image_equals_the_image():
    cfg = ImageProcessorConfig()
    img = Image.open(SAMPLE_IMAGE_PATH).convert("RGB")
    pv_img, grid_img = process_image(img, cfg)
    th, tw = image_target_size(img.height, img.width, cfg)
    frame = np.asarray(img.resize((tw, th), Image.Resampling.BICUBIC))
    pv_vid, grid_vid = patchify(np.stack([frame, frame]), cfg)
    assert grid_vid == grid_img and torch.equal(pv_vid, pv_img)


def test_video_patches_stack_frames_in_time():
    """Frame 2k+j is temporal slot j of time step k; an odd count repeats the last frame."""
    cfg = ImageProcessorConfig()
    frames = np.stack([synthetic_frame(56, 84, t) for t in (0.0, 0.3, 0.6, 0.9, 1.0)])
    pv, grid = patchify(frames, cfg)
    assert grid == (3, 4, 6)
    per_t = 4 * 6
    pv = pv.view(3, per_t, 3, 2, 14, 14)
    for k in range(3):
        for j in range(2):
            src = frames[min(2 * k + j, len(frames) - 1)]
            img_pv, _ = patchify(np.stack([src, src]), cfg)
            assert torch.equal(pv[k, :, :, j], img_pv.view(per_t, 3, 2, 14, 14)[:, :, 0])


def test_patchify_rejects_bad_frames():
    cfg = ImageProcessorConfig()
    with pytest.raises(ValueError):
        patchify(np.zeros((2, 30, 28, 3), np.uint8), cfg)
    with pytest.raises(ValueError):
        patchify(np.zeros((2, 28, 28, 3), np.float32), cfg)


# ------------------------------------------------------------------------------- frame counts


def sample_video(path: Path | str, cfg: ImageProcessorConfig | None = None, **plan_kw: Any) -> SimpleNamespace:
    """All planned frames of a clip at once, through the engine's path (plan_video, then
    iter_video_frames): uint8 frames [T, H, W, 3], their times in seconds, the sampling rate."""
    plan = plan_video(path, cfg, **plan_kw)
    frames = np.concatenate(list(iter_video_frames(plan, len(plan.indices))))
    return SimpleNamespace(frames=frames, timestamps=[i / plan.info.fps for i in plan.indices],
                           sample_fps=plan.sample_fps)



@pytest.mark.parametrize("total, video_fps, kw, expected", [
    (30, 10.0, {}, 6),                       # 3 s at 2 fps
    (300, 30.0, {}, 20),                     # 10 s
    (5, 10.0, {}, 4),                        # 0.5 s: raised to min_frames 4, floored even
    (3, 10.0, {}, 2),                        # fewer frames than min_frames: capped by the clip
    (100_000, 30.0, {}, FPS_MAX_FRAMES),     # long: 768
    (91, 30.0, {}, 6),                       # 3.03 s -> 6.07 -> 6
    (95, 30.0, {"fps": 1.0}, 4),             # 3.2 frames -> min 4
    (600, 30.0, {"max_frames": 9}, 8),       # max_frames floored to even
    (600, 30.0, {"min_frames": 45}, 46),     # min_frames ceiled to even
    (50, 25.0, {"nframes": 7}, 8),           # round(3.5) = 4 pairs (Python rounds halves to even)
    (50, 25.0, {"nframes": 5}, 4),           # round(2.5) = 2 pairs
])
def test_smart_nframes(total, video_fps, kw, expected):
    assert smart_nframes(total, video_fps, **kw) == expected


def test_smart_nframes_errors():
    with pytest.raises(ValueError):
        smart_nframes(1, 10.0)               # a single frame cannot make an even count >= 2
    with pytest.raises(ValueError):
        smart_nframes(10, 10.0, nframes=12)  # more than the clip has
    with pytest.raises(ValueError):
        smart_nframes(10, 10.0, fps=2.0, nframes=4)


def test_video_pixel_budget():
    assert video_max_pixels(6) == VIDEO_MAX_PIXELS                   # few frames: the per-frame cap
    assert video_max_pixels(768) == int(VIDEO_TOTAL_PIXELS / 768 * 2)  # many: share of the total
    assert video_max_pixels(768, total_pixels=10) == int(VIDEO_MIN_PIXELS * 1.05)  # floor
    assert video_max_pixels(6, max_pixels=200_000) == 200_000        # a request can only lower it
    assert video_max_pixels(6, max_pixels=10**9) == VIDEO_MAX_PIXELS


def test_video_frame_range_and_indices():
    assert video_frame_range(30, 10.0) == (0, 29, 30)
    assert video_frame_range(30, 10.0, 0.55, 2.0) == (6, 20, 15)
    assert video_frame_range(30, 10.0, None, 99.0) == (0, 29, 30)
    with pytest.raises(ValueError):
        video_frame_range(30, 10.0, 2.0, 1.0)
    assert video_frame_indices(0, 29, 6) == [0, 6, 12, 17, 23, 29]
    assert video_frame_indices(5, 20, 4) == [5, 10, 15, 20]


# ------------------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """3 s at 10 fps, 64x48, mpeg4: 30 frames of a square moving right."""
    return write_synthetic_video(tmp_path_factory.mktemp("video") / "clip.mp4", 3.0, 10, 64, 48, "mpeg4")


def test_probe(clip):
    info = probe_video(clip)
    assert (info.total_frames, info.fps, info.height, info.width) == (30, 10.0, 48, 64)


@pytest.mark.parametrize("codec, suffix", [("mpeg4", ".mp4"), ("libx264", ".mp4"), ("libvpx-vp9", ".webm")])
def test_sample_video_picks_the_right_frames(tmp_path, codec, suffix):
    """libx264 reorders frames (B-frames); webm headers carry no frame count (packets are counted)."""
    path = write_synthetic_video(tmp_path / f"{codec}{suffix}", 3.0, 10, 64, 48, codec)
    video = sample_video(path)
    # 6 frames; 64x48 raised to 128 tokens per frame: smart_resize(48, 64, 28, 128*784, 768*784)
    assert video.frames.shape == (6, 280, 392, 3) and video.frames.dtype == np.uint8
    assert video.sample_fps == pytest.approx(2.0)
    assert video.timestamps == pytest.approx([0.0, 0.6, 1.2, 1.7, 2.3, 2.9])
    # each sampled frame shows the moving red square where the synthetic frame it should be has it
    def square_x(frame: np.ndarray) -> float:
        f = frame.astype(np.int32)
        mask = (f[..., 0] > 170) & (f[..., 1] < 110) & (f[..., 2] < 110)
        return float(np.nonzero(mask)[1].mean())

    ref_x = np.array([square_x(np.asarray(Image.fromarray(synthetic_frame(48, 64, i / 29)).resize(
        (392, 280), Image.Resampling.BICUBIC))) for i in range(30)])
    for k, want in enumerate([0, 6, 12, 17, 23, 29]):
        assert int(np.abs(ref_x - square_x(video.frames[k])).argmin()) == want


def test_sample_video_options(clip):
    v = sample_video(clip, video_start=0.5, video_end=2.0)   # frames 5..20 -> 4 frames at 2.5 fps
    assert v.frames.shape[0] == 4 and v.timestamps == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert v.sample_fps == pytest.approx(2.5)
    v = sample_video(clip, nframes=10, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 8)
    assert v.frames.shape[0] == 10 and v.frames.shape[1] * v.frames.shape[2] <= 28 * 28 * 8
    v = sample_video(clip, resized_height=56, resized_width=84)
    assert v.frames.shape[1:3] == (56, 84)
    v = sample_video(clip, fps=1.0)
    assert v.frames.shape[0] == 4


def test_prepared_video_is_its_sampled_frames_patchified(clip):
    """The engine's chunked decode (PreparedMedia.pixel_chunks) gives the patches of all planned
    frames at once; seconds per temporal patch follow the sampling rate."""
    cfg = ImageProcessorConfig()
    prepared = prepare_media(Media(clip), cfg)
    pv = prepared.pixel_values
    assert prepared.grid == (3, 20, 28) and pv.shape == (3 * 20 * 28, 1176) and pv.dtype == torch.float32
    assert prepared.second_per_grid_t == pytest.approx(1.0)
    v = sample_video(clip, cfg)
    pv2, grid2 = patchify(v.frames, cfg)
    assert torch.equal(pv, pv2) and prepared.grid == grid2
    assert prepared.second_per_grid_t == pytest.approx(cfg.temporal_patch_size / v.sample_fps)


def test_bundled_assets():
    assert media_kind(SAMPLE_IMAGE_PATH) == "image" and media_kind(SAMPLE_VIDEO_PATH) == "video"
    info = probe_video(SAMPLE_VIDEO_PATH)
    assert info.total_frames >= 4
    _, grid = process_image(SAMPLE_IMAGE_PATH, ImageProcessorConfig())
    assert grid == (1, 8, 12)


def test_probe_media_kind_tells_media_from_other_files(tmp_path):
    renamed = tmp_path / "clip.bin"  # a video without a video extension: PyAV opens it
    renamed.write_bytes(SAMPLE_VIDEO_PATH.read_bytes())
    (tmp_path / "notes.txt").write_text("this is not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert probe_media_kind(SAMPLE_IMAGE_PATH) == "image" and probe_media_kind(SAMPLE_VIDEO_PATH) == "video"
    assert probe_media_kind(renamed) == "video"
    assert probe_media_kind(tmp_path / "notes.txt") is None and probe_media_kind(tmp_path / "empty.jpg") is None
    # A broken file is still taken for what its extension says, so that its error names the right kind.
    assert media_kind(tmp_path / "empty.jpg") == "image" and media_kind(renamed) == "video"


def test_a_file_neither_image_nor_video_is_named_as_such(tmp_path):
    """A script, a note or junk bytes given as media of unknown kind: the error says it is neither
    an image nor a video and what is supported (it said "cannot open video", from PyAV's attempt)."""
    script = tmp_path / "run.py"
    script.write_text("print('hello')\n")
    note = tmp_path / "notes.txt"
    note.write_text("this is not an image\n")
    blank = tmp_path / "blank.dat"
    blank.write_bytes(b"")
    cfg = ImageProcessorConfig()
    for path in (script, note):
        with pytest.raises(MediaError, match="neither an image nor a video") as told:
            media_kind(path)
        with pytest.raises(MediaError, match="neither an image nor a video") as prepared:
            prepare_media(Media(path), cfg)
        for message in (str(told.value), str(prepared.value)):
            assert str(path) in message and "supported: images" in message and ".mp4" in message
            assert "cannot open video" not in message
    with pytest.raises(MediaError, match=r"blank.dat: neither an image nor a video \(it is empty\)"):
        media_kind(blank)
    with pytest.raises(MediaError, match=r"<media bytes>: neither an image nor a video"):
        prepare_media(Media(b"#!/bin/sh\necho not media\n"), cfg)
    with pytest.raises(MediaError, match="no such file"):
        media_kind(tmp_path / "missing.bin")
    # Real media keep their kind, from a path or from bytes, whatever the file's name.
    renamed = tmp_path / "clip.bin"
    renamed.write_bytes(SAMPLE_VIDEO_PATH.read_bytes())
    assert media_kind(renamed) == "video" and prepare_media(Media(renamed), cfg).kind == "video"
    assert media_kind(SAMPLE_VIDEO_PATH.read_bytes()) == "video"
    assert media_kind(SAMPLE_IMAGE_PATH.read_bytes()) == "image"
    assert prepare_media(Media(SAMPLE_IMAGE_PATH.read_bytes()), cfg).kind == "image"
    # Explicit kinds are not second-guessed: the reader of that kind says what failed.
    with pytest.raises(MediaError, match="cannot read image"):
        prepare_media(Media(note, "image"), cfg)


def test_unreadable_media_errors(tmp_path, clip):
    cfg = ImageProcessorConfig()
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video" * 50)
    junk_png = tmp_path / "junk.png"
    junk_png.write_bytes(b"\x89PNG not really" * 10)
    missing = tmp_path / "missing.mp4"
    for bad, what in [(empty, "empty"), (junk, "cannot open"), (missing, "not found")]:
        with pytest.raises(ValueError, match=what) as e:
            sample_video(bad)
        assert str(bad) in str(e.value)
    for bad, what in [(tmp_path / "empty.mp4", "empty"), (junk_png, "cannot read"), (missing, "not found")]:
        with pytest.raises(MediaError, match=what) as e:
            process_image(bad, cfg)
        assert str(bad) in str(e.value)
    with pytest.raises(MediaError, match="clip.mp4"):
        sample_video(clip, video_start=2.5, video_end=1.0)
    one = write_synthetic_video(tmp_path / "one.mp4", 0.1, 10, 32, 32)
    with pytest.raises(MediaError, match="one.mp4"):
        sample_video(one)
