"""A partition taken over whose backlog holds put-offs its last owner had forwarded back
and not yet sent: a webhook's new first attempts ahead of them wait until the last of
them has started, as they would have with the last owner (decision 61); a partition that
fills its share of the backlog with such records lets them go rather than stop for good."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiokafka import ConsumerRecord, TopicPartition

from services.dispatcher.lanes import Lanes, Pace
from services.shared import OutRecord
from tests.unit.test_lanes_rebalance import OWNED, _Consumer, _until

NEW = b'{"attempt":1}'
PUT_OFF = b'{"attempt":1,"not_before":"2026-12-06T00:00:00Z"}'


def _record(offset: int, value: bytes, key: bytes = b"wh") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(OWNED.topic, OWNED.partition, offset, 0, 0, key, value, None, 2, 2, [])


async def _sent_in_order(
    records: list[ConsumerRecord[bytes, bytes]],
    ahead: dict[bytes, int],
    *,
    backlog_max: int = 100,
    expected: int,
    then: list[ConsumerRecord[bytes, bytes]] | None = None,
) -> list[int]:
    consumer = _Consumer()
    sent: list[int] = []

    async def attempt(record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        sent.append(record.offset)
        return []

    async def publish(_source: ConsumerRecord, records: list[OutRecord]) -> None:
        pass

    async def taken_over(partitions: set[TopicPartition]) -> dict[TopicPartition, Any]:
        return {OWNED: ahead}

    lanes = Lanes(
        cast(Any, consumer),
        attempt,
        publish,
        per_lane=1,
        backlog_max=backlog_max,
        on_gained=taken_over,
    )
    running = asyncio.create_task(lanes.run())
    try:
        await _until(lambda: OWNED not in consumer.paused and lanes._owned == {OWNED})
        await consumer.batches.put({OWNED: records})
        if then is not None:
            await consumer.batches.put({OWNED: then})
        await _until(lambda: len(sent) == expected)
        await asyncio.sleep(0.05)
        return sent
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_new_first_attempts_ahead_of_forwarded_put_offs_start_after_the_last_one() -> None:
    records = [
        _record(0, NEW),
        _record(1, PUT_OFF),
        _record(2, NEW),
        _record(3, PUT_OFF),  # the last put-off forwarded back
        _record(4, NEW),
        _record(5, NEW, key=b"other"),
    ]
    sent = await _sent_in_order(records, {b"wh": 3}, expected=6)
    assert [offset for offset in sent if offset != 5] == [1, 3, 0, 2, 4]
    assert 5 in sent, "another webhook's deliveries are not held"


async def test_a_partition_full_of_records_set_aside_lets_them_go() -> None:
    """The put-off they wait for lies beyond the partition's share of the backlog: it
    could never be fetched, so they go in their own order rather than wait for ever."""
    records = [_record(offset, NEW) for offset in range(4)]
    sent = await _sent_in_order(records, {b"wh": 10}, backlog_max=4, expected=4)
    assert sent == [0, 1, 2, 3]


async def test_an_event_whose_data_holds_the_words_not_before_is_still_a_new_one() -> None:
    mentions = b'{"attempt":1,"event":{"data":{"not_before":"2026-12-06T00:00:00Z"}}}'
    sent = await _sent_in_order([_record(0, mentions), _record(1, PUT_OFF)], {b"wh": 1}, expected=2)
    assert sent == [1, 0]


async def test_records_set_aside_keep_waiting_once_the_put_off_is_fetched() -> None:
    """The partition holds its share, but not with records set aside alone: the put-off
    they wait for is fetched and releases them when it starts; they do not jump it."""
    records = [_record(0, NEW), _record(1, PUT_OFF), _record(2, PUT_OFF)]
    sent = await _sent_in_order(records, {b"wh": 2}, backlog_max=3, expected=3)
    assert sent == [1, 2, 0]


async def test_records_set_aside_go_when_their_put_off_is_no_longer_in_the_log() -> None:
    """The partition was read past the put-off's offset without it (retention removed it
    meanwhile): nothing would ever release them, so they go."""
    records = [_record(0, NEW), _record(3, NEW, key=b"other")]
    sent = await _sent_in_order(records, {b"wh": 2}, expected=2)
    assert sorted(sent) == [0, 3]


async def test_records_set_aside_keep_waiting_while_the_full_partition_still_moves() -> None:
    """The put-off lies further than the partition's share: the share fills, but the
    put-offs fetched so far are being sent and free room for it, so nothing is given up."""
    first = [_record(0, NEW), _record(1, PUT_OFF), _record(2, PUT_OFF), _record(3, PUT_OFF)]
    then = [_record(4, PUT_OFF), _record(5, NEW)]
    sent = await _sent_in_order(first, {b"wh": 4}, backlog_max=4, expected=6, then=then)
    assert sent == [1, 2, 3, 4, 0, 5]


async def test_records_set_aside_keep_waiting_while_their_partitions_outcomes_are_written() -> None:
    """The partition holds its share: the record set aside, and three of another webhook
    sent and out of their lane, their outcomes still being written (a slow broker). Once
    written they free room and the put-off is fetched: nothing is given up meanwhile."""
    consumer = _Consumer()
    sent: list[int] = []
    written = asyncio.Event()

    async def attempt(record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        sent.append(record.offset)
        return []

    async def publish(source: ConsumerRecord, records: list[OutRecord]) -> None:
        if source.key == b"other":
            await written.wait()

    async def taken_over(partitions: set[TopicPartition]) -> dict[TopicPartition, Any]:
        return {OWNED: {b"wh": 4}}

    lanes = Lanes(
        cast(Any, consumer), attempt, publish, per_lane=1, backlog_max=4, on_gained=taken_over
    )
    running = asyncio.create_task(lanes.run())
    try:
        await _until(lambda: OWNED not in consumer.paused and lanes._owned == {OWNED})
        others = [_record(offset, NEW, key=b"other") for offset in (1, 2, 3)]
        await consumer.batches.put({OWNED: [_record(0, NEW), *others]})
        await _until(lambda: sent == [1, 2, 3])
        await asyncio.sleep(0.5)  # a few turns of the loop with the partition full
        assert sent == [1, 2, 3]
        written.set()
        await consumer.batches.put({OWNED: [_record(4, PUT_OFF)]})
        await _until(lambda: len(sent) == 5)
        assert sent == [1, 2, 3, 4, 0]
    finally:
        written.set()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
