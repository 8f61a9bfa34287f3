"""Response bodies and stream chunks as pydantic models, and their OpenAPI declarations.

Every body the server sends is built as one of these models and sent as `model.wire()`, which
dumps with `exclude_unset=True` (vLLM's rule). So a field is on the wire exactly when it was given:

* fields without a default are required: always sent, `null` where their type allows it
  (`choices[].logprobs`, `choices[].finish_reason`, `message.content`, `error.param`, ...);
* fields with a default (`= None`) are sent only when the builder gives them: `token_ids`
  (return_token_ids), `message.tool_calls` (when calls were made), `usage.media_adjustments` (when a
  video was shrunk), `delta` fields (a delta carries only its own), `health.reason`; and a stream
  chunk's `usage`, which is absent without `stream_options.include_usage` and otherwise `null` in
  every chunk but the last (so it is given as None then: OpenAI's three states of it).

Fields that are never `null` on the wire are typed `X | SkipJsonSchema[None]` so that their JSON
schema does not allow null. All models forbid unknown fields: validating a body against them (or
against their schemas in /openapi.json) catches any drift of the wire format.

The routes read their bodies themselves and return Responses, so the models are declared with
`responses=` (`openapi_responses`), schemas inlined as for the request bodies (a route's OpenAPI
parts cannot add components). Streams are declared as FastAPI declares its own: text/event-stream
(/v1/...) or application/x-ndjson (/generate) with the chunk's schema as the `itemSchema`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic.json_schema import SkipJsonSchema

FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]


class ResponseBody(BaseModel):
    """A body the server sends: unknown fields forbidden, dumped with only the fields given."""

    model_config = ConfigDict(extra="forbid")

    def wire(self) -> dict[str, Any]:
        """The body as sent (the fields given, module docstring), for json.dumps."""
        return self.model_dump(exclude_unset=True)


# ------------------------------------------------------------------------------------- errors


ErrorType = Literal["invalid_request_error", "not_found_error", "server_busy_error", "internal_error"]


class ErrorInfo(ResponseBody):
    """OpenAI's error object."""

    message: str
    type: ErrorType
    param: str | None = Field(description="the request field at fault, as a path (messages[0].content)")
    code: str | None = Field(description="machine-readable reason (invalid_type, model_not_found, server_busy, ...)")


class ErrorResponse(ResponseBody):
    """Every error, as a response body or inside a stream: {"error": {message, type, param, code}}."""

    error: ErrorInfo


# ------------------------------------------------------------------------------------- usage, logprobs


class PromptTokensDetails(ResponseBody):
    """What of the prompt was served from the prefix cache."""

    cached_tokens: int


class Usage(ResponseBody):
    """OpenAI's usage: the prompt counted once, the completion tokens of all n choices."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    media_adjustments: list[str] | SkipJsonSchema[None] = Field(
        None, description="videos shrunk to fit max_input_length (only when one was)")

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int, adjustments: list[str]) -> Usage:
        """The usage of a request (media_adjustments given only when there are some)."""
        usage = cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens,
                    prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))
        if adjustments:
            usage.media_adjustments = list(adjustments)
        return usage


class TopLogprob(ResponseBody):
    """A candidate token: its text, log-probability and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int]


class ChatLogprobEntry(TopLogprob):
    """An output token of a chat choice, with the most likely candidates at its position."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(ResponseBody):
    """A chat choice's logprobs (of the tokens of this choice or chunk)."""

    content: list[ChatLogprobEntry]


class CompletionLogprobs(ResponseBody):
    """A completion choice's logprobs, OpenAI's legacy layout: one list per attribute."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] = Field(description="per token, {candidate text: logprob}")
    text_offset: list[int] = Field(description="each token's character offset in the choice's text")

    @classmethod
    def of(cls, entries: list[ChatLogprobEntry], offset: int) -> CompletionLogprobs:
        """The entries in this layout; `offset` is the first token's offset in the choice's text."""
        offsets, at = [], offset
        for e in entries:
            offsets.append(at)
            at += len(e.token)
        return cls(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                   top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries], text_offset=offsets)


# ------------------------------------------------------------------------------------- tool calls


class CalledFunction(ResponseBody):
    """The function a tool call calls."""

    name: str
    arguments: str = Field(description="the arguments as JSON text (as the model wrote them)")


class ResponseToolCall(ResponseBody):
    """A tool call of an assistant message."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class DeltaFunction(ResponseBody):
    """A piece of a streamed call's function: the name comes whole with the call's head."""

    name: str | SkipJsonSchema[None] = None
    arguments: str | SkipJsonSchema[None] = None


class DeltaToolCall(ResponseBody):
    """A piece of a streamed tool call; the pieces of one call share its index, the first carries id and type."""

    index: int
    id: str | SkipJsonSchema[None] = None
    type: Literal["function"] | SkipJsonSchema[None] = None
    function: DeltaFunction | SkipJsonSchema[None] = None


# ------------------------------------------------------------------------------------- chat, completions


class BaseChoice(ResponseBody):
    """What every choice of a response or chunk has."""

    index: int = Field(description="which of the request's n samples")
    finish_reason: FinishReason | None = Field(description="why the choice ended (streamed: null until its last "
                                                           "chunk)")
    token_ids: list[int] | SkipJsonSchema[None] = Field(None, description="vLLM's: with return_token_ids")


class AssistantMessage(ResponseBody):
    """A chat choice's message: the content (null when the model only called tools) and its calls."""

    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ResponseToolCall] | SkipJsonSchema[None] = None


class ChatCompletionChoice(BaseChoice):
    """A choice of a chat completion."""

    message: AssistantMessage
    logprobs: ChatLogprobs | None


class ChatCompletionResponse(ResponseBody):
    """POST /v1/chat/completions, not streamed."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class DeltaMessage(ResponseBody):
    """What a chat chunk adds to its choice's message: the role first, then content or tool call pieces."""

    role: Literal["assistant"] | SkipJsonSchema[None] = None
    content: str | SkipJsonSchema[None] = None
    tool_calls: list[DeltaToolCall] | SkipJsonSchema[None] = None


class ChatCompletionStreamChoice(BaseChoice):
    """A choice of a streamed chat chunk."""

    delta: DeltaMessage
    logprobs: ChatLogprobs | None


class ChatCompletionStreamResponse(ResponseBody):
    """A chunk of a streamed POST /v1/chat/completions (an SSE event's data): one choice, or none in
    the usage chunk that ends a stream with include_usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = Field(None, description="with stream_options.include_usage only: null but in the last "
                                                  "chunk")


class CompletionChoice(BaseChoice):
    """A choice of a completion, whole or (as a piece of text) in a chunk."""

    text: str
    logprobs: CompletionLogprobs | None


class CompletionResponse(ResponseBody):
    """POST /v1/completions, not streamed."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionStreamResponse(ResponseBody):
    """A chunk of a streamed POST /v1/completions (an SSE event's data), as ChatCompletionStreamResponse."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="with stream_options.include_usage only: null but in the last "
                                                  "chunk")


class OpenAIBodies(ABC):
    """The bodies of /v1/chat/completions (CHAT) or /v1/completions (COMPLETION), for the server's one
    code path for both: it hands over a choice's output as content (and tool calls), a streamed piece
    as a DeltaMessage, and logprobs as chat entries (with the text offset of their first token); each
    endpoint shapes them into its own models. A choice's token_ids the caller sets on it."""

    id_prefix: ClassVar[str]  # of the response id
    object: ClassVar[str]  # of the response ...
    chunk_object: ClassVar[str]  # ... and of its chunks
    response_model: ClassVar[type[ChatCompletionResponse] | type[CompletionResponse]]
    chunk_model: ClassVar[type[ChatCompletionStreamResponse] | type[CompletionStreamResponse]]
    opening: ClassVar[DeltaMessage | None] = None  # streamed for every choice before any output

    def response(self, id: str, created: int, model: str, choices: list[Any], usage: Usage
                 ) -> ChatCompletionResponse | CompletionResponse:
        """The whole (not streamed) response."""
        return self.response_model(id=id, object=self.object, created=created, model=model, choices=choices,
                                   usage=usage)

    def chunk(self, id: str, created: int, model: str, choices: list[Any]
              ) -> ChatCompletionStreamResponse | CompletionStreamResponse:
        """A stream chunk, its usage not given (the caller gives it: None, or the usage at the end)."""
        return self.chunk_model(id=id, object=self.chunk_object, created=created, model=model, choices=choices)

    @abstractmethod
    def choice(self, index: int, content: str | None, calls: list[ResponseToolCall],
               logprobs: list[ChatLogprobEntry] | None, finish_reason: FinishReason | None) -> BaseChoice:
        """A choice of the whole response (calls: those the model made, if any)."""

    @abstractmethod
    def stream_choice(self, index: int, delta: DeltaMessage, logprobs: list[ChatLogprobEntry] | None = None,
                      offset: int = 0, finish_reason: FinishReason | None = None) -> BaseChoice:
        """A choice of a chunk: the piece `delta`, and the logprobs of its tokens."""


class _ChatBodies(OpenAIBodies):
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    response_model = ChatCompletionResponse
    chunk_model = ChatCompletionStreamResponse
    opening = DeltaMessage(role="assistant", content="")

    def choice(self, index: int, content: str | None, calls: list[ResponseToolCall],
               logprobs: list[ChatLogprobEntry] | None, finish_reason: FinishReason | None) -> ChatCompletionChoice:
        message = AssistantMessage(role="assistant", content=content)
        if calls:
            message.tool_calls = calls
        return ChatCompletionChoice(index=index, message=message, finish_reason=finish_reason,
                                    logprobs=None if logprobs is None else ChatLogprobs(content=logprobs))

    def stream_choice(self, index: int, delta: DeltaMessage, logprobs: list[ChatLogprobEntry] | None = None,
                      offset: int = 0, finish_reason: FinishReason | None = None) -> ChatCompletionStreamChoice:
        return ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish_reason,
                                          logprobs=None if logprobs is None else ChatLogprobs(content=logprobs))


class _CompletionBodies(OpenAIBodies):
    id_prefix = "cmpl"
    object = chunk_object = "text_completion"
    response_model = CompletionResponse
    chunk_model = CompletionStreamResponse

    def choice(self, index: int, content: str | None, calls: list[ResponseToolCall],
               logprobs: list[ChatLogprobEntry] | None, finish_reason: FinishReason | None) -> CompletionChoice:
        return self.stream_choice(index, DeltaMessage(content=content or ""), logprobs, 0, finish_reason)

    def stream_choice(self, index: int, delta: DeltaMessage, logprobs: list[ChatLogprobEntry] | None = None,
                      offset: int = 0, finish_reason: FinishReason | None = None) -> CompletionChoice:
        return CompletionChoice(index=index, text=delta.content or "", finish_reason=finish_reason,
                                logprobs=None if logprobs is None else CompletionLogprobs.of(logprobs, offset))


CHAT: OpenAIBodies = _ChatBodies()
COMPLETION: OpenAIBodies = _CompletionBodies()


# ------------------------------------------------------------------------------------- the other endpoints


class GenerateResponse(ResponseBody):
    """POST /generate (vLLM's api_server): each sample's text; a text prompt is repeated before its
    output. Streamed, every chunk carries the whole texts so far."""

    text: list[str]


class ModelCard(ResponseBody):
    """A served model name."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str = Field(description="the checkpoint's path")
    max_model_len: int | None = Field(description="max_seq_len; null until the model is loaded")


class ModelList(ResponseBody):
    """GET /v1/models."""

    object: Literal["list"]
    data: list[ModelCard]


class HealthStatus(ResponseBody):
    """GET /health and /ready."""

    status: Literal["ok", "unavailable"]
    reason: str | SkipJsonSchema[None] = Field(None, description="/ready, when unavailable: why")


def now() -> int:
    """Unix time in seconds (OpenAI's `created`)."""
    return int(time.time())


# ------------------------------------------------------------------------------------- OpenAPI


def json_schema(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a model or type with its $defs inlined (a route's OpenAPI parts cannot
    add components)."""
    schema = TypeAdapter(annotation).json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [inline(v, seen) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[1]
            if name in seen:
                raise ValueError(f"the schema of {annotation} is recursive at {name}: it cannot be inlined")
            rest = {k: inline(v, seen) for k, v in node.items() if k != "$ref"}
            return {**inline(defs[name], (*seen, name)), **rest}
        return {k: inline(v, seen) for k, v in node.items()}

    return inline(schema, ())


ERRORS = {
    400: "an invalid request (the error names the field), a medium that does not decode, a model not served here",
    413: "the request body is over --max_request_bytes",
    500: "the engine failed on the request",
    503: "the waiting queue is full (Retry-After), or the model is not loaded or the server is shutting down",
}
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


def openapi_json(model: type[ResponseBody], description: str) -> dict[str, Any]:
    """An OpenAPI response object: `model` as JSON."""
    return {"description": description, "content": {"application/json": {"schema": json_schema(model)}}}


def openapi_responses(ok: type[ResponseBody], description: str, stream: tuple[str, type[ResponseBody]] | None = None,
                      errors: tuple[int, ...] = ()) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: 200 with `ok` as JSON, and with stream=(media type, chunk) also the
    stream (with "stream": true) whose items are chunks or, if the request fails on the way, an
    ErrorResponse that ends it; each of `errors` with an ErrorResponse."""
    response = openapi_json(ok, description)
    if stream is not None:
        media_type, chunk = stream
        item = json_schema(chunk | ErrorResponse)
        if media_type == SSE:
            how = "server-sent events whose data are JSON chunks, then the data [DONE]"
            item = {"type": "object", "required": ["data"], "properties": {
                "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": item}}}
        else:
            how = "JSON chunks, each followed by a NUL character"
        response["description"] += f"; streamed: {how} (an error chunk ends a stream)"
        response["content"][media_type] = {"itemSchema": item}
    return {200: response, **{status: openapi_json(ErrorResponse, ERRORS[status]) for status in errors}}
