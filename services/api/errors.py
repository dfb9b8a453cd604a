"""Errors of the api service."""

from __future__ import annotations

from services.shared import DependencyUnavailable, HookwireError

# A broker or a peer service that is down is seldom back within a second, unlike a busy
# database: a client told 1 s would ask again and again into the outage.
OUTAGE_RETRY_AFTER_SECONDS = 5


class AuthUnavailable(DependencyUnavailable):
    code = "auth_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(OUTAGE_RETRY_AFTER_SECONDS)}


class PublishUnavailable(DependencyUnavailable):
    code = "publish_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(OUTAGE_RETRY_AFTER_SECONDS)}


class PublishOutcomeUnknown(PublishUnavailable):
    """The event was sent but not acknowledged in time: it may be in the stream."""


class ReplayInterrupted(DependencyUnavailable):
    """A replay stopped part-way by the database: its details say how far it went."""

    code = "replay_interrupted"


class PreconditionFailed(HookwireError):
    """An If-Match naming a version the resource has left."""

    status = 412
    code = "precondition_failed"
