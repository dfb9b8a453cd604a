"""Telling every cache that an entity changed, through the ``changes`` topic."""

from __future__ import annotations

from typing import Literal

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ._contracts import Change, Topics
from ._ids import utcnow

Entity = Literal["webhook", "token", "user", "team", "membership", "permission_group"]
Action = Literal["created", "updated", "deleted"]


class ChangeNotifier:
    def __init__(self, producer: AIOKafkaProducer, topics: Topics) -> None:
        self._producer = producer
        self._topic = topics.changes

    async def notify(
        self,
        entity: Entity,
        entity_id: str,
        action: Action,
        team_id: str | None = None,
        state: str | None = None,
    ) -> None:
        """Best effort after the change has committed: a lost notice is covered by cache TTLs
        and the dispatcher's periodic resync, so it must not fail the caller's request."""
        change = Change(
            entity=entity,
            entity_id=entity_id,
            action=action,
            team_id=team_id,
            state=state,
            at=utcnow(),
        )
        try:
            await self._producer.send_and_wait(
                self._topic, value=change.to_bytes(), key=entity_id.encode()
            )
        except KafkaError as exc:
            structlog.get_logger().warning(
                "change_not_published", entity=entity, entity_id=entity_id, error=str(exc)
            )
