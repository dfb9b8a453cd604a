"""Library log lines come out in the same JSON as ours, tracebacks and all."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import orjson
import pytest
import structlog

from services import cli
from services.shared import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def _lines(text: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def test_a_library_exception_is_one_json_line_with_its_traceback(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("json", "info", service="dispatcher")
    try:
        raise ValueError("broken frame")
    except ValueError:
        logging.getLogger("aiokafka.consumer").exception("fetch failed")
    logging.getLogger("aiokafka.conn").info("per-request chatter")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a deprecated call", DeprecationWarning, stacklevel=1)
    [failure, warned] = _lines(capsys.readouterr().err)
    assert failure["event"] == "fetch failed"
    assert failure["service"] == "dispatcher"
    assert failure["logger"] == "aiokafka.consumer"
    assert failure["level"] == "error"
    assert "Traceback" in str(failure["exception"])
    assert "ValueError: broken frame" in str(failure["exception"])
    assert "a deprecated call" in str(warned["event"])
    assert warned["service"] == "dispatcher"


def test_libraries_follow_a_level_above_warning(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("json", "error")
    logging.getLogger("aiohttp.client").warning("retrying")
    logging.getLogger("aiohttp.client").error("gave up")
    assert [line["event"] for line in _lines(capsys.readouterr().err)] == ["gave up"]


def test_every_line_names_its_service(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """Shared code logs without naming a service: the process's name is added; a line that
    names its own service keeps it."""
    configure_logging("json", "info", service="api")
    structlog.get_logger().warning("change_record_invalid")
    structlog.get_logger(service="dispatcher").info("own_name")
    lines = _lines(capsys.readouterr().err)
    assert [(line["event"], line["service"]) for line in lines] == [
        ("change_record_invalid", "api"),
        ("own_name", "dispatcher"),
    ]


def test_an_unforeseen_failure_of_a_command_is_one_json_line(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """Something no handler expected (a database error while loading, say) still ends the
    process with status 1 and one log line carrying the traceback."""
    configure_logging("json", "info", service="dispatcher")

    async def fails() -> None:
        raise RuntimeError("table could not be read")

    with pytest.raises(SystemExit) as exited:
        cli._run(fails())
    assert exited.value.code == 1
    captured = capsys.readouterr()
    [line] = _lines(captured.err)
    assert (line["event"], line["level"], line["service"]) == ("fatal", "error", "dispatcher")
    assert "RuntimeError: table could not be read" in str(line["exception"])
    assert captured.out == ""


def test_a_traceback_leaves_out_the_row_a_database_quoted(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """PostgreSQL's error text quotes the row it refused ("Failing row contains", "Key
    (...)=(...)"): a webhook's signing secrets, a key's hash. Logged with the traceback,
    they are left out; what failed is still said."""
    configure_logging("json", "info", service="api")
    secret = "whsec_c2VjcmV0LXRoYXQtbXVzdC1uZXZlci1iZS1sb2dnZWQ="
    refusals = [
        # A value with a line break spreads the quoted row over lines.
        'null value in column "team_id" violates not-null constraint\n'
        f'DETAIL:  Failing row contains (wh_1, first\nsecond, {{"Authorization": "Bearer '
        f'sk_live_1"}}, [{{"secret": "{secret}"}}]).\n[SQL: INSERT INTO webhooks]',
        'duplicate key value violates unique constraint "tokens_secret_hash_key"\n'
        "DETAIL:  Key (secret_hash)=(9f86d081884c7d659a2feaa0c55ad015) already exists.",
    ]
    for text in refusals:
        try:
            raise RuntimeError(text)
        except RuntimeError:
            structlog.get_logger().exception("unhandled_error")
    first, second = (str(line["exception"]) for line in _lines(capsys.readouterr().err))
    assert secret not in first
    assert "wh_1" not in first
    assert "sk_live_1" not in first
    assert "[SQL: INSERT INTO webhooks]" in first
    assert "violates not-null constraint" in first
    assert "9f86d081884c7d659a2feaa0c55ad015" not in second
    assert "Key (secret_hash)=" in second
