"""What a user asks for: a prompt's text and media, and the media turned into model inputs.

`Media` is one image or video as the user names it (a path, raw bytes or a PIL image) with
qwen-vl-utils' per-item controls; `prepare_media` decodes and preprocesses it and gives it a
content hash, which keys the encoder cache and the prefix cache (two requests with the same
pixels share both; the same file with other controls does not).
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from modeling import processing
from modeling.processing import ImageProcessorConfig, MediaError

IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels",
                 "video_start", "video_end", "resized_height", "resized_width")


@dataclass
class Media:
    """One image or video of a prompt.

    source: a file path, the file's bytes, or a PIL image. kind: "image" / "video", or None to
    tell from the file. options: qwen-vl-utils' controls (IMAGE_OPTIONS / VIDEO_OPTIONS).
    """

    source: str | Path | bytes | Image.Image
    kind: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """A short name for messages and outputs (the path, or the kind of in-memory data)."""
        if isinstance(self.source, (str, Path)):
            return str(self.source)
        return f"<{self.kind or 'media'} {'bytes' if isinstance(self.source, bytes) else 'PIL image'}>"


@dataclass
class PreparedMedia:
    """A medium as the model takes it.

    pixel_values: float32 [t*h*w, 3*temporal_patch*patch^2]; grid: (t, h, w) in patches;
    second_per_grid_t: seconds per temporal patch (videos; 1.0 for images, unused there);
    content_hash: sha256 hex of the bytes + kind + controls.
    """

    kind: str
    pixel_values: torch.Tensor
    grid: tuple[int, int, int]
    second_per_grid_t: float
    content_hash: str


def _content_digest(media: Media) -> hashlib._Hash:
    """sha256 of the medium's content: file bytes read in chunks (never the whole file at once)."""
    digest = hashlib.sha256()
    if isinstance(media.source, bytes):
        digest.update(media.source)
    elif isinstance(media.source, Image.Image):
        digest.update(f"{media.source.mode}{media.source.size}".encode())
        digest.update(media.source.tobytes())
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


def _kind_of(media: Media) -> str:
    if media.kind is not None:
        if media.kind not in ("image", "video"):
            raise MediaError(f"media kind must be 'image' or 'video', got {media.kind!r}")
        return media.kind
    if isinstance(media.source, Image.Image):
        return "image"
    if isinstance(media.source, (str, Path)):
        return processing.media_kind(media.source)
    try:
        with Image.open(io.BytesIO(media.source)):
            return "image"
    except (OSError, ValueError):
        return "video"


def _open_image(media: Media) -> Image.Image:
    if isinstance(media.source, Image.Image):
        return media.source
    try:
        image = Image.open(media.source if not isinstance(media.source, bytes) else io.BytesIO(media.source))
        image.load()
    except (OSError, ValueError) as e:
        raise MediaError(f"{media.describe()}: not a readable image ({e})") from e
    return image


def prepare_media(media: Media, cfg: ImageProcessorConfig) -> PreparedMedia:
    """Decode and preprocess one medium; raises MediaError (a ValueError) naming the problem."""
    if isinstance(media.source, bytes) and not media.source:
        raise MediaError(f"{media.describe()}: empty data")
    digest = _content_digest(media)
    kind = _kind_of(media)
    allowed = IMAGE_OPTIONS if kind == "image" else VIDEO_OPTIONS
    unknown = sorted(set(media.options) - set(allowed))
    if unknown:
        raise MediaError(f"{media.describe()}: unknown {kind} option(s) {unknown}; allowed: {list(allowed)}")
    options = {k: v for k, v in media.options.items() if v is not None}
    digest.update(json.dumps([kind, sorted(options.items())], default=str).encode())
    if kind == "image":
        pixel_values, grid = processing.process_image(_open_image(media), cfg, **options)
        return PreparedMedia(kind, pixel_values, tuple(grid), 1.0, digest.hexdigest())
    if isinstance(media.source, (str, Path)):
        pixel_values, grid, spgt = processing.process_video(media.source, cfg, **options)
    else:  # PyAV reads files: spill in-memory video bytes to a temporary one
        with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
            tmp.write(media.source)
            tmp.flush()
            pixel_values, grid, spgt = processing.process_video(tmp.name, cfg, **options)
    return PreparedMedia(kind, pixel_values, tuple(grid), float(spgt), digest.hexdigest())
