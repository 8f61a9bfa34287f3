"""The engine's one input contract: a `PreparedRequest`, and the `Preprocessor` that makes it.

Every request reaches `LLM.add_request` as a PreparedRequest: token ids with each media pad
expanded to its merged-patch count, the media preprocessed (images as patches, videos as plans
that are decoded chunk by chunk when encoded: engine/media.py), and the sampling parameters.

One Preprocessor makes them, for offline generation (`LLM.generate`, tools/generate.py) and for
the server (serving/prompting.py turns HTTP bodies into chat messages and `Media`, then calls it):

    request = llm.preprocessor.prepare(Prompt("Describe it.", [Media("cat.jpg")]), params)
    # or, for a conversation:
    media = [pre.prepare_media(m) for m in media_in_order]
    request = pre.build(pre.render(messages), media, params)

`build` is where the prompt is fitted and checked, once: videos that would push it over
max_input_length are shrunk (`media.fit_videos`), then a prompt still over the limit is refused
with a `ContextLengthError` naming the limit. It also sets the output budget, the one policy for
offline runs and the server alike: a max_tokens of None becomes the room the prompt leaves under
max_seq_len (capped by max_output_tokens, the server's max_iter_times), and a max_tokens the
prompt leaves no room for is an `OutputLengthError`; a given max_tokens is capped the same way.
The PreparedRequest it returns is frozen, its cache_salt included. Before that, and before any tokenizing, `render`
and `tokenize` refuse text that cannot fit whatever it tokenizes to: more characters than
max_input_length tokens can hold (`check_text`), so an absurd prompt costs no tokenizer work.

Thread safety: tokenizer calls hold the Preprocessor's lock; media work runs outside it, so the
server's worker threads decode media in parallel. The server makes its own Preprocessor (with its
own tokenizer) so the engine thread's detokenizing never waits on it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_vl_triton.engine.media import DEFAULT_LIMITS, Media, MediaLimits, PreparedMedia, fit_videos, prepare_media
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.modeling.config import ModelConfig
from qwen_vl_triton.modeling.processing import ImageProcessorConfig
from qwen_vl_triton.modeling.prompt import expand_media_pads, user_message
from qwen_vl_triton.modeling.tokenizer import load_tokenizer

# One token stands for at most its decoded text's characters, plus one where a decoder drops a
# leading space, times 4: Unicode normalization (Qwen's tokenizer applies NFC) composes at most 4
# code points into one character.
_NORMALIZATION_FACTOR = 4


class ContextLengthError(ValueError):
    """A prompt that does not fit max_input_length, even with its videos shrunk."""


class OutputLengthError(ContextLengthError):
    """A prompt and its max_tokens that together do not fit max_seq_len."""


def max_chars_per_token(tokenizer: Any) -> int | None:
    """The most characters of input text one token can stand for, from the tokenizer's longest
    token (its decoded text, special tokens included); None when there is no such bound (an added
    token that strips the whitespace beside it absorbs any run of spaces)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    if any(getattr(t, "lstrip", False) or getattr(t, "rstrip", False) for t in added):
        return None
    ids = [[i] for i in sorted(set(tokenizer.get_vocab().values()))]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's own: what its decode calls
    if backend is not None:  # 0.36 s for Qwen's 151k ids against 1.3 s through batch_decode's per-id Python
        texts = backend.decode_batch(ids, skip_special_tokens=False)
    else:
        texts = tokenizer.batch_decode(ids, clean_up_tokenization_spaces=False)
    return _NORMALIZATION_FACTOR * (max(map(len, texts)) + 1)


def _text_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in chat messages (string contents and text parts)."""
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


class ToolsNotRendered(ValueError):
    """Tools were offered to a model whose chat template has no place for them."""


class PromptMediaMismatch(ValueError):
    """The prompt's media pads and its media disagree (for example, the text itself holds a pad)."""


@dataclass
class Prompt:
    """One offline request's input: the user's text after its media (images / videos, in order).
    A medium may come already prepared (engine.media.prepare_media with the engine's image
    processor config and media limits), e.g. read while the engine loads."""

    text: str
    media: list[Media | PreparedMedia] = field(default_factory=list)


@dataclass(frozen=True)
class PreparedRequest:
    """What the engine takes: ids [L] (media pads expanded, so L counts the media's tokens), the
    prepared media in prompt order, and the sampling parameters (max_tokens resolved: an int)."""

    ids: list[int]
    media: list[PreparedMedia] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    cache_salt: str | None = None  # prefix-cache blocks are shared only among requests with the same salt


class Preprocessor:
    """Renders prompts, prepares media, fits videos and checks lengths (see the module docstring).

    max_input_length: the most prompt tokens (media included); limit_name: how error messages
    name it (the server says MindIE's max_input_token_len). max_chars: the most characters of text
    that can fit max_input_length tokens (None: no bound), from the tokenizer's longest token,
    computed once here. max_seq_len: prompt + output tokens (None: no bound, then max_tokens must
    be given); max_output_tokens: output tokens at most, whatever max_tokens asks (None: no cap).
    """

    def __init__(self, tokenizer: Any, config: ModelConfig, image_cfg: ImageProcessorConfig, max_input_length: int,
                 limits: MediaLimits = DEFAULT_LIMITS, limit_name: str = "max_input_length",
                 max_seq_len: int | None = None, max_output_tokens: int | None = None):
        self.tokenizer, self.config, self.image_cfg, self.limits = tokenizer, config, image_cfg, limits
        self.max_input_length = max_input_length
        self.max_seq_len, self.max_output_tokens = max_seq_len, max_output_tokens  # the output budget
        self.limit_name = f"{limit_name} {max_input_length}"
        self.chars_per_token = max_chars_per_token(tokenizer)
        self.max_chars = None if self.chars_per_token is None else self.chars_per_token * max_input_length
        self.lock = threading.Lock()

    def with_own_tokenizer(self, path: str | Path, limit_name: str,
                           max_output_tokens: int | None = None) -> Preprocessor:
        """A copy with a tokenizer of its own, for use from other threads (and, for the server, its
        output cap). The same checkpoint's tokenizer: the characters-per-token bound is reused, not
        computed again over the vocabulary."""
        twin = copy.copy(self)
        twin.tokenizer = load_tokenizer(path)
        twin.limit_name = f"{limit_name} {self.max_input_length}"
        twin.max_output_tokens = max_output_tokens
        twin.lock = threading.Lock()
        return twin

    # ---------------------------------------------------------------------------- parts

    def prepare_media(self, media: Media) -> PreparedMedia:
        """Check one medium's controls against the limits and preprocess it (MediaError if not)."""
        return prepare_media(media, self.image_cfg, self.limits)

    def _prepared(self, media: Media | PreparedMedia) -> PreparedMedia:
        """A prompt's medium, prepared here unless it comes prepared (for this image processor)."""
        if not isinstance(media, PreparedMedia):
            return self.prepare_media(media)
        if media.cfg != self.image_cfg:
            raise ValueError("a prepared medium was made with another image processor config than this model's")
        return media

    def check_text(self, chars: int) -> None:
        """ContextLengthError, before any tokenizing, when `chars` characters of prompt text are more
        than max_input_length tokens can hold (a chat template only adds to them)."""
        if self.max_chars is not None and chars > self.max_chars:
            raise ContextLengthError(f"the prompt's text has {chars} characters, more than the {self.max_chars} that "
                                     f"can fit {self.limit_name} (a token of this tokenizer stands for at most "
                                     f"{self.chars_per_token}); refused before tokenizing")

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the chat template over `messages` (transformers' message dicts, media parts
        as {"type": "image"|"video"}) and `tools` (OpenAI function tools, which the template lists
        in its system turn), generation prompt appended; one pad per medium. Text that cannot fit
        is refused first (`check_text`). ToolsNotRendered when tools are given to a template that
        ignores them (Qwen2-VL's has no tools section): the model would never learn of them."""
        self.check_text(_text_chars(messages) + (len(json.dumps(tools)) if tools else 0))
        with self.lock:
            rendered = self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                          add_generation_prompt=True)
            if tools and rendered == self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True):
                raise ToolsNotRendered("this model's chat template does not render tools, so it cannot be offered "
                                       "any; send the request without 'tools'")
            return self.tokenizer.encode(rendered, add_special_tokens=False)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of raw text (no template, no special tokens added); text that cannot fit is
        refused first (`check_text`)."""
        self.check_text(len(text))
        with self.lock:
            return self.tokenizer.encode(text, add_special_tokens=False)

    def build(self, ids: list[int], media: list[PreparedMedia], params: SamplingParams,
              cache_salt: str | None = None) -> PreparedRequest:
        """The request: pads expanded, videos fitted to max_input_length, the length checked, the
        output budget set (the module docstring says how).

        Raises PromptMediaMismatch when pads and media disagree; ContextLengthError when the
        prompt does not fit (its text alone, or its images); MediaError (from fit_videos) when its
        videos do not fit even at their smallest sizes; OutputLengthError when max_tokens does not.
        """
        expanded = self._expand(ids, media)
        limit = self.max_input_length
        if len(expanded) > limit and any(m.video_plan is not None for m in media):
            text_tokens = len(expanded) - sum(m.num_tokens for m in media)
            if text_tokens >= limit:
                raise ContextLengthError(f"the prompt's text takes {text_tokens} tokens (chat template included), "
                                         f"leaving no room under {self.limit_name}")
            fit_videos(media, limit - text_tokens, self.limit_name)
            expanded = self._expand(ids, media)
        if len(expanded) > limit:
            raise ContextLengthError(f"prompt has {len(expanded)} tokens (media included), over {self.limit_name}")
        max_tokens = self.output_budget(len(expanded), params.max_tokens)
        return PreparedRequest(expanded, media, dataclasses.replace(params, max_tokens=max_tokens), cache_salt)

    def output_budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The output tokens a prompt of `prompt_tokens` may generate for `max_tokens` (None: all the
        room left), within max_seq_len and max_output_tokens; OutputLengthError when the prompt
        leaves no room for the max_tokens asked."""
        cap = self.max_output_tokens
        if self.max_seq_len is None:
            if max_tokens is None:
                raise ValueError("max_tokens must be given where no max_seq_len bounds the output")
            return max_tokens if cap is None else min(max_tokens, cap)
        room = self.max_seq_len - prompt_tokens
        if max_tokens is None:
            return max(1, room if cap is None else min(cap, room))
        if max_tokens > room:
            raise OutputLengthError(f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: together "
                                    f"over max_seq_len {self.max_seq_len}")
        return max_tokens if cap is None else min(max_tokens, cap)

    def _expand(self, ids: list[int], media: list[PreparedMedia]) -> list[int]:
        try:
            return expand_media_pads(ids, [(m.kind, m.grid) for m in media], self.config.vision.spatial_merge_size,
                                     self.config.image_token_id, self.config.video_token_id)
        except ValueError as e:
            raise PromptMediaMismatch(f"prompt text and media do not match: {e}") from None

    # ---------------------------------------------------------------------------- offline prompts

    def prepare(self, prompt: Prompt | str, params: SamplingParams | None = None,
                cache_salt: str | None = None) -> PreparedRequest:
        """An offline prompt as one user message (media then text, the template's default system
        message), exactly what transformers' Qwen2-VL processor builds for it. The media count and
        the text's length are checked before any medium is read."""
        prompt = Prompt(prompt) if isinstance(prompt, str) else prompt
        self.limits.check_count(len(prompt.media))
        self.check_text(len(prompt.text))
        media = [self._prepared(m) for m in prompt.media]
        ids = self.render([user_message([m.kind for m in media], prompt.text)])
        return self.build(ids, media, params or SamplingParams(), cache_salt)
