"""What the auth service's lists take in their query."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class NoFilters(BaseModel):
    """The query of a list with no filters: any parameter is refused (422 naming it), as
    the api's lists refuse one they do not know, rather than ignored: a filter the caller
    believes applied (``?active=false``) would otherwise answer every row."""

    model_config = ConfigDict(extra="forbid")
