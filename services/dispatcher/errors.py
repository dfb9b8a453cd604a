"""Errors of the dispatcher."""

from __future__ import annotations

from services.shared import HookwireError, SetAside


class InvalidSecret(HookwireError):
    code = "invalid_secret"


class Unsigned(HookwireError):
    """No signing secret is in force: the delivery is not sent rather than sent unsigned."""

    code = "unsigned"


class Withdrawn(HookwireError):
    """A delivery taken back just before it was sent: its partition may be about to move,
    and its next owner sends it."""

    code = "withdrawn"


class Refused(HookwireError):
    """Some records were not taken; ``failed`` has their errors by index, ``set_aside``
    the records dead-lettered instead of theirs (taken)."""

    code = "refused"

    def __init__(self, failed: dict[int, BaseException], set_aside: list[SetAside]) -> None:
        first = next(iter(failed.values()))
        super().__init__(f"{len(failed)} records refused by the broker: {first}")
        self.failed = failed
        self.set_aside = set_aside


class WebhookUnconfirmed(HookwireError):
    """The database could not say whether a webhook the table lacks exists."""

    code = "webhook_unconfirmed"
