"""Creating and editing keys: every value past its limit or of the wrong type is refused,
naming its field, and no key is stored or changed."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Stack, audit_count
from tests.integration._inputs import EMPTY_BODIES, NOT_JSON

READ = ["object:read"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "", "permissions": READ}, "name"),
        ({"name": "n" * 201, "permissions": READ}, "name"),
        ({"name": "x", "description": "d" * 2001, "permissions": READ}, "description"),
        ({"name": "x", "description": 5, "permissions": READ}, "description"),
        ({"name": "x", "permissions": READ * 101}, "permissions"),
        ({"name": "x", "permissions": [5]}, "permissions.0"),
        ({"name": "x", "permission_group_id": "g" * 65}, "permission_group_id"),
        ({"name": "x", "permissions": READ, "allowed_cidrs": []}, "allowed_cidrs"),
        ({"name": "a\u0000b", "permissions": READ}, "name"),
        ({"name": "x", "description": "\u0000", "permissions": READ}, "description"),
        (
            {"name": "x", "permissions": READ, "allowed_cidrs": ["10.0.0.1/32"] * 51},
            "allowed_cidrs",
        ),
        ({"name": "x", "permissions": READ, "allowed_cidrs": ["nowhere"]}, "allowed_cidrs"),
        ({"name": "x", "permissions": READ, "allowed_cidrs": [5]}, "allowed_cidrs.0"),
        ({"name": "x", "permissions": READ, "allowed_cidrs": "10.0.0.0/8"}, "allowed_cidrs"),
        (
            {"name": "x", "permissions": READ, "inactivity_timeout_seconds": 365 * 24 * 3600 + 1},
            "inactivity_timeout_seconds",
        ),
        (
            {"name": "x", "permissions": READ, "inactivity_timeout_seconds": "3600"},
            "inactivity_timeout_seconds",
        ),
        ({"name": "x", "permissions": READ, "expires_at": "next week"}, "expires_at"),
        ({"name": "x", "permissions": READ, "expires_at": 4102444800}, "expires_at"),
        ({"name": "x", "permissions": READ, "expires_at": "4102444800"}, "expires_at"),
        ({"name": "x"}, "permissions"),
        ([{"name": "x", "permissions": READ}], "body"),
        ({}, "name"),
    ],
)
async def test_bad_token_creates_are_refused_and_store_nothing(
    api_stack: Stack, body: Any, field: str
) -> None:
    before = await api_stack.auth_list()
    status, answer = await api_stack.auth_call("POST", "/v1/tokens", json=body)
    assert status == 422, answer
    assert answer["error"]["code"] == "validation_failed"
    assert field in [problem["field"] for problem in answer["error"]["details"]]
    assert await api_stack.auth_list() == before


@pytest.mark.parametrize("raw", [*EMPTY_BODIES, *NOT_JSON])
async def test_token_bodies_that_are_not_json_are_refused(api_stack: Stack, raw: bytes) -> None:
    before = await api_stack.auth_list()
    status, answer = await api_stack.auth_call("POST", "/v1/tokens", data=raw)
    assert status == 422
    assert [problem["field"] for problem in answer["error"]["details"]] == ["body"]
    assert "JSON" in answer["error"]["message"]
    assert await api_stack.auth_list() == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body"),
        ({"name": ""}, "name"),
        ({"name": "n" * 201}, "name"),
        ({"description": "d" * 2001}, "description"),
        ({"active": "false"}, "active"),
        ({"active": 0}, "active"),
        ({"permissions": ["webhook:delete"]}, "permissions"),
        ({"revoked_at": None}, "revoked_at"),
    ],
)
async def test_bad_token_edits_are_refused_and_change_nothing(
    api_stack: Stack, body: dict[str, Any], field: str
) -> None:
    """Permissions and the revocation cannot be edited at all; nothing else past its
    limits; the key is unchanged and no change is audited."""
    created = await api_stack.create_key("edited", READ)
    path = f"/v1/tokens/{created['id']}"
    status, answer = await api_stack.auth_call("PATCH", path, json=body)
    assert status == 422, answer
    assert field in [problem["field"] for problem in answer["error"]["details"]]
    status, shown = await api_stack.auth_call("GET", path)
    assert shown == created
    for action in ("token.updated", "token.deactivated", "token.reactivated"):
        assert await audit_count(api_stack, action, created["id"]) == 0
