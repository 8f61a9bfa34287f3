"""The HTTP server: OpenAI-compatible and vLLM/MindIE-style endpoints over one AsyncEngine.

    POST /v1/chat/completions   OpenAI chat (text, image_url, video_url parts; stream with SSE)
    POST /v1/completions        OpenAI completions (raw text prompt)
    POST /generate              vLLM / MindIE seed API: {"prompt": str | [parts], ...} -> {"text": [...]}
    GET  /v1/models, /health, /metrics

`create_app(cfg)` builds the FastAPI app; the model loads in its lifespan (so /health answers
only once it is loaded) unless an LLM is passed in. `run_server(cfg)` runs it with uvicorn;
SIGTERM stops accepting requests (new ones get 503), lets in-flight ones finish for up to
`graceful_timeout` seconds, aborts the rest and exits 0. `serve(cfg)` adds tensor parallelism:
every rank loads its shard, rank 0 serves HTTP and drives the engine (its engine thread
broadcasts each step's commands), the other ranks follow in `LLM.worker_loop()` until rank 0 shuts
the engine down. The ranks are `torchrun --nproc-per-node N`'s, or, with `--tensor_parallel_size N`
and no launcher, this process and N-1 workers its engine starts (engine/llm.py).

Client disconnects abort the request in the engine: a streaming response aborts when the ASGI
server reports the disconnect (or a send fails), a non-streaming one watches the connection
while it waits.

Its length is the routes: each endpoint's handler, streamed and not, with its OpenAPI declaration;
requests are parsed in protocol.py, responses built from responses.py, media and prompts in
prompting.py, the engine thread in async_engine.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_vl_triton.engine.errors import RequestMediaError
from qwen_vl_triton.engine.llm import LLM
from qwen_vl_triton.engine.outputs import CompletionOutput, RequestOutput
from qwen_vl_triton.engine.preprocess import PreparedRequest
from qwen_vl_triton.engine.sampling_defaults import NO_DEFAULTS, SamplingDefaults
from qwen_vl_triton.engine.structured import StructuredOutput
from qwen_vl_triton.modeling.processing import MediaKind
from qwen_vl_triton.parallel import SINGLE_PROCESS, TPGroup
from qwen_vl_triton.serving import tool_calls
from qwen_vl_triton.serving.async_engine import (
    AsyncEngine,
    EngineError,
    EngineFull,
    EngineStopped,
    RequestStream,
)
from qwen_vl_triton.serving.config import ServeConfig
from qwen_vl_triton.serving.limits import BodyLimitMiddleware
from qwen_vl_triton.serving.media_fetch import MediaFetcher
from qwen_vl_triton.serving.metrics import CONTENT_TYPE, Metrics
from qwen_vl_triton.serving.middleware import HTTPMiddleware
from qwen_vl_triton.serving.prompting import MAX_IMAGE_BYTES, MAX_VIDEO_BYTES, Preparer
from qwen_vl_triton.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    GenerationRequest,
    openapi_request_body,
    parse_chat_request,
    parse_completion_request,
    parse_generate_request,
    parse_json_body,
    server_busy,
    validate_params,
)
from qwen_vl_triton.serving.responses import (
    CHAT,
    COMPLETION,
    NDJSON,
    SSE,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprobEntry,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ErrorResponse,
    GenerateResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    OpenAIBodies,
    ResponseBody,
    ResponseToolCall,
    TopLogprob,
    Usage,
    now,
    openapi_json,
    openapi_responses,
)

log = logging.getLogger("serving.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of streams
CLIENT_CLOSED = 499  # nginx's "client closed request": the response is never delivered
ROUTES = ("/v1/chat/completions", "/v1/completions", "/generate", "/v1/models", "/health", "/ready", "/metrics")


def load_llm(cfg: ServeConfig, tp: TPGroup = SINGLE_PROCESS) -> LLM:
    """The engine as the config describes it (this rank's shard under tensor parallelism)."""
    return LLM(cfg.model_path, cfg.engine, tp=tp)


def usage_of(out: RequestOutput) -> Usage:
    """The usage block of a finished request: the prompt counted once, the completion tokens of
    every sample (videos shrunk to fit the context are reported)."""
    return Usage.of(out.prompt_tokens, out.completion_tokens, out.cached_prompt_tokens, out.media_adjustments)


def constrain_tool_output(req: GenerationRequest) -> None:
    """tool_choice "required" or a named function: the output is constrained to what the server
    then parses as calls (vLLM's approach): a JSON array of {name, arguments} objects, or the named
    function's arguments object."""
    if req.tool_choice == "required":
        schema = tool_calls.required_schema(req.tools or [], req.parallel_tool_calls)
    elif req.tool_choice == "function":
        schema = tool_calls.named_schema(req.tools or [], req.tool_name or "")
    else:
        return
    req.params.structured = StructuredOutput("json_schema", json.dumps(schema))


def tool_calls_of(req: GenerationRequest, text: str) -> tuple[str | None, list[ResponseToolCall]]:
    """(content, tool calls) of a finished chat output under the request's tool_choice."""
    if req.tool_choice == "function":
        content, calls = None, [tool_calls.named_call(req.tool_name or "", text)]
    elif req.tool_choice == "required":
        try:
            content, calls = None, tool_calls.parse_required(text)
        except ValueError:  # cut short (max_tokens): not a complete array of calls
            content, calls = text, []
    else:
        content, calls = tool_calls.parse_tool_calls(text)
    return content, [ResponseToolCall.model_validate(call) for call in calls]


def finish_reason_of(req: GenerationRequest, sample: CompletionOutput, made_calls: bool) -> str | None:
    """A choice's finish_reason: "tool_calls" when the output ended on its own after the model chose
    to call (tool_choice auto or required; a named function keeps "stop", as vLLM and OpenAI do)."""
    chose = made_calls and req.tool_choice in ("auto", "required")
    return "tool_calls" if chose and sample.finish_reason == "stop" else sample.finish_reason


class ChoiceStream:
    """One choice of a streamed chat or completion: the delta bodies to send for each newer output
    of its sample. Text goes through TextDelta (held-back stop strings and partial characters);
    under tools, through the tool-call parser of the request's tool_choice."""

    def __init__(self, req: GenerationRequest, api: OpenAIBodies):
        self.req = req
        self.text = TextDelta(req.params.stop)
        self.sent_tokens = 0
        self.ended = False  # its finish chunk was sent
        choice = req.tool_choice if api is CHAT else "none"
        self.calls: tool_calls.ToolCallStream | tool_calls.NamedCallStream | tool_calls.RequiredCallStream | None = (
            tool_calls.ToolCallStream() if choice == "auto" else
            tool_calls.NamedCallStream(req.tool_name or "") if choice == "function" else
            tool_calls.RequiredCallStream() if choice == "required" else None)

    def update(self, sample: CompletionOutput) -> list[DeltaMessage]:
        """The pieces to send for this newer output of the sample, possibly none."""
        delta = self.text.update(sample.text, sample.finished)
        if self.calls is None:
            return [DeltaMessage(content=delta)] if delta else []
        return [DeltaMessage.model_validate(p) for p in self.calls.update(self.text.sent, sample.finished)]

    def finish_reason(self, sample: CompletionOutput) -> str | None:
        """This choice's finish_reason (finish_reason_of)."""
        return finish_reason_of(self.req, sample, getattr(self.calls, "has_calls", False))


# Characters that Python's str.splitlines (and so httpx's iter_lines, and many clients) take for
# line ends although JSON leaves them raw in strings: written as \u escapes, an event stays one line.
LINE_BREAK_ESCAPES = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def wire_json(body: ResponseBody) -> str:
    """`body` as one line of JSON: non-ASCII text as is, but no character a client may split a
    line on (LINE_BREAK_ESCAPES); it decodes to the same value."""
    return json.dumps(body.wire(), ensure_ascii=False).translate(LINE_BREAK_ESCAPES)


def sse(body: ResponseBody) -> str:
    """A server-sent event carrying `body`."""
    return f"data: {wire_json(body)}\n\n"


class TextDelta:
    """What to send of a growing output text: holds back a trailing partial UTF-8 character
    (decoded as U+FFFD) and, with stop strings, the last len(longest stop) - 1 characters, which
    the engine may still cut away when a stop string completes."""

    def __init__(self, stop: list[str]):
        self.sent = ""
        self.hold = max((len(s) for s in stop), default=1) - 1

    def update(self, text: str, finished: bool) -> str:
        visible = text
        if not finished:
            if self.hold:
                visible = visible[:max(len(visible) - self.hold, 0)]
            visible = visible.rstrip("\ufffd")
        if visible.startswith(self.sent):
            delta = visible[len(self.sent):]
        elif self.sent.startswith(visible):
            return ""
        else:  # earlier text decoded differently now: send the new tail (a stream cannot retract)
            delta = visible[len(os.path.commonprefix([visible, self.sent])):]
        self.sent = visible
        return delta


class DisconnectingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends (done, client gone, cancelled)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class HTTPMetricsMiddleware(HTTPMiddleware):
    """Counts requests by route and status code."""

    def __init__(self, app: Any, metrics: Metrics):
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        status = {"code": 500}

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.http_requests.labels(endpoint=path if path in ROUTES else "other",
                                              status=str(status["code"])).inc()


class Server:
    """The app's state: config, engine, preparer, metrics, and the request handlers."""

    def __init__(self, cfg: ServeConfig, llm: LLM | None, on_fatal: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.on_fatal = on_fatal  # told, from the engine thread, why the engine stopped itself
        self.names = cfg.model_names()
        self.metrics = Metrics(self.names[0] if self.names else "model")
        self.llm = llm
        self.engine: AsyncEngine | None = None
        self.preparer: Preparer | None = None
        self.pool = ThreadPoolExecutor(max_workers=cfg.preprocess_workers, thread_name_prefix="qvl-prepare")
        self.fetcher = MediaFetcher(cfg.allowed_media_domains,
                                    {MediaKind.IMAGE: cfg.image_fetch_timeout,
                                     MediaKind.VIDEO: cfg.video_fetch_timeout},
                                    {MediaKind.IMAGE: MAX_IMAGE_BYTES, MediaKind.VIDEO: MAX_VIDEO_BYTES})
        self.created = now()

    # ---------------------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        if self.llm is None:
            log.info("loading %s", self.cfg.model_path)
            self.llm = await asyncio.to_thread(load_llm, self.cfg)
        self.preparer = await asyncio.to_thread(Preparer.for_llm, self.llm, self.cfg.allowed_media_dir,
                                                self.cfg.max_iter_times)
        self.engine = AsyncEngine(self.llm, max_waiting=self.cfg.max_waiting, metrics=self.metrics,
                                  on_fatal=self.on_fatal)
        self.engine.start()
        log.info("serving %s as %s: %d KV blocks of %d tokens (sized by %s), max_seq_len %d, max_input_length %d; "
                 "sampling defaults for unset fields: %s", self.llm.path, self.names, self.llm.blocks.num_blocks,
                 self.llm.blocks.block_size, self.llm.kv_budget_note, self.llm.max_seq_len,
                 self.llm.max_input_length, self.llm.sampling_defaults.describe())

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.stop(timeout=max(self.cfg.graceful_timeout, 5.0))
        self.pool.shutdown(wait=False, cancel_futures=True)
        await self.fetcher.aclose()

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """The model's defaults for the sampling fields a request leaves unset (--generation_config)."""
        return self.llm.sampling_defaults if self.llm is not None else NO_DEFAULTS

    def ready_engine(self) -> AsyncEngine:
        if self.engine is None or not self.engine.is_healthy():
            raise server_busy("the model is not loaded yet or the server is shutting down")
        return self.engine

    # ---------------------------------------------------------------------------- requests

    def check_model(self, req: GenerationRequest) -> str:
        if req.model is not None and req.model not in self.names:
            raise APIError(f"model {req.model!r} is not served here; available: {self.names}", param="model",
                           code="model_not_found")
        return req.model or self.names[0]

    def _prepare(self, req: GenerationRequest) -> PreparedRequest:
        """The request as the engine takes it: the Preprocessor's (lengths, output budget, cache salt)."""
        assert self.preparer is not None
        if req.messages is not None:
            tools = req.tools if req.tool_choice != "none" else None  # "none": the model is not told of them
            return self.preparer.prepare_chat(req.messages, req.params, tools, cache_salt=req.cache_salt,
                                              chat_template=req.chat_template,
                                              chat_template_kwargs=req.chat_template_kwargs,
                                              mm_processor_kwargs=req.mm_processor_kwargs)
        return self.preparer.prepare_raw(req.raw_prompt or "", req.params, cache_salt=req.cache_salt)

    async def start_request(self, req: GenerationRequest, prefix: str) -> tuple[str, RequestStream]:
        """Validate, fetch its http(s) media (on the event loop), prepare (in a worker thread) and
        submit; the request's id and stream."""
        if req.chat_template is not None and not self.cfg.trust_request_chat_template:
            raise APIError("'chat_template' in a request is refused: this server was not started with "
                           "--trust_request_chat_template (a request's template is code the server runs)",
                           param="chat_template", code="untrusted_chat_template")
        engine = self.ready_engine()
        assert self.llm is not None
        validate_params(req.params, self.llm.config.text.vocab_size)
        assert self.preparer is not None
        with engine.reserve():
            if req.messages is not None:  # http(s) media: fetched here, on the loop, holding no worker thread
                await self.fetcher.fetch_into(req.messages, self.preparer.preprocessor.limits.max_media_per_prompt)
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self.pool, self._prepare, req)
            request_id = f"{prefix}-{uuid.uuid4().hex}"
            stream = engine.submit(request_id, prepared)
        return request_id, stream

    @staticmethod
    async def _disconnected(request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def wait_output(self, request: Request, stream: RequestStream, final: bool) -> RequestOutput | None:
        """The request's first output (final=False: a stream then goes on from it) or its finished
        one (every sample ended); None (the request aborted) if the client goes away first. Raises
        the request's error, so that one failing before its first token (a medium that does not
        decode) is answered with its own status code, not inside a 200 stream."""
        async def wanted() -> RequestOutput:
            while True:
                out = await stream.next()
                if not final or out.finished:
                    return out

        result = asyncio.ensure_future(wanted())
        gone = asyncio.ensure_future(self._disconnected(request))
        got = False
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            got = result.done()
            return result.result() if got else None
        except RequestMediaError:
            raise
        except ValueError as e:  # the engine refused the request (a constraint that does not compile, ...): a 400
            raise APIError(str(e), code="invalid_value") from None
        finally:
            gone.cancel()
            result.cancel()
            if final or not got:  # a first output hands the stream on to the response
                stream.close()

    def logprob_entries(self, sample: CompletionOutput, start: int, end: int) -> list[ChatLogprobEntry]:
        """OpenAI-style logprob entries for a sample's output tokens start..end-1."""
        assert self.preparer is not None
        ids = sample.token_ids[start:end]
        tops = [t or [] for t in sample.top_logprobs[start:end]]
        all_ids = ids + [tid for top in tops for tid, _ in top]
        text_of = dict(zip(all_ids, self.preparer.decode_tokens(all_ids), strict=True))

        def token(tid: int, logprob: float) -> dict[str, Any]:  # TopLogprob's fields
            text, raw = text_of[tid]
            return {"token": text, "logprob": logprob, "bytes": list(raw)}

        return [ChatLogprobEntry(**token(tid, lp), top_logprobs=[TopLogprob(**token(t, v)) for t, v in top])
                for tid, lp, top in zip(ids, sample.token_logprobs[start:end], tops, strict=True)]

    # ---------------------------------------------------------------------------- chat, completions

    async def chat(self, request: Request, req: GenerationRequest) -> Response:
        return await self._openai_response(request, req, CHAT)

    async def completion(self, request: Request, req: GenerationRequest) -> Response:
        return await self._openai_response(request, req, COMPLETION)

    async def _openai_response(self, request: Request, req: GenerationRequest, api: OpenAIBodies) -> Response:
        model = self.check_model(req)
        constrain_tool_output(req)
        request_id, stream = await self.start_request(req, api.id_prefix)
        created = now()
        if req.stream:
            first = await self.wait_output(request, stream, final=False)
            if first is None:
                return Response(status_code=CLIENT_CLOSED)
            return DisconnectingStreamingResponse(
                self._openai_events(req, stream, first, request_id, created, model, api), stream.close,
                media_type=SSE, headers=SSE_HEADERS)
        out = await self.wait_output(request, stream, final=True)
        if out is None:
            return Response(status_code=CLIENT_CLOSED)
        choices = []
        for sample in out.outputs:
            content: str | None = sample.text
            calls: list[ResponseToolCall] = []
            finish = sample.finish_reason
            if api is CHAT and req.tool_choice != "none":
                parsed, calls = tool_calls_of(req, sample.text)
                if calls:  # else the whole text is the content
                    content = parsed
                finish = finish_reason_of(req, sample, bool(calls))
            logprobs = self.logprob_entries(sample, 0, len(sample.token_ids)) if req.logprobs else None
            choice = api.choice(sample.index, content, calls, logprobs, finish)
            if req.return_token_ids:
                choice.token_ids = sample.token_ids
            choices.append(choice)
        return JSONResponse(api.response(request_id, created, model, choices, usage_of(out)).wire())

    async def _openai_events(self, req: GenerationRequest, stream: RequestStream, first: RequestOutput,
                             request_id: str, created: int, model: str, api: OpenAIBodies) -> AsyncIterator[str]:
        """The SSE events of a streamed response: each chunk carries one choice (its index), as the
        request's n samples grow; the usage chunk after the last one finishes."""
        def chunk(choices: list[Any], usage: Usage | None = None) -> str:
            body = api.chunk(request_id, created, model, choices)
            if req.include_usage:  # every chunk has usage then: null but in the last one
                body.usage = usage
            return sse(body)

        choices = [ChoiceStream(req, api) for _ in range(req.params.n)]
        if api.opening is not None:
            for index in range(req.params.n):
                yield chunk([api.stream_choice(index, api.opening)])
        out = first
        try:
            while True:
                for sample in out.outputs:
                    for body in self._choice_chunks(req, api, choices[sample.index], sample):
                        yield chunk([body])
                if stream.finished:
                    if req.include_usage:
                        yield chunk([], usage_of(out))
                    break
                out = await stream.next()
        except (EngineError, EngineStopped, ValueError) as e:
            yield sse(error_body(e))
        yield "data: [DONE]\n\n"

    def _choice_chunks(self, req: GenerationRequest, api: OpenAIBodies, state: ChoiceStream,
                       sample: CompletionOutput) -> Iterator[Any]:
        """The stream choices to send for a newer output of one sample: its new text (the first
        piece carrying the new tokens' logprobs and ids), then its finish once it has ended."""
        if state.ended:
            return
        offset = len(state.text.sent)
        pieces = state.update(sample)
        new_tokens = len(sample.token_ids) > state.sent_tokens
        logprobs = self.logprob_entries(sample, state.sent_tokens, len(sample.token_ids)) \
            if req.logprobs and new_tokens else None
        token_ids = sample.token_ids[state.sent_tokens:] if req.return_token_ids and new_tokens else None
        state.sent_tokens = len(sample.token_ids)
        if (logprobs or token_ids) and not pieces:
            pieces = [DeltaMessage(content="")]
        for i, piece in enumerate(pieces):
            choice = api.stream_choice(sample.index, piece, logprobs if i == 0 else None, offset)
            if token_ids and i == 0:
                choice.token_ids = token_ids
            yield choice
        if sample.finished:
            state.ended = True
            yield api.stream_choice(sample.index, DeltaMessage(), finish_reason=state.finish_reason(sample))

    # ---------------------------------------------------------------------------- /generate

    async def generate(self, request: Request, req: GenerationRequest) -> Response:
        self.check_model(req)
        _, stream = await self.start_request(req, "gen")
        prefix = req.raw_prompt or ""  # vLLM's api_server returns prompt + output for text prompts
        out = await self.wait_output(request, stream, final=not req.stream)
        if out is None:
            return Response(status_code=CLIENT_CLOSED)
        if req.stream:
            return DisconnectingStreamingResponse(self._generate_events(req, stream, out, prefix), stream.close,
                                                  media_type=NDJSON)
        return JSONResponse(GenerateResponse(text=[prefix + sample.text for sample in out.outputs]).wire())

    async def _generate_events(self, req: GenerationRequest, stream: RequestStream, first: RequestOutput,
                               prefix: str) -> AsyncIterator[str]:
        texts = [TextDelta(req.params.stop) for _ in range(req.params.n)]
        out = first
        try:
            while True:
                # Each chunk carries the whole text so far of every sample (vLLM's /generate, which
                # lists the n texts); an output where no text grew (a token ending inside a UTF-8
                # character, held-back stop text) is not sent, unless it is the last.
                grew = [texts[sample.index].update(sample.text, sample.finished) for sample in out.outputs]
                if any(grew) or out.finished:
                    yield ndjson(GenerateResponse(text=[prefix + t.sent for t in texts]))
                if stream.finished:
                    break
                out = await stream.next()
        except (EngineError, EngineStopped, ValueError) as e:
            yield ndjson(error_body(e))


def ndjson(body: ResponseBody) -> str:
    """A chunk of a /generate stream carrying `body` (vLLM's: JSON, then a NUL)."""
    return wire_json(body) + "\0"


def error_body(e: BaseException) -> ErrorResponse:
    """The OpenAI error body for an exception raised while a request runs."""
    if isinstance(e, APIError):
        return e.response()
    if isinstance(e, RequestMediaError):
        return media_error(e).response()
    if isinstance(e, EngineStopped):
        return server_busy(str(e)).response()
    if isinstance(e, ValueError):
        return APIError(str(e)).response()
    return APIError(str(e), status=500, type="internal_error", code="engine_error").response()


def media_error(e: RequestMediaError) -> APIError:
    """A 400 naming the part whose medium the engine could not decode."""
    where = f"'{e.label}': " if e.label else ""
    return APIError(f"{where}{e}", param=e.label, code="invalid_media")


def create_app(cfg: ServeConfig, llm: LLM | None = None, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The FastAPI app. Loads the model at startup unless `llm` is given. on_fatal is called (from
    the engine thread) if the engine stops itself after steps that keep failing."""
    server = Server(cfg, llm, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    app = FastAPI(title="qwen-vl-triton", lifespan=lifespan, redoc_url=None)  # /docs: Swagger UI of /openapi.json
    app.state.server = server
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_request_bytes)  # inside the metrics: 413s counted
    app.add_middleware(HTTPMetricsMiddleware, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(EngineFull)
    @app.exception_handler(EngineStopped)
    async def busy(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(server_busy(str(e)).body(), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, e: EngineError) -> JSONResponse:
        return JSONResponse(error_body(e).wire(), status_code=500)

    @app.exception_handler(RequestMediaError)
    async def undecodable_media(_: Request, e: RequestMediaError) -> JSONResponse:
        return JSONResponse(media_error(e).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(e.detail), status=e.status_code, type=kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(APIError(f"internal error: {type(e).__name__}: {e}", status=500,
                                     type="internal_error").body(), status_code=500)

    # The handlers read the body themselves, so that it is parsed whatever its Content-Type (MindIE's
    # curl examples send none) and errors get OpenAI's body; openapi_extra documents what they accept,
    # and responses= what they answer (serving.responses: the models every body is built from).
    failures = (400, 413, 500, 503)

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": openapi_request_body(ChatCompletionRequest)},
              responses=openapi_responses(ChatCompletionResponse, "the chat completion",
                                          (SSE, ChatCompletionStreamResponse), failures))
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions: text, image and video parts; tools; streaming with SSE."""
        return await server.chat(request, parse_chat_request(parse_json_body(await request.body()),
                                                             server.sampling_defaults))

    @app.post("/v1/completions", openapi_extra={"requestBody": openapi_request_body(CompletionRequest)},
              responses=openapi_responses(CompletionResponse, "the completion", (SSE, CompletionStreamResponse),
                                          failures))
    async def completions(request: Request) -> Response:
        """OpenAI completions: a raw text prompt, no chat template."""
        return await server.completion(request, parse_completion_request(parse_json_body(await request.body()),
                                                                         server.sampling_defaults))

    @app.post("/generate", openapi_extra={"requestBody": openapi_request_body(GenerateRequest)},
              responses=openapi_responses(GenerateResponse, "the texts", (NDJSON, GenerateResponse), failures))
    async def generate(request: Request) -> Response:
        """vLLM's / MindIE's generate: a text prompt (answered as prompt + output) or a list of parts."""
        return await server.generate(request, parse_generate_request(parse_json_body(await request.body()),
                                                                     server.sampling_defaults))

    @app.get("/v1/models", responses=openapi_responses(ModelList, "the served model names"))
    async def models() -> JSONResponse:
        """The served model names (the first is the default)."""
        max_len = server.llm.max_seq_len if server.llm is not None else None
        data = [ModelCard(id=name, object="model", created=server.created, owned_by="qwen-vl-triton",
                          root=str(cfg.model_path), max_model_len=max_len) for name in server.names]
        return JSONResponse(ModelList(object="list", data=data).wire())

    health_responses = {200: openapi_json(HealthStatus, "ok"),
                        503: openapi_json(HealthStatus, "unavailable (/ready: with the reason)")}

    @app.get("/health", responses=health_responses)
    async def health() -> JSONResponse:
        """Liveness: the model is loaded and the engine thread runs."""
        if server.engine is None or not server.engine.is_healthy():
            return JSONResponse(HealthStatus(status="unavailable").wire(), status_code=503)
        return JSONResponse(HealthStatus(status="ok").wire())

    @app.get("/ready", responses=health_responses)
    async def ready() -> JSONResponse:
        """Readiness: healthy, and the engine's last step did not fail (503 with why otherwise)."""
        engine = server.engine
        if engine is None or not engine.is_ready():
            why = "not loaded" if engine is None else engine.fatal or (
                f"the last {engine.failed_steps} engine step(s) failed" if engine.failed_steps else "not running")
            return JSONResponse(HealthStatus(status="unavailable", reason=why).wire(), status_code=503)
        return JSONResponse(HealthStatus(status="ok").wire())

    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus metrics", "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app


def run_server(cfg: ServeConfig, llm: LLM | None = None, access_log: bool = False) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get `graceful_timeout` seconds to finish.
    If the engine stops itself (its steps keep failing), the server stops too and this raises
    SystemExit(1) with why."""
    import uvicorn

    fatal: list[str] = []

    def engine_stopped(why: str) -> None:  # engine thread: uvicorn polls should_exit
        fatal.append(why)
        uv.should_exit = True

    app = create_app(cfg, llm, engine_stopped)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine = app.state.server.engine
            if engine is not None:
                engine.stop_accepting()  # requests arriving on open connections now get 503
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=access_log,
                            timeout_graceful_shutdown=int(cfg.graceful_timeout), lifespan="on")
    started = time.perf_counter()
    uv = _Server(config)
    uv.run()
    log.info("server stopped after %.1f s", time.perf_counter() - started)
    if fatal:
        raise SystemExit(f"error: the server stopped because its engine did: {fatal[0]}")


def serve(cfg: ServeConfig, access_log: bool = False) -> None:
    """Serve on one process, or tensor-parallel (rank 0 serves, the others follow): under torchrun,
    or with --tensor_parallel_size N (worldSize) and no launcher, the engine's own N-1 workers."""
    from qwen_vl_triton.parallel import TPWorldError, destroy, end_process, init_from_env

    tp = init_from_env(cfg.engine.device)  # world size 1 unless launched by torchrun
    try:
        where = f"rank {tp.rank} of {tp.world_size}: " if tp.world_size > 1 else ""
        log.info("%sloading %s", where, cfg.model_path)
        try:
            llm = load_llm(cfg, tp)  # with no launcher and tensor_parallel_size N > 1, it starts the workers
        except (ValueError, TPWorldError) as e:  # a bad setting (a size torchrun's contradicts), a worker lost
            raise SystemExit(f"error: {e}") from None
        if tp.rank != 0:
            llm.worker_loop()  # follow rank 0's requests and steps until its engine stops
        else:
            try:
                run_server(cfg, llm, access_log)
            finally:
                # The engine thread releases the other ranks as it stops (the server's shutdown asks it
                # to and joins it); then this is a no-op. It acts if no engine thread ever ran (the
                # server failed to start), and if one outlived the join it waits for that thread's step
                # to end (LLM.shutdown and LLM.step share a lock): collectives never interleave. A rank
                # 0 that dies instead ends the others through their collectives' timeout.
                llm.shutdown()
    finally:
        destroy(tp)
    end_process(tp)  # tensor parallel: exit 0 here (parallel.group.end_process says why)
