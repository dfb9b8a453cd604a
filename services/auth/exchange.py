"""Trading a key for a one-hour access token (``POST /v1/token-exchange``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    DependencyUnavailable,
    NoFields,
    OpenApi,
    Settings,
    access_tokens,
    get_logger,
    json_response,
    new_id,
    parse_body,
)

from . import store
from .callers import Callers


class AccessTokensNotConfigured(DependencyUnavailable):
    code = "access_tokens_not_configured"

    def headers(self) -> dict[str, str]:
        return {}


@dataclass(frozen=True)
class ExchangeRoutes:
    settings: Settings
    engine: AsyncEngine
    callers: Callers
    private_key: Ed25519PrivateKey | None
    # Keys that signed before this one: published too, so that their access tokens verify
    # until they expire after a planned replacement.
    previous_keys: tuple[Ed25519PublicKey, ...] = ()

    def _key(self) -> Ed25519PrivateKey:
        if self.private_key is None:
            raise AccessTokensNotConfigured(
                "access tokens are not enabled: set HOOKWIRE_ACCESS_TOKEN_PRIVATE_KEY"
            )
        return self.private_key

    async def keys(self, _: web.Request) -> web.Response:
        return json_response(access_tokens.jwk_set(self._key().public_key(), *self.previous_keys))

    async def exchange(self, request: web.Request) -> web.Response:
        private_key = self._key()
        caller = await self.callers.identify(request, permission=None)
        # It takes no body: a field given (a lifetime, say) is refused, not ignored.
        await parse_body(request, NoFields, optional=True)
        async with self.engine.connect() as conn:
            teams = await store.memberships_of(conn, caller.user_id)
        issued_at = int(time.time())
        expires_at = issued_at + self.settings.access_token_ttl_seconds
        if caller.token.ends_at is not None:
            expires_at = min(expires_at, int(caller.token.ends_at.timestamp()))
        if caller.token.inactivity_timeout_seconds is not None:
            # The exchange is the key's last use the auth service sees (the api checks
            # access tokens itself): past the timeout from now the key has expired idle.
            expires_at = min(expires_at, issued_at + caller.token.inactivity_timeout_seconds)
        claims: dict[str, Any] = {
            "sub": caller.user_id,
            "tid": caller.token.id,
            "jti": new_id("at"),
            "perms": sorted(caller.token.permissions),
            "teams": teams,
            "iat": issued_at,
            "exp": expires_at,
        }
        if caller.token.allowed_cidrs:
            # A key limited to some networks must not become a token usable from anywhere.
            claims["cidrs"] = list(caller.token.allowed_cidrs)
        token = access_tokens.issue(
            private_key,
            claims,
        )
        get_logger("auth").info("access_token_issued", token_id=caller.token.id)
        return json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": expires_at - issued_at,
            }
        )

    def add_to(self, app: web.Application, spec: OpenApi) -> None:
        spec.route(
            app,
            "GET",
            "/v1/keys",
            self.keys,
            errors=(503,),
            auth="none",
            summary="Public keys (JWK set) that verify access tokens",
        )
        spec.route(
            app,
            "POST",
            "/v1/token-exchange",
            self.exchange,
            body=NoFields,
            body_required=False,
            errors=(401, 413, 422, 503),
            summary="Trade a key for a one-hour access token",
        )
