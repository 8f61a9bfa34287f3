"""The model's sampling defaults: what a request that leaves a sampling field unset gets.

Qwen's instruct checkpoints ship theirs in generation_config.json (near-greedy sampling with a
small repetition penalty), and the model card's answers are made with them. As vLLM's
`--generation-config auto` (its default) does, five keys are read:

    temperature, top_p, top_k, repetition_penalty     -> the SamplingParams fields of those names
    max_new_tokens                                    -> max_tokens

Other keys (do_sample, eos_token_id, ...) are not sampling defaults here: the EOS ids are the
model config's (modeling/config.py), and do_sample is ignored as vLLM ignores it (a request's
temperature 0 is greedy). A field the request sets always wins; a field neither sets keeps the
caller's own default (OpenAI's for the server: temperature 1, top_p 1, top_k off, repetition_penalty
1; greedy for tools/generate.py).

EngineConfig.generation_config says where they come from: "auto" (the checkpoint's
generation_config.json, when it has one), "none" (no defaults), or a folder holding a
generation_config.json, or that file itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from qwen_vl_triton.engine.sampling import SamplingParams

FILE_NAME = "generation_config.json"
AUTO, NONE = "auto", "none"
# generation_config.json's key -> the SamplingParams field it is the default of
_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty",
         "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class SamplingDefaults:
    """Defaults for unset sampling fields (None: the file does not set it); `source` is the file
    they were read from (None: no file)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None            # -1: off (the file's 0, transformers' "off", is read as -1)
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    source: str | None = None

    def get(self, name: str, given: Any, fallback: Any) -> Any:
        """A request's value for field `name`: `given` when it set one, else this default, else the
        caller's `fallback`."""
        if given is not None:
            return given
        default = getattr(self, name)
        return fallback if default is None else default

    def values(self) -> dict[str, Any]:
        """The defaults in force, by SamplingParams field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "source" and getattr(self, f.name) is not None}

    def describe(self) -> str:
        """One line for logs: the values and where they come from."""
        values = self.values()
        if not values:
            return f"none (no sampling keys in {self.source})" if self.source else f"none (no {FILE_NAME} read)"
        return ", ".join(f"{k}={v}" for k, v in values.items()) + f" (from {self.source})"


NO_DEFAULTS = SamplingDefaults()


def _number(path: Path, key: str, value: Any, integer: bool) -> float | int:
    """`value` checked: a number (a whole one where `integer`), else ValueError naming file and key."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{path}: {key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def read_sampling_defaults(setting: str, model_path: str | Path) -> SamplingDefaults:
    """The defaults EngineConfig.generation_config names for the checkpoint at `model_path`.
    ValueError naming the file when a given path has no generation_config.json, the file is not a
    JSON object, or one of the five keys has a value out of its range (a request with that value
    would be refused: the same limits as SamplingParams.validate)."""
    if setting == NONE:
        return NO_DEFAULTS
    if setting == AUTO:
        path = Path(model_path) / FILE_NAME
        if not path.is_file():
            return NO_DEFAULTS
    else:
        path = Path(setting)
        path = path / FILE_NAME if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"generation_config {setting!r}: no such file or folder holding {FILE_NAME} "
                             f"(use {AUTO}, {NONE}, or a path)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: the top level must be an object")
    values: dict[str, Any] = {}
    for key, name in _KEYS.items():
        if doc.get(key) is not None:
            values[name] = _number(path, key, doc[key], integer=key in ("top_k", "max_new_tokens"))
    if values.get("top_k") == 0:
        values["top_k"] = -1
    defaults = SamplingDefaults(**values, source=str(path))
    _check(defaults, path)
    return defaults


def _check(defaults: SamplingDefaults, path: Path) -> None:
    """ValueError naming the file and key when a default is one SamplingParams.validate refuses."""
    try:
        SamplingParams(**defaults.values()).validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
