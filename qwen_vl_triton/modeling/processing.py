"""Image and video preprocessing for Qwen2-VL / Qwen2.5-VL (numpy, PIL, PyAV and torch only).

Images follow transformers' `Qwen2VLImageProcessorPil` (the PIL backend of Qwen2VLImageProcessor)
step for step, so `process_image` returns bit-identical `pixel_values`:

    convert to RGB (alpha composited onto white) -> smart_resize target -> PIL bicubic resize
    (uint8) -> float64 * rescale_factor -> float32 -> (x - mean) / std in float32 -> patchify.

Videos follow qwen-vl-utils (the reference pre-processing Qwen ships for its models): sample at
2 fps, an even number of 4..768 frames, each frame resized within a per-frame pixel budget that also
shares a total budget across frames (see the constants and `smart_nframes`, `video_max_pixels`).
Frames are decoded with PyAV sequentially, and only the sampled ones are kept and resized.

The patch layout (shared by images and videos, as transformers lays them out): frames [T, H, W, 3]
are cut into grid (t, h, w) = (T / temporal_patch_size, H / patch_size, W / patch_size); rows are
ordered t, then h-blocks of merge_size, then w-blocks, then the merge_size x merge_size patches
inside a block (so each LLM token's 4 patches are consecutive); each row is
(channel, temporal, patch_row, patch_col) flattened: 3 * 2 * 14 * 14 = 1176 values. An image is a
video of one frame repeated temporal_patch_size times.

Images and videos share this module's resize rules, patch layout and limits (one numeric contract,
tested bit for bit against transformers), which is why it holds both.
"""

from __future__ import annotations

import enum
import io
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# ---------------------------------------------------------------------------------------------
# Constants (qwen-vl-utils' values; pixel counts are in units of 28 x 28 = one merged LLM token)

IMAGE_FACTOR = 28                    # patch_size 14 x merge_size 2: both sides are multiples of it
MIN_PIXELS = 4 * 28 * 28             # qwen-vl-utils' default image minimum (4 tokens)
MAX_PIXELS = 16384 * 28 * 28         # qwen-vl-utils' default image maximum (16384 tokens)
MAX_RATIO = 200                      # longest / shortest side allowed

VIDEO_MIN_PIXELS = 128 * 28 * 28     # per frame: at least 128 tokens' worth
VIDEO_MAX_PIXELS = 768 * 28 * 28     # per frame: at most 768 tokens' worth
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # all frames together: 90% of a 128k context
FRAME_FACTOR = 2                     # frame counts are even (temporal_patch_size)
FPS = 2.0                            # default sampling rate
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

# Pixels of one image or video frame as its file declares them, checked from the header before any
# decoding: PIL's decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS, about 0.25 GiB of RGB).
DECODE_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".flv", ".wmv", ".mpeg", ".mpg", ".3gp", ".ts",
})

# Extensions that name a picture even when PIL cannot read the file (then the error says "image").
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".heic",
})

SAMPLE_IMAGE_PATH = Path(__file__).parent / "assets" / "sample.png"
SAMPLE_VIDEO_PATH = Path(__file__).parent / "assets" / "sample.mp4"


class MediaKind(str, enum.Enum):
    """What a medium is. A str, so it compares equal to and serializes as "image" / "video"
    (the chat templates' part types)."""

    IMAGE = "image"
    VIDEO = "video"

    def __str__(self) -> str:
        return self.value


class MediaError(ValueError):
    """An image or video that cannot be read or processed; the message names the file."""


class MediaTooLarge(MediaError):
    """An image or video frame whose header declares more pixels than the limit: refused before
    anything is decoded (a decompression bomb never allocates its pixels)."""


def check_source_pixels(width: int, height: int, max_pixels: int | None, name: str) -> None:
    """MediaTooLarge naming the limit when `width` x `height` (as a file declares an image's or a
    video frame's size) is over `max_pixels` (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise MediaTooLarge(f"{name}: {width}x{height} = {width * height} pixels, over the configured limit of "
                            f"{max_pixels} pixels per image or video frame (decode_max_pixels); refused before "
                            "decoding")


# ---------------------------------------------------------------------------------------------
# Sizes


def round_by_factor(number: float, factor: int) -> int:
    """The multiple of `factor` closest to `number` (Python's round: halves go to even)."""
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    """The smallest multiple of `factor` >= `number`."""
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    """The largest multiple of `factor` <= `number`."""
    return math.floor(number / factor) * factor


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Target (height, width) for an image of `height` x `width`, as Qwen2-VL's processor picks it.

    Both sides are rounded to the nearest multiple of `factor`; if that exceeds `max_pixels` the
    image is scaled down by sqrt(pixels / max_pixels) with sides floored to the factor (at least one
    factor); if it is below `min_pixels` it is scaled up by sqrt(min_pixels / pixels) with sides
    ceiled. Follows transformers' rule (qwen-vl-utils differs only for sides under factor/2, which it
    first raises to `factor`). Raises ValueError for an empty image or an aspect ratio above 200.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {ratio}")
    h_bar = round_by_factor(height, factor)
    w_bar = round_by_factor(width, factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of preprocessor_config.json that processing uses (defaults: Qwen2-VL's)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    _lut: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this: patch_size * merge_size (28)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per patch row: 3 * temporal_patch_size * patch_size**2 (1176)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """From a preprocessor_config.json dict. `min_pixels`/`max_pixels` win over transformers
        5.x's `size: {"shortest_edge": min_pixels, "longest_edge": max_pixels}`; older `size` dicts
        with `min_pixels`/`max_pixels` keys are read too."""
        size = d.get("size") or {}
        min_pixels = d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = d.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        kw: dict[str, Any] = {}
        if min_pixels is not None:
            kw["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kw["max_pixels"] = int(max_pixels)
        for k in ("patch_size", "temporal_patch_size", "merge_size"):
            if d.get(k) is not None:
                kw[k] = int(d[k])
        for k in ("image_mean", "image_std"):
            if d.get(k) is not None:
                v = d[k]
                kw[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(d["rescale_factor"])
        for k in ("do_rescale", "do_normalize"):
            if d.get(k) is not None:
                kw[k] = bool(d[k])
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ImageProcessorConfig:
        """From a checkpoint directory (its preprocessor_config.json) or the json file itself;
        defaults when the directory has none."""
        p = Path(path)
        if p.is_dir():
            p = p / "preprocessor_config.json"
            if not p.exists():
                return cls()
        return cls.from_dict(json.loads(p.read_text()))

    def normalize_lut(self) -> np.ndarray:
        """float32 [3, 256]: the processed value of each uint8 level per channel, computed with the
        same operations (and roundings) as transformers: float64 * rescale_factor -> float32, then
        (x - mean) / std in float32. Looking values up is exact and faster than the arithmetic."""
        if self._lut is None:
            x = np.arange(256, dtype=np.uint8).astype(np.float64)
            if self.do_rescale:
                x = x * self.rescale_factor
            x = np.broadcast_to(x.astype(np.float32), (3, 256))
            if self.do_normalize:
                mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
                std = np.asarray(self.image_std, dtype=np.float32)[:, None]
                x = (x - mean) / std
            object.__setattr__(self, "_lut", np.ascontiguousarray(x, dtype=np.float32))
        return self._lut


# ---------------------------------------------------------------------------------------------
# Patches


def patchify(frames: np.ndarray, cfg: ImageProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalise and cut uint8 frames [T, H, W, 3] (H, W multiples of cfg.factor) into patches.

    T is padded to a multiple of temporal_patch_size by repeating the last frame (a single image
    becomes temporal_patch_size identical frames). Returns (pixel_values float32
    [t*h*w, 3*temporal_patch_size*patch_size**2], grid (t, h, w)) in transformers' layout (module
    docstring).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    n, height, width, _ = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if n == 0 or height % (p * m) or width % (p * m):
        raise ValueError(f"frames {frames.shape}: need T >= 1 and H, W multiples of {p * m}")
    if pad := -n % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    gt, gh, gw = frames.shape[0] // tp, height // p, width // p
    x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, 3)
    # -> [t, h-block, w-block, merge row, merge col, channel, temporal, patch row, patch col]; the
    # reorder moves uint8 (a quarter of the float32 bytes), the per-channel lookup then writes floats.
    x = np.ascontiguousarray(x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)).reshape(gt * gh * gw, 3, tp * p * p)
    lut = cfg.normalize_lut()
    out = np.empty(x.shape, dtype=np.float32)
    for channel in range(3):
        out[:, channel] = lut[channel][x[:, channel]]  # 2x np.take(..., out=) on this strided slice
    return torch.from_numpy(out.reshape(gt * gh * gw, 3 * tp * p * p)), (gt, gh, gw)


# ---------------------------------------------------------------------------------------------
# Images


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`, transparency composited onto white (as transformers converts)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def is_image(source: str | os.PathLike | bytes) -> bool:
    """Whether PIL identifies the file (or bytes) as an image, from its header alone (one too large
    to decode is still an image)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source):
            return True
    except Image.DecompressionBombError:
        return True
    except (OSError, ValueError):
        return False


def open_image(source: str | os.PathLike | bytes, max_pixels: int | None = DECODE_MAX_PIXELS,
               name: str | None = None) -> Image.Image:
    """The decoded PIL image in a file (or its bytes). Its size is read from the header and checked
    against `max_pixels` first (MediaTooLarge), so a decompression bomb is never decoded; any other
    failure is a MediaError naming `name` (default: the path)."""
    name = name or ("<image bytes>" if isinstance(source, bytes) else str(source))
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as e:  # PIL's own check, at twice its threshold, comes first
        raise MediaTooLarge(f"{name}: {e} (decode_max_pixels is {max_pixels}); refused before decoding") from None
    except Image.UnidentifiedImageError as e:  # its message would show a BytesIO repr
        raise MediaError(f"{name}: cannot read image (not a format PIL knows)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{name}: cannot read image ({type(e).__name__}: {e})") from e
    try:
        check_source_pixels(image.width, image.height, max_pixels, name)
        image.load()
    except MediaTooLarge:
        image.close()
        raise
    except (OSError, SyntaxError, ValueError) as e:  # a valid header over corrupt data
        image.close()
        raise MediaError(f"{name}: cannot read image ({type(e).__name__}: {e})") from e
    return image


def load_image(image: Image.Image | str | os.PathLike) -> Image.Image:
    """An RGB PIL image from a PIL image or a file path; MediaError names the file if unreadable
    (MediaTooLarge if its header declares more than DECODE_MAX_PIXELS)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    if not path.is_file():
        raise MediaError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: image file is empty")
    with open_image(path) as im:
        return to_rgb(im)


def image_target_size(height: int, width: int, cfg: ImageProcessorConfig, min_pixels: int | None = None,
                      max_pixels: int | None = None, resized_height: int | None = None,
                      resized_width: int | None = None) -> tuple[int, int]:
    """The (height, width) an image of `height` x `width` is resized to. Per-request `min_pixels` /
    `max_pixels` override the config's; an explicit `resized_height` and `resized_width` are
    rounded as qwen-vl-utils does (smart_resize with its default 4..16384-token range)."""
    if (resized_height is None) != (resized_width is None):
        raise ValueError("give both resized_height and resized_width, or neither")
    if resized_height is not None:
        return smart_resize(resized_height, resized_width, cfg.factor, MIN_PIXELS, MAX_PIXELS)
    return smart_resize(height, width, cfg.factor,
                        cfg.min_pixels if min_pixels is None else min_pixels,
                        cfg.max_pixels if max_pixels is None else max_pixels)


def image_grid_thw(height: int, width: int, cfg: ImageProcessorConfig, **size_kw: int | None
                   ) -> tuple[int, int, int]:
    """The grid (1, h, w) `process_image` gives an image of `height` x `width` (same keywords as
    `image_target_size`), without touching pixels; its LLM token count is h * w / merge_size**2."""
    th, tw = image_target_size(height, width, cfg, **size_kw)
    return 1, th // cfg.patch_size, tw // cfg.patch_size


def process_image(image: Image.Image | str | os.PathLike, cfg: ImageProcessorConfig,
                  min_pixels: int | None = None, max_pixels: int | None = None,
                  resized_height: int | None = None, resized_width: int | None = None,
                  ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Preprocess one image as transformers' Qwen2VLImageProcessorPil does.

    Returns (pixel_values float32 [h*w, 3*temporal_patch_size*patch_size**2], grid (1, h, w)),
    equal bit for bit to the processor's `pixel_values` / `image_grid_thw` for the same sizes.
    """
    img = load_image(image)
    name = image if not isinstance(image, Image.Image) else "image"
    try:
        th, tw = image_target_size(img.height, img.width, cfg, min_pixels, max_pixels,
                                   resized_height, resized_width)
    except ValueError as e:
        raise MediaError(f"{name}: {e}") from e
    resized = img.resize((tw, th), resample=Image.Resampling.BICUBIC)
    return patchify(np.asarray(resized, dtype=np.uint8)[None], cfg)


# ---------------------------------------------------------------------------------------------
# Videos: frame counts and budgets (qwen-vl-utils' rules)


def smart_nframes(total_frames: int, video_fps: float, fps: float | None = None, nframes: int | None = None,
                  min_frames: int = FPS_MIN_FRAMES, max_frames: int | None = None) -> int:
    """How many frames to sample from a clip of `total_frames` at `video_fps` (qwen-vl-utils).

    With `nframes`: that count rounded to an even number. Otherwise duration * fps (default 2),
    clamped to [ceil_even(min_frames), floor_even(max_frames)] (max_frames defaults to
    min(768, total_frames)) and to total_frames, then floored to an even number. Raises ValueError
    unless the result lies in [2, total_frames].
    """
    if fps is not None and nframes is not None:
        raise ValueError("give fps or nframes, not both")
    if nframes is not None:
        n = round_by_factor(nframes, FRAME_FACTOR)
    else:
        fps = FPS if fps is None else fps
        lo = ceil_by_factor(min_frames, FRAME_FACTOR)
        hi = floor_by_factor(min(FPS_MAX_FRAMES, total_frames) if max_frames is None else max_frames,
                             FRAME_FACTOR)
        n = total_frames / video_fps * fps
        n = min(min(max(n, lo), hi), total_frames)
        n = floor_by_factor(n, FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"nframes should be in [{FRAME_FACTOR}, {total_frames}], got {n}")
    return int(n)


def video_frame_range(total_frames: int, video_fps: float, video_start: float | None = None,
                      video_end: float | None = None) -> tuple[int, int, int]:
    """(first frame, last frame, frame count) of the [video_start, video_end] seconds of a clip,
    clamped to the clip (qwen-vl-utils: start frame ceiled, end frame floored)."""
    if video_fps <= 0 or total_frames <= 0:
        raise ValueError(f"video has {total_frames} frames at {video_fps} fps")
    if video_start is None and video_end is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    start = 0
    if video_start is not None:
        start = math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise ValueError(f"video_start {video_start} s / video_end {video_end} s leave no frames "
                         f"(frames {start}..{end} of {total_frames})")
    return start, end, end - start + 1


def video_frame_indices(start: int, end: int, nframes: int) -> list[int]:
    """`nframes` frame indices spread evenly over [start, end]: torch.linspace(...).round()."""
    return torch.linspace(start, end, nframes).round().long().tolist()


def video_max_pixels(nframes: int, min_pixels: int = VIDEO_MIN_PIXELS, total_pixels: int = VIDEO_TOTAL_PIXELS,
                     max_pixels: int | None = None) -> int:
    """The per-frame pixel cap for `nframes` sampled frames (qwen-vl-utils):
    max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05)),
    lowered further (never raised) by a requested `max_pixels`."""
    cap = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    if max_pixels is not None:
        cap = min(max_pixels, cap)
    return int(cap)


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says about the first video stream."""

    total_frames: int
    fps: float
    height: int
    width: int


def _open_video(path: Path):
    import av

    if not path.is_file():
        raise MediaError(f"{path}: video file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: video file is empty")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{path}: cannot open video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: no video stream")
    return container


def probe_video(path: str | os.PathLike, max_frame_pixels: int | None = None) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream. The count comes from the header,
    or from counting packets when the header lacks it. A frame size over `max_frame_pixels` is
    refused (MediaTooLarge) before anything else is read."""
    import av

    path = Path(path)
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        height, width = stream.codec_context.height, stream.codec_context.width
        check_source_pixels(width, height, max_frame_pixels, f"{path} (video frames)")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        total = int(stream.frames or 0)
        if total <= 0:
            total = sum(1 for pkt in container.demux(stream) if pkt.size)
        if fps <= 0 and stream.duration and stream.time_base:
            fps = total / float(stream.duration * stream.time_base)
    except av.FFmpegError as e:
        raise MediaError(f"{path}: cannot read video ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    if total <= 0:
        raise MediaError(f"{path}: video has no frames")
    if fps <= 0:
        raise MediaError(f"{path}: video frame rate unknown")
    if height <= 0 or width <= 0:
        raise MediaError(f"{path}: video frame size unknown ({width}x{height})")
    return VideoInfo(total, fps, height, width)


@dataclass(frozen=True)
class VideoPlan:
    """What `iter_video_frames` will take from a clip, known before any frame is decoded: the frame
    indices to sample (sorted, may repeat), the resized frame size, and the sampling rate. A video
    given as frames (`plan_frames`) holds them (`frames`: uint8 [H, W, 3] arrays) and no path."""

    path: Path | None
    info: VideoInfo
    indices: tuple[int, ...]
    height: int
    width: int
    sample_fps: float
    frames: tuple[np.ndarray, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def source(self) -> Path | tuple[np.ndarray, ...]:
        """What the plan samples: the file, or the frames (what `plan_video` / `plan_frames` take)."""
        return self.frames if self.frames is not None else self.path

    def grid(self, cfg: ImageProcessorConfig) -> tuple[int, int, int]:
        """The patch grid (t, h, w) these frames give under `cfg`."""
        return (len(self.indices) // cfg.temporal_patch_size, self.height // cfg.patch_size,
                self.width // cfg.patch_size)


def plan_video(path: str | os.PathLike, cfg: ImageProcessorConfig | None = None, fps: float = FPS,
               nframes: int | None = None, min_frames: int = FPS_MIN_FRAMES, max_frames: int | None = None,
               min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int | None = None,
               total_pixels: int = VIDEO_TOTAL_PIXELS, video_start: float | None = None,
               video_end: float | None = None, resized_height: int | None = None,
               resized_width: int | None = None, max_frame_pixels: int | None = None) -> VideoPlan:
    """Sample a clip as qwen-vl-utils does, from its header alone (nothing is decoded).

    Frame count: `smart_nframes` over the [video_start, video_end] range (fps 2 by default, or
    exactly `nframes`, even), indices spread evenly by `video_frame_indices`. Frame size:
    `smart_resize` of the stream's size within [min_pixels, video_max_pixels(...)] (or the explicit
    resized_height x resized_width). `cfg` only supplies the size factor (patch_size * merge_size,
    28 when None). sample_fps = nframes / frames in range * video fps, so second_per_grid_t =
    temporal_patch_size / sample_fps. A stream whose header declares frames over `max_frame_pixels`
    is refused before any frame is decoded (MediaTooLarge).
    """
    path = Path(path)
    factor = cfg.factor if cfg is not None else IMAGE_FACTOR
    info = probe_video(path, max_frame_pixels)
    try:
        start, end, count = video_frame_range(info.total_frames, info.fps, video_start, video_end)
        n = smart_nframes(count, info.fps, fps=fps if nframes is None else None, nframes=nframes,
                          min_frames=min_frames, max_frames=max_frames)
        if (resized_height is None) != (resized_width is None):
            raise ValueError("give both resized_height and resized_width, or neither")
        if resized_height is not None:
            th, tw = smart_resize(resized_height, resized_width, factor, MIN_PIXELS, MAX_PIXELS)
        else:
            cap = video_max_pixels(n, min_pixels, total_pixels, max_pixels)
            th, tw = smart_resize(info.height, info.width, factor, min_pixels, cap)
    except ValueError as e:
        raise MediaError(f"{path}: {e}") from e
    sample_fps = n / max(count, 1e-6) * info.fps
    return VideoPlan(path, info, tuple(video_frame_indices(start, end, n)), th, tw, sample_fps)


def video_frames(frames: Any, name: str = "video frames") -> tuple[np.ndarray, ...]:
    """A video given as frames (a list of PIL images or uint8 [H, W, 3] arrays, or a uint8
    [T, H, W, 3] array) as uint8 [H, W, 3] RGB arrays, all of one size; MediaError naming the first
    frame that is none (or of another size)."""
    items = list(frames) if not isinstance(frames, np.ndarray) or frames.ndim == 4 else [frames]
    if not items:
        raise MediaError(f"{name}: a video given as frames needs at least one frame")
    out = []
    for i, frame in enumerate(items):
        if isinstance(frame, Image.Image):
            frame = np.asarray(to_rgb(frame), dtype=np.uint8)
        if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3):
            what = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise MediaError(f"{name}: frame {i} must be a PIL image or a uint8 [H, W, 3] array, got {what}")
        if out and frame.shape != out[0].shape:
            raise MediaError(f"{name}: frame {i} is {frame.shape[1]}x{frame.shape[0]}, frame 0 "
                             f"{out[0].shape[1]}x{out[0].shape[0]}: all frames must have one size")
        out.append(frame)
    return tuple(out)


def plan_frames(frames: tuple[np.ndarray, ...], cfg: ImageProcessorConfig | None = None, fps: float = FPS,
                nframes: int | None = None, min_frames: int = FPS_MIN_FRAMES, max_frames: int | None = None,
                min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int | None = None,
                total_pixels: int = VIDEO_TOTAL_PIXELS, resized_height: int | None = None,
                resized_width: int | None = None, max_frame_pixels: int | None = None) -> VideoPlan:
    """Plan a video given as frames (`video_frames`' arrays, taken at `fps`, 2 by default), as
    qwen-vl-utils takes such a list: every frame, the count padded to an even number by repeating
    the last, sampled at `fps` (its sample_fps); or, with `nframes`, that many (even) spread
    evenly as `plan_video` samples a clip.
    Frame size as `plan_video` picks it (min_pixels, the per-frame cap of `video_max_pixels`,
    max_pixels, or resized_height x resized_width). MediaError when there are more frames than
    `max_frames` or a frame is over `max_frame_pixels`. (`min_frames` is only `fit_videos`' floor.)"""
    factor = cfg.factor if cfg is not None else IMAGE_FACTOR
    name = f"<{len(frames)} video frames>"
    height, width = frames[0].shape[:2]
    check_source_pixels(width, height, max_frame_pixels, name)
    try:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if nframes is not None:
            n = smart_nframes(len(frames), fps, nframes=nframes)
            indices = video_frame_indices(0, len(frames) - 1, n)
        else:
            n = ceil_by_factor(len(frames), FRAME_FACTOR)
            indices = list(range(len(frames))) + [len(frames) - 1] * (n - len(frames))
        if max_frames is not None and n > max_frames:
            raise ValueError(f"{n} frames, over max_frames={max_frames}: give fewer frames, or nframes")
        if (resized_height is None) != (resized_width is None):
            raise ValueError("give both resized_height and resized_width, or neither")
        if resized_height is not None:
            th, tw = smart_resize(resized_height, resized_width, factor, MIN_PIXELS, MAX_PIXELS)
        else:
            th, tw = smart_resize(height, width, factor, min_pixels, video_max_pixels(n, min_pixels, total_pixels,
                                                                                       max_pixels))
    except ValueError as e:
        raise MediaError(f"{name}: {e}") from e
    sample_fps = fps if nframes is None else n / len(frames) * fps  # padding repeats a frame: still `fps`
    return VideoPlan(None, VideoInfo(len(frames), fps, height, width), tuple(indices), th, tw, sample_fps, frames)


def iter_video_frames(plan: VideoPlan, chunk_frames: int) -> Iterator[np.ndarray]:
    """Decode the planned frames in order, yielding uint8 [<= chunk_frames, H, W, 3] chunks.

    Only the planned frames are converted and resized (PIL bicubic, as each is decoded: the same
    sizes as qwen-vl-utils' torchvision resize, pixel values may differ by a level); decoding
    starts at a seek to the first planned frame's keyframe, and the clip is never held whole. A
    plan of given frames (`plan_frames`) resizes them the same way (a frame already of the planned
    size is taken as it is).
    """
    import av

    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    if plan.frames is not None:
        yield from _iter_given_frames(plan, chunk_frames)
        return
    path, info = plan.path, plan.info
    want_count: dict[int, int] = {}
    for i in plan.indices:
        want_count[i] = want_count.get(i, 0) + 1
    first, last = plan.indices[0], plan.indices[-1]
    pending: list[np.ndarray] = []
    emitted = 0
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        t0 = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
        if first > 0 and stream.time_base and stream.start_time is not None:
            # land on the keyframe at or before the first frame wanted
            container.seek(int((t0 + first / info.fps) / stream.time_base), stream=stream, backward=True)
        last_frame = None
        for counter, frame in enumerate(container.decode(stream)):
            # The frame's index from its timestamp (after a seek, counting from 0 would be wrong);
            # a stream without timestamps is decoded from its start (no seek) and counted.
            index = round((float(frame.time) - t0) * info.fps) if frame.time is not None else counter
            if index > last:
                break
            if index in want_count:
                last_frame = np.asarray(frame.to_image().resize((plan.width, plan.height),
                                                                resample=Image.Resampling.BICUBIC), dtype=np.uint8)
                for _ in range(want_count.pop(index)):
                    pending.append(last_frame)
                while len(pending) >= chunk_frames:
                    yield np.stack(pending[:chunk_frames])
                    emitted += chunk_frames
                    del pending[:chunk_frames]
    except av.FFmpegError as e:
        raise MediaError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    if last_frame is None:
        raise MediaError(f"{path}: no decodable frames (wanted frames {first}..{last})")
    missing = len(plan.indices) - emitted - len(pending)
    if missing:  # the header over-counted frames: repeat the last one decoded
        warnings.warn(f"{path}: header says {info.total_frames} frames but frames {sorted(want_count)[:3]}... "
                      f"were not decoded; repeating the last frame for {missing} samples", stacklevel=2)
        pending.extend([last_frame] * missing)
    for i in range(0, len(pending), chunk_frames):
        yield np.stack(pending[i:i + chunk_frames])


def _iter_given_frames(plan: VideoPlan, chunk_frames: int) -> Iterator[np.ndarray]:
    """`iter_video_frames` for a plan of given frames."""
    def resized(frame: np.ndarray) -> np.ndarray:
        if frame.shape[:2] == (plan.height, plan.width):
            return frame
        image = Image.fromarray(frame).resize((plan.width, plan.height), resample=Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8)

    for i in range(0, len(plan.indices), chunk_frames):
        yield np.stack([resized(plan.frames[k]) for k in plan.indices[i:i + chunk_frames]])


def media_kind(source: str | os.PathLike | bytes, name: str | None = None) -> MediaKind:
    """What a file (or its bytes) of unknown kind is: "video" for a known video extension, "image"
    if PIL identifies it or its extension is an image's (a broken image's error then says
    "image"), else "video" if PyAV finds a video stream in it. Anything else is a MediaError
    naming it (`name`, default: the path) as neither an image nor a video."""
    if isinstance(source, bytes):
        name, empty = name or "<media bytes>", not source
        kind = MediaKind.IMAGE if is_image(source) else MediaKind.VIDEO if _has_video_stream(source) else None
    else:
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise MediaError(f"{name}: no such file")
        empty = path.stat().st_size == 0
        kind = probe_media_kind(path, open_videos=False)
        # A broken file named as an image stays one, so that its error says "image" (PyAV's image
        # demuxer would open it as a one-frame video and fail further on, less clearly).
        if kind is None and path.suffix.lower() in IMAGE_EXTENSIONS:
            kind = MediaKind.IMAGE
        if kind is None and _has_video_stream(path):
            kind = MediaKind.VIDEO
    if kind is None:
        why = ("it is empty" if empty else
               "PIL does not recognise it as an image and PyAV (FFmpeg) finds no video stream in it")
        raise MediaError(f"{name}: neither an image nor a video ({why}); supported: images PIL reads (e.g. .jpg, "
                         f".png, .webp, .bmp, .gif) and videos FFmpeg reads (e.g. .mp4, .mov, .mkv, .webm)")
    return kind


def probe_media_kind(path: str | os.PathLike, open_videos: bool = True) -> MediaKind | None:
    """"image" if PIL identifies the file, "video" for a known video extension or (open_videos)
    a file PyAV opens with a video stream, else None (not media: a note, a label file...)."""
    p = Path(path)
    if p.suffix.lower() in VIDEO_EXTENSIONS:
        return MediaKind.VIDEO
    if is_image(p):
        return MediaKind.IMAGE
    return MediaKind.VIDEO if open_videos and _has_video_stream(p) else None


def _has_video_stream(source: str | os.PathLike | bytes) -> bool:
    """Whether PyAV opens the file (or bytes) and finds a video stream: its header only, no decoding."""
    import av

    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            return bool(container.streams.video)
    except (av.FFmpegError, OSError, ValueError):
        return False
