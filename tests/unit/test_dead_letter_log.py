"""A record set aside on the dead-letter topic is counted, and its log line says where it
came from, as the dead letter does."""

from __future__ import annotations

import structlog
from aiokafka import ConsumerRecord

from services.dispatcher.handler import DeliveryMetrics, invalid_record
from services.shared import DeadLetter, Metrics, Topics, decode


def test_the_log_line_names_the_records_place() -> None:
    metrics = DeliveryMetrics(Metrics("test_dead_letter_log"))
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        "hookwire.events", 4, 1234, 0, 0, b"k", b"not json", None, 1, 8, []
    )
    with structlog.testing.capture_logs() as logs:
        topic, _, value = invalid_record(metrics, Topics("hookwire."), record, "not an event")
    [logged] = [log for log in logs if log["event"] == "record_dead_lettered"]
    assert (logged["topic"], logged["partition"], logged["offset"], logged["reason"]) == (
        "hookwire.events",
        4,
        1234,
        "not an event",
    )
    letter = decode(DeadLetter, value)
    assert (topic, letter.source_partition, letter.source_offset) == (
        "hookwire.dead-letter",
        4,
        1234,
    )
    assert metrics.dead_letters.labels("invalid_record")._value.get() == 1
