"""The "no success for days" clock the delivery log's writer keeps for each webhook."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from services.api.delivery_log import failing_run
from services.shared import Attempt
from tests.samples import sample_event

EDITED = datetime(2026, 11, 1, tzinfo=UTC)
_EVENT = sample_event(occurred_at=EDITED)


def _attempt(hours: float, outcome: Literal["delivered", "failed", "skipped"]) -> Attempt:
    return Attempt(
        delivery_id="msg_1",
        event_id=_EVENT.id,
        webhook_id="wh_1",
        team_id="team_1",
        attempt=1,
        attempted_at=EDITED + timedelta(hours=hours),
        outcome=outcome,
        final=False,
        event=_EVENT,
    )


def test_the_run_starts_at_the_first_failure_and_keeps_its_start() -> None:
    since, latest = failing_run(None, EDITED, [_attempt(2, "failed"), _attempt(1, "failed")])
    assert since == EDITED + timedelta(hours=1), "attempts count in the order they were made"
    assert latest is not None
    assert latest.attempted_at == EDITED + timedelta(hours=2)
    # A later batch: the stored start stands.
    assert failing_run(since, EDITED, [_attempt(30, "failed")])[0] == since


def test_a_success_ends_the_run_and_a_later_failure_starts_another() -> None:
    started = EDITED + timedelta(hours=1)
    assert failing_run(started, EDITED, [_attempt(5, "delivered")]) == (None, None)
    since, _ = failing_run(started, EDITED, [_attempt(5, "delivered"), _attempt(6, "failed")])
    assert since == EDITED + timedelta(hours=6)


def test_a_success_older_than_the_run_does_not_end_it() -> None:
    started = EDITED + timedelta(hours=10)
    assert failing_run(started, EDITED, [_attempt(9, "delivered")])[0] == started


def test_failures_from_before_the_last_edit_start_no_run() -> None:
    """A reactivated webhook is not disabled for failures from before it was reactivated."""
    assert failing_run(None, EDITED, [_attempt(-1, "failed")]) == (None, None)
    assert failing_run(None, EDITED, [_attempt(-1, "failed"), _attempt(1, "skipped")])[0] is None
