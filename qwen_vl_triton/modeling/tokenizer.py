"""The Qwen2 tokenizer of a checkpoint, straight from its tokenizer.json (the `tokenizers` library)
and its chat template (jinja2), without importing transformers.

Importing transformers and resolving AutoTokenizer costs ~0.7 s of a 2-core machine's start-up,
more than loading a small model's weights; the engine needs only what is here. `load_tokenizer`
returns a `QwenTokenizer` for the checkpoints it mirrors (tokenizer_class Qwen2Tokenizer, with a
tokenizer.json) and transformers' AutoTokenizer for anything else.

What it mirrors of transformers' Qwen2Tokenizer (5.x), checked against it in
tests/modeling/test_tokenizer.py on hypothesis text, chat messages, tools and special tokens:
- the tokenizer.json pipeline (NFC, Qwen's split regex, byte-level BPE), with every special token
  named by tokenizer_config.json (eos, pad, unk, bos, extra/additional special tokens) marked
  special, as Qwen2Tokenizer's constructor does;
- `encode(text, add_special_tokens=False)`, `decode` / `batch_decode` (no clean-up of
  tokenization spaces: Qwen's configs turn it off), `convert_ids_to_tokens`, `get_vocab`, `len()`,
  `added_tokens_decoder`, `eos_token_id`, `backend_tokenizer`;
- `apply_chat_template(messages, tools=..., chat_template=..., add_generation_prompt=...)` rendered by the same
  jinja2 environment (sandboxed, trim_blocks, lstrip_blocks, loopcontrols; its `tojson`,
  `raise_exception`, `strftime_now`), over messages with None-valued keys dropped, with the
  special tokens as template variables; the template from chat_template.jinja, else
  tokenizer_config.json's chat_template.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
MIRRORED_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=128)  # as transformers': per-request templates are compiled once each
def _compile_template(template: str):
    """The chat template compiled in transformers' environment (see the module docstring)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # jinja's own escapes HTML
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class QwenTokenizer:
    """A checkpoint's Qwen2 tokenizer (see the module docstring); build it with `from_pretrained`."""

    def __init__(self, backend: Tokenizer, config: dict[str, Any], chat_template: str | None):
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self.special_tokens_map = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = extra.values() if isinstance(extra, dict) else extra
        specials = [*self.special_tokens_map.values(), *filter(None, map(_token_text, extra))]
        # As Qwen2Tokenizer's constructor: every named special token is a special added token.
        backend.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(specials)])
        eos = self.special_tokens_map.get("eos_token")
        self.eos_token_id = None if eos is None else backend.token_to_id(eos)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> QwenTokenizer:
        path = Path(path)
        config = json.loads((path / "tokenizer_config.json").read_text())
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(Tokenizer.from_file(str(path / "tokenizer.json")), config, template)

    # ------------------------------------------------------------------ tokens

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: list[list[int]], skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool = False) -> list[str]:
        if clean_up_tokenization_spaces:
            raise ValueError("QwenTokenizer does not clean up tokenization spaces (Qwen's configs turn it off)")
        return self.backend_tokenizer.decode_batch([list(s) for s in sequences],
                                                   skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self.backend_tokenizer.get_added_tokens_decoder()

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            tokenize: bool = False, add_generation_prompt: bool = False,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """The chat template (`chat_template`'s text, else the checkpoint's) rendered over `messages`
        (tokenize=False only: encode() the result)."""
        if tokenize:
            raise ValueError("QwenTokenizer.apply_chat_template renders text only (tokenize=False)")
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json's "
                             "chat_template)")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers does
        return _compile_template(template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs})


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer: a QwenTokenizer for Qwen2 tokenizers with a tokenizer.json,
    transformers' AutoTokenizer otherwise."""
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    if ((path / "tokenizer.json").is_file() and config_file.is_file()
            and json.loads(config_file.read_text()).get("tokenizer_class") in MIRRORED_CLASSES):
        return QwenTokenizer.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
