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
    """`{"error", "detail", "field", "errors"}`: A1111's `error`/`detail` keys plus the field name."""
    body: dict[str, Any] = {"error": kind, "detail": detail, "field": field}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)
