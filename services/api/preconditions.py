"""Conditional requests: ``If-Match`` against a resource's current ``ETag`` (RFC 9110)."""

from __future__ import annotations

import re

from aiohttp import web

from services.shared import ValidationFailed

from .errors import PreconditionFailed

# An entity tag as RFC 9110 writes it: quoted, optionally marked weak.
_ENTITY_TAG = re.compile(r'(W/)?"[\x21\x23-\x7e\x80-\xff]*"')


def if_match(request: web.Request) -> str | None:
    """The request's ``If-Match``, its header lines joined as one list (RFC 9110 reads
    two lines as one list: the first line alone answered 412 for a tag on the second)."""
    lines = request.headers.getall("If-Match", ())
    return ", ".join(lines) if lines else None


def require_match(if_match: str | None, etag: str, resource: str) -> None:
    """Refuse a change made from a stale read: ``if_match`` is a list of entity tags, or
    ``*`` for any. Tags compare strongly, so a weak one (``W/"…"``) never matches; no
    header asks for no check. A value that is no list of tags is the client's mistake
    (422), not a change since its read (412)."""
    if if_match is None:
        return
    tags = {tag.strip() for tag in if_match.split(",")}
    if tags != {"*"} and not all(_ENTITY_TAG.fullmatch(tag) for tag in tags):
        raise ValidationFailed.for_field(
            "If-Match",
            'entity tags as the ETag gives them ("…"), comma-separated, or *',
            part="header",
        )
    if tags & {etag, "*"}:
        return
    if all(tag.startswith("W/") for tag in tags):
        raise PreconditionFailed(
            "If-Match takes the ETag as given: a weak tag (W/...) never matches",
            details={"current_etag": etag},
        )
    raise PreconditionFailed(
        f"the {resource} changed since you read it", details={"current_etag": etag}
    )
