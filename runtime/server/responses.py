"""The one shape every error answer has, so clients can show `detail` and act on `field`."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


def error_response(
    status: int,
    kind: str,
    detail: str,
    field: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """`{"error", "detail", "field", "errors"}`: A1111's `error`/`detail` keys plus the field name
    (null when no one field is at fault) and every problem found (empty unless validation failed).
    Always all four keys, as schemas.ErrorResponse declares them."""
    body: dict[str, Any] = {"error": kind, "detail": detail, "field": field, "errors": errors or []}
    return JSONResponse(body, status_code=status, headers=headers)
