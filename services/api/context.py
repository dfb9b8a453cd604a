"""What every api handler needs, stored once on the application."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    ChangeNotifier,
    Metrics,
    Settings,
    Topics,
    ValidationFailed,
    presented_token,
    query_flag,
)

from .authn import Principal, TokenGate
from .outbox import Outbox
from .resend_budget import ResendBudget


@dataclass(frozen=True)
class ApiContext:
    settings: Settings
    engine: AsyncEngine
    gate: TokenGate
    outbox: Outbox
    topics: Topics
    changes: ChangeNotifier
    metrics: Metrics
    resends: ResendBudget

    async def authorize(self, request: web.Request, permission: str) -> Principal:
        token = presented_token(request, allow_query_keys=self.settings.allow_query_keys)
        return await self.gate.require(request, token, request.match_info["team"], permission)

    async def authorize_by_flag(
        self, request: web.Request, flag: str, when_set: str, otherwise: str
    ) -> tuple[Principal, bool]:
        """Authorize for ``when_set`` or ``otherwise`` by a yes/no query parameter; a bad
        value is refused only once the caller is known (no key answers 401, as without
        the parameter)."""
        try:
            value = query_flag(request, flag)
        except ValidationFailed:
            await self.authorize(request, otherwise)
            raise
        return await self.authorize(request, when_set if value else otherwise), value


CONTEXT = web.AppKey("api_context", ApiContext)
