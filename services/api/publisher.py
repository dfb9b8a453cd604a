"""Publishing records to Kafka, acknowledged only once the broker has them (acks=all)."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.shared import Event, Topics

from .errors import PublishUnavailable


class Publisher:
    def __init__(self, producer: AIOKafkaProducer, topics: Topics) -> None:
        self._producer = producer
        self._topics = topics

    async def _send(self, topic: str, key: str, value: bytes) -> None:
        try:
            await self._producer.send_and_wait(topic, value=value, key=key.encode())
        except KafkaError as exc:
            raise PublishUnavailable(f"event stream is unavailable: {exc}") from exc

    async def event(self, event: Event) -> None:
        # Keyed by object so that one object's events stay in order.
        await self._send(
            self._topics.events, f"{event.team_id}/{event.object_id}", event.to_bytes()
        )
