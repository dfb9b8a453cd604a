"""Every kind of bad input gets a clear JSON error and stores or publishes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select
from yarl import URL

from services.auth.tokens import generate_token
from services.shared import EVENT_TYPES, new_id, tables
from tests.conftest import Stack, audit_count, corrupt, published_events
from tests.integration._inputs import EMPTY_BODIES, NOT_JSON


async def _post(
    stack: Stack, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with stack.session.post(
        f"{stack.api_url}/v1/teams/{stack.team_id}{path}",
        headers=stack.headers() if headers is None else headers,
        **kwargs,
    ) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def _webhook_count(stack: Stack) -> int:
    async with stack.session.get(
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks", headers=stack.headers()
    ) as response:
        assert response.status == 200
        return len((await response.json())["data"])


VALID = {"name": "n", "url": "https://example.com/hook", "topics": ["object.created"]}


@pytest.mark.parametrize(
    ("headers", "code", "details"),
    [
        ({}, "missing_token", None),
        ({"authorization": "Bearer "}, "missing_token", None),
        ({"authorization": "Key="}, "missing_token", None),
        ({"authorization": "Bearerhwk_x"}, "invalid_token", {"reason": "malformed"}),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "invalid_token", {"reason": "malformed"}),
        ({"authorization": "Bearer hwk_short"}, "invalid_token", {"reason": "malformed"}),
        (
            {"authorization": "Bearer " + corrupt(generate_token())},
            "invalid_token",
            {"reason": "malformed"},
        ),
        ({"authorization": "Bearer " + generate_token()}, "invalid_token", {"reason": "unknown"}),
        (
            {"authorization": "Bearer sk_live_somethingelse"},
            "invalid_token",
            {"reason": "malformed"},
        ),
        # Longer than the auth service reads: not "auth is unavailable, try again".
        ({"authorization": "Bearer hwk_" + "a" * 300}, "invalid_token", {"reason": "malformed"}),
    ],
    ids=[
        "none",
        "bearer_alone",
        "key_alone",
        "no_space",
        "basic",
        "short",
        "bad_checksum",
        "unknown",
        "wrong_prefix",
        "too_long",
    ],
)
async def test_missing_or_invalid_tokens_get_401(
    api_stack: Stack, headers: dict[str, str], code: str, details: dict[str, str] | None
) -> None:
    """No token, another scheme, truncated, bad checksum, unknown, wrong prefix: all 401,
    and the reason tells a malformed key (caught without a lookup) from an unknown one."""
    status, body = await _post(api_stack, "/webhooks", headers=headers, json=VALID)
    assert status == 401
    assert body["error"]["code"] == code
    assert body["error"]["details"] == details
    assert body["error"]["message"]
    assert await _webhook_count(api_stack) == 0


async def test_key_scheme_is_accepted(api_stack: Stack) -> None:
    """`Authorization: Key=<token>` works like Bearer."""
    status, _ = await _post(
        api_stack, "/webhooks", headers={"authorization": f"Key={api_stack.token}"}, json=VALID
    )
    assert status == 201


async def test_query_string_key_is_refused(api_stack: Stack) -> None:
    """?auth-key= is refused with a clear error unless the operator enables it."""
    status, body = await _post(
        api_stack, f"/webhooks?auth-key={api_stack.token}", headers={}, json=VALID
    )
    assert status == 400
    assert body["error"]["code"] == "query_key_refused"
    assert await _webhook_count(api_stack) == 0


async def test_token_without_permission_gets_403(api_stack: Stack) -> None:
    """A valid token lacking webhook:create is forbidden, and the permission is named."""
    reader = await api_stack.new_token(["webhook:read"])
    status, body = await _post(
        api_stack, "/webhooks", headers=api_stack.headers(reader), json=VALID
    )
    assert status == 403
    assert body["error"]["details"] == {"permission": "webhook:create"}
    assert await _webhook_count(api_stack) == 0


async def test_other_teams_are_not_revealed(api_stack: Stack) -> None:
    """A team the token's user does not belong to answers 404, like a missing one."""
    async with api_stack.session.post(
        f"{api_stack.api_url}/v1/teams/team_someone_else/webhooks",
        headers=api_stack.headers(),
        json=VALID,
    ) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**VALID, "topics": ["object.exploded"]}, "topics.0"),
        ({**VALID, "topics": []}, "topics"),
        ({**VALID, "url": "ftp://example.com/hook"}, "url"),
        ({**VALID, "url": "javascript:alert(1)"}, "url"),
        ({**VALID, "url": "https://user:pw@example.com/hook"}, "url"),
        ({**VALID, "url": "not a url"}, "url"),
        ({**VALID, "name": ""}, "name"),
        ({**VALID, "name": 42}, "name"),
        ({**VALID, "active": "yes"}, "active"),
        ({**VALID, "surprise": 1}, "surprise"),
        ({k: v for k, v in VALID.items() if k != "url"}, "url"),
        ({**VALID, "headers": {"bad header": "x"}}, "headers"),
        ({**VALID, "headers": {"X-Foo\n": "x"}}, "headers"),
        ({**VALID, "headers": {"Transfer-Encoding": "chunked"}}, "headers"),
        ({**VALID, "headers": {"X-Ok": "a\r\nInjected: 1"}}, "headers"),
        ({**VALID, "headers": {"X-Ok": "a\u0000b"}}, "headers"),
        ({**VALID, "headers": {"X-Ok": "a\u0001b"}}, "headers"),
        ({**VALID, "headers": {"X-Ok": "a\u007fb"}}, "headers"),
        ({**VALID, "headers": {"Content-Encoding": "gzip"}}, "headers"),
        ({**VALID, "headers": {"Webhook-Foo": "x"}}, "headers"),
        ({**VALID, "headers": {"User-Agent": "me"}}, "headers"),
        ({**VALID, "headers": {"X-A": "1", "x-a": "2"}}, "headers"),
        # A view's stand-in for a stored credential, copied into a new webhook.
        ({**VALID, "headers": {"X-Token": "[redacted]"}}, "headers"),
        ({**VALID, "url": "http://example.com:99999/hook"}, "url"),
        ({**VALID, "url": "http://example.com:abc/hook"}, "url"),
        ({**VALID, "url": "http://example.com/ho\u0000ok"}, "url"),
        ({**VALID, "url": "http://example.com/ho\r\nok"}, "url"),
        ({**VALID, "url": "http://exa mple.com/hook"}, "url"),
        ({**VALID, "url": "http://" + "a" * 64 + ".com/hook"}, "url"),
        # Read by this check's parser, refused by the one requests are sent with.
        ({**VALID, "url": "https://example.com\\.evil.com/hook"}, "url"),
        ({**VALID, "name": "a\u0000b"}, "name"),
        ({**VALID, "description": "\u0000"}, "description"),
        ([VALID], "body"),
        # One row per limit of WebhookCreate.
        ({**VALID, "name": "n" * 201}, "name"),
        ({**VALID, "description": "d" * 2001}, "description"),
        ({**VALID, "url": "https://example.com/" + "p" * 2048}, "url"),
        ({**VALID, "url": "http:///hook"}, "url"),
        ({**VALID, "url": 5}, "url"),
        ({**VALID, "topics": [*EVENT_TYPES, "object.created"]}, "topics"),
        ({**VALID, "topics": "object.created"}, "topics"),
        ({**VALID, "object_types": [f"t{n}" for n in range(101)]}, "object_types"),
        ({**VALID, "object_types": "contact"}, "object_types"),
        # Types no event can have, and an empty list (which read as "every type").
        ({**VALID, "object_types": ["Contact!"]}, "object_types.0"),
        ({**VALID, "object_types": ["contact", ""]}, "object_types.1"),
        ({**VALID, "object_types": []}, "object_types"),
        ({**VALID, "headers": {f"X-H{n}": "v" for n in range(21)}}, "headers"),
        ({**VALID, "headers": {"X-Long": "v" * 1025}}, "headers"),
        ({**VALID, "headers": {"X-Num": 5}}, "headers.X-Num"),
        ({**VALID, "headers": ["X-A"]}, "headers"),
        ({**VALID, "rate_limit": 0}, "rate_limit"),
        ({**VALID, "rate_limit": -1}, "rate_limit"),
        ({**VALID, "rate_limit": 0.05}, "rate_limit"),
        ({**VALID, "rate_limit": 10_001}, "rate_limit"),
        ({**VALID, "rate_limit": "5"}, "rate_limit"),
        ({**VALID, "rate_limit": True}, "rate_limit"),
    ],
)
async def test_invalid_webhooks_get_422_naming_the_field(
    api_stack: Stack, body: Any, field: str
) -> None:
    """Unknown topics, bad URLs, wrong types and unknown fields are named; nothing stored."""
    status, answer = await _post(api_stack, "/webhooks", json=body)
    assert status == 422
    assert answer["error"]["code"] == "validation_failed"
    assert field in [problem["field"] for problem in answer["error"]["details"]]
    assert await _webhook_count(api_stack) == 0


@pytest.mark.parametrize("path", ["/webhooks", "/objects/contact"])
@pytest.mark.parametrize("raw", [*EMPTY_BODIES, *NOT_JSON])
async def test_malformed_json_gets_422(api_stack: Stack, path: str, raw: bytes) -> None:
    """Bodies that are not JSON at all (or empty) are refused with a clear message, on the
    typed webhook route and the free-form object route alike; nothing is stored."""
    status, answer = await _post(
        api_stack,
        path,
        data=raw,
        headers={**api_stack.headers(), "content-type": "application/json"},
    )
    assert status == 422
    assert answer["error"]["details"][0]["field"] == "body"
    assert "JSON" in answer["error"]["message"]
    assert await _webhook_count(api_stack) == 0
    assert await _object_rows(api_stack) == 0


async def test_oversized_body_gets_413(api_stack: Stack) -> None:
    """A body over HOOKWIRE_MAX_BODY_BYTES is refused before it is parsed."""
    limit = api_stack.settings.max_body_bytes
    status, answer = await _post(api_stack, "/objects/contact", json={"blob": "x" * (limit + 1)})
    assert status == 413
    assert answer["error"]["details"] == {"max_bytes": limit}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/objects/Contact", {"a": 1}, "object_type"),
        ("/objects/9lives", {"a": 1}, "object_type"),
        ("/objects/contact%0A", {"a": 1}, "object_type"),
        ("/objects/contact", [1, 2], "body"),
        ("/objects/contact", "text", "body"),
    ],
)
async def test_invalid_objects_get_422_and_publish_nothing(
    api_stack: Stack, path: str, body: Any, field: str
) -> None:
    """A bad object type or a non-object body is refused and nothing is stored."""
    status, answer = await _post(api_stack, path, json=body)
    assert status == 422
    assert answer["error"]["details"][0]["field"] == field
    # The message sends the caller to where the field was given.
    where = "path" if field == "object_type" else "request body"
    assert answer["error"]["message"] == f"invalid {where}: {field}"
    async with api_stack.api.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(tables.objects))).scalar() == 0


async def test_unknown_routes_use_the_error_shape(api_stack: Stack) -> None:
    """Even a 404 for an unknown path has the one JSON error shape."""
    async with api_stack.session.get(f"{api_stack.api_url}/v1/nothing-here") as response:
        assert response.status == 404
        assert set((await response.json())["error"]) == {"code", "message", "details"}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"description": None}, "description"),
        ({"name": None}, "name"),
        ({"name": "a\u0000b"}, "name"),
        ({"topics": ["object.exploded"]}, "topics.0"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"rate_limit": "fast"}, "rate_limit"),
    ],
)
async def test_invalid_webhook_updates_get_422_and_change_nothing(
    api_stack: Stack, patch: dict[str, Any], field: str
) -> None:
    status, created = await _post(api_stack, "/webhooks", json=VALID)
    assert status == 201
    before = await _webhook(api_stack, created["id"])
    url = f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/webhooks/{created['id']}"
    async with api_stack.session.patch(url, headers=api_stack.headers(), json=patch) as response:
        assert response.status == 422
        answer = await response.json()
    assert field in [problem["field"] for problem in answer["error"]["details"]]
    assert await _webhook(api_stack, created["id"]) == before
    assert await audit_count(api_stack, "webhook.updated", created["id"]) == 0


async def _webhook(stack: Stack, webhook_id: str) -> tuple[dict[str, Any], str, list[Any]]:
    """Everything a change could touch: the webhook as shown, its ETag and its stored
    secrets (never shown after the create)."""
    async with stack.session.get(
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook_id}",
        headers=stack.headers(),
    ) as response:
        assert response.status == 200
        shown, etag = await response.json(), response.headers["ETag"]
    async with stack.api.engine.connect() as conn:
        secrets = (
            await conn.execute(
                select(tables.webhooks.c.secrets).where(tables.webhooks.c.id == webhook_id)
            )
        ).scalar_one()
    return shown, etag, list(secrets)


# The bodies no JSON reader takes (no empty one: where the body is optional it means
# "every default"), and one that is a valid rotation but for its trailing comma.
WEBHOOK_NOT_JSON = [*NOT_JSON, b'{"grace_seconds": 0,}']


@pytest.mark.parametrize(
    ("method", "route", "raw", "action"),
    [
        *[("PATCH", "", raw, "webhook.updated") for raw in [*EMPTY_BODIES, *WEBHOOK_NOT_JSON]],
        # Optional bodies: a broken one is refused, not read as "no body, use defaults"
        # (a rotation with the default grace, a test event with the default data).
        *[("POST", "/rotate-secret", raw, "webhook.secret_rotated") for raw in WEBHOOK_NOT_JSON],
        *[("POST", "/test", raw, "webhook.test_sent") for raw in WEBHOOK_NOT_JSON],
    ],
)
async def test_webhook_changes_that_are_not_json_get_422_and_change_nothing(
    api_stack: Stack, method: str, route: str, raw: bytes, action: str
) -> None:
    status, created = await _post(api_stack, "/webhooks", json=VALID)
    assert status == 201
    before = await _webhook(api_stack, created["id"])
    async with api_stack.session.request(
        method,
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/webhooks/{created['id']}{route}",
        headers={**api_stack.headers(), "content-type": "application/json"},
        data=raw,
    ) as response:
        assert response.status == 422
        answer = await response.json()
    assert answer["error"]["code"] == "validation_failed"
    assert [problem["field"] for problem in answer["error"]["details"]] == ["body"]
    assert "JSON" in answer["error"]["message"]
    assert await _webhook(api_stack, created["id"]) == before
    assert await audit_count(api_stack, action, created["id"]) == 0
    assert published_events(api_stack) == {}


async def test_a_replay_of_a_missing_webhook_is_not_found(api_stack: Stack) -> None:
    """404 in the one error shape, as for any missing webhook; nothing is re-sent or
    audited."""
    missing = new_id("wh")
    status, answer = await _post(
        api_stack, f"/webhooks/{missing}/replay", json={"since": "2026-01-01T00:00:00Z"}
    )
    assert status == 404, answer
    assert answer["error"]["code"] == "not_found"
    assert answer["error"]["details"] is None
    assert answer["error"]["message"] == f"webhook {missing} not found"
    assert await audit_count(api_stack, "webhook.replayed", missing) == 0
    assert published_events(api_stack) == {}


def _nested(depth: int) -> bytes:
    """An object whose value nests ``depth`` levels in all (the object itself is one)."""
    return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


async def _object_rows(stack: Stack) -> int:
    async with stack.api.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(tables.objects))).scalar())


@pytest.mark.parametrize("depth", [101, 253, 300, 950])
async def test_objects_nested_too_deep_get_422_and_store_nothing(
    api_stack: Stack, depth: int
) -> None:
    """Deeper than 100 levels: refused up front, not stored and then unreadable (500)."""
    headers = {**api_stack.headers(), "content-type": "application/json"}
    status, answer = await _post(
        api_stack, "/objects/contact", data=_nested(depth), headers=headers
    )
    assert status == 422, answer
    assert answer["error"]["details"][0]["field"] == "body"
    assert "nest" in answer["error"]["details"][0]["reason"]
    assert await _object_rows(api_stack) == 0
    status, created = await _post(api_stack, "/objects/contact", json={"a": 1})
    assert status == 201
    async with api_stack.session.patch(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/objects/contact/{created['id']}",
        headers=headers,
        data=_nested(depth),
    ) as response:
        assert response.status == 422
    async with api_stack.session.get(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/objects/contact/{created['id']}",
        headers=headers,
    ) as response:
        assert (response.status, (await response.json())["version"]) == (200, 1)


async def test_an_object_nested_100_levels_is_kept_and_read_back(api_stack: Stack) -> None:
    """The limit itself is fine all the way: stored, listed and shown."""
    headers = {**api_stack.headers(), "content-type": "application/json"}
    status, created = await _post(api_stack, "/objects/contact", data=_nested(100), headers=headers)
    assert status == 201, created
    base = f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/objects/contact"
    for url in (base, f"{base}/{created['id']}"):
        async with api_stack.session.get(url, headers=headers) as response:
            assert response.status == 200


async def test_a_team_id_too_long_to_be_one_is_not_found(api_stack: Stack) -> None:
    """Longer than any team id the auth service reads: 404 like any missing team, not a
    503 asking the client to try again; the key is still checked first."""
    url = f"{api_stack.api_url}/v1/teams/{'t' * 129}/webhooks"
    async with api_stack.session.get(url, headers=api_stack.headers()) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    unknown = {"authorization": f"Bearer {generate_token()}"}
    async with api_stack.session.get(url, headers=unknown) as response:
        assert response.status == 401


async def test_a_repeated_parameter_hides_neither_a_missing_route_nor_a_credential(
    api_stack: Stack,
) -> None:
    """Checked where a route reads its query: a route that is not there is a 404 and a
    request without a key a 401, whatever the query."""
    base = f"{api_stack.api_url}/v1/teams/{api_stack.team_id}"
    async with api_stack.session.get(
        f"{base}/nowhere?a=1&a=2", headers=api_stack.headers()
    ) as response:
        assert response.status == 404
    async with api_stack.session.get(f"{base}/webhooks?limit=1&limit=2") as response:
        assert response.status == 401
    # A yes/no flag that decides which permission a route needs: the key is still first.
    for path in ("/webhooks/wh_x?force=1", "/objects/contact/obj_x?force=yes"):
        async with api_stack.session.delete(f"{base}{path}") as response:
            assert response.status == 401, path
        reader = await api_stack.new_token(["object:read"])
        async with api_stack.session.delete(
            f"{base}{path}", headers=api_stack.headers(reader)
        ) as response:
            assert response.status == 403, path


@pytest.mark.parametrize(
    ("method", "path", "parameter"),
    [
        ("GET", "/objects/contact?limit=%C2%B2", "limit"),
        ("GET", "/objects/contact?trashed=1", "trashed"),
        ("DELETE", "/objects/contact/obj_x?force=1", "force"),
        ("DELETE", "/webhooks/wh_x?force=True", "force"),
        # Misspelt, or another parameter: ignored, the delete went to the trash.
        ("DELETE", "/webhooks/wh_x?Force=true", "Force"),
        ("DELETE", "/objects/contact/obj_x?forced=true", "forced"),
        # Given twice: which one a route took would be a guess.
        ("GET", "/deliveries?state=failed&state=retrying", "state"),
        ("GET", "/deliveries?webhook_id=", "webhook_id"),
        ("GET", "/webhooks?limit=10&limit=500", "limit"),
        ("DELETE", "/webhooks/wh_x?force=false&force=true", "force"),
        # A cursor that is not an id of the list: it would answer an empty last page
        # (sorting after every id) or the first page again (before them).
        ("GET", "/webhooks?cursor=zzz", "cursor"),
        ("GET", "/webhooks?cursor=abc", "cursor"),
        ("GET", "/objects/contact?cursor=obj_zzz", "cursor"),
        ("GET", "/objects/contact?cursor=wh_0000000000000000000000000000000a", "cursor"),
        # A window that ends where, or before, it starts holds nothing.
        ("GET", "/deliveries?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z", "until"),
        ("GET", "/deliveries?since=2026-02-01T00:00:00Z&until=2026-02-01T00:00:00Z", "until"),
    ],
)
async def test_bad_query_parameters_get_422_naming_them(
    api_stack: Stack, method: str, path: str, parameter: str
) -> None:
    """Not a quiet default: ``?force=1`` must not move to the trash what was meant to go."""
    async with api_stack.session.request(
        method,
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}{path}",
        headers=api_stack.headers(),
    ) as response:
        assert response.status == 422
        answer = await response.json()
    assert answer["error"]["details"][0]["field"] == parameter


@pytest.mark.parametrize(
    "raw",
    [
        b'{"n": 18446744073709551616}',
        b'{"n": -9223372036854775809}',
        b'{"deep": {"n": [1, 123456789012345678901234567890]}}',
    ],
)
async def test_integers_past_64_bits_get_422_not_a_changed_number(
    api_stack: Stack, raw: bytes
) -> None:
    """Read as floats, they would be stored as numbers other than those sent."""
    headers = {**api_stack.headers(), "content-type": "application/json"}
    status, answer = await _post(api_stack, "/objects/contact", data=raw, headers=headers)
    assert status == 422, answer
    assert answer["error"]["details"][0]["field"] == "body"
    assert "64 bits" in answer["error"]["details"][0]["reason"]
    assert await _object_rows(api_stack) == 0


async def test_long_digit_runs_that_fit_are_kept_exactly(api_stack: Stack) -> None:
    """The largest integers that fit, and long digit strings, are stored as sent."""
    body = {"big": 2**64 - 1, "small": -(2**63), "id": "1234567890123456789012345"}
    status, created = await _post(api_stack, "/objects/contact", json=body)
    assert status == 201
    assert created["data"] == body


async def test_a_body_that_cannot_be_read_as_sent_is_a_400(api_stack: Stack) -> None:
    """Labelled gzip but not gzip: the client's fault, answered in the error shape."""
    headers = {
        **api_stack.headers(),
        "content-type": "application/json",
        "content-encoding": "gzip",
    }
    status, answer = await _post(api_stack, "/objects/contact", data=b'{"a": 1}', headers=headers)
    assert (status, answer["error"]["code"]) == (400, "bad_request")
    # In the parser's words, without aiohttp's status and line break before them.
    message = "the request body cannot be read: Can not decode content-encoding: gzip"
    assert answer["error"]["message"] == message
    assert await _object_rows(api_stack) == 0


@pytest.mark.parametrize(
    "target", ["/objects/contact/obj_a%00b", "/objects/contact?cursor=%00", "/webhooks/wh%00"]
)
async def test_nul_in_the_path_or_query_is_a_400(api_stack: Stack, target: str) -> None:
    """PostgreSQL text cannot hold NUL: refused before any query, on every database."""
    url = URL(f"{api_stack.api_url}/v1/teams/{api_stack.team_id}{target}", encoded=True)
    async with api_stack.session.get(url, headers=api_stack.headers()) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_request"


async def test_a_time_utc_cannot_express_is_a_422_on_time_filters(api_stack: Stack) -> None:
    """Year 9999 at -05:00 is past the calendar once in UTC: refused, not a 500."""
    late = "9999-12-31T23:00:00-05:00"
    async with api_stack.session.get(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/deliveries",
        headers=api_stack.headers(),
        params={"since": late},
    ) as response:
        assert response.status == 422
        assert (await response.json())["error"]["details"][0]["field"] == "since"
    status, answer = await api_stack.auth_call("GET", f"/v1/audit-log?until={late}")
    assert status == 422
    assert answer["error"]["details"][0]["field"] == "until"


async def _raw(
    url: str, path: str, authorization: bytes, method: bytes = b"GET"
) -> tuple[int, dict[str, Any]]:
    """A request whose Authorization header carries bytes no client library would send."""
    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(
            method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: 0\r\n"
            b"Authorization: " + authorization + b"\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)


@pytest.mark.parametrize(
    "authorization", [b"Bearer hwk_\xff\xfe", b"Key=eyJ\xc3\x28", b"Bearer \xe2\x82"]
)
async def test_a_token_that_is_not_text_is_malformed_not_a_500(
    api_stack: Stack, authorization: bytes
) -> None:
    status, body = await _raw(
        api_stack.api_url, f"/v1/teams/{api_stack.team_id}/webhooks", authorization
    )
    assert status == 401, body
    assert body["error"]["details"] == {"reason": "malformed"}
    status, body = await _raw(api_stack.auth_url, "/v1/tokens", authorization)
    assert status == 401, body
    status, body = await _raw(api_stack.auth_url, "/v1/introspect", authorization, b"POST")
    assert status == 401, body


async def test_a_client_gone_mid_body_is_not_a_server_error(api_stack: Stack) -> None:
    """A client that times out while uploading: nothing of ours failed. Counted as 499
    (as proxies do), not as a 500 that would page someone."""
    target = URL(api_stack.api_url)
    _, writer = await asyncio.open_connection(target.host, target.port)
    token = api_stack.headers()["authorization"]
    writer.write(
        f"POST /v1/teams/{api_stack.team_id}/objects/contact HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: {token}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n".encode()
        + b'{"n": "'
        + b"x" * 1000
    )
    await writer.drain()
    writer.close()
    registry = api_stack.api.metrics.registry
    route = {"route": "/v1/teams/{team}/objects/{object_type}"}

    def counted(status: str) -> float:
        value = registry.get_sample_value(
            "hookwire_api_http_requests_total", route | {"status": status}
        )
        return value or 0.0

    async with asyncio.timeout(10):
        while not counted("499"):  # noqa: ASYNC110 - a counter, not an event
            await asyncio.sleep(0.05)
    assert counted("500") == 0


async def test_a_method_a_route_does_not_take_is_told_which_it_does(api_stack: Stack) -> None:
    async with api_stack.session.put(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/webhooks", headers=api_stack.headers()
    ) as response:
        assert response.status == 405
        assert set(response.headers["Allow"].split(",")) >= {"GET", "POST"}


async def test_a_restore_refuses_fields_it_does_not_take(api_stack: Stack) -> None:
    """A restore takes no field: a body with one is a 422 naming it, and the webhook or
    object stays in the trash; no body, or {}, restores."""
    status, webhook = await _post(api_stack, "/webhooks", json=VALID)
    assert status == 201
    object_id = await api_stack.create_object()
    trashed = [f"/webhooks/{webhook['id']}", f"/objects/contact/{object_id}"]
    for path in trashed:
        async with api_stack.session.delete(
            f"{api_stack.api_url}/v1/teams/{api_stack.team_id}{path}", headers=api_stack.headers()
        ) as response:
            assert response.status in (200, 204)
    for path, body in zip(trashed, ({}, None), strict=True):
        for bad, field in (({"x": 1}, "x"), ([1], "body")):
            status, answer = await _post(api_stack, f"{path}/restore", json=bad)
            assert status == 422, (path, bad, answer)
            assert [d["field"] for d in answer["error"]["details"]] == [field], answer
        async with api_stack.session.get(
            f"{api_stack.api_url}/v1/teams/{api_stack.team_id}{path}", headers=api_stack.headers()
        ) as response:
            assert response.status == 404, "still in the trash"
        status, _ = await _post(api_stack, f"{path}/restore", json=body)
        assert status == 200, path
