"""What every api handler needs, stored once on the application."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import ChangeNotifier, Metrics, Settings, Topics, presented_token

from .authn import Principal, TokenGate
from .outbox import Outbox


@dataclass(frozen=True)
class ApiContext:
    settings: Settings
    engine: AsyncEngine
    gate: TokenGate
    outbox: Outbox
    topics: Topics
    changes: ChangeNotifier
    metrics: Metrics

    async def authorize(self, request: web.Request, permission: str) -> Principal:
        token = presented_token(request, allow_query_keys=self.settings.allow_query_keys)
        return await self.gate.require(request, token, request.match_info["team"], permission)


CONTEXT = web.AppKey("api_context", ApiContext)
