"""Writing records the broker may refuse in part, and the ones it will never take.

A batch fans out to many partitions. When the broker refuses some of its records, the
caller sends only those again: sending the whole batch again would deliver every record
the broker had already taken once more, on every round of an outage. A record the broker
will never take (too large for it) is sent alone once, in case only its batch was too
large, then replaced by a dead letter of the record it came from; a dead letter it will
not take either is replaced by one without the payload.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaProducer, ConsumerRecord

from services.shared import OutRecord, Topics, dead_letter_record, send_each, too_large

from .errors import Refused, SetAside

# Which record of a batch, made from which event record: a batch handled again after a
# refusal skips what the broker took in the earlier try.
RoutedIdentity = tuple[str, int, int, str, bytes | None]


def routed_identity(record: OutRecord, source: ConsumerRecord) -> RoutedIdentity:
    topic, key, _ = record
    return (source.topic, source.partition, source.offset, topic, key)


async def send_routed(
    producer: AIOKafkaProducer,
    topics: Topics,
    out: list[OutRecord],
    sources: list[ConsumerRecord],
) -> list[SetAside]:
    """Send ``out`` (``sources[i]`` is the record ``out[i]`` came from) once; returns the
    records dead-lettered instead, or raises ``Refused`` naming those not taken."""
    set_aside: list[SetAside] = []
    errors = await send_each(producer, out)
    failed = await set_aside_too_large(
        lambda records: send_each(producer, records), topics, list(out), sources, errors, set_aside
    )
    if failed:
        raise Refused(failed, set_aside)
    return set_aside


# Sends records, returning the error of each the broker did not take (by index).
SendEach = Callable[[list[OutRecord]], Awaitable[dict[int, BaseException]]]


async def set_aside_too_large(
    send: SendEach,
    topics: Topics,
    out: list[OutRecord],
    sources: list[ConsumerRecord],
    failed: dict[int, BaseException],
    set_aside: list[SetAside],
) -> dict[int, BaseException]:
    """Of the records of ``out`` a packed send failed on (by index), send those refused for
    their size alone, then, refused again, as a dead letter of their source (noted in
    ``set_aside``). Returns the failures left.

    Every such record takes its next step at the same time as the others: a retry timer
    holding many of them does so in three rounds, not three per record, while its turn is
    locked (a hand-over waits for the turn)."""
    left = {index: error for index, error in failed.items() if not too_large(error)}
    steps = {
        index: _stand_ins(topics, out[index], sources[index], error)
        for index, error in failed.items()
        if too_large(error)
    }
    while steps:
        trying = [(index, stand_ins.pop(0)) for index, stand_ins in steps.items()]
        answers = await asyncio.gather(*(send([record]) for _, (record, _) in trying))
        for (index, (_, note)), refusals in zip(trying, answers, strict=True):
            [*refused] = refusals.values()
            if not refused:
                if note is not None:
                    set_aside.append((sources[index], note))
            elif not too_large(refused[0]):
                left[index] = refused[0]
            elif steps[index]:
                continue
            else:
                # Not even a dead letter without its payload: the topic itself is wrong,
                # which the operator must mend; the record waits for it.
                left[index] = failed[index]
            del steps[index]
    return left


def _stand_ins(
    topics: Topics, record: OutRecord, source: ConsumerRecord, error: BaseException
) -> list[tuple[OutRecord, str | None]]:
    """What to send in turn for a record refused for its size, each with the reason its
    source is noted as set aside (None: not a new dead letter)."""
    topic, key, _ = record
    stand_ins: list[tuple[OutRecord, str | None]] = [(record, None)]
    # A dead letter already is counted as one; its stand-in without the payload is not a
    # second.
    noted: str | None = None
    if topic != topics.dead_letter:
        for_key = "" if key is None else f" for {key.decode(errors='replace')}"
        noted = f"its record{for_key} on {topic} is refused by the broker: {error}"
        stand_ins.append((dead_letter_record(topics, source, noted), noted))
    bare_reason = f"{noted or 'its dead letter is refused by the broker'} (payload left out)"
    stand_ins.append((dead_letter_record(topics, source, bare_reason, with_payload=False), noted))
    return stand_ins
