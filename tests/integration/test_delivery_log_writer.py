"""The delivery log's writer: which attempt decides a delivery's state, and its dead
letters (sent once, and sent even when the broker will not take them whole)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any, Literal

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from sqlalchemy.exc import OperationalError

from services.api import delivery_log
from services.shared import (
    Attempt,
    DeliveryKind,
    Settings,
    _kafka,
    make_producer,
    send_all,
    topics_for,
    utcnow,
)
from tests.conftest import Stack, dead_letters, records_in, running_stack
from tests.integration.test_delivery_log import _call, _logged, _unreachable_webhook
from tests.samples import sample_event


def _try(
    stack: Stack,
    webhook_id: str,
    number: int,
    at: datetime,
    outcome: Literal["delivered", "failed", "skipped"],
    kind: DeliveryKind = "event",
    *,
    final: bool = False,
    status: int | None = None,
) -> Attempt:
    event = sample_event(id="evt_twice", team_id=stack.team_id, occurred_at=at)
    return Attempt(
        delivery_id="msg_twice",
        event_id=event.id,
        webhook_id=webhook_id,
        team_id=stack.team_id,
        attempt=number,
        attempted_at=at,
        outcome=outcome,
        status_code=status or (200 if outcome == "delivered" else 409),
        # A re-send gets one attempt.
        final=final or kind != "event",
        next_retry_at=(
            None if final or kind != "event" or outcome != "failed" else at + timedelta(minutes=5)
        ),
        kind=kind,
        event=event,
    )


async def _with_attempts(stack: Stack, count: int) -> dict[str, Any]:
    """The delivery once it shows ``count`` attempts, read again: the view reads the
    delivery and its attempts in two statements, so the read that first saw the last
    attempt may have read the row from before it."""
    await _logged(stack, "msg_twice", lambda d: len(d["attempts"]) == count)
    return await _logged(stack, "msg_twice", lambda d: len(d["attempts"]) == count)


@contextlib.asynccontextmanager
async def _producer(stack: Stack) -> AsyncIterator[AIOKafkaProducer]:
    producer = make_producer(stack.settings)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def _send_together(stack: Stack, values: list[bytes]) -> None:
    """``values`` to the attempts topic in one batch, as a dispatcher sends its outcomes."""
    attempts_topic = topics_for(stack.settings).attempts
    async with _producer(stack) as producer:
        await send_all(producer, [(attempts_topic, b"k", value) for value in values])


async def _one_by_one(
    stack: Stack, attempts: list[Attempt], already: int = 0
) -> list[dict[str, Any]]:
    """Each attempt in a batch of its own: the delivery as the log shows it after each
    (``already``: how many attempts it had)."""
    topics = topics_for(stack.settings)
    shown = []
    async with _producer(stack) as producer:
        for n, attempt in enumerate(attempts, already + 1):
            await producer.send_and_wait(topics.attempts, value=attempt.to_bytes(), key=b"k")
            shown.append(await _with_attempts(stack, n))
    return shown


async def test_a_scheduled_retry_failing_after_a_manual_re_send_delivered_leaves_it_delivered(
    settings: Settings,
) -> None:
    """Attempt 1 fails and a retry is scheduled; the user's re-send delivers it; the
    scheduled retry still goes out and the receiver refuses the repeated webhook-id (409),
    to the last automatic attempt. The delivery stays delivered (not listed as failed, not
    re-sent by a replay of failed ones); a re-send asked for after it records its own
    outcome."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        start = utcnow() - timedelta(hours=1)
        shown = await _one_by_one(
            stack,
            [
                _try(stack, webhook, 1, start, "failed", status=500),
                _try(stack, webhook, 2, start + timedelta(minutes=1), "delivered", "manual"),
                _try(stack, webhook, 2, start + timedelta(minutes=5), "failed"),
                _try(stack, webhook, 3, start + timedelta(minutes=35), "failed", final=True),
            ],
        )
        assert [d["state"] for d in shown] == ["retrying", "delivered", "delivered", "delivered"]
        done = shown[-1]
        assert (done["kind"], done["last_status_code"], done["next_retry_at"]) == (
            "manual",
            200,
            None,
        )
        assert done["attempt_count"] == 3
        assert [a["outcome"] for a in done["attempts"]] == [
            "failed",
            "delivered",
            "failed",
            "failed",
        ]
        status, failed = await _call(stack, "GET", "/deliveries?state=failed,retrying")
        assert (status, failed["data"]) == (200, [])
        status, replayed = await _call(
            stack,
            "POST",
            f"/webhooks/{webhook}/replay",
            json={"since": (start - timedelta(minutes=1)).isoformat(), "only_failed": True},
        )
        assert (status, replayed["replayed"]) == (202, 0), replayed

        # Asked for now, a re-send that fails says so: the delivery is failed again.
        [again] = await _one_by_one(
            stack,
            [_try(stack, webhook, 4, start + timedelta(minutes=40), "failed", "manual")],
            already=4,
        )
        assert (again["state"], again["kind"], again["last_status_code"]) == (
            "failed",
            "manual",
            409,
        )


async def test_a_re_send_failing_while_a_retry_is_scheduled_leaves_the_delivery_retrying(
    settings: Settings,
) -> None:
    """Attempt 1 fails and its retry is scheduled; a re-send asked for meanwhile fails
    too. The delivery is still retrying, with the retry's time: shown failed with none, it
    would invite another re-send while the retry is still to come. The re-send's status
    is the last one; the retry's outcome then counts."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        start = utcnow() - timedelta(hours=1)
        first = _try(stack, webhook, 1, start, "failed", status=500)
        resent = _try(
            stack, webhook, 2, start + timedelta(minutes=1), "failed", "manual", status=503
        )
        shown = await _one_by_one(stack, [first, resent])
        assert [d["state"] for d in shown] == ["retrying", "retrying"]
        waiting = shown[-1]
        assert first.next_retry_at is not None
        assert datetime.fromisoformat(waiting["next_retry_at"]) == first.next_retry_at
        assert (waiting["kind"], waiting["last_status_code"]) == ("event", 503)
        status, listed = await _call(stack, "GET", "/deliveries?state=retrying")
        assert (status, [d["id"] for d in listed["data"]]) == (200, ["msg_twice"])
        [done] = await _one_by_one(
            stack, [_try(stack, webhook, 2, start + timedelta(minutes=5), "delivered")], already=2
        )
        assert (done["state"], done["kind"], done["next_retry_at"]) == ("delivered", "event", None)


async def test_a_re_send_failing_after_the_last_retry_was_due_leaves_the_delivery_failed(
    settings: Settings,
) -> None:
    """The last retry was due (and on its way, its answer slow) when a re-send failed
    fast: the re-send's record comes first, and the retry's final failure, older, does not
    count after it. Kept retrying, the delivery would stay so for good."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        start = utcnow() - timedelta(hours=1)
        first = _try(stack, webhook, 1, start, "failed", status=500)
        assert first.next_retry_at is not None
        after_due = first.next_retry_at + timedelta(seconds=2)
        resent = _try(stack, webhook, 2, after_due, "failed", "manual", status=503)
        last = _try(stack, webhook, 2, first.next_retry_at, "failed", final=True, status=500)
        shown = await _one_by_one(stack, [first, resent, last])
        assert [d["state"] for d in shown] == ["retrying", "failed", "failed"]
        assert (shown[-1]["next_retry_at"], shown[-1]["kind"]) == (None, "manual")


async def test_in_one_batch_too_an_automatic_failure_after_a_success_leaves_it_delivered(
    settings: Settings,
) -> None:
    """The same attempts read in one batch (the writer behind), and a second dispatcher's
    sending again after a rebalance finding the webhook switched off (skipped)."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        start = utcnow() - timedelta(hours=1)
        attempts = [
            _try(stack, webhook, 1, start, "failed", status=500),
            _try(stack, webhook, 2, start + timedelta(minutes=1), "delivered", "manual"),
            _try(stack, webhook, 2, start + timedelta(minutes=5), "failed"),
            _try(stack, webhook, 2, start + timedelta(minutes=6), "skipped"),
        ]
        await _send_together(stack, [a.to_bytes() for a in attempts])
        done = await _with_attempts(stack, 4)
        assert (done["state"], done["kind"], done["attempt_count"]) == ("delivered", "manual", 2)
        assert done["created_at"] == start.isoformat()


async def test_a_batch_is_judged_attempt_by_attempt_as_records_read_one_by_one(
    settings: Settings,
) -> None:
    """Delivered; then, read in one batch, a manual re-send that failed and an automatic
    retry that failed after it: the re-send's failure ended the delivered state, so the
    retry counts, as it would read on its own (judged by the batch's last attempt alone,
    the delivery stayed delivered)."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        start = utcnow() - timedelta(hours=1)
        await _one_by_one(stack, [_try(stack, webhook, 1, start, "delivered")])
        later = [
            _try(stack, webhook, 2, start + timedelta(minutes=1), "failed", "manual", status=500),
            _try(stack, webhook, 2, start + timedelta(minutes=5), "failed", final=True),
        ]
        await _send_together(stack, [a.to_bytes() for a in later])
        done = await _with_attempts(stack, 3)
        assert (done["state"], done["kind"], done["last_status_code"]) == ("failed", "event", 409)


async def test_a_success_recorded_after_a_later_automatic_failure_still_counts(
    settings: Settings,
) -> None:
    """A rebalance: the dispatcher losing the partition is still waiting for a slow 2xx
    when its successor sends the delivery again and the receiver refuses the repeat (409).
    The successor's failure is recorded first; the success, made earlier, still makes the
    delivery delivered, and the successor's later retries leave it so."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        start = utcnow() - timedelta(hours=1)
        shown = await _one_by_one(
            stack,
            [
                _try(stack, webhook, 1, start + timedelta(seconds=3), "failed"),
                _try(stack, webhook, 1, start, "delivered"),
                _try(stack, webhook, 2, start + timedelta(minutes=5), "failed", final=True),
            ],
        )
        assert [d["state"] for d in shown] == ["retrying", "delivered", "delivered"]
        assert shown[-1]["updated_at"] == (start + timedelta(minutes=5)).isoformat()


async def test_dead_letters_go_once_while_the_database_is_away(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record that is no attempt, in a batch the database refuses three times (away for
    a few seconds): its dead letter is sent once, after the rows are in, not once per try."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        real = delivery_log.record_attempts
        tries = [0]

        async def away_three_times(conn: Any, attempts: Any) -> Any:
            tries[0] += 1
            if tries[0] <= 3:
                raise OperationalError("INSERT", {}, Exception("the database went away"))
            return await real(conn, attempts)

        monkeypatch.setattr(delivery_log, "record_attempts", away_three_times)
        good = _try(stack, webhook, 1, utcnow(), "failed")
        await _send_together(stack, [b"not json", good.to_bytes()])
        await _logged(stack, "msg_twice", lambda d: len(d["attempts"]) == 1)
        assert tries[0] >= 4
        await asyncio.sleep(0.5)
        dead_letter = topics_for(stack.settings).dead_letter
        assert await records_in(stack.settings, dead_letter) == 1, "one per try"
        [letter] = await dead_letters(stack.settings, 1)
        assert letter["payload"] == "not json"
        registry = stack.api.metrics.registry
        labels = {"reason": "invalid_record"}
        assert registry.get_sample_value("hookwire_api_dead_letters_total", labels) == 1
        consumed = {"outcome": "invalid"}
        assert registry.get_sample_value("hookwire_api_attempts_consumed_total", consumed) == 1


# A dead-letter topic configured with a smaller record limit than the others (the
# embedded broker enforces none).
_DEAD_LETTER_LIMIT = 100_000


async def test_a_dead_letter_too_large_for_the_broker_goes_without_its_payload(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record that is no attempt, which the dead-letter topic will not take whole (its
    limit is smaller than the attempts topic's): its dead letter goes without the payload,
    and the attempts behind it are stored, rather than the log stopping for every team."""
    real = _kafka._send_packed
    dead_letter = topics_for(settings).dead_letter

    async def as_kafka_would(producer: Any, records: list[Any]) -> Any:
        big = {
            owner: MessageSizeTooLargeError()
            for topic, _, value, owner in records
            if topic == dead_letter and len(value) > _DEAD_LETTER_LIMIT
        }
        sent, refused = await real(producer, [r for r in records if r[3] not in big])
        return sent, {**refused, **big}

    monkeypatch.setattr(_kafka, "_send_packed", as_kafka_would)
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        topics = topics_for(stack.settings)
        good = _try(stack, webhook, 1, utcnow(), "failed")
        # Not ``_send_together``: its ``send_all`` would go through the stand-in above too.
        async with _producer(stack) as producer:
            await producer.send_and_wait(topics.attempts, value=b"x" * 200_000, key=b"k")
            await producer.send_and_wait(topics.attempts, value=good.to_bytes(), key=b"k")
        await _logged(stack, "msg_twice", lambda d: len(d["attempts"]) == 1, within=15)
        [letter] = await dead_letters(stack.settings, 1)
        assert letter["payload"] == ""
        assert letter["source_topic"] == topics.attempts
        # Why the record was set aside stays, with why its payload was left out.
        assert letter["reason"].startswith("record: ")
        assert "(payload left out: the broker refused it: " in letter["reason"]
        assert (
            stack.api.metrics.registry.get_sample_value(
                "hookwire_api_dead_letters_total", {"reason": "invalid_record"}
            )
            == 1
        )


def _put_off(stack: Stack, webhook_id: str, number: int, at: datetime, wakes: datetime) -> Attempt:
    """Attempt ``number`` of the delivery put off at ``at`` until ``wakes``: no request."""
    return _try(stack, webhook_id, number, at, "failed").model_copy(
        update={
            "outcome": "deferred",
            "status_code": None,
            "error": "put off: the endpoint's circuit is open",
            "error_class": "circuit_open",
            "final": False,
            "next_retry_at": wakes,
        }
    )


async def test_a_put_off_delivery_is_listed_with_the_time_it_goes_next(
    settings: Settings,
) -> None:
    """Put off before its first attempt, a delivery is listed ``pending`` with no attempt;
    a retry put off keeps the last attempt's status and shows its new time; a put-off older
    than the delivery's last change, or read after it was delivered, changes nothing."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        start = utcnow() - timedelta(hours=1)
        attempts_topic = topics_for(stack.settings).attempts

        async def sent(attempt: Attempt, ready: Any) -> dict[str, Any]:
            async with _producer(stack) as producer:
                await producer.send_and_wait(attempts_topic, value=attempt.to_bytes(), key=b"k")
            return await _logged(stack, "msg_twice", ready)

        wakes = start + timedelta(minutes=10)
        pending = await sent(
            _put_off(stack, webhook, 1, start, wakes), lambda d: d["state"] == "pending"
        )
        assert (pending["attempts"], pending["attempt_count"]) == ([], 0)
        assert datetime.fromisoformat(pending["next_retry_at"]) == wakes
        status, listed = await _call(stack, "GET", "/deliveries?state=pending")
        assert (status, [d["id"] for d in listed["data"]]) == (200, ["msg_twice"])

        # The attempt and its retry's put-off in one batch (a writer catching up): the
        # put-off does not keep the older attempt from counting.
        failed = _try(stack, webhook, 1, start + timedelta(minutes=10), "failed", status=500)
        later = start + timedelta(minutes=20)
        put_off_again = _put_off(stack, webhook, 2, start + timedelta(minutes=15), later)
        await _send_together(stack, [failed.to_bytes(), put_off_again.to_bytes()])
        moved = await _logged(
            stack,
            "msg_twice",
            lambda d: (
                d["next_retry_at"] is not None
                and datetime.fromisoformat(d["next_retry_at"]) == later
            ),
        )
        assert (moved["state"], moved["last_status_code"], moved["attempt_count"]) == (
            "retrying",
            500,
            1,
        )
        assert [a["outcome"] for a in moved["attempts"]] == ["failed"]

        async def after_the_marker(late: Attempt, n: int) -> dict[str, Any]:
            """The delivery once ``late`` has been read: a record of another delivery sent
            after it on the same partition is in the log."""
            marker = _try(stack, webhook, 1, late.attempted_at, "delivered").model_copy(
                update={"delivery_id": f"msg_marker{n}"}
            )
            # With another delivery's put-off in the batch: several rows in one statement.
            other = late.model_copy(update={"delivery_id": f"msg_other{n}", "attempt": 1})
            await _send_together(stack, [late.to_bytes(), other.to_bytes(), marker.to_bytes()])
            await _logged(stack, f"msg_marker{n}", lambda d: d["state"] == "delivered")
            assert (await _logged(stack, f"msg_other{n}", lambda d: True))["state"] == "pending"
            return await _logged(stack, "msg_twice", lambda d: True)

        # Older than the last change: read late, it does not move the time back.
        stale = _put_off(stack, webhook, 2, start + timedelta(minutes=12), wakes)
        shown = await after_the_marker(stale, 1)
        assert datetime.fromisoformat(shown["next_retry_at"]) == later
        done = _try(stack, webhook, 2, start + timedelta(minutes=20), "delivered")
        await sent(done, lambda d: d["state"] == "delivered")
        # Read after the delivery was made (written by hand): it stays delivered.
        shown = await after_the_marker(
            _put_off(stack, webhook, 2, start + timedelta(minutes=25), later), 2
        )
        assert (shown["state"], shown["next_retry_at"], shown["attempt_count"]) == (
            "delivered",
            None,
            2,
        )
        assert [a["outcome"] for a in shown["attempts"]] == ["failed", "delivered"]


async def test_a_test_delivery_put_off_ends_with_its_one_attempt(settings: Settings) -> None:
    """A test event put off (its webhook's lookup failed) is pending; its one attempt,
    failing, ends it: no automatic attempt is to come, so it is not kept pending (as an
    event's first attempt put off is, when a re-send fails meanwhile)."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        start = utcnow() - timedelta(hours=1)
        put_off = _put_off(stack, webhook, 1, start, start + timedelta(minutes=10))
        put_off = put_off.model_copy(update={"kind": "test"})
        tried = _try(stack, webhook, 1, start + timedelta(minutes=1), "failed", "test", status=500)
        await _send_together(stack, [put_off.to_bytes()])
        await _logged(stack, "msg_twice", lambda d: d["state"] == "pending")
        await _send_together(stack, [tried.to_bytes()])
        done = await _logged(stack, "msg_twice", lambda d: d["state"] != "pending")
        assert (done["state"], done["next_retry_at"], done["last_status_code"]) == (
            "failed",
            None,
            500,
        )


async def test_put_offs_count_in_the_order_they_were_made_within_a_batch(
    settings: Settings,
) -> None:
    """Written straight through the writer, one batch each: what a put-off does to a
    delivery does not depend on the attempts read with it."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = (await _unreachable_webhook(stack))["id"]
        start = utcnow() - timedelta(hours=1)

        def of(delivery_id: str, *records: Attempt) -> list[Attempt]:
            return [r.model_copy(update={"delivery_id": delivery_id}) for r in records]

        failed = _try(stack, webhook, 1, start, "failed", status=500)
        assert failed.next_retry_at is not None
        due = failed.next_retry_at
        later = due + timedelta(seconds=30)
        # An attempt and its retry's put-off: both count.
        together = of("msg_a", failed, _put_off(stack, webhook, 2, due, later))
        # A retry put off as it came due, then a re-send failing just after: the put-off's
        # retry is still to come, so the delivery is still retrying, at the put-off's time.
        resent = _try(stack, webhook, 2, due + timedelta(seconds=1), "failed", "manual", status=503)
        put_off_then_resent = of("msg_b", _put_off(stack, webhook, 2, due, later), resent)
        # A first attempt put off, a re-send failing before it goes: still pending.
        first = _put_off(stack, webhook, 1, start, later)
        early = _try(stack, webhook, 1, start + timedelta(seconds=1), "failed", "manual")
        # A re-send put off (its lookup failed) says when it goes, not the retry.
        manual_put_off = _put_off(stack, webhook, 2, due, due + timedelta(days=1)).model_copy(
            update={"kind": "manual"}
        )
        async with stack.api.engine.begin() as conn:
            await delivery_log.record_attempts(conn, [*of("msg_b", failed), *of("msg_d", failed)])
        for batch in (
            together,
            put_off_then_resent,
            of("msg_c", first, early),
            of("msg_d", manual_put_off),
        ):
            async with stack.api.engine.begin() as conn:
                await delivery_log.record_attempts(conn, batch)

        shown = {
            d: await _logged(stack, d, lambda _: True) for d in ("msg_a", "msg_b", "msg_c", "msg_d")
        }

        def when(delivery: dict[str, Any]) -> datetime:
            return datetime.fromisoformat(delivery["next_retry_at"])

        a, b, c, d = (shown[k] for k in ("msg_a", "msg_b", "msg_c", "msg_d"))
        assert (a["state"], a["last_status_code"], a["attempt_count"], when(a)) == (
            "retrying",
            500,
            1,
            later,
        )
        assert (b["state"], b["last_status_code"], when(b)) == ("retrying", 503, later)
        assert (c["state"], c["attempt_count"], when(c)) == ("pending", 1, later)
        assert (d["state"], when(d)) == ("retrying", due)

        # Read one batch at a time: a re-send failing after the retry was due, while the
        # retry was being put off again; then that put-off. The automatic attempts are
        # still going, so the delivery waits again.
        again = _put_off(stack, webhook, 2, due + timedelta(seconds=2), later)
        # A put-off whose retry was refused ends failed, read after a re-send kept the
        # delivery waiting: it ends the delivery however late it is read.
        put_off = _put_off(stack, webhook, 2, due, later)
        refused = put_off.model_copy(
            update={
                "outcome": "failed",
                "final": True,
                "next_retry_at": None,
                "error_class": "retry_refused",
            }
        )
        for batch in (
            of("msg_e", failed),
            of("msg_e", resent),
            of("msg_e", again),
            of("msg_f", failed),
            of("msg_f", put_off),
            of("msg_f", resent),
            of("msg_f", refused),
        ):
            async with stack.api.engine.begin() as conn:
                await delivery_log.record_attempts(conn, batch)
        e = await _logged(stack, "msg_e", lambda _: True)
        assert (e["state"], e["kind"], when(e), e["last_status_code"]) == (
            "retrying",
            "event",
            later,
            503,
        )
        f = await _logged(stack, "msg_f", lambda _: True)
        assert (f["state"], f["next_retry_at"]) == ("failed", None)
