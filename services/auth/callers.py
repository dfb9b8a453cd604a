"""Who is calling the auth service's public routes, and what using a key leaves behind.

The routes check keys locally against the store. Every use, on these routes and through
introspection, counts as the key's last use (written once a second, not once a request);
a refused use of a revoked, rotated or expired key is audited, at most once a minute per
key and reason so that a client retrying in a loop cannot turn into a stream of writes.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    Actor,
    Forbidden,
    InvalidToken,
    access_tokens,
    presented_token,
    record_audit,
    utcnow,
)

from . import store
from .errors import MalformedToken
from .introspection import TokenState, decide
from .tokens import check_format, hash_token

REFUSALS_AUDITED = frozenset({"revoked", "expired", "rotated"})
REFUSAL_AUDIT_EVERY_SECONDS = 60.0
_REFUSALS_REMEMBERED = 10_000


def _networks_outside(wanted: Sequence[str], allowed: tuple[str, ...]) -> list[str]:
    """The wanted networks that no allowed network contains."""
    parents = [ipaddress.ip_network(cidr, strict=False) for cidr in allowed]
    outside = []
    for cidr in wanted:
        network = ipaddress.ip_network(cidr, strict=False)
        if not any(
            network.version == parent.version and network.subnet_of(parent)  # type: ignore[arg-type]
            for parent in parents
        ):
            outside.append(cidr)
    return outside


@dataclass(frozen=True)
class Caller:
    token: TokenState
    ip: str | None

    @property
    def user_id(self) -> str:
        return self.token.user_id

    @property
    def actor(self) -> Actor:
        return Actor(user_id=self.token.user_id, token_id=self.token.id, ip=self.ip)

    def require_all(self, wanted: set[str]) -> None:
        """A caller can only hand on permissions it holds itself."""
        beyond = sorted(wanted - self.token.permissions)
        if beyond:
            raise Forbidden(
                "a token cannot grant permissions it does not hold",
                details={"permissions": beyond},
            )

    def require_no_wider(
        self, expires_at: datetime | None, cidrs: Sequence[str] | None, verb: str = "create"
    ) -> None:
        """A key can only create (or rotate, or reactivate) a key that ends no later and
        reaches no further than it: otherwise a short-lived or network-fenced key could
        mint its own unfenced heir. An old secret in its grace ends when the grace does."""
        own_end = self.token.ends_at
        if own_end is not None and (expires_at is None or expires_at > own_end):
            raise Forbidden(
                f"a key cannot {verb} a key that outlives it",
                details={"expires_at": own_end.isoformat()},
            )
        own_networks = self.token.allowed_cidrs
        if own_networks:
            outside = _networks_outside(cidrs or ["0.0.0.0/0", "::/0"], own_networks)
            if outside:
                raise Forbidden(
                    f"a key cannot {verb} a key usable outside its own allowed_cidrs",
                    details={"allowed_cidrs": list(own_networks), "outside": outside},
                )


class KeyUsage:
    """Uses not yet written, and when each refusal was last audited."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pending: dict[str, tuple[datetime, str | None]] = {}
        # The uses the last flush wrote (or is writing): still what a check may take as a
        # key's latest use, for one that read the database before that write committed
        # judges by the stored use before them (a key in use looked idle). Replaced by
        # the next flush.
        self._flushing: dict[str, tuple[datetime, str | None]] = {}
        self._refusals_audited: dict[tuple[str, str], float] = {}

    def used(self, token_id: str, at: datetime, ip: str | None) -> None:
        self._pending[token_id] = (at, ip)

    def latest(self, token: TokenState) -> TokenState:
        """The token as of its latest use, including one not yet written."""
        pending = self._pending.get(token.id) or self._flushing.get(token.id)
        if pending is None or (token.last_used_at is not None and token.last_used_at >= pending[0]):
            return token
        return replace(token, last_used_at=pending[0])

    async def refused(self, token: TokenState, reason: str, ip: str | None) -> None:
        """A revoked or expired key still in use is worth an operator's attention."""
        if reason not in REFUSALS_AUDITED:
            return
        now = time.monotonic()
        key = (token.id, reason)
        last = self._refusals_audited.get(key)
        if last is not None and now - last < REFUSAL_AUDIT_EVERY_SECONDS:
            return
        if len(self._refusals_audited) >= _REFUSALS_REMEMBERED:
            self._refusals_audited.clear()
        self._refusals_audited[key] = now
        async with self._engine.begin() as conn:
            await record_audit(
                conn,
                Actor(token.user_id, token.id, ip),
                "token.refused",
                "token",
                token.id,
                details={"reason": reason},
            )

    async def flush(self) -> None:
        # One write per key per second instead of one per request.
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        self._flushing = pending
        try:
            async with self._engine.begin() as conn:
                await store.record_last_used(conn, pending)
        except BaseException:
            # Written at the next flush, a use made since winning: lost, a key in use could
            # end for inactivity (its inactivity timeout counts from its last use).
            for token_id, use in pending.items():
                self._pending.setdefault(token_id, use)
            self._flushing = {}
            raise


@dataclass(frozen=True)
class Callers:
    """Who presents which key to the auth service's own routes."""

    engine: AsyncEngine
    pepper: str
    usage: KeyUsage
    allow_query_keys: bool

    async def identify(self, request: web.Request, *, permission: str | None) -> Caller:
        token_text = presented_token(request, allow_query_keys=self.allow_query_keys)
        if access_tokens.looks_like_access_token(token_text):
            # What /v1/token-exchange hands out is for the api: told so, rather than
            # "does not start with hwk_", which reads as a corrupted key.
            raise InvalidToken(
                "the auth service's routes take an API key (hwk_…), not an access token: "
                "access tokens are for the api; send the key itself",
                details={"reason": "malformed"},
            )
        try:
            check_format(token_text)
        except MalformedToken as exc:
            # The reason every other refusal of a badly formed key gives (the api's,
            # introspection's); the message says what is wrong with it.
            raise InvalidToken(exc.message, details={"reason": "malformed"}) from exc
        async with self.engine.connect() as conn:
            token = await store.find_token(conn, hash_token(token_text, self.pepper))
        now = utcnow()
        if token is not None:
            token = self.usage.latest(token)
        answer = decide(token, team_id=None, role=None, client_ip=request.remote, now=now)
        if not answer["active"] or token is None:
            reason = str(answer["reason"])
            if token is not None:
                await self.usage.refused(token, reason, request.remote)
            raise InvalidToken(f"token is not valid: {reason}", details={"reason": reason})
        # Managing keys, exchanging one, reading the audit log: all are uses of the key,
        # which keep it from expiring for inactivity.
        self.usage.used(token.id, now, request.remote)
        if permission is not None and permission not in token.permissions:
            raise Forbidden(
                f"token lacks the {permission} permission", details={"permission": permission}
            )
        if permission == "token:manage" and token.presented_previous_secret:
            # The grace lets integrations move to the new secret; a leaked old one must not
            # revoke, deactivate or rotate the key under its owner, or make keys.
            raise Forbidden(
                "a secret replaced by a rotation cannot manage keys: use the new one",
                details={"reason": "rotated"},
            )
        return Caller(token=token, ip=request.remote)
