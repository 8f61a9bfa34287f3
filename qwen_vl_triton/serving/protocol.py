"""Request parsing and validation (JSON in, typed requests out) and the errors they raise.

Three request bodies are declared as pydantic models (their JSON schemas are what /openapi.json
and /docs show, see `openapi_request_body`) and parsed into one `GenerationRequest`:

* `POST /v1/chat/completions` (`ChatCompletionRequest`): OpenAI chat. `messages` with string or
  list content; parts `text`, `image_url` / `video_url` (`{"url": ...}` or, as MindIE's curl
  examples send, a plain string), and qwen-vl-utils' `image` / `video` parts. Per-part media
  controls (min_pixels, max_pixels, fps, nframes, ...; see engine.media.IMAGE_OPTIONS /
  VIDEO_OPTIONS) may sit on the part or inside the url object. Tools (`tools`, `tool_choice`,
  assistant `tool_calls`, `tool` messages) as OpenAI defines them; vLLM's `chat_template` (a
  Jinja template replacing the model's for this request) and `chat_template_kwargs`, and
  `mm_processor_kwargs` (media controls for all its media). The messages and their parts are
  the engine's models (engine/chat.py: the one parser, which `LLM.chat` uses too).
* `POST /v1/completions` (`CompletionRequest`): OpenAI completions; `prompt` is raw text (no chat
  template).
* `POST /generate` (`GenerateRequest`): vLLM's / MindIE's seed API; `prompt` is a string (raw
  text) or a list of parts as above (rendered as one user message), `do_sample` false means greedy;
  `mm_processor_kwargs` as for chat.

All three take the sampling fields, `n`, and one output constraint: OpenAI's `response_format`
(json_object, json_schema) or vLLM's `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`.

Validation has two layers. The models check each field's type and shape (strict types: a bool is
never a number, an int is taken for a float, floats must be finite; unknown fields are ignored,
since the OpenAI SDK sends fields this server does not use, and a body's unknown fields are logged
at WARNING, each name once per process, as vLLM does). Then the `parse_*` functions check
what spans fields (top_logprobs needs logprobs, one output constraint at most, tool_choice against
the tools, roles and their content) as they build the GenerationRequest. Every problem becomes an
`APIError` carrying the HTTP status and OpenAI's error body `{"error": {"message", "type",
"param", "code"}}`, param a path such as `messages[0].content[1].image_url` (the engine's
InputError, which carries the same three fields, becomes one: `api_error`). Bodies are parsed
whatever the Content-Type (MindIE's curl examples send none): the handlers read the raw body and
call these functions, FastAPI never parses it. Response bodies are in responses.py.

Its length is the request surface: OpenAI chat and completions, vLLM's and MindIE's /generate, the
content parts (images, videos, their per-part controls), tools and structured outputs, each a
pydantic model with its parser and its 400s; they share the validation and error helpers here.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, WrapValidator, model_validator
from pydantic.json_schema import SkipJsonSchema

from qwen_vl_triton.engine.chat import (
    ChatMessage,
    InputError,
    Message,
    NonEmptyStr,
    Number,
    Part,
    input_error,
    parse_messages,
    parse_parts,
)
from qwen_vl_triton.engine.chat import (
    MediaRef as MediaRef,  # re-exported: the server's media parts
)
from qwen_vl_triton.engine.chat import StrictModel as _Model
from qwen_vl_triton.engine.chat import fail as _fail
from qwen_vl_triton.engine.chat import json_type as _json_type
from qwen_vl_triton.engine.chat import snippet as _snippet
from qwen_vl_triton.engine.chat import tagged_union as _union
from qwen_vl_triton.engine.sampling import MAX_N, SamplingParams
from qwen_vl_triton.engine.sampling_defaults import NO_DEFAULTS, SamplingDefaults
from qwen_vl_triton.engine.structured import StructuredOutput
from qwen_vl_triton.serving.responses import ErrorInfo, ErrorResponse, ErrorType, json_schema

log = logging.getLogger("serving.protocol")

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
    chat_template: str | None = None       # the request's own chat template (vLLM's field)
    chat_template_kwargs: dict[str, Any] | None = None  # extra chat template variables (vLLM's field)
    mm_processor_kwargs: dict[str, int | float] | None = None  # controls for all its media (vLLM's field)

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


def _whole(expected: str) -> WrapValidator:
    """Any error inside the field becomes one invalid_type error on the field itself (its param is
    `stop`, not `stop[1]` or the arm of a union)."""
    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _fail("invalid_type", f"must be {expected}") from None

    return WrapValidator(validate)


# ------------------------------------------------------------------------------------- tools


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
    max_tokens: int | None = Field(None, description="default: the model's max_new_tokens (generation_config.json), "
                                                     "else the room left under max_seq_len (and max_iter_times)")
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens (wins over it)")
    # The four below default to the model's generation_config.json (the server's --generation_config)
    temperature: float | None = Field(None, description="0: greedy; default: the model's, else 1")
    top_p: float | None = Field(None, description="in (0, 1]; default: the model's, else 1")
    top_k: int | None = Field(None, description="-1 or 0: off; default: the model's, else off")
    repetition_penalty: float | None = Field(None, description="> 0 (vLLM's); default: the model's, else 1")
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


MMProcessorKwargs = dict[str, Number]
MM_PROCESSOR_KWARGS_HELP = ("vLLM's: media controls for every image and video of the request, e.g. {\"fps\": 1, "
                            "\"max_pixels\": 200704} (a part's own controls win; each applies to the kinds it is a "
                            "control of)")


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
    chat_template: NonEmptyStr | None = Field(
        None, description="vLLM's: a Jinja chat template replacing the model's for this request (one that cannot "
                          "render the messages is a 400)")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM's: extra variables for the chat template, e.g. {\"add_vision_id\": true}")
    mm_processor_kwargs: MMProcessorKwargs | None = Field(None, description=MM_PROCESSOR_KWARGS_HELP)


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
    mm_processor_kwargs: MMProcessorKwargs | None = Field(None, description=MM_PROCESSOR_KWARGS_HELP)

    @classmethod
    def _prompt(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Absent or of another type: invalid_type, the code clients of this server have had for it."""
        if not isinstance(data.get("prompt"), (str, list)):
            raise _fail("invalid_type", "is required: a string, or a list of {type: text|image_url|video_url} parts",
                        field="prompt")
        return data


# ------------------------------------------------------------------------------------- error mapping


def api_error(error: InputError) -> APIError:
    """An engine InputError (message, param, code) as a 400."""
    return APIError(error.message, param=error.param, code=error.code)


def _api_error(error: ValidationError) -> APIError:
    """The first of pydantic's errors as a 400: its location as the param, its type as the code
    (engine.chat.input_error)."""
    return api_error(input_error(error))


M = TypeVar("M", bound=_Model)


def _validate(model: type[M], body: dict[str, Any]) -> M:
    """The body as `model` (400 naming the first problem); fields it ignores are logged
    (`_log_ignored_fields`)."""
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        raise _api_error(e) from None
    _log_ignored_fields(model, body)
    return request


# Unknown fields are logged once per name per process; at most this many names are remembered (a
# client sending fresh names would otherwise grow the set and the log without bound), each cut to
# _IGNORED_NAME_CHARS characters.
_MAX_IGNORED_NAMES, _IGNORED_NAME_CHARS = 1024, 100
_ignored_names: set[str] = set()
_ignored_lock = threading.Lock()


@functools.cache
def _known_fields(model: type[_Model]) -> frozenset[str]:
    """The body fields `model` reads: its fields' names and aliases, and the fields it refuses when
    set (`_GenerationFields.refused`: known, and without effect when false)."""
    names = set(getattr(model, "refused", ()))
    for name, info in model.model_fields.items():
        names.add(name)
        for alias in (info.alias, info.validation_alias):
            names.update(a for a in getattr(alias, "choices", [alias]) if isinstance(a, str))
    return frozenset(names)


def _log_ignored_fields(model: type[_Model], body: dict[str, Any]) -> None:
    """A WARNING naming the body's fields that `model` does not declare (they are ignored), as
    vLLM logs them; each name once per process (thread-safe), the first _MAX_IGNORED_NAMES names."""
    unknown = {str(k)[:_IGNORED_NAME_CHARS] for k in body.keys() - _known_fields(model)}
    if not unknown:
        return
    with _ignored_lock:
        new = sorted(unknown - _ignored_names)[:max(0, _MAX_IGNORED_NAMES - len(_ignored_names))]
        _ignored_names.update(new)
    if new:
        log.warning("The following fields were present in the request but ignored: {%s} (%s; each name is "
                    "logged once)", ", ".join(map(repr, new)), getattr(model, "endpoint", model.__name__))


def openapi_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody for a route whose handler reads and validates the body itself: the
    model's JSON schema, inlined."""
    return {"required": True, "content": {"application/json": {"schema": json_schema(model)}}}


# ------------------------------------------------------------------------------------- semantics


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


def _sampling(r: _GenerationFields, defaults: SamplingDefaults) -> SamplingParams:
    """SamplingParams from the OpenAI / vLLM fields. A field the request leaves unset takes the
    model's default (`defaults`, from generation_config.json), else OpenAI's; max_tokens None when
    neither sets it (the Preprocessor gives the request the room its prompt leaves)."""
    max_tokens = defaults.get("max_tokens", _or(r.max_completion_tokens, r.max_tokens), None)
    n = _or(r.n, 1)
    if r.best_of is not None and r.best_of != n:
        raise APIError(f"best_of other than n ({n}) is not supported", param="best_of", code="unsupported_parameter")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.get("temperature", r.temperature, 1.0),
        top_p=defaults.get("top_p", r.top_p, 1.0),
        top_k=-1 if r.top_k == 0 else defaults.get("top_k", r.top_k, -1),
        repetition_penalty=defaults.get("repetition_penalty", r.repetition_penalty, 1.0),
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


def parse_chat_request(body: dict[str, Any], defaults: SamplingDefaults = NO_DEFAULTS) -> GenerationRequest:
    """POST /v1/chat/completions; `defaults` (the model's) fill the sampling fields it leaves unset."""
    r = _validate(ChatCompletionRequest, body)
    try:
        messages = parse_messages(r.messages)
    except InputError as e:
        raise api_error(e) from None
    params = _sampling(r, defaults)
    logprobs = bool(r.logprobs)
    top = _or(r.top_logprobs, 0)
    if top and not logprobs:
        raise APIError("'top_logprobs' needs logprobs: true", param="top_logprobs", code="invalid_value")
    params.logprobs = top if logprobs else None
    stream, include_usage = _stream_flags(r)
    tools, tool_choice, tool_name = _tools(r, params.structured)
    return GenerationRequest(r.model, messages, None, params, stream, include_usage, logprobs,
                             bool(r.return_token_ids), r.cache_salt, tools, tool_choice, tool_name,
                             r.parallel_tool_calls is not False, chat_template=r.chat_template,
                             chat_template_kwargs=r.chat_template_kwargs, mm_processor_kwargs=r.mm_processor_kwargs)


def parse_completion_request(body: dict[str, Any], defaults: SamplingDefaults = NO_DEFAULTS
                             ) -> GenerationRequest:
    """POST /v1/completions: a raw text prompt; `defaults` as for parse_chat_request."""
    r = _validate(CompletionRequest, body)
    params = _sampling(r, defaults)
    params.logprobs = r.logprobs
    stream, include_usage = _stream_flags(r)
    return GenerationRequest(r.model, None, r.prompt, params, stream, include_usage, r.logprobs is not None,
                             bool(r.return_token_ids), r.cache_salt)


def parse_generate_request(body: dict[str, Any], defaults: SamplingDefaults = NO_DEFAULTS) -> GenerationRequest:
    """POST /generate (vLLM / MindIE): prompt string (raw) or list of parts (one user message);
    `defaults` as for parse_chat_request (MindIE's do_sample false is greedy whatever they say)."""
    r = _validate(GenerateRequest, body)
    messages, raw = None, None
    if isinstance(r.prompt, str):
        raw = r.prompt
    else:
        messages = [ChatMessage("user", parse_parts(r.prompt, "prompt"))]
    params = _sampling(r, defaults)
    if r.do_sample is False:
        params.temperature = 0.0
    return GenerationRequest(r.model, messages, raw, params, bool(r.stream), cache_salt=r.cache_salt,
                             mm_processor_kwargs=r.mm_processor_kwargs)
