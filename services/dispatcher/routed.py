"""Writing records the broker may refuse in part: each taken once, whatever fails.

A batch fans out to many partitions. When the broker refuses some of its records, only
those are sent again: sending the whole batch again (what a failed batch handler does)
would deliver every record the broker had already taken once more, on every round of an
outage. A record the broker will never take (too large for it) is sent alone once, in
case only its batch was too large, then replaced by a dead letter of the record it came
from; a dead letter it will not take either is replaced by one without the payload.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer, ConsumerRecord

from services.shared import OutRecord, Topics, dead_letter_record, get_logger, send_each, too_large

_SEND_AGAIN_SECONDS = 1.0

# A record set aside on the dead-letter topic instead, with the reason.
SetAside = tuple[ConsumerRecord, str]


async def send_routed(
    producer: AIOKafkaProducer,
    topics: Topics,
    out: list[OutRecord],
    sources: list[ConsumerRecord],
) -> list[SetAside]:
    """Send ``out`` (``sources[i]`` is the record ``out[i]`` came from) until the broker
    has taken every record; returns the records dead-lettered on the way instead."""
    log = get_logger("dispatcher")
    out = list(out)
    set_aside: list[SetAside] = []
    pending = list(range(len(out)))
    while True:
        errors = await send_each(producer, [out[index] for index in pending])
        failed = {pending[j]: error for j, error in errors.items()}
        failed = await set_aside_too_large(producer, topics, out, sources, failed, set_aside)
        if not failed:
            return set_aside
        log.warning(
            "routed_records_refused", records=len(failed), error=str(next(iter(failed.values())))
        )
        await asyncio.sleep(_SEND_AGAIN_SECONDS)
        pending = sorted(failed)


async def set_aside_too_large(
    producer: AIOKafkaProducer,
    topics: Topics,
    out: list[OutRecord],
    sources: list[ConsumerRecord],
    failed: dict[int, BaseException],
    set_aside: list[SetAside],
) -> dict[int, BaseException]:
    """Of the records of ``out`` a packed send failed on (by index), send those refused for
    their size alone, then, refused again, as a dead letter of their source (noted in
    ``set_aside``). Returns the failures left, to be sent again; a record whose stand-in
    was refused for another reason is replaced in ``out`` by it."""
    left: dict[int, BaseException] = {}
    for index, error in failed.items():
        if not too_large(error):
            left[index] = error
            continue
        source = sources[index]
        stand_ins: list[tuple[OutRecord, str | None]] = [(out[index], None)]
        if out[index][0] != topics.dead_letter:
            reason = f"what it became is refused by the broker: {error}"
            stand_ins.append((dead_letter_record(topics, source, reason), reason))
        reason = f"its dead letter is refused by the broker: {error}"
        stand_ins.append((dead_letter_record(topics, source, reason, with_payload=False), reason))
        for record, noted in stand_ins:
            [*refused] = (await send_each(producer, [record])).values()
            if not refused:
                if noted is not None:
                    set_aside.append((source, noted))
                break
            if not too_large(refused[0]):
                out[index] = record
                left[index] = refused[0]
                break
        else:
            # Not even a dead letter without its payload: the topic itself is wrong, which
            # the operator must mend; the record waits for it.
            out[index] = stand_ins[-1][0]
            left[index] = error
    return left
