"""A tiny random Qwen2-VL / Qwen2.5-VL checkpoint in the Hugging Face layout.

`make_tiny_checkpoint` writes a directory that transformers itself loads with
`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration.from_pretrained` and
`AutoTokenizer.from_pretrained`, fully offline: config.json, model.safetensors (or shards plus an
index), generation_config.json, tokenizer files with a Qwen-style chat template (Qwen2.5-VL's also
renders tools, tool calls and tool responses as Qwen2.5 does, and has the <tool_call> tags as
tokens), preprocessor_config.json, and last a manifest carrying CHECKPOINT_VERSION. Tests use it as
the oracle's input; tools/generate.py uses it as the demo model.

Pieces:
- the model is transformers' own config + model class at tiny sizes, re-initialised from a seeded
  generator wide enough that greedy decoding is not degenerate (norm weights near 1, non-zero
  biases, so kernels that drop a weight or a bias show up in parity tests);
- the tokenizer is a byte-level BPE trained (by `tokenizers`) on a little built-in English text,
  with Qwen's special tokens appended at the END of the vocabulary, so their ids are small and
  differ from the real ones (151643...): code must read ids from config.json, never hardcode them;
- variants cover what real checkpoints look like: `layout="flat"` rewrites config.json as hub
  checkpoints have it (text fields at top level, `rope_scaling.mrope_section`), `weight_names`
  chooses between the classic names (`model.layers.*`, `visual.*`) and the nested ones
  (`model.language_model.*`, `model.visual.*`), `sharded=True` writes several safetensors files
  plus model.safetensors.index.json.

One module because one function writes every variant the tests and the demo need (both
architectures, both weight layouts, both config layouts, sharding, dtypes): the variants are
branches of one writer, and each must stay loadable by transformers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from qwen_vl_triton.modeling.weight_table import canonical_name, nested_name

Arch = Literal["qwen2_vl", "qwen2_5_vl"]
Layout = Literal["nested", "flat"]
WeightNames = Literal["transformers", "legacy", "language_model"]

ARCHS: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")
LAYOUTS: tuple[str, ...] = ("nested", "flat")
WEIGHT_NAMES: tuple[str, ...] = ("transformers", "legacy", "language_model")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}

# Qwen2-VL's special tokens, in the order of the released vocabulary (151643 ... 151656). Here they
# follow the BPE vocabulary in this same order.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Qwen2.5's tool call tags (151657, 151658 in the released vocabulary), ordinary added tokens (not
# special). Only the Qwen2.5-VL tokenizer has them, appended after SPECIAL_TOKENS, so every other
# id is the same in both tokenizers and the padded embedding (576 rows) does not change.
TOOL_TOKENS: tuple[str, ...] = ("<tool_call>", "</tool_call>")

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."

# What `make_tiny_checkpoint` writes last: a folder without it (or without its weights) is unfinished.
MANIFEST = "tiny_checkpoint.json"
# The manifest's "version": raised whenever what `make_tiny_checkpoint` writes changes, so that a
# cached checkpoint written by older code counts as incomplete and is made again. 2: the Qwen2.5-VL
# tokenizer's tools chat template and tool call tokens (1: no "version" in the manifest).
CHECKPOINT_VERSION = 2

# A message's list of parts: media pads (counted in `seen`, "Picture N: " with add_vision_id) and text.
_CONTENT_PARTS = (
    "{%- for part in content -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set seen.images = seen.images + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + seen.images|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set seen.videos = seen.videos + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + seen.videos|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# A chat template that renders exactly what Qwen2-VL / Qwen2.5-VL instruct models expect:
#   <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n      (unless a system message leads)
#   <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>...text<|im_end|>\n
#   <|im_start|>assistant\n                                            (add_generation_prompt)
# Content may be a string or a list of parts: {"type": "image"} (or any part with an "image" /
# "image_url" key), {"type": "video"} (or a "video" key), {"type": "text", "text": ...}.
# `add_vision_id=True` prefixes each medium with "Picture N: " / "Video N: ".
CHAT_TEMPLATE = (
    "{%- set seen = namespace(images=0, videos=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    + _CONTENT_PARTS.replace("content", "message['content']") +
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# The Qwen2.5-VL checkpoint's template: CHAT_TEMPLATE's media handling (as a macro, so that the
# system turn can use it too) plus Qwen2.5's tool calling, as the released Qwen2.5 instruct
# templates render it. Given `tools`, the system turn (the leading system message's content, or
# the default one) is followed by the tool signatures, one `tool | tojson` a line:
#   <|im_start|>system\n{system}\n\n# Tools\n\n...<tools>\n{tool}\n...</tools>\n\n...</tool_call><|im_end|>\n
# An assistant message with `tool_calls` renders its content (if any) after a newline, then each
# call as \n<tool_call>\n{"name": "f", "arguments": {arguments | tojson}}\n</tool_call>; consecutive
# `tool` messages share one user turn, each as \n<tool_response>\n{content}\n</tool_response>.
# Without tools and without tool messages or calls it renders exactly what CHAT_TEMPLATE does.
_TOOLS_PROMPT_HEAD = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_PROMPT_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n"
)
TOOLS_CHAT_TEMPLATE = (
    "{%- macro render_content(content, seen, add_vision_id) -%}"
    "{%- if content is string -%}"
    "{{- content -}}"
    "{%- else -%}"
    + _CONTENT_PARTS +
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set seen = namespace(images=0, videos=0) -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- render_content(messages[0]['content'], seen, add_vision_id) -}}"
    "{%- else -%}"
    "{{- '" + DEFAULT_SYSTEM_MESSAGE + "' -}}"
    "{%- endif -%}"
    "{{- " + json.dumps(_TOOLS_PROMPT_HEAD) + " -}}"
    "{%- for tool in tools -%}{{- '\\n' + tool | tojson -}}{%- endfor -%}"
    "{{- " + json.dumps(_TOOLS_PROMPT_TAIL) + " -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and not tools and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- if loop.first and tools and message['role'] == 'system' -%}"
    "{#- rendered in the tools system turn above -#}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' -}}"
    "{{- render_content(message['content'], seen, add_vision_id) -}}"
    "{{- '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] -%}"
    "{{- '<|im_start|>assistant' -}}"
    "{%- if message['content'] -%}"
    "{{- '\\n' -}}{{- render_content(message['content'], seen, add_vision_id) -}}"
    "{%- endif -%}"
    "{%- for tool_call in message['tool_calls'] -%}"
    "{%- if tool_call['function'] is defined -%}{%- set tool_call = tool_call['function'] -%}{%- endif -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call['name'] + '\", \"arguments\": ' -}}"
    "{{- tool_call['arguments'] | tojson -}}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{{- render_content(message['content'], seen, add_vision_id) -}}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Qwen's pre-tokenisation split (the GPT-4-style pattern Qwen2's tokenizer uses), then byte-level.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Training text for the tiny BPE: plain English of the kind prompts contain.
_CORPUS = """\
Describe this image in detail. What is shown in the picture? What happens in this video?
The picture shows a small red house beside a river, with two tall trees and a wooden bridge.
A brown dog runs across the green field while children play with a yellow ball in the sun.
In the video, a woman opens the door, walks into the kitchen and puts a cup of tea on the table.
Please answer the question using a single word or phrase. How many people are there?
There are three cats sitting on the window, and one of them is looking at the birds outside.
The weather is cold and cloudy today; it will rain in the evening, so take an umbrella with you.
Read the text in the image and tell me what it says. The sign says: open every day from 9 to 5.
Count the objects, compare their colors, and explain where each one is placed in the scene.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
A man is riding a bicycle down the street, and a blue car is parked in front of the store.
Summarize the main events of the story in three sentences, then give it a short title.
"""


@dataclass
class TinySizes:
    """Sizes of the tiny model. Text: head_dim = hidden_size / num_attention_heads (32 by default)
    and mrope_section splits head_dim/2 in Qwen's 2:3:3 ratio ([4, 6, 6] at head_dim 32).
    `vision_depth=None` picks 2 blocks for Qwen2-VL and 4 for Qwen2.5-VL (windowed blocks 0, 2 and
    full-attention blocks 1, 3)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    bpe_vocab_size: int = 512            # byte alphabet + merges; special tokens come after
    vision_depth: int | None = None
    vision_embed_dim: int = 64           # Qwen2-VL embed_dim / Qwen2.5-VL vision hidden_size
    vision_num_heads: int = 2
    vision_mlp_ratio: int = 4            # Qwen2-VL
    vision_intermediate_size: int = 128  # Qwen2.5-VL
    window_size: int = 112               # Qwen2.5-VL: 112 px = 4x4 merged tokens
    fullatt_block_indexes: list[int] | None = None
    tokens_per_second: int = 2           # Qwen2.5-VL; the released checkpoints' value
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    tie_word_embeddings: bool = False
    init_std: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def mrope_section_for(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (t, h, w) sections in Qwen's 16:24:24 ratio."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [half - 2 * h, h, h]


def special_token_ids(bpe_vocab_size: int) -> dict[str, int]:
    """Ids of SPECIAL_TOKENS in a tokenizer whose BPE vocabulary has `bpe_vocab_size` entries."""
    return {tok: bpe_vocab_size + i for i, tok in enumerate(SPECIAL_TOKENS)}


def tool_token_ids(bpe_vocab_size: int) -> dict[str, int]:
    """Ids of TOOL_TOKENS in the Qwen2.5-VL tokenizer: right after SPECIAL_TOKENS."""
    return {tok: bpe_vocab_size + len(SPECIAL_TOKENS) + i for i, tok in enumerate(TOOL_TOKENS)}


def _padded_vocab_size(n: int, multiple: int = 64) -> int:
    """The model's embedding rows: the tokenizer's size rounded up (real checkpoints pad too)."""
    return int(math.ceil(n / multiple) * multiple)


# --------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(bpe_vocab_size: int = 512, *, tools: bool = False, corpus: str | None = None):
    """A Qwen2Tokenizer: byte-level BPE trained on `corpus` (lines; None: the built-in text), vocab
    `bpe_vocab_size` entries (ids 0..bpe_vocab_size-1) followed by SPECIAL_TOKENS, eos <|im_end|>,
    pad <|endoftext|>, no bos, and CHAT_TEMPLATE. `tools=True` (Qwen2.5-VL) gives
    TOOLS_CHAT_TEMPLATE instead and appends TOOL_TOKENS after the special tokens. Deterministic."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if bpe_vocab_size < len(alphabet):
        raise ValueError(f"bpe_vocab_size must be at least {len(alphabet)} (the byte alphabet)")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator((corpus or _CORPUS).splitlines(), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) for m in model["merges"]]
    if len(vocab) != bpe_vocab_size:  # the corpus ran out of merges: fail rather than shift ids
        raise ValueError(f"the corpus yields only {len(vocab)} BPE entries, asked for {bpe_vocab_size}")

    try:  # transformers 5.x: Qwen2Tokenizer is the tokenizers-backed class
        from transformers import Qwen2Tokenizer as _Tok
        tok = _Tok(vocab=vocab, merges=merges, unk_token=None, errors="replace")
    except TypeError:  # transformers 4.x: the fast class builds from vocab/merges files
        from transformers import Qwen2TokenizerFast as _Tok
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
            (Path(tmp) / "merges.txt").write_text(
                "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
            tok = _Tok(vocab_file=str(Path(tmp) / "vocab.json"), merges_file=str(Path(tmp) / "merges.txt"),
                       unk_token=None)
    # <|endoftext|> came in as the constructor's default eos/pad; the rest follow in Qwen's order.
    extra = list(SPECIAL_TOKENS[1:])
    try:
        tok.add_special_tokens({"extra_special_tokens": extra})
    except (AssertionError, KeyError, ValueError, TypeError):  # transformers 4.x
        tok.add_special_tokens({"additional_special_tokens": extra})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    ids = special_token_ids(bpe_vocab_size)
    if tools:
        from tokenizers import AddedToken

        # Not special, as in Qwen2.5's tokenizer: decoding with skip_special_tokens keeps them,
        # so the server sees the tags it parses.
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
        tok.chat_template = TOOLS_CHAT_TEMPLATE
        ids.update(tool_token_ids(bpe_vocab_size))
    got = {t: tok.convert_tokens_to_ids(t) for t in ids}
    if got != ids:
        raise RuntimeError(f"added tokens landed on unexpected ids: {got}")
    return tok


# --------------------------------------------------------------------------------------------
# model


def _build_config(arch: str, sizes: TinySizes, ids: dict[str, int], vocab_size: int,
                  dtype: str):
    """transformers' own config object for `arch` at `sizes` (nested: text_config, vision_config)."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        max_window_layers=sizes.num_hidden_layers,
        rms_norm_eps=sizes.rms_norm_eps,
        rope_scaling={"type": "mrope", "mrope_section": mrope_section_for(sizes.head_dim),
                      "rope_theta": sizes.rope_theta},
        rope_theta=sizes.rope_theta,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        hidden_act="silu",
        initializer_range=sizes.init_std,
        tie_word_embeddings=sizes.tie_word_embeddings,
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=sizes.tie_word_embeddings,
    )
    vision_common = dict(  # the vision config fields both architectures set alike
        num_heads=sizes.vision_num_heads,
        in_channels=3,
        patch_size=sizes.patch_size,
        spatial_merge_size=sizes.spatial_merge_size,
        temporal_patch_size=sizes.temporal_patch_size,
        initializer_range=sizes.init_std,
    )
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        vision = dict(
            depth=sizes.vision_depth or 2,
            embed_dim=sizes.vision_embed_dim,
            mlp_ratio=sizes.vision_mlp_ratio,
            hidden_size=sizes.hidden_size,  # Qwen2-VL: the merger's output width (= text hidden)
            hidden_act="quick_gelu",
            **vision_common,
        )
    elif arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        depth = sizes.vision_depth or 4
        full = sizes.fullatt_block_indexes
        if full is None:
            full = [i for i in range(depth) if i % 2 == 1]
        vision = dict(
            depth=depth,
            hidden_size=sizes.vision_embed_dim,
            intermediate_size=sizes.vision_intermediate_size,
            out_hidden_size=sizes.hidden_size,
            hidden_act="silu",
            window_size=sizes.window_size,
            fullatt_block_indexes=list(full),
            tokens_per_second=sizes.tokens_per_second,
            **vision_common,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    vision.update(sizes.extra.get("vision_config", {}))
    text.update({k: v for k, v in sizes.extra.items() if k != "vision_config"})
    config = Config(text_config=text, vision_config=vision, **common)
    config.dtype = dtype
    return config


def _model_class(arch: str):
    if arch == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration
        return Qwen2VLForConditionalGeneration
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration


def _is_norm_weight(name: str) -> bool:
    """RMSNorm / LayerNorm scales: input_layernorm, post_attention_layernorm, norm, norm1, norm2,
    merger.ln_q (their biases are ordinary biases)."""
    parts = name.rsplit(".", 2)
    return len(parts) >= 2 and parts[-1] == "weight" and ("norm" in parts[-2] or parts[-2] == "ln_q")


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int, std: float) -> None:
    """Deterministic init from one generator, in parameter-name order: matrices and embeddings
    N(0, std), biases N(0, std) (non-zero, so dropped biases show), norm weights 1 + N(0, 0.1),
    an untied lm_head N(0, 4 std) (logits with a std of about 2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if _is_norm_weight(name):
            value = 1.0 + 0.1 * noise
        elif name == "lm_head.weight":  # wider logits: clear greedy margins even in bf16
            value = noise * (4 * std)
        else:
            value = noise * std
        p.copy_(value.to(p.dtype))


# --------------------------------------------------------------------------------------------
# layouts


def rename_weights(names: list[str], to: str) -> dict[str, str]:
    """Map each tensor name to the `to` naming: "legacy" = `model.layers.*`, `model.embed_tokens`,
    `model.norm`, `lm_head`, `visual.*` (released checkpoints); "language_model" =
    `model.language_model.*`, `model.visual.*`, `lm_head` (transformers' module tree since 4.52);
    "transformers" = unchanged. Both layouts are modeling/weight_table.py's, which the loader reads."""
    if to not in WEIGHT_NAMES:
        raise ValueError(f"unknown weight_names {to!r}; expected one of {WEIGHT_NAMES}")
    if to == "transformers":
        return {n: n for n in names}
    if to == "legacy":
        return {n: canonical_name(n) for n in names}
    return {n: nested_name(canonical_name(n)) for n in names}


# Keys the released (flat) configs carry in vision_config.
_FLAT_VISION_KEYS = {
    "qwen2_vl": ("depth", "embed_dim", "mlp_ratio", "num_heads", "in_chans", "hidden_size",
                 "patch_size", "spatial_merge_size", "spatial_patch_size", "temporal_patch_size"),
    "qwen2_5_vl": ("depth", "hidden_act", "hidden_size", "intermediate_size", "num_heads", "in_chans",
                   "out_hidden_size", "patch_size", "spatial_merge_size", "spatial_patch_size",
                   "window_size", "fullatt_block_indexes", "tokens_per_second", "temporal_patch_size"),
}
_FLAT_TEXT_KEYS = (
    "attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size", "initializer_range",
    "intermediate_size", "max_position_embeddings", "max_window_layers", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "use_cache", "use_sliding_window",
    "vocab_size",
)


def to_flat_config(nested: dict[str, Any], arch: str, vision_pad_id: int | None = None) -> dict[str, Any]:
    """Rewrite a nested config.json dict (text_config + rope_parameters, as transformers 5.x writes
    it) in the flat layout of the released checkpoints: text fields at top level, `rope_theta`,
    `rope_scaling: {"type": "mrope", "mrope_section": [...]}`, `torch_dtype`, vision_config nested
    with the released keys (`in_chans`, `spatial_patch_size`)."""
    text = nested["text_config"]
    vision = nested["vision_config"]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    flat: dict[str, Any] = {"architectures": nested["architectures"], "model_type": nested["model_type"]}
    for k in _FLAT_TEXT_KEYS:
        if k in text:
            flat[k] = text[k]
    flat["sliding_window"] = text.get("max_position_embeddings")  # released configs carry a number
    flat["rope_theta"] = rope.get("rope_theta", 1_000_000.0)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
    flat["tie_word_embeddings"] = nested.get("tie_word_embeddings", False)
    flat["torch_dtype"] = nested.get("dtype") or nested.get("torch_dtype") or "float32"
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        flat[k] = nested[k]
    if vision_pad_id is not None:
        flat["vision_token_id"] = vision_pad_id
    flat["transformers_version"] = nested.get("transformers_version")
    v = dict(vision)
    v["in_chans"] = v.get("in_channels", 3)
    v["spatial_patch_size"] = v.get("patch_size", 14)
    flat["vision_config"] = {k: v[k] for k in _FLAT_VISION_KEYS[arch] if k in v}
    return flat


def _preprocessor_config(arch: str, sizes: TinySizes, min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """preprocessor_config.json as the released checkpoints have it, plus transformers 5.x's `size`."""
    return {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": sizes.patch_size,
        "temporal_patch_size": sizes.temporal_patch_size,
        "merge_size": sizes.spatial_merge_size,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 0.00392156862745098,
        "do_rescale": True,
        "do_normalize": True,
        "do_resize": True,
        "do_convert_rgb": True,
        "resample": 3,  # PIL bicubic
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor" if arch == "qwen2_vl" else "Qwen2_5_VLProcessor",
    }


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], sharded: bool, num_shards: int) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    for p in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        p.unlink()
    if not sharded:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    target = total / num_shards
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:  # contiguous runs of names, about total/num_shards bytes each
        nbytes = tensors[n].numel() * tensors[n].element_size()
        if shards[-1] and size + nbytes > target and len(shards) < num_shards:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(out / fname), metadata=meta)
        weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# entry point


def make_tiny_checkpoint(
    out_dir: str | Path,
    arch: Arch = "qwen2_vl",
    seed: int = 0,
    *,
    dtype: str = "float32",
    layout: Layout = "nested",
    weight_names: WeightNames = "transformers",
    sharded: bool = False,
    num_shards: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    corpus: str | None = None,
    **size_overrides: Any,
) -> Path:
    """Write a tiny random `arch` checkpoint to `out_dir` (created; files it writes are replaced)
    and return its path.

    dtype: "float32" | "bfloat16" | "float16" for the stored tensors and config's dtype.
    layout: "nested" = config.json exactly as transformers' save_pretrained writes it (text_config,
        rope_parameters); "flat" = the released checkpoints' layout (see `to_flat_config`).
    weight_names: "transformers" = as save_pretrained writes them (transformers 5.x writes the
        legacy names), "legacy" = `model.layers.*` / `visual.*`, "language_model" =
        `model.language_model.*` / `model.visual.*`.
    sharded: write `num_shards` files model-0000i-of-0000N.safetensors + model.safetensors.index.json.
    min_pixels / max_pixels: the image processor's pixel range in preprocessor_config.json.
    corpus: the tokenizer's training text (None: the built-in one; a large bpe_vocab_size needs more).
    size_overrides: any `TinySizes` field (hidden_size=..., vision_depth=..., tie_word_embeddings=...).
    """
    from safetensors.torch import load_file

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if weight_names not in WEIGHT_NAMES:
        raise ValueError(f"unknown weight_names {weight_names!r}; expected one of {WEIGHT_NAMES}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    known = {f.name for f in fields(TinySizes)}
    unknown = set(size_overrides) - known
    if unknown:
        raise TypeError(f"unknown size overrides {sorted(unknown)}; known: {sorted(known)}")
    sizes = TinySizes(**size_overrides)
    if sizes.hidden_size % sizes.num_attention_heads or sizes.num_attention_heads % sizes.num_key_value_heads:
        raise ValueError("hidden_size must divide by num_attention_heads, and heads by kv heads")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(sizes.bpe_vocab_size, tools=arch == "qwen2_5_vl", corpus=corpus)
    ids = special_token_ids(sizes.bpe_vocab_size)
    vocab_size = _padded_vocab_size(len(tokenizer))
    config = _build_config(arch, sizes, ids, vocab_size, dtype)

    # transformers' own init draws from the global generator, and _reinit_ then overwrites every
    # parameter from its seeded one: forking the global generator changes no value written and
    # leaves the caller's random stream as it was.
    with torch.random.fork_rng(devices=[]):
        model = _model_class(arch)(config)
    _reinit_(model, seed * len(ARCHS) + ARCHS.index(arch), sizes.init_std)  # archs differ
    model.to(DTYPES[dtype]).eval()
    model.config.dtype = dtype
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        try:
            model.save_pretrained(tmp)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        shutil.copy(Path(tmp) / "config.json", out / "config.json")
        saved = sorted(Path(tmp).glob("*.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        for f in saved:
            tensors.update(load_file(str(f)))
    renames = rename_weights(list(tensors), weight_names)
    tensors = {renames[n]: t.contiguous() for n, t in tensors.items()}
    _write_weights(out, tensors, sharded, num_shards)

    cfg = json.loads((out / "config.json").read_text())
    if layout == "flat":
        cfg = to_flat_config(cfg, arch, vision_pad_id=ids["<|vision_pad|>"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(_preprocessor_config(arch, sizes, min_pixels, max_pixels), indent=2) + "\n")
    (out / MANIFEST).write_text(json.dumps({
        "version": CHECKPOINT_VERSION, "arch": arch, "seed": seed, "dtype": dtype, "layout": layout,
        "weight_names": weight_names, "sharded": sharded, "sizes": asdict(sizes),
    }, indent=2) + "\n")
    return out


def cache_dir() -> Path:
    """Where generated demo and benchmark assets live: $QVL_CACHE, default ~/.cache/qwen-vl-triton."""
    return Path(os.environ.get("QVL_CACHE", Path.home() / ".cache" / "qwen-vl-triton"))


def checkpoint_complete(path: Path) -> bool:
    """Whether `path` holds a whole tiny checkpoint of this code's version: config.json, the manifest
    `make_tiny_checkpoint` writes last (with version CHECKPOINT_VERSION), and every weights file
    (model.safetensors, or the index and each shard it names)."""
    if not (path / MANIFEST).is_file() or not (path / "config.json").is_file():
        return False
    try:
        version = json.loads((path / MANIFEST).read_text()).get("version")
    except (ValueError, AttributeError):  # a truncated or foreign manifest
        return False
    if version != CHECKPOINT_VERSION:
        return False
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return (path / "model.safetensors").is_file()
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError):  # a truncated or foreign index
        return False
    return bool(shards) and all((path / s).is_file() for s in shards)


def cached_checkpoint(name: str, arch: Arch = "qwen2_5_vl", **kwargs: Any) -> Path:
    """`make_tiny_checkpoint(cache_dir() / name, arch, **kwargs)` the first time; the same folder after.

    The checkpoint is written into a temporary sibling folder and renamed into place once whole, so
    an interrupted run leaves nothing that passes for it; a folder that is not `checkpoint_complete`
    (left by an interrupted run of older code, or written by an older CHECKPOINT_VERSION) is made
    again. Processes racing on one name each
    write their own copy: the first to finish installs it and the others keep that one.
    """
    path = cache_dir() / name
    if checkpoint_complete(path):
        return path
    print(f"making the random checkpoint {path} (once)", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its owner-only mode would stay on the installed folder.
    tmp = path.parent / f".{name}.partial-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        make_tiny_checkpoint(tmp, arch, **kwargs)
        _install(tmp, path)
    finally:  # gone after a successful rename; the unfinished or unneeded copy otherwise
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _install(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` to `path`, unless a complete checkpoint is already there."""
    if path.exists() and not checkpoint_complete(path):
        # Renamed into a private folder before deleting, so rmtree never walks a path another
        # writer may install into meanwhile (one that finishes between the check and the rename
        # has its copy replaced by this identical one). Gone already: another writer moved it.
        stale = Path(tempfile.mkdtemp(prefix=f".{path.name}.stale-", dir=path.parent))
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, stale / path.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, path)  # atomic; fails when path is a non-empty folder
    except OSError:
        if not checkpoint_complete(path):
            raise
