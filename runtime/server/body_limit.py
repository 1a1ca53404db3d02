"""Refuse request bodies over the size limit (413), or too slow to arrive (408), before any of them is parsed.

A txt2img body is a few kilobytes. The body is read here, never more than `limit` bytes of it and
for at most `timeout` seconds, and replayed to the app; a declared Content-Length over the limit is
refused without reading at all.
"""

from __future__ import annotations

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .responses import error_response


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope.get("headers", ()) if key == name), None)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then whatever the client sends (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int, timeout: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    def _too_large(self) -> JSONResponse:
        return error_response(
            413, "PayloadTooLarge", f"the request body is over the limit of {self.limit} bytes", "body"
        )

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and not length.isdigit():
            await error_response(400, "BadRequest", "Content-Length is not a number", "body")(scope, receive, send)
            return
        try:
            if length is not None and int(length) > self.limit:
                raise _TooLarge
            with anyio.fail_after(self.timeout):
                body = await self._read(receive)
        except TimeoutError:
            detail = f"the request body did not arrive within {self.timeout:g} s"
            await error_response(408, "RequestTimeout", detail, "body", headers={"Connection": "close"})(
                scope, receive, send
            )
            return
        except _TooLarge:
            await self._too_large()(scope, receive, send)
            return
        except _Disconnected:
            return  # nobody to answer
        await self.app(scope, _replay(body, receive), send)
