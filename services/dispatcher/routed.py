"""Writing records the broker may refuse in part, and the ones it will never take.

A batch fans out to many partitions. When the broker refuses some of its records, the
caller sends only those again: sending the whole batch again would deliver every record
the broker had already taken once more, on every round of an outage. A record the broker
will never take (too large for it) is sent alone once, then replaced by a dead letter of
the record it came from (``set_aside_too_large``, which the api's delivery log shares).
"""

from __future__ import annotations

from aiokafka import AIOKafkaProducer, ConsumerRecord

from services.shared import OutRecord, SetAside, Topics, send_each, set_aside_too_large

from .errors import Refused

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
