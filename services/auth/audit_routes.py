"""Reading the audit log: ``GET /v1/audit-log`` with ``audit-log:read``.

A caller sees its own user's actions, every record about its own keys (whoever acted: an
operator's command line too), and every record of the teams where its role grants
``audit-log:read`` (owners and admins).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    ROLES,
    OpenApi,
    Settings,
    UtcDatetime,
    as_utc,
    is_id,
    json_response,
    later_than_since,
    parse_query,
    tables,
)

from . import store
from .callers import Callers

_audit = tables.audit_log


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: UtcDatetime | None = None
    until: UtcDatetime | None = None
    actor: str | None = Field(default=None, max_length=64)
    action: str | None = Field(default=None, max_length=64)
    team_id: str | None = Field(default=None, max_length=64)
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = Field(default=None, max_length=64)

    _window = field_validator("until")(later_than_since)

    @field_validator("cursor")
    @classmethod
    def _an_audit_id(cls, value: str | None) -> str | None:
        # A made-up cursor would answer the first page again or an empty last one.
        if value is not None and not is_id(value, "aud"):
            raise ValueError("not a cursor this api returned")
        return value


def _view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": as_utc(row.at),
        "actor_user_id": row.actor_user_id,
        "actor_token_id": row.actor_token_id,
        "action": row.action,
        "target_type": row.target_type,
        "target_id": row.target_id,
        "team_id": row.team_id,
        "ip": row.ip,
        "request_id": row.request_id,
        "details": row.details,
    }


@dataclass(frozen=True)
class AuditRoutes:
    settings: Settings
    engine: AsyncEngine
    callers: Callers

    async def list(self, request: web.Request) -> web.Response:
        caller = await self.callers.identify(request, permission="audit-log:read")
        query = parse_query(request, AuditQuery)
        async with self.engine.connect() as conn:
            teams = await store.memberships_of(conn, caller.user_id)
            readable = [team for team, role in teams.items() if "audit-log:read" in ROLES[role]]
            # What an operator's ``hookwire admin`` did to a caller's keys has no user as
            # its actor: the keys' owner sees it through the keys themselves. Their ids are
            # read first, so each branch of the condition has an index of its own (a
            # subquery in it would have the log scanned whole for every page).
            own_keys = await store.token_ids_of(conn, caller.user_id)
            visible = or_(
                _audit.c.actor_user_id == caller.user_id,
                _audit.c.team_id.in_(readable),
                and_(_audit.c.target_id.in_(own_keys), _audit.c.target_type == "token"),
            )
            conditions = [visible]
            if query.since is not None:
                conditions.append(_audit.c.at >= as_utc(query.since))
            if query.until is not None:
                conditions.append(_audit.c.at < as_utc(query.until))
            if query.actor is not None:
                conditions.append(
                    or_(
                        _audit.c.actor_user_id == query.actor,
                        _audit.c.actor_token_id == query.actor,
                    )
                )
            if query.action is not None:
                conditions.append(_audit.c.action == query.action)
            if query.team_id is not None:
                conditions.append(_audit.c.team_id == query.team_id)
            if query.cursor is not None:
                # Ids are time-ordered, so the id alone is a stable cursor, newest first.
                conditions.append(_audit.c.id < query.cursor)
            rows = (
                await conn.execute(
                    select(_audit)
                    .where(and_(*conditions))
                    .order_by(_audit.c.id.desc())
                    .limit(query.limit + 1)
                )
            ).all()
        page = rows[: query.limit]
        next_cursor = page[-1].id if len(rows) > query.limit else None
        return json_response({"data": [_view(row) for row in page], "next_cursor": next_cursor})

    def add_to(self, app: web.Application, spec: OpenApi) -> None:
        spec.route(
            app,
            "GET",
            "/v1/audit-log",
            self.list,
            query=AuditQuery,
            permission="audit-log:read",
            summary="Audit records the caller may read, newest first",
        )
