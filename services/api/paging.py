"""Cursor pagination parameters shared by every list route."""

from __future__ import annotations

from aiohttp import web

from services.shared import ValidationFailed

MAX_LIMIT = 500


def page_params(request: web.Request, default: int = 50) -> tuple[int, str | None]:
    raw = request.query.get("limit", str(default))
    # isdigit() also holds for "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise ValidationFailed(
            "invalid query parameters",
            details=[{"field": "limit", "reason": f"an integer from 1 to {MAX_LIMIT}"}],
        )
    cursor = request.query.get("cursor") or None
    if cursor is not None and len(cursor) > 64:
        raise ValidationFailed(
            "invalid query parameters", details=[{"field": "cursor", "reason": "too long"}]
        )
    return int(raw), cursor
