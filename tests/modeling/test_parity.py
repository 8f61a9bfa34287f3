"""Parity with transformers' Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration
on tiny random checkpoints, fp32, every op on the Triton path (the interpreter on CPU).

For text, one image, two images of different sizes and one video, for both architectures: the
last prompt position's logits agree within 1e-3 relative norm, and 16 greedy tokens from our
paged-KV decode loop equal transformers' generate (given mm_token_type_ids, without which
transformers 5.x silently uses 1D positions), with every step's logits close too.

Pixel values are random patches in the processor's layout ([N, C * tp * p * p]); the grids are
those of 56x84 and 84x112 images and of 4 frames of 56x84 (2 temporal patches). The video's
temporal positions (0, 1 or 0, 2) stay below max(h, w) = 3 merged tokens, where transformers
follows Qwen's rule for the text after it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen_vl_triton.kernels import _backend
from qwen_vl_triton.modeling import vision
from qwen_vl_triton.modeling.model import QwenVLModel, load_model
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.modeling.greedy import greedy_generate, one_sequence_metadata

STEPS = 16
SMALL_IMAGE, LARGE_IMAGE = (1, 4, 6), (1, 6, 8)  # 56x84 and 84x112 px in 14-px patches
VIDEO = (2, 4, 6)  # 4 frames of 56x84 px, 2 frames per temporal patch
SECONDS_PER_GRID = 1.0  # temporal_patch_size 2 / 2 fps, as the video processor samples


def _hf_class(arch: str):
    import transformers

    return (transformers.Qwen2VLForConditionalGeneration if arch == "qwen2_vl"
            else transformers.Qwen2_5_VLForConditionalGeneration)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def models(request, tmp_path_factory):
    arch = request.param
    # window_size 56 px = 2x2 merged tokens: the small test images span several windows.
    extra = {"window_size": 56} if arch == "qwen2_5_vl" else {}
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, seed=1, **extra)
    ours = load_model(path, dtype=torch.float32)
    ref = _hf_class(arch).from_pretrained(path, dtype=torch.float32).eval()
    return ours, ref


def _patches(grids: list[tuple[int, int, int]], patch_dim: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.tensor(grids)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g), grid


def _prompt(model: QwenVLModel, parts: list) -> torch.Tensor:
    """Chat-like token ids: parts are text lengths (ints) or ("image" | "video", grid)."""
    c = model.config
    ids: list[int] = []
    for k, part in enumerate(parts):
        if isinstance(part, int):
            ids += [(37 * (i + 11 * k) + 5) % 500 for i in range(part)]
        else:
            token = c.image_token_id if part[0] == "image" else c.video_token_id
            n = int(torch.tensor(part[1]).prod()) // c.vision.merge_unit
            ids += [c.vision_start_token_id] + [token] * n + [c.vision_end_token_id]
    return torch.tensor(ids)


CASES = {
    "text": [12],
    "image": [4, ("image", SMALL_IMAGE), 5],
    "two_images": [3, ("image", LARGE_IMAGE), 2, ("image", SMALL_IMAGE), 4],
    "video": [3, ("video", VIDEO), 4],
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_transformers(models, case: str, backend: str, monkeypatch) -> None:
    """Triton kernels (the interpreter here) and the PyTorch references (the CPU path) alike."""
    monkeypatch.setenv("QVL_KERNELS", backend)
    ours, ref = models
    c = ours.config
    parts = CASES[case]
    ids = _prompt(ours, parts)
    images = [p[1] for p in parts if not isinstance(p, int) and p[0] == "image"]
    videos = [p[1] for p in parts if not isinstance(p, int) and p[0] == "video"]
    image = _patches(images, c.vision.patch_dim, seed=10) if images else None
    video = _patches(videos, c.vision.patch_dim, seed=20) if videos else None
    seconds = [SECONDS_PER_GRID] * len(videos) if videos else None

    before = dict(_backend.launch_counts)
    logits, tokens = greedy_generate(ours, ids, STEPS, image=image, video=video, second_per_grid_ts=seconds)
    ran = {k for k, v in _backend.launch_counts.items() if v > before.get(k, 0)}
    if backend == "triton":
        assert {"apply_mrope", "write_kv_cache", "paged_prefill_attention", "paged_attention"} <= ran
        if image or video:
            assert {"varlen_attention", "apply_rope"} <= ran
    else:
        assert not ran

    mm_types = torch.zeros_like(ids)
    mm_types[ids == c.image_token_id] = 1
    mm_types[ids == c.video_token_id] = 2
    kwargs = {}
    if image:
        kwargs.update(pixel_values=image[0], image_grid_thw=image[1])
    if video:
        kwargs.update(pixel_values_videos=video[0], video_grid_thw=video[1])
        if c.model_type == "qwen2_5_vl":
            kwargs.update(second_per_grid_ts=torch.tensor(seconds))
    with torch.no_grad():
        out = ref.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                           mm_token_type_ids=mm_types[None], max_new_tokens=STEPS, min_new_tokens=STEPS,
                           do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)
    ref_tokens = out.sequences[0, len(ids):].tolist()
    ref_logits = [step[0].float() for step in out.logits]

    first_err = float((logits[0] - ref_logits[0]).norm() / ref_logits[0].norm())
    assert first_err < 1e-3, f"last-position logits differ: relative error {first_err:.2e}"
    assert tokens == ref_tokens
    print(f"{c.model_type} {case}: first-step logits rel err {first_err:.2e}", end=" ")
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(logits, ref_logits, strict=True))
    print(f"worst over {STEPS} steps {worst:.2e}")
    assert worst < 1e-3, f"decode-step logits differ: relative error {worst:.2e}"


def _cast(obj, dtype: torch.dtype):
    """A copy of a weights dataclass (nested lists too) with every tensor cast to dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype)
    if isinstance(obj, list):
        return [_cast(o, dtype) for o in obj]
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _cast(getattr(obj, f.name), dtype)
                                           for f in dataclasses.fields(obj)})
    return obj


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's inf * 0 in the naive fp16 tower
def test_fp16_model_vision_stays_finite(tmp_path) -> None:
    """Activations past fp16's 65504 (as in Qwen2.5-VL-3B's late blocks): an fp16 tower gives
    inf/NaN, the fp16 model's tower (bf16 inside) gives finite fp16 embeddings."""
    path = make_tiny_checkpoint(tmp_path / "c", "qwen2_5_vl", seed=2, vision_depth=2,
                                fullatt_block_indexes=[1])
    model = load_model(path, dtype=torch.float16)
    assert model.weights.vision_dtype == torch.bfloat16
    model.weights.vision.patch_embed.mul_(4e4)  # patch embeddings of about 1e5
    pixels, grid = _patches([SMALL_IMAGE], model.config.vision.patch_dim, seed=3)

    fp16_tower = _cast(model.weights.vision, torch.float16)
    naive = vision.vision_forward(fp16_tower, model.config.vision, pixels, grid,
                                  out_dtype=torch.float32)  # no fp16 clamp on the way out
    assert not torch.isfinite(naive).all()  # the guard is needed for this input

    out = model.encode_media(pixels, grid)
    assert out.dtype == torch.float16 and out.shape == (6, model.config.text.hidden_size)
    assert torch.isfinite(out).all()


def test_checkpoint_layouts_give_the_same_logits(tmp_path) -> None:
    """flat config + legacy names, nested names in 3 shards, transformers' own save: one model."""
    paths = [
        make_tiny_checkpoint(tmp_path / "a", "qwen2_vl", seed=4),
        make_tiny_checkpoint(tmp_path / "b", "qwen2_vl", seed=4, layout="flat", weight_names="legacy"),
        make_tiny_checkpoint(tmp_path / "c", "qwen2_vl", seed=4, weight_names="language_model",
                             sharded=True, num_shards=3),
    ]
    ids = torch.tensor([3, 99, 250, 7, 42])
    results = []
    for path in paths:
        model = load_model(path, dtype="auto")
        assert model.dtype == torch.float32  # the checkpoint's dtype
        kv = model.allocate_kv_cache(1, 16)
        positions = torch.arange(len(ids)).expand(3, -1)
        hidden = model.forward(positions, one_sequence_metadata(0, len(ids), 1), kv, input_ids=ids)
        results.append(model.compute_logits(hidden, torch.tensor([len(ids) - 1])))
    for other in results[1:]:
        assert torch.equal(other, results[0])
