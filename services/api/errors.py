"""Errors of the api service."""

from __future__ import annotations

from services.shared import DependencyUnavailable, HookwireError


class AuthUnavailable(DependencyUnavailable):
    code = "auth_unavailable"


class PublishUnavailable(DependencyUnavailable):
    code = "publish_unavailable"


class PublishOutcomeUnknown(PublishUnavailable):
    """The event was sent but not acknowledged in time: it may be in the stream."""


class ReplayInterrupted(DependencyUnavailable):
    """A replay stopped part-way by the database: its details say how far it went."""

    code = "replay_interrupted"


class PreconditionFailed(HookwireError):
    """An If-Match naming a version the resource has left."""

    status = 412
    code = "precondition_failed"
