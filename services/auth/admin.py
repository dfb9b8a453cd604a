"""Bootstrap operations for operators who have no token yet (``hookwire admin …``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    PERMISSIONS,
    Actor,
    ChangeNotifier,
    DependencyUnavailable,
    Entity,
    Settings,
    check_ready,
    make_producer,
    record_audit,
    require_topics,
    start_client,
    stop_client,
    tables,
    topics_for,
    utcnow,
)

from . import store
from .errors import UnknownEntity
from .introspection import state_of

CLI_ACTOR = Actor(user_id=None, token_id=None, ip="cli")


async def create_user(engine: AsyncEngine, email: str, name: str) -> str:
    await check_ready(engine)
    async with engine.begin() as conn:
        return await store.get_or_create_user(conn, email, name)


async def create_team(engine: AsyncEngine, name: str) -> str:
    await check_ready(engine)
    async with engine.begin() as conn:
        return await store.get_or_create_team(conn, name)


async def add_member(engine: AsyncEngine, user_id: str, team_id: str, role: str) -> None:
    await check_ready(engine)
    async with engine.begin() as conn:
        await store.set_membership(conn, user_id, team_id, role)
        await record_audit(
            conn,
            CLI_ACTOR,
            "membership.set",
            "user",
            user_id,
            team_id=team_id,
            details={"role": role},
        )


async def create_token(
    engine: AsyncEngine,
    *,
    pepper: str,
    user_id: str,
    name: str,
    permissions: list[str],
    expires_at: datetime | None = None,
    replace: bool = False,
) -> tuple[str, str]:
    await check_ready(engine)
    async with engine.begin() as conn:
        if replace:
            # Revoked, not deleted: a client still holding the old secret is told it was
            # revoked (not that it never existed), and the audit log says when and why.
            for replaced in await store.live_token_ids_named(conn, user_id, name):
                revoked = {"revoked_at": utcnow()}
                if not await store.update_token(conn, replaced, revoked, unrevoked=True):
                    continue  # revoked meanwhile: that revocation is audited
                await record_audit(
                    conn,
                    CLI_ACTOR,
                    "token.revoked",
                    "token",
                    replaced,
                    details={"reason": "replaced by a new key of the same name"},
                )
        token_id, plaintext = await store.create_token(
            conn,
            pepper=pepper,
            user_id=user_id,
            name=name,
            permissions=permissions,
            expires_at=expires_at,
        )
        await record_audit(
            conn,
            CLI_ACTOR,
            "token.created",
            "token",
            token_id,
            details={"name": name, "permissions": sorted(set(permissions))},
        )
        return token_id, plaintext


async def bootstrap_dev(
    engine: AsyncEngine,
    pepper: str,
    *,
    email: str = "dev@hookwire.local",
    display_name: str = "Dev User",
    team: str = "dev",
    key_name: str = "dev",
) -> dict[str, str]:
    """Idempotent: the same user and team every run, owning the team, and a fresh
    all-permissions token (also what the tests and benchmarks run the system as)."""
    user_id = await create_user(engine, email, display_name)
    team_id = await create_team(engine, team)
    await add_member(engine, user_id, team_id, "owner")
    token_id, token = await create_token(
        engine,
        pepper=pepper,
        user_id=user_id,
        name=key_name,
        permissions=sorted(PERMISSIONS),
        replace=True,
    )
    return {"user_id": user_id, "team_id": team_id, "token_id": token_id, "token": token}


async def list_tokens(engine: AsyncEngine, user_id: str) -> list[dict[str, Any]]:
    await check_ready(engine)
    async with engine.connect() as conn:
        rows = await store.token_rows(conn, user_id)
        # No tokens, or no such user: a mistyped id must not read as "no tokens".
        if (
            not rows
            and (
                await conn.execute(select(tables.users.c.id).where(tables.users.c.id == user_id))
            ).first()
            is None
        ):
            raise UnknownEntity(f"user {user_id} not found")
    now = utcnow()
    return [
        {
            "id": row.id,
            "name": row.name,
            "display_prefix": row.display_prefix,
            "state": state_of(store.state_from_row(row), now),
            "permissions": len(set(row.permissions) | set(row.group_permissions or ())),
        }
        for row in rows
    ]


async def revoke_token(engine: AsyncEngine, token_id: str) -> str:
    """Revoke any user's token (the operator's escape hatch); returns the owner's id."""
    await check_ready(engine)
    async with engine.begin() as conn:
        owner = (
            await conn.execute(
                select(tables.tokens.c.user_id).where(tables.tokens.c.id == token_id)
            )
        ).scalar()
        if owner is None:
            raise UnknownEntity(f"token {token_id} not found")
        # Revoking again keeps the first revocation's time and audit record.
        if await store.update_token(conn, token_id, {"revoked_at": utcnow()}, unrevoked=True):
            await record_audit(conn, CLI_ACTOR, "token.revoked", "token", token_id)
    return str(owner)


async def notify(
    settings: Settings, entity: Entity, entity_id: str, state: str | None
) -> str | None:
    """Tell running services about a command-line change; why they could not be told, or
    None (their caches and the api's ended-keys list catch up on their own)."""
    if not settings.kafka_bootstrap:
        return "HOOKWIRE_KAFKA_BOOTSTRAP is not set"
    producer = make_producer(settings)
    topics = topics_for(settings)
    try:
        await start_client(producer, settings)
        # Before `hookwire topics`, a write would have the broker create the topic with
        # its own partition count, which `hookwire topics` then leaves as it is.
        await require_topics(producer, settings, [topics.changes])
        # A command has no caller waiting on it: it waits until the producer is done.
        notifier = ChangeNotifier(producer, topics, wait_seconds=None)
        told = await notifier.notify(entity, entity_id, "updated", state=state)
    except DependencyUnavailable as exc:
        return str(exc)
    finally:
        await stop_client(producer)
    return None if told else "the broker did not acknowledge the change record"
