"""The walking skeleton: token → webhook → object → signed POST, all real parts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    InvalidSessionTimeoutError,
    TopicAuthorizationFailedError,
)
from sqlalchemy import text
from standardwebhooks import Webhook
from standardwebhooks.exceptions import WebhookVerificationError

from services.auth import app as auth_app_module
from services.dispatcher.retry_timer import RetryTimer
from services.shared import Settings, _changes, bound_port, head_revision, start_site
from services.shared import _http as http_module
from tests.conftest import Receiver, Stack, running_stack


def standard_webhooks_verify(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether the signature holds, by two verifiers that must agree: one written here from
    the specification, and the Standard Webhooks reference library."""
    from_spec = _verify_from_spec(secret, headers, body)
    try:
        Webhook(secret).verify(body, dict(headers))
        by_reference = True
    except WebhookVerificationError:
        by_reference = False
    assert from_spec == by_reference, f"verifiers disagree: spec {from_spec}"
    return from_spec


def _verify_from_spec(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    message_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > 300:
        return False
    expected = base64.b64encode(
        hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    ).decode()
    for candidate in headers["webhook-signature"].split(" "):
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return True
    return False


async def test_object_created_is_delivered_signed(stack: Stack, receiver: Receiver) -> None:
    """Creating an object delivers one POST whose signature, headers and payload are right."""
    async with stack.session.post(
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks",
        headers=stack.headers(),
        json={
            "name": "crm",
            "url": receiver.url,
            "topics": ["object.created"],
            "headers": {"X-Tenant": "acme"},
        },
    ) as response:
        assert response.status == 201
        webhook = await response.json()
    assert webhook["secret"].startswith("whsec_")
    assert len(base64.b64decode(webhook["secret"][6:])) >= 24
    await stack.wait_for_webhook(webhook["id"])

    async with stack.session.post(
        f"{stack.api_url}/v1/teams/{stack.team_id}/objects/contact",
        headers=stack.headers(),
        json={"email": "ada@example.com", "name": "Ada"},
    ) as response:
        assert response.status == 201
        created = await response.json()

    [delivery] = await receiver.wait_for(1)
    assert standard_webhooks_verify(webhook["secret"], delivery.headers, delivery.body)
    assert not standard_webhooks_verify(
        "whsec_" + base64.b64encode(b"x" * 32).decode(), delivery.headers, delivery.body
    )
    assert delivery.headers["webhook-id"].startswith("msg_")
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["user-agent"].startswith("hookwire/")
    assert delivery.headers["x-tenant"] == "acme"
    payload = orjson.loads(delivery.body)
    assert payload["id"] == created["event_id"]
    assert payload["type"] == "object.created"
    assert payload["team_id"] == stack.team_id
    assert payload["object_type"] == "contact"
    assert payload["object_id"] == created["id"]
    assert payload["data"] == {"email": "ada@example.com", "name": "Ada"}
    assert payload["schema"] == 1


async def test_unsubscribed_webhooks_receive_nothing(stack: Stack, receiver: Receiver) -> None:
    """A webhook only gets the event types and object types it subscribed to."""
    subscriptions = [
        {"topics": ["object.deleted"]},
        {"topics": ["object.created"], "object_types": ["invoice"]},
        {"topics": ["object.created"], "object_types": ["contact"]},
    ]
    ids = []
    for number, subscription in enumerate(subscriptions):
        async with stack.session.post(
            f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks",
            headers=stack.headers(),
            json={"name": f"w{number}", "url": f"{receiver.url}/{number}", **subscription},
        ) as response:
            assert response.status == 201
            ids.append((await response.json())["id"])
    for webhook_id in ids:
        await stack.wait_for_webhook(webhook_id)
    async with stack.session.post(
        f"{stack.api_url}/v1/teams/{stack.team_id}/objects/contact",
        headers=stack.headers(),
        json={"email": "grace@example.com"},
    ) as response:
        assert response.status == 201
    [delivery] = await receiver.wait_for(1)
    assert delivery.path == "/hook/2"
    registry = stack.dispatcher.metrics.registry
    assert registry.get_sample_value("hookwire_dispatcher_webhooks_matched_sum") == 1
    assert registry.get_sample_value("hookwire_dispatcher_events_routed_total") == 1


async def test_a_cookie_a_receiver_sets_is_never_sent_back(stack: Stack) -> None:
    """Deliveries carry no cookies: one receiver's Set-Cookie must not ride along to the
    next delivery (two teams' webhooks can share a host)."""
    cookies: list[str | None] = []
    arrived = asyncio.Event()

    async def answer(request: web.Request) -> web.Response:
        cookies.append(request.headers.get("cookie"))
        arrived.set()
        response = web.Response(text="ok")
        response.set_cookie("session", "from-the-receiver")
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    runner = await start_site(app, "127.0.0.1", 0)
    try:
        # A host name, not an address: cookies for bare IP addresses are never kept anyway.
        await stack.subscribe(f"http://localhost:{bound_port(runner)}/hook")
        for number in range(2):
            await stack.create_object({"n": number})
            await asyncio.wait_for(arrived.wait(), 10)
            arrived.clear()
    finally:
        await runner.cleanup()
    assert cookies == [None, None]


async def test_every_service_serves_health_readiness_and_metrics(stack: Stack) -> None:
    """/healthz, /readyz and /metrics answer on auth, api and the dispatcher."""
    for base, prefix in (
        (stack.auth_url, "hookwire_auth_"),
        (stack.api_url, "hookwire_api_"),
        (stack.dispatcher_url, "hookwire_dispatcher_"),
    ):
        async with stack.session.get(f"{base}/healthz") as response:
            assert response.status == 200
        async with stack.session.get(f"{base}/readyz") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ready"
        async with stack.session.get(f"{base}/metrics") as response:
            assert response.status == 200
            assert prefix in await response.text()


async def test_a_dispatcher_whose_changes_are_not_caught_up_is_not_ready(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its start goes on after waiting a while for the change follower; until that has
    caught up, ``/readyz`` says so (a rollout waits), and ``/healthz`` stays well."""
    follower = stack.dispatcher._follower
    monkeypatch.setattr(type(follower), "caught_up", property(lambda _: False))
    async with stack.session.get(f"{stack.dispatcher_url}/readyz") as response:
        assert response.status == 503
        assert "changes: not caught up" in str(await response.json())
    async with stack.session.get(f"{stack.dispatcher_url}/healthz") as response:
        assert response.status == 200
    monkeypatch.undo()
    async with stack.session.get(f"{stack.dispatcher_url}/readyz") as response:
        assert response.status == 200


async def test_counts_alerts_watch_start_at_zero(stack: Stack) -> None:
    """An alert on ``increase()`` sees the first count only if the series was there
    before it: dead letters by reason, retries by tier, disabled webhooks by reason and
    attempt records read by outcome are shown at 0 from the start."""
    dead_letters = {
        stack.api_url: ("invalid_record", "not_storable", "refused_by_broker"),
        stack.dispatcher_url: (
            "invalid_record",
            "attempts_exhausted",
            "gone",
            "handler_failed",
            "too_large",
        ),
    }
    expected = {
        stack.api_url: [
            *(
                f'hookwire_api_dead_letters_total{{reason="{r}"}}'
                for r in dead_letters[stack.api_url]
            ),
            'hookwire_api_webhooks_disabled_total{reason="gone"}',
            'hookwire_api_webhooks_disabled_total{reason="failing"}',
            *(
                f'hookwire_api_attempts_consumed_total{{outcome="{o}"}}'
                for o in ("delivered", "failed", "skipped", "deferred", "invalid", "webhook_gone")
            ),
        ],
        stack.dispatcher_url: [
            *(
                f'hookwire_dispatcher_dead_letters_total{{reason="{r}"}}'
                for r in dead_letters[stack.dispatcher_url]
            ),
            *(f'hookwire_dispatcher_retries_scheduled_total{{tier="{t}"}}' for t in range(1, 8)),
            'hookwire_dispatcher_webhooks_disabled_total{reason="gone"}',
        ],
    }
    for base, series in expected.items():
        async with stack.session.get(f"{base}/metrics") as response:
            text = await response.text()
        for name in series:
            assert f"{name} 0.0" in text, name


async def test_a_dead_dispatcher_loop_fails_its_health_check(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop the dispatcher needs (here the retry timer) failing makes ``/healthz`` say so,
    naming it, so a liveness probe restarts the process instead of leaving its partitions
    held and unworked; the other services stay healthy."""

    async def breaks(self: RetryTimer) -> None:
        raise RuntimeError("timer broke")

    monkeypatch.setattr(RetryTimer, "run", breaks)
    async with running_stack(settings, with_dispatcher=True) as stack:
        status, answer = await _health_once_failing(stack, stack.dispatcher_url)
        assert status == 503
        assert answer == {
            "status": "failing",
            "reasons": ["retry-timer: RuntimeError"],
        }
        assert stack.dispatcher.loops.failed.is_set()
        for base in (stack.auth_url, stack.api_url):
            async with stack.session.get(f"{base}/healthz") as response:
                assert response.status == 200


async def test_a_broker_refusal_no_retry_can_change_fails_the_health_check(
    stack: Stack,
) -> None:
    """A permission the cluster does not grant, or a setting it refuses, ends the consumer
    loop that met it: ``/healthz`` names the loop and the refusal, rather than the loop
    warning every second for ever while the process looks healthy. The embedded broker
    has no ACLs, so each loop's fetch is made to answer as Kafka's would."""

    def refusing(error: Exception) -> Any:
        async def getmany(*_: Any, **__: Any) -> Any:
            raise error

        return getmany

    dispatcher = stack.dispatcher
    dispatcher._lanes._consumer.getmany = refusing(GroupAuthorizationFailedError())  # type: ignore[method-assign]
    dispatcher._timer._consumer.getmany = refusing(InvalidSessionTimeoutError())  # type: ignore[method-assign]
    follower = stack.api._follower
    assert follower is not None
    assert follower._consumer is not None
    follower._consumer.getmany = refusing(TopicAuthorizationFailedError())  # type: ignore[method-assign]
    status, answer = await _health_once_failing(stack, stack.dispatcher_url)
    deadline = time.monotonic() + 5
    while status == 503 and len(answer["reasons"]) < 2 and time.monotonic() < deadline:
        status, answer = await _health_once_failing(stack, stack.dispatcher_url)
    assert status == 503
    assert sorted(answer["reasons"]) == [
        "deliverer: GroupAuthorizationFailedError",
        "retry-timer: InvalidSessionTimeoutError",
    ]
    status, answer = await _health_once_failing(stack, stack.api_url)
    assert (status, answer["reasons"]) == (503, ["changes: TopicAuthorizationFailedError"])


async def _health_once_failing(stack: Stack, base: str) -> tuple[int, Any]:
    """``/healthz`` as soon as it stops answering 200, or as it is after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        async with stack.session.get(f"{base}/healthz") as response:
            status, answer = response.status, await response.json()
        if status != 200 or time.monotonic() > deadline:
            return status, answer
        await asyncio.sleep(0.05)


async def test_a_dead_change_follower_fails_every_services_health_check(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change follower is what keeps each process's caches (revoked keys, webhooks)
    within a second of the database: one that dies fails ``/healthz`` in every service."""

    async def breaks(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("follower broke")

    monkeypatch.setattr(_changes, "follow_changes", breaks)
    async with running_stack(settings, with_dispatcher=True) as stack:
        for base in (stack.auth_url, stack.api_url, stack.dispatcher_url):
            status, answer = await _health_once_failing(stack, base)
            assert (status, answer) == (
                503,
                {"status": "failing", "reasons": ["changes: RuntimeError"]},
            ), base


async def test_readiness_follows_the_databases_migrations(stack: Stack) -> None:
    """Behind this code's migrations: not ready (auth too). Ahead of them (a newer release
    migrated first, as an upgrade does): still ready, so old processes keep serving."""

    async def set_revision(revision: str) -> None:
        async with stack.api.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})

    async def readiness() -> list[int]:
        statuses = []
        for base in (stack.auth_url, stack.api_url):
            async with stack.session.get(f"{base}/readyz") as response:
                statuses.append(response.status)
        return statuses

    head = head_revision()
    try:
        await set_revision("0004")
        assert await readiness() == [503, 503]
        await set_revision("9999_from_a_newer_release")
        assert await readiness() == [200, 200]
    finally:
        await set_revision(head)
    assert await readiness() == [200, 200]


async def test_a_readiness_check_that_hangs_is_a_failure_within_its_bound(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that does not answer makes /readyz answer 503 at once, not after the
    database driver's own connect timeout."""
    monkeypatch.setattr(http_module, "READY_CHECK_SECONDS", 0.3)
    hang = asyncio.Event()

    async def never_answers(*_: Any) -> None:
        await hang.wait()

    monkeypatch.setattr(auth_app_module, "check_ready", never_answers)
    started = time.monotonic()
    async with stack.session.get(f"{stack.auth_url}/readyz") as response:
        assert response.status == 503
        assert await response.json() == {
            "status": "unavailable",
            "reasons": ["no answer within 0.3 s"],
        }
    assert time.monotonic() - started < 5
