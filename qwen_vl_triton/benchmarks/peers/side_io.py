"""What the peer sides of benchmarks/e2e_peers.py share: their command line and their one JSON line.
Standard library only: the sides run in other venvs (vLLM's), beside this file, not the project."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(doc: str | None) -> argparse.Namespace:
    """CKPT IMAGE_DIR --text T --max_tokens N."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("images", type=Path, help="a folder of images: one request each, sorted by name")
    p.add_argument("--text", required=True, help="the user's text after the image")
    p.add_argument("--max_tokens", type=int, default=128)
    return p.parse_args()


def image_files(folder: Path) -> list[Path]:
    """The requests' images, in request order."""
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def report(side: str, generation_s: float, startup_s: float, prompt_tokens: list[int],
           output_ids: list[list[int]]) -> None:
    """The side's result, as the last line of its stdout."""
    print(json.dumps({"side": side, "generation_s": generation_s, "startup_s": startup_s,
                      "prompt_tokens": prompt_tokens, "output_ids": output_ids}))
