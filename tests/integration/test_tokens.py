"""The self-service token API on the auth service, over real HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import ip_network
from typing import Any

import orjson
import pytest
import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.auth import store
from services.auth.callers import KeyUsage
from services.auth.errors import TokenEnded
from services.auth.tokens import hash_token
from services.shared import (
    Settings,
    make_consumer,
    start_client,
    stop_client,
    tables,
    topics_for,
    utcnow,
)
from tests.conftest import (
    Stack,
    audit_count,
    corrupt,
    fail_nth_call,
    running_stack,
    stack_on_own_broker,
)

MANAGE = ["token:manage", "object:read", "webhook:read", "webhook:create"]


READ = ["object:read"]


async def _token_count(stack: Stack) -> int:
    async with stack.api.engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(tables.tokens))).scalar()
    return int(count or 0)


async def _set_token_row(target: Stack | AsyncConnection, key_id: str, **values: Any) -> None:
    """Write ``values`` into a key's stored row by hand: on ``target`` when it is a
    connection (inside its transaction), else in a transaction of its own."""
    statement = tables.tokens.update().where(tables.tokens.c.id == key_id).values(**values)
    if isinstance(target, AsyncConnection):
        await target.execute(statement)
        return
    async with target.api.engine.begin() as conn:
        await conn.execute(statement)


async def _audit_actions(stack: Stack) -> list[str]:
    async with stack.api.engine.connect() as conn:
        rows = await conn.execute(select(tables.audit_log.c.action).order_by(tables.audit_log.c.at))
    return [row.action for row in rows]


async def test_create_shows_the_secret_once(api_stack: Stack) -> None:
    """The plaintext is in the create response only; lists and shows never carry it."""
    status, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "zapier", "permissions": ["object:read"]}
    )
    assert status == 201
    token = created["token"]
    assert token.startswith("hwk_")
    assert token.startswith(created["display_prefix"])
    assert created["state"] == "active"
    status, listed = await api_stack.auth_call("GET", "/v1/tokens")
    assert status == 200
    assert {t["name"] for t in listed["data"]} == {"all", "zapier"}
    assert all("token" not in t for t in listed["data"])
    status, shown = await api_stack.auth_call("GET", f"/v1/tokens/{created['id']}")
    assert status == 200
    assert "token" not in shown
    assert token not in str(listed) + str(shown)
    assert (await api_stack.introspect(token))["active"] is True
    assert "token.created" in await _audit_actions(api_stack)


async def test_the_token_view_names_its_user(api_stack: Stack) -> None:
    """Creating, showing, listing and changing a key each name the user it belongs to."""
    status, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "owned", "permissions": ["object:read"]}
    )
    assert status == 201
    owner = (await api_stack.introspect(created["token"]))["user_id"]
    assert owner == api_stack.user_id
    assert created["user_id"] == owner
    _, shown = await api_stack.auth_call("GET", f"/v1/tokens/{created['id']}")
    assert shown["user_id"] == owner
    _, listed = await api_stack.auth_call("GET", "/v1/tokens")
    assert {t["user_id"] for t in listed["data"]} == {owner}
    _, renamed = await api_stack.auth_call(
        "PATCH", f"/v1/tokens/{created['id']}", json={"name": "still owned"}
    )
    assert renamed["user_id"] == owner


@pytest.mark.parametrize(
    ("body", "status", "field_or_code"),
    [
        ({"name": "all", "permissions": ["object:read"]}, 409, "duplicate_name"),
        ({"name": "x", "permissions": ["object:explode"]}, 422, "unknown_permission"),
        ({"name": "x", "permissions": []}, 422, "permissions"),
        (
            {"name": "x", "permissions": ["object:read"], "expires_at": "2001-01-01T00:00:00Z"},
            422,
            "expires_at",
        ),
        (
            {
                "name": "x",
                "permissions": ["object:read"],
                "expires_at": "9999-12-31T23:00:00-05:00",
            },
            422,
            "expires_at",
        ),
        (
            {"name": "x", "permissions": ["object:read"], "expires_at": "2099-01-01T00:00:00"},
            422,
            "expires_at",
        ),
        (
            {"name": "x", "permissions": ["object:read"], "allowed_cidrs": ["10.0.0.0/33"]},
            422,
            "allowed_cidrs",
        ),
        (
            {"name": "x", "permissions": ["object:read"], "inactivity_timeout_seconds": 5},
            422,
            "inactivity_timeout_seconds",
        ),
        ({"name": "x", "permissions": ["object:read"], "admin": True}, 422, "admin"),
        ({"name": 7, "permissions": ["object:read"]}, 422, "name"),
        ({"name": "x", "permissions": "object:read"}, 422, "permissions"),
        (
            {"name": "x", "permissions": ["object:read"], "permission_group_id": "pg_nope"},
            404,
            "not_found",
        ),
    ],
)
async def test_bad_token_requests_store_nothing(
    api_stack: Stack, body: dict[str, Any], status: int, field_or_code: str
) -> None:
    """Duplicates, unknown permissions, past or naive expiry, bad CIDRs, unknown fields."""
    before = await _token_count(api_stack)
    got, answer = await api_stack.auth_call("POST", "/v1/tokens", json=body)
    assert got == status
    error = answer["error"]
    fields = [d["field"] for d in error["details"]] if isinstance(error["details"], list) else []
    assert field_or_code in [*fields, error["code"]]
    assert await _token_count(api_stack) == before


async def test_a_token_cannot_grant_more_than_it_holds(api_stack: Stack) -> None:
    """No escalation on create or rotate."""
    limited = await api_stack.new_token(["token:manage", "object:read"])
    status, answer = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        limited,
        json={"name": "wider", "permissions": ["object:read", "webhook:create"]},
    )
    assert status == 403
    assert answer["error"]["details"] == {"permissions": ["webhook:create"]}
    status, listed = await api_stack.auth_call("GET", "/v1/tokens")
    all_token = next(t for t in listed["data"] if t["name"] == "all")
    status, _ = await api_stack.auth_call(
        "POST", f"/v1/tokens/{all_token['id']}/rotate", limited, json={}
    )
    assert status == 403


async def test_token_manage_is_required(api_stack: Stack) -> None:
    """Managing tokens needs token:manage; bad tokens get 401."""
    reader = await api_stack.new_token(["object:read"])
    status, _ = await api_stack.auth_call("GET", "/v1/tokens", reader)
    assert status == 403
    for bad in ("hwk_x", corrupt(api_stack.token), "nope"):
        status, answer = await api_stack.auth_call("GET", "/v1/tokens", bad)
        assert status == 401
        assert answer["error"]["code"] == "invalid_token"
        assert answer["error"]["details"] == {"reason": "malformed"}, answer


@pytest.mark.parametrize("body", [{"json": {"grace_seconds": 0}}, {}], ids=["zero", "no_body"])
async def test_rotate_now_kills_the_old_secret(api_stack: Stack, body: dict[str, Any]) -> None:
    """After rotate with no grace (the default, so the body may be left out), only the
    new secret works."""
    _, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "r", "permissions": ["object:read"]}
    )
    status, rotated = await api_stack.auth_call(
        "POST", f"/v1/tokens/{created['id']}/rotate", **body
    )
    assert status == 200, rotated
    assert rotated["token"] != created["token"]
    assert (await api_stack.introspect(created["token"])) == {
        "active": False,
        "reason": "rotated",
    }
    assert (await api_stack.introspect(rotated["token"]))["active"] is True


async def test_rotate_with_grace_keeps_both_until_it_ends(api_stack: Stack) -> None:
    """'Expire later': old and new both work during the grace, then only the new one."""
    _, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "g", "permissions": ["object:read"]}
    )
    _, rotated = await api_stack.auth_call(
        "POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": 4}
    )
    assert rotated["previous_secret_valid_until"] is not None
    assert (await api_stack.introspect(created["token"]))["active"] is True
    assert (await api_stack.introspect(rotated["token"]))["active"] is True
    await asyncio.sleep(4.2)
    assert (await api_stack.introspect(created["token"]))["reason"] == "rotated"
    assert (await api_stack.introspect(rotated["token"]))["active"] is True


@pytest.mark.parametrize("grace", [-1, 10**9, "60", 1.5])
async def test_bad_grace_is_refused(api_stack: Stack, grace: object) -> None:
    """Negative, huge, or non-integer grace periods are 422 and change nothing."""
    _, listed = await api_stack.auth_call("GET", "/v1/tokens")
    token_id = listed["data"][0]["id"]
    status, answer = await api_stack.auth_call(
        "POST", f"/v1/tokens/{token_id}/rotate", json={"grace_seconds": grace}
    )
    assert status == 422
    assert answer["error"]["details"][0]["field"] == "grace_seconds"
    assert (await api_stack.introspect(api_stack.token))["active"] is True


async def test_lifecycle_deactivate_reactivate_expire_revoke(api_stack: Stack) -> None:
    """Each state change takes effect at once and is audited."""
    _, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "life", "permissions": ["object:read"]}
    )
    path, token = f"/v1/tokens/{created['id']}", created["token"]
    status, shown = await api_stack.auth_call("PATCH", path, json={"active": False})
    assert (status, shown["state"]) == (200, "inactive")
    assert (await api_stack.introspect(token))["reason"] == "inactive"
    status, shown = await api_stack.auth_call(
        "PATCH", path, json={"active": True, "name": "renamed", "description": "d"}
    )
    assert (status, shown["state"], shown["name"], shown["description"]) == (
        200,
        "active",
        "renamed",
        "d",
    )
    assert (await api_stack.introspect(token))["active"] is True
    status, shown = await api_stack.auth_call("POST", f"{path}/expire")
    assert (status, shown["state"]) == (200, "expired")
    assert (await api_stack.introspect(token))["reason"] == "expired"
    # Expired again, or once revoked: the 409 says which end it met.
    status, answer = await api_stack.auth_call("POST", f"{path}/expire")
    assert (status, answer["error"]["code"]) == (409, "token_ended")
    assert answer["error"]["message"].startswith("the token cannot be expired: it expired at ")
    status, _ = await api_stack.auth_call("DELETE", path)
    assert status == 204
    assert (await api_stack.introspect(token))["reason"] == "revoked"
    status, answer = await api_stack.auth_call("POST", f"{path}/expire")
    assert (status, answer["error"]["code"]) == (409, "token_ended")
    assert answer["error"]["message"].startswith("the token cannot be expired: it was revoked")
    actions = await _audit_actions(api_stack)
    for action in (
        "token.deactivated",
        "token.reactivated",
        "token.expired",
        "token.revoked",
        "token.refused",
    ):
        assert action in actions


async def test_bad_updates_are_refused(api_stack: Stack) -> None:
    """Empty or unknown-field PATCH bodies and duplicate renames are refused."""
    _, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "p", "permissions": ["object:read"]}
    )
    path = f"/v1/tokens/{created['id']}"
    assert (await api_stack.auth_call("PATCH", path, json={}))[0] == 422
    assert (await api_stack.auth_call("PATCH", path, json={"permissions": []}))[0] == 422
    assert (await api_stack.auth_call("PATCH", path, json={"active": "no"}))[0] == 422
    status, answer = await api_stack.auth_call("PATCH", path, json={"name": "all"})
    assert (status, answer["error"]["code"]) == (409, "duplicate_name")


async def test_a_revoked_keys_name_goes_to_its_replacement(api_stack: Stack) -> None:
    """A key revoked (leaked, say) keeps its row for the audit; its name is free for the
    key that replaces it, but not while the first is only deactivated or expired, and
    never for two live keys."""
    body = {"name": "ci", "permissions": ["object:read"]}
    status, first = await api_stack.auth_call("POST", "/v1/tokens", json=body)
    assert status == 201
    path = f"/v1/tokens/{first['id']}"
    assert (await api_stack.auth_call("PATCH", path, json={"active": False}))[0] == 200
    status, answer = await api_stack.auth_call("POST", "/v1/tokens", json=body)
    assert (status, answer["error"]["code"]) == (409, "duplicate_name")
    assert (await api_stack.auth_call("DELETE", path))[0] == 204
    status, second = await api_stack.auth_call("POST", "/v1/tokens", json=body)
    assert status == 201
    assert second["id"] != first["id"]
    status, answer = await api_stack.auth_call("POST", "/v1/tokens", json=body)
    assert (status, answer["error"]["code"]) == (409, "duplicate_name")
    _, other = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "other", "permissions": ["object:read"]}
    )
    rename = {"name": "ci"}
    renamed = await api_stack.auth_call("PATCH", f"/v1/tokens/{other['id']}", json=rename)
    assert (renamed[0], renamed[1]["error"]["code"]) == (409, "duplicate_name")
    assert (await api_stack.introspect(first["token"]))["reason"] == "revoked"


async def test_other_users_tokens_do_not_exist(api_stack: Stack) -> None:
    """Another user's token id answers 404 on every route."""
    from services.auth.admin import create_token, create_user

    other = await create_user(api_stack.api.engine, "other@example.com", "Other")
    other_id, _ = await create_token(
        api_stack.api.engine,
        pepper="test-pepper",
        user_id=other,
        name="theirs",
        permissions=["object:read"],
    )
    for method, suffix, body in (
        ("GET", "", None),
        ("PATCH", "", {"name": "mine"}),
        ("DELETE", "", None),
        ("POST", "/rotate", {}),
        ("POST", "/expire", None),
    ):
        status, _ = await api_stack.auth_call(method, f"/v1/tokens/{other_id}{suffix}", json=body)
        assert status == 404, (method, suffix)


async def test_ip_allowlist_is_enforced_through_the_api(api_stack: Stack) -> None:
    """A token limited to 10.0.0.0/8 is refused when used from loopback."""
    _, created = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={"name": "cidr", "permissions": ["webhook:read"], "allowed_cidrs": ["10.0.0.0/8"]},
    )
    async with api_stack.session.get(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/webhooks",
        headers=api_stack.headers(created["token"]),
    ) as response:
        assert response.status == 401
        assert (await response.json())["error"]["details"] == {"reason": "ip_not_allowed"}


async def test_behind_a_trusted_proxy_the_allowlist_sees_the_client(settings: Settings) -> None:
    """Behind a load balancer every connection comes from the proxy: with it trusted, the
    client its X-Forwarded-For names is the one checked, on the api and on auth. From
    a peer not trusted the header is not read (anyone could write it)."""
    trusting = settings.model_copy(update={"trusted_proxies": (ip_network("127.0.0.1/32"),)})
    for trusted in (True, False):
        async with running_stack(trusting if trusted else settings, with_dispatcher=False) as stack:
            status, created = await stack.auth_call(
                "POST",
                "/v1/tokens",
                json={
                    "name": f"behind a proxy, trusted: {trusted}",
                    "permissions": ["webhook:read", "token:manage"],
                    "allowed_cidrs": ["10.0.0.0/8"],
                },
            )
            assert status == 201, created
            answers = []
            for forwarded in ("192.0.2.7, 10.1.2.3", "10.1.2.3, 192.0.2.7", None):
                headers = stack.headers(created["token"])
                if forwarded is not None:
                    headers["X-Forwarded-For"] = forwarded
                for url in (
                    f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks",
                    f"{stack.auth_url}/v1/tokens",
                ):
                    async with stack.session.get(url, headers=headers) as response:
                        answers.append(response.status)
            # The nearest hop is the client: 10.1.2.3, then 192.0.2.7, then the peer.
            expected = [200, 200, 401, 401, 401, 401] if trusted else [401] * 6
            assert answers == expected, (trusted, answers)


# Well inside every fallback (caches of 30 s and more), well outside a noisy machine's
# worst change-record delay.
_CHANGE_DEADLINE = 10.0


@pytest.fixture
async def long_cache_stack(settings: Settings) -> AsyncIterator[Stack]:
    """The api caches positive answers for a minute and asks for ended keys once an hour:
    within the tests' deadlines only change records can revoke."""
    async with running_stack(
        settings.model_copy(
            update={"auth_cache_ttl_seconds": 60.0, "ended_keys_sync_seconds": 3600.0}
        ),
        with_dispatcher=False,
    ) as running:
        yield running


async def test_revoked_token_is_refused_by_the_api_through_a_change_record(
    long_cache_stack: Stack,
) -> None:
    """Revocation reaches the api's cache through a change record, long before the cache
    or the ended-keys list would end it. How long it takes (under a second) is measured
    by `bench/changes.py`; a deadline here only keeps a lost record from passing."""
    stack = long_cache_stack
    _, created = await stack.auth_call(
        "POST", "/v1/tokens", json={"name": "soon-gone", "permissions": ["webhook:read"]}
    )
    url = f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks"
    headers = stack.headers(created["token"])
    async with stack.session.get(url, headers=headers) as response:
        assert response.status == 200
    status, _ = await stack.auth_call("DELETE", f"/v1/tokens/{created['id']}")
    assert status == 204
    revoked_at = time.monotonic()
    while True:
        async with stack.session.get(url, headers=headers) as response:
            if response.status == 401:
                break
        assert time.monotonic() - revoked_at < _CHANGE_DEADLINE, "revocation never arrived"
        await asyncio.sleep(0.02)


async def test_max_lifetime_is_enforced(settings: Settings) -> None:
    """With a configured maximum lifetime, expiry is required and bounded."""
    limited = settings.model_copy(update={"token_max_lifetime_days": 30})
    async with running_stack(limited, with_dispatcher=False) as stack:
        soon = (datetime.now(UTC) + timedelta(days=10)).isoformat()
        late = (datetime.now(UTC) + timedelta(days=31)).isoformat()
        cases = [({}, 422), ({"expires_at": late}, 422), ({"expires_at": soon}, 201)]
        for extra, expected in cases:
            status, answer = await stack.auth_call(
                "POST",
                "/v1/tokens",
                json={"name": f"n{expected}{len(extra)}", "permissions": ["object:read"], **extra},
            )
            assert status == expected, answer


async def test_keys_expired_for_inactivity_count_as_expired(api_stack: Stack) -> None:
    """As the key list and introspection show them: unused past their inactivity timeout,
    they are expired; one used within it is active."""
    made = {}
    for name in ("idle", "busy", "idle-never-used"):
        status, made[name] = await api_stack.auth_call(
            "POST",
            "/v1/tokens",
            json={"name": name, "permissions": ["object:read"], "inactivity_timeout_seconds": 60},
        )
        assert status == 201
    long_ago = utcnow() - timedelta(minutes=5)
    await _set_token_row(api_stack, made["idle"]["id"], last_used_at=long_ago)
    await _set_token_row(api_stack, made["busy"]["id"], last_used_at=utcnow(), created_at=long_ago)
    await _set_token_row(api_stack, made["idle-never-used"]["id"], created_at=long_ago)
    assert (await api_stack.auth_call("GET", f"/v1/tokens/{made['idle']['id']}"))[1][
        "state"
    ] == "expired"
    await api_stack.auth._count_tokens()
    registry = api_stack.auth.metrics.registry
    # The stack's own key is active too.
    assert registry.get_sample_value("hookwire_auth_tokens", {"state": "expired"}) == 2
    assert registry.get_sample_value("hookwire_auth_tokens", {"state": "active"}) == 2


async def test_metrics_count_cache_hits_and_tokens_by_state(api_stack: Stack) -> None:
    """The api counts cache hits and misses; auth reports tokens by state."""
    url = f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/webhooks"
    for _ in range(3):
        async with api_stack.session.get(url, headers=api_stack.headers()) as response:
            assert response.status == 200
    api_registry = api_stack.api.metrics.registry
    assert api_registry.get_sample_value("hookwire_api_auth_cache_misses_total") == 1
    assert api_registry.get_sample_value("hookwire_api_auth_cache_hits_total") == 2
    _, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "m", "permissions": ["object:read"]}
    )
    await api_stack.auth_call("DELETE", f"/v1/tokens/{created['id']}")
    await api_stack.auth._count_tokens()
    auth_registry = api_stack.auth.metrics.registry
    assert auth_registry.get_sample_value("hookwire_auth_tokens", {"state": "active"}) == 1
    assert auth_registry.get_sample_value("hookwire_auth_tokens", {"state": "revoked"}) == 1
    assert (
        auth_registry.get_sample_value(
            "hookwire_auth_introspections_total", {"result": "active", "reason": ""}
        )
        == 1
    )


async def test_oversized_token_body_is_refused(api_stack: Stack) -> None:
    """A body over the limit gets 413 and stores nothing."""
    before = await _token_count(api_stack)
    status, answer = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={
            "name": "big",
            "permissions": ["object:read"],
            "description": "x" * (api_stack.settings.max_body_bytes + 1),
        },
    )
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")
    assert await _token_count(api_stack) == before


@pytest.fixture
async def query_key_stack(settings: Settings) -> AsyncIterator[Stack]:
    async with running_stack(
        settings.model_copy(update={"allow_query_keys": True}), with_dispatcher=False
    ) as running:
        yield running


async def test_query_keys_work_when_enabled_and_are_logged(query_key_stack: Stack) -> None:
    """With HOOKWIRE_ALLOW_QUERY_KEYS=true a ?auth-key= works, and each use is a warning."""
    stack = query_key_stack
    with structlog.testing.capture_logs() as logs:
        async with stack.session.get(
            # Alongside the route's own filters, which ignore the key.
            f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks?active=true&auth-key={stack.token}"
        ) as response:
            assert response.status == 200
        async with stack.session.get(f"{stack.auth_url}/v1/tokens?auth-key={stack.token}") as r:
            assert r.status == 200
    warnings = [e for e in logs if e["event"] == "query_string_key_used"]
    assert len(warnings) == 2
    assert all(e["log_level"] == "warning" for e in warnings)
    assert all(stack.token not in str(e) for e in logs)
    # An empty one is no key at all, as an empty Authorization header.
    async with stack.session.get(
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks?auth-key="
    ) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "missing_token"
    # A key in the query and one in the header, or two in the query: which one the
    # request runs as is not guessed.
    webhooks = f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks"
    for url, headers in (
        (f"{webhooks}?auth-key={stack.token}", stack.headers()),
        (f"{webhooks}?auth-key={stack.token}&auth-key={stack.token}", {}),
    ):
        async with stack.session.get(url, headers=headers) as response:
            assert response.status == 400
            answer = await response.json()
        assert answer["error"]["code"] == "ambiguous_credentials"
        assert stack.token not in str(answer)


async def test_a_second_auth_process_drops_its_cache_on_the_change_record(
    api_stack: Stack,
) -> None:
    """Two auth processes: a revocation made through one reaches the other's cache (whose
    entries live 30 s) through the change record."""
    from services.auth.app import AuthService

    other = AuthService(api_stack.settings, api_stack.api.engine)
    await other.start()
    try:
        _, created = await api_stack.auth_call(
            "POST", "/v1/tokens", json={"name": "twice", "permissions": ["object:read"]}
        )

        async def ask_other() -> dict[str, Any]:
            async with api_stack.session.post(
                f"http://127.0.0.1:{other.port}/v1/introspect",
                json={"token": created["token"]},
                headers={"authorization": "Bearer test-service-credential"},
            ) as response:
                answer: dict[str, Any] = await response.json()
                return answer

        def hits() -> float:
            value = other.metrics.registry.get_sample_value(
                "hookwire_auth_token_cache_lookups_total", {"result": "hit"}
            )
            return value or 0.0

        # The token's own "created" record may still drop the first entry; wait for a hit.
        async with asyncio.timeout(10):
            while hits() == 0:
                assert (await ask_other())["active"] is True
                await asyncio.sleep(0.02)
        await api_stack.auth_call("DELETE", f"/v1/tokens/{created['id']}")
        revoked_at = time.monotonic()
        while (await ask_other())["active"]:
            assert time.monotonic() - revoked_at < _CHANGE_DEADLINE
            await asyncio.sleep(0.02)
        assert (await ask_other())["reason"] == "revoked"
    finally:
        await other.stop()


async def test_an_expiry_given_in_another_zone_means_that_instant(api_stack: Stack) -> None:
    """An hour ahead written as local time eight hours behind UTC: an hour ahead, kept so."""
    instant = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    pacific = instant.astimezone(timezone(timedelta(hours=-8)))
    status, created = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={"name": "zoned", "permissions": ["object:read"], "expires_at": pacific.isoformat()},
    )
    assert status == 201, created
    assert created["state"] == "active"
    assert datetime.fromisoformat(created["expires_at"]) == instant
    assert (await api_stack.introspect(created["token"]))["active"] is True
    status, shown = await api_stack.auth_call("GET", f"/v1/tokens/{created['id']}")
    assert datetime.fromisoformat(shown["expires_at"]) == instant


async def test_ending_a_token_again_keeps_the_first_record(api_stack: Stack) -> None:
    """A second revoke or expire changes nothing; a revoked token stays revoked."""
    _, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "twice", "permissions": ["object:read"]}
    )
    path = f"/v1/tokens/{created['id']}"
    status, expired = await api_stack.auth_call("POST", f"{path}/expire")
    assert status == 200
    status, answer = await api_stack.auth_call("POST", f"{path}/expire")
    assert (status, answer["error"]["code"]) == (409, "token_ended")
    assert (await api_stack.auth_call("DELETE", path))[0] == 204
    _, first = await api_stack.auth_call("GET", path)
    assert (await api_stack.auth_call("DELETE", path))[0] == 204
    _, second = await api_stack.auth_call("GET", path)
    assert second["revoked_at"] == first["revoked_at"] is not None
    assert second["expires_at"] == expired["expires_at"]
    for method, suffix, body in (
        ("PATCH", "", {"active": True}),
        ("PATCH", "", {"active": False}),
        ("POST", "/rotate", {}),
    ):
        status, answer = await api_stack.auth_call(method, f"{path}{suffix}", json=body)
        assert (status, answer["error"]["code"]) == (409, "token_ended"), (method, suffix)
    status, renamed = await api_stack.auth_call("PATCH", path, json={"name": "twice-old"})
    assert (status, renamed["state"]) == (200, "revoked")
    revocations = await audit_count(api_stack, "token.revoked", created["id"])
    assert revocations == 1


async def test_rotations_at_once_never_hand_out_a_dead_secret(api_stack: Stack) -> None:
    """Of two rotations racing, every secret handed out works (the loser gets a 409)."""
    for round_ in range(5):
        _, created = await api_stack.auth_call(
            "POST", "/v1/tokens", json={"name": f"race{round_}", "permissions": ["object:read"]}
        )
        path = f"/v1/tokens/{created['id']}/rotate"
        answers = await asyncio.gather(
            *(api_stack.auth_call("POST", path, json={"grace_seconds": 3600}) for _ in range(2))
        )
        handed_out = [body["token"] for status, body in answers if status == 200]
        assert handed_out, answers
        for status, body in answers:
            assert status in (200, 409), body
            if status == 409:
                assert body["error"]["code"] == "concurrent_change"
        for secret in handed_out:
            assert (await api_stack.introspect(secret))["active"] is True


async def test_using_a_key_on_the_auth_routes_counts_as_a_use(api_stack: Stack) -> None:
    """Managing keys with a key is a use of it: its last use is recorded."""
    status, created = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={
            "name": "manager",
            "permissions": ["token:manage"],
            "inactivity_timeout_seconds": 3600,
        },
    )
    assert status == 201
    assert created["last_used_at"] is None
    assert (await api_stack.auth_call("GET", "/v1/tokens", token=created["token"]))[0] == 200
    await api_stack.auth.usage.flush()
    _, shown = await api_stack.auth_call("GET", f"/v1/tokens/{created['id']}")
    assert shown["last_used_at"] is not None
    assert shown["last_used_ip"] == "127.0.0.1"


async def test_a_use_whose_write_failed_is_written_at_the_next_flush(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost, a key in use could end for inactivity: it counts from the last use. The use
    is noted straight before the flush (the service's own flusher, every second, takes
    nothing in between: the flush takes the pending uses before it first waits)."""
    status, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "used", "permissions": ["token:manage"]}
    )
    assert status == 201
    fail_nth_call(
        monkeypatch,
        store,
        "record_last_used",
        1,
        OperationalError("UPDATE", {}, Exception("the database went away")),
    )
    api_stack.auth.usage.used(created["id"], utcnow(), "203.0.113.9")
    with pytest.raises(OperationalError):
        await api_stack.auth.usage.flush()
    await api_stack.auth.usage.flush()
    _, shown = await api_stack.auth_call("GET", f"/v1/tokens/{created['id']}")
    assert shown["last_used_at"] is not None
    assert shown["last_used_ip"] == "203.0.113.9"


async def test_a_key_in_use_is_not_idle_while_its_last_use_is_being_written(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its stored last use is past the inactivity timeout, its latest use is being written:
    a check meanwhile counts that use (it read the database's older one and refused the
    key as expired)."""
    status, created = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={"name": "busy", "permissions": ["object:read"], "inactivity_timeout_seconds": 60},
    )
    assert status == 201
    await _set_token_row(api_stack, created["id"], last_used_at=utcnow() - timedelta(seconds=59))
    usage = api_stack.auth.usage
    writing, release = asyncio.Event(), asyncio.Event()
    real = store.record_last_used

    async def slow(conn: Any, uses: Any) -> None:
        writing.set()
        await release.wait()
        await real(conn, uses)

    monkeypatch.setattr(store, "record_last_used", slow)
    await asyncio.sleep(1.5)  # past the timeout as the database has it, not as used now
    used_at = utcnow()
    usage.used(created["id"], used_at, "127.0.0.1")
    flushing = asyncio.create_task(usage.flush())
    await asyncio.wait_for(writing.wait(), 5)
    assert (await api_stack.introspect(created["token"]))["active"] is True
    # A check that read the row before the write committed judges after it: the use
    # written still counts for it.
    async with api_stack.auth.engine.connect() as conn:
        read_before = await store.find_token(conn, hash_token(created["token"], "test-pepper"))
    assert read_before is not None
    release.set()
    await flushing
    # The check's own use (not written yet) aside: the use the flush wrote still counts.
    usage._pending.clear()
    assert usage.latest(read_before).last_used_at == used_at


async def test_a_last_use_is_never_written_back_in_time(api_stack: Stack) -> None:
    """Two auth processes (or a flush tried again) write uses in any order: the later use
    stays."""
    status, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "twice", "permissions": ["object:read"]}
    )
    assert status == 201
    now = utcnow()
    one, other = KeyUsage(api_stack.auth.engine), KeyUsage(api_stack.auth.engine)
    one.used(created["id"], now - timedelta(seconds=30), "10.0.0.1")
    other.used(created["id"], now, "10.0.0.2")
    await other.flush()
    await one.flush()
    _, shown = await api_stack.auth_call("GET", f"/v1/tokens/{created['id']}")
    assert datetime.fromisoformat(shown["last_used_at"]) == now
    assert shown["last_used_ip"] == "10.0.0.2"


async def test_a_key_cannot_create_a_key_that_outlives_or_outreaches_it(api_stack: Stack) -> None:
    """A fenced, short-lived key mints only keys as fenced and as short-lived as itself."""
    ends = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    status, creator = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={
            "name": "fenced-creator",
            "permissions": ["token:manage", "object:read"],
            "expires_at": ends.isoformat(),
            "allowed_cidrs": ["127.0.0.0/8"],
        },
    )
    assert status == 201
    sooner = (ends - timedelta(minutes=30)).isoformat()
    later = (ends + timedelta(minutes=30)).isoformat()
    cases: list[tuple[dict[str, Any], int]] = [
        ({}, 403),
        ({"expires_at": later, "allowed_cidrs": ["127.0.0.1/32"]}, 403),
        ({"expires_at": sooner}, 403),
        ({"expires_at": sooner, "allowed_cidrs": ["10.0.0.0/8"]}, 403),
        ({"expires_at": sooner, "allowed_cidrs": ["127.0.0.1/32", "::1/128"]}, 403),
        ({"expires_at": sooner, "allowed_cidrs": ["127.0.0.1/32"]}, 201),
        ({"expires_at": ends.isoformat(), "allowed_cidrs": ["127.0.0.0/8"]}, 201),
    ]
    for number, (fields, expected) in enumerate(cases):
        status, answer = await api_stack.auth_call(
            "POST",
            "/v1/tokens",
            creator["token"],
            json={"name": f"heir{number}", "permissions": ["object:read"], **fields},
        )
        assert status == expected, (fields, answer)
        if expected == 403:
            assert answer["error"]["code"] == "forbidden"


async def _fenced_creator(api_stack: Stack, ends: datetime) -> dict[str, Any]:
    status, creator = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={
            "name": f"fenced-{ends.timestamp()}",
            "permissions": ["token:manage", "object:read"],
            "expires_at": ends.isoformat(),
            "allowed_cidrs": ["127.0.0.0/8"],
        },
    )
    assert status == 201
    return creator


async def test_a_key_cannot_rotate_or_reactivate_a_key_that_outlives_or_outreaches_it(
    api_stack: Stack,
) -> None:
    """Rotating a key hands out its power anew, as reactivating one the owner switched off
    does: a short-lived or fenced key may do neither to a key it could not have created."""
    ends = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    creator = await _fenced_creator(api_stack, ends)
    status, lasting = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "lasting", "permissions": ["object:read"]}
    )
    assert status == 201
    status, answer = await api_stack.auth_call(
        "POST", f"/v1/tokens/{lasting['id']}/rotate", creator["token"], json={}
    )
    assert status == 403, answer
    assert answer["error"]["message"] == "a key cannot rotate a key that outlives it"
    status, _ = await api_stack.auth_call(
        "PATCH", f"/v1/tokens/{lasting['id']}", json={"active": False}
    )
    assert status == 200
    status, answer = await api_stack.auth_call(
        "PATCH", f"/v1/tokens/{lasting['id']}", creator["token"], json={"active": True}
    )
    assert status == 403, answer
    assert answer["error"]["message"] == "a key cannot reactivate a key that outlives it"
    # Switching a key off or renaming it hands out nothing: still allowed.
    status, renamed = await api_stack.auth_call(
        "PATCH", f"/v1/tokens/{lasting['id']}", creator["token"], json={"name": "renamed"}
    )
    assert (status, renamed["active"]) == (200, False)
    # Nor a key that works from anywhere, even one ending sooner.
    status, unfenced = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={
            "name": "unfenced",
            "permissions": ["object:read"],
            "expires_at": (ends - timedelta(minutes=5)).isoformat(),
        },
    )
    assert status == 201
    status, answer = await api_stack.auth_call(
        "POST", f"/v1/tokens/{unfenced['id']}/rotate", creator["token"], json={}
    )
    assert status == 403, answer
    assert answer["error"]["details"]["outside"] == ["0.0.0.0/0", "::/0"]
    # A client sending the whole view back: "active": true on a key already active is no
    # reactivation, and hands out nothing.
    status, _ = await api_stack.auth_call(
        "PATCH",
        f"/v1/tokens/{unfenced['id']}",
        creator["token"],
        json={"name": "unfenced", "active": True},
    )
    assert status == 200
    # One it could have made: rotated, and reactivated.
    status, heir = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        creator["token"],
        json={
            "name": "heir",
            "permissions": ["object:read"],
            "expires_at": ends.isoformat(),
            "allowed_cidrs": ["127.0.0.1/32"],
        },
    )
    assert status == 201
    status, _ = await api_stack.auth_call(
        "POST", f"/v1/tokens/{heir['id']}/rotate", creator["token"], json={}
    )
    assert status == 200
    status, _ = await api_stack.auth_call(
        "PATCH", f"/v1/tokens/{heir['id']}", creator["token"], json={"active": False}
    )
    assert status == 200
    status, back = await api_stack.auth_call(
        "PATCH", f"/v1/tokens/{heir['id']}", creator["token"], json={"active": True}
    )
    assert (status, back["active"]) == (200, True)


async def test_an_old_secret_in_its_grace_cannot_manage_keys(api_stack: Stack) -> None:
    """A key rotated because it leaked keeps its old secret working for the grace, for the
    integrations still moving over; that secret cannot make, rotate, revoke, expire or
    deactivate keys (ending the owner's new secret), and its access tokens end with the
    grace."""
    status, key = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={"name": "leaked", "permissions": ["token:manage", "object:read"]},
    )
    assert status == 201
    old = key["token"]
    status, rotated = await api_stack.auth_call(
        "POST", f"/v1/tokens/{key['id']}/rotate", old, json={"grace_seconds": 600}
    )
    assert status == 200
    one = f"/v1/tokens/{key['id']}"
    for method, path, body in [
        ("POST", "/v1/tokens", {"name": "heir", "permissions": ["object:read"]}),
        ("POST", f"{one}/rotate", {"grace_seconds": 0}),
        ("DELETE", one, None),
        ("POST", f"{one}/expire", None),
        ("PATCH", one, {"active": False}),
        ("GET", "/v1/tokens", None),
    ]:
        status, answer = await api_stack.auth_call(method, path, old, json=body)
        assert status == 403, (method, path, answer)
        assert answer["error"]["details"] == {"reason": "rotated"}
    # The owner's new secret still works, and the key is as it was.
    status, shown = await api_stack.auth_call("GET", one, rotated["token"])
    assert (status, shown["active"], shown["revoked_at"]) == (200, True, None)
    # Still a key for the api within the grace, and for access tokens ending with it.
    assert (await api_stack.introspect(old))["active"] is True
    status, exchanged = await api_stack.auth_call("POST", "/v1/token-exchange", old)
    assert status == 200
    assert 590 <= exchanged["expires_in"] <= 600
    status, exchanged = await api_stack.auth_call("POST", "/v1/token-exchange", rotated["token"])
    assert status == 200
    assert exchanged["expires_in"] > 3500


async def test_an_access_token_ends_when_its_key_would_expire_unused(api_stack: Stack) -> None:
    """Using an access token is no use of its key that auth sees: one from a key that
    expires after ten idle minutes lasts ten minutes, not the hour."""
    status, key = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={
            "name": "idle-bound",
            "permissions": ["object:read"],
            "inactivity_timeout_seconds": 600,
        },
    )
    assert status == 201
    status, exchanged = await api_stack.auth_call("POST", "/v1/token-exchange", key["token"])
    assert status == 200
    assert 590 <= exchanged["expires_in"] <= 600


async def test_active_true_on_an_active_key_writes_no_activation(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole view sent back with a new name: only the name is written (audited as an
    update), so a deactivation the owner makes in the meantime is not undone by it."""
    status, key = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "kept", "permissions": ["object:read"]}
    )
    assert status == 201
    written: list[dict[str, Any]] = []
    real = store.update_token

    async def recording(conn: Any, token_id: str, values: dict[str, Any], **kw: Any) -> bool:
        written.append(dict(values))
        return await real(conn, token_id, values, **kw)

    monkeypatch.setattr(store, "update_token", recording)
    status, renamed = await api_stack.auth_call(
        "PATCH", f"/v1/tokens/{key['id']}", json={"name": "renamed", "active": True}
    )
    assert (status, renamed["name"], renamed["active"]) == (200, "renamed", True)
    status, unchanged = await api_stack.auth_call(
        "PATCH", f"/v1/tokens/{key['id']}", json={"active": True}
    )
    assert (status, unchanged["name"]) == (200, "renamed")
    assert written == [{"name": "renamed"}]
    status, audit = await api_stack.auth_call(
        "GET", f"/v1/audit-log?action=token.reactivated&actor={api_stack.user_id}"
    )
    assert status == 200
    assert [r for r in audit["data"] if r["target_id"] == key["id"]] == []


async def test_switching_off_a_key_already_off_changes_nothing(api_stack: Stack) -> None:
    """One deactivation, one audit record: a second one finds nothing to do."""
    status, key = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "twice-off", "permissions": ["object:read"]}
    )
    assert status == 201
    for _ in range(2):
        status, shown = await api_stack.auth_call(
            "PATCH", f"/v1/tokens/{key['id']}", json={"active": False}
        )
        assert (status, shown["active"]) == (200, False)
    status, audit = await api_stack.auth_call("GET", "/v1/audit-log?action=token.deactivated")
    assert status == 200
    assert [r["target_id"] for r in audit["data"]].count(key["id"]) == 1


async def _ended_key_refuses_new_life(
    api_stack: Stack, key: dict[str, Any], state: str, why: str
) -> None:
    """Neither a new secret nor a switch on: 409 ``token_ended`` saying why, and the
    key's row, secret and audit trail stay as they were. It may still be switched off
    (that hands out nothing)."""
    path = f"/v1/tokens/{key['id']}"
    _, before = await api_stack.auth_call("GET", path)
    assert before["state"] == state
    actions = ("token.rotated", "token.reactivated", "token.deactivated", "token.updated")
    audited = [await audit_count(api_stack, action, key["id"]) for action in actions]
    for method, suffix, body in (
        ("POST", "/rotate", {"grace_seconds": 0}),
        ("POST", "/rotate", {"grace_seconds": 3600}),
        ("POST", "/rotate", None),
        ("PATCH", "", {"active": True}),
        # A whole view sent back, the name changed: the switch is refused with the rest.
        ("PATCH", "", {"active": True, "name": "other"}),
    ):
        status, answer = await api_stack.auth_call(method, f"{path}{suffix}", json=body)
        assert (status, answer["error"]["code"]) == (409, "token_ended"), (suffix, body, answer)
        assert why in answer["error"]["message"], answer
        assert "create a new key" in answer["error"]["message"], answer
        assert "token" not in answer
    assert (await api_stack.auth_call("GET", path))[1] == before
    assert [await audit_count(api_stack, action, key["id"]) for action in actions] == audited
    # The secret was not replaced: the api still says why the key no longer works.
    assert (await api_stack.introspect(key["token"]))["reason"] == before["state"]
    # Renaming still works, as on a revoked key.
    status, renamed = await api_stack.auth_call("PATCH", path, json={"name": "kept-name"})
    assert (status, renamed["name"], renamed["state"]) == (200, "kept-name", state)
    status, off = await api_stack.auth_call("PATCH", path, json={"active": False})
    assert status == 200, off
    assert off["active"] is False
    assert "token" not in off


async def test_a_key_whose_expiry_and_inactivity_timeout_are_ahead_still_rotates_and_switches(
    api_stack: Stack,
) -> None:
    """The ended checks refuse only what has ended: a key expiring next year, used a
    moment ago, with an hour's inactivity timeout, is rotated, switched off and on."""
    expires = (utcnow() + timedelta(days=365)).isoformat()
    status, key = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={
            "name": "live",
            "permissions": ["object:read"],
            "expires_at": expires,
            "inactivity_timeout_seconds": 3600,
        },
    )
    assert status == 201, key
    assert (await api_stack.introspect(key["token"]))["active"] is True
    path = f"/v1/tokens/{key['id']}"
    status, rotated = await api_stack.auth_call("POST", f"{path}/rotate", json={"grace_seconds": 0})
    assert status == 200, rotated
    assert (await api_stack.introspect(rotated["token"]))["active"] is True
    for active in (False, True):
        status, switched = await api_stack.auth_call("PATCH", path, json={"active": active})
        assert (status, switched["active"]) == (200, active), switched


async def test_an_expired_key_cannot_be_rotated_or_switched_back_on(api_stack: Stack) -> None:
    """Expired is final like revoked (no route moves ``expires_at``): a rotation would hand
    out a secret the api refuses as expired, a reactivation would answer 200 for a key
    that stays expired."""
    status, key = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "expired", "permissions": ["object:read"]}
    )
    assert status == 201
    status, expired = await api_stack.auth_call("POST", f"/v1/tokens/{key['id']}/expire")
    assert (status, expired["state"]) == (200, "expired")
    await _ended_key_refuses_new_life(api_stack, key, "expired", "expired at")


async def test_a_deactivated_key_whose_expiry_passed_cannot_come_back(api_stack: Stack) -> None:
    """Off when its ``expires_at`` passed: listed as inactive (checked first), but switched
    on it would only be expired."""
    status, key = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "off-then-due", "permissions": ["object:read"]}
    )
    assert status == 201
    status, _ = await api_stack.auth_call(
        "PATCH", f"/v1/tokens/{key['id']}", json={"active": False}
    )
    assert status == 200
    await _set_token_row(api_stack, key["id"], expires_at=utcnow() - timedelta(minutes=1))
    await _ended_key_refuses_new_life(api_stack, key, "inactive", "expired at")


async def test_a_key_expired_for_inactivity_cannot_be_rotated(api_stack: Stack) -> None:
    """Unused past its inactivity timeout the key is expired, and a new secret for it
    would be refused as expired from its first use."""
    status, key = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={"name": "idle", "permissions": ["object:read"], "inactivity_timeout_seconds": 60},
    )
    assert status == 201
    await _set_token_row(api_stack, key["id"], created_at=utcnow() - timedelta(hours=1))
    await _ended_key_refuses_new_life(api_stack, key, "expired", "inactivity timeout")


async def test_a_rotation_racing_an_expiry_hands_out_no_secret(api_stack: Stack) -> None:
    """The key read live, then expired (or revoked) before the rotation writes: the
    statement checks again, so no secret dead on arrival is handed out."""
    status, key = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "racing", "permissions": ["object:read"]}
    )
    assert status == 201
    for ending in ({"expires_at": utcnow() - timedelta(seconds=1)}, {"revoked_at": utcnow()}):
        async with api_stack.api.engine.begin() as conn:
            row = await store.token_row(conn, api_stack.user_id, key["id"])
            await _set_token_row(conn, key["id"], **ending)
            with pytest.raises(TokenEnded):
                await store.rotate_token(
                    conn,
                    pepper="test-pepper",
                    row=row,
                    previous_valid_until=utcnow(),
                    now=utcnow(),
                )
            await conn.rollback()


@pytest.mark.parametrize(
    ("cidr", "meant"),
    [("10.0.0.1/8", "10.0.0.0/8"), ("2001:db8::1/32", "2001:db8::/32")],
    ids=["v4", "v6"],
)
async def test_a_range_with_bits_past_its_prefix_is_refused(
    api_stack: Stack, cidr: str, meant: str
) -> None:
    """`10.0.0.1/8` was stored as `10.0.0.0/8`: a mistyped prefix length widened the key
    to sixteen million addresses without a word. 422 saying what it would mean."""
    before = await api_stack.auth_list()
    status, answer = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "fenced", "permissions": READ, "allowed_cidrs": [cidr]}
    )
    assert status == 422, answer
    [detail] = answer["error"]["details"]
    assert detail["field"] == "allowed_cidrs"
    assert f"did you mean {meant}" in detail["reason"]
    assert await api_stack.auth_list() == before
    status, made = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "fenced", "permissions": READ, "allowed_cidrs": [meant]}
    )
    assert status == 201, made
    assert made["allowed_cidrs"] == [meant]


async def test_a_revocation_answers_without_waiting_out_a_broker_that_hangs(
    settings: Settings,
) -> None:
    """The broker stops answering: the revocation is made and answered within a moment
    (it waited the producer's whole 10 s for the change notice before), and the notice
    still reaches `changes` once the broker goes on."""
    async with stack_on_own_broker(settings, publish_timeout_seconds=2.0) as running:
        stack, broker = running
        assert broker.pid is not None
        created = await stack.create_key("soon-revoked", ["object:read"])
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            status, _ = await stack.auth_call("DELETE", f"/v1/tokens/{created['id']}")
            took = time.monotonic() - started
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        assert status == 204
        assert took < 5, f"answered after {took:.1f} s"
        [kept] = [key for key in await stack.auth_list() if key["id"] == created["id"]]
        assert kept["state"] == "revoked"
        consumer = make_consumer(stack.settings, topics_for(stack.settings).changes, group_id=None)
        await start_client(consumer, stack.settings)
        try:
            states: list[str | None] = []
            async with asyncio.timeout(20):
                while "revoked" not in states:
                    batches = await consumer.getmany(timeout_ms=200)
                    states += [
                        change["state"]
                        for batch in batches.values()
                        for change in (orjson.loads(r.value) for r in batch)
                        if change["entity_id"] == created["id"]
                    ]
        finally:
            await stop_client(consumer)
