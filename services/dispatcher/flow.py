"""Holding back a consumer while too much of what it read waits in memory."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer


class FetchGate:
    """Pauses every assigned partition while the holder is full, resumes once it is not.

    A paused consumer keeps its group membership and heartbeats; it only stops fetching.
    """

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._paused = False

    def hold(self, full: bool) -> None:
        assignment = self._consumer.assignment()
        if full:
            # Every time, not once: a rebalance hands partitions back unpaused, even the
            # same ones, and a held consumer must not read its whole topic into memory.
            self._consumer.pause(*assignment)
            self._paused = True
        elif self._paused:
            self._consumer.resume(*assignment)
            self._paused = False
