"""The list of ended keys: exactly the keys whose access tokens may still be about, read
by range from the tokens table's indexes (every api process asks for it every few
seconds)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, text

from services.auth import store
from services.shared import create_engine, migrate, tables

_WINDOW_SECONDS = 3600


def _key(token_id: str, now: datetime, **values: object) -> dict[str, object]:
    return {
        "id": token_id,
        "user_id": "usr_e",
        "name": token_id,
        "description": "",
        "secret_hash": token_id,
        "display_prefix": "hwk_x",
        "permissions": [],
        "active": True,
        "created_at": now - timedelta(days=30),
        "expires_at": None,
        "revoked_at": None,
        "deactivated_at": None,
        **values,
    }


async def test_the_ended_keys_are_those_ended_within_an_access_tokens_lifetime(
    database_url: str,
) -> None:
    await migrate(database_url)
    engine = create_engine(database_url)
    now = datetime.now(UTC)
    recently, long_ago = now - timedelta(minutes=5), now - timedelta(hours=5)
    keys = [
        _key("tok_revoked_now", now, active=False, revoked_at=recently),
        _key("tok_revoked_then", now, active=False, revoked_at=long_ago),
        _key("tok_expired_now", now, expires_at=recently),
        _key("tok_expired_then", now, expires_at=long_ago),
        _key("tok_expires_later", now, expires_at=now + timedelta(days=1)),
        _key("tok_off_now", now, active=False, deactivated_at=recently),
        _key("tok_off_then", now, active=False, deactivated_at=long_ago),
        _key("tok_back_on", now, active=True, deactivated_at=recently),
        _key("tok_live", now),
    ]
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(tables.users).values(
                    id="usr_e", email="e@example.com", name="e", created_at=now
                )
            )
            await conn.execute(insert(tables.tokens), keys)
        async with engine.connect() as conn:
            ended = await store.ended_token_ids(conn, now, _WINDOW_SECONDS)
    finally:
        await engine.dispose()
    assert sorted(ended) == ["tok_expired_now", "tok_off_now", "tok_revoked_now"]


async def test_the_ended_keys_are_read_from_indexes_not_by_reading_every_key(
    database_url: str,
) -> None:
    await migrate(database_url)
    engine = create_engine(database_url)
    query = store.ended_tokens_query(datetime.now(UTC), _WINDOW_SECONDS)
    try:
        async with engine.connect() as conn:
            sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
            if engine.dialect.name == "sqlite":
                plan = (await conn.execute(text(f"EXPLAIN QUERY PLAN {sql}"))).all()
                steps = [str(row[-1]) for row in plan]
                assert not any(step.startswith("SCAN tokens") for step in steps), steps
                assert sum("USING INDEX ix_tokens_" in step for step in steps) == 3, steps
            else:
                # However small the table, a plan that can avoid reading it whole does.
                await conn.execute(text("SET enable_seqscan = off"))
                found = await conn.execute(text(f"EXPLAIN {sql}"))
                plan = "\n".join(str(row[0]) for row in found.all())
                assert "Seq Scan on tokens" not in plan, plan
    finally:
        await engine.dispose()
