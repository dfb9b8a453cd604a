"""Re-sends (retry, replay, test event): an event at the size limit can be re-sent, and
each call leaves one audit record naming who made it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
import structlog.testing
from sqlalchemy.exc import OperationalError

from services.api import deliveries
from services.shared import (
    MAX_EVENT_BYTES,
    TEST_EVENT_TYPE,
    Delivery,
    Event,
    Settings,
    new_id,
    utcnow,
)
from tests.conftest import Receiver, Stack, refuse_second_replay_chunk, running_stack
from tests.integration.test_delivery_log import _call, _logged


def _padded(size: int, **fields: Any) -> str:
    """Padding that makes an event with these fields (and an api-made id and time) about
    ``size`` bytes long."""
    event = Event(id=new_id("evt"), occurred_at=utcnow(), data={"pad": ""}, **fields)
    return "a" * (size - len(event.to_bytes()))


async def test_an_event_just_under_the_size_limit_is_retried_and_replayed(
    settings: Settings, receiver: Receiver
) -> None:
    """The api accepts an event up to MAX_EVENT_BYTES; the delivery record wrapping it is a
    few hundred bytes more, within what the stream takes, so a retry and a replay of it are
    sent (they answered 413 when the wrapper was held to the event limit). A test event is
    still held to the event limit itself."""
    roomy = settings.model_copy(update={"max_body_bytes": 2_000_000})
    async with running_stack(roomy, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(receiver.url, ["object.updated"])
        before = utcnow() - timedelta(seconds=1)
        shape = {"type": "object.updated", "object_type": "invoice", "object_id": "inv-1"}
        pad = _padded(MAX_EVENT_BYTES - 40, team_id=stack.team_id, **shape)
        status, _ = await _call(stack, "POST", "/events", json={**shape, "data": {"pad": pad}})
        assert status == 201
        [first] = await receiver.wait_for(1)
        assert MAX_EVENT_BYTES - 100 < len(first.body) <= MAX_EVENT_BYTES
        delivery_id = first.headers["webhook-id"]
        wrapped = Delivery(
            id=delivery_id,
            webhook_id=webhook["id"],
            attempt=2,
            event=Event.model_validate_json(first.body),
            kind="manual",
        )
        assert len(wrapped.to_bytes()) > MAX_EVENT_BYTES, "the case the wrapper used to fail"
        await _logged(stack, delivery_id, lambda d: d["state"] == "delivered", within=15.0)

        status, answer = await _call(stack, "POST", f"/deliveries/{delivery_id}/retry")
        assert (status, answer) == (202, {"delivery_id": delivery_id, "attempt": 2}), answer
        second = (await receiver.wait_for(2))[1]
        assert (second.headers["webhook-id"], second.body) == (delivery_id, first.body)

        status, answer = await _call(
            stack, "POST", f"/webhooks/{webhook['id']}/replay", json={"since": before.isoformat()}
        )
        assert (status, answer["replayed"], answer["truncated"]) == (202, 1, False), answer
        third = (await receiver.wait_for(3))[2]
        assert (third.headers["webhook-id"], third.body) == (delivery_id, first.body)

        test = {"type": TEST_EVENT_TYPE, "object_type": "webhook", "object_id": webhook["id"]}
        path = f"/webhooks/{webhook['id']}/test"
        under = _padded(MAX_EVENT_BYTES - 40, team_id=stack.team_id, **test)
        status, answer = await _call(stack, "POST", path, json={"data": {"pad": under}})
        assert status == 202, answer
        over = _padded(MAX_EVENT_BYTES + 100, team_id=stack.team_id, **test)
        status, answer = await _call(stack, "POST", path, json={"data": {"pad": over}})
        assert (status, answer["error"]["details"]["max_bytes"]) == (413, MAX_EVENT_BYTES)
        fourth = (await receiver.wait_for(4))[3]
        assert orjson.loads(fourth.body)["data"] == {"pad": under}
        await asyncio.sleep(0.3)
        assert len(receiver.received) == 4, "the test event past the limit was not sent"


async def _audit(stack: Stack, action: str) -> list[dict[str, Any]]:
    status, page = await stack.auth_call(
        "GET", f"/v1/audit-log?team_id={stack.team_id}&action={action}"
    )
    assert status == 200, page
    return list(page["data"])


async def test_retry_replay_and_test_are_each_audited_once_with_who_asked(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One record per call, not per delivery re-sent, against the webhook, with the acting
    user, token and address: a retry names the delivery, a replay its window, how many it
    re-sent and whether it stopped short (also when the stream failed after a first chunk),
    a test its event. A call that sends nothing (a 409) leaves none."""
    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    webhook_id = webhook["id"]
    token = await stack.new_token(["webhook:read", "webhook:update"])
    token_id = (await stack.introspect(token))["token_id"]
    before = utcnow() - timedelta(seconds=1)
    for n in range(2):
        await stack.create_object({"n": n})
    delivery_id = (await receiver.wait_for(2))[0].headers["webhook-id"]
    await _logged(stack, delivery_id, lambda d: d["state"] == "delivered", within=15.0)

    status, _ = await _call(stack, "POST", f"/deliveries/{delivery_id}/retry", token)
    assert status == 202
    replay = f"/webhooks/{webhook_id}/replay"
    status, answer = await _call(stack, "POST", replay, token, json={"since": before.isoformat()})
    assert (status, answer["replayed"]) == (202, 2)
    status, tested = await _call(stack, "POST", f"/webhooks/{webhook_id}/test", token)
    assert status == 202

    # The stream refuses the second chunk: the first went out, and is audited.
    monkeypatch.setattr(deliveries, "_REPLAY_CHUNK", 1)
    real_publish = refuse_second_replay_chunk(monkeypatch)
    status, _ = await _call(stack, "POST", replay, token, json={"since": before.isoformat()})
    assert status == 503
    monkeypatch.setattr(deliveries, "_publish", real_publish)

    # Nothing sent, nothing audited.
    assert (await _call(stack, "PATCH", f"/webhooks/{webhook_id}", json={"active": False}))[
        0
    ] == 200
    assert (await _call(stack, "POST", f"/deliveries/{delivery_id}/retry", token))[0] == 409
    assert (await _call(stack, "POST", f"/webhooks/{webhook_id}/test", token))[0] == 409

    [retried] = await _audit(stack, "webhook.delivery_retried")
    stopped, replayed = await _audit(stack, "webhook.replayed")
    [test_sent] = await _audit(stack, "webhook.test_sent")
    for record in (retried, replayed, stopped, test_sent):
        assert (record["target_type"], record["target_id"]) == ("webhook", webhook_id)
        assert (record["actor_user_id"], record["actor_token_id"]) == (stack.user_id, token_id)
        assert record["ip"] == "127.0.0.1"
        assert record["request_id"].startswith("req_")
    assert retried["details"] == {"delivery_id": delivery_id, "attempt": 2}
    # With no until given, the window ends when the call came.
    for record in (replayed, stopped):
        assert before < datetime.fromisoformat(record["details"].pop("until")) <= utcnow()
    window = {"since": before.isoformat(), "only_failed": False}
    assert replayed["details"] == {**window, "replayed": 2, "truncated": False}
    assert stopped["details"] == {**window, "replayed": 1, "truncated": True}
    assert test_sent["details"] == {
        "delivery_id": tested["delivery_id"],
        "event_id": tested["event"]["id"],
    }


async def test_a_retry_whose_audit_record_cannot_be_written_still_answers_202(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-send is in the stream by then: a 5xx would have the caller send it again.
    The record goes to the error log instead, whole."""
    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    await stack.create_object()
    delivery_id = (await receiver.wait_for(1))[0].headers["webhook-id"]
    await _logged(stack, delivery_id, lambda d: d["state"] == "delivered", within=15.0)

    async def database_away(*_: Any, **__: Any) -> None:
        raise OperationalError("INSERT", {}, Exception("database is away"))

    monkeypatch.setattr(deliveries, "record_audit", database_away)
    with structlog.testing.capture_logs() as logs:
        status, _ = await _call(stack, "POST", f"/deliveries/{delivery_id}/retry")
    assert status == 202
    assert len(await receiver.wait_for(2)) == 2
    [lost] = [entry for entry in logs if entry["event"] == "audit_record_lost"]
    assert (lost["log_level"], lost["action"], lost["webhook_id"]) == (
        "error",
        "webhook.delivery_retried",
        webhook["id"],
    )
    assert lost["details"] == {"delivery_id": delivery_id, "attempt": 2}
    assert lost["ip"] == "127.0.0.1"


async def test_re_sends_a_moment_apart_each_take_their_own_attempt_number(
    stack: Stack, receiver: Receiver
) -> None:
    """The second re-send is asked for before the first one's attempt is in the log: it
    takes the next number all the same, and so does a replay right after."""
    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    since = utcnow() - timedelta(seconds=1)
    await stack.create_object()
    delivery_id = (await receiver.wait_for(1))[0].headers["webhook-id"]
    await _logged(stack, delivery_id, lambda d: d["state"] == "delivered", within=15.0)
    retry = f"/deliveries/{delivery_id}/retry"
    answers = [await _call(stack, "POST", retry), await _call(stack, "POST", retry)]
    assert [answer for _, answer in answers] == [
        {"delivery_id": delivery_id, "attempt": 2},
        {"delivery_id": delivery_id, "attempt": 3},
    ]
    replay = f"/webhooks/{webhook['id']}/replay"
    status, replayed = await _call(stack, "POST", replay, json={"since": since.isoformat()})
    assert (status, replayed["replayed"]) == (202, 1)
    await receiver.wait_for(4)
    shown = await _logged(stack, delivery_id, lambda d: len(d["attempts"]) == 4, within=15.0)
    # Sent side by side, they may be answered in any order.
    assert sorted(attempt["attempt"] for attempt in shown["attempts"]) == [1, 2, 3, 4]


async def test_a_retry_due_after_a_manual_re_send_delivered_is_not_sent(
    settings: Settings, receiver: Receiver
) -> None:
    """The first attempt fails and its retry is put off; a manual re-send delivers the
    event before the retry is due. The retry, come back to the dispatcher that sent the
    re-send, is recorded as skipped instead of posting the event a third time, and the
    delivery stays delivered."""
    quick = settings.model_copy(update={"retry_schedule_seconds": (5.0,), "retry_jitter": 0.0})
    receiver.statuses = [500]
    async with running_stack(quick, with_dispatcher=True) as stack:
        await stack.create_webhook(receiver.url, ["object.created"])
        await stack.create_object()
        delivery_id = (await receiver.wait_for(1))[0].headers["webhook-id"]
        await _logged(stack, delivery_id, lambda d: len(d["attempts"]) == 1)
        status, _ = await _call(stack, "POST", f"/deliveries/{delivery_id}/retry")
        assert status == 202
        await receiver.wait_for(2)
        shown = await _logged(stack, delivery_id, lambda d: len(d["attempts"]) == 3, within=20.0)
        by_time = sorted(shown["attempts"], key=lambda attempt: attempt["attempted_at"])
        assert [attempt["outcome"] for attempt in by_time] == ["failed", "delivered", "skipped"]
        assert [attempt["kind"] for attempt in by_time] == ["event", "manual", "event"]
        assert by_time[2]["error"] == "delivered by a manual re-send"
        assert by_time[2]["final"] is True
        assert shown["state"] == "delivered"
        assert [r.headers["webhook-id"] for r in receiver.received] == [delivery_id] * 2
