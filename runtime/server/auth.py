"""HTTP Basic auth in front of every endpoint (A1111's --api-auth), as ASGI middleware.

It runs before anything else, so an unauthenticated client learns nothing (not even the schema)
and its body is never read.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from .responses import error_response

REALM = "acertain-onnx"


def _credentials_from_header(value: bytes) -> tuple[bytes, bytes] | None:
    scheme, _, encoded = value.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


class BasicAuthMiddleware:
    def __init__(self, app: ASGIApp, credentials: dict[str, str]) -> None:
        self.app = app
        self.credentials = [(user.encode(), password.encode()) for user, password in credentials.items()]

    def _authorized(self, scope: Scope) -> bool:
        header = next((value for name, value in scope.get("headers", ()) if name == b"authorization"), None)
        given = _credentials_from_header(header) if header is not None else None
        if given is None:
            return False
        # compare_digest on both parts of every pair: the time taken says nothing about which part differed.
        matches = [
            secrets.compare_digest(given[0], user) & secrets.compare_digest(given[1], password)
            for user, password in self.credentials
        ]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "Unauthorized", "this server needs HTTP Basic auth (user:password from --api-auth)",
            headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
        )  # fmt: skip
        await response(scope, receive, send)
