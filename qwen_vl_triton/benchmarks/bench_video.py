"""Video scaling: vision-encoder time and peak memory against the sampled frame count, for the
chunked path (decode and encode a few temporal slices at a time) and the one-call path.

On a GPU the tower has Qwen2.5-VL-7B's vision shapes (random weights), frames of 128 merged
tokens per frame pair and the engine's default 16384 patches per vision call (32 temporal slices);
on the CPU a small tower (the tiny checkpoint's), 12-token frame pairs and 1024 patches per call
(21 slices), because the CPU cannot run the real tower over hundreds of frames in a benchmark's
time: the CPU table shows the shape of the curves, not the real model's cost. Times include decoding and
patchifying the frames. Peak memory: GPU memory allocated (in process), or on the CPU the growth
of the peak resident set of a fresh process per point.

    python benchmarks/bench_video.py --point CKPT CLIP FRAMES CHUNK_PATCHES DEVICE   # one point (internal)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

FRAME_COUNTS = [16, 64, 256, 768]
ONE_CALL = 1 << 30  # vision_chunk_patches that never splits a clip


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure_point(checkpoint: str, clip: str, frames: int, chunk_patches: int, device: str,
                  tokens_per_frame_pair: int) -> dict:
    """Time (median of 3) and peak memory of encoding `frames` sampled frames of the clip."""
    import torch

    from qwen_vl_triton.engine.llm import LLM
    from qwen_vl_triton.engine.media import Media

    llm = LLM(checkpoint, device=device, num_kv_blocks=2, vision_chunk_patches=chunk_patches)
    pixels = tokens_per_frame_pair * 784
    media = Media(clip, options={"nframes": frames, "min_pixels": pixels, "max_pixels": pixels})
    prepared = llm.preprocessor.prepare_media(media)
    llm.encoder.encode([llm.preprocessor.prepare_media(Media(clip, options={**media.options, "nframes": 4}))])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_kib("VmRSS") * 1024
    times = []
    for _ in range(3):
        started = time.perf_counter()
        llm.encoder.encode([prepared])
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
    return {"ms": sorted(times)[1] * 1e3, "peak_bytes": peak - base, "tokens": prepared.num_tokens,
            "grid": prepared.grid}


def _point_in_fresh_process(*args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # peak RSS = live memory, not glibc's retention
    done = subprocess.run([sys.executable, __file__, "--point", *map(str, args)], capture_output=True, text=True,
                          env=env, check=False, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assets(device: str) -> tuple[Path, Path, int]:
    """(checkpoint, clip of 800 frames, merged tokens per frame pair) for this device."""
    from qwen_vl_triton.testing.media import write_synthetic_video
    from qwen_vl_triton.testing.tiny_checkpoint import cache_dir, cached_checkpoint

    root = cache_dir()
    clip = root / "bench-video-800f.mp4"
    if not clip.exists():
        root.mkdir(parents=True, exist_ok=True)
        write_synthetic_video(clip, seconds=400, fps=2, width=320, height=240)
    if device == "cuda":  # Qwen2.5-VL-7B's vision tower, a one-layer language model behind it
        ckpt = cached_checkpoint("bench-video-7b-vision", "qwen2_5_vl", dtype="bfloat16", hidden_size=3584,
                                 intermediate_size=256, num_hidden_layers=1, num_attention_heads=28,
                                 num_key_value_heads=4, vision_embed_dim=1280, vision_num_heads=16,
                                 vision_intermediate_size=3420, vision_depth=32,
                                 fullatt_block_indexes=[7, 15, 23, 31], init_std=0.02)
        return ckpt, clip, 128
    return cached_checkpoint("bench-video-tiny", "qwen2_5_vl", seed=0), clip, 16


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("chunked", "one call"):
        pts = [r for r in rows if r["mode"] == mode]
        frames = [r["frames"] for r in pts]
        ax_t.plot(frames, [r["ms"] / 1e3 for r in pts], marker="o", label=mode)
        ax_m.plot(frames, [r["peak_bytes"] / 2**20 for r in pts], marker="o", label=mode)
    for ax, label in ((ax_t, "vision encoder time (s)"), (ax_m, "peak memory growth (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampled frames")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx) -> None:
    from qwen_vl_triton.benchmarks.common import RESULTS_DIR, device_name

    device = ctx.device.type
    ckpt, clip, tokens = _assets(device)
    chunk_patches = 16384 if device == "cuda" else 1024
    rows = []
    for frames in FRAME_COUNTS:
        for mode, patches in (("chunked", chunk_patches), ("one call", ONE_CALL)):
            args = (ckpt, clip, frames, patches, device, tokens)
            point = measure_point(*map(str, args[:2]), frames, patches, device, tokens) if device == "cuda" \
                else _point_in_fresh_process(*args)
            rows.append({"mode": mode, "frames": frames, **point})
            ctx.record("video", "encode_video", f"{frames} frames grid {tuple(point['grid'])}", "model dtype",
                       mode, point["ms"], note=f"peak +{point['peak_bytes'] / 2**20:.1f} MiB")
    which = "Qwen2.5-VL-7B vision shapes" if device == "cuda" else "tiny vision tower on CPU (shape of the curves only)"
    path = RESULTS_DIR / f"{device_name(ctx.device)}-video.png"
    plot(rows, path, f"video encoding vs frames: {which}")
    print(f"  wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--point":
        ckpt, clip, frames, patches, device, tokens = sys.argv[2:8]
        print(json.dumps(measure_point(ckpt, clip, int(frames), int(patches), device, int(tokens))))
    else:
        print(__doc__)
