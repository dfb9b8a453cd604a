"""Migrating: each migration commits on its own, and every one can be undone and redone."""

from __future__ import annotations

import asyncio

import pytest
from alembic import command
from sqlalchemy import text

from services.shared import create_engine, head_revision, migrate
from services.shared._db import _alembic_config
from services.shared._errors import MigrationFailed


async def _revision(database_url: str) -> str:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return str(
                (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
            )
    finally:
        await engine.dispose()


async def test_a_failed_migration_keeps_the_ones_before_it(database_url: str) -> None:
    """An upgrade over several migrations whose last fails (an index of that name already
    there) keeps the ones before it: each runs in its own transaction, so a long one does
    not hold the locks the earlier ones took, and one can build its index concurrently."""
    await asyncio.to_thread(command.upgrade, _alembic_config(database_url), "0008")
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE INDEX ix_deliveries_updated ON deliveries (id)"))
    finally:
        await engine.dispose()
    with pytest.raises(MigrationFailed, match="from 0008 failed"):
        await migrate(database_url)
    assert await _revision(database_url) == "0009"


async def test_every_migration_can_be_undone_and_redone(database_url: str) -> None:
    await migrate(database_url)
    await asyncio.to_thread(command.downgrade, _alembic_config(database_url), "base")
    assert await migrate(database_url) == "database is up to date"
    assert await _revision(database_url) == head_revision()
