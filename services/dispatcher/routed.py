"""Writing what the router made of a batch: every record taken once, whatever fails.

A batch fans out to many partitions. When the broker refuses some of its records, only
those are sent again: sending the whole batch again (what a failed batch handler does)
would deliver every record the broker had already taken once more, on every round of an
outage. A record the broker will never take (too large for it) is sent alone once, in
case only its batch was too large, then replaced by a dead letter of the event it came
from; a dead letter it will not take either is replaced by one without the payload.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer, ConsumerRecord

from services.shared import OutRecord, Topics, dead_letter_record, get_logger, send_each, too_large

_SEND_AGAIN_SECONDS = 1.0


async def send_routed(
    producer: AIOKafkaProducer,
    topics: Topics,
    out: list[OutRecord],
    sources: list[ConsumerRecord],
) -> list[tuple[ConsumerRecord, str]]:
    """Send ``out`` (``sources[i]`` is the event record ``out[i]`` came from) until the
    broker has taken every record; returns the events dead-lettered on the way, with the
    reason."""
    log = get_logger("dispatcher")
    out = list(out)
    alone: set[int] = set()
    bare: set[int] = set()
    letters: list[tuple[ConsumerRecord, str]] = []
    pending = list(range(len(out)))
    while pending:
        failed = await _send(producer, out, pending, alone)
        again: list[int] = []
        wait = False
        for index, error in failed.items():
            again.append(index)
            if not too_large(error):
                wait = True
            elif index not in alone:
                # Its batch may have been what was too large: alone, it may pass.
                alone.add(index)
            elif out[index][0] != topics.dead_letter:
                reason = f"what it routes to is refused by the broker: {error}"
                out[index] = dead_letter_record(topics, sources[index], reason)
                letters.append((sources[index], reason))
            elif index not in bare:
                bare.add(index)
                reason = f"its dead letter is refused by the broker: {error}"
                out[index] = dead_letter_record(topics, sources[index], reason, with_payload=False)
            else:
                # Not even a dead letter without its payload: the topic itself is wrong,
                # which the operator must mend; the batch waits for it.
                wait = True
        if again:
            first = failed[again[0]]
            log.warning("routed_records_refused", records=len(again), error=str(first))
        if wait:
            await asyncio.sleep(_SEND_AGAIN_SECONDS)
        pending = sorted(again)
    return letters


async def _send(
    producer: AIOKafkaProducer, out: list[OutRecord], pending: list[int], alone: set[int]
) -> dict[int, BaseException]:
    """Errors by index into ``out``: the records in ``alone`` each in a request of its own,
    the rest packed together."""
    packed = [index for index in pending if index not in alone]
    single = [index for index in pending if index in alone]
    results = await asyncio.gather(
        send_each(producer, [out[index] for index in packed]),
        *(send_each(producer, [out[index]]) for index in single),
    )
    failed = {packed[j]: error for j, error in results[0].items()}
    for index, errors in zip(single, results[1:], strict=True):
        if errors:
            failed[index] = errors[0]
    return failed
