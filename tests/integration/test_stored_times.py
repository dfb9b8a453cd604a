"""Times keep their instant in the database, whatever zone they were given in."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

from alembic import command
from sqlalchemy import insert, select, text

from services.shared import create_engine, migrate, tables
from services.shared._db import _alembic_config


async def test_a_time_in_another_zone_is_stored_and_compared_as_its_instant(
    database_url: str,
) -> None:
    """Written at +05:30, read back as the same instant in UTC; compared at -08:00."""
    await migrate(database_url)
    engine = create_engine(database_url)
    instant = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    india = instant.astimezone(timezone(timedelta(hours=5, minutes=30)))
    pacific = timezone(timedelta(hours=-8))
    users = tables.users
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(users).values(
                    id="usr_zone", email="z@example.com", name="z", created_at=india
                )
            )
        async with engine.connect() as conn:
            stored = (await conn.execute(select(users.c.created_at))).scalar_one()
            # 11:59 and 12:01 UTC, written in Pacific time (03:59 and 04:01 there).
            before = (instant - timedelta(minutes=1)).astimezone(pacific)
            after = (instant + timedelta(minutes=1)).astimezone(pacific)
            later = (
                await conn.execute(select(users.c.id).where(users.c.created_at > before))
            ).all()
            earlier = (
                await conn.execute(select(users.c.id).where(users.c.created_at < after))
            ).all()
    finally:
        await engine.dispose()
    assert stored == instant
    assert stored.utcoffset() == timedelta(0)
    assert len(later) == 1
    assert len(earlier) == 1


async def test_keys_already_off_when_0008_runs_count_as_switched_off_then(
    database_url: str,
) -> None:
    """Migration 0008 gives keys already inactive the time it ran as their switch-off
    (they leave the ended-keys list one access-token lifetime later); active keys get none."""
    await asyncio.to_thread(command.upgrade, _alembic_config(database_url), "0007")
    engine = create_engine(database_url)
    now = datetime.now(UTC)
    common = {
        "user_id": "usr_m",
        "description": "",
        "display_prefix": "hwk_x",
        "permissions": [],
        "created_at": now,
    }
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO users (id, email, name, created_at) "
                    "VALUES ('usr_m', 'm@example.com', 'm', :at)"
                ),
                {"at": now},
            )
            for token_id, active in (("tok_off", False), ("tok_on", True)):
                await conn.execute(
                    text(
                        "INSERT INTO tokens (id, user_id, name, description, secret_hash, "
                        "display_prefix, permissions, active, created_at) VALUES (:id, :user_id,"
                        " :id, :description, :id, :display_prefix, '[]', :active, :created_at)"
                    ),
                    {**common, "id": token_id, "active": active},
                )
        await migrate(database_url)
        async with engine.connect() as conn:
            found = await conn.execute(select(tables.tokens.c.id, tables.tokens.c.deactivated_at))
            rows: dict[str, datetime | None] = dict(found.all())
    finally:
        await engine.dispose()
    assert rows["tok_on"] is None
    assert abs(rows["tok_off"] - datetime.now(UTC)) < timedelta(minutes=1)
