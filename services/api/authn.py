"""Checking the token and permission of every request through the auth service."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from services.shared import Forbidden, NotFound, get_logger

from .errors import AuthUnavailable, InvalidToken, MissingToken, QueryKeyRefused


@dataclass(frozen=True)
class Principal:
    token_id: str
    user_id: str
    team_id: str
    permissions: frozenset[str]


def presented_token(request: web.Request, *, allow_query_keys: bool) -> str:
    """The token from ``Authorization: Bearer …`` / ``Key=…``, or the opt-in query key."""
    if "auth-key" in request.query:
        if not allow_query_keys:
            raise QueryKeyRefused(
                "tokens in the query string are refused because URLs get logged; "
                "send it as `Authorization: Bearer <token>`"
            )
        get_logger("api").warning("query_string_key_used", path=request.path)
        return request.query["auth-key"]
    header = request.headers.get("authorization", "").strip()
    if not header:
        raise MissingToken("send a token as `Authorization: Bearer <token>`")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    if header[:4].lower() == "key=":
        return header[4:].strip()
    raise InvalidToken("unsupported authorization scheme; use `Bearer <token>` or `Key=<token>`")


class TokenGate:
    """Introspects tokens with a short cache of positive answers per (token, team)."""

    def __init__(
        self, session: aiohttp.ClientSession, auth_url: str, credential: str, cache_ttl: float
    ) -> None:
        self._session = session
        self._url = f"{auth_url.rstrip('/')}/v1/introspect"
        self._headers = {"authorization": f"Bearer {credential}"}
        self._ttl = cache_ttl
        self._cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}

    async def _introspect(self, token: str, team_id: str, client_ip: str | None) -> dict[str, Any]:
        key = (hashlib.sha256(token.encode()).hexdigest(), team_id)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        payload = {"token": token, "team_id": team_id, "client_ip": client_ip}
        try:
            async with self._session.post(self._url, json=payload, headers=self._headers) as resp:
                if resp.status != 200:
                    raise AuthUnavailable(f"auth service answered {resp.status}")
                answer: dict[str, Any] = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AuthUnavailable(f"auth service is unreachable: {exc}") from exc
        if answer.get("active") and self._ttl > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now + self._ttl, answer)
        return answer

    async def require(
        self, request: web.Request, token: str, team_id: str, permission: str
    ) -> Principal:
        answer = await self._introspect(token, team_id, request.remote)
        if not answer.get("active"):
            reason = str(answer.get("reason", "unknown"))
            if reason == "not_member":
                # Existence of another team's resources is not revealed.
                raise NotFound(f"team {team_id} not found")
            raise InvalidToken(f"token is not valid: {reason}", details={"reason": reason})
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
