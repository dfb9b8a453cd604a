"""Times keep their instant in the database, whatever zone they were given in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import insert, select

from services.shared import create_engine, migrate, tables


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
