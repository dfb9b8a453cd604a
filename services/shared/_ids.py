"""Prefixed, time-ordered identifiers: ``wh_01hx…`` tells a reader what it names."""

from __future__ import annotations

import re
import secrets
import time
from datetime import UTC, datetime


def new_id(prefix: str) -> str:
    # 48 bits of milliseconds then 80 random bits: sortable by creation, collision-safe.
    millis = int(time.time() * 1000)
    return f"{prefix}_{millis:012x}{secrets.token_hex(10)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_id(value: str, prefix: str) -> bool:
    """Whether ``value`` has the shape of an id ``new_id(prefix)`` makes (a list's cursor
    must be one: a made-up one sorts before or after every real id)."""
    return re.fullmatch(rf"{re.escape(prefix)}_[0-9a-f]{{32}}", value) is not None
