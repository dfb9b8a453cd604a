"""Errors every service shares, classified by behaviour rather than by message.

An error carries the HTTP status and the stable ``code`` clients switch on; the error
middleware turns any of them into the one JSON error shape.
"""

from __future__ import annotations

from typing import Any, ClassVar


def error_text(exc: BaseException) -> str:
    """An error as one log field: its kind and the first line of its message. Many say
    nothing of themselves (a ``TimeoutError`` is an empty string), and a driver's message
    goes on with the statement and its parameters."""
    message = str(exc)
    name = type(exc).__name__
    if not message.strip():
        return name
    first = message.splitlines()[0]
    # Some name themselves already (aiokafka's: "KafkaConnectionError: Connection at …").
    return first if first.startswith(name) else f"{name}: {first}"


class HookwireError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    retriable: ClassVar[bool] = False

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def headers(self) -> dict[str, str]:
        return {}

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class ConfigurationError(HookwireError):
    code = "configuration_error"


class DependencyUnavailable(HookwireError):
    """A broker, database or peer service did not answer; the caller may try again."""

    status = 503
    code = "unavailable"
    retriable = True

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class MigrationFailed(HookwireError):
    """The database answered, and a migration of it failed (a permission, a conflict)."""

    code = "migration_failed"


class RecordTooLarge(DependencyUnavailable):
    """A record larger than the producer's batches can hold."""


class ServiceFailed(HookwireError):
    """A background loop of a service ended on its own: the process stops with an error."""

    code = "service_failed"


class OutcomeUnknown(DependencyUnavailable):
    """A request was sent but its answer did not come in time: it may have taken effect."""

    code = "outcome_unknown"


class BadRequest(HookwireError):
    status = 400
    code = "bad_request"


class ClientClosedRequest(HookwireError):
    """The client went away before its request was read: 499, as proxies name it."""

    status = 499
    code = "client_closed_request"


class Unauthorized(HookwireError):
    status = 401
    code = "unauthorized"


class Forbidden(HookwireError):
    status = 403
    code = "forbidden"


class NotFound(HookwireError):
    status = 404
    code = "not_found"


class Conflict(HookwireError):
    status = 409
    code = "conflict"


class PayloadTooLarge(HookwireError):
    status = 413
    code = "payload_too_large"


class TooManyRequests(HookwireError):
    """A limit on how much a caller may ask for in a while; ``retry_after`` in seconds."""

    status = 429
    code = "rate_limited"
    retriable = True

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, details={"retry_after_seconds": retry_after})
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ValidationFailed(HookwireError):
    status = 422
    code = "validation_failed"

    @classmethod
    def for_field(cls, field: str, reason: str, *, part: str = "request body") -> ValidationFailed:
        """``part``: where the field was given (the request body, query parameters, the
        path, a header), for the message to send the caller to the right place."""
        return cls(f"invalid {part}: {field}", details=[{"field": field, "reason": reason}])


class InvalidRecord(HookwireError):
    """A Kafka record that does not match its contract; it goes to the dead-letter topic."""

    code = "invalid_record"
