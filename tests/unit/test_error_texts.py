"""Errors as one line (in a log field, and in the line a failed start prints), and the
error the owner of a failed send hears."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaConnectionError, NodeNotReadyError, RequestTimedOutError
from sqlalchemy.exc import DBAPIError

from services.shared import SentUnacknowledged, error_text
from services.shared._db import _unusable
from services.shared._kafka import _outcomes


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


def test_an_error_that_names_itself_is_not_named_twice() -> None:
    lost = KafkaConnectionError("Connection at kafka:9092 closed")
    assert error_text(lost) == str(lost) == "KafkaConnectionError: Connection at kafka:9092 closed"


@pytest.mark.parametrize("maybe_written_first", [True, False])
async def test_a_batch_that_may_have_been_written_is_what_its_owner_hears(
    maybe_written_first: bool,
) -> None:
    """An owner whose records went in two batches, one refused before it was sent and one
    sent without an answer, hears of the second whatever their order: its change must not
    be undone as if nothing had been written."""
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[None] = loop.create_future()
    refused.set_exception(NodeNotReadyError("no connection"))
    unanswered: asyncio.Future[None] = loop.create_future()
    unanswered.set_exception(RequestTimedOutError())
    batches = [(unanswered, {0}), (refused, {0})]
    if not maybe_written_first:
        batches.reverse()
    failed = await _outcomes(batches)
    assert isinstance(failed[0], SentUnacknowledged)
    assert isinstance(failed[0].__cause__, RequestTimedOutError)
