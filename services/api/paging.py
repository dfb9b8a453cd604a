"""Cursor pagination parameters shared by every list route."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.shared import is_id

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


class IdPageQuery(PageQuery):
    """A list paged by id, whose cursor is the last id of the page before. A cursor that is
    not such an id is refused: one that sorts past every id would answer an empty last
    page, one that sorts before them would start again from the first."""

    id_prefix: ClassVar[str]

    @field_validator("cursor")
    @classmethod
    def _an_id(cls, value: str | None) -> str | None:
        if value is not None and not is_id(value, cls.id_prefix):
            raise ValueError("not a cursor this api returned")
        return value
