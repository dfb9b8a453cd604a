"""Looking a row up among the live ones, then in the trash."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.shared import NotFound

T = TypeVar("T")


async def live_or_trashed(find: Callable[[bool], Awaitable[T]]) -> T:
    """The row ``find(False)`` finds among the live ones, else the one ``find(True)`` finds
    in the trash. A row in neither is plainly not found (the live lookup's 404): the caller
    asked nothing of the trash, and "not found in the trash" would say it had."""
    try:
        return await find(False)
    except NotFound as missing:
        try:
            return await find(True)
        except NotFound:
            raise missing from None
