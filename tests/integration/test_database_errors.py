"""A database error says what failed, never the values its statement carried: a webhook's
signing secrets travel as one (the JSON of its secrets), and the error of a failed write is
logged whole. A database that does not answer is a 503 the caller may retry."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import event, text
from sqlalchemy.exc import SQLAlchemyError

from services.shared import Metrics, build_app, create_engine

_SECRET = "whsec_c2VjcmV0LXRoYXQtbXVzdC1uZXZlci1iZS1sb2dnZWQ="


async def test_a_failed_statement_names_none_of_its_values(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with pytest.raises(SQLAlchemyError) as failed:
            async with engine.begin() as conn:
                await conn.execute(
                    text("UPDATE no_such_table SET secrets = :secrets"),
                    {"secrets": f'[{{"secret": "{_SECRET}"}}]'},
                )
    finally:
        await engine.dispose()
    assert _SECRET not in str(failed.value)
    assert "no_such_table" in str(failed.value), "it still says what failed"


async def _answer_of(
    route: Callable[[], Awaitable[None]],
) -> tuple[int, dict[str, Any], str | None]:
    """What the shared error middleware answers for a route that runs ``route``."""

    async def handler(_: web.Request) -> web.Response:
        await route()
        return web.json_response({})

    app = build_app("test", Metrics("test"))
    app.router.add_get("/work", handler)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/work")
        return response.status, await response.json(), response.headers.get("Retry-After")


def _reads(url: str) -> Callable[[], Awaitable[None]]:
    async def read() -> None:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        finally:
            await engine.dispose()

    return read


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_a_database_that_does_not_answer_is_a_503_the_caller_may_retry(
    dialect: str, tmp_path: Any
) -> None:
    """The documented 503 with Retry-After, not a 500 that says a fault of ours: clients
    that retry only 503s would otherwise give up during a database failover."""
    url = {
        # A directory where the file should be: SQLite cannot open it (OperationalError).
        "sqlite": f"sqlite+aiosqlite:///{tmp_path}",
        # Nothing listens on port 1: asyncpg raises the socket's own error, unwrapped.
        "postgresql": "postgresql+asyncpg://postgres@127.0.0.1:1/test",
    }[dialect]
    status, body, retry_after = await _answer_of(_reads(url))
    assert (status, retry_after) == (503, "1")
    assert body["error"] == {
        "code": "unavailable",
        "message": "the database is unavailable",
        "details": None,
    }


async def test_a_peer_that_refuses_the_connection_is_a_503_naming_no_database() -> None:
    async def dial() -> None:
        await asyncio.open_connection("127.0.0.1", 1)

    status, body, _ = await _answer_of(dial)
    assert status == 503
    assert body["error"]["message"] == "a service this request needs is unavailable"


async def test_a_statement_the_database_refuses_is_still_a_500(tmp_path: Any) -> None:
    """A broken constraint is a fault of ours, not an outage: no retry would help."""

    async def breaks_a_constraint() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
        try:
            async with engine.begin() as conn:
                await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
                await conn.execute(text("INSERT INTO t VALUES (1), (1)"))
        finally:
            await engine.dispose()

    status, body, _ = await _answer_of(breaks_a_constraint)
    assert (status, body["error"]["code"]) == (500, "internal_error")


async def test_a_statement_the_database_cannot_run_is_a_500_not_a_retry(tmp_path: Any) -> None:
    """SQLite names a missing table an OperationalError too: a fault of ours that a retry
    every second would only repeat."""

    async def reads_a_missing_table() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT * FROM no_such_table"))
        finally:
            await engine.dispose()

    status, body, retry_after = await _answer_of(reads_a_missing_table)
    assert (status, body["error"]["code"], retry_after) == (500, "internal_error", None)


async def test_a_commit_whose_answer_was_lost_is_a_500_not_a_retry(database_url: str) -> None:
    """The change may have taken effect: a 503 inviting a retry could make it twice. On
    PostgreSQL the session is really ended before its COMMIT; SQLite cannot lose a COMMIT's
    answer, so there the connection resets as the COMMIT is sent."""
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE commit_lost (id INTEGER)"))

    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "commit")
        def _reset(_: Any) -> None:
            raise ConnectionResetError("the connection reset as the COMMIT went")

    async def changes_and_commits() -> None:
        async with engine.connect() as conn:
            pid = (
                (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                if (engine.dialect.name == "postgresql")
                else None
            )
            await conn.execute(text("INSERT INTO commit_lost VALUES (1)"))
            if pid is not None:
                async with engine.connect() as other:
                    await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            await conn.commit()

    try:
        status, body, retry_after = await _answer_of(changes_and_commits)
    finally:
        await engine.dispose()
    assert (status, body["error"]["code"], retry_after) == (500, "internal_error", None)


async def test_a_commit_the_database_refused_is_a_503_the_caller_may_retry(
    database_url: str,
) -> None:
    """A COMMIT answered "could not serialize" (PostgreSQL rolled the transaction back)
    or "database is locked" (SQLite: nothing written) took no effect: a retry is safe,
    unlike a COMMIT whose answer was lost. On PostgreSQL a deferred trigger refuses the
    COMMIT itself; on SQLite the driver answers the COMMIT "locked"."""
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE commit_refused (id INTEGER)"))
        if engine.dialect.name == "postgresql":
            await conn.execute(
                text(
                    "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
                    " BEGIN RAISE EXCEPTION 'could not serialize' USING ERRCODE = '40001';"
                    " END $$"
                )
            )
            await conn.execute(
                text(
                    "CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON commit_refused"
                    " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit()"
                )
            )

    if engine.dialect.name == "sqlite":
        # Under WAL a COMMIT waits out readers; the driver's answer stands in for a
        # writer that held the lock past the busy timeout (what SQLite answers then).
        def _locked(_: Any) -> None:
            locked = sqlite3.OperationalError("database is locked")
            locked.sqlite_errorname = "SQLITE_BUSY"
            raise locked

        engine.dialect.do_commit = _locked  # type: ignore[method-assign]

    async def changes_and_commits() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO commit_refused VALUES (1)"))

    try:
        status, body, retry_after = await _answer_of(changes_and_commits)
    finally:
        await engine.dispose()
    assert (status, retry_after) == (503, "1")
    assert body["error"]["message"] == "the database is unavailable"
