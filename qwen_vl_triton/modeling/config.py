"""config.json -> plain, frozen dataclasses for Qwen2-VL, QVQ and Qwen2.5-VL.

Two layouts exist in the wild and both are read:
  flat    (hub checkpoints): text fields at the top level, `rope_scaling: {type: mrope,
          mrope_section}` and `rope_theta` beside them, `vision_config` nested;
  nested  (transformers 5.x saves): `text_config` with `rope_parameters: {rope_theta,
          mrope_section}`, `vision_config` nested.
The two vision towers name their widths differently (Qwen2-VL: `embed_dim` is the ViT width and
`hidden_size` the merger's output; Qwen2.5-VL: `hidden_size` is the ViT width and
`out_hidden_size` the output); VisionConfig gives both one meaning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # QVQ-72B-Preview is a qwen2_vl

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
           "float": torch.float32}

# Qwen2.5-VL releases set tokens_per_second=2 in vision_config; transformers' class default is 4.
# A checkpoint without the field gets Qwen's value (see docs/DESIGN.md, "Model facts").
_DEFAULT_TOKENS_PER_SECOND = 2


class ConfigError(ValueError):
    """config.json is missing something the model needs, or names an unsupported model."""


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder. head_dim is hidden_size // num_heads (as transformers computes it)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]  # frequencies per axis (t, h, w); sums to head_dim // 2
    max_position_embeddings: int


@dataclass(frozen=True)
class VisionConfig:
    """The ViT. `hidden_size` is the tower's own width for both architectures.

    norm: "layernorm" (Qwen2-VL, with QuickGELU fc1/fc2 MLP) or "rmsnorm" (Qwen2.5-VL, with a
    gated SiLU MLP with biases). window_size / fullatt_block_indexes / tokens_per_second only
    matter for Qwen2.5-VL (window attention, video temporal position scaling).
    """

    depth: int
    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    out_hidden_size: int  # = the decoder's hidden size
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    hidden_act: str
    norm: str
    rope_theta: float
    window_size: int | None
    fullatt_block_indexes: tuple[int, ...]
    tokens_per_second: float

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch of pixel_values: C * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LLM token (spatial_merge_size ** 2)."""
        return self.spatial_merge_size**2


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint's config: the decoder, the vision tower and the special tokens."""

    model_type: str  # "qwen2_vl" (also QVQ) or "qwen2_5_vl"
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    tie_word_embeddings: bool
    torch_dtype: torch.dtype | None  # the checkpoint's dtype, when config.json names one


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json: {where} has no {key!r}")
    return d[key]


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def parse_dtype(name: Any) -> torch.dtype | None:
    """'bfloat16' / 'torch.float16' / torch dtype -> torch dtype; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; use one of float32, float16, bfloat16")
    return _DTYPES[key]


def _text_config(d: dict[str, Any], text: dict[str, Any]) -> TextConfig:
    """`text` is text_config (nested layout) or the top level (flat layout)."""
    where = "text_config" if text is not d else "the top level"
    rope = _first(text.get("rope_parameters"), text.get("rope_scaling"), d.get("rope_scaling"),
                  d.get("rope_parameters")) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"config.json: rope type {rope_type!r} is not supported (only plain MRoPE)")
    if _first(text.get("use_sliding_window"), d.get("use_sliding_window")):
        raise ConfigError("config.json: use_sliding_window=true is not supported")
    if "mrope_section" not in rope:
        raise ConfigError(f"config.json: {where} has no mrope_section (rope_scaling / rope_parameters)")
    hidden = int(_need(text, "hidden_size", where))
    heads = int(_need(text, "num_attention_heads", where))
    head_dim = hidden // heads
    section = tuple(int(s) for s in rope["mrope_section"])
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise ConfigError(f"config.json: mrope_section {list(section)} must be 3 ints summing to "
                          f"head_dim/2 = {head_dim // 2}")
    return TextConfig(
        vocab_size=int(_need(text, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_need(text, "intermediate_size", where)),
        num_layers=int(_need(text, "num_hidden_layers", where)),
        num_heads=heads,
        num_kv_heads=int(_first(text.get("num_key_value_heads"), heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_first(text.get("rms_norm_eps"), 1e-6)),
        rope_theta=float(_first(rope.get("rope_theta"), text.get("rope_theta"), d.get("rope_theta"), 1e6)),
        mrope_section=section,  # type: ignore[arg-type]
        max_position_embeddings=int(_first(text.get("max_position_embeddings"), 32768)),
    )


def _vision_config(model_type: str, v: dict[str, Any], text_hidden: int) -> VisionConfig:
    where = "vision_config"
    depth = int(_need(v, "depth", where))
    heads = int(_need(v, "num_heads", where))
    rope = v.get("rope_parameters") or {}
    common = dict(
        depth=depth,
        num_heads=heads,
        patch_size=int(_first(v.get("patch_size"), v.get("spatial_patch_size"), 14)),
        temporal_patch_size=int(_first(v.get("temporal_patch_size"), 2)),
        spatial_merge_size=int(_first(v.get("spatial_merge_size"), 2)),
        in_channels=int(_first(v.get("in_channels"), v.get("in_chans"), 3)),
        rope_theta=float(_first(rope.get("rope_theta"), 10000.0)),
    )
    if model_type == "qwen2_vl":
        width = int(_need(v, "embed_dim", where))
        return VisionConfig(
            **common, hidden_size=width, head_dim=width // heads,
            intermediate_size=int(width * float(_first(v.get("mlp_ratio"), 4))),
            out_hidden_size=int(_first(v.get("hidden_size"), text_hidden)),
            hidden_act=str(_first(v.get("hidden_act"), "quick_gelu")), norm="layernorm",
            window_size=None, fullatt_block_indexes=tuple(range(depth)), tokens_per_second=1.0,
        )
    width = int(_need(v, "hidden_size", where))
    return VisionConfig(
        **common, hidden_size=width, head_dim=width // heads,
        intermediate_size=int(_need(v, "intermediate_size", where)),
        out_hidden_size=int(_first(v.get("out_hidden_size"), text_hidden)),
        hidden_act=str(_first(v.get("hidden_act"), "silu")), norm="rmsnorm",
        window_size=int(_first(v.get("window_size"), 112)),
        fullatt_block_indexes=tuple(int(i) for i in _first(v.get("fullatt_block_indexes"), (7, 15, 23, 31))),
        tokens_per_second=float(_first(v.get("tokens_per_second"), _DEFAULT_TOKENS_PER_SECOND)),
    )


def _eos_ids(*values: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for value in values:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


def parse_config(d: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
    """Build a ModelConfig from a config.json dict (flat or nested layout).

    generation_config (generation_config.json, optional) adds its eos_token_id(s): instruct
    checkpoints stop on both <|im_end|> and <|endoftext|> that way.
    """
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported; "
                          f"expected one of {', '.join(SUPPORTED_MODEL_TYPES)} (QVQ is qwen2_vl)")
    text_d = d.get("text_config") or d
    text = _text_config(d, text_d)
    vision = _vision_config(model_type, _need(d, "vision_config", "the top level"), text.hidden_size)
    if vision.out_hidden_size != text.hidden_size:
        raise ConfigError(f"config.json: vision output width {vision.out_hidden_size} != decoder "
                          f"hidden_size {text.hidden_size}")
    gen = generation_config or {}
    tie = bool(d.get("tie_word_embeddings") or text_d.get("tie_word_embeddings"))  # pre-v5 nested saves
    return ModelConfig(
        model_type=model_type,
        text=text,
        vision=vision,
        image_token_id=int(_first(d.get("image_token_id"), 151655)),
        video_token_id=int(_first(d.get("video_token_id"), 151656)),
        vision_start_token_id=int(_first(d.get("vision_start_token_id"), 151652)),
        vision_end_token_id=int(_first(d.get("vision_end_token_id"), 151653)),
        bos_token_id=_first(text_d.get("bos_token_id"), d.get("bos_token_id")),
        eos_token_ids=_eos_ids(text_d.get("eos_token_id"), d.get("eos_token_id"), gen.get("eos_token_id")),
        pad_token_id=_first(text_d.get("pad_token_id"), d.get("pad_token_id"), gen.get("pad_token_id")),
        tie_word_embeddings=tie,
        torch_dtype=parse_dtype(_first(d.get("torch_dtype"), d.get("dtype"), text_d.get("torch_dtype"),
                                       text_d.get("dtype"))),
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read `path`/config.json (and generation_config.json beside it, if any); `path` may also
    name config.json itself."""
    path = Path(path)
    config_file = path if path.is_file() else path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"no config.json at {path}")
    gen_file = config_file.parent / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    return parse_config(json.loads(config_file.read_text()), gen)
