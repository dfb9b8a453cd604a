"""Bootstrap operations for operators who have no token yet (``hookwire admin …``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import PERMISSIONS, check_ready

from . import store


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
            await store.delete_token_named(conn, user_id, name)
        return await store.create_token(
            conn,
            pepper=pepper,
            user_id=user_id,
            name=name,
            permissions=permissions,
            expires_at=expires_at,
        )


async def bootstrap_dev(engine: AsyncEngine, pepper: str) -> dict[str, str]:
    """Idempotent: the same user and team every run, and a fresh all-permissions token."""
    user_id = await create_user(engine, "dev@hookwire.local", "Dev User")
    team_id = await create_team(engine, "dev")
    await add_member(engine, user_id, team_id, "owner")
    token_id, token = await create_token(
        engine,
        pepper=pepper,
        user_id=user_id,
        name="dev",
        permissions=sorted(PERMISSIONS),
        replace=True,
    )
    return {"user_id": user_id, "team_id": team_id, "token_id": token_id, "token": token}
