"""Stopping the batching sender while callers wait on it."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from services.shared import BatchingSender, DependencyUnavailable


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
