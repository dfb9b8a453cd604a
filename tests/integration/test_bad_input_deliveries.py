"""The delivery log's queries and the replay route refuse values past their limits."""

from __future__ import annotations

from typing import Any

import pytest

from services.api import delivery_log
from services.shared import Attempt, utcnow
from tests.conftest import Stack
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


async def _log_a_delivery(stack: Stack, webhook_id: str) -> None:
    """A failed delivery in the log, as the attempt recorder would store it."""
    event = sample_event(id="evt_logged", team_id=stack.team_id)
    attempt = Attempt(
        delivery_id="msg_logged",
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
