"""The SQLite database holds webhooks' signing secrets and hashes of keys: its user's
alone, as the dev stack's secrets file is."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import structlog
from sqlalchemy import text

from services.shared import create_engine


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _write_through(database: Path) -> set[int]:
    """Writes a row; returns the modes of SQLite's -wal and -shm files, read while open
    (SQLite removes them on closing)."""
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
            await connection.execute(text("INSERT INTO t VALUES (1)"))
            return {_mode(database.with_name(database.name + end)) for end in ("-wal", "-shm")}
    finally:
        await engine.dispose()


async def test_a_new_database_and_its_directory_are_the_users_alone(tmp_path: Path) -> None:
    database = tmp_path / "data" / "hookwire.db"
    with structlog.testing.capture_logs() as logs:
        companions = await _write_through(database)
    assert _mode(database.parent) == 0o700
    assert _mode(database) == 0o600
    assert companions == {0o600}
    assert logs == []


async def test_an_existing_database_readable_by_others_is_said_and_left(tmp_path: Path) -> None:
    """An operator may have chosen the mode: a warning, not a change."""
    database = tmp_path / "hookwire.db"
    database.touch()
    database.chmod(0o644)
    with structlog.testing.capture_logs() as logs:
        await _write_through(database)
    assert _mode(database) == 0o644
    assert [(log["event"], log["log_level"], log["mode"]) for log in logs] == [
        ("database_file_readable_by_others", "warning", "0644")
    ]
    assert logs[0]["path"] == str(database)


async def test_a_database_readable_by_others_is_said_once_a_process(tmp_path: Path) -> None:
    """``hookwire migrate`` opens the file with two engines; the operator reads it once.
    A mode changed since is said again."""
    database = tmp_path / "hookwire.db"
    database.touch()
    database.chmod(0o644)
    with structlog.testing.capture_logs() as logs:
        await _write_through(database)
        await _write_through(database)
        database.chmod(0o640)
        await _write_through(database)
    assert [(log["event"], log["mode"]) for log in logs] == [
        ("database_file_readable_by_others", "0644"),
        ("database_file_readable_by_others", "0640"),
    ]


async def test_an_existing_private_database_is_not_warned_of(tmp_path: Path) -> None:
    database = tmp_path / "hookwire.db"
    database.touch()
    database.chmod(0o600)
    with structlog.testing.capture_logs() as logs:
        companions = await _write_through(database)
    assert _mode(database) == 0o600
    assert companions == {0o600}
    assert logs == []


async def test_a_database_in_memory_makes_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sqlite+aiosqlite://`` names no file: nothing is made under the working directory
    (a file named after the URL's scheme was)."""
    monkeypatch.chdir(tmp_path)
    for url in ("sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"):
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                assert (await connection.execute(text("SELECT 1"))).scalar() == 1
        finally:
            await engine.dispose()
    assert os.listdir(tmp_path) == []
