"""Engine fixtures: a tiny Qwen2.5-VL checkpoint and a mixed set of small requests."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from PIL import Image

from qwen_vl_triton.engine.llm import Prompt
from qwen_vl_triton.engine.media import Media
from qwen_vl_triton.modeling.processing import SAMPLE_IMAGE_PATH, SAMPLE_VIDEO_PATH
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint

# Small media keep the interpreted kernels cheap: 4..16 merged tokens per image.
SMALL_IMAGE = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}
# 4 frames (2 temporal patches) of 4 x 6 merged tokens: the temporal positions (0 and 3 at 1.5 s
# per temporal patch) stay below max(h, w) = 6, where transformers agrees with Qwen's rule for
# the text after a video.
SMALL_VIDEO = {"nframes": 4, "min_pixels": 16 * 28 * 28, "max_pixels": 24 * 28 * 28}


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny25"), "qwen2_5_vl", seed=3)


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    """transformers' tokenizer of the tiny checkpoint (the oracle's)."""
    return transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)


def mixed_requests() -> list[tuple[Prompt, int]]:
    """8 requests as a server sees them, with their max_tokens: text only, images of different
    sizes (one or two per prompt), a video."""
    return [
        (Prompt("Tell me a story about the sea."), 6),
        (Prompt("What is in this picture?", [Media(SAMPLE_IMAGE_PATH, options=SMALL_IMAGE)]), 8),
        (Prompt("Describe.", [Media(random_image(61, 47, 1), options=SMALL_IMAGE)]), 5),
        (Prompt("hi"), 7),
        (Prompt("Compare them.", [Media(random_image(90, 130, 2), options=SMALL_IMAGE),
                                  Media(random_image(150, 60, 3), options=SMALL_IMAGE)]), 6),
        (Prompt("What happens in the clip?", [Media(SAMPLE_VIDEO_PATH, options=SMALL_VIDEO)]), 8),
        (Prompt("Name three colours and count to five."), 4),
        (Prompt("And this one?", [Media(random_image(47, 61, 4), options=SMALL_IMAGE)]), 8),
    ]
