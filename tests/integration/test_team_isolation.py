"""Teams and users are walled off from each other.

A role narrower than owner narrows every key of its user in that team; another team's
webhooks, objects and deliveries do not exist on a team's routes; another user's
permission groups and keys do not exist for a caller. Each foreign id is answered exactly
as an id never made, and what it names is left as it was (read back by its owner)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import orjson
from sqlalchemy import func, select

from services.auth.admin import add_member, create_team, create_token, create_user
from services.shared import PERMISSIONS, new_id, tables
from tests.conftest import Receiver, Stack

# The member role of docs/auth.md, written out rather than read from the code under test.
MEMBER_ROLE = {
    *(
        f"{kind}:{verb}"
        for kind in ("object", "form", "view")
        for verb in ("create", "read", "update", "delete")
    ),
    "object-type:read",
    "integration:read",
    "webhook:read",
    "upload",
    "token:manage",
}


async def _api(
    stack: Stack,
    method: str,
    team_id: str,
    path: str,
    token: str,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    """Call the api under ``/v1/teams/{team_id}``; returns (status, JSON body or None)."""
    async with stack.session.request(
        method,
        f"{stack.api_url}/v1/teams/{team_id}{path}",
        headers={**stack.headers(token), **(headers or {})},
        **kwargs,
    ) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body


async def _introspect(
    stack: Stack, token: str, team_id: str, permission: str | None = None
) -> dict[str, Any]:
    payload = {"token": token, "team_id": team_id}
    if permission is not None:
        payload["permission"] = permission
    status, answer = await stack.introspect_call(payload)
    assert status == 200
    return dict(answer)


async def _person(
    stack: Stack, name: str, roles: Mapping[str, str], permissions: list[str] | frozenset[str]
) -> tuple[str, str, str]:
    """A user with the given role in each team and one key; (user id, key id, key),
    made the way an operator makes them (``hookwire admin``)."""
    engine = stack.api.engine
    user_id = await create_user(engine, f"{name}@example.com", name.title())
    for team_id, role in roles.items():
        await add_member(engine, user_id, team_id, role)
    token_id, token = await create_token(
        engine, pepper="test-pepper", user_id=user_id, name=name, permissions=sorted(permissions)
    )
    return user_id, token_id, token


def _naming(body: Any, real_id: str, stand_in: str = "<id>") -> Any:
    """The answer with an id replaced, to compare answers about two different ids."""
    return orjson.loads(orjson.dumps(body).decode().replace(real_id, stand_in))


async def _as_if_never_made(
    call: Any, path: str, foreign_id: str, made_up_id: str, **kwargs: Any
) -> None:
    """``call(path)`` about another team's or user's id answers 404 exactly as it does
    about an id no one ever made (its existence is not revealed)."""
    status, body = await call(path.format(foreign_id), **kwargs)
    made_up_status, made_up_body = await call(path.format(made_up_id), **kwargs)
    assert made_up_status == 404, (path, made_up_body)
    assert status == 404, (path, body)
    assert (status, _naming(body, foreign_id)) == (404, _naming(made_up_body, made_up_id)), path


async def _rows(stack: Stack, table: Any, *where: Any) -> list[dict[str, Any]]:
    async with stack.api.engine.connect() as conn:
        query = select(table).where(*where).order_by(*table.primary_key.columns)
        rows = await conn.execute(query)
    return [dict(row._mapping) for row in rows]


async def _audit_records_of(stack: Stack, *target_ids: str) -> int:
    async with stack.api.engine.connect() as conn:
        count = (
            await conn.execute(
                select(func.count()).where(tables.audit_log.c.target_id.in_(target_ids))
            )
        ).scalar()
    return int(count or 0)


# 1. Roles narrower than owner.


async def test_a_members_key_does_only_what_the_role_allows(api_stack: Stack) -> None:
    """A member's key asking for webhook:create and object:force-delete has neither in the
    team (introspection does not list them, the routes answer 403, nothing is written),
    while what the role grants works; in a team the same user owns, the same key has all
    it asks for. An access token carries the roles and is narrowed the same way."""
    team_a = api_stack.team_id
    team_c = await create_team(api_stack.api.engine, "member-owned")
    asked = [
        "webhook:read",
        "webhook:create",
        "object:read",
        "object:create",
        "object:delete",
        "object:force-delete",
        "token:manage",
    ]
    _, _, key = await _person(api_stack, "mia", {team_a: "member", team_c: "owner"}, asked)
    owners = await api_stack.create_webhook("http://127.0.0.1:9/hook", routed=False)

    answer = await _introspect(api_stack, key, team_a)
    assert answer["active"] is True
    assert answer["permissions"] == sorted(set(asked) & MEMBER_ROLE)
    assert "webhook:create" not in answer["permissions"]
    assert "object:force-delete" not in answer["permissions"]
    for lacking in ("webhook:create", "object:force-delete"):
        assert await _introspect(api_stack, key, team_a, lacking) == {
            "active": False,
            "reason": "permission_denied",
            "permission": lacking,
        }
    assert (await _introspect(api_stack, key, team_a, "webhook:read"))["active"] is True
    assert (await _introspect(api_stack, key, team_c))["permissions"] == sorted(asked)

    new_webhook = {"name": "mine", "url": "http://127.0.0.1:9/hook", "topics": ["object.created"]}
    status, listed = await _api(api_stack, "GET", team_a, "/webhooks", key)
    assert status == 200
    assert [w["id"] for w in listed["data"]] == [owners["id"]]
    status, refused = await _api(api_stack, "POST", team_a, "/webhooks", key, json=new_webhook)
    assert status == 403
    assert refused["error"]["code"] == "forbidden"
    assert refused["error"]["details"] == {"permission": "webhook:create"}
    _, listed = await _api(api_stack, "GET", team_a, "/webhooks", key)
    assert [w["id"] for w in listed["data"]] == [owners["id"]]
    status, _ = await _api(api_stack, "POST", team_c, "/webhooks", key, json=new_webhook)
    assert status == 201

    status, created = await _api(api_stack, "POST", team_a, "/objects/contact", key, json={"n": 1})
    assert status == 201
    one = f"/objects/contact/{created['id']}"
    status, refused = await _api(api_stack, "DELETE", team_a, f"{one}?force=true", key)
    assert status == 403
    assert refused["error"]["details"] == {"permission": "object:force-delete"}
    status, kept = await _api(api_stack, "GET", team_a, one, key)
    assert (status, kept["version"], kept["deleted_at"]) == (200, 1, None)
    assert (await _api(api_stack, "DELETE", team_a, one, key))[0] == 204

    status, exchanged = await api_stack.auth_call("POST", "/v1/token-exchange", key)
    assert status == 200
    access = exchanged["access_token"]
    claims = jwt.decode(access, options={"verify_signature": False})
    assert claims["teams"] == {team_a: "member", team_c: "owner"}
    assert (await _api(api_stack, "GET", team_a, "/webhooks", access))[0] == 200
    status, refused = await _api(api_stack, "POST", team_a, "/webhooks", access, json=new_webhook)
    assert status == 403, refused
    assert refused["error"]["details"] == {"permission": "webhook:create"}
    status, refused = await _api(api_stack, "DELETE", team_a, f"{one}?force=true", access)
    assert status == 403, refused
    assert refused["error"]["details"] == {"permission": "object:force-delete"}
    assert (await _api(api_stack, "POST", team_c, "/webhooks", access, json=new_webhook))[0] == 201
    _, listed = await _api(api_stack, "GET", team_a, "/webhooks", api_stack.token)
    assert [w["id"] for w in listed["data"]] == [owners["id"]]


async def test_an_admins_key_has_all_but_billing(api_stack: Stack) -> None:
    """An admin's key with every permission has all of them in the team but
    ``team:billing``; what an admin has and a member lacks (force-delete) works."""
    team_a = api_stack.team_id
    _, _, key = await _person(api_stack, "ada", {team_a: "admin"}, PERMISSIONS)
    answer = await _introspect(api_stack, key, team_a)
    assert answer["permissions"] == sorted(PERMISSIONS - {"team:billing"})
    assert await _introspect(api_stack, key, team_a, "team:billing") == {
        "active": False,
        "reason": "permission_denied",
        "permission": "team:billing",
    }
    webhook = await api_stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    path = f"/webhooks/{webhook['id']}"
    assert (await _api(api_stack, "DELETE", team_a, f"{path}?force=true", key))[0] == 204
    status, gone = await _api(api_stack, "GET", team_a, path, api_stack.token)
    assert (status, gone["error"]["code"]) == (404, "not_found")


async def test_a_member_reads_only_its_own_audit_records(api_stack: Stack) -> None:
    """``audit-log:read`` on a member's key shows the member's own actions, not the team's
    records: the member role does not grant reading them (owners and admins do)."""
    team_a = api_stack.team_id
    _, _, member_key = await _person(
        api_stack, "max", {team_a: "member"}, ["audit-log:read", "token:manage", "object:read"]
    )
    _, _, admin_key = await _person(api_stack, "amy", {team_a: "admin"}, ["audit-log:read"])
    owners = await api_stack.create_webhook("http://127.0.0.1:9/hook", routed=False)
    status, mine = await api_stack.auth_call(
        "POST", "/v1/tokens", member_key, json={"name": "own", "permissions": ["object:read"]}
    )
    assert status == 201
    for query in ("", f"?team_id={team_a}"):
        status, page = await api_stack.auth_call("GET", f"/v1/audit-log{query}", member_key)
        assert status == 200
        assert owners["id"] not in {record["target_id"] for record in page["data"]}
    _, page = await api_stack.auth_call("GET", "/v1/audit-log", member_key)
    assert mine["id"] in {record["target_id"] for record in page["data"]}
    _, page = await api_stack.auth_call("GET", f"/v1/audit-log?team_id={team_a}", admin_key)
    assert owners["id"] in {record["target_id"] for record in page["data"]}


# 2. Another team's ids on a team's routes.


async def _settled_deliveries(stack: Stack, team_id: str, token: str, count: int) -> list[Any]:
    """The team's delivery log once it holds ``count`` deliveries, each delivered."""
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        status, page = await _api(stack, "GET", team_id, "/deliveries", token)
        assert status == 200, page
        if len(page["data"]) >= count and all(d["state"] == "delivered" for d in page["data"]):
            return list(page["data"])
        assert asyncio.get_running_loop().time() < deadline, f"log never settled: {page}"
        await asyncio.sleep(0.05)


async def _team_rows(stack: Stack, team_id: str) -> dict[str, Any]:
    """Everything the team has in the database that the api's routes could change."""
    deliveries = await _rows(stack, tables.deliveries, tables.deliveries.c.team_id == team_id)
    return {
        "webhooks": await _rows(stack, tables.webhooks, tables.webhooks.c.team_id == team_id),
        "objects": await _rows(stack, tables.objects, tables.objects.c.team_id == team_id),
        "deliveries": deliveries,
        "attempts": await _rows(
            stack,
            tables.delivery_attempts,
            tables.delivery_attempts.c.delivery_id.in_([d["id"] for d in deliveries]),
        ),
    }


async def test_another_teams_ids_do_not_exist(stack: Stack, receiver: Receiver) -> None:
    """Team B's webhooks (live and trashed), objects (live and trashed) and delivery,
    named on team A's routes by a key of A's owner: every route answers as for an id never
    made, B's rows stay as they were (B's own key reads them back unchanged), nothing is
    sent to B's receiver, and A's lists show none of them."""
    team_a, owner_key = stack.team_id, stack.token
    team_b = await create_team(stack.api.engine, "beta")
    _, _, bob = await _person(stack, "bob", {team_b: "owner"}, PERMISSIONS)

    async def as_bob(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        return await _api(stack, method, team_b, path, bob, **kwargs)

    async def as_a(path: str, method: str = "GET", **kwargs: Any) -> tuple[int, Any]:
        return await _api(stack, method, team_a, path, owner_key, **kwargs)

    hook = {"name": "b", "url": receiver.url, "topics": ["object.created", "object.deleted"]}
    status, live_hook = await as_bob("POST", "/webhooks", json=hook)
    assert status == 201
    await stack.wait_for_webhook(live_hook["id"])
    status, trashed_hook = await as_bob("POST", "/webhooks", json={**hook, "name": "trashed"})
    assert status == 201
    assert (await as_bob("DELETE", f"/webhooks/{trashed_hook['id']}"))[0] == 204
    status, live_object = await as_bob("POST", "/objects/contact", json={"name": "Bo"})
    assert status == 201
    status, trashed_object = await as_bob("POST", "/objects/contact", json={"name": "Old"})
    assert status == 201
    assert (await as_bob("DELETE", f"/objects/contact/{trashed_object['id']}"))[0] == 204
    await receiver.wait_for(3)
    logged = await _settled_deliveries(stack, team_b, bob, 3)
    delivery_id = logged[0]["id"]

    a_hook = await stack.create_webhook("http://127.0.0.1:9/hook", ["object.send"], routed=False)
    a_object = await stack.create_object({"name": "Ann"})

    before = await _team_rows(stack, team_b)
    audited_before = await _audit_records_of(
        stack, live_hook["id"], trashed_hook["id"], live_object["id"], trashed_object["id"]
    )
    status, bob_hook_before = await as_bob("GET", f"/webhooks/{live_hook['id']}")
    assert status == 200

    made_up_hook, made_up_object, made_up_delivery = new_id("wh"), new_id("obj"), new_id("msg")
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    for method, path, kwargs in (
        ("GET", "/webhooks/{}", {}),
        ("PATCH", "/webhooks/{}", {"json": {"name": "taken"}}),
        (
            "PATCH",
            "/webhooks/{}",
            {"json": {"url": "http://127.0.0.1:9/elsewhere"}, "headers": {"If-Match": "*"}},
        ),
        ("DELETE", "/webhooks/{}", {}),
        ("DELETE", "/webhooks/{}?force=true", {}),
        ("POST", "/webhooks/{}/rotate-secret", {"json": {"grace_seconds": 0}}),
        ("POST", "/webhooks/{}/test", {"json": {}}),
        ("POST", "/webhooks/{}/replay", {"json": {"since": since}}),
        ("GET", "/webhooks/{}/deliveries", {}),
    ):
        await _as_if_never_made(as_a, path, live_hook["id"], made_up_hook, method=method, **kwargs)
    for method, path in (
        ("POST", "/webhooks/{}/restore"),
        ("DELETE", "/webhooks/{}?force=true"),
        ("GET", "/webhooks/{}/deliveries"),
        ("POST", "/webhooks/{}/replay"),
    ):
        body = {"since": since} if path.endswith("replay") else None
        await _as_if_never_made(
            as_a, path, trashed_hook["id"], made_up_hook, method=method, json=body
        )
    for method, path, body in (
        ("GET", "/objects/contact/{}", None),
        ("PATCH", "/objects/contact/{}", {"name": "Mallory"}),
        ("DELETE", "/objects/contact/{}", None),
        ("DELETE", "/objects/contact/{}?force=true", None),
        ("POST", "/objects/contact/{}/send", {"to": "mallory@example.com"}),
    ):
        await _as_if_never_made(
            as_a, path, live_object["id"], made_up_object, method=method, json=body
        )
    for method, path in (
        ("POST", "/objects/contact/{}/restore"),
        ("DELETE", "/objects/contact/{}?force=true"),
    ):
        await _as_if_never_made(as_a, path, trashed_object["id"], made_up_object, method=method)
    for method, path in (("GET", "/deliveries/{}"), ("POST", "/deliveries/{}/retry")):
        await _as_if_never_made(as_a, path, delivery_id, made_up_delivery, method=method)

    b_ids = {live_hook["id"], trashed_hook["id"], live_object["id"], trashed_object["id"]}
    b_ids |= {d["id"] for d in logged}
    for path, own in (
        ("/webhooks", {a_hook["id"]}),
        ("/webhooks?trashed=true", set()),
        ("/objects/contact", {a_object}),
        ("/objects/contact?trashed=true", set()),
        ("/deliveries", None),
        (f"/deliveries?webhook_id={live_hook['id']}", set()),
    ):
        status, page = await as_a(path)
        assert status == 200, (path, page)
        listed = {item["id"] for item in page["data"]}
        assert not listed & b_ids, path
        if own is not None:
            assert listed == own, path
    status, refused = await _api(stack, "GET", team_a, "/webhooks", bob)
    assert (status, refused["error"]["code"]) == (404, "not_found")

    assert await _team_rows(stack, team_b) == before
    assert (
        await _audit_records_of(
            stack, live_hook["id"], trashed_hook["id"], live_object["id"], trashed_object["id"]
        )
        == audited_before
    )
    status, bob_hook = await as_bob("GET", f"/webhooks/{live_hook['id']}")
    assert (status, bob_hook) == (200, bob_hook_before)
    _, bob_trash = await as_bob("GET", "/webhooks?trashed=true")
    assert [w["id"] for w in bob_trash["data"]] == [trashed_hook["id"]]
    status, bob_object = await as_bob("GET", f"/objects/contact/{live_object['id']}")
    assert (status, bob_object["version"], bob_object["data"]) == (200, 1, {"name": "Bo"})
    _, bob_objects_trash = await as_bob("GET", "/objects/contact?trashed=true")
    assert [o["id"] for o in bob_objects_trash["data"]] == [trashed_object["id"]]
    status, bob_delivery = await as_bob("GET", f"/deliveries/{delivery_id}")
    assert (status, bob_delivery["attempt_count"]) == (200, 1)

    # Nothing was sent to B's receiver: B's own test event is the next thing it gets (a
    # re-send or test of the same webhook would be ahead of it, on the same partition).
    status, sent = await as_bob("POST", f"/webhooks/{live_hook['id']}/test", json={})
    assert status == 202
    await receiver.wait_for(4)
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 4
    assert receiver.received[-1].headers["webhook-id"] == sent["delivery_id"]


# 3. Another user's permission groups.


async def test_another_users_permission_groups_do_not_exist(api_stack: Stack) -> None:
    """Showing, editing or deleting another user's group, or making a key from it,
    answers as for a group never made, and leaves the group and its key as they were: a
    group in use answers 404 too, not the 409 that would reveal it."""
    _, _, olga = await _person(api_stack, "olga", {}, ["token:manage", "object:read"])
    groups = {}
    for name in ("used", "spare"):
        status, group = await api_stack.auth_call(
            "POST",
            "/v1/permission-groups",
            olga,
            json={"name": name, "permissions": ["object:read"]},
        )
        assert status == 201
        groups[name] = group
    status, olgas_key = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        olga,
        json={"name": "grouped", "permission_group_id": groups["used"]["id"]},
    )
    assert status == 201
    _, owners_keys_before = await api_stack.auth_call("GET", "/v1/tokens")

    async def as_owner(path: str, method: str = "GET", **kwargs: Any) -> tuple[int, Any]:
        return await api_stack.auth_call(method, path, **kwargs)

    made_up = new_id("pg")
    for group in groups.values():
        for method, body in (
            ("GET", None),
            ("PATCH", {"name": "mine"}),
            ("PATCH", {"permissions": ["object:read", "webhook:read"]}),
            ("DELETE", None),
        ):
            await _as_if_never_made(
                as_owner, "/v1/permission-groups/{}", group["id"], made_up, method=method, json=body
            )
        status, refused = await api_stack.auth_call(
            "POST", "/v1/tokens", json={"name": "borrowed", "permission_group_id": group["id"]}
        )
        _, unknown = await api_stack.auth_call(
            "POST", "/v1/tokens", json={"name": "borrowed", "permission_group_id": made_up}
        )
        assert (status, _naming(refused, group["id"])) == (404, _naming(unknown, made_up))

    status, listed = await api_stack.auth_call("GET", "/v1/permission-groups")
    assert status == 200
    assert not {g["id"] for g in listed["data"]} & {g["id"] for g in groups.values()}
    assert (await api_stack.auth_call("GET", "/v1/tokens"))[1] == owners_keys_before
    for group in groups.values():
        assert await api_stack.auth_call("GET", f"/v1/permission-groups/{group['id']}", olga) == (
            200,
            group,
        )
        # Only olga's own creations are in the audit log.
        assert await _audit_records_of(api_stack, group["id"]) == 1
    # The key drawing on the group still has what the group gives it.
    async with api_stack.session.post(
        f"{api_stack.auth_url}/v1/introspect",
        json={"token": olgas_key["token"]},
        headers={"authorization": "Bearer test-service-credential"},
    ) as response:
        answer = await response.json()
    assert (answer["active"], answer["permissions"]) == (True, ["object:read"])


# 4. Another user's keys.


async def test_another_users_key_is_left_as_it_was(api_stack: Stack) -> None:
    """Every change the owner's key tries on another user's key answers as for a key never
    made; the key still works on the api and in introspection, and its row and view are
    as they were (but for its last use)."""
    team_o = await create_team(api_stack.api.engine, "otto-team")
    _, otto_key_id, otto = await _person(
        api_stack, "otto", {team_o: "owner"}, ["token:manage", "webhook:read"]
    )
    used = ("last_used_at", "last_used_ip")

    def as_it_stands(view: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in view.items() if name not in used}

    status, view_before = await api_stack.auth_call("GET", f"/v1/tokens/{otto_key_id}", otto)
    assert status == 200
    [row_before] = await _rows(api_stack, tables.tokens, tables.tokens.c.id == otto_key_id)

    async def as_owner(path: str, method: str = "GET", **kwargs: Any) -> tuple[int, Any]:
        return await api_stack.auth_call(method, path, **kwargs)

    made_up = new_id("tok")
    for method, suffix, body in (
        ("GET", "", None),
        ("PATCH", "", {"name": "mine"}),
        ("PATCH", "", {"description": "taken"}),
        ("PATCH", "", {"active": False}),
        ("POST", "/rotate", {"grace_seconds": 0}),
        ("POST", "/rotate", {}),
        ("POST", "/expire", None),
        ("DELETE", "", None),
    ):
        await _as_if_never_made(
            as_owner, "/v1/tokens/{}" + suffix, otto_key_id, made_up, method=method, json=body
        )
    _, owners_keys = await api_stack.auth_call("GET", "/v1/tokens")
    assert otto_key_id not in {key["id"] for key in owners_keys["data"]}

    answer = await _introspect(api_stack, otto, team_o)
    assert (answer["active"], answer["token_id"]) == (True, otto_key_id)
    status, _ = await _api(api_stack, "GET", team_o, "/webhooks", otto)
    assert status == 200
    status, view_after = await api_stack.auth_call("GET", f"/v1/tokens/{otto_key_id}", otto)
    assert status == 200
    assert as_it_stands(view_after) == as_it_stands(view_before)
    assert view_after["state"] == "active"
    [row_after] = await _rows(api_stack, tables.tokens, tables.tokens.c.id == otto_key_id)
    assert as_it_stands(row_after) == as_it_stands(row_before)
    # Its creation by the operator is the only record of it.
    assert await _audit_records_of(api_stack, otto_key_id) == 1
