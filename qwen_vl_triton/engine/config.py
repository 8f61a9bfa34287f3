"""EngineConfig: every engine setting once, with its default, its limits and its help text.

    config = EngineConfig(kv_cache_gb=8, max_batch_size=32)      # or LLM(path, kv_cache_gb=8, ...)
    llm = LLM("/data/Qwen2.5-VL-7B-Instruct", config)

    add_engine_args(parser)                                      # the same flags in every command line
    config = EngineConfig.from_args(parser.parse_args())

The server, generate, benchmark and eval all build the engine from this one declaration, so a
setting added here is a flag of each of them (tests/engine/test_config.py keeps it so). Flags
default to None: a tool can tell a flag given from one left out (the server's MindIE config.json
sits between the two), and `from_args` fills in what was left out.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from qwen_vl_triton.engine.media import DEFAULT_LIMITS, MediaLimits
from qwen_vl_triton.engine.sampling_defaults import AUTO, NONE
from qwen_vl_triton.modeling.quantization import CHOICES as QUANTIZATION_CHOICES

DTYPES = ("auto", "float16", "bfloat16", "float32")
# MediaLimits fields a flag sets (the others, the per-kind defaults, are Python-only).
LIMIT_FLAGS = ("image_max_pixels", "video_max_pixels", "video_max_total_pixels", "video_max_frames",
               "video_max_fps", "decode_max_pixels", "max_media_per_prompt")
LIMIT_HELP = {
    "image_max_pixels": "an image's area",
    "video_max_pixels": "a video frame's area",
    "video_max_total_pixels": "all frames of one video",
    "video_max_frames": "frames sampled",
    "video_max_fps": "sampling rate",
    "decode_max_pixels": "an image's or a video frame's size as the file declares it, checked before decoding "
                         "(default: PIL's decompression-bomb threshold)",
    "max_media_per_prompt": "images and videos in one request",
}


def setting(default: Any, help: str, *, minimum: float | None = None, positive: bool = False,
            choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = (), flag: str | None = None) -> Any:
    """A dataclass field with what its flag and its check need: `minimum` (>=) or `positive` (> 0),
    `choices`, extra flag spellings, and a flag other than --<name> (a store_false switch)."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "positive": positive,
                                            "choices": choices, "aliases": aliases, "flag": flag})


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings (LLM's keyword arguments are these fields). Invalid values raise
    ValueError naming the setting and its limit."""

    dtype: str = setting("auto", "weights and activations (auto: the config's torch_dtype)", choices=DTYPES)
    device: str | None = setting(None, "cuda, npu, cpu or e.g. cuda:1 (default: the first accelerator found, else "
                                       "cpu; under tensor parallelism, each rank's own: local rank i takes device i)")
    quantization: str | None = setting(
        None, "a quantized checkpoint's format: ascend (msModelSlim W8A8 / W8A8_DYNAMIC / W8A16, as MindIE and "
              "vllm-ascend load) or compressed-tensors (int8 W8A8 / W8A16, as vLLM loads); default: detected from "
              "the checkpoint, and a value that does not match it is an error", choices=QUANTIZATION_CHOICES)
    tensor_parallel_size: int | None = setting(
        None, "processes (devices) every layer is split over. Without a launcher the engine starts the other "
              "N-1 itself, on this machine; under torchrun it must equal the launcher's world size (default: "
              "torchrun's WORLD_SIZE, else 1); MindIE's worldSize", minimum=1)
    kv_cache_gb: float | None = setting(
        None, "KV cache size in GiB, per rank under tensor parallelism; MindIE's npuMemSize (default: on a GPU/NPU "
              "85%% of the memory free after the weights, less the vision tower's measured peak and the encoder "
              "cache; 4 on CPU)", positive=True)
    num_kv_blocks: int | None = setting(None, "KV cache size in blocks, instead of --kv_cache_gb", minimum=1)
    block_size: int = setting(16, "tokens per KV block", minimum=1)
    max_batch_size: int = setting(64, "running sequences per step", minimum=1)
    max_prefill_tokens: int = setting(8192, "prompt tokens computed per step; longer prompts are prefilled in chunks",
                                      minimum=1)
    max_input_length: int | None = setting(
        None, "prompt tokens allowed, media included; a longer prompt is an error naming the limit (default: the "
              "model's)", minimum=1, aliases=("--max_input_token_len",))
    max_seq_len: int | None = setting(None, "prompt + output tokens per sequence (default: the model's)", minimum=1)
    enable_prefix_caching: bool = setting(True, "never share KV blocks between requests",
                                          flag="--disable_prefix_caching")
    encoder_cache_gb: float = setting(1.0, "GiB of media embeddings kept for reuse by content", minimum=0)
    vision_chunk_patches: int = setting(
        16384, "patches per vision-encoder call: a video is decoded and encoded this many patches' worth of "
               "frames at a time, bounding memory", minimum=1)
    vision_step_share: float = setting(
        0.25, "while requests are running, each step spends at most this share of a forward pass's time on "
              "vision encoding (at least one image or frame pair), so a long video does not stall the running "
              "streams", positive=True)
    prefill_step_share: float | None = setting(
        None, "while requests are decoding, each step takes only the prompt tokens that add at most this share "
              "of a decode step's time (estimated as it runs; at least one), so a long prompt does not stall "
              "them: inter-token latency first (default: off, --max_prefill_tokens alone: throughput first)",
        positive=True)
    compile: bool = setting(False, "run the model's forward pass through torch.compile (inductor, dynamic shapes; "
                                   "the first steps pay its compilation, tens of seconds on a small CPU)")
    enforce_eager: bool = setting(
        False, "decode steps run eagerly, never as captured graphs (default: on a CUDA or NPU device at world "
               "size 1, each batch bucket's decode step is captured as a graph the first time it runs and "
               "replayed after)")
    chat_template: str | None = setting(
        None, "a Jinja chat template replacing the checkpoint's: a file, or the template's text (vLLM's "
              "--chat-template); a request's own chat_template replaces this one")
    generation_config: str = setting(
        "auto", "sampling defaults for what a request leaves unset (temperature, top_p, top_k, repetition_penalty, "
                "max_new_tokens): auto reads the checkpoint's generation_config.json, none reads none (each field "
                "then takes the command's own default: the server's are OpenAI's, temperature 1, top_p 1), a "
                "folder or file reads that generation_config.json (vLLM's --generation-config)")
    media_limits: MediaLimits = field(default=DEFAULT_LIMITS, metadata={"group": True})

    def __post_init__(self) -> None:
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None or meta.get("group"):
                continue
            if meta.get("choices") and value not in meta["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
            if meta.get("minimum") is not None and not value >= meta["minimum"]:
                raise ValueError(f"{f.name} must be >= {meta['minimum']}, got {value}")
            if meta.get("positive") and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")
        if self.generation_config not in (AUTO, NONE) and not Path(self.generation_config).exists():
            raise ValueError(f"generation_config must be auto, none or a path, and {self.generation_config!r} does "
                             "not exist")

    @property
    def encoder_cache_bytes(self) -> int:
        """encoder_cache_gb in bytes: the encoder cache's size, and what the KV budget leaves it."""
        return int(self.encoder_cache_gb * (1 << 30))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **defaults: Any) -> EngineConfig:
        """The config of parsed `add_engine_args` flags: each flag given, else `defaults` (a tool's
        own, or values from a config file), else the field's default."""
        values = dict(defaults)
        for f in _flag_fields():
            given = getattr(args, f.name, None)
            if given is not None:
                values[f.name] = given
        limits = {name: getattr(args, name) for name in LIMIT_FLAGS if getattr(args, name, None) is not None}
        if limits:
            values["media_limits"] = MediaLimits(**limits)
        return cls(**values)


def _flag_fields() -> list[Field]:
    return [f for f in fields(EngineConfig) if not f.metadata.get("group")]


def add_engine_args(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Every EngineConfig setting as a flag (default None, see the module docstring); `defaults`
    are the tool's own defaults, shown in the help as `from_args` will apply them."""
    engine = parser.add_argument_group("engine (the same flags in every command)")
    for f in _flag_fields():
        meta = f.metadata
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        shown = "" if default is None or isinstance(default, bool) else f" (default: {default})"
        if meta["flag"] is not None:  # a switch that turns a default-on setting off
            engine.add_argument(meta["flag"], dest=f.name, action="store_false", default=None, help=meta["help"])
        elif isinstance(f.default, bool):
            engine.add_argument(f"--{f.name}", action="store_true", default=None, help=meta["help"])
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            engine.add_argument(f"--{f.name}", *meta["aliases"], type=kind, choices=meta["choices"], default=None,
                                help=meta["help"] + ("" if "default:" in meta["help"] else shown))
    limits = parser.add_argument_group("media limits (a request asking for more gets an error naming the limit)")
    for name in LIMIT_FLAGS:
        default = getattr(DEFAULT_LIMITS, name)
        text = LIMIT_HELP[name]
        limits.add_argument(f"--{name}", type=type(default), default=None,
                            help=text if "default:" in text else f"{text} (default: {default})")
