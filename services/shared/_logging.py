"""structlog configured once: JSON lines in production, console output on a terminal."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError


def _render_json(_: Any, __: str, event_dict: structlog.types.EventDict) -> str:
    return orjson.dumps(event_dict, default=str).decode()


# What a database's error text may quote from the row it refused: PostgreSQL's "Failing
# row contains (...)" and "Key (...)=(...)" carry a webhook's signing secrets or a key's
# hash, and a traceback carries that text.
_SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]+")
# A quoted row runs over lines when a value holds a line break: cut up to what follows
# the database's own text, or the end.
_FAILING_ROW = re.compile(
    r"(Failing row contains ).*?(?=\n\[SQL|\n\(Background|\n\nThe above|\n\nDuring|\Z)",
    re.DOTALL,
)
_KEY_VALUE = re.compile(
    r"(Key \([^)]*\)=)\(.*?\)( already exists| is not present| is still referenced)", re.DOTALL
)


def scrubbed(text: str) -> str:
    """``text`` without what a database quoted from the row it refused."""
    text = _SECRET.sub("whsec_[redacted]", text)
    text = _FAILING_ROW.sub(r"\1(…).", text)
    return _KEY_VALUE.sub(r"\1(…)\2", text)


def _scrub_exception(
    _: Any, __: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    # Only lines with a traceback: the others, a delivery's among them, pay nothing.
    exception = event_dict.get("exception")
    if isinstance(exception, str):
        event_dict["exception"] = scrubbed(exception)
    return event_dict


def _tagged(service: str | None) -> structlog.types.Processor:
    def tag(_: Any, __: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
        if service is not None:
            event_dict.setdefault("service", service)
        return event_dict

    return tag


@dataclass
class _Seen:
    since: float
    suppressed: int = 0


class RepeatedLines(logging.Filter):
    """Lets the first of a library's repeated lines through, drops the repeats for
    ``window`` seconds, and marks the next one through with ``repeated``: how many were
    dropped. A line's template (``record.msg``, before its arguments), logger and level
    make a repeat.

    aiokafka logs each failed connection, metadata update and fetch at error level: with
    its broker gone, some 9,500 lines in the first 8 s, then hundreds a second."""

    def __init__(
        self,
        prefix: str = "aiokafka",
        window: float = 10.0,
        capacity: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._prefix = prefix
        self._window = window
        self._capacity = capacity
        self._clock = clock
        # In the order templates were last seen: the first is the one to forget first.
        self._seen: dict[tuple[str, int, str], _Seen] = {}
        # Libraries log from threads too (aiokafka's, the default executor's).
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name != self._prefix and not name.startswith(self._prefix + "."):
            return True
        suppressed = self._suppressed_before(name, record.levelno, str(record.msg))
        if suppressed is None:
            return False
        if suppressed:
            record.repeated = suppressed
        return True

    def _suppressed_before(self, name: str, level: int, template: str) -> int | None:
        """None to drop the line; else how many repeats were dropped before it."""
        key = (name, level, template)
        now = self._clock()
        with self._lock:
            seen = self._seen.pop(key, None)
            if seen is not None and now - seen.since < self._window:
                seen.suppressed += 1
                self._seen[key] = seen
                return None
            if len(self._seen) >= self._capacity:
                # A count forgotten with its entry is lost; the memory bound is not.
                del self._seen[next(iter(self._seen))]
            self._seen[key] = _Seen(since=now)
            return seen.suppressed if seen is not None else 0


class ClientFaults(logging.Filter):
    """aiohttp's server logs a request its parser refuses (a header over 8 KB, a body
    labelled gzip that is not) at error level with a traceback: the client's fault, not
    the service's, and a stream of them would page someone. It is told at info, as one
    line naming the kind of fault, and without the parser's message, which quotes the
    request's own bytes (an Authorization header among them)."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "aiohttp.server" or not record.exc_info:
            return True
        error = record.exc_info[1]
        if isinstance(error, HttpProcessingError) and 400 <= (error.code or 0) < 500:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "client_request_unreadable", None
            record.exc_info = record.exc_text = None
            record.fault = type(error).__name__
            # Accepted as an error; as info it goes only where the service's info lines go.
            return self._level <= logging.INFO
        return True


def configure_logging(
    log_format: str = "auto", level: str = "info", service: str | None = None
) -> None:
    """Every line of the process, ours and the libraries', in one format; ``service``
    names the process on every line that does not name its service itself (libraries',
    and the shared code's)."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        _render_json if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            # Shared code logs without naming a service: the process it runs in does.
            _tagged(service),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrub_exception,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Library loggers (aiokafka, aiohttp) go through the same JSON pipeline.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
                # The count of repeats RepeatedLines dropped before this line.
                structlog.stdlib.ExtraAdder(allow=("repeated", "fault")),
                _tagged(service),
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                # A library's traceback as text, not the repr of an exc_info tuple.
                structlog.processors.format_exc_info,
                _scrub_exception,
            ],
        )
    )
    handler.addFilter(RepeatedLines())
    handler.addFilter(ClientFaults(logging.getLevelNamesMapping()[level.upper()]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries speak from warning up (aiokafka's info and debug lines are per request),
    # or from the configured level when that is higher.
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]))
    # Python's warnings become log lines too, in the same format.
    logging.captureWarnings(True)


def get_logger(service: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(service=service)
    return logger
