"""Reading back the first attempts put off in a retry topic when deliveries partitions
change hands (a rebalance, a restart): new events for their webhooks then wait behind
them here, as they would have in the process that put them off (decision 54).

A put-off first attempt waits in the first retry topic, keyed by its webhook like its
delivery, until the retry timer forwards it. Whatever the retry group has not committed
past may still be waiting, so that is what is read: from the group's commit point to the
end of each partition that can hold the keys of the partitions taken over.

One forwarded back already may still wait in ``deliveries`` behind a newer event routed
before it came back (the partition had a backlog); so the partitions taken over are read
too, from the delivery group's commit point, for the last such put-off of each webhook
(decision 61).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import datetime, timedelta

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.shared import (
    NOT_BEFORE_AHEAD_MAX,
    DependencyUnavailable,
    Settings,
    error_text,
    get_logger,
    make_consumer,
    partition_of,
    partitions_of,
    start_client,
    stop_client,
    utcnow,
)

from .retry_timer import EPOCH, Waiting

_FETCH_WAIT_MS = 100
_FETCH_RECORDS = 2000


def note_put_offs(
    last: dict[str, int],
    records: Iterable[ConsumerRecord],
    partitions: Collection[int],
    of: int,
) -> None:
    """Into ``last``: per webhook whose deliveries are in ``partitions`` (of ``of``), the
    time in microseconds its last put-off first attempt among ``records`` wakes. Retries
    keep no order and are left out; so is a record without a readable time (forwarded at
    once, it orders nothing)."""
    for webhook_id, entry in _put_offs_among(records, partitions, of):
        last[webhook_id] = max(last.get(webhook_id, 0), entry.due_us)


def note_forwarded(
    last: dict[str, int],
    records: Iterable[ConsumerRecord],
    partitions: Collection[int],
    of: int,
) -> None:
    """Into ``last``: per webhook, the offset of its last put-off first attempt among
    these ``deliveries`` records (forwarded back there by the retry timer)."""
    for webhook_id, entry in _put_offs_among(records, partitions, of):
        # Where its webhook's deliveries are placed: the offset orders only those.
        if entry.partition == partition_of(entry.key or b"", of):
            last[webhook_id] = max(last.get(webhook_id, -1), entry.offset)


def _put_offs_among(
    records: Iterable[ConsumerRecord], partitions: Collection[int], of: int
) -> Iterator[tuple[str, Waiting]]:
    latest_us = (utcnow() + NOT_BEFORE_AHEAD_MAX - EPOCH) // timedelta(microseconds=1)
    for record in records:
        if b'"not_before"' not in (record.value or b""):
            continue  # a new delivery, without parsing it: most of a backlog
        entry = Waiting.of(record)
        if not entry.first_attempt or entry.key is None or not 0 < entry.due_us <= latest_us:
            # Due further ahead than any wait: written by hand, and dead-lettered when
            # forwarded. A hold until then would put off every new event of the webhook.
            continue
        if partition_of(entry.key, of) not in partitions:
            continue
        try:
            webhook_id = entry.key.decode()
        except UnicodeDecodeError:
            continue
        yield webhook_id, entry


Note = Callable[[dict[str, int], Iterable[ConsumerRecord], Collection[int], int], None]


async def read_put_offs(
    settings: Settings,
    retries: AIOKafkaConsumer,
    topic: str,
    partitions: Collection[int],
    of: int,
    *,
    within: float,
) -> dict[str, datetime]:
    """Per webhook whose deliveries are in ``partitions`` of ``of``, when its last put-off
    first attempt in ``topic`` wakes. What was read is returned even when the broker
    fails the read or it takes longer than ``within`` seconds: the partitions must not
    wait for ever, and every webhook found still orders its new events.

    ``retries`` is a consumer of the retry group, asked for its commit points."""
    last = await _read(settings, retries, topic, partitions, of, within, note_put_offs)
    return {webhook: EPOCH + timedelta(microseconds=us) for webhook, us in last.items()}


async def read_forwarded(
    settings: Settings,
    deliverer: AIOKafkaConsumer,
    topic: str,
    partitions: Collection[int],
    of: int,
    *,
    within: float,
) -> dict[str, int]:
    """Per webhook whose deliveries are in ``partitions`` of ``topic`` (``deliveries``,
    ``of`` partitions), the offset of its last put-off first attempt forwarded back there
    and not yet delivered: read from the delivery group's commit points (``deliverer``
    is a consumer of that group). Bounded and forgiving like ``read_put_offs``."""
    return await _read(settings, deliverer, topic, partitions, of, within, note_forwarded)


async def _read(
    settings: Settings,
    group: AIOKafkaConsumer,
    topic: str,
    partitions: Collection[int],
    of: int,
    within: float,
    note: Note,
) -> dict[str, int]:
    last: dict[str, int] = {}
    reader = make_consumer(settings, group_id=None)
    try:
        async with asyncio.timeout(within):
            await start_client(reader, settings)
            every = {partition.partition for partition in await partitions_of(reader, topic)}
            # Placed by its key, a webhook's records share a partition number across
            # topics with as many partitions; otherwise any partition may hold them.
            numbers = set(partitions) & every if len(every) == of else every
            wanted = [TopicPartition(topic, number) for number in sorted(numbers)]
            if wanted:
                reader.assign(wanted)
                for partition in wanted:
                    committed = await group.committed(partition)
                    if committed is None:
                        await reader.seek_to_beginning(partition)
                    else:
                        reader.seek(partition, committed)
                ends: dict[TopicPartition, int] = {}
                while not await _read_to(reader, wanted, ends):
                    batches = await reader.getmany(
                        timeout_ms=_FETCH_WAIT_MS, max_records=_FETCH_RECORDS
                    )
                    for records in batches.values():
                        note(last, records, partitions, of)
    except TimeoutError:
        get_logger("dispatcher").warning("put_offs_not_read", topic=topic, within_seconds=within)
    except (KafkaError, DependencyUnavailable) as exc:
        get_logger("dispatcher").warning("put_offs_not_read", topic=topic, error=error_text(exc))
    finally:
        await stop_client(reader)
    return last


async def _read_to(
    reader: AIOKafkaConsumer, wanted: list[TopicPartition], ends: dict[TopicPartition, int]
) -> bool:
    """Every partition read to the end it had when a fetch first showed it (its high-water
    mark: the embedded broker's end_offsets() is wrong after a batch). Not to its moving
    end: a topic written at a high rate (``deliveries`` under load) can grow as fast as it
    is read."""
    for partition in wanted:
        if partition not in ends:
            end = reader.highwater(partition)
            if end is None:
                return False
            ends[partition] = end
        if await reader.position(partition) < ends[partition]:
            return False
    return True
