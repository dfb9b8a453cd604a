"""The auth token cache: a flood of unknown keys cannot push out real ones, and a read
that a change overtook is not kept."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.auth import cache as cache_module
from services.auth.cache import MISSING, TokenCache
from services.auth.introspection import TokenState
from services.shared import Change

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
    cache.put_token("real", STATE, cache.generation)
    for n in range(1000):
        cache.put_token(f"made-up-{n}", None, cache.generation)
    assert cache.token("real") == STATE
    assert cache.token("made-up-999") is None
    assert cache.token("made-up-0") is MISSING


def test_unknown_and_known_entries_are_cached_and_expire() -> None:
    """Both kinds are answered from the cache; a zero TTL caches nothing."""
    cache = TokenCache(60)
    cache.put_token("real", STATE, cache.generation)
    cache.put_token("nope", None, cache.generation)
    assert cache.token("real") == STATE
    assert cache.token("nope") is None
    assert cache.token("other") is MISSING
    off = TokenCache(0)
    off.put_token("real", STATE, off.generation)
    assert off.token("real") is MISSING


def test_entries_expire_after_their_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answered from the cache until the TTL has passed, looked up again after."""
    now = [1000.0]
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: now[0])
    cache = TokenCache(60)
    cache.put_token("real", STATE, cache.generation)
    cache.put_token("nope", None, cache.generation)
    now[0] += 59.9
    assert cache.token("real") == STATE
    assert cache.token("nope") is None
    now[0] += 0.2
    assert cache.token("real") is MISSING
    assert cache.token("nope") is MISSING


def test_a_read_overtaken_by_a_change_is_not_kept() -> None:
    """A lookup that began before a change was applied may hold the old row: dropped."""
    cache = TokenCache(60)
    read_at = cache.generation
    cache.apply(
        Change(
            entity="token",
            entity_id="tok_1",
            action="updated",
            state="revoked",
            at=datetime(2026, 1, 1, tzinfo=UTC),
        )
    )
    cache.put_token("real", STATE, read_at)
    cache.put_roles("usr_1", {"team_1": "owner"}, read_at)
    assert cache.token("real") is MISSING
    assert cache.roles("usr_1") is None
    cache.put_token("real", STATE, cache.generation)
    assert cache.token("real") == STATE
