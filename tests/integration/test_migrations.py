"""Migrating: each migration commits on its own, and every one can be undone and redone."""

from __future__ import annotations

import asyncio

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from services.shared import create_engine, head_revision, migrate, tables
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
    """An upgrade over several migrations whose last fails (its table gone) keeps the ones
    before it: each runs in its own transaction, so a long one does not hold the locks the
    earlier ones took, and one can build its index concurrently."""
    await asyncio.to_thread(command.upgrade, _alembic_config(database_url), "0008")
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE delivery_attempts"))
            await conn.execute(text("DROP TABLE deliveries"))
    finally:
        await engine.dispose()
    with pytest.raises(MigrationFailed, match="from 0008 failed"):
        await migrate(database_url)
    assert await _revision(database_url) == "0009"


async def test_every_migration_can_be_undone_and_redone(database_url: str) -> None:
    await migrate(database_url)
    assert await migrate(database_url) == "database is up to date", "nothing left to do"
    await asyncio.to_thread(command.downgrade, _alembic_config(database_url), "base")
    assert await migrate(database_url) == f"migrated the database from none to {head_revision()}"
    assert await _revision(database_url) == head_revision()


async def test_an_index_migration_stopped_before_its_version_was_written_runs_again(
    database_url: str,
) -> None:
    """On PostgreSQL 0010 builds its index outside a transaction: stopped after the build
    and before the version was written, the next run finds the index and goes on (and so
    on SQLite, where that cannot happen, with a version set back by hand)."""
    await asyncio.to_thread(command.upgrade, _alembic_config(database_url), "0010")
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '0009'"))
    finally:
        await engine.dispose()
    assert await migrate(database_url) == f"migrated the database from 0009 to {head_revision()}"
    assert await _revision(database_url) == head_revision()


async def test_the_migrated_schema_is_the_one_the_code_declares(database_url: str) -> None:
    """Every table, column and index the services' metadata declares (and that they query
    by) is what the migrations built: none missing, none extra."""
    await migrate(database_url)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), tables.metadata)
            )
    finally:
        await engine.dispose()
    # Types are left out: the databases report theirs in their own words (SQLite's DATETIME
    # for a zoned timestamp).
    assert [d for d in differences if not _type_only(d)] == []


def _type_only(difference: object) -> bool:
    changes = difference if isinstance(difference, list) else [difference]
    return all(
        isinstance(c, tuple) and c[0] in ("modify_type", "modify_nullable", "modify_default")
        for c in changes
    )


async def test_a_migration_gives_way_to_a_long_transaction_and_tries_again(
    database_url: str,
) -> None:
    """0017's ALTER TABLE needs the delivery log's lock. Queued behind a long transaction
    on PostgreSQL it would hold up every query on the table after it: it waits only the
    lock timeout, tries again while the wait lasts, says why when it gives up, and goes
    through once the transaction ends. SQLite has no such queue: a reader does not stop it."""
    await asyncio.to_thread(command.upgrade, _alembic_config(database_url), "0016")
    engine = create_engine(database_url)
    try:
        async with engine.connect() as reader:
            await reader.execute(text("SELECT count(*) FROM delivery_attempts"))
            if engine.dialect.name != "postgresql":
                assert await migrate(database_url, lock_timeout_seconds=0.2) == (
                    f"migrated the database from 0016 to {head_revision()}"
                )
                return
            with pytest.raises(MigrationFailed, match="another transaction held a table's lock"):
                await migrate(database_url, lock_timeout_seconds=0.2, lock_wait_seconds=1.5)
            assert await _revision(database_url) == "0016"
            migrating = asyncio.create_task(
                migrate(database_url, lock_timeout_seconds=0.2, lock_wait_seconds=60)
            )
            await asyncio.sleep(1.5)
            assert not migrating.done()
            await reader.rollback()
            assert await asyncio.wait_for(migrating, 30) == (
                f"migrated the database from 0016 to {head_revision()}"
            )
    finally:
        await engine.dispose()
    assert await _revision(database_url) == head_revision()


async def test_a_concurrent_index_build_waits_out_the_lock_timeout(database_url: str) -> None:
    """On PostgreSQL a concurrent build (0016's) waits for every older transaction that
    wrote its table; cut short by the migration's lock timeout it would leave an invalid
    index, which the next try would keep. It waits, and builds a valid one."""
    await asyncio.to_thread(command.upgrade, _alembic_config(database_url), "0015")
    engine = create_engine(database_url)
    try:
        async with engine.connect() as writer:
            if engine.dialect.name == "postgresql":
                await writer.execute(text("DELETE FROM outbox"))
            migrating = asyncio.create_task(
                migrate(database_url, lock_timeout_seconds=0.2, lock_wait_seconds=0)
            )
            await asyncio.sleep(1.0)
            await writer.rollback()
            assert await asyncio.wait_for(migrating, 30) == (
                f"migrated the database from 0015 to {head_revision()}"
            )
        if engine.dialect.name == "postgresql":
            async with engine.connect() as conn:
                valid = (
                    await conn.execute(
                        text(
                            "SELECT indisvalid FROM pg_index"
                            " WHERE indexrelid = 'ix_outbox_key'::regclass"
                        )
                    )
                ).scalar_one()
            assert valid is True
    finally:
        await engine.dispose()
    assert await _revision(database_url) == head_revision()
