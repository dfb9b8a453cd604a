"""Conditional requests: ``If-Match`` against a resource's current ``ETag`` (RFC 9110)."""

from __future__ import annotations

from .errors import PreconditionFailed


def require_match(if_match: str | None, etag: str, resource: str) -> None:
    """Refuse a change made from a stale read: ``if_match`` is a list of entity tags, or
    ``*`` for any. Tags compare strongly, so a weak one (``W/"…"``) never matches; no
    header asks for no check."""
    tags = {tag.strip() for tag in if_match.split(",")} if if_match is not None else set()
    if if_match is None or tags & {etag, "*"}:
        return
    if all(tag.startswith("W/") for tag in tags):
        raise PreconditionFailed(
            "If-Match takes the ETag as given: a weak tag (W/...) never matches",
            details={"current_etag": etag},
        )
    raise PreconditionFailed(
        f"the {resource} changed since you read it", details={"current_etag": etag}
    )
