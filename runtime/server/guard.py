"""The checks every request passes before anything else runs: who it is for, where it comes from,
what it carries, and whether the server has room for it.

- Host: DNS rebinding lets a web page reach a server on loopback under the page's own name, so a
  request is served only when its Host is this server's address, `localhost`, an IP literal (a
  rebinding attack always uses a name) or a name listed with --allowed-hosts ("*": any).
- Origin: browsers send it with every cross-site POST; a request whose Origin is not an allowed
  host (or is "null") is refused, so a page open on the box cannot interrupt or generate (CSRF).
- Content-Type: a POST body must be JSON. Browsers send text/plain, form and multipart bodies, or a
  body with no type at all, cross-site without asking: none of them is read.
- Room: at most `max_active_requests` requests run at once, not counting /health and /progress,
  which always answer. Generations are bounded by the job queue (429), not here.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from .config import Traffic
from .responses import error_response

ALWAYS_ANSWERED = ("/health", "/sdapi/v1/progress", "/internal/progress")  # never refused for lack of room
BUSY_RETRY_AFTER = "2"  # seconds: requests over the limit are short ones (they are not generations)
JSON_TYPES = ("application/json",)


def _header(scope: Scope, name: bytes) -> str | None:
    value = next((value for key, value in scope.get("headers", ()) if key == name), None)
    return value.decode("latin-1") if value is not None else None


def host_name(value: str) -> str:
    """ "example.com:7861" -> "example.com", "[::1]:7861" -> "::1"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in JSON_TYPES or media.endswith("+json")


class RequestGuardMiddleware:
    def __init__(self, app: ASGIApp, bound_host: str, traffic: Traffic) -> None:
        self.app = app
        self.any_host = "*" in traffic.allowed_hosts
        self.hosts = {"localhost", host_name(bound_host), *(host_name(name) for name in traffic.allowed_hosts)}
        self.max_active = traffic.max_active_requests
        self.active = 0

    def host_allowed(self, name: str) -> bool:
        return self.any_host or name in self.hosts or _is_ip(name)

    def _refusal(self, scope: Scope) -> tuple[int, str, str, str | None] | None:
        host = _header(scope, b"host")
        if host is not None and not self.host_allowed(host_name(host)):
            return 421, "MisdirectedRequest", f"this server does not answer for host {host_name(host)!r}", "Host"
        origin = _header(scope, b"origin")
        if origin is not None and not self.host_allowed(urlsplit(origin).hostname or ""):
            return 403, "CrossOriginRefused", f"requests from web pages at {origin!r} are refused", "Origin"
        if scope["method"] in ("POST", "PUT", "PATCH") and self._has_body(scope):
            content_type = _header(scope, b"content-type")
            if content_type is None or not _is_json(content_type):
                detail = f"the body must be JSON, sent with Content-Type: application/json (not {content_type!r})"
                return 415, "UnsupportedMediaType", detail, "body"
        return None

    @staticmethod
    def _has_body(scope: Scope) -> bool:
        length = _header(scope, b"content-length")
        return _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != "0")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, kind, detail, field = refusal
            await error_response(status, kind, detail, field)(scope, receive, send)
            return
        if scope["path"] in ALWAYS_ANSWERED:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_active:
            detail = f"the server is handling {self.active} requests; retry shortly"
            response = error_response(503, "Busy", detail, headers={"Retry-After": BUSY_RETRY_AFTER})
            await response(scope, receive, send)
            return
        self.active += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
