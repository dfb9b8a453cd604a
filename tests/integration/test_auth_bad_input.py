"""The auth service's own routes: bad input on each gets its clear error, and no key or
group is made, changed or audited."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict

from tests.conftest import Stack, audit_count
from tests.integration._inputs import EMPTY_BODIES, NOT_JSON

READ = ["object:read"]
LISTS = ["/v1/tokens", "/v1/permission-groups"]


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize(
    ("query", "parameter", "reason"),
    [
        # A filter the list does not have: answering every row would read as applied.
        ("active=false", "active", "Extra inputs are not permitted"),
        ("limit=1", "limit", "Extra inputs are not permitted"),
        ("name=a&name=b", "name", "given more than once"),
    ],
    ids=["unknown_filter", "unknown_paging", "repeated"],
)
async def test_auth_lists_refuse_query_parameters_they_do_not_take(
    api_stack: Stack, path: str, query: str, parameter: str, reason: str
) -> None:
    """As the api's lists do: 422 naming the parameter, not the whole list."""
    status, answer = await api_stack.auth_call("GET", f"{path}?{query}")
    assert status == 422, answer
    assert answer["error"]["code"] == "validation_failed"
    assert answer["error"]["message"] == f"invalid query parameters: {parameter}"
    assert answer["error"]["details"] == [{"field": parameter, "reason": reason}]


@pytest.mark.parametrize("path", LISTS)
async def test_an_auth_list_checks_the_key_before_its_query(api_stack: Stack, path: str) -> None:
    """A bad query hides no missing key: the 401 comes first, as on the api."""
    async with api_stack.session.get(f"{api_stack.auth_url}{path}?a=1&a=2") as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "missing_token"


@pytest.mark.parametrize("with_header", [False, True], ids=["query_only", "header_too"])
async def test_a_query_string_key_is_refused_by_auth(api_stack: Stack, with_header: bool) -> None:
    """?auth-key= is refused on the auth service's routes too (HOOKWIRE_ALLOW_QUERY_KEYS
    is off), even beside a good header: the key is in a URL that gets logged either way.
    No key is made."""
    before = await api_stack.auth_list()
    headers = api_stack.headers() if with_header else {}
    url = f"{api_stack.auth_url}/v1/tokens?auth-key={api_stack.token}"
    async with api_stack.session.post(
        url, headers=headers, json={"name": "via-query", "permissions": READ}
    ) as response:
        assert response.status == 400
        answer = await response.json()
    assert answer["error"]["code"] == "query_key_refused"
    assert api_stack.token not in str(answer)
    async with api_stack.session.get(url, headers=headers) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "query_key_refused"
    assert await api_stack.auth_list() == before


@pytest.mark.parametrize("raw", [*EMPTY_BODIES, *NOT_JSON])
async def test_a_key_edit_that_is_not_json_changes_nothing(api_stack: Stack, raw: bytes) -> None:
    created = await api_stack.create_key("kept", READ)
    path = f"/v1/tokens/{created['id']}"
    status, answer = await api_stack.auth_call("PATCH", path, data=raw)
    assert status == 422, answer
    assert [problem["field"] for problem in answer["error"]["details"]] == ["body"]
    assert "JSON" in answer["error"]["message"]
    assert (await api_stack.auth_call("GET", path))[1] == created
    for action in ("token.updated", "token.deactivated", "token.reactivated"):
        assert await audit_count(api_stack, action, created["id"]) == 0


@pytest.mark.parametrize(
    ("sent", "field"),
    [
        # The body is optional (left out: rotate now); a broken one is no "left out".
        *[({"data": raw}, "body") for raw in NOT_JSON],
        ({"json": {"grace": 60}}, "grace"),
        ({"json": {"grace_seconds": 0, "expires_at": None}}, "expires_at"),
        ({"json": [{"grace_seconds": 0}]}, "body"),
    ],
    ids=["open_brace", "nul", "trailing_comma", "not_utf8", "grace", "extra_field", "array"],
)
async def test_a_bad_rotation_keeps_the_secret(
    api_stack: Stack, sent: dict[str, Any], field: str
) -> None:
    """Refused (422 naming the field), not read as "no body, rotate now": the secret
    still works, none is handed out and nothing is audited."""
    status, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "rotated", "permissions": READ}
    )
    assert status == 201
    secret = created.pop("token")
    path = f"/v1/tokens/{created['id']}"
    status, answer = await api_stack.auth_call("POST", f"{path}/rotate", **sent)
    assert status == 422, answer
    assert answer["error"]["code"] == "validation_failed"
    assert [problem["field"] for problem in answer["error"]["details"]] == [field]
    assert "token" not in answer
    assert (await api_stack.introspect(secret))["active"] is True
    assert (await api_stack.auth_call("GET", path))[1] == created
    assert await audit_count(api_stack, "token.rotated", created["id"]) == 0


# Every kind of auth route a key is presented to: managing keys and groups, exchanging,
# reading the audit log.
KEYED_ROUTES = [
    ("GET", "/v1/tokens"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/permission-groups"),
    ("POST", "/v1/token-exchange"),
    ("GET", "/v1/audit-log"),
]


async def _refusal(
    stack: Stack, method: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    body = {"name": "never", "permissions": READ} if method == "POST" else None
    async with stack.session.request(
        method, f"{stack.auth_url}{path}", headers=headers, json=body
    ) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(("method", "path"), KEYED_ROUTES)
async def test_an_access_token_on_auth_routes_is_told_to_send_the_key(
    api_stack: Stack, method: str, path: str
) -> None:
    """The access token /v1/token-exchange hands out is for the api: auth's own routes say
    they take the key, not "does not start with hwk_" as if the key were corrupted."""
    status, exchanged = await api_stack.auth_call("POST", "/v1/token-exchange")
    assert status == 200, exchanged
    before = await api_stack.auth_list()
    status, answer = await _refusal(
        api_stack, method, path, api_stack.headers(exchanged["access_token"])
    )
    assert status == 401, answer
    error = answer["error"]
    assert (error["code"], error["details"]) == ("invalid_token", {"reason": "malformed"})
    assert "not an access token" in error["message"], error
    assert "API key" in error["message"], error
    assert "does not start with" not in error["message"], error
    assert "access_token" not in answer
    assert await api_stack.auth_list() == before


@pytest.mark.parametrize(("method", "path"), KEYED_ROUTES)
@pytest.mark.parametrize(
    "authorization",
    ["Basic dXNlcjpwYXNz", "Digest username=x", f"Bearerhwk_{'a' * 49}"],
    ids=["basic", "digest", "no_space"],
)
async def test_another_authorization_scheme_gets_the_malformed_reason(
    api_stack: Stack, method: str, path: str, authorization: str
) -> None:
    """Every invalid_token says why (``details.reason``): a scheme auth does not read is a
    malformed credential, the message saying which forms are taken. No header at all
    stays ``missing_token``, as documented."""
    before = await api_stack.auth_list()
    status, answer = await _refusal(api_stack, method, path, {"authorization": authorization})
    assert status == 401, answer
    error = answer["error"]
    assert (error["code"], error["details"]) == ("invalid_token", {"reason": "malformed"})
    assert "Authorization: Bearer <key>" in error["message"], error
    status, answer = await _refusal(api_stack, method, path, {})
    assert (status, answer["error"]["code"], answer["error"]["details"]) == (
        401,
        "missing_token",
        None,
    )
    assert await api_stack.auth_list() == before


@pytest.mark.parametrize(
    "sent",
    [
        *[{"data": raw} for raw in NOT_JSON],
        # A later expiry asked for: the route ends the key now, so it is refused, not read.
        {"json": {"expires_at": "2099-01-01T00:00:00Z"}},
        {"json": [1]},
    ],
    ids=["open_brace", "nul", "trailing_comma", "not_utf8", "expires_at", "array"],
)
async def test_a_bad_expire_keeps_the_key(api_stack: Stack, sent: dict[str, Any]) -> None:
    created = await api_stack.create_key("kept", READ)
    path = f"/v1/tokens/{created['id']}"
    status, answer = await api_stack.auth_call("POST", f"{path}/expire", **sent)
    assert status == 422, answer
    assert (await api_stack.auth_call("GET", path))[1] == created
    assert await audit_count(api_stack, "token.expired", created["id"]) == 0
    # Left out, or an empty object: the key expires now.
    status, expired = await api_stack.auth_call("POST", f"{path}/expire", json={})
    assert (status, expired["state"]) == (200, "expired")


@pytest.mark.parametrize(
    "sent",
    [*[{"data": raw} for raw in NOT_JSON], {"json": {"ttl": 99999}}],
    ids=["open_brace", "nul", "trailing_comma", "not_utf8", "ttl"],
)
async def test_an_exchange_with_a_body_is_refused(api_stack: Stack, sent: dict[str, Any]) -> None:
    """It takes no body: a lifetime asked for is refused, not ignored."""
    status, answer = await api_stack.auth_call("POST", "/v1/token-exchange", **sent)
    assert status == 422, answer
    assert "access_token" not in answer
    status, exchanged = await api_stack.auth_call("POST", "/v1/token-exchange")
    assert status == 200, exchanged


@pytest.mark.parametrize("service", ["auth", "api"])
@pytest.mark.parametrize("order", ["limited_first", "full_first"])
async def test_two_authorization_headers_are_refused(
    api_stack: Stack, service: str, order: str
) -> None:
    """Two keys on one request ran as whichever came first, so a proxy adding or
    reordering a header changed who the caller was: 400, whatever the order, and no key
    is made."""
    limited = await api_stack.new_token(READ)
    keys = [limited, api_stack.token] if order == "limited_first" else [api_stack.token, limited]
    headers = CIMultiDict(("authorization", f"Bearer {key}") for key in keys)
    before = await api_stack.auth_list()
    if service == "auth":
        url = f"{api_stack.auth_url}/v1/tokens"
        sent: dict[str, Any] = {"name": "two-headers", "permissions": READ}
    else:
        url = f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/webhooks"
        sent = {"url": "https://example.com/hook", "event_types": ["object.created"]}
    async with api_stack.session.post(url, headers=headers, json=sent) as response:
        assert response.status == 400
        answer = await response.json()
    assert answer["error"]["code"] == "ambiguous_credentials"
    assert answer["error"]["message"] == "send one Authorization header: this request has 2"
    assert await api_stack.auth_list() == before
    async with api_stack.session.get(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/webhooks", headers=api_stack.headers()
    ) as response:
        assert (await response.json())["data"] == []


async def test_two_service_credentials_are_refused(api_stack: Stack) -> None:
    headers = CIMultiDict(("authorization", "Bearer test-service-credential") for _ in range(2))
    async with api_stack.session.post(
        f"{api_stack.auth_url}/v1/introspect", headers=headers, json={"token": api_stack.token}
    ) as response:
        assert response.status == 401
        answer = await response.json()
    assert answer["error"]["code"] == "invalid_service_credential"
    assert answer["error"]["message"] == "send one Authorization header: this request has 2"
