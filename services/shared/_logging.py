"""structlog configured once: JSON lines in production, console output on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog


def _render_json(_: Any, __: str, event_dict: structlog.types.EventDict) -> str:
    return orjson.dumps(event_dict, default=str).decode()


def _tagged(service: str | None) -> structlog.types.Processor:
    def tag(_: Any, __: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
        if service is not None:
            event_dict.setdefault("service", service)
        return event_dict

    return tag


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
                _tagged(service),
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                # A library's traceback as text, not the repr of an exc_info tuple.
                structlog.processors.format_exc_info,
            ],
        )
    )
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
