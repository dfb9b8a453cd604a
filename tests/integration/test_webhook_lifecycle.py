"""Webhook changes reach the dispatcher at once, are audited, and rotation signs twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import event, insert, select, update
from sqlalchemy.exc import OperationalError

from services.api import webhook_lifecycle, webhooks
from services.dispatcher.table import WebhookTable
from services.shared import (
    Change,
    Settings,
    make_producer,
    new_id,
    send_all,
    start_client,
    stop_client,
    tables,
    utcnow,
)
from tests.conftest import Receiver, Stack, pause_first_call, running_stack
from tests.integration.test_end_to_end import standard_webhooks_verify


async def _answer(
    stack: Stack,
    method: str,
    path: str = "",
    token: str | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any, Mapping[str, str]]:
    async with stack.session.request(
        method,
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks{path}",
        headers={**stack.headers(token), **(headers or {})},
        **kwargs,
    ) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response.headers


async def _hooks(
    stack: Stack, method: str, path: str = "", token: str | None = None, **kwargs: Any
) -> tuple[int, Any]:
    status, body, _ = await _answer(stack, method, path, token, **kwargs)
    return status, body


async def _etag(stack: Stack, path: str) -> str:
    status, _, headers = await _answer(stack, "GET", path)
    assert status == 200
    return headers["ETag"]


async def _create_elsewhere(stack: Stack) -> str:
    """A webhook no receiver listens for: the path of its own resource."""
    status, webhook = await _hooks(
        stack,
        "POST",
        json={"name": "t", "url": "https://example.com/h", "topics": ["object.created"]},
    )
    assert status == 201
    return f"/{webhook['id']}"


async def _create(stack: Stack, url: str) -> dict[str, Any]:
    status, webhook = await _hooks(
        stack, "POST", json={"name": "w", "url": url, "topics": ["object.created"]}
    )
    assert status == 201
    await stack.wait_for_webhook(webhook["id"])
    return dict(webhook)


async def _until(check: Any, within: float = 10.0) -> None:
    """Change records reach the table in well under a second (measured by
    `bench/changes.py`); the deadline only catches one that never arrives, and stays far
    inside the whole reload that would otherwise bring the change (every 60 s)."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


async def test_edits_reach_the_dispatcher_through_change_records(
    stack: Stack, receiver: Receiver
) -> None:
    """A new URL, deactivation and reactivation take effect for the next event."""
    webhook = await _create(stack, "http://127.0.0.1:9/nowhere")
    status, edited = await _hooks(stack, "PATCH", f"/{webhook['id']}", json={"url": receiver.url})
    assert (status, edited["url"]) == (200, receiver.url)
    await _until(lambda: stack.dispatcher.table.get(webhook["id"]).url == receiver.url)
    await stack.create_object()
    await receiver.wait_for(1)
    assert (await _hooks(stack, "PATCH", f"/{webhook['id']}", json={"active": False}))[0] == 200
    await _until(lambda: not stack.dispatcher.table.get(webhook["id"]).active)
    await stack.create_object()
    registry = stack.dispatcher.metrics.registry
    await _until(
        lambda: registry.get_sample_value("hookwire_dispatcher_events_routed_total") == 2, within=15
    )
    assert len(receiver.received) == 1
    assert (await _hooks(stack, "PATCH", f"/{webhook['id']}", json={"active": True}))[0] == 200
    await _until(lambda: stack.dispatcher.table.get(webhook["id"]).active)
    await stack.create_object()
    await receiver.wait_for(2)


async def test_rotation_without_a_body_keeps_the_old_secret_for_a_day(api_stack: Stack) -> None:
    webhook = await api_stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    before = utcnow()
    status, rotated = await _hooks(api_stack, "POST", f"/{webhook['id']}/rotate-secret")
    assert status == 200, rotated
    assert rotated["secret"] != webhook["secret"]
    kept_until = datetime.fromisoformat(rotated["previous_secret_expires_at"])
    assert before + timedelta(hours=23, minutes=59) < kept_until <= utcnow() + timedelta(days=1)


async def test_rotation_signs_with_both_secrets_during_the_grace(
    stack: Stack, receiver: Receiver
) -> None:
    """With a grace period, each delivery carries two signatures and both verify."""
    webhook = await _create(stack, receiver.url)
    old = webhook["secret"]
    status, rotated = await _hooks(
        stack, "POST", f"/{webhook['id']}/rotate-secret", json={"grace_seconds": 3600}
    )
    assert status == 200
    new = rotated["secret"]
    assert new != old
    assert rotated["previous_secret_expires_at"] is not None
    await _until(lambda: len(stack.dispatcher.table.get(webhook["id"]).signing_keys) == 2)
    await stack.create_object()
    [delivery] = await receiver.wait_for(1)
    signatures = delivery.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    for secret in (old, new):
        assert standard_webhooks_verify(secret, delivery.headers, delivery.body)
    status, again = await _hooks(
        stack, "POST", f"/{webhook['id']}/rotate-secret", json={"grace_seconds": 0}
    )
    assert status == 200
    await _until(lambda: len(stack.dispatcher.table.get(webhook["id"]).signing_keys) == 1)
    await stack.create_object()
    latest = (await receiver.wait_for(2))[1]
    assert len(latest.headers["webhook-signature"].split(" ")) == 1
    assert standard_webhooks_verify(again["secret"], latest.headers, latest.body)
    assert not standard_webhooks_verify(new, latest.headers, latest.body)


async def test_trash_restore_and_force_delete(api_stack: Stack) -> None:
    """Trash hides a webhook, restore brings it back, force-delete needs its permission."""
    path = await _create_elsewhere(api_stack)
    assert (await _hooks(api_stack, "DELETE", path))[0] == 204
    assert (await _hooks(api_stack, "GET", path))[0] == 404
    assert (await _hooks(api_stack, "GET"))[1]["data"] == []
    assert (await _hooks(api_stack, "POST", f"{path}/restore"))[0] == 200
    assert (await _hooks(api_stack, "GET", path))[0] == 200
    limited = await api_stack.new_token(["webhook:read", "webhook:delete"])
    assert (await _hooks(api_stack, "DELETE", f"{path}?force=true", limited))[0] == 403
    assert (await _hooks(api_stack, "DELETE", path))[0] == 204
    assert (await _hooks(api_stack, "DELETE", f"{path}?force=true"))[0] == 204
    assert (await _hooks(api_stack, "POST", f"{path}/restore"))[0] == 404
    status, audit = await api_stack.auth_call(
        "GET", f"/v1/audit-log?team_id={api_stack.team_id}&limit=20"
    )
    assert status == 200
    actions = [e["action"] for e in audit["data"] if f"/{e['target_id']}" == path]
    assert actions == [
        "webhook.force_deleted",
        "webhook.deleted",
        "webhook.restored",
        "webhook.deleted",
        "webhook.created",
    ]


async def test_switching_a_webhook_off_or_on_with_other_changes_is_audited_as_such(
    api_stack: Stack,
) -> None:
    """`active` sent with other fields is audited as the deactivation or reactivation it
    is (a search for `webhook.deactivated` must find it), with every change in its
    details; sent unchanged with the rest of the state, the edit is an update."""
    path = await _create_elsewhere(api_stack)
    edits = (
        {"active": False, "object_types": None},
        {"active": True, "name": "back on"},
        {"active": True, "name": "renamed, still on"},
    )
    for edit in edits:
        status, _ = await _hooks(api_stack, "PATCH", path, json=edit)
        assert status == 200
    status, audit = await api_stack.auth_call(
        "GET", f"/v1/audit-log?team_id={api_stack.team_id}&limit=20"
    )
    assert status == 200
    mine = [e for e in audit["data"] if f"/{e['target_id']}" == path]
    assert [(e["action"], e["details"]) for e in reversed(mine[:3])] == [
        ("webhook.deactivated", edits[0]),
        ("webhook.reactivated", edits[1]),
        ("webhook.updated", edits[2]),
    ]


async def test_a_force_delete_of_a_webhook_neither_live_nor_trashed_is_plainly_not_found(
    api_stack: Stack,
) -> None:
    """?force=true takes a live webhook or one in the trash; in neither (deleted for good
    already, or never made) it is "not found", not "not found in the trash". A restore
    looks only in the trash, and says so."""
    path = await _create_elsewhere(api_stack)
    assert (await _hooks(api_stack, "DELETE", f"{path}?force=true"))[0] == 204
    for gone in (path, "/wh_nope"):
        status, body = await _hooks(api_stack, "DELETE", f"{gone}?force=true")
        assert (status, body["error"]["message"]) == (404, f"webhook {gone[1:]} not found")
    status, body = await _hooks(api_stack, "POST", "/wh_nope/restore")
    assert (status, body["error"]["message"]) == (404, "webhook wh_nope not found in the trash")


async def test_the_webhook_view_shows_when_a_rotated_out_secret_stops_signing(
    api_stack: Stack,
) -> None:
    """Show and list give previous_secret_expires_at, the rotation's answer's, while the
    replaced secret still signs; null before any rotation, after one with no grace, and
    once the grace is over. No secret is ever shown."""
    webhook = await api_stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    path = f"/{webhook['id']}"

    async def shown() -> list[dict[str, Any]]:
        status, one = await _hooks(api_stack, "GET", path)
        assert status == 200, one
        status, page = await _hooks(api_stack, "GET")
        assert status == 200, page
        [listed] = [w for w in page["data"] if w["id"] == webhook["id"]]
        return [one, listed]

    secrets = [webhook["secret"]]
    assert [v["previous_secret_expires_at"] for v in await shown()] == [None, None]
    status, rotated = await _hooks(
        api_stack, "POST", f"{path}/rotate-secret", json={"grace_seconds": 3600}
    )
    assert status == 200, rotated
    secrets.append(rotated["secret"])
    ends = rotated["previous_secret_expires_at"]
    assert ends is not None
    views = await shown()
    assert [v["previous_secret_expires_at"] for v in views] == [ends, ends]
    for view in views:
        assert "secret" not in view
        assert not any(secret in orjson.dumps(view).decode() for secret in secrets)
    stored = await _stored_secrets(api_stack, webhook["id"])

    async def store_expiry(expires_at: str) -> None:
        stored[0]["expires_at"] = expires_at
        async with api_stack.api.engine.begin() as conn:
            await conn.execute(
                update(tables.webhooks)
                .where(tables.webhooks.c.id == webhook["id"])
                .values(secrets=stored)
            )

    # Written by hand past the calendar's end in UTC: the view does not fail for it.
    await store_expiry("9999-12-31T23:00:00-05:00")
    assert [v["previous_secret_expires_at"] for v in await shown()] == [None, None]
    # The grace over (as though an hour had passed): no replaced secret signs any more.
    await store_expiry((utcnow() - timedelta(seconds=1)).isoformat())
    assert [v["previous_secret_expires_at"] for v in await shown()] == [None, None]
    status, rotated = await _hooks(
        api_stack, "POST", f"{path}/rotate-secret", json={"grace_seconds": 3600}
    )
    assert status == 200
    assert rotated["previous_secret_expires_at"] is not None
    status, rotated = await _hooks(
        api_stack, "POST", f"{path}/rotate-secret", json={"grace_seconds": 0}
    )
    assert (status, rotated["previous_secret_expires_at"]) == (200, None)
    assert [v["previous_secret_expires_at"] for v in await shown()] == [None, None]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("", {}, 422, "body"),
        ("", {"name": None}, 422, "name"),
        ("", {"url": "ftp://example.com"}, 422, "url"),
        ("", {"topics": ["object.nope"]}, 422, "topics.0"),
        ("", {"headers": {"Host": "x"}}, 422, "headers"),
        ("", {"secret": "whsec_mine"}, 422, "secret"),
        ("", {"active": None}, 422, "active"),
        ("", {"active": "false"}, 422, "active"),
        ("", {"name": "n" * 201}, 422, "name"),
        ("", {"description": "d" * 2001}, 422, "description"),
        ("", {"url": "https://example.com/" + "p" * 2048}, 422, "url"),
        ("", {"url": "http:///hook"}, 422, "url"),
        ("", {"url": None}, 422, "url"),
        ("", {"topics": []}, 422, "topics"),
        ("", {"object_types": [f"t{n}" for n in range(101)]}, 422, "object_types"),
        ("", {"headers": {f"X-H{n}": "v" for n in range(21)}}, 422, "headers"),
        ("", {"headers": {"X-Long": "v" * 1025}}, 422, "headers"),
        ("", [{"name": "x"}], 422, "body"),
        ("/rotate-secret", {"grace_seconds": -1}, 422, "grace_seconds"),
        ("/rotate-secret", {"grace_seconds": 10**9}, 422, "grace_seconds"),
        ("/rotate-secret", {"grace_seconds": "60"}, 422, "grace_seconds"),
        ("/rotate-secret", {"grace": 60}, 422, "grace"),
    ],
)
async def test_bad_webhook_changes_are_refused(
    api_stack: Stack, path: str, body: Any, status: int, field: str
) -> None:
    """Each bad change is named and nothing changes."""
    _, webhook = await _hooks(
        api_stack,
        "POST",
        json={"name": "keep", "url": "https://example.com/h", "topics": ["object.created"]},
    )
    method = "PATCH" if path == "" else "POST"
    got, answer = await _hooks(api_stack, method, f"/{webhook['id']}{path}", json=body)
    assert got == status
    assert field in [d["field"] for d in answer["error"]["details"]]
    _, current = await _hooks(api_stack, "GET", f"/{webhook['id']}")
    assert {k: current[k] for k in webhook if k != "secret"} == {
        k: v for k, v in webhook.items() if k != "secret"
    }
    async with api_stack.api.engine.connect() as conn:
        secrets = (
            await conn.execute(
                select(tables.webhooks.c.secrets).where(tables.webhooks.c.id == webhook["id"])
            )
        ).scalar_one()
    assert [entry["secret"] for entry in secrets] == [webhook["secret"]]


@pytest.fixture
async def strict_stack(settings: Settings) -> AsyncIterator[Stack]:
    async with running_stack(
        settings.model_copy(update={"allow_private_urls": False}), with_dispatcher=False
    ) as running:
        yield running


# A public address needs no DNS: the strict stack can save it offline.
PUBLIC_URL = "http://1.1.1.1/h"


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/h",
        "http://localhost/h",
        "http://169.254.169.254/latest",
        "http://[::1]/h",
        "http://10.0.0.7/h",
        "http://[64:ff9b::a9fe:a9fe]/latest",
        "http://a..b/h",
    ],
)
async def test_private_urls_are_refused_without_the_allow_flag(
    strict_stack: Stack, url: str, method: str
) -> None:
    """SSRF: a URL resolving to a non-public address is refused when the webhook is saved,
    created or edited; an edit leaves the stored URL as it was."""
    if method == "POST":
        status, answer = await _hooks(
            strict_stack, "POST", json={"name": "x", "url": url, "topics": ["object.created"]}
        )
    else:
        status, created = await _hooks(
            strict_stack,
            "POST",
            json={"name": "x", "url": PUBLIC_URL, "topics": ["object.created"]},
        )
        assert status == 201, created
        status, answer = await _hooks(strict_stack, "PATCH", f"/{created['id']}", json={"url": url})
    assert status == 422
    assert answer["error"]["details"][0]["field"] == "url"
    listed = (await _hooks(strict_stack, "GET"))[1]["data"]
    assert [hook["url"] for hook in listed] == ([] if method == "POST" else [PUBLIC_URL])


async def test_list_filters_by_active_and_topic_and_pages(api_stack: Stack) -> None:
    made = []
    for topics, active in (
        (["object.created"], True),
        (["object.updated"], True),
        (["object.created", "object.deleted"], False),
    ):
        status, webhook = await _hooks(
            api_stack,
            "POST",
            json={"name": "w", "url": "http://127.0.0.1:9/", "topics": topics, "active": active},
        )
        assert status == 201
        made.append(webhook["id"])

    async def ids(**params: str) -> list[str]:
        status, page = await _hooks(api_stack, "GET", params=params)
        assert status == 200, page
        return [w["id"] for w in page["data"]]

    assert await ids() == made
    assert await ids(active="true") == made[:2]
    assert await ids(active="false") == made[2:]
    assert await ids(topic="object.created") == [made[0], made[2]]
    assert await ids(topic="object.created", active="true") == [made[0]]
    assert await ids(topic="object.send") == []

    seen: list[str] = []
    params = {"limit": "2"}
    while True:
        status, page = await _hooks(api_stack, "GET", params=params)
        seen += [w["id"] for w in page["data"]]
        if page["next_cursor"] is None:
            break
        params = {"limit": "2", "cursor": page["next_cursor"]}
    assert seen == made

    for params, field in (
        ({"active": "maybe"}, "active"),
        # Only true or false, as every yes/no parameter; lax readings took these.
        ({"active": "yes"}, "active"),
        ({"active": "1"}, "active"),
        ({"limit": "+5"}, "limit"),
        ({"topic": "object.exploded"}, "topic"),
        ({"limit": "501"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"sort": "name"}, "sort"),
        ({"cursor": "c" * 65}, "cursor"),
    ):
        status, body = await _hooks(api_stack, "GET", params=params)
        assert status == 422, params
        assert [d["field"] for d in body["error"]["details"]] == [field]


async def test_a_topic_filtered_list_pages_through_a_chunk_at_a_time(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The topic filter reads the team's webhooks a chunk at a time (three here), never
    all at once: pages still hold exactly the matching webhooks, in order, once each."""
    monkeypatch.setattr(webhooks, "_TOPIC_SCAN_ROWS", 3)
    statements: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM webhooks" in statement and "ORDER BY" in statement:
            statements.append(statement)

    matching = []
    for n in range(10):
        topics = ["object.created"] if n % 3 == 0 else ["object.updated"]
        status, webhook = await _hooks(
            api_stack,
            "POST",
            json={"name": f"w{n}", "url": "http://127.0.0.1:9/", "topics": topics},
        )
        assert status == 201
        if n % 3 == 0:
            matching.append(webhook["id"])
    seen: list[str] = []
    params = {"limit": "2", "topic": "object.created"}
    engine = api_stack.api.engine.sync_engine
    event.listen(engine, "before_cursor_execute", note)
    try:
        while True:
            status, page = await _hooks(api_stack, "GET", params=params)
            assert status == 200, page
            seen += [w["id"] for w in page["data"]]
            if page["next_cursor"] is None:
                break
            params = {**params, "cursor": page["next_cursor"]}
    finally:
        event.remove(engine, "before_cursor_execute", note)
    assert seen == matching
    # Every read of the list was a chunk, never the whole team.
    assert statements
    assert all("LIMIT" in statement for statement in statements), statements


async def test_a_team_has_at_most_the_configured_number_of_webhooks(settings: Settings) -> None:
    """Every webhook is in every dispatcher's memory and looked at for each of its team's
    events: past the limit a creation is refused; the trash counts (a restore never passes
    the limit), a force-delete makes room."""
    limited = settings.model_copy(update={"max_webhooks_per_team": 2})
    async with running_stack(limited, with_dispatcher=False) as stack:
        body = {"name": "w", "url": "http://127.0.0.1:9/", "topics": ["object.created"]}
        ids = []
        for _ in range(2):
            status, webhook = await _hooks(stack, "POST", json=body)
            assert status == 201
            ids.append(webhook["id"])
        status, refused = await _hooks(stack, "POST", json=body)
        assert (status, refused["error"]["code"]) == (409, "conflict"), refused
        assert refused["error"]["details"] == {"limit": 2}
        assert (await _hooks(stack, "DELETE", f"/{ids[0]}"))[0] == 204
        assert (await _hooks(stack, "POST", json=body))[0] == 409
        assert (await _hooks(stack, "DELETE", f"/{ids[0]}", params={"force": "true"}))[0] == 204
        assert (await _hooks(stack, "POST", json=body))[0] == 201


async def test_concurrent_rotations_never_lose_a_secret_they_returned(
    api_stack: Stack, receiver: Receiver
) -> None:
    """Rotations racing each other: each answers 409 or 200, and the webhook ends signing
    with a secret one of them returned (not one another rotation silently replaced), and
    at most one previous secret."""
    status, webhook = await _hooks(
        api_stack, "POST", json={"name": "w", "url": receiver.url, "topics": ["object.created"]}
    )
    assert status == 201
    answers = await asyncio.gather(
        *(_hooks(api_stack, "POST", f"/{webhook['id']}/rotate-secret", json={}) for _ in range(5))
    )
    assert {status for status, _ in answers} <= {200, 409}
    returned = {answer["secret"] for status, answer in answers if status == 200}
    assert returned
    stored = await _stored_secrets(api_stack, webhook["id"])
    [current] = [entry["secret"] for entry in stored if entry["expires_at"] is None]
    assert current in returned
    assert {entry["secret"] for entry in stored} <= returned | {webhook["secret"]}
    assert len(stored) <= 2


async def _stored_secrets(stack: Stack, webhook_id: str) -> list[dict[str, Any]]:
    async with stack.api.engine.connect() as conn:
        stored: list[dict[str, Any]] = (
            await conn.execute(
                select(tables.webhooks.c.secrets).where(tables.webhooks.c.id == webhook_id)
            )
        ).scalar_one()
    return stored


async def test_rotating_again_during_a_grace_ends_that_grace(stack: Stack) -> None:
    """One previous secret at most, as for keys: every secret kept signs every delivery,
    so rotations with a grace, one after another, must not pile them up."""
    webhook = await _create(stack, "http://127.0.0.1:9/hook")
    secrets = [webhook["secret"]]
    for _ in range(3):
        status, rotated = await _hooks(
            stack, "POST", f"/{webhook['id']}/rotate-secret", json={"grace_seconds": 3600}
        )
        assert status == 200
        secrets.append(rotated["secret"])
    stored = await _stored_secrets(stack, webhook["id"])
    assert [entry["secret"] for entry in stored] == secrets[-2:]
    assert stored[0]["expires_at"] is not None
    assert stored[1]["expires_at"] is None


class _PausedLoad(WebhookTable):
    """A table whose whole loads stop between reading the rows and taking them in."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.read = asyncio.Event()
        self.go_on = asyncio.Event()

    async def _read_all(self) -> list[Any]:
        rows = await super()._read_all()
        self.read.set()
        await self.go_on.wait()
        return rows


async def test_a_refresh_during_a_whole_load_is_not_undone_by_it(api_stack: Stack) -> None:
    """The periodic load read the webhook active; it was deactivated and refreshed before
    the load took its rows in. The table must end with the later state, not the load's."""
    webhook = await api_stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    table = _PausedLoad(api_stack.api.engine)
    loading = asyncio.create_task(table.load_all())
    await asyncio.wait_for(table.read.wait(), 10)
    async with api_stack.api.engine.begin() as conn:
        await conn.execute(
            update(tables.webhooks)
            .where(tables.webhooks.c.id == webhook["id"])
            .values(active=False)
        )
    refreshing = asyncio.create_task(table.refresh(webhook["id"]))
    await asyncio.sleep(0.2)  # room for the refresh to finish first, if it may
    table.go_on.set()
    await asyncio.wait_for(asyncio.gather(loading, refreshing), 10)
    route = table.get(webhook["id"])
    assert route is not None
    assert not route.active
    assert table.for_team(api_stack.team_id) == []


async def test_a_failed_refresh_is_made_good_within_seconds(stack: Stack) -> None:
    """A change whose webhook could not be read (the database away for a moment) is not
    left to the periodic load a minute later."""
    table = stack.dispatcher.table
    real_refresh = table.refresh_many
    failures: list[Sequence[str]] = []

    async def failing_once(webhook_ids: Sequence[str]) -> None:
        if not failures:
            failures.append(webhook_ids)
            raise OperationalError("select", {}, Exception("database is away"))
        await real_refresh(webhook_ids)

    table.refresh_many = failing_once  # type: ignore[method-assign]
    webhook = await stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    await stack.wait_for_webhook(webhook["id"], within=15)
    assert failures == [[webhook["id"]]]


async def test_a_burst_of_change_records_is_read_in_a_few_queries(stack: Stack) -> None:
    """Two hundred webhooks changed at once (their change records in one burst) reach the
    dispatcher's table through a query per fetch of records, not one per webhook."""
    first = await stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    await stack.wait_for_webhook(first["id"])
    engine = stack.api.engine
    async with engine.begin() as conn:
        row = (
            await conn.execute(select(tables.webhooks).where(tables.webhooks.c.id == first["id"]))
        ).one()
        ids = [new_id("wh") for _ in range(200)]
        await conn.execute(
            insert(tables.webhooks), [{**row._asdict(), "id": webhook_id} for webhook_id in ids]
        )
    table = stack.dispatcher.table
    reads: list[int] = []
    read_some = table._read_some

    async def counted(webhook_ids: Sequence[str]) -> list[Any]:
        reads.append(len(webhook_ids))
        return await read_some(webhook_ids)

    table._read_some = counted  # type: ignore[method-assign]
    producer = make_producer(stack.settings)
    await start_client(producer, stack.settings)
    try:
        await send_all(
            producer,
            [
                (
                    stack.dispatcher.topics.changes,
                    webhook_id.encode(),
                    Change(
                        entity="webhook", entity_id=webhook_id, action="created", at=utcnow()
                    ).to_bytes(),
                )
                for webhook_id in ids
            ],
        )
        for webhook_id in ids:
            await stack.wait_for_webhook(webhook_id, within=10)
    finally:
        del table._read_some
        await stop_client(producer)
    assert len(stack.dispatcher.table.for_team(stack.team_id)) == 201
    # As many fetches as the follower needed for the burst (one or a few), not 200.
    assert sum(reads) == 200, reads
    assert len(reads) <= 10, reads
    # More than one query's worth, with ids the database does not have among them.
    unknown = [new_id("wh") for _ in range(400)]
    await stack.dispatcher.table.refresh_many([*unknown[:200], *ids, *unknown[200:]])
    assert len(stack.dispatcher.table.for_team(stack.team_id)) == 201
    assert not any(stack.dispatcher.table.get(webhook_id) for webhook_id in unknown)


async def test_a_webhook_row_the_api_could_not_have_written_spoils_no_other(
    stack: Stack,
) -> None:
    """A row edited by hand (a secret entry without its secret, an expiry that is no
    time) leaves that webhook out; the others read with it, in a burst or a whole load,
    are in the table and indexed."""
    webhooks = [
        await stack.create_webhook(f"http://127.0.0.1:9/hook/{n}", routed=False) for n in range(4)
    ]
    ids = [webhook["id"] for webhook in webhooks]
    for webhook_id in ids:
        await stack.wait_for_webhook(webhook_id)
    async with stack.api.engine.begin() as conn:
        await conn.execute(
            update(tables.webhooks)
            .where(tables.webhooks.c.id == ids[1])
            .values(secrets=[{"kept": "no secret here"}])
        )
        await conn.execute(
            update(tables.webhooks)
            .where(tables.webhooks.c.id == ids[2])
            .values(secrets=[{"secret": webhooks[2]["secret"], "expires_at": "soon"}])
        )
    table = stack.dispatcher.table
    for read in (lambda: table.refresh_many(ids), table.load_all):
        await read()
        assert [table.get(webhook_id) is not None for webhook_id in ids] == [
            True,
            False,
            False,
            True,
        ]
        indexed = {route.id for route in table.for_team(stack.team_id)}
        assert {ids[0], ids[3]} <= indexed
        assert not {ids[1], ids[2]} & indexed


async def test_credential_headers_do_not_follow_the_url_to_another_origin(
    api_stack: Stack,
) -> None:
    """Whoever may edit a webhook but never read its stored credentials must not be able
    to point it at a server of theirs and have them sent there: a new origin needs them
    given again (or left out); a new path on the same origin keeps them."""
    status, created = await _hooks(
        api_stack,
        "POST",
        "",
        json={
            "name": "crm",
            "url": "https://crm.example/hooks/a",
            "topics": ["object.created"],
            "headers": {"Authorization": "Bearer s3cret", "X-Team": "blue"},
        },
    )
    assert status == 201
    one = f"/{created['id']}"
    elsewhere = "https://attacker.example/collect"
    for body in (
        {"url": elsewhere},
        {"url": elsewhere, "headers": created["headers"]},
        {"url": "http://crm.example/hooks/a"},
        {"url": "https://crm.example:8443/hooks/a"},
    ):
        status, answer = await _hooks(api_stack, "PATCH", one, json=body)
        assert status == 422, (body, answer)
        [problem] = answer["error"]["details"]
        assert problem["field"] == "headers"
        assert "Authorization" in problem["reason"]
    status, shown = await _hooks(api_stack, "GET", one)
    assert shown["url"] == "https://crm.example/hooks/a"
    # The same origin however written: its default port, another case, a trailing dot.
    for same in ("https://crm.example/b", "https://CRM.example:443/c", "https://crm.example./d"):
        status, moved = await _hooks(api_stack, "PATCH", one, json={"url": same})
        assert (status, moved["headers"]["Authorization"]) == (200, "[redacted]"), same
    # A header said to be kept that was never stored: that, not the origin, is the error.
    status, answer = await _hooks(
        api_stack, "PATCH", one, json={"url": elsewhere, "headers": {"X-New": "[redacted]"}}
    )
    assert status == 422
    assert "there is none" in answer["error"]["details"][0]["reason"]
    status, moved = await _hooks(
        api_stack, "PATCH", one, json={"url": elsewhere, "headers": {"X-Team": "blue"}}
    )
    assert (status, moved["headers"]) == (200, {"X-Team": "blue"})
    status, moved = await _hooks(
        api_stack,
        "PATCH",
        one,
        json={"url": "https://other.example/", "headers": {"Authorization": "Bearer new"}},
    )
    assert (status, moved["headers"]) == (200, {"Authorization": "[redacted]"})


async def test_credential_headers_are_never_shown_and_survive_edits(
    stack: Stack, receiver: Receiver
) -> None:
    """Views show credential-like header values as "[redacted]", also to read-only keys;
    a view's headers sent back keep the stored value, so deliveries still carry it."""
    status, created = await _hooks(
        stack,
        "POST",
        "",
        json={
            "name": "crm",
            "url": receiver.url,
            "topics": ["object.created"],
            "headers": {"Authorization": "Bearer s3cret", "X-Team": "blue"},
        },
    )
    assert status == 201
    assert created["headers"] == {"Authorization": "[redacted]", "X-Team": "blue"}
    reader = await stack.new_token(["webhook:read"])
    status, shown = await _hooks(stack, "GET", f"/{created['id']}", token=reader)
    assert status == 200
    assert shown["headers"] == {"Authorization": "[redacted]", "X-Team": "blue"}
    status, listed = await _hooks(stack, "GET", "", token=reader)
    assert [hook["headers"] for hook in listed["data"]] == [shown["headers"]]
    status, edited = await _hooks(
        stack,
        "PATCH",
        f"/{created['id']}",
        json={"headers": {**shown["headers"], "X-Team": "green"}},
    )
    assert status == 200, edited
    assert edited["headers"] == {"Authorization": "[redacted]", "X-Team": "green"}
    status, refused = await _hooks(
        stack, "PATCH", f"/{created['id']}", json={"headers": {"X-Api-Key": "[redacted]"}}
    )
    assert (status, refused["error"]["details"][0]["field"]) == (422, "headers")
    await stack.wait_for_webhook(created["id"])

    def routed_headers() -> dict[str, str]:
        route = stack.dispatcher.table.get(created["id"])
        return dict(route.headers) if route is not None else {}

    await _until(lambda: routed_headers().get("X-Team") == "green")
    await stack.create_object()
    [delivery] = await receiver.wait_for(1)
    assert delivery.headers["authorization"] == "Bearer s3cret"
    assert delivery.headers["x-team"] == "green"


async def test_an_edit_racing_a_trash_is_a_conflict(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PATCH that read the webhook live, then found it trashed by another request before
    it wrote, answers 409 rather than 200 for a change to a webhook in the trash."""
    status, created = await _hooks(
        api_stack,
        "POST",
        json={"name": "w", "url": "http://127.0.0.1:9/h", "topics": ["object.created"]},
    )
    assert status == 201
    pause = pause_first_call(monkeypatch, webhook_lifecycle, "find_webhook")
    editing = asyncio.create_task(
        _hooks(api_stack, "PATCH", f"/{created['id']}", json={"name": "renamed"})
    )
    await asyncio.wait_for(pause.read.wait(), 5)
    assert (await _hooks(api_stack, "DELETE", f"/{created['id']}"))[0] == 204
    pause.release.set()
    status, answer = await editing
    assert (status, answer["error"]["code"]) == (409, "conflict")
    async with api_stack.api.engine.connect() as conn:
        row = (
            await conn.execute(select(tables.webhooks).where(tables.webhooks.c.id == created["id"]))
        ).one()
    assert (row.name, row.deleted_at is not None) == ("w", True)


async def test_only_a_real_reactivation_or_move_restarts_the_no_success_clock(
    stack: Stack, receiver: Receiver
) -> None:
    """A client sending the whole state on every edit ("active": true, its url as it is)
    must not keep a failing endpoint from ever being disabled; turning it back on, or
    pointing it elsewhere, starts the clock again."""
    webhook = await _create(stack, receiver.url)
    hooks = tables.webhooks
    since = utcnow() - timedelta(days=1)

    async def failing_since() -> datetime | None:
        async with stack.api.engine.connect() as conn:
            return (
                await conn.execute(select(hooks.c.failing_since).where(hooks.c.id == webhook["id"]))
            ).scalar_one()

    async def failing_for_a_day() -> None:
        async with stack.api.engine.begin() as conn:
            await conn.execute(
                update(hooks).where(hooks.c.id == webhook["id"]).values(failing_since=since)
            )

    await failing_for_a_day()
    path = f"/{webhook['id']}"
    unchanged = {"active": True, "url": receiver.url, "name": "renamed"}
    assert (await _hooks(stack, "PATCH", path, json=unchanged))[0] == 200
    assert await failing_since() == since
    assert (await _hooks(stack, "PATCH", path, json={"active": False}))[0] == 200
    assert (await _hooks(stack, "PATCH", path, json={"active": True}))[0] == 200
    assert await failing_since() is None
    await failing_for_a_day()
    moved = {"url": receiver.url.replace("/hook", "/elsewhere"), "active": True}
    assert moved["url"] != receiver.url
    assert (await _hooks(stack, "PATCH", path, json=moved))[0] == 200
    assert await failing_since() is None


async def test_a_force_delete_that_lost_a_race_answers_404_and_is_not_audited(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two force-deletes at once both read the webhook; the one whose delete finds it gone
    answers 404 and writes no second audit record."""
    status, webhook = await _hooks(
        api_stack,
        "POST",
        json={"name": "t", "url": "https://example.com/h", "topics": ["object.created"]},
    )
    assert status == 201
    path = f"/{webhook['id']}?force=true"
    assert (await _hooks(api_stack, "DELETE", path))[0] == 204
    found = webhook_lifecycle.find_webhook

    async def read_before_the_other_deleted(
        conn: Any, team_id: str, webhook_id: str, **_: Any
    ) -> Any:
        return webhook

    monkeypatch.setattr(webhook_lifecycle, "find_webhook", read_before_the_other_deleted)
    assert (await _hooks(api_stack, "DELETE", path))[0] == 404
    monkeypatch.setattr(webhook_lifecycle, "find_webhook", found)
    status, audit = await api_stack.auth_call(
        "GET", f"/v1/audit-log?team_id={api_stack.team_id}&action=webhook.force_deleted"
    )
    assert status == 200
    assert [e["target_id"] for e in audit["data"]] == [webhook["id"]]


async def test_an_edit_made_from_a_stale_read_is_refused_with_if_match(api_stack: Stack) -> None:
    """Two clients read the webhook; one changes its headers; the other sends back what it
    read with another header changed: with If-Match it gets 412, not the first client's
    change undone. A fresh ETag (from the GET, or the PATCH's answer) goes through."""
    status, created, created_headers = await _answer(
        api_stack,
        "POST",
        json={"name": "t", "url": "https://example.com/h", "topics": ["object.created"]},
    )
    assert status == 201
    path = f"/{created['id']}"
    read_etag = await _etag(api_stack, path)
    assert created_headers["ETag"] == read_etag, "the create answers the ETag a read would"
    status, _, headers = await _answer(
        api_stack,
        "PATCH",
        path,
        headers={"If-Match": read_etag},
        json={"headers": {"X-Region": "eu"}},
    )
    assert status == 200
    fresh_etag = headers["ETag"]
    assert fresh_etag != read_etag
    status, refused, _ = await _answer(
        api_stack,
        "PATCH",
        path,
        headers={"If-Match": read_etag},
        json={"headers": {"X-Tenant": "b"}},
    )
    assert status == 412
    assert refused["error"]["code"] == "precondition_failed"
    assert refused["error"]["details"]["current_etag"] == fresh_etag
    assert (await _hooks(api_stack, "GET", path))[1]["headers"] == {"X-Region": "eu"}
    # A list of ETags matches when one of them does.
    status, _, _ = await _answer(
        api_stack,
        "PATCH",
        path,
        headers={"If-Match": f"{read_etag}, {fresh_etag}"},
        json={"headers": {"X-Region": "eu", "X-Tenant": "b"}},
    )
    assert status == 200


async def test_a_change_between_the_if_match_check_and_the_write_is_a_412(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await _create_elsewhere(api_stack)
    etag = await _etag(api_stack, path)
    change = webhook_lifecycle._change
    landed = False

    async def another_change_lands_first(*args: Any, **kwargs: Any) -> Any:
        nonlocal landed
        if not landed:
            landed = True
            # The other client's edit, made through the route itself.
            assert (await _hooks(api_stack, "PATCH", path, json={"name": "meanwhile"}))[0] == 200
        return await change(*args, **kwargs)

    monkeypatch.setattr(webhook_lifecycle, "_change", another_change_lands_first)
    status, refused, _ = await _answer(
        api_stack, "PATCH", path, headers={"If-Match": etag}, json={"name": "mine"}
    )
    assert status == 412
    assert refused["error"]["code"] == "precondition_failed"
