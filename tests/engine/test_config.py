"""EngineConfig: one declaration of the engine's settings, their limits and their flags, shared by
LLM and every command line."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_vl_triton.engine.config import LIMIT_FLAGS, EngineConfig, add_engine_args
from qwen_vl_triton.engine.llm import LLM
from qwen_vl_triton.engine.media import DEFAULT_LIMITS

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("generate", "serve", "benchmark", "eval")


def engine_flags() -> set[str]:
    """The flag of every EngineConfig setting and media limit."""
    flags = {f"--{name}" for name in LIMIT_FLAGS}
    for f in dataclasses.fields(EngineConfig):
        if f.name != "media_limits":
            flags.add(f.metadata["flag"] or f"--{f.name}")
    return flags


@pytest.mark.parametrize("command", COMMANDS)
def test_every_engine_setting_is_a_flag_of_every_command(command):
    done = subprocess.run([sys.executable, f"tools/{command}.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)  # a hang guard only
    assert done.returncode == 0, done.stderr[-2000:]
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", done.stdout))
    missing = engine_flags() - shown
    assert not missing, f"tools/{command}.py lacks the engine flags {sorted(missing)}"


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_engine_args(parser)
    return parser.parse_args(list(flags))


def test_a_flag_given_wins_over_a_tool_default_which_wins_over_the_field_default():
    assert EngineConfig.from_args(parse()) == EngineConfig()
    assert EngineConfig.from_args(parse(), max_batch_size=16).max_batch_size == 16
    cfg = EngineConfig.from_args(parse("--max_batch_size", "3", "--disable_prefix_caching", "--compile",
                                       "--kv_cache_gb", "0.5", "--dtype", "float32"), max_batch_size=16)
    assert (cfg.max_batch_size, cfg.enable_prefix_caching, cfg.compile, cfg.kv_cache_gb, cfg.dtype) == (
        3, False, True, 0.5, "float32")
    assert cfg.media_limits == DEFAULT_LIMITS and cfg.enforce_eager is False
    limited = EngineConfig.from_args(parse("--max_media_per_prompt", "2", "--video_max_fps", "4.5"))
    assert (limited.media_limits.max_media_per_prompt, limited.media_limits.video_max_fps) == (2, 4.5)
    assert limited.media_limits.image_max_pixels == DEFAULT_LIMITS.image_max_pixels
    assert parse("--max_input_token_len", "100").max_input_length == 100  # MindIE's spelling


@pytest.mark.parametrize(("values", "message"), [
    ({"max_batch_size": 0}, "max_batch_size must be >= 1, got 0"),
    ({"block_size": -16}, "block_size must be >= 1"),
    ({"kv_cache_gb": 0.0}, "kv_cache_gb must be > 0"),
    ({"vision_step_share": -0.5}, "vision_step_share must be > 0"),
    ({"prefill_step_share": 0}, "prefill_step_share must be > 0"),
    ({"encoder_cache_gb": -1.0}, "encoder_cache_gb must be >= 0"),
    ({"dtype": "float8"}, "dtype must be one of auto, float16, bfloat16, float32"),
    ({"quantization": "gptq"}, "quantization must be one of"),
])
def test_a_setting_out_of_its_limits_is_an_error_naming_it(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig(**values)


def test_a_bad_flag_value_is_refused_by_the_parser_or_the_config():
    with pytest.raises(SystemExit):
        parse("--dtype", "float8")  # choices: argparse's own error
    with pytest.raises(ValueError, match="max_prefill_tokens must be >= 1"):
        EngineConfig.from_args(parse("--max_prefill_tokens", "0"))


def test_llm_takes_a_config_and_keyword_settings_over_it(tiny_checkpoint):
    base = EngineConfig(device="cpu", num_kv_blocks=16, max_batch_size=2)
    llm = LLM(tiny_checkpoint, base, max_batch_size=3)
    assert llm.engine_config == dataclasses.replace(base, max_batch_size=3)
    assert llm.scheduler.max_batch_size == 3 and llm.blocks.num_blocks == 16
    with pytest.raises(TypeError, match="max_batch"):
        LLM(tiny_checkpoint, base, max_batch=3)  # a misspelt setting is not ignored
