"""Request parsing and validation (JSON in, typed requests out) and OpenAI-shaped responses.

Three request shapes are parsed into one `GenerationRequest`:

* `POST /v1/chat/completions`: OpenAI chat. `messages` with string or list content; parts
  `text`, `image_url` / `video_url` (`{"url": ...}` or, as MindIE's curl examples send, a plain
  string), and qwen-vl-utils' `image` / `video` parts. Per-part media controls (min_pixels,
  max_pixels, fps, nframes, ...; see engine.media.IMAGE_OPTIONS / VIDEO_OPTIONS) may sit on the
  part or inside the url object.
* `POST /v1/completions`: OpenAI completions; `prompt` is raw text (no chat template).
* `POST /generate`: vLLM's / MindIE's seed API; `prompt` is a string (raw text) or a list of
  parts as above (rendered as one user message), `do_sample` false means greedy.

Every problem becomes an `APIError` carrying the HTTP status and OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`. Bodies are parsed whatever the Content-Type
(MindIE's curl examples send none).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from engine.media import IMAGE_OPTIONS, VIDEO_OPTIONS
from engine.sampling import SamplingParams
from modeling.processing import MediaKind

MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered as OpenAI does: status + {"error": {message, type, param, code}}."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def server_busy(message: str) -> APIError:
    """503: the waiting queue is full or the server is shutting down."""
    return APIError(message, status=503, type="server_busy_error", code="server_busy")


# ------------------------------------------------------------------------------------- parsed shapes


@dataclass
class MediaRef:
    """An image or video as the request names it (resolved later, in a worker thread)."""

    kind: MediaKind
    url: str                    # data: URI, file:// URL, path, or raw base64
    options: dict[str, Any]     # qwen-vl-utils controls
    param: str                  # where it sits in the request, for error messages


@dataclass
class ChatMessage:
    """One message: role and its parts in order (str for text, MediaRef for media)."""

    role: str
    parts: list[str | MediaRef]


@dataclass
class GenerationRequest:
    """What any endpoint asks of the engine. Exactly one of messages / raw_prompt is set."""

    model: str | None
    messages: list[ChatMessage] | None
    raw_prompt: str | None
    params: SamplingParams
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False                 # return per-token logprobs (how many top ones: params.logprobs)
    return_token_ids: bool = False
    cache_salt: str | None = None          # prefix-cache blocks are shared only within one salt (vLLM's field)


# ------------------------------------------------------------------------------------- field helpers


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 for anything else)."""
    if not raw:
        raise APIError("request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}


def _get(body: dict[str, Any], name: str, kind: type, default: Any = None, *, param: str | None = None) -> Any:
    """body[name] checked to be `kind` (int accepted for float, bool never taken for a number);
    `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind)
    if kind in (int, float) and isinstance(value, bool):
        ok = False
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if kind is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        raise APIError(f"'{param or name}' must be {_TYPE_NAMES[kind]}, got {json.dumps(value)[:80]}",
                       param=param or name, code="invalid_type")
    return value


def _number_options(part: dict[str, Any], allowed: tuple[str, ...], param: str) -> dict[str, Any]:
    """The qwen-vl-utils controls present in a content part (numbers only)."""
    options = {}
    for key in allowed:
        if key in part and part[key] is not None:
            value = part[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise APIError(f"'{param}.{key}' must be a number, got {json.dumps(value)[:80]}",
                               param=f"{param}.{key}", code="invalid_type")
            options[key] = value
    return options


def parse_part(part: Any, param: str) -> str | MediaRef:
    """One content part: its text, or a MediaRef."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise APIError(f"'{param}' must be an object with a 'type', got {type(part).__name__}", param=param)
    kind = part.get("type")
    if kind == "text":
        return _get(part, "text", str, "", param=f"{param}.text")
    if kind in ("image_url", "video_url", "image", "video"):
        media_kind = MediaKind.IMAGE if kind.startswith("image") else MediaKind.VIDEO
        value = part.get(kind)
        if value is None and kind in ("image", "video"):  # {"type": "image", "image_url": ...}
            value = part.get(f"{kind}_url")
        options = _number_options(part, IMAGE_OPTIONS if media_kind == MediaKind.IMAGE else VIDEO_OPTIONS, param)
        if isinstance(value, dict):
            options.update(_number_options(value, IMAGE_OPTIONS if media_kind == MediaKind.IMAGE else VIDEO_OPTIONS,
                                           f"{param}.{kind}"))
            value = value.get("url")
        if isinstance(value, list):
            raise APIError(f"'{param}.{kind}': a video given as a list of frames is not supported; send a "
                           "video file", param=f"{param}.{kind}", code="unsupported_media")
        if not isinstance(value, str) or not value:
            raise APIError(f"'{param}.{kind}' must be a URL string or {{\"url\": ...}}", param=f"{param}.{kind}",
                           code="invalid_type")
        return MediaRef(media_kind, value, options, f"{param}.{kind}")
    if kind in ("input_audio", "audio_url", "file"):
        raise APIError(f"'{param}': content type {kind!r} is not supported (text, image_url and video_url are)",
                       param=f"{param}.type", code="unsupported_content_type")
    raise APIError(f"'{param}.type' must be one of text, image_url, video_url, image, video; got "
                   f"{json.dumps(kind)[:40]}", param=f"{param}.type", code="invalid_value")


def parse_content(content: Any, param: str) -> list[str | MediaRef]:
    """A message's content: a string or a list of parts."""
    if isinstance(content, str):
        return [content] if content else []
    if isinstance(content, list):
        return [parse_part(p, f"{param}[{i}]") for i, p in enumerate(content)]
    raise APIError(f"'{param}' must be a string or an array of content parts", param=param, code="invalid_type")


def parse_messages(value: Any) -> list[ChatMessage]:
    """Validate an OpenAI `messages` array into ChatMessages; APIError naming the bad field."""
    if value is None:
        raise APIError("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(value, list):
        raise APIError("'messages' must be an array of messages", param="messages", code="invalid_type")
    if not value:
        raise APIError("'messages' is empty; send at least one user message", param="messages",
                       code="empty_messages")
    messages = []
    for i, m in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"'{param}' must be an object with 'role' and 'content'", param=param,
                           code="invalid_type")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise APIError(f"'{param}.role' must be system, user or assistant; got {json.dumps(role)[:40]}",
                           param=f"{param}.role", code="invalid_value")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise APIError(f"'{param}.content' is required", param=f"{param}.content",
                               code="missing_required_parameter")
            content = ""
        parts = parse_content(content, f"{param}.content")
        if role != "user" and any(isinstance(p, MediaRef) for p in parts):
            raise APIError(f"'{param}': images and videos are accepted in user messages only",
                           param=f"{param}.content", code="invalid_value")
        messages.append(ChatMessage(role, parts))
    if not any(m.role == "user" for m in messages):
        raise APIError("'messages' has no user message", param="messages", code="invalid_value")
    if any(m.role == "system" for m in messages[1:]):
        raise APIError("a system message may only come first", param="messages", code="invalid_value")
    return messages


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError("'stop' must be a non-empty string or an array of non-empty strings", param="stop",
                       code="invalid_type")
    return stop


def _cache_salt(body: dict[str, Any]) -> str | None:
    """The optional `cache_salt`: a non-empty string; requests with different salts never share,
    or time each other's, cached prefixes."""
    salt = _get(body, "cache_salt", str)
    if salt is not None and not salt:
        raise APIError("'cache_salt' must be a non-empty string", param="cache_salt", code="invalid_value")
    return salt


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Options we do not implement get a 400 rather than being silently ignored."""
    n = body.get("n")
    if n is not None and n != 1:
        raise APIError("only n = 1 is supported", param="n", code="unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise APIError("only best_of = 1 is supported", param="best_of", code="unsupported_parameter")
    if body.get("echo"):
        raise APIError("echo is not supported", param="echo", code="unsupported_parameter")
    if body.get("suffix"):
        raise APIError("suffix is not supported", param="suffix", code="unsupported_parameter")
    if body.get("logit_bias"):
        raise APIError("logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    if body.get("tools") or body.get("functions"):
        raise APIError("tool / function calling is not supported", param="tools", code="unsupported_parameter")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise APIError("response_format other than text is not supported", param="response_format",
                       code="unsupported_parameter")


def _sampling(body: dict[str, Any], *, greedy_default: bool = False) -> tuple[SamplingParams, bool]:
    """SamplingParams from the OpenAI / vLLM fields; (params, whether max_tokens was given)."""
    max_tokens = _get(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int)
    given = max_tokens is not None
    temperature = _get(body, "temperature", float, 0.0 if greedy_default else 1.0)
    stop_token_ids = _get(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise APIError("'stop_token_ids' must be an array of integers", param="stop_token_ids", code="invalid_type")
    params = SamplingParams(
        max_tokens=max_tokens if given else 1,  # placeholder: the server fills the default per prompt
        temperature=temperature,
        top_p=_get(body, "top_p", float, 1.0),
        top_k=_get(body, "top_k", int, -1),
        repetition_penalty=_get(body, "repetition_penalty", float, 1.0),
        presence_penalty=_get(body, "presence_penalty", float, 0.0),
        frequency_penalty=_get(body, "frequency_penalty", float, 0.0),
        seed=_get(body, "seed", int),
        stop=_stop(body),
        stop_token_ids=stop_token_ids,
        ignore_eos=_get(body, "ignore_eos", bool, False),
    )
    if params.top_k == 0:
        params.top_k = -1
    if params.seed is not None and not 0 <= params.seed < 2**63:
        raise APIError(f"'seed' must be in [0, 2**63), got {params.seed}", param="seed", code="invalid_value")
    return params, given


def validate_params(params: SamplingParams, vocab_size: int | None) -> None:
    """SamplingParams.validate as a 400 naming the field."""
    try:
        params.validate(vocab_size)
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise APIError(str(e), param=name, code="invalid_value") from None


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict)
    if options is not None and not stream:
        raise APIError("'stream_options' is only allowed with stream: true", param="stream_options",
                       code="invalid_value")
    include_usage = bool(options and _get(options, "include_usage", bool, False,
                                          param="stream_options.include_usage"))
    return stream, include_usage


def parse_chat_request(body: dict[str, Any]) -> GenerationRequest:
    """POST /v1/chat/completions."""
    _refuse_unsupported(body)
    model = _get(body, "model", str)
    messages = parse_messages(body.get("messages"))
    params, given = _sampling(body)
    logprobs = _get(body, "logprobs", bool, False)
    top = _get(body, "top_logprobs", int, 0)
    if not 0 <= top <= MAX_LOGPROBS:
        raise APIError(f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", param="top_logprobs",
                       code="invalid_value")
    if top and not logprobs:
        raise APIError("'top_logprobs' needs logprobs: true", param="top_logprobs", code="invalid_value")
    params.logprobs = top if logprobs else None
    stream, include_usage = _stream_flags(body)
    return GenerationRequest(model, messages, None, params, given, stream, include_usage, logprobs,
                             _get(body, "return_token_ids", bool, False), cache_salt=_cache_salt(body))


def parse_completion_request(body: dict[str, Any]) -> GenerationRequest:
    """POST /v1/completions: a raw text prompt."""
    _refuse_unsupported(body)
    model = _get(body, "model", str)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise APIError("'prompt' must be one string (batched prompts and token-id prompts are not supported)",
                       param="prompt", code="unsupported_parameter")
    if not isinstance(prompt, str):
        raise APIError("'prompt' is required and must be a string", param="prompt", code="invalid_type")
    if not prompt:
        raise APIError("'prompt' is empty", param="prompt", code="invalid_value")
    params, given = _sampling(body)
    top = _get(body, "logprobs", int)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise APIError(f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", param="logprobs",
                       code="invalid_value")
    params.logprobs = top
    stream, include_usage = _stream_flags(body)
    return GenerationRequest(model, None, prompt, params, given, stream, include_usage, top is not None,
                             _get(body, "return_token_ids", bool, False), cache_salt=_cache_salt(body))


def parse_generate_request(body: dict[str, Any]) -> GenerationRequest:
    """POST /generate (vLLM / MindIE): prompt string (raw) or list of parts (one user message)."""
    _refuse_unsupported(body)
    model = _get(body, "model", str)
    prompt = body.get("prompt")
    messages, raw = None, None
    if isinstance(prompt, str):
        if not prompt:
            raise APIError("'prompt' is empty", param="prompt", code="invalid_value")
        raw = prompt
    elif isinstance(prompt, list):
        if not prompt:
            raise APIError("'prompt' is an empty list", param="prompt", code="invalid_value")
        messages = [ChatMessage("user", parse_content(prompt, "prompt"))]
    else:
        raise APIError("'prompt' is required: a string, or a list of {type: text|image_url|video_url} parts",
                       param="prompt", code="invalid_type")
    do_sample = _get(body, "do_sample", bool)
    params, given = _sampling(body)
    if do_sample is False:
        params.temperature = 0.0
    elif do_sample is True and "temperature" not in body:
        params.temperature = 1.0
    stream = _get(body, "stream", bool, False)
    return GenerationRequest(model, messages, raw, params, given, stream, cache_salt=_cache_salt(body))


# ------------------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """An OpenAI usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    return {"content": entries}


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs ({token: logprob}), offsets."""
    tokens = [e["token"] for e in entries]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def now() -> int:
    """Unix time in seconds (OpenAI's `created`)."""
    return int(time.time())
