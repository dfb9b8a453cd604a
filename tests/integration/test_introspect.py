"""The auth service's introspection endpoint, called over real HTTP."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.auth import app as auth_app
from services.auth import store
from services.auth.tokens import generate_token, hash_token
from tests.conftest import Stack, audit_count, corrupt, pause_first_call
from tests.integration._inputs import EMPTY_BODIES, NOT_JSON


async def test_valid_token_is_active_with_team_permissions(api_stack: Stack) -> None:
    """RFC 7662 shape with the effective permissions in that team."""
    status, answer = await api_stack.introspect_call(
        {"token": api_stack.token, "team_id": api_stack.team_id}
    )
    assert status == 200
    assert answer["active"] is True
    assert answer["user_id"] == api_stack.user_id
    assert answer["team_id"] == api_stack.team_id
    assert "webhook:create" in answer["permissions"]


async def test_inactive_answers_say_why(api_stack: Stack) -> None:
    """Malformed and unknown tokens, and other teams, are inactive with a reason."""
    cases = [
        ({"token": "hwk_nope"}, "malformed"),
        ({"token": corrupt(api_stack.token)}, "malformed"),
        ({"token": generate_token()}, "unknown"),
        ({"token": api_stack.token, "team_id": "team_unknown"}, "not_member"),
    ]
    for payload, reason in cases:
        status, answer = await api_stack.introspect_call(payload)
        assert status == 200
        assert answer == {"active": False, "reason": reason}


async def test_service_credential_is_required(api_stack: Stack) -> None:
    """Without the right service credential nobody can probe tokens."""
    for credential in (None, "wrong"):
        status, answer = await api_stack.introspect_call({"token": api_stack.token}, credential)
        assert status == 401
        assert answer["error"]["code"] == "invalid_service_credential"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"extra": 1}, "extra"),
        ({"token": 5}, "token"),
        ({"token": None}, "token"),
        ({"token": "hwk_" + "a" * 253}, "token"),
        ({"team_id": "t" * 129}, "team_id"),
        ({"permission": "p" * 65}, "permission"),
        ({"client_ip": "1" * 65}, "client_ip"),
        ({"team_id": 5}, "team_id"),
        ([], "body"),
    ],
)
async def test_bad_introspection_bodies_get_422(api_stack: Stack, payload: Any, field: str) -> None:
    """Unknown fields, wrong types and values past their limits are refused, naming the
    field (a token past 256 characters is not looked at, not answered "malformed")."""
    if isinstance(payload, dict) and "token" not in payload:
        payload = {"token": api_stack.token, **payload}
    status, answer = await api_stack.introspect_call(payload)
    assert status == 422
    assert answer["error"]["code"] == "validation_failed"
    assert field in [d["field"] for d in answer["error"]["details"]]


@pytest.mark.parametrize("raw", [*EMPTY_BODIES, *NOT_JSON, b"token=x"])
async def test_introspection_bodies_that_are_not_json_get_422(api_stack: Stack, raw: bytes) -> None:
    """An empty or unparseable body is refused naming the body."""
    async with api_stack.session.post(
        f"{api_stack.auth_url}/v1/introspect",
        data=raw,
        headers={"authorization": "Bearer test-service-credential"},
    ) as response:
        assert response.status == 422
        answer = await response.json()
    assert [d["field"] for d in answer["error"]["details"]] == ["body"]


async def test_a_missing_token_field_is_named(api_stack: Stack) -> None:
    """``{}``: the token is required."""
    status, answer = await api_stack.introspect_call({})
    assert status == 422
    assert [d["field"] for d in answer["error"]["details"]] == ["token"]


async def test_a_revoke_during_a_cache_fill_is_not_undone(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup that read the key before it was revoked does not cache it as active."""
    status, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "held", "permissions": ["object:read"]}
    )
    assert status == 201
    held_hash = hash_token(created["token"], "test-pepper")
    pause = pause_first_call(
        monkeypatch, store, "find_token", only=lambda conn, secret_hash: secret_hash == held_hash
    )
    first = asyncio.create_task(api_stack.introspect(created["token"]))
    await asyncio.wait_for(pause.read.wait(), 5)
    status, _ = await api_stack.auth_call("DELETE", f"/v1/tokens/{created['id']}")
    assert status == 204
    pause.release.set()
    assert (await first)["active"] is True  # it was read before the revoke committed
    assert await api_stack.introspect(created["token"]) == {"active": False, "reason": "revoked"}


async def test_a_key_in_steady_use_does_not_expire_as_idle(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uses flushed to the database count, though the cached row was read before them."""
    status, created = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={"name": "idle", "permissions": ["object:read"], "inactivity_timeout_seconds": 60},
    )
    assert status == 201
    start = datetime.now(UTC)
    clock = [start + timedelta(seconds=50)]
    monkeypatch.setattr(auth_app, "utcnow", lambda: clock[0])
    assert (await api_stack.introspect(created["token"]))["active"] is True
    await api_stack.auth.usage.flush()
    clock[0] = start + timedelta(seconds=65)
    assert (await api_stack.introspect(created["token"]))["active"] is True
    clock[0] = start + timedelta(seconds=65 + 61)
    assert await api_stack.introspect(created["token"]) == {"active": False, "reason": "expired"}


async def test_a_permission_asked_for_must_be_held(api_stack: Stack) -> None:
    """With ``permission``, a key that lacks it (in that team) is not active for it."""
    limited = await api_stack.new_token(["object:read"])
    for permission, active in (("object:read", True), ("webhook:delete", False)):
        status, answer = await api_stack.introspect_call(
            {"token": limited, "team_id": api_stack.team_id, "permission": permission},
        )
        assert status == 200
        assert answer["active"] is active
        if not active:
            assert answer == {
                "active": False,
                "reason": "permission_denied",
                "permission": permission,
            }


@pytest.mark.parametrize("token", ["valid", "malformed"])
async def test_an_unknown_permission_asked_for_is_a_422(api_stack: Stack, token: str) -> None:
    """A permission the catalog lacks is the caller's mistake, refused as every other
    route taking permission names refuses one (422 ``unknown_permission`` naming the
    field), not answered ``permission_denied`` as if the key lacked it. It is checked
    before the key, and is no use of it."""
    key = {"valid": api_stack.token, "malformed": "hwk_nope"}[token]
    used_before = api_stack.auth.usage.latest(await _state_of(api_stack, api_stack.token))
    status, answer = await api_stack.introspect_call(
        {"token": key, "team_id": api_stack.team_id, "permission": "webhook:fly"}
    )
    assert status == 422, answer
    assert answer["error"]["code"] == "unknown_permission"
    assert answer["error"]["details"] == [{"field": "permission", "reason": "unknown: webhook:fly"}]
    assert "webhook:fly" in answer["error"]["message"]
    used_after = api_stack.auth.usage.latest(await _state_of(api_stack, api_stack.token))
    assert used_after.last_used_at == used_before.last_used_at


@pytest.mark.parametrize(
    "client_ip",
    ["<script>alert(1)</script>", "10.1.2.3, 1.2.3.4", "not-an-ip", "10.1.2.3:443", "[::1]"],
    ids=["markup", "forwarded_for_list", "name", "with_port", "bracketed"],
)
async def test_a_client_ip_that_is_not_one_address_is_a_422(
    api_stack: Stack, client_ip: str
) -> None:
    """The address is shown to the key's owner as its last use and matched against its
    networks: a forwarded-for list or any other text is the caller's mistake, named, and
    no use of the key is counted (a key limited to some networks was told
    ``ip_not_allowed``, the text stored as its last address)."""
    used_before = api_stack.auth.usage.latest(await _state_of(api_stack, api_stack.token))
    status, answer = await api_stack.introspect_call(
        {"token": api_stack.token, "team_id": api_stack.team_id, "client_ip": client_ip}
    )
    assert status == 422, answer
    assert answer["error"]["code"] == "validation_failed"
    [detail] = answer["error"]["details"]
    assert detail["field"] == "client_ip"
    assert "must be one IP address" in detail["reason"]
    used_after = api_stack.auth.usage.latest(await _state_of(api_stack, api_stack.token))
    assert used_after.last_used_at == used_before.last_used_at


@pytest.mark.parametrize("client_ip", ["203.0.113.7", "2001:db8::7", ""])
async def test_one_address_of_either_family_is_taken(api_stack: Stack, client_ip: str) -> None:
    """An empty one is an address not known (a key limited to networks is refused)."""
    status, answer = await api_stack.introspect_call(
        {"token": api_stack.token, "team_id": api_stack.team_id, "client_ip": client_ip}
    )
    assert status == 200
    assert answer["active"] is True


async def test_a_permission_asked_for_without_a_team_is_a_422(api_stack: Stack) -> None:
    """A key's grant is capped by the user's role in each team: a member's key may hold
    ``webhook:delete`` that no team lets the member use. Asked without a team, the grant
    alone answered yes; now the missing team is named."""
    status, answer = await api_stack.introspect_call(
        {"token": api_stack.token, "permission": "webhook:delete"}
    )
    assert status == 422, answer
    [detail] = answer["error"]["details"]
    assert detail["field"] == "permission"
    assert "needs a team_id" in detail["reason"]


async def _state_of(stack: Stack, key: str) -> Any:
    async with stack.auth.engine.connect() as conn:
        return await store.find_token(conn, hash_token(key, "test-pepper"))


async def test_a_refused_key_in_a_loop_is_audited_once_a_minute(api_stack: Stack) -> None:
    """Repeated uses of a revoked key: one audit record, not one per request."""
    status, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "looping", "permissions": ["token:manage"]}
    )
    assert status == 201
    assert (await api_stack.auth_call("DELETE", f"/v1/tokens/{created['id']}"))[0] == 204
    for _ in range(5):
        assert (await api_stack.introspect(created["token"]))["reason"] == "revoked"
        status, _ = await api_stack.auth_call("GET", "/v1/tokens", token=created["token"])
        assert status == 401
    refusals = await audit_count(api_stack, "token.refused", created["id"])
    assert refusals == 1
