"""Checking the token and permission of every request through the auth service."""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.shared import (
    ACCESS_TOKEN_TTL_MAX,
    MAX_TEAM_ID_CHARS,
    MAX_TOKEN_CHARS,
    Forbidden,
    InvalidToken,
    Metrics,
    NotFound,
    access_tokens,
    effective_permissions,
    ip_in_ranges,
)

from .errors import AuthUnavailable

_KEYS_REFRESH_SECONDS = 5.0


async def _error_code(response: aiohttp.ClientResponse) -> str | None:
    """The ``code`` of a hookwire error answer, if it is one."""
    try:
        body = await response.json()
    except (aiohttp.ContentTypeError, ValueError):
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


_KEYS_MAX_AGE_SECONDS = 300.0
# How long a key a change record said ended stays refused whatever the ended-keys list
# says: far more than the clocks of two auth processes differ.
ENDED_SETTLE_SECONDS = 30.0


@dataclass(frozen=True)
class Principal:
    token_id: str
    user_id: str
    team_id: str
    permissions: frozenset[str]


class TokenGate:
    """Introspects tokens with a short cache of positive answers per (token, team)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth_url: str,
        credential: str,
        cache_ttl: float,
        metrics: Metrics,
    ) -> None:
        self._session = session
        self._url = f"{auth_url.rstrip('/')}/v1/introspect"
        self._headers = {"authorization": f"Bearer {credential}"}
        self._ttl = cache_ttl
        # By token, team and client address: auth's answer depends on all three (a key
        # limited to some networks is refused from the others).
        self._cache: dict[tuple[str, str, str | None], tuple[float, dict[str, Any]]] = {}
        self._keys_by_token: dict[str, set[tuple[str, str, str | None]]] = {}
        # Moves on every drop; an answer is cached only if no drop happened while it was
        # being fetched (a revocation applied meanwhile found nothing to drop).
        self._generation = 0
        self._keys_fetched_at = -_KEYS_REFRESH_SECONDS
        self._keys_url = f"{auth_url.rstrip('/')}/v1/keys"
        self._public_keys: dict[str, Ed25519PublicKey] = {}
        # Whether auth has answered with its key set (possibly empty) at least once: until
        # then every unknown key id asks again, rather than being refused for 5 s.
        self._keys_read = False
        self._revoked: dict[str, float] = {}
        self._ended_keys_url = f"{auth_url.rstrip('/')}/v1/ended-keys"
        # The auth service's whole list, refreshed periodically: what a lost change
        # record would otherwise leave out of ``_revoked``.
        self._ended: frozenset[str] = frozenset()
        self._verified: dict[str, access_tokens.AccessClaims] = {}
        self._hits = metrics.counter("auth_cache_hits_total", "Token checks answered from cache")
        self._misses = metrics.counter(
            "auth_cache_misses_total", "Token checks that called the auth service"
        )

    def note_token_state(self, token_id: str, state: str | None) -> None:
        """Access tokens of a key that is no longer active are refused from now on."""
        if state is None:
            return
        if state == "active":
            self._revoked.pop(token_id, None)
            self._ended = self._ended - {token_id}
        else:
            self._revoked[token_id] = time.monotonic()
        # An access token outlives its key's revocation by at most its own lifetime: the
        # longest one allowed, as auth may have issued it before its setting was lowered.
        horizon = time.monotonic() - ACCESS_TOKEN_TTL_MAX - 300
        for stale in [tid for tid, noted in self._revoked.items() if noted < horizon]:
            del self._revoked[stale]

    async def sync_ended_keys(self) -> None:
        """Take the auth service's list of ended keys; AuthUnavailable when it cannot be
        read (the previous list stays)."""
        asked_at = time.monotonic()
        try:
            async with self._session.get(self._ended_keys_url, headers=self._headers) as resp:
                if resp.status != 200:
                    raise AuthUnavailable(f"auth service answered {resp.status} for ended keys")
                document = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AuthUnavailable("auth service is unreachable") from exc
        try:
            self._ended = frozenset(str(token_id) for token_id in document["token_ids"])
        except (KeyError, TypeError) as exc:
            raise AuthUnavailable("auth service answered an unreadable ended-keys list") from exc
        # The list is the whole truth as of after the ask: a key a change record said
        # ended well before it, and which the list leaves out, was reactivated (and that
        # record lost): its access tokens were refused for a day. "Well before": an expiry
        # is listed once the answering auth process's clock has passed it, and its clock
        # may be behind the one that expired the key.
        settled = asked_at - ENDED_SETTLE_SECONDS
        for token_id in [
            t for t, noted in self._revoked.items() if noted < settled and t not in self._ended
        ]:
            del self._revoked[token_id]

    def forget_token(self, token_id: str) -> None:
        self._generation += 1
        for key in self._keys_by_token.pop(token_id, set()):
            self._cache.pop(key, None)

    def forget_all(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._keys_by_token.clear()

    def _is_ended(self, token_id: str) -> bool:
        return token_id in self._revoked or token_id in self._ended

    async def _introspect(self, token: str, team_id: str, client_ip: str | None) -> dict[str, Any]:
        key = (hashlib.sha256(token.encode()).hexdigest(), team_id, client_ip)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            self._hits.inc()
            return cached[1]
        self._misses.inc()
        asked_at = self._generation
        payload = {"token": token, "team_id": team_id, "client_ip": client_ip}
        try:
            async with self._session.post(self._url, json=payload, headers=self._headers) as resp:
                if resp.status != 200:
                    raise AuthUnavailable(f"auth service answered {resp.status}")
                answer: dict[str, Any] = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AuthUnavailable("auth service is unreachable") from exc
        if answer.get("active") and self._ttl > 0 and asked_at == self._generation:
            if len(self._cache) > 10_000:
                self.forget_all()
            self._cache[key] = (now + self._ttl, answer)
            self._keys_by_token.setdefault(str(answer["token_id"]), set()).add(key)
        return answer

    async def _public_key(self, kid: str | None) -> Ed25519PublicKey:
        # An unknown key id reads the set again, but at most every few seconds, so made-up
        # ids cannot turn every request into a call to auth.
        age = time.monotonic() - self._keys_fetched_at
        if kid not in self._public_keys and (age >= _KEYS_REFRESH_SECONDS or not self._keys_read):
            await self._fetch_keys()
        key = self._public_keys.get(str(kid))
        if key is None:
            raise InvalidToken(
                "access token is signed by an unknown key", details={"reason": "unknown_key"}
            )
        return key

    async def _fetch_keys(self) -> None:
        self._keys_fetched_at = time.monotonic()
        try:
            async with self._session.get(self._keys_url) as response:
                if response.status == 200:
                    document = await response.json()
                elif await _error_code(response) == "access_tokens_not_configured":
                    # No key signs access tokens: every one presented is signed by a key
                    # auth does not know (401), not a reason to try again later (503).
                    document = {"keys": []}
                else:
                    raise AuthUnavailable(f"auth service answered {response.status} for keys")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AuthUnavailable("auth service is unreachable") from exc
        keys = access_tokens.public_keys_from_jwk_set(document)
        if keys.keys() != self._public_keys.keys():
            # Tokens verified with a key no longer published are verified again.
            self._verified.clear()
        self._public_keys = keys
        self._keys_read = True

    async def _require_access_token(
        self, token: str, team_id: str, permission: str, client_ip: str | None
    ) -> Principal:
        """Verified locally: signature, expiry, the key's revocation and allowed networks,
        the team role."""
        if self._public_keys and time.monotonic() - self._keys_fetched_at >= _KEYS_MAX_AGE_SECONDS:
            # Read again every few minutes, so a key the operator retired (leaked) stops
            # verifying, cached verifications included. With auth away, the set in hand
            # serves until the next try.
            with contextlib.suppress(AuthUnavailable):
                await self._fetch_keys()
        claims = self._verified.get(token)
        if claims is None or claims.expires_at <= time.time():
            key = await self._public_key(access_tokens.unverified_key_id(token))
            claims = access_tokens.verify(key, token)
            if len(self._verified) > 10_000:
                self._verified.clear()
            # The signature never changes; the revocation check below runs on every use.
            self._verified[token] = claims
        if self._is_ended(claims.token_id):
            raise InvalidToken("token is not valid: revoked", details={"reason": "revoked"})
        if claims.allowed_cidrs and not ip_in_ranges(client_ip, claims.allowed_cidrs):
            raise InvalidToken(
                "token is not valid: ip_not_allowed", details={"reason": "ip_not_allowed"}
            )
        role = claims.teams.get(team_id)
        if role is None:
            raise NotFound(f"team {team_id} not found")
        permissions = effective_permissions(set(claims.permissions), role)
        if permission not in permissions:
            raise Forbidden(
                f"token lacks the {permission} permission in this team",
                details={"permission": permission},
            )
        return Principal(claims.token_id, claims.user_id, team_id, permissions)

    async def require(
        self, request: web.Request, token: str, team_id: str, permission: str
    ) -> Principal:
        if access_tokens.looks_like_access_token(token):
            return await self._require_access_token(token, team_id, permission, request.remote)
        if len(token) > MAX_TOKEN_CHARS:
            # Auth would refuse to read it (a 422), not say it is unknown.
            raise InvalidToken("token is not valid: malformed", details={"reason": "malformed"})
        # A team id longer than auth reads is no team; the key is still checked first
        # (a bad key is a 401 whatever the team), as the team "" no one belongs to.
        asked = team_id if len(team_id) <= MAX_TEAM_ID_CHARS else ""
        answer = await self._introspect(token, asked, request.remote)
        if not answer.get("active"):
            reason = str(answer.get("reason", "unknown"))
            if reason == "not_member":
                # Existence of another team's resources is not revealed.
                raise NotFound(f"team {team_id[:MAX_TEAM_ID_CHARS]} not found")
            raise InvalidToken(f"token is not valid: {reason}", details={"reason": reason})
        if self._is_ended(str(answer["token_id"])):
            # A cached answer from before the key ended (its change record is here now, or
            # auth's list of ended keys says so).
            raise InvalidToken("token is not valid: revoked", details={"reason": "revoked"})
        permissions = frozenset(answer.get("permissions", ()))
        if permission not in permissions:
            raise Forbidden(
                f"token lacks the {permission} permission in this team",
                details={"permission": permission},
            )
        return Principal(
            token_id=str(answer["token_id"]),
            user_id=str(answer["user_id"]),
            team_id=team_id,
            permissions=permissions,
        )
