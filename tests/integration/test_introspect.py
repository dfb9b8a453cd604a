"""The auth service's introspection endpoint, called over real HTTP."""

from __future__ import annotations

from typing import Any

from tests.conftest import Stack, corrupt


async def _introspect(
    stack: Stack, payload: Any, credential: str | None = "test-service-credential"
) -> tuple[int, dict[str, Any]]:
    headers = {"authorization": f"Bearer {credential}"} if credential else {}
    async with stack.session.post(
        f"{stack.auth_url}/v1/introspect", json=payload, headers=headers
    ) as response:
        return response.status, await response.json()


async def test_valid_token_is_active_with_team_permissions(api_stack: Stack) -> None:
    """RFC 7662 shape with the effective permissions in that team."""
    status, answer = await _introspect(
        api_stack, {"token": api_stack.token, "team_id": api_stack.team_id}
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
        ({"token": api_stack.token, "team_id": "team_unknown"}, "not_member"),
    ]
    for payload, reason in cases:
        status, answer = await _introspect(api_stack, payload)
        assert status == 200
        assert answer == {"active": False, "reason": reason}


async def test_service_credential_is_required(api_stack: Stack) -> None:
    """Without the right service credential nobody can probe tokens."""
    for credential in (None, "wrong"):
        status, answer = await _introspect(api_stack, {"token": api_stack.token}, credential)
        assert status == 401
        assert answer["error"]["code"] == "invalid_service_credential"


async def test_bad_introspection_bodies_get_422(api_stack: Stack) -> None:
    """Unknown fields and wrong types are refused."""
    for payload in ({"token": api_stack.token, "extra": 1}, {"token": 5}, {}):
        status, answer = await _introspect(api_stack, payload)
        assert status == 422
        assert answer["error"]["code"] == "validation_failed"
