"""Request parsing and validation (JSON in, typed requests out) and the errors they raise.

Three request bodies are declared as pydantic models (their JSON schemas are what /openapi.json
and /docs show, see `openapi_request_body`) and parsed into one `GenerationRequest`:

* `POST /v1/chat/completions` (`ChatCompletionRequest`): OpenAI chat. `messages` with string or
  list content; parts `text`, `image_url` / `video_url` (`{"url": ...}` or, as MindIE's curl
  examples send, a plain string), and qwen-vl-utils' `image` / `video` parts. Per-part media
  controls (min_pixels, max_pixels, fps, nframes, ...; see engine.media.IMAGE_OPTIONS /
  VIDEO_OPTIONS) may sit on the part or inside the url object. Tools (`tools`, `tool_choice`,
  assistant `tool_calls`, `tool` messages) as OpenAI defines them.
* `POST /v1/completions` (`CompletionRequest`): OpenAI completions; `prompt` is raw text (no chat
  template).
* `POST /generate` (`GenerateRequest`): vLLM's / MindIE's seed API; `prompt` is a string (raw
  text) or a list of parts as above (rendered as one user message), `do_sample` false means greedy.

All three take the sampling fields, `n`, and one output constraint: OpenAI's `response_format`
(json_object, json_schema) or vLLM's `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`.

Validation has two layers. The models check each field's type and shape (strict types: a bool is
never a number, an int is taken for a float, floats must be finite; unknown fields are ignored,
since the OpenAI SDK sends fields this server does not use). Then the `parse_*` functions check
what spans fields (top_logprobs needs logprobs, one output constraint at most, tool_choice against
the tools, roles and their content) as they build the GenerationRequest. Every problem becomes an
`APIError` carrying the HTTP status and OpenAI's error body `{"error": {"message", "type",
"param", "code"}}`, param a path such as `messages[0].content[1].image_url`. Bodies are parsed
whatever the Content-Type (MindIE's curl examples send none): the handlers read the raw body and
call these functions, FastAPI never parses it. Response bodies are in responses.py.

Its length is the request surface: OpenAI chat and completions, vLLM's and MindIE's /generate, the
content parts (images, videos, their per-part controls), tools and structured outputs, each a
pydantic model with its parser and its 400s; they share the validation and error helpers here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationError,
    WithJsonSchema,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from qwen_vl_triton.engine.media import IMAGE_OPTIONS, VIDEO_OPTIONS
from qwen_vl_triton.engine.sampling import MAX_N, SamplingParams
from qwen_vl_triton.engine.structured import StructuredOutput
from qwen_vl_triton.modeling.processing import MediaKind
from qwen_vl_triton.serving.responses import ErrorInfo, ErrorResponse, ErrorType, json_schema

MAX_LOGPROBS = 20
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names

class APIError(Exception):
    """An error answered as OpenAI does: status + {"error": {message, type, param, code}}."""

    def __init__(self, message: str, *, status: int = 400, type: ErrorType = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def response(self) -> ErrorResponse:
        """The OpenAI-style error body."""
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error body as sent."""
        return self.response().wire()


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

    role: str                                         # system | user | assistant | tool
    parts: list[str | MediaRef]
    # assistant: OpenAI tool_calls, each {"id": str, "type": "function", "function": {"name": str,
    # "arguments": str (JSON text of an object)}}
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None                   # tool: the call it answers


@dataclass
class GenerationRequest:
    """What any endpoint asks of the engine. Exactly one of messages / raw_prompt is set."""

    model: str | None
    messages: list[ChatMessage] | None
    raw_prompt: str | None
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False                 # return per-token logprobs (how many top ones: params.logprobs)
    return_token_ids: bool = False
    cache_salt: str | None = None          # prefix-cache blocks are shared only within one salt (vLLM's field)
    # OpenAI tools as given (validated): [{"type": "function", "function": {"name", "description"?, "parameters"?}}]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "none"              # "none" | "auto" | "required" | "function" (then tool_name says which)
    tool_name: str | None = None
    parallel_tool_calls: bool = True       # False: at most one call (enforced where the output is constrained)

    @property
    def max_tokens_given(self) -> bool:
        """Whether the request set max_tokens (else it gets the room its prompt leaves)."""
        return self.params.max_tokens is not None


# ------------------------------------------------------------------------------------- body


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 for anything else)."""
    if not raw:
        raise APIError("request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        # ValueError: bad JSON or UTF-8, and also an integer literal over Python's 4300-digit limit;
        # RecursionError: arrays or objects nested deeper than the interpreter's recursion limit.
        raise APIError(f"request body is not valid JSON: {type(e).__name__}: {str(e)[:200]}",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw):  # only then can a string hold a surrogate: look for a lone one
        where = _lone_surrogate(body)
        if where is not None:
            what = f"'{where}'" if where else "the request body"
            raise APIError(f"{what} holds a lone UTF-16 surrogate escape, which is not Unicode text",
                           param=where or None, code="invalid_value")
    return body


# JSON's \uD800-\uDFFF escapes. A pair of them is one character (json.loads joins it); a lone one
# becomes a surrogate in a Python str, which no UTF-8 encoder (tokenizer, file system, grammar
# compiler) accepts.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(body: dict[str, Any]) -> str | None:
    """The path of a string of the body that holds a surrogate, or of an object with such a key (the
    key itself cannot be named: the error body could not be encoded); None if there is none."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:  # not recursive: the body may nest as deep as json.loads allows
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, dict):
            for key, v in value.items():
                if _SURROGATE.search(key):
                    return path
                stack.append((v, f"{path}.{key}" if path else key))
    return None


# ------------------------------------------------------------------------------------- model helpers

# The codes our validators raise (PydanticCustomError's type): passed through as the error's code.
_CODES = {"missing_required_parameter", "invalid_type", "invalid_value", "empty_messages", "unsupported_parameter",
          "unsupported_content_type", "unsupported_media"}


def _fail(code: str, message: str, field: str | None = None) -> PydanticCustomError:
    """An error for a validator to raise: `code` is the APIError's, `field` (a model validator's
    error is located at the model) names the field it is about."""
    context: dict[str, Any] = {"message": message}  # the message goes in as context: it may hold braces
    if field is not None:
        context["field"] = field
    return PydanticCustomError(code, "{message}", context)


class _Model(BaseModel):
    """Strict types (a bool is never a number, a string never a number; an int is taken for a float),
    finite floats only, unknown fields ignored (the OpenAI SDK sends fields we do not use)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


def _union(pick: Callable[[Any], str | None], expected: str, **arms: Any) -> Any:
    """A union whose arm `pick` names from the raw value (not pydantic's try-every-arm union, whose
    errors would come from every arm). No arm (pick gives None): an invalid_type error "must be
    `expected`". Arms are tagged <name>; `_param` drops the tags from error paths."""
    members = tuple(Annotated[arm, Tag(f"<{name}>")] for name, arm in arms.items())

    def tag(value: Any) -> str | None:
        name = pick(value)
        return None if name is None else f"<{name}>"

    return Annotated[Union[members], Discriminator(  # noqa: UP007 - a union built from a tuple
        tag, custom_error_type="invalid_type", custom_error_message=f"must be {expected}")]


def _json_type(value: Any) -> str | None:
    """`_union`'s pick for arms named after JSON types."""
    return {str: "string", list: "array", dict: "object"}.get(type(value))


def _whole(expected: str) -> WrapValidator:
    """Any error inside the field becomes one invalid_type error on the field itself (its param is
    `stop`, not `stop[1]` or the arm of a union)."""
    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _fail("invalid_type", f"must be {expected}") from None

    return WrapValidator(validate)


def _number(value: Any) -> int | float:
    """A media option: an int (kept an int: several options are counts) or a finite float."""
    # (math.isfinite of an int past float's range would raise OverflowError: ints are finite anyway)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise _fail("invalid_type", "must be a finite number")
    return value


Number = Annotated[int | float, PlainValidator(_number), WithJsonSchema({"type": "number"})]
NonEmptyStr = Annotated[str, Field(min_length=1)]


# ------------------------------------------------------------------------------------- content parts


def _options_model(name: str, keys: tuple[str, ...], what: str) -> type[_Model]:
    """A model of qwen-vl-utils' media controls `keys`, all optional numbers."""
    fields: dict[str, Any] = {key: (Number | None, Field(None, description=f"qwen-vl-utils' {key}")) for key in keys}
    return create_model(name, __base__=_Model, __doc__=f"qwen-vl-utils' {what} controls.", **fields)


ImageOptions = _options_model("ImageOptions", IMAGE_OPTIONS, "image")
VideoOptions = _options_model("VideoOptions", VIDEO_OPTIONS, "video")


# No path, URL or base64 text holds a NUL; the file system calls would raise on one.
NUL_IN_URL = "holds a NUL character: not a path, URL or base64 data"


class _URLObject(_Model):
    """{"url": ...}: the url must be a non-empty string (an error on the part's field, as the value
    as a whole is what is wrong)."""

    url: str = Field(description="data: URI (base64), file:// URL, a path under the server's --allowed_media_dir, "
                                 "or raw base64")

    @model_validator(mode="before")
    @classmethod
    def _url(cls, data: dict[str, Any]) -> dict[str, Any]:  # a dict: the union's "object" arm
        url = data.get("url")
        if not (isinstance(url, str) and url):
            raise _fail("invalid_type", "must be a URL string or an object with a non-empty 'url'")
        if "\0" in url:
            raise _fail("invalid_value", NUL_IN_URL)
        return data


class ImageURL(ImageOptions, _URLObject):
    """An image's url with its controls."""


class VideoURL(VideoOptions, _URLObject):
    """A video's url with its controls."""


URL_STRING = "a URL string or {url: ...}"
ImageSource = _union(_json_type, URL_STRING, string=str, object=ImageURL)
VideoSource = _union(_json_type, URL_STRING, string=str, object=VideoURL)


class _MediaPart(_Model):
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
            raise _fail("unsupported_media", f"a {kind.split('_')[0]} given as a list (of frames) is not "
                                             "supported; send one file", field=kind)
        if not ((isinstance(value, str) and value) or isinstance(value, dict)):
            raise _fail("invalid_type", f"must be {URL_STRING}", field=kind)
        if isinstance(value, str) and "\0" in value:
            raise _fail("invalid_value", NUL_IN_URL, field=kind)
        return data


class TextPart(_Model):
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


class _OtherPart(_Model):
    """A part of any other type: refused, naming its type."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: dict[str, Any]) -> dict[str, Any]:  # a dict: _part_arm routes only those here
        kind = data.get("type")
        if kind in REFUSED_PART_TYPES:
            raise _fail("unsupported_content_type", f"content type {kind!r} is not supported (text, image_url and "
                                                    "video_url are)", field="type")
        raise _fail("invalid_value", f"must be one of {', '.join(PART_TYPES)}; got {_snippet(kind)}", field="type")


def _part_arm(part: Any) -> str | None:
    if isinstance(part, str):
        return "string"
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    return kind if isinstance(kind, str) and kind in PART_TYPES else "other"


Part = _union(_part_arm, "a string or an object with a 'type'", string=str, text=TextPart, image_url=ImageURLPart,
              video_url=VideoURLPart, image=ImagePart, video=VideoPart, other=SkipJsonSchema[_OtherPart])
Content = _union(_json_type, "a string or an array of content parts", string=str, array=list[Part])


# ------------------------------------------------------------------------------------- messages, tools


class FunctionCall(_Model):
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
            raise _fail("invalid_value", "must be the JSON text of an object")
        return text


class ToolCall(_Model):
    """One of an assistant message's tool_calls."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    """A chat message. Media parts are accepted in user messages only; assistant messages may carry
    tool_calls (then content may be null), tool messages answer one by its tool_call_id."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Content | None = Field(None, description="required except in assistant messages")
    tool_calls: list[ToolCall] | None = Field(None, description="assistant messages only")
    tool_call_id: str | None = Field(None, description="tool messages: the id of the call answered (required)")


class FunctionDefinition(_Model):
    """A function offered to the model."""

    name: Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments object")
    strict: bool | None = None


class Tool(_Model):
    """An OpenAI tool: a function."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Model):
    """{"name": ...}."""

    name: str


class NamedToolChoice(_Model):
    """tool_choice naming the function the model must call."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = _union(lambda v: {str: "mode", dict: "function"}.get(type(v)),
                    "\"none\", \"auto\", \"required\" or {type: function, function: {name}}",
                    mode=Literal["none", "auto", "required"], function=NamedToolChoice)


# ------------------------------------------------------------------------------------- response_format


class TextFormat(_Model):
    """Plain text (no constraint)."""

    type: Literal["text"]


class JSONObjectFormat(_Model):
    """Any JSON object."""

    type: Literal["json_object"]


class JSONSchemaSpec(_Model):
    """response_format.json_schema."""

    name: str
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the output must match")
    strict: bool | None = None
    description: str | None = None


class JSONSchemaFormat(_Model):
    """JSON matching a schema."""

    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


FORMAT_TYPES = ("text", "json_object", "json_schema")


class _OtherFormat(_Model):
    """A response_format of any other type: refused."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: dict[str, Any]) -> dict[str, Any]:  # a dict: _format_arm routes only those here
        raise _fail("invalid_value", f"must be one of {', '.join(FORMAT_TYPES)}; got {_snippet(data.get('type'))}",
                    field="type")


def _format_arm(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    return kind if isinstance(kind, str) and kind in FORMAT_TYPES else "other"


ResponseFormat = _union(_format_arm, "an object with a 'type'", text=TextFormat, json_object=JSONObjectFormat,
                        json_schema=JSONSchemaFormat, other=SkipJsonSchema[_OtherFormat])


# ------------------------------------------------------------------------------------- request bodies

JSONSchemaValue = _union(_json_type, "a JSON schema: an object, or a string holding one", object=dict[str, Any],
                         string=str)
# A list of one string is taken as that string (the before-validator unwraps it); the arm documents it.
CompletionPrompt = _union(_json_type, "a string", string=NonEmptyStr,
                          array=Annotated[list[NonEmptyStr], Field(min_length=1, max_length=1)])
GeneratePrompt = _union(_json_type, "a string or an array of content parts", string=NonEmptyStr,
                        array=Annotated[list[Part], Field(min_length=1)])


class _GenerationFields(_Model):
    """The fields every endpoint takes: sampling, n, one output constraint, the cache salt."""

    endpoint: ClassVar[str]
    # Fields that would change the output in ways we do not implement: a 400 rather than being ignored.
    refused: ClassVar[tuple[str, ...]] = ("echo", "suffix", "logit_bias", "functions", "function_call")

    model: str | None = Field(None, description="a served model name (GET /v1/models); default: the first")
    max_tokens: int | None = Field(None, description="default: the room left under max_seq_len (and max_iter_times)")
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens (wins over it)")
    temperature: float | None = Field(None, description="default 1 (0: greedy)")
    top_p: float | None = Field(None, description="in (0, 1], default 1")
    top_k: int | None = Field(None, description="-1 or 0: off (default)")
    repetition_penalty: float | None = Field(None, description="> 0, default 1 (vLLM's)")
    presence_penalty: float | None = Field(None, description="in [-2, 2], default 0")
    frequency_penalty: float | None = Field(None, description="in [-2, 2], default 0")
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: Annotated[NonEmptyStr | list[NonEmptyStr], _whole("a non-empty string or an array of non-empty strings")
                    ] | None = None
    stop_token_ids: Annotated[list[int], _whole("an array of integers")] | None = Field(None, description="vLLM's")
    ignore_eos: bool | None = Field(None, description="vLLM's: generate past end-of-sequence tokens")
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = Field(None, description="samples (choices), default 1")
    best_of: int | None = Field(None, description="null or equal to n")
    response_format: ResponseFormat | None = None
    guided_json: JSONSchemaValue | None = Field(None, description="vLLM's extension: output matching this JSON schema")
    guided_regex: str | None = Field(None, description="vLLM's extension: output matching this regular expression")
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="vLLM's extension: output exactly one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM's extension: output in this Lark grammar")
    cache_salt: NonEmptyStr | None = Field(None, description="vLLM's: prefix-cache blocks are shared only within "
                                                             "one salt")
    stream: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        """Refused fields first, then the endpoint's prompt (one validator: a subclass's own before-
        validators would run ahead of this class's)."""
        if not isinstance(data, dict):
            return data  # pydantic's own error follows
        for name in cls.refused:
            if data.get(name):
                raise _fail("unsupported_parameter", f"is not supported by {cls.endpoint}", field=name)
        return cls._prompt(data)

    @classmethod
    def _prompt(cls, data: dict[str, Any]) -> dict[str, Any]:
        """What of the body's prompt pydantic cannot check (an endpoint with a prompt overrides this)."""
        return data


class StreamOptions(_Model):
    """stream_options (with stream: true)."""

    include_usage: bool | None = None


class ChatCompletionRequest(_GenerationFields):
    """POST /v1/chat/completions."""

    endpoint = "/v1/chat/completions"

    messages: list[Message]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = Field(None, description="vLLM's: each choice's token ids")
    tools: Annotated[list[Tool], Field(min_length=1)] | None = None
    tool_choice: ToolChoice | None = Field(None, description="default: \"auto\" with tools, \"none\" without")
    parallel_tool_calls: bool | None = Field(
        None, description="false: at most one call (tool_choice \"required\" constrains the output to one)")


class CompletionRequest(_GenerationFields):
    """POST /v1/completions: a raw text prompt (no chat template)."""

    endpoint = "/v1/completions"
    refused = (*_GenerationFields.refused, "tools")

    prompt: CompletionPrompt
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = Field(None, description="vLLM's: each choice's token ids")

    @classmethod
    def _prompt(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A list of one string is that string; other lists are refused; absent is invalid_type (the
        code clients of this server have had for it)."""
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return {**data, "prompt": prompt[0]}
        if isinstance(prompt, list):
            raise _fail("unsupported_parameter", "must be one string (batched prompts and token-id prompts are not "
                                                 "supported)", field="prompt")
        if not isinstance(prompt, str):
            raise _fail("invalid_type", "is required and must be a string", field="prompt")
        return data


class GenerateRequest(_GenerationFields):
    """POST /generate (vLLM / MindIE): a string (raw text) or a list of parts (one user message)."""

    endpoint = "/generate"
    refused = (*_GenerationFields.refused, "tools")

    prompt: GeneratePrompt
    do_sample: bool | None = Field(None, description="MindIE's: false means greedy")

    @classmethod
    def _prompt(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Absent or of another type: invalid_type, the code clients of this server have had for it."""
        if not isinstance(data.get("prompt"), (str, list)):
            raise _fail("invalid_type", "is required: a string, or a list of {type: text|image_url|video_url} parts",
                        field="prompt")
        return data


# ------------------------------------------------------------------------------------- error mapping


def _param(loc: tuple[str | int, ...]) -> str | None:
    """pydantic's error location as our param path: messages[0].content[1].image_url."""
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif not item.startswith("<"):  # a _union arm's tag
            path += f".{item}" if path else item
    return path or None


def _snippet(value: Any) -> str:
    """What was sent, for a message: scalars as JSON (cut short), containers by their kind."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "an array"
    if isinstance(value, str):
        value = value[:60]
    return json.dumps(value)[:80]


def _api_error(error: ValidationError) -> APIError:
    """The first of pydantic's errors as a 400: its location as the param, its type as the code
    (missing: missing_required_parameter, wrong type: invalid_type, others: invalid_value; ours as
    they are)."""
    first = error.errors(include_url=False)[0]
    kind, context = first["type"], first.get("ctx") or {}
    loc = first["loc"] + ((context["field"],) if "field" in context else ())
    param = _param(loc)
    if kind in _CODES:
        code, message = kind, first["msg"]
    elif kind == "missing":
        code, message = "missing_required_parameter", "is required"
    else:
        code = "invalid_type" if kind.endswith("_type") or kind == "finite_number" else "invalid_value"
        message = f"{first['msg'][0].lower()}{first['msg'][1:]} (got {_snippet(first.get('input'))})"
    return APIError(f"'{param}' {message}" if param else message, param=param, code=code)


M = TypeVar("M", bound=_Model)


def _validate(model: type[M], body: dict[str, Any]) -> M:
    """The body as `model` (400 naming the first problem)."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _api_error(e) from None


def openapi_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody for a route whose handler reads and validates the body itself: the
    model's JSON schema, inlined."""
    return {"required": True, "content": {"application/json": {"schema": json_schema(model)}}}


# ------------------------------------------------------------------------------------- semantics


def _parts(content: str | list[Any], param: str) -> list[str | MediaRef]:
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


def _messages(value: list[Message]) -> list[ChatMessage]:
    """ChatMessages from validated messages, checking what depends on the role."""
    if not value:
        raise APIError("'messages' is empty; send at least one user message", param="messages",
                       code="empty_messages")
    messages = []
    for i, m in enumerate(value):
        param = f"messages[{i}]"
        if m.content is None and m.role != "assistant":
            raise APIError(f"'{param}.content' is required", param=f"{param}.content",
                           code="missing_required_parameter")
        parts = _parts(m.content or "", f"{param}.content")
        if m.role != "user" and any(isinstance(p, MediaRef) for p in parts):
            raise APIError(f"'{param}': images and videos are accepted in user messages only",
                           param=f"{param}.content", code="invalid_value")
        if m.tool_calls and m.role != "assistant":
            raise APIError(f"'{param}.tool_calls': only assistant messages make tool calls",
                           param=f"{param}.tool_calls", code="invalid_value")
        if m.role == "tool" and m.tool_call_id is None:
            raise APIError(f"'{param}.tool_call_id' is required in a tool message", param=f"{param}.tool_call_id",
                           code="missing_required_parameter")
        calls = [c.model_dump() for c in m.tool_calls] if m.tool_calls else None
        messages.append(ChatMessage(m.role, parts, calls, m.tool_call_id if m.role == "tool" else None))
    if not any(m.role == "user" for m in messages):
        raise APIError("'messages' has no user message", param="messages", code="invalid_value")
    if any(m.role == "system" for m in messages[1:]):
        raise APIError("a system message may only come first", param="messages", code="invalid_value")
    return messages


def _json_text(value: Any, param: str) -> str:
    try:
        return json.dumps(value)
    except (ValueError, RecursionError) as e:
        raise APIError(f"'{param}' cannot be encoded as JSON: {e}", param=param, code="invalid_value") from None


def _structured(r: _GenerationFields) -> StructuredOutput | None:
    """The request's output constraint, if any: response_format (json_object, json_schema) or one of
    vLLM's guided_* fields; two of them are a 400 naming the second."""
    found: list[tuple[str, str, StructuredOutput]] = []  # (field, param of its spec, constraint)
    fmt = r.response_format
    if isinstance(fmt, JSONObjectFormat):
        found.append(("response_format", "response_format", StructuredOutput("json_object")))
    elif isinstance(fmt, JSONSchemaFormat):
        where = "response_format.json_schema.schema"
        found.append(("response_format", where, StructuredOutput("json_schema", _json_text(fmt.json_schema.schema_,
                                                                                           where))))
    if r.guided_json is not None:
        schema = r.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as e:
                raise APIError(f"'guided_json' is not valid JSON: {e}", param="guided_json",
                               code="invalid_value") from None
        found.append(("guided_json", "guided_json", StructuredOutput("json_schema", _json_text(schema, "guided_json"))))
    if r.guided_regex is not None:
        found.append(("guided_regex", "guided_regex", StructuredOutput("regex", r.guided_regex)))
    if r.guided_choice is not None:
        found.append(("guided_choice", "guided_choice", StructuredOutput("choice", choices=tuple(r.guided_choice))))
    if r.guided_grammar is not None:
        found.append(("guided_grammar", "guided_grammar", StructuredOutput("grammar", r.guided_grammar)))
    if not found:
        return None
    if len(found) > 1:
        raise APIError(f"'{found[1][0]}': one output constraint per request, and '{found[0][0]}' is one",
                       param=found[1][0], code="invalid_value")
    _, param, constraint = found[0]
    try:
        constraint.validate()
    except ValueError as e:
        raise APIError(f"'{param}': {e}", param=param, code="invalid_value") from None
    return constraint


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _sampling(r: _GenerationFields) -> SamplingParams:
    """SamplingParams from the OpenAI / vLLM fields (max_tokens None when not given: the
    Preprocessor gives the request the room its prompt leaves)."""
    max_tokens = _or(r.max_completion_tokens, r.max_tokens)
    n = _or(r.n, 1)
    if r.best_of is not None and r.best_of != n:
        raise APIError(f"best_of other than n ({n}) is not supported", param="best_of", code="unsupported_parameter")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_or(r.temperature, 1.0),
        top_p=_or(r.top_p, 1.0),
        top_k=-1 if r.top_k in (None, 0) else r.top_k,
        repetition_penalty=_or(r.repetition_penalty, 1.0),
        presence_penalty=_or(r.presence_penalty, 0.0),
        frequency_penalty=_or(r.frequency_penalty, 0.0),
        seed=r.seed,
        stop=[r.stop] if isinstance(r.stop, str) else list(r.stop or []),
        stop_token_ids=list(r.stop_token_ids or []),
        ignore_eos=bool(r.ignore_eos),
        n=n,
        structured=_structured(r),
    )
    return params


def validate_params(params: SamplingParams, vocab_size: int | None) -> None:
    """SamplingParams.validate as a 400 naming the field."""
    try:
        params.validate(vocab_size)
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise APIError(str(e), param=name, code="invalid_value") from None


def _stream_flags(r: ChatCompletionRequest | CompletionRequest) -> tuple[bool, bool]:
    stream = bool(r.stream)
    if r.stream_options is not None and not stream:
        raise APIError("'stream_options' is only allowed with stream: true", param="stream_options",
                       code="invalid_value")
    return stream, bool(r.stream_options and r.stream_options.include_usage)


def _tools(r: ChatCompletionRequest, structured: StructuredOutput | None
           ) -> tuple[list[dict[str, Any]] | None, str, str | None]:
    """(tools, tool_choice, tool_name) checked against each other and the output constraint."""
    tools = [t.model_dump(exclude_none=True) for t in r.tools] if r.tools else None
    names: list[str] = []
    for i, tool in enumerate(tools or []):
        name = tool["function"]["name"]
        if name in names:
            raise APIError(f"'tools[{i}].function.name': {name!r} is offered twice", param=f"tools[{i}].function.name",
                           code="invalid_value")
        names.append(name)
    choice, name = r.tool_choice, None
    if isinstance(choice, NamedToolChoice):
        choice, name = "function", choice.function.name
    elif choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise APIError(f"'tool_choice' {choice!r} needs 'tools'", param="tool_choice", code="invalid_value")
    if name is not None and name not in names:
        raise APIError(f"'tool_choice' names {name!r}, which is not among the tools ({', '.join(names)})",
                       param="tool_choice", code="invalid_value")
    if choice in ("required", "function") and structured is not None:
        raise APIError(f"'tool_choice' {choice!r} constrains the output itself: it cannot be combined with "
                       "response_format or guided_*", param="tool_choice", code="invalid_value")
    return tools, choice, name


# ------------------------------------------------------------------------------------- the endpoints


def parse_chat_request(body: dict[str, Any]) -> GenerationRequest:
    """POST /v1/chat/completions."""
    r = _validate(ChatCompletionRequest, body)
    messages = _messages(r.messages)
    params = _sampling(r)
    logprobs = bool(r.logprobs)
    top = _or(r.top_logprobs, 0)
    if top and not logprobs:
        raise APIError("'top_logprobs' needs logprobs: true", param="top_logprobs", code="invalid_value")
    params.logprobs = top if logprobs else None
    stream, include_usage = _stream_flags(r)
    tools, tool_choice, tool_name = _tools(r, params.structured)
    return GenerationRequest(r.model, messages, None, params, stream, include_usage, logprobs,
                             bool(r.return_token_ids), r.cache_salt, tools, tool_choice, tool_name,
                             r.parallel_tool_calls is not False)


def parse_completion_request(body: dict[str, Any]) -> GenerationRequest:
    """POST /v1/completions: a raw text prompt."""
    r = _validate(CompletionRequest, body)
    params = _sampling(r)
    params.logprobs = r.logprobs
    stream, include_usage = _stream_flags(r)
    return GenerationRequest(r.model, None, r.prompt, params, stream, include_usage, r.logprobs is not None,
                             bool(r.return_token_ids), r.cache_salt)


def parse_generate_request(body: dict[str, Any]) -> GenerationRequest:
    """POST /generate (vLLM / MindIE): prompt string (raw) or list of parts (one user message)."""
    r = _validate(GenerateRequest, body)
    messages, raw = None, None
    if isinstance(r.prompt, str):
        raw = r.prompt
    else:
        messages = [ChatMessage("user", _parts(r.prompt, "prompt"))]
    params = _sampling(r)
    if r.do_sample is False:
        params.temperature = 0.0
    return GenerationRequest(r.model, messages, raw, params, bool(r.stream), cache_salt=r.cache_salt)
