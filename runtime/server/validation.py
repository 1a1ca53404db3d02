"""Checks on a request body as JSON, before its fields are validated.

The answer echoes the request (`parameters`) and the images carry its text, so every string in it
must be encodable as UTF-8 and every value shallow enough to serialize: JSON allows a lone
surrogate ("\\ud800") and any nesting depth, and either one would only fail after the job ran.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError

MAX_DEPTH = 16  # A1111's script_args/override_settings values are flat or a few levels deep


def _bad_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_json_value(value: Any, field: str = "body", depth: int = 0) -> None:
    """Raise InvalidRequestError naming the first field with a lone surrogate or nested too deep.

    Iterates over one level per call and recurses at most MAX_DEPTH times, so it is safe on any
    value the JSON parser produced."""
    if depth > MAX_DEPTH:
        raise InvalidRequestError(field, f"is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        if _bad_text(value):
            raise InvalidRequestError(field, "contains a lone surrogate (\\ud800-\\udfff), which is not valid text")
    elif isinstance(value, dict):
        for key, item in value.items():
            name = key if field == "body" else f"{field}.{key}"
            if isinstance(key, str) and _bad_text(key):
                raise InvalidRequestError(field, "has a key with a lone surrogate, which is not valid text")
            check_json_value(item, name, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json_value(item, f"{field}.{index}", depth + 1)
