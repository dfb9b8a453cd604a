"""Who is calling the auth service's public routes, checked locally against the store."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    Actor,
    Forbidden,
    InvalidToken,
    presented_token,
    record_audit,
    utcnow,
)

from . import store
from .errors import MalformedToken
from .introspection import TokenState, decide
from .tokens import check_format, hash_token

REFUSALS_AUDITED = frozenset({"revoked", "expired", "rotated"})


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


async def audit_refusal(
    engine: AsyncEngine, token: TokenState, reason: str, ip: str | None
) -> None:
    """A revoked or expired token still in use is worth an operator's attention."""
    async with engine.begin() as conn:
        await record_audit(
            conn,
            Actor(token.user_id, token.id, ip),
            "token.refused",
            "token",
            token.id,
            details={"reason": reason},
        )


async def authenticate(
    request: web.Request,
    engine: AsyncEngine,
    pepper: str,
    *,
    allow_query_keys: bool,
    permission: str | None,
) -> Caller:
    token_text = presented_token(request, allow_query_keys=allow_query_keys)
    try:
        check_format(token_text)
    except MalformedToken as exc:
        raise InvalidToken(exc.message, details=exc.details) from exc
    async with engine.connect() as conn:
        token = await store.find_token(conn, hash_token(token_text, pepper))
    answer = decide(token, team_id=None, role=None, client_ip=request.remote, now=utcnow())
    if not answer["active"] or token is None:
        reason = str(answer["reason"])
        if token is not None and reason in REFUSALS_AUDITED:
            await audit_refusal(engine, token, reason, request.remote)
        raise InvalidToken(f"token is not valid: {reason}", details={"reason": reason})
    if permission is not None and permission not in token.permissions:
        raise Forbidden(
            f"token lacks the {permission} permission", details={"permission": permission}
        )
    return Caller(token=token, ip=request.remote)
