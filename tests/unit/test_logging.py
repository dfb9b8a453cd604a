"""Library log lines come out in the same JSON as ours, tracebacks and all."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import orjson
import pytest
import structlog
from aiohttp.http_exceptions import ContentEncodingError, LineTooLong

from services import cli
from services.shared import configure_logging
from services.shared._logging import RepeatedLines


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


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(
    msg: str, *args: object, name: str = "aiokafka.conn", level: int = logging.ERROR
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_librarys_repeats_are_dropped_and_counted_on_the_next_line() -> None:
    """Within the window only the first of a template goes through (whatever its
    arguments); the first after it says how many were dropped, and starts a new window."""
    clock = _Clock()
    repeats = RepeatedLines(window=10.0, clock=clock)
    template = "Unable connect to node with id %s: %s"
    first = _record(template, 111, "refused")
    assert repeats.filter(first)
    assert not hasattr(first, "repeated")
    for step in range(1, 6):
        clock.now = step * 1.9
        assert not repeats.filter(_record(template, 111 + step, "refused"))
    clock.now = 10.0
    after = _record(template, 111, "refused")
    assert repeats.filter(after)
    assert after.repeated == 5
    clock.now = 19.9
    assert not repeats.filter(_record(template, 111, "refused"))
    clock.now = 20.0
    next_window = _record(template, 111, "refused")
    assert repeats.filter(next_window)
    assert next_window.repeated == 1
    clock.now = 31.0
    quiet = _record(template, 111, "refused")
    assert repeats.filter(quiet)
    assert not hasattr(quiet, "repeated")


def test_templates_loggers_and_levels_are_counted_apart() -> None:
    clock = _Clock()
    repeats = RepeatedLines(window=10.0, clock=clock)
    assert repeats.filter(_record("Unable to update metadata from %s", 1))
    assert repeats.filter(_record("Failed fetch messages from %s: %s", 1, "x"))
    assert repeats.filter(_record("Unable to update metadata from %s", 1, level=logging.WARNING))
    assert repeats.filter(_record("Unable to update metadata from %s", 1, name="aiokafka"))
    assert not repeats.filter(_record("Unable to update metadata from %s", 2))
    assert not repeats.filter(_record("Failed fetch messages from %s: %s", 2, "y"))
    clock.now = 10.0
    counted = [_record("Unable to update metadata from %s", 3), _record("Failed fetch messages")]
    assert [repeats.filter(record) for record in counted] == [True, True]
    assert counted[0].repeated == 1
    assert not hasattr(counted[1], "repeated")


def test_other_loggers_are_left_alone() -> None:
    repeats = RepeatedLines(window=10.0, clock=_Clock())
    for name in ("aiohttp.client", "aiokafkaesque", "services.api", "root"):
        assert all(repeats.filter(_record("same line", name=name)) for _ in range(3))


def test_the_templates_remembered_are_capped() -> None:
    """Past the cap the template seen longest ago is forgotten (its next line goes
    through); a template repeating still is remembered."""
    clock = _Clock()
    repeats = RepeatedLines(window=10.0, capacity=3, clock=clock)
    for template in ("a", "b", "c"):
        assert repeats.filter(_record(template))
    assert not repeats.filter(_record("a"))  # "a" is now the last seen
    assert repeats.filter(_record("d"))  # forgets "b"
    assert repeats.filter(_record("b"))  # forgets "c"
    assert not repeats.filter(_record("a"))
    assert not repeats.filter(_record("d"))
    assert repeats.filter(_record("c"))
    for number in range(1000):
        repeats.filter(_record(f"template {number}"))
    assert len(repeats._seen) == 3


def test_a_repeat_count_is_a_field_of_the_json_line(
    capsys: pytest.CaptureFixture[str], restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configure_logging collapses aiokafka's repeats; the count is a field of its own."""
    configure_logging("json", "info", service="dispatcher")
    [repeats] = [
        found
        for handler in logging.getLogger().handlers
        for found in handler.filters
        if isinstance(found, RepeatedLines)
    ]
    clock = _Clock()
    monkeypatch.setattr(repeats, "_clock", clock)
    logger = logging.getLogger("aiokafka.cluster")
    for _ in range(4):
        logger.error("Unable to update metadata from %s", 111)
    clock.now = 10.0
    logger.error("Unable to update metadata from %s", 111)
    lines = _lines(capsys.readouterr().err)
    assert [(line["event"], line.get("repeated")) for line in lines] == [
        ("Unable to update metadata from 111", None),
        ("Unable to update metadata from 111", 3),
    ]
    assert lines[1]["logger"] == "aiokafka.cluster"


def test_a_request_the_http_parser_refuses_is_one_info_line_without_its_bytes(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """aiohttp logs a header over 8 KB or a body labelled gzip that is not at error
    level with a traceback, quoting the request's bytes: a client's fault, said at info,
    naming its kind only. A fault of ours from the same logger keeps its error and
    traceback."""
    configure_logging("json", "info", service="auth")
    server = logging.getLogger("aiohttp.server")
    for fault in (
        LineTooLong(b"Bearer hwk_secretsecret", 8190),
        ContentEncodingError("Can not decode content-encoding: gzip"),
    ):
        server.exception("Error handling request from %s", "10.1.2.3", exc_info=fault)
    try:
        raise RuntimeError("a bug of ours")
    except RuntimeError:
        server.exception("Unhandled exception")
    captured = capsys.readouterr().err
    too_long, not_gzip, bug = _lines(captured)
    for line, fault in ((too_long, "LineTooLong"), (not_gzip, "ContentEncodingError")):
        assert line["event"] == "client_request_unreadable"
        assert line["level"] == "info"
        assert line["fault"] == fault
        assert "exception" not in line
    assert "hwk_secret" not in captured
    assert bug["level"] == "error"
    assert "RuntimeError: a bug of ours" in str(bug["exception"])


def test_a_refused_request_is_not_told_at_warning(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """Told at info, it goes only where the service's info lines go."""
    configure_logging("json", "warning", service="auth")
    logging.getLogger("aiohttp.server").exception(
        "Error handling request from %s", "10.1.2.3", exc_info=LineTooLong(b"x", 8190)
    )
    assert _lines(capsys.readouterr().err) == []
