"""Synthetic media for tests, demos and benchmarks: deterministic pictures, and clips of them
(PyAV), so the repository holds no binary media beyond the bundled sample assets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_synthetic_video(path: str | os.PathLike, seconds: float = 3.0, fps: int = 10, width: int = 64,
                          height: int = 48, codec: str = "mpeg4") -> Path:
    """Encode `seconds * fps` synthetic frames (a square moving across) with PyAV; returns the path.
    mpeg4 and libx264 ("h264") both encode here; sizes should be even for yuv420p."""
    import av

    path = Path(path)
    n = int(round(seconds * fps))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 2_000_000  # clean frames: tests locate the square in each one
        for i in range(n):
            picture = synthetic_frame(height, width, i / max(n - 1, 1))
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def synthetic_frame(height: int, width: int, t: float = 0.0) -> np.ndarray:
    """A deterministic uint8 [height, width, 3] picture: colour gradients, a red square (the only
    pixels with red > 140) that moves right with t (0..1) and a blue disc; varied enough that
    resizing and patch order matter."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), dtype=np.float32)
    img[..., 0] = 40 + 100 * x / max(width - 1, 1)  # red stays below 140: only the square is red
    img[..., 1] = 255 * y / max(height - 1, 1)
    img[..., 2] = 127 + 100 * np.sin((x + y) / 7.0)
    side = max(2, min(height, width) // 4)
    x0 = int((width - side) * t)
    img[height // 8: height // 8 + side, x0: x0 + side] = (220, 30, 30)
    cy, cx, r = 0.7 * height, 0.3 * width, max(2.0, min(height, width) / 6)
    img[(y - cy) ** 2 + (x - cx) ** 2 <= r * r] = (30, 60, 220)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)
