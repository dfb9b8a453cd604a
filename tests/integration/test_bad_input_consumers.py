"""Attempt records that name a webhook with another team's id are no evidence about it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import select

from services.shared import Attempt, Settings, tables, topics_for, utcnow
from tests.conftest import Stack, audit_count, dead_letters, running_stack, send_records
from tests.samples import sample_event


def _attempt(team_id: str, delivery_id: str, webhook_id: str, **fields: Any) -> Attempt:
    event = sample_event(
        id=f"evt_{delivery_id}", team_id=team_id, occurred_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    values: dict[str, Any] = {
        "delivery_id": delivery_id,
        "event_id": event.id,
        "webhook_id": webhook_id,
        "team_id": team_id,
        "attempt": 1,
        "attempted_at": utcnow(),
        "outcome": "failed",
        "status_code": 410,
        "final": True,
        "event": event,
    }
    return Attempt(**{**values, **fields})


async def _stored(stack: Stack, delivery_id: str, within: float = 10.0) -> None:
    """Until the delivery log holds the delivery (whatever team it names)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        async with stack.api.engine.connect() as conn:
            found = (
                await conn.execute(
                    select(tables.deliveries.c.id).where(tables.deliveries.c.id == delivery_id)
                )
            ).first()
        if found is not None:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{delivery_id} never stored"
        await asyncio.sleep(0.05)


async def _webhook(stack: Stack, webhook_id: str) -> Any:
    async with stack.api.engine.connect() as conn:
        return (
            await conn.execute(select(tables.webhooks).where(tables.webhooks.c.id == webhook_id))
        ).one()


async def test_another_teams_disable_request_leaves_the_webhook_alone(
    settings: Settings,
) -> None:
    """A request to disable a webhook (a 410, or failing for days) carried by an attempt
    whose team is not the webhook's: the webhook stays active, unaudited, its failure
    clock untouched; the same request with the right team, written after it, disables it."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = await stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
        topics = topics_for(stack.settings)
        foreign = [
            _attempt(
                "team_someone_else",
                "msg_foreign_gone",
                webhook["id"],
                disable_reason="the endpoint answered 410 Gone",
            ),
            # Failures far enough apart to disable it, were they this webhook's.
            *(
                _attempt(
                    "team_someone_else",
                    f"msg_foreign_{n}",
                    webhook["id"],
                    attempted_at=utcnow() + timedelta(days=30 * n),
                    status_code=500,
                    final=False,
                )
                for n in (0, 1)
            ),
        ]
        # Skipped: no evidence either way, so it cannot clear what the others set.
        marker = _attempt(
            stack.team_id, "msg_marker", webhook["id"], outcome="skipped", status_code=None
        )
        # One key: one partition, so the marker is written after the foreign records.
        await send_records(
            stack, topics.attempts, b"k", [record.to_bytes() for record in (*foreign, marker)]
        )
        await _stored(stack, "msg_marker")
        # Nor do they show in either team's delivery log.
        async with stack.api.engine.connect() as conn:
            logged = (
                await conn.execute(
                    select(tables.deliveries.c.id).where(
                        tables.deliveries.c.id.in_([a.delivery_id for a in foreign])
                    )
                )
            ).all()
        assert logged == []
        row = await _webhook(stack, webhook["id"])
        assert row.active is True
        assert row.failing_since is None
        assert await audit_count(stack, "webhook.disabled", webhook["id"]) == 0

        own = foreign[0].model_copy(
            update={
                "team_id": stack.team_id,
                "delivery_id": "msg_own",
                "attempted_at": utcnow(),
            }
        )
        await send_records(stack, topics.attempts, b"k", [own.to_bytes()])
        await _stored(stack, "msg_own")
        assert (await _webhook(stack, webhook["id"])).active is False
        assert await audit_count(stack, "webhook.disabled", webhook["id"]) == 1


async def test_bad_attempt_records_are_set_aside_and_the_log_goes_on(settings: Settings) -> None:
    """An attempt record wrong in tens of thousands of places (its reason would be
    megabytes, and its dead letter refused), one whose error class holds a NUL (which
    PostgreSQL text cannot hold), and one naming a delivery of another webhook: the
    first is dead-lettered with a short reason, the second stored, the third left out
    without touching that delivery, and the good record after them is stored."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        mine = await stack.create_webhook("http://127.0.0.1:9/mine", routed=False)
        other = await stack.create_webhook("http://127.0.0.1:9/other", routed=False)
        topics = topics_for(stack.settings)
        theirs = _attempt(stack.team_id, "msg_theirs", other["id"], status_code=500, final=False)
        good = _attempt(stack.team_id, "msg_good", mine["id"], status_code=500, final=False)
        many_wrong = orjson.loads(good.to_bytes())
        many_wrong["request_headers"] = {f"h{n}": n for n in range(60_000)}
        nul = _attempt(
            stack.team_id, "msg_nul", mine["id"], error_class="bad\x00class", final=False
        )
        # Later than what the other webhook's delivery holds, and asking to disable the
        # webhook it names: left out, it is no evidence about that webhook either.
        intruder = _attempt(
            stack.team_id,
            "msg_theirs",
            mine["id"],
            attempt=2,
            disable_reason="the endpoint answered 410 Gone",
        )
        await send_records(stack, topics.attempts, b"k", [theirs.to_bytes()])
        await _stored(stack, "msg_theirs")
        await send_records(
            stack,
            topics.attempts,
            b"k",
            [orjson.dumps(many_wrong), nul.to_bytes(), intruder.to_bytes(), good.to_bytes()],
        )
        await _stored(stack, "msg_good")
        [letter] = await dead_letters(stack.settings, 1)
        assert len(letter["reason"]) < 2_100
        assert letter["reason"].startswith("request_headers.h0: Input should be a valid string")
        assert "more" in letter["reason"]
        async with stack.api.engine.connect() as conn:
            [stored_nul] = (
                await conn.execute(
                    select(tables.delivery_attempts.c.error_class).where(
                        tables.delivery_attempts.c.delivery_id == "msg_nul"
                    )
                )
            ).all()
            delivery = (
                await conn.execute(
                    select(tables.deliveries).where(tables.deliveries.c.id == "msg_theirs")
                )
            ).one()
            attempts = (
                await conn.execute(
                    select(tables.delivery_attempts.c.attempt).where(
                        tables.delivery_attempts.c.delivery_id == "msg_theirs"
                    )
                )
            ).all()
        assert stored_nul.error_class == "bad\ufffdclass"
        assert (delivery.webhook_id, delivery.state) == (other["id"], "retrying")
        assert [row.attempt for row in attempts] == [1]
        assert (await _webhook(stack, mine["id"])).active is True


async def test_an_empty_attempt_record_and_one_of_another_schema_are_dead_lettered(
    settings: Settings,
) -> None:
    """On the attempts topic, a record with no value and an attempt of a schema version
    this api does not know: each dead-lettered with the reason and counted as invalid,
    neither stored; the attempt written after them is stored."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = await stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
        topics = topics_for(stack.settings)
        other_schema = _attempt(stack.team_id, "msg_schema_99", webhook["id"], final=False)
        good = _attempt(stack.team_id, "msg_after_them", webhook["id"], final=False)
        await send_records(
            stack,
            topics.attempts,
            b"k",
            [
                None,
                orjson.dumps({**orjson.loads(other_schema.to_bytes()), "schema": 99}),
                good.to_bytes(),
            ],
        )
        await _stored(stack, "msg_after_them")
        letters = await dead_letters(stack.settings, 2)
        assert [letter["source_topic"] for letter in letters] == [topics.attempts] * 2
        assert [letter["reason"] for letter in letters] == [
            "record has no value",
            "schema: Input should be 1",
        ]
        assert letters[0]["payload"] == ""
        assert orjson.loads(letters[1]["payload"])["delivery_id"] == "msg_schema_99"
        registry = stack.api.metrics.registry
        assert (
            registry.get_sample_value(
                "hookwire_api_dead_letters_total", {"reason": "invalid_record"}
            )
            == 2
        )
        assert (
            registry.get_sample_value(
                "hookwire_api_attempts_consumed_total", {"outcome": "invalid"}
            )
            == 2
        )
        async with stack.api.engine.connect() as conn:
            stored = (
                await conn.execute(
                    select(tables.deliveries.c.id).where(tables.deliveries.c.id == "msg_schema_99")
                )
            ).all()
        assert stored == []
