"""The auth service's cache of token lookups and team roles.

Entries live for a bounded time and are dropped on every change: at once for this
process's own writes, and through ``changes`` records for every other auth process.
Unknown hashes are cached too: a new token always has a new random hash, so a negative
entry can never hide a token created later.
"""

from __future__ import annotations

import time

from services.shared import Change

from .introspection import TokenState

_MISSING = object()


class TokenCache:
    def __init__(
        self, ttl_seconds: float, max_entries: int = 100_000, max_unknown: int = 10_000
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._max_unknown = max_unknown
        self._tokens: dict[str, tuple[float, TokenState]] = {}
        # Unknown hashes live apart, with their own bound: a flood of made-up keys can only
        # push out other unknown hashes, never the entries of real keys.
        self._unknown: dict[str, float] = {}
        self._hashes_by_token: dict[str, set[str]] = {}
        self._roles: dict[str, tuple[float, dict[str, str]]] = {}
        # Moves on every drop. A lookup notes it before reading the database and keeps
        # what it read only if it has not moved: a change applied while the read was on
        # its way may have found nothing to drop, and the read may predate it.
        self.generation = 0

    def token(self, secret_hash: str) -> TokenState | object | None:
        """The cached lookup, or ``MISSING`` when the database must be asked."""
        now = time.monotonic()
        entry = self._tokens.get(secret_hash)
        if entry is not None and entry[0] >= now:
            return entry[1]
        unknown_until = self._unknown.get(secret_hash)
        if unknown_until is not None and unknown_until >= now:
            return None
        return _MISSING

    def put_token(self, secret_hash: str, state: TokenState | None, read_at: int) -> None:
        """Keep a lookup made when the generation was ``read_at``, unless it has moved."""
        if self._ttl <= 0 or read_at != self.generation:
            return
        expires = time.monotonic() + self._ttl
        if state is None:
            if len(self._unknown) >= self._max_unknown:
                self._unknown.clear()
            self._unknown[secret_hash] = expires
            return
        if len(self._tokens) >= self._max:
            self._tokens.clear()
            self._hashes_by_token.clear()
        self._tokens[secret_hash] = (expires, state)
        self._hashes_by_token.setdefault(state.id, set()).add(secret_hash)

    def roles(self, user_id: str) -> dict[str, str] | None:
        entry = self._roles.get(user_id)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put_roles(self, user_id: str, roles: dict[str, str], read_at: int) -> None:
        if self._ttl > 0 and read_at == self.generation:
            self._roles[user_id] = (time.monotonic() + self._ttl, roles)

    def clear(self) -> None:
        self.generation += 1
        self._tokens.clear()
        self._hashes_by_token.clear()
        self._unknown.clear()
        self._roles.clear()

    def apply(self, change: Change) -> None:
        self.generation += 1
        if change.entity == "token":
            for secret_hash in self._hashes_by_token.pop(change.entity_id, set()):
                self._tokens.pop(secret_hash, None)
        elif change.entity == "membership":
            self._roles.clear()
        else:
            # Group edits change many tokens' permissions; users and teams are rare.
            self.clear()


MISSING = _MISSING
