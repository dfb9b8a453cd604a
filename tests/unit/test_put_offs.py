"""Which records in a retry partition order a webhook's new events (decision 54)."""

from __future__ import annotations

from aiokafka import ConsumerRecord

from services.dispatcher.put_offs import note_put_offs

_WAKES = b'{"attempt": 1, "not_before": "2026-01-01T00:00:00.000007+00:00"}'


def _record(key: bytes | None, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("t.retry.1", 0, 0, 0, 0, key, value, None, 0, len(value), [])


def test_records_that_order_nothing_are_passed_over() -> None:
    last: dict[str, int] = {}
    note_put_offs(
        last,
        [
            _record(b"wh_1", b"not json"),  # forwarded at once: it orders nothing
            _record(None, _WAKES),  # no webhook to hold
            _record(b"\xff\xfe", _WAKES),  # no webhook id either
            # Further ahead than any wait: written by hand, dead-lettered once forwarded;
            # held to, it would put off every new event of the webhook for centuries.
            _record(b"wh_2", _WAKES.replace(b"2026", b"2226")),
            _record(b"wh_2", _WAKES),
        ],
        partitions={0},
        of=1,
    )
    assert last == {"wh_2": 1_767_225_600_000_007}
