"""Errors as one line: in a log field, and in the line a failed start prints."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

from services.shared import error_text
from services.shared._db import _unusable


class _ServerRefusal(Exception):
    """What a driver raises for an answer of the server's: it carries a SQLSTATE."""

    sqlstate = "3D000"


def test_an_error_that_says_nothing_is_named_by_its_kind() -> None:
    assert error_text(TimeoutError()) == "TimeoutError"
    assert error_text(ValueError("   ")) == "ValueError"


def test_only_the_first_line_of_a_message_is_kept() -> None:
    assert error_text(RuntimeError("broke\n[SQL: SELECT secret]")) == "RuntimeError: broke"


def test_a_server_refusal_is_not_called_unreachable() -> None:
    refused = DBAPIError("connect", None, _ServerRefusal('database "hw" does not exist'))
    assert "sqlalche.me" in str(refused)
    assert _unusable("postgresql+asyncpg://db/hw", refused).message == (
        "database at postgresql+asyncpg://db/hw refused the connection:"
        ' database "hw" does not exist'
    )


def test_a_server_not_answering_is_unreachable() -> None:
    gone = ConnectionRefusedError(111, "Connect call failed")
    assert _unusable("postgresql+asyncpg://db/hw", gone).message == (
        "database at postgresql+asyncpg://db/hw is unreachable:"
        " ConnectionRefusedError: [Errno 111] Connect call failed"
    )
