"""Cursor pagination parameters shared by every list route."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_LIMIT = 500


class PageQuery(BaseModel):
    """A list route's query: a page size and where to resume; a parameter the route does
    not know is refused rather than silently ignored (a misspelt filter would otherwise
    return everything)."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(default=None, max_length=64)

    @field_validator("limit", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        # Plain digits only: the lax reading takes "+5", "5.0", "1_0" and " 5".
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise ValueError(f"an integer from 1 to {MAX_LIMIT}")
        return value
