"""Materialise the hand-made TextVQA / VideoBench sets with synthetic media.

The question files under tests/data are written by hand in the datasets' formats; the images and
clips they name are generated here (deterministic pictures from qwen_vl_triton.testing.media), so the
repository holds no binary media:

    python tests/data/make_media.py OUT      # copies textvqa/ and videobench/ to OUT, adds media

OUT/textvqa/textvqa_val.jsonl (+ annotations) and OUT/videobench/Eval_QA/*.json are then ready
for tools/benchmark.py and tools/eval.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from qwen_vl_triton.testing.media import synthetic_frame, write_synthetic_video

HERE = Path(__file__).resolve().parent


def make_media(out: str | Path) -> Path:
    """Copy the question files to `out` and write every image / video they reference."""
    from PIL import Image

    out = Path(out)
    for name in ("textvqa", "videobench"):
        shutil.copytree(HERE / name, out / name, dirs_exist_ok=True)
    textvqa = out / "textvqa"
    for i, line in enumerate((textvqa / "textvqa_val.jsonl").read_text().splitlines()):
        image = textvqa / json.loads(line)["image"]
        if not image.exists():
            image.parent.mkdir(parents=True, exist_ok=True)
            height, width = 56 + 28 * (i % 3), 84 + 14 * (i % 4)  # small: 6..20 merged tokens each
            Image.fromarray(synthetic_frame(height, width, t=i / 5)).save(image)
    videobench = out / "videobench"
    for qa in sorted((videobench / "Eval_QA").glob("*.json")):
        for item in json.loads(qa.read_text()).values():
            video = videobench / item["vid_path"]
            if not video.exists():
                video.parent.mkdir(parents=True, exist_ok=True)
                write_synthetic_video(video, seconds=2.0, fps=4, width=64, height=48)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(make_media(sys.argv[1]))
