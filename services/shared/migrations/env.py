"""Alembic environment: runs migrations over the async engine the services use."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from services.shared._db import create_engine


def _run(connection: Connection) -> None:
    # A transaction per migration: an upgrade over several releases does not hold the
    # locks of its first migrations while its last one builds an index, and a migration
    # can step outside a transaction (an index built concurrently).
    context.configure(connection=connection, render_as_batch=True, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    engine = create_engine(context.config.attributes["database_url"])
    try:
        async with engine.connect() as connection:
            lock_timeout_ms = context.config.attributes.get("lock_timeout_ms")
            if lock_timeout_ms and connection.dialect.name == "postgresql":
                # For the session, so each migration's transaction has it. Queued for a
                # table's lock behind a long transaction, an ALTER would hold up every
                # query on that table after it: it gives way instead, and is tried again.
                await connection.execute(text(f"SET lock_timeout = {int(lock_timeout_ms)}"))
                await connection.commit()
            await connection.run_sync(_run)
    finally:
        # A failed migration too: its connection would be left to the garbage collector.
        await engine.dispose()


asyncio.run(_main())
