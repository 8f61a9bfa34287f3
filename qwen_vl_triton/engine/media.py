"""What a user asks for: a prompt's text and media, and the media turned into model inputs.

`Media` is one image or video as the user names it (a path, raw bytes, a PIL image, or a video
as a list of frames) with qwen-vl-utils' per-item controls; `prepare_media` checks those controls
against the server's `MediaLimits`, preprocesses images and *plans* videos, and gives each a
content hash (of the file's bytes, the image's or the frames' pixels), which keys
the encoder cache and the prefix cache (two requests with the same pixels share both; the same
file with other controls does not).

A video is never held decoded: its `PreparedMedia` keeps the plan (which frames, what size), and
`frame_slices` decodes a few temporal patches at a time (the engine does it ahead of the vision
tower, on a background thread: engine/frame_stream.py). `fit_videos` shrinks the videos of a
prompt that would not fit the context, as qwen-vl-utils' total-pixel budget does: fewer pixels
per frame first, then fewer frames.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwen_vl_triton.engine.errors import RequestMediaError
from qwen_vl_triton.modeling import processing
from qwen_vl_triton.modeling.processing import ImageProcessorConfig, MediaError, MediaKind, VideoPlan

IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels",
                 "video_start", "video_end", "resized_height", "resized_width")
_INT_OPTIONS = {"min_pixels", "max_pixels", "resized_height", "resized_width", "nframes", "min_frames",
                "max_frames", "total_pixels"}


class MediaOptionError(MediaError):
    """A media control (max_pixels, fps, ...) that is unknown, malformed or over the limits: the
    request's fault, whatever the file holds."""


PROCESSOR_KWARGS = tuple(dict.fromkeys((*IMAGE_OPTIONS, *VIDEO_OPTIONS)))  # what mm_processor_kwargs may set


def with_processor_kwargs(kind: MediaKind | str, options: dict[str, Any], kwargs: dict[str, Any] | None
                          ) -> dict[str, Any]:
    """A medium's controls with a request's `mm_processor_kwargs` (vLLM's: one set for all its
    media) under them: each kwarg that applies to the medium's kind fills a control its own
    `options` leave unset (fps, say, applies to videos only). MediaOptionError naming a kwarg that
    is no control of any kind. Limits are checked later, as for the medium's own controls
    (MediaLimits.check)."""
    if not kwargs:
        return options
    unknown = sorted(set(kwargs) - set(PROCESSOR_KWARGS))
    if unknown:
        raise MediaOptionError(f"mm_processor_kwargs: unknown key(s) {unknown}; accepted: {list(PROCESSOR_KWARGS)}")
    video = MediaKind(kind) == MediaKind.VIDEO
    filled = {k: v for k, v in kwargs.items() if k in (VIDEO_OPTIONS if video else IMAGE_OPTIONS) and v is not None}
    if video:
        for a, b in (("fps", "nframes"), ("nframes", "fps")):  # the medium's own choice replaces the other
            if options.get(a) is not None:
                filled.pop(b, None)
    return {**filled, **{k: v for k, v in options.items() if v is not None}}


@dataclass
class Media:
    """One image or video of a prompt.

    source: a file path, the file's bytes, a PIL image, or a video as frames (a list of PIL images
    or uint8 [H, W, 3] arrays, or a uint8 [T, H, W, 3] array; taken at options["fps"], 2 by
    default: processing.plan_frames). kind: a MediaKind (or its value), or None to tell from the
    file. options: qwen-vl-utils' controls (IMAGE_OPTIONS / VIDEO_OPTIONS).
    """

    source: str | Path | bytes | Image.Image | list | tuple | np.ndarray
    kind: MediaKind | str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """A short name for messages and outputs (the path, or the kind of in-memory data)."""
        if isinstance(self.source, (str, Path)):
            return str(self.source)
        if _is_frames(self.source):
            return f"<video of {len(self.source)} frames>"
        return f"<{self.kind or 'media'} {'bytes' if isinstance(self.source, bytes) else 'PIL image'}>"


def _is_frames(source: Any) -> bool:
    """Whether a Media source is a video given as frames."""
    return isinstance(source, (list, tuple, np.ndarray))


@dataclass(frozen=True)
class MediaLimits:
    """Server-wide media policy: defaults for the controls a request leaves unset, and hard limits
    no request may pass (a value over one is an error naming the limit, never a silent clamp).

    image_max_pixels: an image's max_pixels / resized area; video_max_pixels: per frame;
    video_max_total_pixels: all frames of one video; video_max_frames: sampled frames;
    video_max_fps: sampling rate. Defaults are qwen-vl-utils' own maxima.
    decode_max_pixels: an image's or a video frame's size as its file declares it, checked from the
    header before decoding (default: PIL's decompression-bomb threshold); max_media_per_prompt:
    images and videos in one prompt, counted before any is read.
    """

    image_max_pixels: int = processing.MAX_PIXELS
    video_max_pixels: int = processing.VIDEO_MAX_PIXELS
    video_max_total_pixels: int = processing.VIDEO_TOTAL_PIXELS
    video_max_frames: int = processing.FPS_MAX_FRAMES
    video_max_fps: float = 30.0
    decode_max_pixels: int = processing.DECODE_MAX_PIXELS
    max_media_per_prompt: int = 32
    image_defaults: dict[str, Any] = field(default_factory=dict)
    video_defaults: dict[str, Any] = field(default_factory=dict)

    def check_count(self, count: int) -> None:
        """MediaOptionError naming the limit when one prompt holds more than max_media_per_prompt media."""
        if count > self.max_media_per_prompt:
            raise MediaOptionError(f"{count} images and videos in one prompt, over the configured limit of "
                                   f"{self.max_media_per_prompt} (max_media_per_prompt)")

    def check(self, kind: MediaKind, options: dict[str, Any], name: str) -> dict[str, Any]:
        """The request's options over this policy's defaults, validated; MediaError names the
        first control out of range and its limit."""
        allowed = IMAGE_OPTIONS if kind == MediaKind.IMAGE else VIDEO_OPTIONS
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise MediaOptionError(f"{name}: unknown {kind} option(s) {unknown}; allowed: {list(allowed)}")
        given = {k: v for k, v in options.items() if v is not None}
        defaults = dict(self.image_defaults if kind == MediaKind.IMAGE else self.video_defaults)
        for a, b in (("fps", "nframes"), ("nframes", "fps")):  # a request's own choice replaces the other
            if a in given:
                defaults.pop(b, None)
        merged = {**defaults, **given}

        def bad(key: str, rule: str) -> MediaError:
            return MediaOptionError(f"{name}: {key}={merged[key]!r} {rule}")

        for key, value in merged.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(key, "must be a number")
            if key in _INT_OPTIONS and value != int(value):
                raise bad(key, "must be an integer")
            if value < 0 or (value == 0 and key not in ("video_start",)):
                raise bad(key, "must be positive")
        pixel_cap = self.image_max_pixels if kind == MediaKind.IMAGE else self.video_max_pixels
        for key in ("min_pixels", "max_pixels"):
            if key in merged and merged[key] > pixel_cap:
                raise bad(key, f"is over the configured limit of {pixel_cap} pixels per {kind}"
                               f"{'' if kind == MediaKind.IMAGE else ' frame'}")
        if "min_pixels" in merged and "max_pixels" in merged and merged["min_pixels"] > merged["max_pixels"]:
            raise bad("min_pixels", f"is above max_pixels={merged['max_pixels']}")
        if ("resized_height" in merged) != ("resized_width" in merged):
            raise MediaOptionError(f"{name}: give both resized_height and resized_width, or neither")
        if "resized_height" in merged and merged["resized_height"] * merged["resized_width"] > pixel_cap:
            raise bad("resized_height", f"x resized_width={merged['resized_width']} is over the configured limit "
                                        f"of {pixel_cap} pixels")
        if kind == MediaKind.VIDEO:
            self._check_video(merged, bad)
        return merged

    def _check_video(self, merged: dict[str, Any], bad) -> None:
        if "fps" in merged and "nframes" in merged:
            raise bad("nframes", "cannot be combined with fps: give one")
        if merged.get("fps", 0) > self.video_max_fps:
            raise bad("fps", f"is over the configured limit of {self.video_max_fps} frames per second")
        for key in ("nframes", "min_frames", "max_frames"):
            if key in merged and not processing.FRAME_FACTOR <= merged[key] <= self.video_max_frames:
                raise bad(key, f"must be in [{processing.FRAME_FACTOR}, {self.video_max_frames}] (the server's "
                               f"frame limit)")
        if merged.get("min_frames", 0) > merged.get("max_frames", math.inf):
            raise bad("min_frames", f"is above max_frames={merged['max_frames']}")
        if merged.get("total_pixels", 0) > self.video_max_total_pixels:
            raise bad("total_pixels", f"is over the configured limit of {self.video_max_total_pixels} pixels per video")
        if merged.get("video_start", 0) >= merged.get("video_end", math.inf):
            raise bad("video_start", f"must be before video_end={merged['video_end']}")

    def video_plan_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Controls for processing.plan_video: the request's, with the server's frame and total
        limits applied where the request leaves them to qwen-vl-utils' defaults, and its decode
        limit on the frame size the file declares."""
        plan = dict(options, max_frame_pixels=self.decode_max_pixels)
        plan.setdefault("max_frames", self.video_max_frames)
        plan.setdefault("total_pixels", self.video_max_total_pixels)
        if "resized_height" not in plan:
            plan.setdefault("max_pixels", self.video_max_pixels)
        return plan


DEFAULT_LIMITS = MediaLimits()


@dataclass
class PreparedMedia:
    """A medium as the model takes it.

    grid: (t, h, w) in patches; second_per_grid_t: seconds per temporal patch (videos; 1.0 for
    images, unused there); content_hash: sha256 hex of the bytes + kind + controls.
    Images hold their patches (`image_pixels`, float32 [h*w, 3*temporal_patch*patch^2]); videos
    hold their plan and are decoded a few temporal patches at a time by `frame_slices`.
    """

    kind: MediaKind
    grid: tuple[int, int, int]
    second_per_grid_t: float
    content_hash: str
    cfg: ImageProcessorConfig
    image_pixels: torch.Tensor | None = None
    video_plan: VideoPlan | None = None
    video_options: dict[str, Any] = field(default_factory=dict)
    adjustment: str | None = None  # how fit_videos shrank it, for the response's usage info
    label: str | None = None  # how the request names it (the server's part path), for error messages
    spill: Any = None  # a temporary file holding in-memory video bytes, kept while this lives

    def frame_slices(self, max_slices: int) -> Iterator[np.ndarray]:
        """A video's planned frames, decoded and resized in temporal order: uint8 [n * tp, H, W, 3]
        with n <= max_slices temporal patches (tp = temporal_patch_size frames each). A clip whose
        frames fail to decode or resize raises RequestMediaError: the request's content, not the
        engine's."""
        assert self.video_plan is not None, "frame_slices is for videos"
        try:
            yield from processing.iter_video_frames(self.video_plan, max(1, max_slices) * self.cfg.temporal_patch_size)
        except Exception as e:  # noqa: BLE001 - PyAV and PIL raise many kinds for a corrupt file
            name = self.video_plan.path or "the video's frames"
            message = str(e) if isinstance(e, MediaError) else f"{name}: cannot decode the video: {e}"
            raise RequestMediaError(message[:500], self.label) from e

    def pixel_chunks(self, max_slices: int) -> Iterator[tuple[torch.Tensor, tuple[int, int, int]]]:
        """(pixel_values [t_chunk*h*w, patch_dim] float32, grid (t_chunk, h, w)) in temporal order,
        at most max_slices temporal patches at a time (decoded by `frame_slices`); an image is one chunk."""
        if self.image_pixels is not None:
            yield self.image_pixels, self.grid
            return
        for frames in self.frame_slices(max_slices):
            pixel_values, grid = processing.patchify(frames, self.cfg)
            yield pixel_values, tuple(grid)

    @property
    def pixel_values(self) -> torch.Tensor:
        """All patches at once (images; videos are decoded whole here: for oracles and small clips)."""
        if self.image_pixels is not None:
            return self.image_pixels
        return torch.cat([pv for pv, _ in self.pixel_chunks(self.grid[0])])

    @property
    def num_tokens(self) -> int:
        """LLM tokens of this medium: t * h * w / merge_size^2."""
        t, h, w = self.grid
        return t * h * w // self.cfg.merge_size**2

    def for_peers(self) -> PreparedMedia:
        """What travels to the other ranks under tensor parallelism: everything but the spilled
        file and given frames (they never read media; rank 0 ships a video's frames as they are
        encoded)."""
        plan = self.video_plan
        if plan is not None and plan.frames is not None:
            return replace(self, spill=None, video_plan=replace(plan, frames=None))
        return self if self.spill is None else replace(self, spill=None)


def _content_digest(media: Media) -> hashlib._Hash:
    """sha256 of the medium's content: file bytes read in chunks (never the whole file at once)."""
    digest = hashlib.sha256()
    if isinstance(media.source, bytes):
        digest.update(media.source)
    elif isinstance(media.source, Image.Image):
        digest.update(f"{media.source.mode}{media.source.size}".encode())
        digest.update(media.source.tobytes())
    elif _is_frames(media.source):  # processing.video_frames' arrays
        for frame in media.source:
            digest.update(f"{frame.shape}".encode())
            digest.update(np.ascontiguousarray(frame).data)
    else:
        path = Path(media.source)
        if not path.is_file():
            raise MediaError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise MediaError(f"{path}: empty file")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest


def _kind_of(media: Media) -> MediaKind:
    """The medium's kind: as given, else told from its content (processing.media_kind)."""
    if media.kind is not None:
        try:
            return MediaKind(media.kind)
        except ValueError:
            raise MediaError(f"media kind must be 'image' or 'video', got {media.kind!r}") from None
    if isinstance(media.source, Image.Image):
        return MediaKind.IMAGE
    if _is_frames(media.source):
        return MediaKind.VIDEO
    return processing.media_kind(media.source, media.describe())  # MediaError if neither


def _open_image(media: Media, limits: MediaLimits) -> Image.Image:
    if isinstance(media.source, Image.Image):
        return media.source
    return processing.open_image(media.source, limits.decode_max_pixels, media.describe())


# Controls of a video file's clip that a video given as frames has no use for.
_CLIP_ONLY_OPTIONS = ("video_start", "video_end")


def _plan(source: str | Path | tuple[np.ndarray, ...], cfg: ImageProcessorConfig,
          options: dict[str, Any]) -> tuple[VideoPlan, float]:
    """The plan of a video file (its path) or of given frames, and its seconds per temporal patch."""
    if isinstance(source, tuple):
        plan = processing.plan_frames(source, cfg, **options)
    else:
        plan = processing.plan_video(source, cfg, **options)
    return plan, cfg.temporal_patch_size / plan.sample_fps


def prepare_media(media: Media, cfg: ImageProcessorConfig, limits: MediaLimits = DEFAULT_LIMITS) -> PreparedMedia:
    """Check, hash and preprocess one medium (a video is only planned: see `frame_slices`).
    Raises MediaError (a ValueError) naming the problem and, for controls, the limit."""
    if isinstance(media.source, bytes) and not media.source:
        raise MediaError(f"{media.describe()}: empty data")
    if _is_frames(media.source):
        media = replace(media, source=processing.video_frames(media.source, media.describe()))
    digest = _content_digest(media)
    kind = _kind_of(media)
    options = limits.check(kind, media.options, media.describe())
    digest.update(json.dumps([kind, sorted(options.items())], default=str).encode())
    if isinstance(media.source, tuple):  # a video given as frames
        if kind != MediaKind.VIDEO:
            raise MediaError(f"{media.describe()}: a list of frames is a video, not an {kind}")
        clip_only = sorted(set(options) & set(_CLIP_ONLY_OPTIONS))
        if clip_only:
            raise MediaOptionError(f"{media.describe()}: {clip_only} apply to video files, not to a video given as "
                                   "frames")
        plan_options = limits.video_plan_options(options)
        plan, spgt = _plan(media.source, cfg, plan_options)
        return PreparedMedia(kind, plan.grid(cfg), spgt, digest.hexdigest(), cfg, video_plan=plan,
                             video_options=plan_options)
    if kind == MediaKind.IMAGE:
        pixel_values, grid = processing.process_image(_open_image(media, limits), cfg, **options)
        return PreparedMedia(kind, tuple(grid), 1.0, digest.hexdigest(), cfg, image_pixels=pixel_values)
    spill = None
    path = media.source
    if not isinstance(path, (str, Path)):  # PyAV reads files: spill in-memory video bytes to one
        spill = tempfile.NamedTemporaryFile(suffix=".video")  # noqa: SIM115 - lives as long as the medium
        spill.write(media.source)
        spill.flush()
        path = spill.name
    plan_options = limits.video_plan_options(options)
    plan, spgt = _plan(path, cfg, plan_options)
    return PreparedMedia(kind, plan.grid(cfg), spgt, digest.hexdigest(), cfg, video_plan=plan,
                         video_options=plan_options, spill=spill)


def fit_videos(media: list[PreparedMedia], budget: int, limit_name: str) -> list[str]:
    """Shrink the videos of one prompt (in place) until all media take at most `budget` tokens.

    As qwen-vl-utils' total-pixel budget: each video's share of what the images leave, taken from
    its pixels per frame first (down to its min_pixels), then from its frame count (down to its
    min_frames, 4 by default). Returns one line per changed video, for the response's usage info;
    raises MediaError naming `limit_name` when even the smallest allowed sizes do not fit.
    """
    videos = [m for m in media if m.kind == MediaKind.VIDEO and m.video_plan is not None]
    total = sum(m.num_tokens for m in media)
    if total <= budget or not videos:
        if total > budget:
            raise MediaError(f"the prompt's images take {total} tokens, more than the {budget} that {limit_name} "
                             f"leaves after the text; lower their max_pixels")
        return []
    room = budget - sum(m.num_tokens for m in media if m not in videos)
    video_tokens = sum(m.num_tokens for m in videos)
    notes = []
    for i, m in enumerate(videos):
        share = room * m.num_tokens // video_tokens
        before = (len(m.video_plan.indices), m.video_plan.height, m.video_plan.width, m.num_tokens)
        _shrink_video(m, share, limit_name)
        after = (len(m.video_plan.indices), m.video_plan.height, m.video_plan.width, m.num_tokens)
        m.adjustment = (f"video {i}: {before[0]} frames of {before[2]}x{before[1]} ({before[3]} tokens) -> "
                        f"{after[0]} frames of {after[2]}x{after[1]} ({after[3]} tokens) to fit {limit_name}")
        notes.append(m.adjustment)
    return notes


def _shrink_video(m: PreparedMedia, tokens: int, limit_name: str) -> None:
    """Re-plan one video to at most `tokens` LLM tokens: fewer pixels per frame, then fewer frames."""
    cfg, options = m.cfg, dict(m.video_options)
    pixels_per_token = (cfg.patch_size * cfg.merge_size) ** 2
    options.pop("resized_height", None)
    options.pop("resized_width", None)
    # tokens = frames / temporal_patch * pixels per frame / pixels_per_token, and qwen-vl-utils' per-frame
    # cap is total_pixels / frames * temporal_patch: so total_pixels = tokens * pixels_per_token.
    options["total_pixels"] = max(1, tokens * pixels_per_token)
    plan, spgt = _plan(m.video_plan.source, cfg, options)
    if plan.grid(cfg)[0] * plan.grid(cfg)[1] * plan.grid(cfg)[2] // cfg.merge_size**2 > tokens:
        # At the smallest frame size: fewer frames (an even count, not below min_frames).
        t, h, w = plan.grid(cfg)
        per_patch = h * w // cfg.merge_size**2
        frames = cfg.temporal_patch_size * (tokens // per_patch)
        min_frames = int(options.get("min_frames", processing.FPS_MIN_FRAMES))
        if frames < min_frames:
            smallest = min_frames // cfg.temporal_patch_size * per_patch
            name = m.video_plan.path or "the video's frames"
            raise MediaError(f"{name}: even at its smallest ({min_frames} frames at min_pixels: "
                             f"{smallest} tokens) the video does not fit the {tokens} tokens left by {limit_name}; "
                             f"lower min_pixels or min_frames, or use a part of the clip (video_start/video_end)")
        if m.video_plan.frames is None:  # a file's sampling rate; given frames keep theirs
            options.pop("fps", None)
        options["nframes"] = frames
        plan, spgt = _plan(m.video_plan.source, cfg, options)
    m.video_plan, m.second_per_grid_t, m.video_options = plan, spgt, options
    m.grid = plan.grid(cfg)
    # Other frames, other embeddings: the caches must not mistake it for the unshrunk video.
    m.content_hash = hashlib.sha256(f"{m.content_hash}{sorted(options.items())}".encode()).hexdigest()
