"""The delivery log's queries and the replay route refuse values past their limits."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from services.api import deliveries, delivery_log
from services.api.context import CONTEXT
from services.shared import Attempt, as_utc, tables, utcnow
from tests.conftest import Stack, fail_nth_call
from tests.samples import sample_event

NAIVE = "2026-01-01T00:00:00"
AWARE = "2026-01-01T00:00:00Z"


async def _call(stack: Stack, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with stack.session.request(
        method,
        f"{stack.api_url}/v1/teams/{stack.team_id}{path}",
        headers=stack.headers(),
        **kwargs,
    ) as response:
        return response.status, await response.json()


def _deliveries_published(stack: Stack) -> float:
    value = stack.api.metrics.registry.get_sample_value(
        "hookwire_api_events_published_total", {"type": "delivery"}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/deliveries", {"cursor": "1." + "m" * 63}, "cursor"),
        ("/deliveries", {"webhook_id": "w" * 65}, "webhook_id"),
        ("/deliveries", {"until": NAIVE}, "until"),
        ("/deliveries", {"until": "soon"}, "until"),
        ("/deliveries", {"since": "1700000000"}, "since"),
        ("/deliveries", {"limit": "501"}, "limit"),
        ("/deliveries", {"state": ""}, "state"),
        ("/webhooks/{id}/deliveries", {"cursor": "1." + "m" * 63}, "cursor"),
        ("/webhooks/{id}/deliveries", {"until": NAIVE}, "until"),
        ("/webhooks/{id}/deliveries", {"colour": "red"}, "colour"),
    ],
)
async def test_bad_delivery_queries_get_422_naming_them(
    api_stack: Stack, path: str, params: dict[str, str], field: str
) -> None:
    """Over-long cursors and ids, naive or unreadable times, unknown parameters."""
    webhook = await api_stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    status, body = await _call(api_stack, "GET", path.format(id=webhook["id"]), params=params)
    assert status == 422, body
    assert body["error"]["code"] == "validation_failed"
    assert [problem["field"] for problem in body["error"]["details"]] == [field]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"since": AWARE, "until": NAIVE}, "until"),
        ({"since": AWARE, "until": "tomorrow"}, "until"),
        ({"since": AWARE, "until": "9999-12-31T23:00:00-05:00"}, "until"),
        ({"since": AWARE, "only_failed": []}, "only_failed"),
        # Not read as "true", nor as seconds since 1970.
        ({"since": AWARE, "only_failed": "yes"}, "only_failed"),
        ({"since": 1767225600}, "since"),
        # Digits in a string were read as seconds too: "2026" is 1970's first half hour,
        # and the whole log would have been sent again.
        ({"since": "2026"}, "since"),
        ({"since": "20261122"}, "since"),
        ({"since": AWARE, "until": "1767225600000"}, "until"),
        ([{"since": AWARE}], "body"),
    ],
)
async def test_bad_replays_get_422_and_send_nothing(
    api_stack: Stack, body: Any, field: str
) -> None:
    """A replay whose window cannot be read as two UTC instants is refused whole: the
    logged delivery a good replay of the same webhook re-sends is not sent."""
    webhook = await api_stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    await _log_a_delivery(api_stack, webhook["id"])
    replay = f"/webhooks/{webhook['id']}/replay"
    status, answer = await _call(api_stack, "POST", replay, json=body)
    assert status == 422, answer
    assert field in [problem["field"] for problem in answer["error"]["details"]]
    assert _deliveries_published(api_stack) == 0
    status, answer = await _call(api_stack, "POST", replay, json={"since": AWARE})
    assert (status, answer["replayed"]) == (202, 1)
    assert _deliveries_published(api_stack) == 1


async def test_a_replay_sends_nothing_first_made_while_it_runs(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no ``until``, the window ends when the call came: a delivery first made while
    the replay goes through its chunks is not sent again moments after its first attempt;
    the audit record names the end used."""
    webhook = await api_stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    for name in ("msg_first", "msg_second"):
        await _log_a_delivery(api_stack, webhook["id"], name)
    monkeypatch.setattr(deliveries, "_REPLAY_CHUNK", 1)
    publish = deliveries._publish
    chunks = 0

    async def meanwhile_a_new_delivery(ctx: Any, chosen: Any) -> None:
        nonlocal chunks
        chunks += 1
        await publish(ctx, chosen)
        if chunks <= 3:
            await _log_a_delivery(api_stack, webhook["id"], f"msg_during_{chunks}")

    monkeypatch.setattr(deliveries, "_publish", meanwhile_a_new_delivery)
    replay = f"/webhooks/{webhook['id']}/replay"
    status, answer = await _call(api_stack, "POST", replay, json={"since": AWARE})
    assert (status, answer["replayed"]) == (202, 2)
    assert chunks == 2
    [window] = await _replay_audits(api_stack)
    assert window["until"] is not None


async def test_a_replay_the_database_stops_part_way_says_how_far_it_went(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first chunk went out, the log's next read failed: a 503 saying how many were
    re-sent and where to go on from (a 500 would have the caller send them again), the
    unread chunk's budget given back, and the replay audited as cut short."""
    webhook = await api_stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    for name in ("msg_one", "msg_two"):
        await _log_a_delivery(api_stack, webhook["id"], name)
    monkeypatch.setattr(deliveries, "_REPLAY_CHUNK", 1)
    fail_nth_call(
        monkeypatch,
        delivery_log,
        "oldest_first",
        2,
        OperationalError("SELECT", {}, Exception("the database went away")),
    )
    budget = api_stack.api.app[CONTEXT].resends  # type: ignore[index]
    replay = f"/webhooks/{webhook['id']}/replay"
    status, answer = await _call(api_stack, "POST", replay, json={"since": AWARE})
    assert status == 503, answer
    assert answer["error"]["code"] == "replay_interrupted"
    assert answer["error"]["details"]["replayed"] == 1
    async with api_stack.api.engine.connect() as conn:
        second = (
            await conn.execute(
                select(tables.deliveries.c.created_at).where(tables.deliveries.c.id == "msg_two")
            )
        ).scalar_one()
    # From the first one not sent (since is inclusive: the one sent is not sent again).
    assert datetime.fromisoformat(answer["error"]["details"]["resume_since"]) == as_utc(second)
    assert _deliveries_published(api_stack) == 1
    # One re-send spent, not two: the unread chunk's was given back.
    assert budget.seconds_until(api_stack.team_id, budget.capacity - 1) == 0
    [audited] = await _replay_audits(api_stack)
    assert (audited["replayed"], audited["truncated"]) == (1, True)


async def _replay_audits(stack: Stack) -> list[Any]:
    """The details of every `webhook.replayed` audit record."""
    async with stack.api.engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    select(tables.audit_log.c.details).where(
                        tables.audit_log.c.action == "webhook.replayed"
                    )
                )
            ).scalars()
        )


async def _log_a_delivery(stack: Stack, webhook_id: str, delivery_id: str = "msg_logged") -> None:
    """A failed delivery in the log, as the attempt recorder would store it."""
    event = sample_event(id=f"evt_{delivery_id}", team_id=stack.team_id)
    attempt = Attempt(
        delivery_id=delivery_id,
        event_id=event.id,
        webhook_id=webhook_id,
        team_id=stack.team_id,
        attempt=1,
        attempted_at=utcnow(),
        outcome="failed",
        status_code=500,
        final=True,
        event=event,
    )
    async with stack.api.engine.begin() as conn:
        assert await delivery_log.record_attempts(conn, [attempt]) == [attempt]
