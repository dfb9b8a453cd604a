"""The "no success for days" clock the delivery log's writer keeps for each webhook."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Literal

from services.api.delivery_log import failing_run, retry_gap, run_gap
from services.dispatcher.policy import RetryPolicy
from services.shared import Attempt, load_settings
from tests.samples import sample_event

EDITED = datetime(2026, 11, 1, tzinfo=UTC)
GAP = timedelta(hours=12)
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
    since, last, latest = failing_run(
        None, None, EDITED, [_attempt(2, "failed"), _attempt(1, "failed")], GAP
    )
    assert since == EDITED + timedelta(hours=1), "attempts count in the order they were made"
    assert latest is not None
    assert latest.attempted_at == last == EDITED + timedelta(hours=2)
    # A later batch: the stored start stands.
    assert failing_run(since, last, EDITED, [_attempt(12, "failed")], GAP)[0] == since


def test_a_put_off_ended_by_its_refused_retry_fails_no_run() -> None:
    """Its endpoint was not asked: the delivery failed, the endpoint did not."""
    ended = _attempt(1, "failed").model_copy(update={"error_class": "retry_refused"})
    assert failing_run(None, None, EDITED, [ended], GAP) == (None,) * 3
    assert failing_run(None, None, EDITED, [_attempt(1, "failed")], GAP)[0] is not None


def test_a_success_ends_the_run_and_a_later_failure_starts_another() -> None:
    started = EDITED + timedelta(hours=1)
    assert failing_run(started, started, EDITED, [_attempt(5, "delivered")], GAP) == (None,) * 3
    since, last, _ = failing_run(
        started, started, EDITED, [_attempt(5, "delivered"), _attempt(6, "failed")], GAP
    )
    assert since == last == EDITED + timedelta(hours=6)


def test_a_success_older_than_the_run_does_not_end_it() -> None:
    started = EDITED + timedelta(hours=10)
    assert failing_run(started, started, EDITED, [_attempt(9, "delivered")], GAP)[0] == started


def test_failures_from_before_the_last_edit_start_no_run() -> None:
    """A reactivated webhook is not disabled for failures from before it was reactivated."""
    assert failing_run(None, None, EDITED, [_attempt(-1, "failed")], GAP) == (None,) * 3
    skipped = [_attempt(-1, "failed"), _attempt(1, "skipped")]
    assert failing_run(None, None, EDITED, skipped, GAP)[0] is None


def test_a_failure_more_than_the_gap_after_the_last_starts_a_new_run() -> None:
    """A quiet webhook whose one delivery failed through its retries on day 0 is not
    disabled on day 6 by a new event's first failure: nothing failed in between."""
    day_0 = EDITED + timedelta(hours=1)
    since, last, latest = failing_run(day_0, day_0, EDITED, [_attempt(6 * 24, "failed")], GAP)
    assert since == last == EDITED + timedelta(days=6)
    assert latest is not None
    assert latest.attempted_at == since


def test_failures_within_the_gap_of_one_another_keep_the_run() -> None:
    """Failures each less than the gap after the one before are one run, however long."""
    started = EDITED + timedelta(hours=1)
    every_11_hours = [_attempt(1 + 11 * n, "failed") for n in range(1, 12)]
    since, last, _ = failing_run(started, started, EDITED, every_11_hours, GAP)
    assert since == started
    assert last == EDITED + timedelta(hours=122)
    assert failing_run(since, last, EDITED, [_attempt(134, "failed")], GAP)[:2] == (
        started,
        EDITED + timedelta(hours=134),
    )


def test_an_older_failure_neither_moves_the_last_one_back_nor_restarts_the_run() -> None:
    started, last = EDITED + timedelta(hours=1), EDITED + timedelta(hours=30)
    assert failing_run(started, last, EDITED, [_attempt(2, "failed")], GAP)[:2] == (started, last)


def test_a_run_stored_without_its_last_failure_counts_from_its_start() -> None:
    """A run without a last failure (one that could not be written): its start stands in,
    so a disable may come later, never sooner."""
    started = EDITED + timedelta(hours=1)
    assert failing_run(started, None, EDITED, [_attempt(12, "failed")], GAP)[0] == started
    assert failing_run(started, None, EDITED, [_attempt(14, "failed")], GAP)[0] == (
        EDITED + timedelta(hours=14)
    )


def test_the_gap_holds_the_longest_wait_between_two_attempts_of_a_retried_delivery() -> None:
    """Any retry delay the dispatcher can draw (the largest jitter, a Retry-After at its
    cap), after an attempt that took its whole timeout and then an open circuit's longest
    wait: a delivery still being retried never looks like a quiet endpoint."""
    settings = load_settings(service_credential="x", token_pepper="y")
    policy = RetryPolicy.from_settings(settings)

    class Highest(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return max(a, b)

    longest = max(
        policy.delay_after(attempt, Highest(), retry_after)
        for attempt in range(1, policy.max_attempts)
        for retry_after in (None, 10 * settings.retry_after_max_seconds)
    )
    waited = settings.delivery_timeout_seconds + (longest or 0) + settings.circuit_open_max_seconds
    assert timedelta(seconds=waited) <= retry_gap(settings) < timedelta(hours=13)


def test_a_run_spans_quiet_of_up_to_half_the_disabling_period() -> None:
    """Half of five days by default; the longest wait between two attempts of a delivery
    when that is longer (a short period set for a test, a long retry schedule)."""
    settings = load_settings(service_credential="x", token_pepper="y")
    assert run_gap(settings) == timedelta(days=2.5)
    short = load_settings(service_credential="x", token_pepper="y", endpoint_disable_after_days=0.1)
    assert run_gap(short) == retry_gap(short) > timedelta(days=0.05)
