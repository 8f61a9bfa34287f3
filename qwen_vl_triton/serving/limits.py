"""The request body limit: a pure-ASGI middleware that answers 413 without buffering the body.

A body whose Content-Length is over the limit is refused before the app runs (nothing is read).
A body sent without one (chunked) is counted as the app reads it: the read that passes the limit
raises inside the app, and the middleware answers 413 instead (every endpoint reads its whole body
before it answers, so nothing has been sent yet). The app buffers at most the limit, the
middleware nothing. The 413 is OpenAI-shaped (serving.protocol.APIError).

The connection is kept: the HTTP server reads the rest of the body and drops it as it arrives
(uvicorn, a bounded buffer), so every client sees the 413. Closing it instead, with the body's
rest unread, resets the connection, and a client that sends its whole body before it reads
(httpx, requests) gets the reset instead of the answer.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from qwen_vl_triton.serving.middleware import HTTPMiddleware
from qwen_vl_triton.serving.protocol import APIError


class _BodyTooLarge(Exception):
    """Raised from the app's receive() once the body read so far passes the limit."""

    def __init__(self, received: int):
        super().__init__(f"request body passed {received} bytes")
        self.received = received


def _content_length(scope: dict[str, Any]) -> int | None:
    """The declared body size; None without one (chunked), or for a malformed value (the HTTP
    server's to refuse)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimitMiddleware(HTTPMiddleware):
    """413 for request bodies over `max_bytes`: by Content-Length before the app runs, else by
    the running count of the body's chunks as the app reads them."""

    def __init__(self, app: Any, max_bytes: int):
        super().__init__(app)
        self.max_bytes = max_bytes

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"{declared} bytes")
            return
        received = 0

        async def counting_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(received)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge as e:
            await self._refuse(scope, receive, send, f"at least {e.received} bytes")

    async def _refuse(self, scope: Any, receive: Any, send: Any, size: str) -> None:
        error = APIError(f"request body of {size} is over the server's limit of {self.max_bytes} bytes "
                         "(--max_request_bytes); send large images and videos as paths under the server's "
                         "--allowed_media_dir", status=413, code="request_too_large")
        await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
