"""The engine's one input contract: a `PreparedRequest`, and the `Preprocessor` that makes it.

Every request reaches `LLM.add_request` as a PreparedRequest: token ids with each media pad
expanded to its merged-patch count, the media preprocessed (images as patches, videos as plans
that are decoded chunk by chunk when encoded: engine/media.py), and the sampling parameters.

One Preprocessor makes them, for offline generation (`LLM.generate`, tools/generate.py) and for
the server (serving/prompting.py turns HTTP bodies into chat messages and `Media`, then calls it):

    request = llm.preprocessor.prepare(Prompt("Describe it.", [Media("cat.jpg")]), params)
    # or vLLM's prompt dicts: chat-template text (or token ids), pads bound to the media in order
    request = llm.preprocessor.prepare({"prompt": text, "multi_modal_data": {"image": [img, "b.png"]}}, params)
    # or, for a conversation (engine/chat.py parses it; `resolve` reads each MediaRef's medium):
    request = pre.prepare_chat(chat_messages, params, resolve=resolve)

`build` is where the prompt is fitted and checked, once: videos that would push it over
max_input_length are shrunk (`media.fit_videos`), then a prompt still over the limit is refused
with a `ContextLengthError` naming the limit. It also sets the output budget, the one policy for
offline runs and the server alike: a max_tokens of None becomes the room the prompt leaves under
max_seq_len (capped by max_output_tokens, the server's max_iter_times), and a max_tokens the
prompt leaves no room for is an `OutputLengthError`; a given max_tokens is capped the same way.
The PreparedRequest it returns is frozen, its cache_salt included. Before that, and before any tokenizing, `render`
and `tokenize` refuse text that cannot fit whatever it tokenizes to: more characters than
max_input_length tokens can hold (`check_text`), so an absurd prompt costs no tokenizer work.

Which chat template renders a conversation: the request's own (the server's per-request
`chat_template`), else the engine's (EngineConfig.chat_template: a file or the text, read by
`load_chat_template`), else the checkpoint's. A conversation with tools, tool calls or tool
results is rendered by that template only if it renders tools and tool calls (Qwen2.5's does;
Qwen2-VL's, and Qwen2.5-VL's processor template, ignore them: found once per template by rendering
a probe conversation); otherwise by QWEN_TOOLS_TEMPLATE (templates/qwen_tools.jinja), Qwen's own
function-calling format over Qwen-VL's media parts, the text Qwen2.5's template renders, which the
whole Qwen-VL family is trained on.

Thread safety: tokenizer calls hold the Preprocessor's lock; media work runs outside it, so the
server's worker threads decode media in parallel. The server makes its own Preprocessor (with its
own tokenizer) so the engine thread's detokenizing never waits on it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import numbers
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qwen_vl_triton.engine.chat import ChatMessage, InputError, MediaRef, Resolver, template_messages
from qwen_vl_triton.engine.media import (
    DEFAULT_LIMITS,
    Media,
    MediaLimits,
    MediaOptionError,
    PreparedMedia,
    fit_videos,
    prepare_media,
    with_processor_kwargs,
)
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.modeling.config import ModelConfig
from qwen_vl_triton.modeling.processing import ImageProcessorConfig, MediaError, MediaKind, MediaTooLarge, is_image
from qwen_vl_triton.modeling.prompt import expand_media_pads, user_message
from qwen_vl_triton.modeling.tokenizer import load_tokenizer

# One token stands for at most its decoded text's characters, plus one where a decoder drops a
# leading space, times 4: Unicode normalization (Qwen's tokenizer applies NFC) composes at most 4
# code points into one character.
_NORMALIZATION_FACTOR = 4

# Qwen's function-calling format, for templates that do not render tools (module docstring).
QWEN_TOOLS_TEMPLATE = (Path(__file__).parent / "templates" / "qwen_tools.jinja").read_text()

# A conversation that shows whether a template renders tools and tool calls: their names appear in
# its text only if it does.
_PROBE_TOOL_NAME, _PROBE_CALL_NAME = "qvl_probe_tool", "qvl_probe_call"
_PROBE_TOOLS = [{"type": "function", "function": {"name": _PROBE_TOOL_NAME,
                                                  "parameters": {"type": "object", "properties": {}}}}]
_PROBE_MESSAGES = [
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": _PROBE_CALL_NAME, "arguments": {}}}]},
    {"role": "tool", "content": "r", "tool_call_id": "call_0"},
]


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


def load_chat_template(value: str) -> str:
    """A --chat_template value as template text: the file it names, else the value itself when it
    is Jinja text (holds `{%` or `{{`); ValueError naming chat_template otherwise."""
    try:
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text()
    except (OSError, ValueError):  # a name too long for a path, or holding a NUL: not a file
        pass
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"chat_template: no such file {value!r} (a value that is not a file must be a Jinja "
                     "template, holding {% or {{)")


def _has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    """Whether chat messages hold a tool result or an assistant's tool calls."""
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


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


class TemplateKwargsError(ValueError):
    """Template variables (a request's chat_template_kwargs) that name one of the renderer's own
    arguments (tools, tokenize, ...), not a variable of the template."""


class PromptMediaMismatch(ValueError):
    """The prompt's media pads and its media disagree (for example, the text itself holds a pad)."""


@dataclass
class Prompt:
    """One offline request's input: the user's text after its media (images / videos, in order).
    A medium may come already prepared (engine.media.prepare_media with the engine's image
    processor config and media limits), e.g. read while the engine loads."""

    text: str
    media: list[Media | PreparedMedia] = field(default_factory=list)


# The keys of vLLM's offline prompt dicts (TextPrompt / TokensPrompt) that `Preprocessor.prepare` takes.
PROMPT_DICT_KEYS = ("prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs", "cache_salt")
# What a multi_modal_data item may be, per kind, and how the message names it.
_MEDIA_SOURCES: dict[str, tuple[tuple[type, ...], str]] = {
    "image": ((str, Path, bytes, Image.Image), "a file path, the file's bytes or a PIL image"),
    "video": ((str, Path, bytes, list, tuple, np.ndarray), "a file path, the file's bytes or its frames (a list "
                                                            "of PIL images or uint8 [H, W, 3] arrays, or a uint8 "
                                                            "[T, H, W, 3] array)"),
}


def _is_frame(item: Any) -> bool:
    """Whether a multi_modal_data item is one video frame (a PIL image or an [H, W, C] array)."""
    return isinstance(item, Image.Image) or (isinstance(item, np.ndarray) and item.ndim == 3)


def _items(kind: str, given: Any) -> list[Any]:
    """One kind's multi_modal_data value as its items. A list is a list of items, except that for
    videos, as vLLM reads it, a list of frames (or one array) is one video."""
    if given is None:
        return []
    one_video = kind == "video" and (isinstance(given, np.ndarray) or (
        isinstance(given, (list, tuple)) and len(given) > 0 and all(map(_is_frame, given))))
    return list(given) if isinstance(given, (list, tuple)) and not one_video else [given]


def _multi_modal_media(data: Any, processor_kwargs: Any) -> dict[str, list[Media]]:
    """vLLM's `multi_modal_data` ({"image": item or [items], "video": item or [items]}) as Media
    per kind, in the order given, each with `mm_processor_kwargs` as its controls
    (engine.media.with_processor_kwargs). Nothing is read here (a video's frames are checked as it
    is prepared); ValueError naming what is wrong."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"multi_modal_data must be a dict such as {{'image': [...], 'video': [...]}}, "
                         f"got {type(data).__name__}")
    unknown = sorted(set(data) - set(_MEDIA_SOURCES), key=str)
    if unknown:
        raise ValueError(f"multi_modal_data: unknown key(s) {unknown}; accepted: {list(_MEDIA_SOURCES)}")
    if processor_kwargs is not None and not isinstance(processor_kwargs, dict):
        raise ValueError(f"mm_processor_kwargs must be a dict, got {type(processor_kwargs).__name__}")
    with_processor_kwargs(MediaKind.IMAGE, {}, processor_kwargs)  # checks the names once, media or not
    media: dict[str, list[Media]] = {}
    for kind, (sources, expected) in _MEDIA_SOURCES.items():
        items = _items(kind, data.get(kind))
        for i, item in enumerate(items):
            if not isinstance(item, sources):
                raise ValueError(f"multi_modal_data[{kind!r}][{i}] must be {expected}, got {type(item).__name__}")
        media[kind] = [Media(item, kind, with_processor_kwargs(kind, {}, processor_kwargs)) for item in items]
    return media


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
    chat_template: replaces the tokenizer's (EngineConfig.chat_template: a file or the template's
    text); ValueError naming it when it is neither, or cannot render a one-message conversation.
    """

    def __init__(self, tokenizer: Any, config: ModelConfig, image_cfg: ImageProcessorConfig, max_input_length: int,
                 limits: MediaLimits = DEFAULT_LIMITS, limit_name: str = "max_input_length",
                 max_seq_len: int | None = None, max_output_tokens: int | None = None,
                 chat_template: str | None = None):
        self.tokenizer, self.config, self.image_cfg, self.limits = tokenizer, config, image_cfg, limits
        self.chat_template = tokenizer.chat_template
        if chat_template is not None:
            self.chat_template = load_chat_template(chat_template)
            try:
                tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=self.chat_template,
                                              tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 - a syntax error, or whatever the template raises
                raise ValueError(f"chat_template: cannot render a conversation: {type(e).__name__}: {e}") from None
        self.max_input_length = max_input_length
        self.max_seq_len, self.max_output_tokens = max_seq_len, max_output_tokens  # the output budget
        self.limit_name = f"{limit_name} {max_input_length}"
        self.chars_per_token = max_chars_per_token(tokenizer)
        self.max_chars = None if self.chars_per_token is None else self.chars_per_token * max_input_length
        self.lock = threading.Lock()
        self._renders_tools = functools.lru_cache(maxsize=64)(self._probe_tools)
        # What template variables may not be named: the renderer's own arguments, and `messages`.
        arguments = inspect.signature(tokenizer.apply_chat_template).parameters.values()
        self._reserved_kwargs = {"messages"} | {a.name for a in arguments if a.kind not in (a.VAR_KEYWORD,
                                                                                           a.VAR_POSITIONAL)}

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
        twin._renders_tools = functools.lru_cache(maxsize=64)(twin._probe_tools)
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

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               chat_template: str | None = None, template_kwargs: dict[str, Any] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template over `messages` (transformers' message dicts, media parts
        as {"type": "image"|"video"}) and `tools` (OpenAI function tools, which the template lists
        in its system turn), generation prompt appended (unless not `add_generation_prompt`); one
        pad per medium. `chat_template`
        replaces the engine's template for this conversation; `template_kwargs` are extra template
        variables (e.g. add_vision_id). A conversation with tools, tool calls or tool results goes
        to QWEN_TOOLS_TEMPLATE when the template would not render them (the module docstring).
        Text that cannot fit is refused first (`check_text`), and again as rendered, before it is
        tokenized; template_kwargs naming the renderer's own arguments are a TemplateKwargsError;
        whatever the template raises (a Jinja syntax error among them) propagates."""
        self.check_text(_text_chars(messages) + (len(json.dumps(tools)) if tools else 0))
        clash = self._reserved_kwargs.intersection(template_kwargs or ())
        if clash:
            raise TemplateKwargsError(f"chat_template_kwargs: {', '.join(sorted(clash))} would replace the "
                                      "renderer's own arguments; only template variables may be given")
        template = chat_template or self.chat_template
        with self.lock:
            if ((tools or _has_tool_turns(messages)) and isinstance(template, str)
                    and not self._renders_tools(template)):
                template = QWEN_TOOLS_TEMPLATE
            rendered = self.tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=template,
                                                          tokenize=False,
                                                          add_generation_prompt=add_generation_prompt,
                                                          **(template_kwargs or {}))
            self.check_text(len(rendered))  # a template (a request's, say) may make far more text than it was given
            return self.tokenizer.encode(rendered, add_special_tokens=False)

    def _probe_tools(self, template: str) -> bool:
        """Whether `template` renders tools and tool calls (the probe conversation's names appear in
        its text); a template that raises on the probe does not, except for a Jinja syntax error,
        which propagates. Cached per template text (`_renders_tools`); called under the lock."""
        from jinja2 import TemplateSyntaxError

        try:
            text = self.tokenizer.apply_chat_template(_PROBE_MESSAGES, tools=_PROBE_TOOLS, chat_template=template,
                                                      tokenize=False)
        except TemplateSyntaxError:
            raise
        except Exception:  # noqa: BLE001 - e.g. raise_exception on a role it does not know: no tools there
            return False
        return _PROBE_TOOL_NAME in text and _PROBE_CALL_NAME in text

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

    # ---------------------------------------------------------------------------- conversations

    def prepare_chat(self, messages: list[ChatMessage], params: SamplingParams | None = None, *, resolve: Resolver,
                     tools: list[dict[str, Any]] | None = None, chat_template: str | None = None,
                     chat_template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True,
                     mm_processor_kwargs: dict[str, Any] | None = None,
                     cache_salt: str | None = None) -> PreparedRequest:
        """A parsed conversation (engine/chat.py) as a PreparedRequest, for the server and `LLM.chat`
        alike: rendered with the chat template (`chat_template` and `chat_template_kwargs` as for
        `render`, `tools` offered in its system turn), its media resolved by `resolve` (MediaRef ->
        Media: where the caller reads media from) and prepared in prompt order, each with
        `mm_processor_kwargs` under its own controls (engine.media.with_processor_kwargs), then
        `build_checked`. What bounds the work is checked before any is done: the media count and
        the kwargs' names first, then (as the template is rendered, before tokenizing) the text's
        length; media are read last.

        Every refusal is an InputError naming the request's field (param) with an OpenAI-style
        code: too_many_media (messages), context_length_exceeded, invalid_value (a template that
        cannot render: chat_template when the request gave one, else messages; chat_template_kwargs;
        mm_processor_kwargs: an unknown key, or a value over a limit the part's own controls keep),
        and per media part (param its path) invalid_value (controls), media_too_large,
        invalid_media (unreadable); whatever `resolve` raises propagates."""
        refs = [p for m in messages for p in m.parts if isinstance(p, MediaRef)]
        try:
            self.limits.check_count(len(refs))
        except MediaOptionError as e:
            raise InputError(str(e), param="messages", code="too_many_media") from None
        try:
            with_processor_kwargs(MediaKind.IMAGE, {}, mm_processor_kwargs)  # checks the names once, media or not
        except MediaOptionError as e:
            raise InputError(str(e), param="mm_processor_kwargs") from None
        try:
            ids = self.render(template_messages(messages), tools, chat_template, chat_template_kwargs,
                              add_generation_prompt)
        except ContextLengthError as e:
            raise InputError(str(e), param="messages", code="context_length_exceeded") from None
        except TemplateKwargsError as e:
            raise InputError(str(e), param="chat_template_kwargs") from None
        except Exception as e:  # noqa: BLE001 - templates raise their own errors for odd conversations
            if chat_template is not None:
                raise InputError(f"'chat_template' cannot render these messages: {type(e).__name__}: {e}"[:1000],
                                 param="chat_template") from None
            raise InputError(f"the model's chat template cannot render these messages: {e}",
                             param="messages") from None
        media = [self._chat_medium(ref, resolve(ref), mm_processor_kwargs) for ref in refs]
        return self.build_checked(ids, media, params or SamplingParams(), "messages", cache_salt)

    def _chat_medium(self, ref: MediaRef, media: Media, processor_kwargs: dict[str, Any] | None) -> PreparedMedia:
        """One resolved media part, prepared with the request's kwargs under its controls and
        labelled with its path (the engine names the part if it fails later, as it decodes it)."""
        def refuse(message: str, code: str, param: str = ref.param) -> InputError:
            return InputError(f"'{param}': {message}", param=param, code=code)

        if ref.kind == MediaKind.VIDEO and isinstance(media.source, (str, Path, bytes)) and is_image(media.source):
            raise refuse("this is an image, not a video: send it as an image_url part", "invalid_media")
        own = media.options
        media = dataclasses.replace(media, options=with_processor_kwargs(ref.kind, own, processor_kwargs))
        try:
            return dataclasses.replace(self.prepare_media(media), label=ref.param)
        except MediaOptionError as e:
            raise refuse(str(e), "invalid_value", self._blamed(ref, own, processor_kwargs)) from None
        except MediaTooLarge as e:  # its header declares more pixels than decode_max_pixels
            raise refuse(str(e), "media_too_large") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is the file's fault
            article = "an" if ref.kind == MediaKind.IMAGE else "a"
            raise refuse(f"cannot read it as {article} {ref.kind}: {e}"[:500], "invalid_media") from None

    def _blamed(self, ref: MediaRef, own: dict[str, Any], processor_kwargs: dict[str, Any] | None) -> str:
        """Which field a refused control came from: mm_processor_kwargs when the part's own controls
        pass the limits without them, else the part."""
        if not processor_kwargs:
            return ref.param
        try:
            self.limits.check(ref.kind, own, ref.param)
        except MediaOptionError:
            return ref.param
        return "mm_processor_kwargs"

    def build_checked(self, ids: list[int], media: list[PreparedMedia], params: SamplingParams, param: str,
                      cache_salt: str | None = None) -> PreparedRequest:
        """`build`, each refusal an InputError: PromptMediaMismatch (invalid_value) and a prompt too
        long (context_length_exceeded) name `param` (where the request's prompt is: messages or
        prompt), a max_tokens that does not fit names max_tokens."""
        try:
            return self.build(ids, media, params, cache_salt)
        except PromptMediaMismatch as e:  # e.g. the text itself contains <|image_pad|>
            raise InputError(str(e), param=param) from None
        except OutputLengthError as e:  # the prompt fits, its max_tokens does not
            raise InputError(str(e), param="max_tokens", code="context_length_exceeded") from None
        except (ContextLengthError, MediaError) as e:  # a MediaError here: videos too long even shrunk
            raise InputError(str(e), param=param, code="context_length_exceeded") from None

    # ---------------------------------------------------------------------------- offline prompts

    def prepare(self, prompt: Prompt | str | dict[str, Any], params: SamplingParams | None = None,
                cache_salt: str | None = None) -> PreparedRequest:
        """An offline prompt. A Prompt or a string: one user message (media then text, the
        template's default system message), exactly what transformers' Qwen2-VL processor builds
        for it. A dict: one of vLLM's prompt dicts (`_prepare_prompt_dict`). Either way the media
        count and the text's length are checked before any medium is read."""
        if isinstance(prompt, dict):
            return self._prepare_prompt_dict(prompt, params, cache_salt)
        prompt = Prompt(prompt) if isinstance(prompt, str) else prompt
        self.limits.check_count(len(prompt.media))
        self.check_text(len(prompt.text))
        media = [self._prepared(m) for m in prompt.media]
        ids = self.render([user_message([m.kind for m in media], prompt.text)])
        return self.build(ids, media, params or SamplingParams(), cache_salt)

    def _prepare_prompt_dict(self, prompt: dict[str, Any], params: SamplingParams | None,
                             cache_salt: str | None) -> PreparedRequest:
        """vLLM's TextPrompt / TokensPrompt: `prompt` (text already in the chat template's form,
        tokenized as it is: no template, no special tokens added) or `prompt_token_ids`, with
        `multi_modal_data` ({"image": PIL image, path or bytes, or a list of them; "video": path,
        bytes or frames, or a list of them}), `mm_processor_kwargs` (controls for every medium of
        the prompt: engine.media.with_processor_kwargs) and `cache_salt` (as the argument; not both).

        Each `<|image_pad|>` of the prompt takes the next image, each `<|video_pad|>` the next
        video. ValueError naming the problem: a key not in PROMPT_DICT_KEYS, neither or both of
        prompt and prompt_token_ids, a value of the wrong type, a token id outside the vocabulary;
        PromptMediaMismatch when the pads of each kind and the media given do not count the same.
        """
        unknown = sorted(set(prompt) - set(PROMPT_DICT_KEYS), key=str)
        if unknown:
            raise ValueError(f"prompt dict: unknown key(s) {unknown}; accepted: {list(PROMPT_DICT_KEYS)}")
        if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise ValueError("prompt dict: give one of 'prompt' (text, tokenized as it is) or 'prompt_token_ids'")
        salt = prompt.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            raise ValueError(f"prompt dict: 'cache_salt' must be a string, got {type(salt).__name__}")
        if salt is not None and cache_salt is not None:
            raise ValueError("cache_salt is given twice: in the prompt dict and as an argument")
        media = _multi_modal_media(prompt.get("multi_modal_data"), prompt.get("mm_processor_kwargs"))
        self.limits.check_count(sum(map(len, media.values())))
        if "prompt" in prompt:
            if not isinstance(prompt["prompt"], str):
                raise ValueError(f"prompt dict: 'prompt' must be a string, got {type(prompt['prompt']).__name__}")
            ids = self.tokenize(prompt["prompt"])
        else:
            ids = self._token_ids(prompt["prompt_token_ids"])
        if not ids:
            raise ValueError("prompt dict: the prompt is empty")
        in_order = [self._prepared(m) for m in self._bind_media(ids, media["image"], media["video"])]
        return self.build(ids, in_order, params or SamplingParams(), salt if salt is not None else cache_salt)

    def _token_ids(self, value: Any) -> list[int]:
        """A prompt dict's prompt_token_ids as a list of ints, each in the model's vocabulary, no
        more than max_input_length of them (a ContextLengthError before any medium is read: each
        pad only grows)."""
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"prompt dict: 'prompt_token_ids' must be a list of ints, got {type(value).__name__}")
        if len(value) > self.max_input_length:
            raise ContextLengthError(f"prompt has {len(value)} token ids, over {self.limit_name}")
        vocab = self.config.text.vocab_size
        for i, token in enumerate(value):
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < vocab:
                raise ValueError(f"prompt dict: prompt_token_ids[{i}] = {token!r} is not a token id of this model "
                                 f"(an int in [0, {vocab}))")
        return [int(token) for token in value]

    def _bind_media(self, ids: list[int], images: list[Media], videos: list[Media]) -> list[Media]:
        """The media in the order of their pads in `ids`: the k-th image pad takes images[k], the
        k-th video pad videos[k]. PromptMediaMismatch, before any medium is read, when the counts
        differ."""
        image_pad, video_pad = self.config.image_token_id, self.config.video_token_id
        pads = [t for t in ids if t in (image_pad, video_pad)]
        image_pads = pads.count(image_pad)
        if (image_pads, len(pads) - image_pads) != (len(images), len(videos)):
            raise PromptMediaMismatch(
                f"the prompt has {image_pads} image pad(s) and {len(pads) - image_pads} video pad(s) "
                f"(<|vision_start|><|image_pad|><|vision_end|> / <|video_pad|>, one per medium), but "
                f"multi_modal_data gives {len(images)} image(s) and {len(videos)} video(s)")
        queues = {image_pad: iter(images), video_pad: iter(videos)}
        return [next(queues[t]) for t in pads]
