"""Errors of the dispatcher."""

from __future__ import annotations

from services.shared import HookwireError


class InvalidSecret(HookwireError):
    code = "invalid_secret"


class Withdrawn(HookwireError):
    """A delivery taken back just before it was sent: its partition may be about to move,
    and its next owner sends it."""

    code = "withdrawn"


class WebhookUnconfirmed(HookwireError):
    """The database could not say whether a webhook the table lacks exists."""

    code = "webhook_unconfirmed"
