"""The auth token cache: a flood of unknown keys cannot push out real ones."""

from __future__ import annotations

from datetime import UTC, datetime

from services.auth.cache import MISSING, TokenCache
from services.auth.introspection import TokenState

STATE = TokenState(
    id="tok_1",
    user_id="usr_1",
    permissions=frozenset({"object:read"}),
    active=True,
    expires_at=None,
    revoked_at=None,
    last_used_at=None,
    created_at=datetime(2026, 1, 1, tzinfo=UTC),
    allowed_cidrs=None,
    inactivity_timeout_seconds=None,
)


def test_unknown_flood_keeps_real_entries() -> None:
    """Far more unknown hashes than the bound still leave a real key cached."""
    cache = TokenCache(60, max_entries=100, max_unknown=10)
    cache.put_token("real", STATE)
    for n in range(1000):
        cache.put_token(f"made-up-{n}", None)
    assert cache.token("real") == STATE
    assert cache.token("made-up-999") is None
    assert cache.token("made-up-0") is MISSING


def test_unknown_and_known_entries_are_cached_and_expire() -> None:
    """Both kinds are answered from the cache; a zero TTL caches nothing."""
    cache = TokenCache(60)
    cache.put_token("real", STATE)
    cache.put_token("nope", None)
    assert cache.token("real") == STATE
    assert cache.token("nope") is None
    assert cache.token("other") is MISSING
    off = TokenCache(0)
    off.put_token("real", STATE)
    assert off.token("real") is MISSING
