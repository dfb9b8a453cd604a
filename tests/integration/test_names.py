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


@pytest.mark.parametrize("kind", ["key", "group", "webhook"])
@pytest.mark.parametrize(
    "name",
    [
        "innocent\ntok_x  revoked",
        "a\rb",
        "bell\x07",
        "esc\x1b[2J",
        "evil\u202etxt.exe",
        "x\u2066y",
        "line\u2028break",
    ],
    ids=[
        "newline",
        "carriage_return",
        "bell",
        "escape",
        "right_to_left_override",
        "isolate",
        "line_separator",
    ],
)
async def test_a_name_that_is_not_one_plain_line_is_refused(
    api_stack: Stack, kind: str, name: str
) -> None:
    """A newline in a key's name printed a line of its own in `hookwire admin
    list-tokens`, one that could pass for another key's; a direction override shows
    other text than was stored. 422 naming the character, nothing made."""
    status, answer = await _create(api_stack, kind, name)
    assert status == 422, answer
    [detail] = answer["error"]["details"]
    assert detail["field"] == "name"
    assert "must not contain control characters" in detail["reason"]
    keys = await api_stack.auth_list()
    groups = await api_stack.auth_list("/v1/permission-groups")
    assert all(item["name"] != name for item in [*keys, *groups])


@pytest.mark.parametrize("kind", ["key", "group", "webhook"])
async def test_a_name_in_any_script_is_taken(api_stack: Stack, kind: str) -> None:
    status, made = await _create(api_stack, kind, "Zoë's clé 東京 🚀 שלום")
    assert status == 201, made
    assert made["name"] == "Zoë's clé 東京 🚀 שלום"


@pytest.mark.parametrize("kind", ["key", "group", "webhook"])
async def test_a_length_refused_is_counted_in_characters(api_stack: Stack, kind: str) -> None:
    """The reason said "Value should have at most 200 items after validation"."""
    status, answer = await _create(api_stack, kind, "n" * 201)
    assert status == 422, answer
    assert answer["error"]["details"] == [
        {"field": "name", "reason": "String should have at most 200 characters"}
    ]
