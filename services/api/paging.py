"""Cursor pagination parameters shared by every list route."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_LIMIT = 500


class PageQuery(BaseModel):
    """A list route's query: a page size and where to resume; a parameter the route does
    not know is refused rather than silently ignored (a misspelt filter would otherwise
    return everything)."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(default=None, max_length=64)
