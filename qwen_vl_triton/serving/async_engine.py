"""The engine loop in its own thread, requests handed to it through a thread-safe queue.

`LLM` is not thread-safe, so exactly one thread (the "engine thread") ever calls it: it takes
commands (engine/commands.py: Add / Abort / Stop) from a `queue.SimpleQueue`, runs `LLM.step()` while there is work,
and hands each step's outputs to the asyncio event loop in one `call_soon_threadsafe` call. On
the event-loop side every request has a `RequestStream` holding its newest cumulative
`RequestOutput`: a slow reader simply skips to the newest output.

    engine = AsyncEngine(LLM(path, ...), max_waiting=1024)
    engine.start()                                   # inside the running event loop
    with engine.reserve():                           # 503 when the waiting queue is full
        request = preparer.prepare_chat(...)         # a PreparedRequest, made in a worker thread
        stream = engine.submit(request_id, request)
    try:
        while not (out := await stream.next()).finished: ...
    finally:
        stream.close()                               # aborts the request if it is unfinished

Under tensor parallelism this thread is rank 0's driver: each `step()` first broadcasts the
adds / aborts recorded since the last one, and `stop` calls `LLM.shutdown()` to release the
other ranks.

Prompts are tokenized and media prepared before they reach the engine thread (serving/prompting.py,
through the engine's Preprocessor): the engine thread only builds rope positions and queues the
sequence.

"Waiting" counts requests accepted but not running yet: being prepared, handed over, or in the
scheduler's waiting queue (preempted ones included). `max_waiting` bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from qwen_vl_triton.engine.commands import Abort, Add, Command, Stop
from qwen_vl_triton.engine.errors import StepFailed
from qwen_vl_triton.engine.llm import LLM, RequestOutput
from qwen_vl_triton.engine.preprocess import PreparedRequest
from qwen_vl_triton.parallel import TPWorldError
from qwen_vl_triton.serving.metrics import Metrics

log = logging.getLogger("serving.engine")

ENDED = -1  # AsyncEngine._seen_tokens' mark of a sample whose end was counted


class EngineFull(Exception):
    """The waiting queue is at max_waiting (HTTP 503)."""


class EngineStopped(Exception):
    """The engine is shutting down or has stopped (HTTP 503)."""


class EngineError(RuntimeError):
    """The engine failed while running the request (HTTP 500)."""


class RequestStream:
    """The event-loop side of one request. Outputs are cumulative (every sample's whole output so
    far: engine/outputs.py), so it keeps only the newest unread one: a slow reader skips ahead and
    memory stays one output per request."""

    def __init__(self, engine: AsyncEngine, request_id: str):
        self.engine = engine
        self.request_id = request_id
        self.finished = False  # its final output was read (every sample has ended), or its error raised
        self.complete = False  # event-loop thread: nothing more will be put (a final output, or an error)
        self._unread: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Event-loop thread: a newer output replaces the unread one; an error ends the request."""
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._unread = item
        self.complete = self._error is not None or item.finished
        self._ready.set()

    async def next(self) -> RequestOutput:
        """The newest output since the last read; raises the engine's error for this request."""
        while self._unread is None and self._error is None:
            await self._ready.wait()
            self._ready.clear()
        if self._error is not None:
            self.finished = True
            raise self._error
        item, self._unread = self._unread, None
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Abort the request in the engine unless it finished (idempotent)."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    """Runs an LLM in a background thread for an asyncio server."""

    def __init__(self, llm: LLM, *, max_waiting: int = 1024, metrics: Metrics | None = None,
                 max_failed_steps: int = 3, on_fatal: Callable[[str], None] | None = None):
        self.llm = llm
        # A step that fails ends the requests in it; this many failing in a row means the engine
        # itself is broken: it stops (on_fatal is told why: the server then exits non-zero).
        self.max_failed_steps = max_failed_steps
        self.failed_steps = 0                          # in a row; engine thread writes, anyone reads
        self.fatal: str | None = None
        self._on_fatal = on_fatal
        self.max_waiting = max_waiting
        self.metrics = metrics
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}   # event-loop thread only
        self._preparing = 0                            # event-loop thread only
        self._lock = threading.Lock()                  # guards the four counters below
        self._pending_adds = 0
        self._waiting = 0
        self._running = 0
        self._kv_used = 0
        self._seen_tokens: dict[tuple[str, int], int] = {}  # (request id, sample index): engine thread only
        self._accepting = False
        self._thread = threading.Thread(target=self._run, name="qvl-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = threading.Event()
        if metrics is not None:
            metrics.bind_gauges(lambda: self.num_running, lambda: self.num_waiting, lambda: self.kv_blocks_used,
                                lambda: self.llm.blocks.num_blocks)

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        """Start the engine thread; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not running: being prepared, handed over, or queued in the engine."""
        with self._lock:
            return self._preparing + self._pending_adds + self._waiting

    @property
    def num_running(self) -> int:
        """Requests the engine is running (as of its last step)."""
        with self._lock:
            return self._running

    @property
    def kv_blocks_used(self) -> int:
        """KV blocks held by sequences (as of the engine's last step)."""
        with self._lock:
            return self._kv_used

    def is_healthy(self) -> bool:
        """Accepting requests and the engine thread alive."""
        return self._accepting and self._thread.is_alive()

    def is_ready(self) -> bool:
        """Healthy, and its last step did not fail (a failing engine is not ready for more work)."""
        return self.is_healthy() and self.failed_steps == 0 and self.fatal is None

    def stop_accepting(self) -> None:
        """New requests get EngineStopped from now on (in-flight ones continue)."""
        self._accepting = False

    @contextlib.contextmanager
    def reserve(self) -> Iterator[None]:
        """Hold a waiting-queue place while a request is prepared; raises EngineFull / EngineStopped.
        `submit` inside the block takes the place over."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        if self.num_waiting >= self.max_waiting:
            raise EngineFull(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1

    def submit(self, request_id: str, request: PreparedRequest) -> RequestStream:
        """Queue a prepared request (inside `reserve()`); returns its stream."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        with self._lock:
            self._pending_adds += 1
        self._inbox.put(Add(request_id, request))
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (its stream gets nothing more)."""
        self._streams.pop(request_id, None)
        self._inbox.put(Abort(request_id))

    async def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever is left, stop the engine thread and wait for it."""
        self._accepting = False
        if self._thread.is_alive():
            self._inbox.put(Stop())
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.warning("the engine thread is still running %.0f s after the stop request", timeout)
        for stream in list(self._streams.values()):
            stream.put(EngineStopped("the server shut down before the request finished"))
        self._streams.clear()

    def _dispatch(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Event-loop thread: route outputs / errors to their streams."""
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            stream.put(item)
            if stream.complete:
                del self._streams[request_id]

    # ------------------------------------------------------------------ engine thread

    def _send(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        if not items or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._dispatch, items)

    def _publish_snapshot(self, adds_done: int = 0) -> None:
        llm = self.llm
        with self._lock:  # one consistent snapshot for /metrics: a scrape never mixes two steps
            self._pending_adds -= adds_done
            self._waiting = len(llm.scheduler.waiting)
            self._running = len(llm.scheduler.running)
            self._kv_used = llm.blocks.num_used_blocks()

    def _add(self, command: Add, replies: list[tuple[str, RequestOutput | BaseException]]) -> None:
        request_id = command.request_id
        try:
            self.llm.add_request(request_id, command.request)
        except ValueError as e:
            replies.append((request_id, e))
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the engine
            log.exception("adding request %s failed", request_id)
            replies.append((request_id, EngineError(f"the engine could not add the request: {e}")))
        else:
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(command.request.ids))

    def _abort(self, request_id: str, reason: str = "abort") -> None:
        if self.llm.abort(request_id) and self.metrics is not None:
            self.metrics.finished.labels(finish_reason=reason).inc()
        for key in [k for k in self._seen_tokens if k[0] == request_id]:
            del self._seen_tokens[key]

    def _abort_all(self, error: BaseException, reason: str) -> None:
        replies: list[tuple[str, RequestOutput | BaseException]] = []
        for request_id in list(self.llm.sequences):
            self._abort(request_id, reason)
            replies.append((request_id, error))
        self._send(replies)

    def _account(self, outputs: list[RequestOutput]) -> None:
        """Token counters and latency histograms for one step's outputs, each sample counted once."""
        new_tokens = 0
        for out in outputs:
            for sample in out.outputs:
                key = (out.request_id, sample.index)
                before = self._seen_tokens.get(key, 0)
                if before == ENDED:  # its end was counted; it stays in the request's outputs
                    continue
                n = len(sample.token_ids)
                new_tokens += n - before
                if self.metrics is not None and before == 0 and n > 0 and out.ttft_s is not None:
                    self.metrics.ttft.observe(out.ttft_s)
                self._seen_tokens[key] = ENDED if sample.finished else n
                if sample.finished and self.metrics is not None:
                    latency = sample.token_times[-1] if sample.token_times else out.latency_s
                    self.metrics.observe_finished(sample.finish_reason or "stop", out.ttft_s, latency, n)
            if out.finished:
                for sample in out.outputs:
                    self._seen_tokens.pop((out.request_id, sample.index), None)
        if self.metrics is not None and new_tokens:
            self.metrics.generation_tokens.inc(new_tokens)

    def _take_commands(self, block: bool) -> list[Command]:
        commands = []
        if block:
            try:
                commands.append(self._inbox.get(timeout=0.25))
            except queue.Empty:
                return []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _run(self) -> None:
        llm = self.llm
        stopping = False
        # Tensor parallel: ranks > 0 wait for rank 0's next step in a collective that times out, so an
        # idle rank 0 still steps (an empty step) every tp.heartbeat_s; infinite on one process.
        last_step = time.monotonic()
        while not stopping:
            try:
                commands = self._take_commands(block=not llm.has_unfinished())
                replies: list[tuple[str, RequestOutput | BaseException]] = []
                adds = 0
                for command in commands:
                    if isinstance(command, Add):
                        adds += 1
                        self._add(command, replies)
                    elif isinstance(command, Abort):
                        self._abort(command.request_id)
                    elif isinstance(command, Stop):
                        stopping = True
                self._send(replies)
                self._publish_snapshot(adds)
                if stopping:
                    break
                if llm.has_unfinished() or time.monotonic() - last_step > llm.tp.heartbeat_s:
                    last_step = time.monotonic()
                    steps = llm.stats.steps
                    try:
                        outputs = llm.step()
                        self.failed_steps = 0
                    except StepFailed as e:  # its requests have ended (500 each); the others go on
                        outputs = e.outputs
                        stopping = self._step_failed(e.cause)
                    self._account(outputs)
                    self._send([(o.request_id, _reply(o)) for o in outputs])
                    self._publish_snapshot()
                    if llm.stats.steps == steps:  # nothing could be scheduled: do not spin
                        time.sleep(0.001)
            except Exception as e:  # noqa: BLE001 - a bug here must not kill the thread silently
                stopping = self._step_failed(e)
                time.sleep(0.01)
        if self.fatal is not None:
            self._abort_all(EngineError(f"the engine stopped: {self.fatal}"), "error")
        self._abort_all(EngineStopped("the server shut down before the request finished"), "abort")
        self._publish_snapshot()
        try:
            self.llm.shutdown()  # tensor parallel: ends the other ranks' worker loops (else a no-op)
        except Exception:  # noqa: BLE001 - shutting down regardless
            log.exception("engine shutdown failed")
        self._stopped.set()
        if self.fatal is not None and self._on_fatal is not None:
            self._on_fatal(self.fatal)

    def _step_failed(self, error: BaseException) -> bool:
        """Count a failed step (or loop error); True when that makes max_failed_steps in a row, so
        that the engine stops rather than repeat a failure that is not the requests' fault, and at
        once for a tensor-parallel world that lost a worker (TPWorldError: it never recovers)."""
        self.failed_steps += 1
        log.error("engine step failed (%d in a row; the engine stops at %d): %s: %s", self.failed_steps,
                  self.max_failed_steps, type(error).__name__, error, exc_info=error)
        if self.failed_steps < self.max_failed_steps and not isinstance(error, TPWorldError):
            return False
        self.fatal = f"{self.failed_steps} engine steps in a row failed; the last: {type(error).__name__}: {error}"
        self._accepting = False
        log.critical("stopping the engine: %s", self.fatal)
        return True


def _reply(out: RequestOutput) -> RequestOutput | BaseException:
    """What a request's stream gets: its output, or why it ended early. A ValueError (a medium that
    does not decode: engine.errors.RequestMediaError) is the request's content, a 400; anything else
    is the engine's fault on this request, a 500 for it alone."""
    if out.error is None:
        return out
    if isinstance(out.error, ValueError):
        return out.error
    return EngineError(f"the engine failed on this request: {out.error}")
