"""The audit log: who did what to which token, readable with audit-log:read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import Stack


async def _audit(stack: Stack, query: str = "", token: str | None = None) -> tuple[int, Any]:
    return await stack.auth_call("GET", f"/v1/audit-log{query}", token)


async def test_token_changes_and_refusals_are_recorded(api_stack: Stack) -> None:
    """Create, rotate, revoke and a refused use appear newest first with actor and ip."""
    _, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "audited", "permissions": ["object:read"]}
    )
    await api_stack.auth_call("POST", f"/v1/tokens/{created['id']}/rotate", json={})
    await api_stack.auth_call("DELETE", f"/v1/tokens/{created['id']}")
    await api_stack.introspect(created["token"])
    status, page = await _audit(api_stack)
    assert status == 200
    mine = [e for e in page["data"] if e["target_id"] == created["id"]]
    assert [e["action"] for e in mine] == [
        "token.refused",
        "token.revoked",
        "token.rotated",
        "token.created",
    ]
    assert mine[0]["details"] == {"reason": "revoked"}
    revoked = mine[1]
    assert revoked["actor_user_id"] == api_stack.user_id
    assert revoked["ip"] == "127.0.0.1"
    assert revoked["request_id"].startswith("req_")


async def test_filters_and_pagination(api_stack: Stack) -> None:
    """Filter by action and time; pages follow next_cursor without overlap."""
    # The stack's own key, made by the operator's command line, is there already.
    _, before = await _audit(api_stack, "?action=token.created")
    for number in range(5):
        await api_stack.auth_call(
            "POST", "/v1/tokens", json={"name": f"t{number}", "permissions": ["object:read"]}
        )
    status, created = await _audit(api_stack, "?action=token.created")
    assert status == 200
    assert len(created["data"]) == len(before["data"]) + 5
    seen: list[str] = []
    cursor = ""
    while True:
        _, page = await _audit(api_stack, f"?action=token.created&limit=2{cursor}")
        seen.extend(entry["id"] for entry in page["data"])
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == [entry["id"] for entry in created["data"]]
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    _, later = await _audit(api_stack, f"?since={future}")
    assert later["data"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?limit=0", "limit"),
        ("?limit=501", "limit"),
        ("?limit=many", "limit"),
        ("?since=yesterday", "since"),
        # Seconds since 1970 are not a time here.
        ("?since=1700000000", "since"),
        ("?since=2026-01-01T00:00:00", "since"),
        ("?until=2026-01-01T00:00:00", "until"),
        ("?colour=blue", "colour"),
        ("?cursor=" + "c" * 65, "cursor"),
        ("?cursor=zzz", "cursor"),
        ("?cursor=0", "cursor"),
        ("?cursor=tok_" + "0" * 32, "cursor"),
        ("?actor=" + "a" * 65, "actor"),
        ("?action=" + "a" * 65, "action"),
        ("?team_id=" + "t" * 65, "team_id"),
        ("?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z", "until"),
        ("?limit=5&limit=6", "limit"),
    ],
)
async def test_bad_queries_get_422(api_stack: Stack, query: str, field: str) -> None:
    """Bad limits, unparseable or naive times, over-long filters and cursors, and unknown
    parameters are refused, each naming its parameter."""
    status, body = await _audit(api_stack, query)
    assert status == 422
    assert body["error"]["code"] == "validation_failed"
    assert [problem["field"] for problem in body["error"]["details"]] == [field]


async def test_reading_needs_the_permission(api_stack: Stack) -> None:
    """Without audit-log:read the log is forbidden."""
    reader = await api_stack.new_token(["object:read"])
    status, body = await _audit(api_stack, "", reader)
    assert status == 403
    assert body["error"]["details"] == {"permission": "audit-log:read"}


async def test_command_line_changes_are_audited(api_stack: Stack) -> None:
    """Memberships and keys made with `hookwire admin` leave records with the cli actor."""
    status, page = await _audit(api_stack, "?team_id=" + api_stack.team_id)
    assert status == 200
    membership = [e for e in page["data"] if e["action"] == "membership.set"]
    assert membership[0]["details"] == {"role": "owner"}
    assert membership[0]["ip"] == "cli"
    assert membership[0]["actor_user_id"] is None


async def test_an_operators_changes_to_a_key_are_seen_by_its_owner_alone(
    api_stack: Stack,
) -> None:
    """A key an operator made and revoked with `hookwire admin` shows both records to the
    key's owner (no user acted: the records name no team and no actor user); another user
    with audit-log:read on no team of the owner's sees neither."""
    from services.auth.admin import create_token, create_user, revoke_token

    engine = api_stack.api.engine
    key_id, _ = await create_token(
        engine,
        pepper="test-pepper",
        user_id=api_stack.user_id,
        name="made-by-operator",
        permissions=["object:read"],
    )
    await revoke_token(engine, key_id)
    _, page = await _audit(api_stack)
    records = [e for e in page["data"] if e["target_id"] == key_id]
    assert [(e["action"], e["actor_user_id"], e["ip"]) for e in records] == [
        ("token.revoked", None, "cli"),
        ("token.created", None, "cli"),
    ]

    stranger = await create_user(engine, "stranger@example.com", "Stranger")
    stranger_key_id, stranger_key = await create_token(
        engine,
        pepper="test-pepper",
        user_id=stranger,
        name="stranger",
        permissions=["audit-log:read"],
    )
    status, theirs = await _audit(api_stack, "", stranger_key)
    assert status == 200
    assert [(e["action"], e["target_id"]) for e in theirs["data"]] == [
        ("token.created", stranger_key_id)
    ]


async def test_a_dev_key_issued_again_revokes_the_one_before(api_stack: Stack) -> None:
    """`hookwire dev` issues a fresh key of the same name each run: the one before is
    revoked, not deleted, so a client still holding it is told so, and the audit log and
    the key list keep it."""
    from services.auth.admin import bootstrap_dev

    engine = api_stack.api.engine
    first = await bootstrap_dev(engine, "test-pepper", email="dev2@example.com", key_name="dev")
    second = await bootstrap_dev(engine, "test-pepper", email="dev2@example.com", key_name="dev")
    assert second["user_id"] == first["user_id"]
    assert (await api_stack.introspect(first["token"]))["reason"] == "revoked"
    assert (await api_stack.introspect(second["token"]))["active"] is True
    status, page = await _audit(api_stack, "", second["token"])
    assert status == 200
    about_first = [
        (e["action"], e["details"]) for e in page["data"] if e["target_id"] == first["token_id"]
    ]
    assert ("token.revoked", {"reason": "replaced by a new key of the same name"}) in about_first
    status, keys = await api_stack.auth_call("GET", "/v1/tokens", second["token"])
    assert status == 200
    assert {(k["id"], k["state"]) for k in keys["data"]} == {
        (first["token_id"], "revoked"),
        (second["token_id"], "active"),
    }


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("client-trace-" + "a" * 51, True),  # 64 characters: the audit log holds them
        ("client-trace-" + "a" * 52, False),  # 65: PostgreSQL refused the write (a 500)
        ("two words", False),
        ("caf\u00e9", False),
    ],
    ids=["64_chars", "65_chars", "space", "non_ascii"],
)
async def test_a_client_request_id_is_kept_only_when_it_can_be_stored(
    api_stack: Stack, given: str, kept: bool
) -> None:
    """The client's ``x-request-id`` is echoed and stored with the audit record; one that
    cannot be stored or logged as given is replaced, and the write goes through."""
    async with api_stack.session.post(
        f"{api_stack.auth_url}/v1/tokens",
        headers={**api_stack.headers(), "x-request-id": given},
        json={"name": "traced", "permissions": ["object:read"]},
    ) as response:
        assert response.status == 201, await response.text()
        echoed = response.headers["x-request-id"]
        created = await response.json()
    if kept:
        assert echoed == given
    else:
        assert echoed.startswith("req_")
    _, page = await _audit(api_stack, "?action=token.created")
    [record] = [e for e in page["data"] if e["target_id"] == created["id"]]
    assert record["request_id"] == echoed
