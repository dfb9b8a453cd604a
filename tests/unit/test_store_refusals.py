"""Which store errors mean "this record can never be stored" (set it aside, go on) and
which mean "try again" (the store away): the delivery log's writer must never retry a
record for ever, nor set aside records because the database blinked."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, OperationalError

from services.api.attempt_recorder import _refused_by_store


class _DriverError(Exception):
    """A driver's own error, carrying PostgreSQL's SQLSTATE as asyncpg's do."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


def test_a_data_exception_is_refused_whatever_the_driver_calls_it() -> None:
    # 22021: a character not in the column's repertoire (a NUL in text).
    error = DBAPIError("INSERT …", {}, _DriverError("22021"))
    assert _refused_by_store(error)


def test_the_store_away_is_tried_again() -> None:
    # 57P01: the server shut down; 08006: the connection failed.
    assert not _refused_by_store(OperationalError("INSERT …", {}, _DriverError("08006")))
    assert not _refused_by_store(DBAPIError("INSERT …", {}, _DriverError("57P01")))
