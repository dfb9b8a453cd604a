"""Database engine and migrations: SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import ColumnElement, Table, event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ._errors import ConfigurationError, DependencyUnavailable, MigrationFailed, error_text

_MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_NOT_AVAILABLE = "55P03"


def _describe(url: str) -> str:
    # Never echo a password into logs or error messages.
    return make_url(url).render_as_string(hide_password=True)


@functools.cache
def _warn_readable(path: str, mode: int) -> None:
    # Once a process, not once an engine: ``hookwire migrate`` opens the file twice (to
    # read the revision, then in Alembic's own engine) and said it twice.
    structlog.get_logger().warning(
        "database_file_readable_by_others", path=path, mode=f"{mode:04o}"
    )


def create_engine(url: str) -> AsyncEngine:
    # A failed statement's error (logged whole) leaves out the values it carried: among
    # them a webhook's signing secrets and hashes of keys.
    if url.startswith("sqlite"):
        # As SQLAlchemy reads it: "sqlite+aiosqlite://" names no file (a database in
        # memory), and neither does a "file:" URI.
        database = make_url(url).database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            # It holds webhooks' signing secrets and hashes of keys: this user's alone, as
            # the dev stack's secrets file is. Made before SQLite opens it, for SQLite gives
            # its -wal and -shm files the database's mode.
            path = Path(database)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                path.touch(mode=0o600, exist_ok=False)
            except FileExistsError:
                # An operator's own choice, or an older release's file: said, not changed.
                mode = path.stat().st_mode & 0o777
                if path.is_file() and mode & 0o044:
                    _warn_readable(str(path.resolve()), mode)
            except OSError as exc:
                # A directory this user may not write to: SQLite fails to open the file too,
                # and its error is handled where every connection's is (a clear message).
                structlog.get_logger().debug(
                    "database_file_not_created", path=str(path), error=error_text(exc)
                )
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL survives process crashes and never corrupts; only a power cut
            # can lose the last commits. PostgreSQL is the store for production durability.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    if url.startswith("postgresql"):
        return create_async_engine(
            url, pool_size=10, max_overflow=10, pool_pre_ping=True, hide_parameters=True
        )
    raise ConfigurationError(
        f"HOOKWIRE_DATABASE_URL must be a sqlite+aiosqlite:// or postgresql+asyncpg:// URL, "
        f"got {_describe(url)}"
    )


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["database_url"] = url
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    # Read once: the migrations a process expects are those of the code it runs. Files
    # replaced under it by the next release (an upgrade in place) must not make a running
    # process unready; and /readyz, asked every few seconds, reads no directory.
    return ScriptDirectory.from_config(_alembic_config(""))


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None
    return head


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def migrate(
    url: str, *, lock_timeout_seconds: float = 5.0, lock_wait_seconds: float = 300.0
) -> str:
    """Apply every pending migration (``hookwire migrate``); returns what was done.

    A database a newer release migrated (a rollback) is left as it is: this code runs on
    it (``_behind``), and refusing would keep every service that waits for the migration
    step down.

    On PostgreSQL a migration waits at most ``lock_timeout_seconds`` for a table's lock:
    queued behind a long transaction, its ``ALTER TABLE`` would hold up every query on
    that table meanwhile (an outage of the api). It gives way, and the upgrade is tried
    again, from the migration that gave way, for up to ``lock_wait_seconds`` in all."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            current = await connection.run_sync(_current_revision)
    except (SQLAlchemyError, OSError) as exc:
        raise _unusable(_describe(url), exc) from exc
    finally:
        await engine.dispose()
    head = head_revision()
    if current is not None and current != head and not _known(current):
        return (
            f"database is at migration {current}, which a newer release applied (this one's"
            f" newest is {head}): nothing to do"
        )
    config = _alembic_config(url)
    config.attributes["lock_timeout_ms"] = max(1, round(lock_timeout_seconds * 1000))
    give_up_at = time.monotonic() + lock_wait_seconds
    pause = 1.0
    while True:
        try:
            await asyncio.to_thread(command.upgrade, config, "head")
        except (SQLAlchemyError, OSError, CommandError) as exc:
            locked = _lock_not_available(exc)
            if locked and time.monotonic() + pause < give_up_at:
                structlog.get_logger().warning(
                    "migration_lock_busy", retry_in_seconds=pause, error=error_text(exc)
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)
                continue
            why = (
                "another transaction held a table's lock past the lock timeout"
                f" ({lock_timeout_seconds:g} s a try, tried for {lock_wait_seconds:g} s; find"
                " that transaction in pg_stat_activity, or migrate at a quieter moment): "
                if locked
                else ""
            )
            raise MigrationFailed(
                f"migrating the database at {_describe(url)} from {current or 'none'} failed:"
                f" {why}{exc}"
            ) from exc
        if current == head:
            return "database is up to date"
        return f"migrated the database from {current or 'none'} to {head}"


def _unusable(shown_url: str, exc: BaseException) -> DependencyUnavailable:
    # A server that answered with a refusal (no such database or role, a password
    # refused) is not "unreachable"; and SQLAlchemy's message ends in a line pointing at
    # its own docs, which would break the one line a failed start prints.
    sqlstate, _ = database_error_codes(exc)
    what = "refused the connection" if sqlstate is not None else "is unreachable"
    orig = getattr(exc, "orig", None)
    reason = str(orig).splitlines()[0] if orig is not None and str(orig) else error_text(exc)
    return DependencyUnavailable(f"database at {shown_url} {what}: {reason}")


def database_error_codes(exc: BaseException) -> tuple[str | None, str]:
    """The driver's own code for a database error: PostgreSQL's SQLSTATE (None from a
    driver that has none, as SQLite's), and SQLite's error name ("" when it gave none)."""
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    return (
        sqlstate if isinstance(sqlstate, str) else None,
        str(getattr(orig, "sqlite_errorname", "")),
    )


def _lock_not_available(exc: BaseException) -> bool:
    return database_error_codes(exc)[0] == _LOCK_NOT_AVAILABLE


def _known(revision: str) -> bool:
    try:
        _scripts().get_revision(revision)
    except CommandError:
        return False
    return True


async def check_ready(engine: AsyncEngine) -> None:
    """Refuse to serve on an unreachable or unmigrated database."""
    url = engine.url.render_as_string(hide_password=True)
    try:
        async with engine.connect() as connection:
            current = await connection.run_sync(_current_revision)
    except (SQLAlchemyError, OSError) as exc:
        raise _unusable(url, exc) from exc
    if _behind(current):
        raise ConfigurationError(
            f"database at {url} is at migration {current or 'none'}, expected"
            f" {head_revision()}: run `hookwire migrate`"
        )


def _behind(current: str | None) -> bool:
    """Whether the database still lacks a migration this code needs.

    A revision this code does not know is one a newer release applied: migrations only
    add (decision 43), so this code still works on it. Only a known revision before the
    head is behind. This lets an upgrade migrate first and roll out after, with the old
    processes ready throughout."""
    if current is None:
        return True
    return current != head_revision() and _known(current)


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """Every stored time is UTC: SQLite hands back naive datetimes, and stores the wall
    time of what it is given without the offset, so an aware time is converted first."""
    if value is None:
        return None
    if value.tzinfo is not None:
        return value.astimezone(UTC)
    return value.replace(tzinfo=UTC)


async def upsert(
    conn: AsyncConnection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    key: Sequence[str],
    update: Sequence[str],
    when: Callable[[Any], ColumnElement[bool]] | None = None,
    computed: Callable[[Any], dict[str, Any]] | None = None,
) -> None:
    """Insert rows, or update ``update`` columns of the rows already there.

    ``when`` receives the proposed row (``excluded``) and guards the update, so a stale
    record replayed after a newer one cannot overwrite it; ``computed`` returns columns
    whose new value is an expression over it. Rows must be unique by ``key``
    within one call (PostgreSQL refuses to update one row twice in a statement).
    """
    if not rows:
        return
    build = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = build(table)
    statement = statement.on_conflict_do_update(
        index_elements=list(key),
        set_={
            **{column: statement.excluded[column] for column in update},
            **(computed(statement.excluded) if computed is not None else {}),
        },
        where=when(statement.excluded) if when is not None else None,
    )
    await conn.execute(statement, list(rows))
