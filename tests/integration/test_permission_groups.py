"""Permission groups: tokens that reference a group follow its edits at once."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from services.auth import store
from services.shared import create_engine, migrate, new_id, utcnow
from tests.conftest import POSTGRES_DSN, Stack, audit_count
from tests.integration._inputs import EMPTY_BODIES, NOT_JSON


async def _group(stack: Stack, permissions: list[str], name: str = "crm") -> dict[str, Any]:
    status, group = await stack.auth_call(
        "POST", "/v1/permission-groups", json={"name": name, "permissions": permissions}
    )
    assert status == 201, group
    return group


async def test_group_edits_change_token_permissions_at_once(api_stack: Stack) -> None:
    """A token made from a group gains and loses what the group gains and loses."""
    group = await _group(api_stack, ["object:read"])
    status, created = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={"name": "via-group", "permission_group_id": group["id"]},
    )
    assert status == 201
    # The view says what the key can do: its own permissions (none) and the group's.
    assert (created["permissions"], created["group_permissions"]) == ([], ["object:read"])
    assert (await api_stack.introspect(created["token"]))["permissions"] == ["object:read"]
    status, edited = await api_stack.auth_call(
        "PATCH",
        f"/v1/permission-groups/{group['id']}",
        json={"permissions": ["object:read", "webhook:read"]},
    )
    assert status == 200
    assert edited["permissions"] == ["object:read", "webhook:read"]
    status, shown = await api_stack.auth_call("GET", f"/v1/tokens/{created['id']}")
    assert shown["group_permissions"] == ["object:read", "webhook:read"]
    others = [key for key in await api_stack.auth_list() if key["id"] != created["id"]]
    assert others
    assert all(key["group_permissions"] is None for key in others)
    assert (await api_stack.introspect(created["token"]))["permissions"] == [
        "object:read",
        "webhook:read",
    ]
    async with api_stack.session.get(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/webhooks",
        headers=api_stack.headers(created["token"]),
    ) as response:
        assert response.status == 200


async def test_groups_cannot_escalate(api_stack: Stack) -> None:
    """Neither creating nor editing a group can reach beyond the caller's permissions."""
    limited = await api_stack.new_token(["token:manage", "object:read"])
    status, answer = await api_stack.auth_call(
        "POST",
        "/v1/permission-groups",
        limited,
        json={"name": "big", "permissions": ["webhook:delete"]},
    )
    assert status == 403
    group = await _group(api_stack, ["object:read"])
    status, answer = await api_stack.auth_call(
        "PATCH",
        f"/v1/permission-groups/{group['id']}",
        limited,
        json={"permissions": ["team:billing"]},
    )
    assert status == 403
    assert answer["error"]["details"] == {"permissions": ["team:billing"]}


def _fields(answer: dict[str, Any]) -> list[str]:
    details = answer["error"]["details"]
    return [d["field"] for d in details] if isinstance(details, list) else []


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"name": "crm", "permissions": ["object:read"]}, 409, "duplicate_name", None),
        (
            {"name": "x", "permissions": ["object:explode"]},
            422,
            "unknown_permission",
            "permissions",
        ),
        ({"name": "x", "permissions": []}, 422, "validation_failed", "permissions"),
        ({"name": "x"}, 422, "validation_failed", "permissions"),
        (
            {"name": "x", "permissions": ["object:read"], "owner": "me"},
            422,
            "validation_failed",
            "owner",
        ),
        ({"name": "", "permissions": ["object:read"]}, 422, "validation_failed", "name"),
        ({"name": "g\u0000", "permissions": ["object:read"]}, 422, "validation_failed", "name"),
        ({"name": "n" * 201, "permissions": ["object:read"]}, 422, "validation_failed", "name"),
        (
            {"name": "x", "description": "d" * 2001, "permissions": ["object:read"]},
            422,
            "validation_failed",
            "description",
        ),
        (
            {"name": "x", "permissions": ["object:read"] * 101},
            422,
            "validation_failed",
            "permissions",
        ),
        ({"name": "x", "permissions": "object:read"}, 422, "validation_failed", "permissions"),
        ({"name": 7, "permissions": ["object:read"]}, 422, "validation_failed", "name"),
        ([{"name": "x", "permissions": ["object:read"]}], 422, "validation_failed", "body"),
        # Raw bytes: sent as they are, not as JSON. The last is a valid group but for its
        # trailing comma.
        *[
            (raw, 422, "validation_failed", "body")
            for raw in [
                *EMPTY_BODIES,
                *NOT_JSON,
                b'{"name": "x", "permissions": ["object:read"],}',
            ]
        ],
    ],
)
async def test_bad_groups_are_refused(
    api_stack: Stack, body: Any, status: int, code: str, field: str | None
) -> None:
    """Duplicate names, unknown or missing permissions, over-long or wrong-typed values,
    unknown fields: each refused with its code and field, and no group is stored."""
    await _group(api_stack, ["object:read"])
    sent = {"data": body} if isinstance(body, bytes) else {"json": body}
    got, answer = await api_stack.auth_call("POST", "/v1/permission-groups", **sent)
    assert got == status
    assert answer["error"]["code"] == code
    if field is not None:
        assert field in _fields(answer)
    _, listed = await api_stack.auth_call("GET", "/v1/permission-groups")
    assert [g["name"] for g in listed["data"]] == ["crm"]


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({}, 422, "validation_failed", "body"),
        *[(raw, 422, "validation_failed", "body") for raw in [*EMPTY_BODIES, *NOT_JSON]],
        ({"permissions": ["object:explode"]}, 422, "unknown_permission", "permissions"),
        ({"permissions": []}, 422, "validation_failed", "permissions"),
        ({"permissions": ["object:read"] * 101}, 422, "validation_failed", "permissions"),
        ({"colour": "red"}, 422, "validation_failed", "colour"),
        ({"name": ""}, 422, "validation_failed", "name"),
        ({"name": "n\u0000"}, 422, "validation_failed", "name"),
        ({"name": "n" * 201}, 422, "validation_failed", "name"),
        ({"description": "d" * 2001}, 422, "validation_failed", "description"),
        ({"name": 7}, 422, "validation_failed", "name"),
        ({"name": "taken"}, 409, "duplicate_name", None),
    ],
)
async def test_bad_group_updates_are_refused(
    api_stack: Stack, body: Any, status: int, code: str, field: str | None
) -> None:
    """An empty change, unknown permissions or fields, over-long or wrong-typed values and
    a name another group has: refused, the group unchanged and nothing audited."""
    group = await _group(api_stack, ["object:read"])
    await _group(api_stack, ["object:read"], name="taken")
    sent = {"data": body} if isinstance(body, bytes) else {"json": body}
    got, answer = await api_stack.auth_call("PATCH", f"/v1/permission-groups/{group['id']}", **sent)
    assert got == status, answer
    assert answer["error"]["code"] == code
    if field is not None:
        assert field in _fields(answer)
    _, shown = await api_stack.auth_call("GET", f"/v1/permission-groups/{group['id']}")
    assert shown == group
    assert await audit_count(api_stack, "permission_group.updated", group["id"]) == 0


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("PATCH", {"name": "renamed"}),
        ("PATCH", {"permissions": ["webhook:read"]}),
        ("DELETE", None),
    ],
    ids=["rename", "repermission", "delete"],
)
async def test_a_missing_group_is_not_found(
    api_stack: Stack, method: str, body: dict[str, Any] | None
) -> None:
    """An id no group of the caller's has: 404 in the one error shape; the caller's
    groups are as they were and nothing is audited."""
    group = await _group(api_stack, ["object:read"])
    missing = new_id("pg")
    got, answer = await api_stack.auth_call(method, f"/v1/permission-groups/{missing}", json=body)
    assert got == 404, answer
    assert answer == {
        "error": {
            "code": "not_found",
            "message": f"permission group {missing} not found",
            "details": None,
        }
    }
    _, listed = await api_stack.auth_call("GET", "/v1/permission-groups")
    assert listed["data"] == [group]
    for action in ("permission_group.updated", "permission_group.deleted"):
        assert await audit_count(api_stack, action, missing) == 0


async def test_a_group_in_use_cannot_be_deleted(api_stack: Stack) -> None:
    """Deleting a group its tokens rely on is refused until they are revoked."""
    group = await _group(api_stack, ["object:read"])
    _, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "uses", "permission_group_id": group["id"]}
    )
    path = f"/v1/permission-groups/{group['id']}"
    assert (await api_stack.auth_call("DELETE", path))[0] == 409
    assert (await api_stack.auth_call("DELETE", f"/v1/tokens/{created['id']}"))[0] == 204
    assert (await api_stack.auth_call("DELETE", path))[0] == 204
    assert (await api_stack.auth_call("GET", path))[0] == 404


async def test_a_short_lived_key_cannot_widen_a_group_used_by_a_key_outliving_it(
    api_stack: Stack,
) -> None:
    """Widening a group widens every key that uses it: a key that expires in an hour must
    not give a key with no expiry permissions it did not have (its unfenced heir, as when
    creating one). Narrowing stays allowed, and a key that outlives them may widen."""
    group = await _group(api_stack, ["object:read"])
    status, _ = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={"name": "lasting", "permission_group_id": group["id"]},
    )
    assert status == 201
    soon = (utcnow() + timedelta(hours=1)).isoformat()
    status, short = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={
            "name": "short",
            "permissions": ["token:manage", "object:read", "webhook:read"],
            "expires_at": soon,
        },
    )
    assert status == 201, short
    path = f"/v1/permission-groups/{group['id']}"
    wider = {"permissions": ["object:read", "webhook:read"]}
    status, refused = await api_stack.auth_call("PATCH", path, short["token"], json=wider)
    assert status == 403, refused
    assert "outlives" in refused["error"]["message"]
    _, shown = await api_stack.auth_call("GET", path)
    assert shown["permissions"] == ["object:read"]
    status, _ = await api_stack.auth_call("PATCH", path, short["token"], json={"name": "crm2"})
    assert status == 200, "a rename widens nothing"
    assert (await api_stack.auth_call("PATCH", path, json=wider))[0] == 200
    narrower = {"permissions": ["object:read"]}
    assert (await api_stack.auth_call("PATCH", path, short["token"], json=narrower))[0] == 200


if POSTGRES_DSN:
    # SQLite runs one writer at a time and has no row locks (docs/auth.md).

    @pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
    async def test_a_group_change_waits_for_a_key_being_created_with_it(
        database_url: str,
    ) -> None:
        """A key created with a group share-locks the group until it is committed: a
        widening (or a deletion) of the group waits, then sees the new key among the
        group's keys and checks it. Without the lock it read the keys at once, missed the
        new one, and widened a key its limits never checked."""
        await migrate(database_url)
        engine = create_engine(database_url)
        try:
            async with engine.begin() as conn:
                user_id = await store.get_or_create_user(conn, "a@example.com", "A")
                group_id = new_id("pg")
                now = utcnow()
                group = {
                    "user_id": user_id,
                    "name": "crm",
                    "description": "",
                    "permissions": ["object:read"],
                    "created_at": now,
                    "updated_at": now,
                }
                await store.save_group(conn, group_id, group, create=True)

            async def widening_reads_the_keys() -> list[str]:
                async with engine.begin() as conn:
                    await store.group_rows(conn, user_id, group_id, lock=True)
                    return [key.id for key in await store.group_keys(conn, group_id)]

            async with engine.begin() as conn:
                assert await store.group_permissions(conn, user_id, group_id) == {"object:read"}
                widening = asyncio.create_task(widening_reads_the_keys())
                await asyncio.sleep(0.5)
                assert not widening.done(), "the group change waits for the key's creation"
                token_id, _ = await store.create_token(
                    conn,
                    pepper="p",
                    user_id=user_id,
                    name="k",
                    permissions=[],
                    permission_group_id=group_id,
                )
            assert await asyncio.wait_for(widening, 10) == [token_id]
        finally:
            await engine.dispose()
