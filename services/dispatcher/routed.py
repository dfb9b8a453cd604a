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


# Records a dead letter names, when many of one source are refused.
_NAMED_AT_MOST = 10

# Sends records, returning the error of each the broker did not take (by index).
SendEach = Callable[[list[OutRecord]], Awaitable[dict[int, BaseException]]]


async def set_aside_too_large(
    send: SendEach,
    topics: Topics,
    out: list[OutRecord],
    sources: list[ConsumerRecord],
    failed: dict[int, BaseException],
    set_aside: list[SetAside],
    replaced: set[int] | None = None,
) -> dict[int, BaseException]:
    """Of the records of ``out`` a packed send failed on (by index), send those refused for
    their size alone, then, refused again, replace them by a dead letter of their source
    (noted in ``set_aside``; their indices added to ``replaced``). Returns the failures
    left.

    A source whose records are refused together gets one dead letter naming them all: a
    delivery's attempt and retry, an event's deliveries to several webhooks, are one record
    to look into and to replay. Every source takes its next step at the same time as the
    others: a retry timer holding many of them does so in three rounds, not three per
    record, while its turn is locked (a hand-over waits for the turn)."""
    left = {index: error for index, error in failed.items() if not too_large(error)}
    big = [index for index, error in failed.items() if too_large(error)]
    # Alone first: only the batch they were packed in may have been too large.
    answers = await asyncio.gather(*(send([out[index]]) for index in big))
    refused_alone: dict[int, BaseException] = {}
    for index, refusals in zip(big, answers, strict=True):
        [*refused] = refusals.values()
        if refused and too_large(refused[0]):
            refused_alone[index] = refused[0]
        elif refused:
            left[index] = refused[0]
    by_source: dict[tuple[str, int, int], list[int]] = {}
    for index in refused_alone:
        source = sources[index]
        by_source.setdefault((source.topic, source.partition, source.offset), []).append(index)
    steps = {
        tuple(indices): _stand_ins(
            topics, [(out[index], refused_alone[index]) for index in indices], sources[indices[0]]
        )
        for indices in by_source.values()
    }
    while steps:
        trying = [(group, stand_ins.pop(0)) for group, stand_ins in steps.items()]
        answers = await asyncio.gather(*(send([record]) for _, (record, _) in trying))
        for (group, (_, note)), refusals in zip(trying, answers, strict=True):
            [*refused] = refusals.values()
            if not refused:
                if note is not None:
                    set_aside.append((sources[group[0]], note))
                if replaced is not None:
                    replaced.update(group)
            elif not too_large(refused[0]):
                left.update(dict.fromkeys(group, refused[0]))
            elif steps[group]:
                continue
            else:
                # Not even a dead letter without its payload: the topic itself is wrong,
                # which the operator must mend; the records wait for it.
                left.update({index: failed[index] for index in group})
            del steps[group]
    return left


def _stand_ins(
    topics: Topics, refused: list[tuple[OutRecord, BaseException]], source: ConsumerRecord
) -> list[tuple[OutRecord, str | None]]:
    """What to send in turn for a source whose ``refused`` records the broker will not
    take even alone, each with the reason the source is noted as set aside (None: not a
    new dead letter)."""
    # A dead letter already is counted as one; its stand-in without the payload is not a
    # second.
    noted: str | None = None
    named = [
        f"{_for_key(key)} on {topic}"
        for (topic, key, _), _ in refused
        if topic != topics.dead_letter
    ]
    stand_ins: list[tuple[OutRecord, str | None]] = []
    if named:
        error = refused[0][1]
        # An event of a team with a thousand webhooks would name them all in 55 KB.
        listed = ",".join(named[:_NAMED_AT_MOST])
        if len(named) > _NAMED_AT_MOST:
            listed += f" and {len(named) - _NAMED_AT_MOST} more"
        noted = (
            f"its record{named[0]} is refused by the broker: {error}"
            if len(named) == 1
            else f"its records{listed} are refused by the broker: {error}"
        )
        stand_ins.append((dead_letter_record(topics, source, noted), noted))
    bare_reason = f"{noted or 'its dead letter is refused by the broker'} (payload left out)"
    stand_ins.append((dead_letter_record(topics, source, bare_reason, with_payload=False), noted))
    return stand_ins


def _for_key(key: bytes | None) -> str:
    return "" if key is None else f" for {key.decode(errors='replace')}"
