"""The audit log every service writes to: who did what to which token or webhook."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from . import _schema as tables
from ._contracts import AuditNotice
from ._ids import new_id, utcnow


@dataclass(frozen=True)
class Actor:
    user_id: str | None
    token_id: str | None
    ip: str | None


async def record_audit(
    conn: AsyncConnection,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str,
    *,
    team_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditNotice:
    """Write one audit record in the caller's transaction, so it commits with the change;
    returns it as the notice its owner may be sent."""
    notice = AuditNotice(
        id=new_id("aud"),
        at=utcnow(),
        action=action,
        team_id=team_id,
        target_type=target_type,
        target_id=target_id,
        details=details,
    )
    await conn.execute(
        insert(tables.audit_log).values(
            id=notice.id,
            at=notice.at,
            actor_user_id=actor.user_id,
            actor_token_id=actor.token_id,
            action=action,
            target_type=target_type,
            target_id=target_id,
            team_id=team_id,
            ip=actor.ip,
            request_id=structlog.contextvars.get_contextvars().get("request_id"),
            details=details,
        )
    )
    return notice
