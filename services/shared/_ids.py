"""Prefixed, time-ordered identifiers: ``wh_01hx…`` tells a reader what it names."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime


def new_id(prefix: str) -> str:
    # 48 bits of milliseconds then 80 random bits: sortable by creation, collision-safe.
    millis = int(time.time() * 1000)
    return f"{prefix}_{millis:012x}{secrets.token_hex(10)}"


def utcnow() -> datetime:
    return datetime.now(UTC)
