"""The batching sender: rounds, lingering, and stopping while callers wait on it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from services.dispatcher.handler import DeliveryHandler, DeliveryMetrics
from services.shared import (
    Attempt,
    BatchingSender,
    DependencyUnavailable,
    Metrics,
    OutcomeUnknown,
    Topics,
    load_settings,
    partition_of,
)
from tests.samples import sample_event


class _UnansweringProducer:
    """Stands in for a producer whose broker has stopped answering mid-round: a silent
    broker cannot be arranged on demand in the middle of a send."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    async def partitions_for(self, topic: str) -> set[int]:
        self.asked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_callers_waiting_when_the_sender_closes_get_an_error() -> None:
    """Both the caller whose round is in flight and one queued behind it are answered."""
    producer = _UnansweringProducer()
    sender = BatchingSender(cast(Any, producer))
    in_flight = asyncio.create_task(sender.send([("events", b"k", b"1")]))
    await asyncio.wait_for(producer.asked.wait(), 5)
    queued = asyncio.create_task(sender.send([("events", b"k", b"2")]))
    await asyncio.sleep(0)
    await sender.close()
    for caller in (in_flight, queued):
        with pytest.raises(DependencyUnavailable, match="stopped"):
            await asyncio.wait_for(caller, 5)


class _Batch:
    def __init__(self) -> None:
        self.values: list[bytes] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: None) -> object:
        self.values.append(value)
        return object()


class _CountingProducer:
    """Records each batch it is asked to send and acknowledges it at once."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(
        self, batch: _Batch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        self.sent.append(batch.values)
        acknowledged = asyncio.get_running_loop().create_future()
        acknowledged.set_result(None)
        return acknowledged


@pytest.mark.parametrize(("linger", "requests"), [(0.0, [[b"1"], [b"2"]]), (2.0, [[b"1", b"2"]])])
async def test_a_lingering_sender_sends_callers_close_together_in_one_request(
    linger: float, requests: list[list[bytes]]
) -> None:
    producer = _CountingProducer()
    sender = BatchingSender(cast(Any, producer), linger_seconds=linger)
    first = asyncio.create_task(sender.send([("attempts", b"k", b"1")]))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(first, sender.send([("attempts", b"k", b"2")])), 5)
    await sender.close()
    assert producer.sent == requests


async def test_a_caller_that_gives_up_before_its_round_is_not_sent() -> None:
    """The outbox undoes a change whose event it stopped waiting for; the event must not
    go out after all while it still waited for its round."""
    producer = _CountingProducer()
    sender = BatchingSender(cast(Any, producer), linger_seconds=2.0)
    gave_up = asyncio.create_task(sender.send([("events", b"k", b"undone")]))
    await asyncio.sleep(0.05)
    gave_up.cancel()
    await asyncio.wait_for(sender.send([("events", b"k", b"kept")]), 5)
    await sender.close()
    assert producer.sent == [[b"kept"]]


class _PartlyFailingProducer(_CountingProducer):
    """Two partitions; the broker refuses partition 1's batch and takes partition 0's. A
    refusal of one partition in a request cannot be arranged on demand on a real broker."""

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}

    async def send_batch(
        self, batch: _Batch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        self.sent.append(batch.values)
        answered = asyncio.get_running_loop().create_future()
        if partition == 1:
            answered.set_exception(KafkaTimeoutError("partition 1 refused"))
        else:
            answered.set_result(None)
        return answered


def _key_on(partition: int) -> bytes:
    return next(
        key for key in (f"k{n}".encode() for n in range(100)) if partition_of(key, 2) == partition
    )


async def test_each_caller_in_a_round_hears_its_own_outcome() -> None:
    """A refused partition fails only the callers whose records were in it: a caller whose
    records were acknowledged must not be told otherwise (it would undo its change)."""
    producer = _PartlyFailingProducer()
    sender = BatchingSender(cast(Any, producer), linger_seconds=0.2)
    taken = asyncio.create_task(sender.send([("events", _key_on(0), b"taken")]))
    refused = asyncio.create_task(sender.send([("events", _key_on(1), b"refused")]))
    await asyncio.wait_for(taken, 5)
    with pytest.raises(KafkaTimeoutError):
        await asyncio.wait_for(refused, 5)
    await sender.close()
    assert sorted(producer.sent) == [[b"refused"], [b"taken"]]  # one round, two batches


async def test_a_caller_learns_which_of_its_records_were_refused() -> None:
    producer = _PartlyFailingProducer()
    sender = BatchingSender(cast(Any, producer))
    records = [("attempts", _key_on(0), b"a"), ("retry.1", _key_on(1), b"b")]
    records.append(("attempts", _key_on(0), b"c"))
    refused = await asyncio.wait_for(sender.send_each(records), 5)
    await sender.close()
    assert list(refused) == [1]
    assert isinstance(refused[1], KafkaTimeoutError)


class _RefusingOnceProducer(_PartlyFailingProducer):
    """Refuses partition 1's first batch only."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals = 1

    async def send_batch(
        self, batch: _Batch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        self.sent.append(batch.values)
        answered = asyncio.get_running_loop().create_future()
        if partition == 1 and self.refusals:
            self.refusals -= 1
            answered.set_exception(KafkaTimeoutError("partition 1 refused"))
        else:
            answered.set_result(None)
        return answered


async def test_a_delivery_outcome_partly_refused_is_sent_again_only_in_part() -> None:
    """The attempt record was taken and the retry record refused: only the retry record
    goes again. Sent twice, the attempt would be harmless; a retry sent twice starts a
    second chain of retries."""
    producer = _RefusingOnceProducer()
    outcomes = BatchingSender(cast(Any, producer))
    handler = _outcome_writer(outcomes, DeliveryMetrics(Metrics("test_partly_refused")))
    records = [("t.attempts", _key_on(0), b"attempt"), ("t.retry.1", _key_on(1), b"retry")]
    await asyncio.wait_for(handler.publish(_delivery_record(), records), 10)
    await outcomes.close()
    sent = [value for batch in producer.sent for value in batch]
    assert sorted(sent) == [b"attempt", b"retry", b"retry"]


def _delivery_record() -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("t.deliveries", 0, 41, 0, 0, b"wh_1", b'{"id": "msg_1"}', None, 4, 15, ())


class _SizeLimitedTopic(_CountingProducer):
    """Topics configured with a smaller record limit than the others: they refuse every
    batch of more than ``limit`` bytes, for its size."""

    def __init__(self, *topics: str, limit: int = 0) -> None:
        super().__init__()
        self.topics, self.limit = topics, limit

    async def send_batch(
        self, batch: _Batch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        answered = asyncio.get_running_loop().create_future()
        if topic in self.topics and sum(len(value) for value in batch.values) > self.limit:
            answered.set_exception(MessageSizeTooLargeError())
        else:
            self.sent.append(batch.values)
            answered.set_result(None)
        return answered


def _outcome_writer(outcomes: BatchingSender, metrics: DeliveryMetrics) -> DeliveryHandler:
    """A handler that only writes outcomes (its publish), through ``outcomes``."""
    return DeliveryHandler(
        settings=load_settings(service_credential="x", token_pepper="y"),
        table=cast(Any, None),
        sender=cast(Any, None),
        outcomes=outcomes,
        topics=Topics("t."),
        metrics=metrics,
    )


async def test_an_outcome_the_broker_will_never_take_is_set_aside() -> None:
    """Tried for ever, the attempt record would hold its partition's commit point, and
    every webhook behind it, for good: it becomes a dead letter of the delivery (counted),
    and the retry record the broker took goes once."""
    producer = _SizeLimitedTopic("t.attempts")
    outcomes = BatchingSender(cast(Any, producer))
    metrics = DeliveryMetrics(Metrics("test_never_taken"))
    handler = _outcome_writer(outcomes, metrics)
    records = [("t.attempts", b"wh_1", b"attempt"), ("t.retry.1", b"wh_1", b"retry")]
    await asyncio.wait_for(handler.publish(_delivery_record(), records), 10)
    await outcomes.close()
    sent = [value for batch in producer.sent for value in batch]
    assert sent.count(b"retry") == 1
    [letter] = [orjson.loads(value) for value in sent if value != b"retry"]
    assert (letter["source_topic"], letter["source_offset"]) == ("t.deliveries", 41)
    assert letter["reason"].startswith("its record for wh_1 on t.attempts is refused")
    assert orjson.loads(letter["payload"]) == {"id": "msg_1"}
    assert metrics.dead_letters.labels("too_large")._value.get() == 1


class _MissingTopicProducer(_CountingProducer):
    """Knows no partitions of the topic "missing" (its metadata never comes)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked_for_missing = 0

    async def partitions_for(self, topic: str) -> set[int]:
        if topic == "missing":
            self.asked_for_missing += 1
            raise KafkaTimeoutError("no metadata for missing")
        return {0}


async def test_a_send_caller_is_one_owner_and_a_send_each_caller_many() -> None:
    """A record of a ``send`` caller refused: its later records are not sent (it is told
    the whole failed). ``send_each``: only the refused record is missing. The topic's
    metadata is asked for once per round, not once per record."""
    records = [("events", b"k", b"a"), ("missing", b"k", b"b"), ("events", b"k", b"c")]
    producer = _MissingTopicProducer()
    sender = BatchingSender(cast(Any, producer))
    with pytest.raises(KafkaTimeoutError):
        await asyncio.wait_for(sender.send(records), 5)
    assert producer.sent == []
    refused = await asyncio.wait_for(sender.send_each([*records, ("missing", b"k", b"d")]), 5)
    await sender.close()
    assert sorted(refused) == [1, 3]
    assert producer.sent == [[b"a", b"c"]]
    assert producer.asked_for_missing == 2, "once in each round"


class _SilentProducer(_CountingProducer):
    """Takes batches and never answers, like a broker that stopped mid-request."""

    async def send_batch(
        self, batch: _Batch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        self.sent.append(batch.values)
        return asyncio.get_running_loop().create_future()


async def test_a_caller_out_of_time_learns_whether_its_records_left() -> None:
    """Out of time on the way: outcome unknown. Out of time in the queue: withdrawn."""
    producer = _SilentProducer()
    sender = BatchingSender(cast(Any, producer))
    on_its_way = asyncio.create_task(sender.send([("events", b"k", b"1")], within=0.3))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(sender.send([("events", b"k", b"2")], within=0.1))
    with pytest.raises(TimeoutError):
        await queued
    assert not isinstance(queued.exception(), OutcomeUnknown)
    with pytest.raises(OutcomeUnknown):
        await on_its_way
    await sender.close()
    assert producer.sent == [[b"1"]]


async def test_a_record_too_large_does_not_take_down_others_sent_with_it() -> None:
    """Two deliveries' attempts go out in one batch, which the broker refuses for its
    size: each is then tried alone, so only the one too large on its own is set aside."""
    producer = _SizeLimitedTopic("t.attempts", limit=100)
    outcomes = BatchingSender(cast(Any, producer), linger_seconds=0.2)
    metrics = DeliveryMetrics(Metrics("test_taken_down"))
    handler = _outcome_writer(outcomes, metrics)
    large = ConsumerRecord("t.deliveries", 0, 7, 0, 0, b"wh_1", b"{}", None, 4, 2, ())
    small = ConsumerRecord("t.deliveries", 1, 8, 0, 0, b"wh_2", b"{}", None, 4, 2, ())
    await asyncio.wait_for(
        asyncio.gather(
            handler.publish(large, [("t.attempts", b"wh_1", b"L" * 150)]),
            handler.publish(small, [("t.attempts", b"wh_2", b"s" * 60)]),
        ),
        10,
    )
    await outcomes.close()
    sent = [value for batch in producer.sent for value in batch]
    assert b"s" * 60 in sent
    [letter] = [orjson.loads(value) for value in sent if value.startswith(b"{")]
    assert letter["source_offset"] == 7
    assert metrics.dead_letters.labels("too_large")._value.get() == 1


def _failed_attempt(delivery_id: str = "msg_1") -> Attempt:
    """A first attempt that failed, its retry due five seconds later."""
    return Attempt(
        delivery_id=delivery_id,
        event_id="evt_1",
        webhook_id="wh_1",
        team_id="team_1",
        attempt=1,
        attempted_at=datetime(2026, 1, 1, tzinfo=UTC),
        outcome="failed",
        status_code=500,
        error="HTTP 500",
        final=False,
        next_retry_at=datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC),
        event=sample_event(id="evt_1", team_id="team_1"),
    )


async def _attempt_and_retry_through(
    producer: _SizeLimitedTopic,
) -> tuple[list[dict[str, Any]], DeliveryMetrics]:
    """A failed first attempt and its retry, published through ``producer``: what it
    took, and the handler's metrics."""
    outcomes = BatchingSender(cast(Any, producer))
    metrics = DeliveryMetrics(Metrics(f"test_outcomes_{len(producer.topics)}"))
    handler = _outcome_writer(outcomes, metrics)
    records = [
        ("t.attempts", b"wh_1", _failed_attempt().to_bytes()),
        ("t.retry.1", b"wh_1", b'{"retry": true}'),
    ]
    await asyncio.wait_for(handler.publish(_delivery_record(), records), 10)
    await outcomes.close()
    return [orjson.loads(value) for batch in producer.sent for value in batch], metrics


async def test_an_attempt_whose_retry_is_set_aside_is_told_as_the_last() -> None:
    """Its record says a retry is scheduled; with the retry a dead letter, the delivery
    log would show it retrying for good. The attempt goes again, final."""
    sent, _ = await _attempt_and_retry_through(_SizeLimitedTopic("t.retry.1"))
    told = [record for record in sent if record.get("delivery_id") == "msg_1"]
    assert [(r["final"], r.get("next_retry_at")) for r in told] == [
        (False, "2026-01-01T00:00:05Z"),
        (True, None),
    ]
    assert told[1]["error"].startswith("HTTP 500; its retry was refused by the broker")
    [letter] = [record for record in sent if "source_topic" in record]
    assert letter["reason"].startswith("its record for wh_1 on t.retry.1 is refused")


async def test_a_put_off_whose_retry_is_set_aside_ends_failed() -> None:
    """A put-off's record says when the delivery goes next; with its retry record a dead
    letter, it goes again as a final failure, a record the delivery log takes (a final
    deferred one it would refuse, and the delivery would stay pending for good)."""
    producer = _SizeLimitedTopic("t.retry.1")
    outcomes = BatchingSender(cast(Any, producer))
    handler = _outcome_writer(outcomes, DeliveryMetrics(Metrics("test_put_off_set_aside")))
    put_off = _failed_attempt().model_copy(
        update={"outcome": "deferred", "status_code": None, "error": "put off: circuit open"}
    )
    records = [
        ("t.retry.1", b"wh_1", b'{"retry": true}'),
        ("t.attempts", b"wh_1", put_off.to_bytes()),
    ]
    await asyncio.wait_for(handler.publish(_delivery_record(), records), 10)
    await outcomes.close()
    told = [
        Attempt.model_validate_json(value)
        for batch in producer.sent
        for value in batch
        if b'"delivery_id"' in value
    ]
    assert [(a.outcome, a.final, a.next_retry_at, a.error_class) for a in told][-1] == (
        "failed",
        True,
        None,
        "retry_refused",
    )
    assert told[-1].error is not None
    assert told[-1].error.startswith("put off: circuit open; its retry was refused")


async def test_an_attempt_and_retry_both_refused_make_one_dead_letter() -> None:
    """Both of a delivery's records are too large for their topics: one dead letter of the
    delivery names the two, counted once, and the attempt is not sent again as the last
    (it would be refused again, and a third dead letter written)."""
    sent, metrics = await _attempt_and_retry_through(_SizeLimitedTopic("t.attempts", "t.retry.1"))
    [letter] = sent
    assert letter["source_offset"] == 41
    assert letter["reason"].startswith(
        "its records for wh_1 on t.attempts, for wh_1 on t.retry.1 are refused by the broker"
    )
    assert metrics.dead_letters.labels("too_large")._value.get() == 1


async def test_retries_refused_together_but_taken_alone_keep_their_attempts() -> None:
    """Two deliveries' retries fill one batch the broker refuses for its size; alone, each
    is taken. Nothing was set aside: their attempts stand as sent, not told as the last."""
    retry = b'{"retry": true}'
    producer = _SizeLimitedTopic("t.retry.1", limit=len(retry))
    outcomes = BatchingSender(cast(Any, producer), linger_seconds=0.2)
    metrics = DeliveryMetrics(Metrics("test_taken_alone"))
    handler = _outcome_writer(outcomes, metrics)
    sources = [
        ConsumerRecord("t.deliveries", 0, offset, 0, 0, b"wh_1", b"{}", None, 4, 2, ())
        for offset in (1, 2)
    ]
    await asyncio.wait_for(
        asyncio.gather(
            *(
                handler.publish(
                    source,
                    [
                        ("t.attempts", b"wh_1", _failed_attempt(f"msg_{n}").to_bytes()),
                        ("t.retry.1", b"wh_1", retry),
                    ],
                )
                for n, source in enumerate(sources)
            )
        ),
        10,
    )
    await outcomes.close()
    sent = [orjson.loads(value) for batch in producer.sent for value in batch]
    assert sorted(r["final"] for r in sent if "delivery_id" in r) == [False, False]
    assert sent.count({"retry": True}) == 2
    assert not [r for r in sent if "source_topic" in r]
    assert metrics.dead_letters.labels("too_large")._value.get() == 0


async def test_a_caller_after_the_sender_closed_is_told_and_starts_nothing() -> None:
    """A delivery still running after the stop's grace writes its outcome after the
    close: it is told the sender has stopped, and no sending task is left running."""
    sender = BatchingSender(cast(Any, _CountingProducer()))
    await sender.send([("attempts", b"k", b"1")])
    await sender.close()
    with pytest.raises(DependencyUnavailable, match="stopped"):
        await asyncio.wait_for(sender.send_each([("attempts", b"k", b"2")]), 5)
    assert sender._task is None or sender._task.done()
