"""The base of the server's pure-ASGI middlewares (metrics, the body limit): they act on HTTP
requests only and pass everything else (lifespan) through. Pure ASGI rather than Starlette's
BaseHTTPMiddleware, so streamed responses and request bodies pass untouched."""

from __future__ import annotations

from typing import Any


class HTTPMiddleware:
    """Calls `handle(scope, receive, send)` for HTTP requests; anything else goes straight to the app."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        raise NotImplementedError
