"""Names people type, on keys, permission groups and webhooks: surrounding spaces are
dropped (" ro " and "ro" are one name, and "   " is no name), as the operator's command
line already took them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Stack

READ = ["object:read"]


async def _create(stack: Stack, kind: str, name: str) -> tuple[int, Any]:
    if kind == "key":
        return await stack.auth_call("POST", "/v1/tokens", json={"name": name, "permissions": READ})
    if kind == "group":
        return await stack.auth_call(
            "POST", "/v1/permission-groups", json={"name": name, "permissions": READ}
        )
    async with stack.session.post(
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks",
        headers=stack.headers(),
        json={"name": name, "url": "http://127.0.0.1:9/hook", "topics": ["object.created"]},
    ) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("kind", ["key", "group", "webhook"])
async def test_surrounding_spaces_are_dropped_and_blank_is_no_name(
    api_stack: Stack, kind: str
) -> None:
    status, made = await _create(api_stack, kind, "  readers\t")
    assert status == 201, made
    assert made["name"] == "readers"
    status, answer = await _create(api_stack, kind, "   ")
    assert status == 422, answer
    assert [d["field"] for d in answer["error"]["details"]] == ["name"]


@pytest.mark.parametrize("kind", ["key", "group"])
async def test_a_name_with_spaces_around_is_the_same_name(api_stack: Stack, kind: str) -> None:
    assert (await _create(api_stack, kind, "ro"))[0] == 201
    status, answer = await _create(api_stack, kind, " ro ")
    assert (status, answer["error"]["code"]) == (409, "duplicate_name")
