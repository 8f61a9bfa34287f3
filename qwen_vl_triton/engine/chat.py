"""Chat messages, for the server and offline generation alike: one parser, one template input.

The content parts a conversation may hold are pydantic models (their JSON schemas are the HTTP
API's, serving/protocol.py puts them in its request bodies): `text`; OpenAI's `image_url` /
`video_url` (`{"url": ...}` or, as MindIE's curl examples send, a plain string); qwen-vl-utils'
(the model card's) `image` / `video`. Per-part media controls (min_pixels, max_pixels, fps,
nframes, ...: engine.media.IMAGE_OPTIONS / VIDEO_OPTIONS) may sit on the part or inside the url
object. Assistant messages may carry OpenAI `tool_calls`, tool messages answer one.

`parse_messages` turns validated `Message`s into `ChatMessage`s (text and `MediaRef`s in order,
each ref naming where it sits: messages[0].content[1].image_url), checking what depends on the
role; `template_messages` turns those into what a chat template takes. The Preprocessor
(engine/preprocess.py, `prepare_chat`) renders them and prepares their media, resolving each
MediaRef with a callable its caller gives: the server's reads its allowed folder, data URIs and
the bodies it fetched; offline (`LLM.chat`, `parse_conversation` and `local_media` here) any
local path, file:// URL, data URI, and objects JSON cannot carry (PIL images, a video as a list
of frames), which `parse_conversation` swaps for opaque reference strings before validation and
`local_media` binds back, so they pass the same parser.

Every problem is an `InputError` (a ValueError) carrying (message, param, code), param a path
such as `messages[0].content[1].image_url` and code OpenAI's style (invalid_type,
invalid_value, ...); the server answers it as a 400 with that body (serving/protocol.py).
Validation is strict (a bool is never a number, floats must be finite) and ignores unknown fields.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from PIL import Image
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from qwen_vl_triton.engine.media import IMAGE_OPTIONS, VIDEO_OPTIONS, Media
from qwen_vl_triton.modeling.processing import MediaKind


class InputError(ValueError):
    """A request input the engine refuses: `message`, `param` (where it sits in the request, e.g.
    messages[0].content[1].image_url; None for the request as a whole) and `code` (OpenAI's style:
    invalid_type, invalid_value, missing_required_parameter, ...). The server answers it as a 400
    with exactly these fields."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# ------------------------------------------------------------------------------------- validation helpers

# The codes our validators raise (PydanticCustomError's type): passed through as the error's code.
ERROR_CODES = {"missing_required_parameter", "invalid_type", "invalid_value", "empty_messages", "unsupported_parameter",
               "unsupported_content_type", "unsupported_media"}


def fail(code: str, message: str, field: str | None = None) -> PydanticCustomError:
    """An error for a validator to raise: `code` is the InputError's, `field` (a model validator's
    error is located at the model) names the field it is about."""
    context: dict[str, Any] = {"message": message}  # the message goes in as context: it may hold braces
    if field is not None:
        context["field"] = field
    return PydanticCustomError(code, "{message}", context)


class StrictModel(BaseModel):
    """Strict types (a bool is never a number, a string never a number; an int is taken for a float),
    finite floats only, unknown fields ignored (the OpenAI SDK sends fields we do not use)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


def tagged_union(pick: Callable[[Any], str | None], expected: str, **arms: Any) -> Any:
    """A union whose arm `pick` names from the raw value (not pydantic's try-every-arm union, whose
    errors would come from every arm). No arm (pick gives None): an invalid_type error "must be
    `expected`". Arms are tagged <name>; `_param_path` drops the tags from error paths."""
    members = tuple(Annotated[arm, Tag(f"<{name}>")] for name, arm in arms.items())

    def tag(value: Any) -> str | None:
        name = pick(value)
        return None if name is None else f"<{name}>"

    return Annotated[Union[members], Discriminator(  # noqa: UP007 - a union built from a tuple
        tag, custom_error_type="invalid_type", custom_error_message=f"must be {expected}")]


def json_type(value: Any) -> str | None:
    """`tagged_union`'s pick for arms named after JSON types."""
    return {str: "string", list: "array", dict: "object"}.get(type(value))


def _number(value: Any) -> int | float:
    """A media option: an int (kept an int: several options are counts) or a finite float."""
    # (math.isfinite of an int past float's range would raise OverflowError: ints are finite anyway)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise fail("invalid_type", "must be a finite number")
    return value


Number = Annotated[int | float, PlainValidator(_number), WithJsonSchema({"type": "number"})]
NonEmptyStr = Annotated[str, Field(min_length=1)]


# ------------------------------------------------------------------------------------- content parts


def _options_model(name: str, keys: tuple[str, ...], what: str) -> type[StrictModel]:
    """A model of qwen-vl-utils' media controls `keys`, all optional numbers."""
    fields: dict[str, Any] = {key: (Number | None, Field(None, description=f"qwen-vl-utils' {key}")) for key in keys}
    return create_model(name, __base__=StrictModel, __doc__=f"qwen-vl-utils' {what} controls.", **fields)


ImageOptions = _options_model("ImageOptions", IMAGE_OPTIONS, "image")
VideoOptions = _options_model("VideoOptions", VIDEO_OPTIONS, "video")


# No path, URL or base64 text holds a NUL; the file system calls would raise on one.
NUL_IN_URL = "holds a NUL character: not a path, URL or base64 data"


class _URLObject(StrictModel):
    """{"url": ...}: the url must be a non-empty string (an error on the part's field, as the value
    as a whole is what is wrong)."""

    url: str = Field(description="http(s) URL (fetched by the server), data: URI (base64), file:// URL, a path under "
                                 "the server's --allowed_media_dir, or raw base64")

    @model_validator(mode="before")
    @classmethod
    def _url(cls, data: dict[str, Any]) -> dict[str, Any]:  # a dict: the union's "object" arm
        url = data.get("url")
        if not (isinstance(url, str) and url):
            raise fail("invalid_type", "must be a URL string or an object with a non-empty 'url'")
        if "\0" in url:
            raise fail("invalid_value", NUL_IN_URL)
        return data


class ImageURL(ImageOptions, _URLObject):
    """An image's url with its controls."""


class VideoURL(VideoOptions, _URLObject):
    """A video's url with its controls."""


URL_STRING = "a URL string or {url: ...}"
ImageSource = tagged_union(json_type, URL_STRING, string=str, object=ImageURL)
VideoSource = tagged_union(json_type, URL_STRING, string=str, object=VideoURL)


class _MediaPart(StrictModel):
    """A media part whose source sits in the field named by its type (image_url, video_url, image,
    video); qwen-vl-utils also writes {"type": "image", "image_url": ...}."""

    @model_validator(mode="before")
    @classmethod
    def _source(cls, data: dict[str, Any]) -> dict[str, Any]:  # a dict: _part_arm routes only those here
        kind = data["type"]
        value = data.get(kind)
        if value is None and kind in ("image", "video"):
            value = data.get(f"{kind}_url")
            data = {**data, kind: value}
        if isinstance(value, list):
            raise fail("unsupported_media", f"a {kind.split('_')[0]} given as a list (of frames) is not "
                                             "supported; send one file", field=kind)
        if not ((isinstance(value, str) and value) or isinstance(value, dict)):
            raise fail("invalid_type", f"must be {URL_STRING}", field=kind)
        if isinstance(value, str) and "\0" in value:
            raise fail("invalid_value", NUL_IN_URL, field=kind)
        return data


class TextPart(StrictModel):
    """{"type": "text", "text": ...}."""

    type: Literal["text"]
    text: str | None = None


class ImageURLPart(ImageOptions, _MediaPart):
    """{"type": "image_url", "image_url": "..." | {"url": ..., <controls>}, <controls>} (OpenAI, MindIE)."""

    type: Literal["image_url"]
    image_url: ImageSource


class ImagePart(ImageOptions, _MediaPart):
    """{"type": "image", "image": "..." | {"url": ...}, <controls>} (qwen-vl-utils)."""

    type: Literal["image"]
    image: ImageSource


class VideoURLPart(VideoOptions, _MediaPart):
    """{"type": "video_url", "video_url": "..." | {"url": ..., <controls>}, <controls>}."""

    type: Literal["video_url"]
    video_url: VideoSource


class VideoPart(VideoOptions, _MediaPart):
    """{"type": "video", "video": "..." | {"url": ...}, <controls>} (qwen-vl-utils)."""

    type: Literal["video"]
    video: VideoSource


PART_TYPES = ("text", "image_url", "video_url", "image", "video")
REFUSED_PART_TYPES = ("input_audio", "audio_url", "file")


class _OtherPart(StrictModel):
    """A part of any other type: refused, naming its type."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: dict[str, Any]) -> dict[str, Any]:  # a dict: _part_arm routes only those here
        kind = data.get("type")
        if kind in REFUSED_PART_TYPES:
            raise fail("unsupported_content_type", f"content type {kind!r} is not supported (text, image_url and "
                                                    "video_url are)", field="type")
        raise fail("invalid_value", f"must be one of {', '.join(PART_TYPES)}; got {snippet(kind)}", field="type")


def _part_arm(part: Any) -> str | None:
    if isinstance(part, str):
        return "string"
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    return kind if isinstance(kind, str) and kind in PART_TYPES else "other"


Part = tagged_union(_part_arm, "a string or an object with a 'type'", string=str, text=TextPart, image_url=ImageURLPart,
              video_url=VideoURLPart, image=ImagePart, video=VideoPart, other=SkipJsonSchema[_OtherPart])
Content = tagged_union(json_type, "a string or an array of content parts", string=str, array=list[Part])


# ------------------------------------------------------------------------------------- messages, tools


class FunctionCall(StrictModel):
    """A function call an assistant made."""

    name: NonEmptyStr
    arguments: str = Field(description="the arguments object as JSON text")

    @field_validator("arguments")
    @classmethod
    def _object_text(cls, text: str) -> str:
        """JSON text of an object: chat templates are given the object."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise fail("invalid_value", "must be the JSON text of an object")
        return text


class ToolCall(StrictModel):
    """One of an assistant message's tool_calls."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(StrictModel):
    """A chat message. Media parts are accepted in user messages only; assistant messages may carry
    tool_calls (then content may be null), tool messages answer one by its tool_call_id."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Content | None = Field(None, description="required except in assistant messages")
    tool_calls: list[ToolCall] | None = Field(None, description="assistant messages only")
    tool_call_id: str | None = Field(None, description="tool messages: the id of the call answered (required)")



# ------------------------------------------------------------------------------------- error mapping


def _param_path(loc: tuple[str | int, ...]) -> str | None:
    """pydantic's error location as our param path: messages[0].content[1].image_url."""
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif not item.startswith("<"):  # a tagged_union arm's tag
            path += f".{item}" if path else item
    return path or None


def snippet(value: Any) -> str:
    """What was sent, for a message: scalars as JSON (cut short), containers by their kind."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "an array"
    if isinstance(value, str):
        value = value[:60]
    return json.dumps(value)[:80]


def input_error(error: ValidationError, at: tuple[str | int, ...] = ()) -> InputError:
    """The first of pydantic's errors as an InputError: its location (under `at`) as the param, its type as the code
    (missing: missing_required_parameter, wrong type: invalid_type, others: invalid_value; ours as
    they are)."""
    first = error.errors(include_url=False)[0]
    kind, context = first["type"], first.get("ctx") or {}
    loc = at + first["loc"] + ((context["field"],) if "field" in context else ())
    param = _param_path(loc)
    if kind in ERROR_CODES:
        code, message = kind, first["msg"]
    elif kind == "missing":
        code, message = "missing_required_parameter", "is required"
    else:
        code = "invalid_type" if kind.endswith("_type") or kind == "finite_number" else "invalid_value"
        message = f"{first['msg'][0].lower()}{first['msg'][1:]} (got {snippet(first.get('input'))})"
    return InputError(f"'{param}' {message}" if param else message, param=param, code=code)


# ------------------------------------------------------------------------------------- parsed shapes


@dataclass
class MediaRef:
    """An image or video as the request names it (resolved later: the Preprocessor's caller says how)."""

    kind: MediaKind
    url: str                    # http(s) URL, data: URI, file:// URL, path, or raw base64
    options: dict[str, Any]     # qwen-vl-utils controls
    param: str                  # where it sits in the request, for error messages


@dataclass
class ChatMessage:
    """One message: role and its parts in order (str for text, MediaRef for media)."""

    role: str                                         # system | user | assistant | tool
    parts: list[str | MediaRef]
    # assistant: OpenAI tool_calls, each {"id": str, "type": "function", "function": {"name": str,
    # "arguments": str (JSON text of an object)}}
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None                   # tool: the call it answers


# ------------------------------------------------------------------------------------- parsing


def parse_parts(content: str | list[Any], param: str) -> list[str | MediaRef]:
    """A message's (or /generate's prompt's) parts: text, or MediaRefs naming where they sit."""
    if isinstance(content, str):
        return [content] if content else []
    parts: list[str | MediaRef] = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, TextPart):
            parts.append(part.text or "")
        else:
            parts.append(_media_ref(part, f"{param}[{i}]"))
    return parts


def _media_ref(part: ImageURLPart | ImagePart | VideoURLPart | VideoPart, param: str) -> MediaRef:
    """The part's source and its controls (those inside the url object win over the part's own)."""
    kind = MediaKind.IMAGE if part.type.startswith("image") else MediaKind.VIDEO
    keys = IMAGE_OPTIONS if kind == MediaKind.IMAGE else VIDEO_OPTIONS
    source = getattr(part, part.type)
    options = {k: getattr(part, k) for k in keys if getattr(part, k) is not None}
    if isinstance(source, str):
        url = source
    else:
        options.update({k: getattr(source, k) for k in keys if getattr(source, k) is not None})
        url = source.url
    return MediaRef(kind, url, options, f"{param}.{part.type}")


def parse_messages(value: list[Message]) -> list[ChatMessage]:
    """ChatMessages from validated messages, checking what depends on the role."""
    if not value:
        raise InputError("'messages' is empty; send at least one user message", param="messages",
                         code="empty_messages")
    messages = []
    for i, m in enumerate(value):
        param = f"messages[{i}]"
        if m.content is None and m.role != "assistant":
            raise InputError(f"'{param}.content' is required", param=f"{param}.content",
                             code="missing_required_parameter")
        parts = parse_parts(m.content or "", f"{param}.content")
        if m.role != "user" and any(isinstance(p, MediaRef) for p in parts):
            raise InputError(f"'{param}': images and videos are accepted in user messages only",
                             param=f"{param}.content", code="invalid_value")
        if m.tool_calls and m.role != "assistant":
            raise InputError(f"'{param}.tool_calls': only assistant messages make tool calls",
                             param=f"{param}.tool_calls", code="invalid_value")
        if m.role == "tool" and m.tool_call_id is None:
            raise InputError(f"'{param}.tool_call_id' is required in a tool message", param=f"{param}.tool_call_id",
                             code="missing_required_parameter")
        calls = [c.model_dump() for c in m.tool_calls] if m.tool_calls else None
        messages.append(ChatMessage(m.role, parts, calls, m.tool_call_id if m.role == "tool" else None))
    if not any(m.role == "user" for m in messages):
        raise InputError("'messages' has no user message", param="messages", code="invalid_value")
    if any(m.role == "system" for m in messages[1:]):
        raise InputError("a system message may only come first", param="messages", code="invalid_value")
    return messages


_MESSAGES = TypeAdapter(list[Message])


def validate_messages(value: Any) -> list[ChatMessage]:
    """ChatMessages from raw messages (a list of message dicts as the HTTP API takes them); an
    InputError naming the first problem (param messages[i]...)."""
    try:
        messages = _MESSAGES.validate_python(value)
    except ValidationError as e:
        raise input_error(e, ("messages",)) from None
    return parse_messages(messages)


# ------------------------------------------------------------------------------------- chat template


def loads_json(text: str) -> Any:
    """json.loads as model output and tool-call arguments are read: raw control characters inside
    strings are accepted (strict=False), NaN and Infinity (which json.dumps would write back, and
    JSON has not) are not; nesting too deep for the decoder is a ValueError like any other bad JSON."""
    try:
        return json.loads(text, strict=False, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def _reject_constant(name: str) -> Any:
    """json's parse_constant: NaN, Infinity and -Infinity are refused."""
    raise ValueError(f"{name} is not JSON")


def tool_call_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages as a Hugging Face chat template takes them: each assistant tool call's
    `function.arguments` JSON text is decoded into an object (Qwen2.5's template writes
    `arguments | tojson`, which would encode a string twice). Other messages, tool messages
    (role "tool" and their content) among them, are passed as they are; nothing is modified in
    place. ValueError, naming the field, when arguments are not a JSON object."""
    out = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            message = {**message, "tool_calls": [_template_call(call, f"messages[{i}].tool_calls[{k}]")
                                                 for k, call in enumerate(calls)]}
        out.append(message)
    return out


def _template_call(call: dict[str, Any], where: str) -> dict[str, Any]:
    """One OpenAI tool call with its arguments decoded (already decoded ones pass)."""
    function = call.get("function") or {}
    args = function.get("arguments", {})
    if isinstance(args, str):
        try:
            args = loads_json(args)
        except ValueError:
            args = None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments is not a JSON object")
    return {**call, "function": {**function, "arguments": args}}


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The chat-template input: media parts as {"type": "image"|"video"}, text as text parts;
    system and tool messages, and assistant messages with tool calls, as one string (what
    templates expect of them), tool calls with their arguments as objects (`tool_call_arguments`)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        text = "".join(p for p in m.parts if isinstance(p, str))
        if m.role == "tool":
            out.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id})
        elif m.tool_calls:
            out.append({"role": m.role, "content": text, "tool_calls": m.tool_calls})
        elif m.role == "system":
            out.append({"role": "system", "content": text})
        else:
            out.append({"role": m.role, "content": [{"type": p.kind} if isinstance(p, MediaRef)
                                                     else {"type": "text", "text": p} for p in m.parts]})
    return tool_call_arguments(out)


# ------------------------------------------------------------------------------------- offline messages


# What a media part may hold offline besides a URL string: a PIL image (images), a list of frames
# (PIL images or uint8 [H, W, 3] arrays) or a uint8 [T, H, W, 3] array (videos).
MediaObject = Union[Image.Image, list, tuple, np.ndarray]  # noqa: UP007 - a runtime alias


def _is_object(kind: str, value: Any) -> bool:
    """Whether a part's source is an object JSON cannot carry (see MediaObject)."""
    if kind.startswith("image"):
        return isinstance(value, Image.Image)
    return isinstance(value, (list, tuple, np.ndarray))


def parse_conversation(messages: Any) -> tuple[list[ChatMessage], dict[str, MediaObject]]:
    """One offline conversation (message dicts as the HTTP API takes them, and as the model card
    writes them: `{"type": "image", "image": <PIL image>}`, `{"type": "video", "video": [frames],
    "sample_fps": 2}`) through the one parser: each object JSON cannot carry is swapped for a
    reference string that no user writes (a fresh uuid in it), then validated and parsed as the
    server parses a body. Returns the ChatMessages and the objects by reference (for
    `local_media`); an InputError naming the first problem."""
    objects: dict[str, MediaObject] = {}
    prefix = f"qvl-object-{uuid.uuid4().hex}:"
    swapped = messages
    if isinstance(messages, (list, tuple)):
        swapped = [_swap_message(m, objects, prefix) for m in messages]
    return validate_messages(swapped), objects


def _swap_message(message: Any, objects: dict[str, MediaObject], prefix: str) -> Any:
    """A copy of one message with its media objects replaced by reference strings (anything that
    is not a message of parts is left to the validator to name)."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), (list, tuple)):
        return message
    parts = []
    for part in message["content"]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image", "image_url", "video", "video_url"):
            field = kind if kind in part or kind.endswith("_url") else f"{kind}_url"
            value = part.get(field)
            if _is_object(kind, value):
                ref = f"{prefix}{len(objects)}"
                objects[ref] = value
                part = {**part, field: ref}
                if kind.startswith("video") and "sample_fps" in part and "fps" not in part:
                    part["fps"] = part["sample_fps"]  # qwen-vl-utils' name for a frame list's rate
        parts.append(part)
    return {**message, "content": parts}


_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass(frozen=True)
class Source:
    """Where a MediaRef's url points, told apart once for the server and offline runs alike:
    kind "base64" (value: the data of a data: URI, or a bare base64 string of 512+ characters as
    MindIE takes images), "http" (value: the URL) or "path" (value: the file's path, a file://
    URL's unquoted)."""

    kind: Literal["base64", "http", "path"]
    value: str


def media_source(ref: MediaRef) -> Source:
    """The Source of `ref`'s url; InputError for a malformed data: URI or file:// URL, a file:// URL
    naming another host, or another scheme."""
    url = ref.url.strip()
    lower = url[:16].lower()
    if lower.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise InputError(f"'{ref.param}': a data URI must be data:<mime type>;base64,<data>", param=ref.param,
                             code="invalid_base64")
        return Source("base64", data)
    if lower.startswith(("http://", "https://")):
        return Source("http", url)
    if lower.startswith("file://"):
        try:
            parsed = urllib.parse.urlparse(url)
        except ValueError as e:  # e.g. "file://[::1/x": an unclosed IPv6 host
            raise InputError(f"'{ref.param}': not a valid file:// URL: {e}", param=ref.param,
                             code="unsupported_url") from None
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"'{ref.param}': file:// URL with host {parsed.netloc!r}: only local files are read",
                             param=ref.param, code="unsupported_url")
        return Source("path", urllib.parse.unquote(parsed.path))
    if _SCHEME.match(url):
        raise InputError(f"'{ref.param}': unsupported URL scheme in {url[:40]!r}: use data:, file:// or a path",
                         param=ref.param, code="unsupported_url")
    if len(url) >= 512 and _BASE64.match(url[:4096]) and not Path(url[:255]).exists():
        return Source("base64", url)
    return Source("path", url)


def check_size(ref: MediaRef, size: int, max_bytes: int) -> None:
    """InputError (media_too_large) when `ref`'s medium of `size` bytes is over `max_bytes`."""
    if size > max_bytes:
        raise InputError(f"'{ref.param}': {ref.kind} of {size} bytes is over the {max_bytes >> 20} MB limit",
                         param=ref.param, code="media_too_large")


def decode_base64(ref: MediaRef, data: str, max_bytes: int | None = None) -> bytes:
    """The bytes of `ref`'s base64 `data`; InputError when it is invalid or empty, or (checked
    before decoding) when it decodes to more than `max_bytes` (media_too_large)."""
    if max_bytes is not None:
        check_size(ref, len(data.rstrip("=")) * 3 // 4, max_bytes)  # the decoded size, known before decoding
    try:
        raw: bytes | None = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raw = None
    if not raw:
        raise InputError(f"'{ref.param}': {'invalid' if raw is None else 'empty'} base64 data", param=ref.param,
                         code="invalid_base64")
    return raw


def local_media(ref: MediaRef, objects: dict[str, MediaObject]) -> Media:
    """An offline MediaRef as a Media: a bound object (`parse_conversation`), a data: URI's bytes,
    a file:// URL's or a path's file (any the user names). An http(s) URL is an InputError: offline
    runs fetch nothing."""
    if ref.url in objects:
        return Media(objects[ref.url], ref.kind, dict(ref.options))
    source = media_source(ref)
    if source.kind == "http":
        raise InputError(f"'{ref.param}': fetching http(s) URLs is not supported offline; give a local path, a "
                         "file:// URL or a data: URI (base64)", param=ref.param, code="unsupported_url")
    if source.kind == "base64":
        return Media(decode_base64(ref, source.value), ref.kind, dict(ref.options))
    if not Path(source.value).is_file():
        raise InputError(f"'{ref.param}': no such file: {source.value}", param=ref.param, code="file_not_found")
    return Media(source.value, ref.kind, dict(ref.options))


Resolver = Callable[[MediaRef], Media]
