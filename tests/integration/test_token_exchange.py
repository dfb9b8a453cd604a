"""Access tokens: a key traded for a one-hour JWT that the api verifies on its own."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr
from sqlalchemy import select, update

from services.api import authn
from services.api.context import CONTEXT
from services.auth import store
from services.auth.tokens import generate_token, hash_token
from services.shared import (
    ACCESS_TOKEN_TTL_MAX,
    InvalidToken,
    Metrics,
    Settings,
    access_tokens,
    bound_port,
    start_site,
    tables,
    utcnow,
)
from tests.conftest import ACCESS_TOKEN_KEY, Stack, corrupt, pause_first_call, running_stack


async def _exchange(stack: Stack, key: str) -> tuple[int, dict[str, object]]:
    status, body = await stack.auth_call("POST", "/v1/token-exchange", key)
    return status, body


async def _list_webhooks(stack: Stack, token: str) -> tuple[int, dict[str, object]]:
    async with stack.session.get(
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks", headers=stack.headers(token)
    ) as response:
        return response.status, await response.json()


async def _until_let_in(stack: Stack, access: str, let_in: bool, why: str) -> None:
    """Until the api lets the access token in (``let_in``) or refuses it; 15 s at most."""
    deadline = time.monotonic() + 15
    while ((await _list_webhooks(stack, access))[0] == 200) != let_in:
        assert time.monotonic() < deadline, why
        await asyncio.sleep(0.05)


def _introspections(stack: Stack) -> float:
    total = 0.0
    for metric in stack.auth.metrics.registry.collect():
        if metric.name == "hookwire_auth_introspections":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def test_access_token_is_verified_without_calling_auth(api_stack: Stack) -> None:
    """The api accepts the JWT with no introspection call; claims carry user and key."""
    status, answer = await _exchange(api_stack, api_stack.token)
    assert status == 200
    assert answer["token_type"] == "Bearer"
    assert 3590 <= int(str(answer["expires_in"])) <= 3600
    access = str(answer["access_token"])
    claims = jwt.decode(access, options={"verify_signature": False})
    assert claims["sub"] == api_stack.user_id
    assert claims["teams"] == {api_stack.team_id: "owner"}
    before = _introspections(api_stack)
    for _ in range(3):
        status, _ = await _list_webhooks(api_stack, access)
        assert status == 200
    assert _introspections(api_stack) == before


async def test_access_token_permissions_follow_the_key_and_role(api_stack: Stack) -> None:
    """A JWT from a narrow key is as narrow as the key, and foreign teams are 404."""
    narrow = await api_stack.new_token(["webhook:read"])
    _, answer = await _exchange(api_stack, narrow)
    access = str(answer["access_token"])
    assert (await _list_webhooks(api_stack, access))[0] == 200
    async with api_stack.session.post(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/webhooks",
        headers=api_stack.headers(access),
        json={"name": "n", "url": "https://example.com/h", "topics": ["object.created"]},
    ) as response:
        assert response.status == 403
    async with api_stack.session.get(
        f"{api_stack.api_url}/v1/teams/team_other/webhooks", headers=api_stack.headers(access)
    ) as response:
        assert response.status == 404


async def test_revoking_the_key_stops_its_access_tokens(settings: Settings) -> None:
    """The api learns of the revocation from a change record (its hourly look at the
    ended keys could not make the deadline)."""
    async with running_stack(
        settings.model_copy(update={"ended_keys_sync_seconds": 3600.0}), with_dispatcher=False
    ) as api_stack:
        await _revoking_stops_access_tokens(api_stack)


async def _revoking_stops_access_tokens(api_stack: Stack) -> None:
    _, created = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "k", "permissions": ["webhook:read"]}
    )
    _, answer = await _exchange(api_stack, created["token"])
    access = str(answer["access_token"])
    assert (await _list_webhooks(api_stack, access))[0] == 200
    assert (await api_stack.auth_call("DELETE", f"/v1/tokens/{created['id']}"))[0] == 204
    revoked_at = time.monotonic()
    while (await _list_webhooks(api_stack, access))[0] != 401:
        assert time.monotonic() - revoked_at < 10.0, "the change record never arrived"
        await asyncio.sleep(0.02)
    _, body = await _list_webhooks(api_stack, access)
    assert body["error"]["details"] == {"reason": "revoked"}  # type: ignore[index]
    assert (await _exchange(api_stack, created["token"]))[0] == 401


def _forge(access: str, **changes: object) -> str:
    header, payload, signature = access.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
    claims.update(changes)
    forged = base64.urlsafe_b64encode(orjson.dumps(claims)).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


async def test_tampered_expired_and_foreign_tokens_are_refused(api_stack: Stack) -> None:
    """Edited claims, an expired token, another key's signature and alg=none all fail."""
    _, answer = await _exchange(api_stack, api_stack.token)
    access = str(answer["access_token"])
    other_key = access_tokens.load_private_key(access_tokens.generate_private_key_pem())
    now = int(time.time())
    base_claims = jwt.decode(access, options={"verify_signature": False})
    kid = jwt.get_unverified_header(access)["kid"]
    real_key = access_tokens.load_private_key(ACCESS_TOKEN_KEY)
    expired = access_tokens.issue(real_key, {**base_claims, "iat": now - 7200, "exp": now - 60})
    status, body = await _list_webhooks(api_stack, expired)
    assert (status, body["error"]["details"]) == (401, {"reason": "expired"})  # type: ignore[index]
    assert (await _list_webhooks(api_stack, access_tokens.issue(real_key, base_claims)))[0] == 200
    unsigned = jwt.encode(base_claims, None, algorithm="none")
    cases = [
        _forge(access, perms=["team:billing"]),
        jwt.encode(base_claims, other_key, algorithm="EdDSA", headers={"kid": kid}),
        jwt.encode(base_claims, other_key, algorithm="EdDSA", headers={"kid": "other"}),
        expired,
        unsigned,
        "eyJ.not.jwt",
    ]
    for token in cases:
        status, body = await _list_webhooks(api_stack, token)
        assert status == 401, token
        assert body["error"]["code"] == "invalid_token"  # type: ignore[index]


async def test_a_token_from_an_auth_clock_a_little_ahead_is_accepted(api_stack: Stack) -> None:
    """Right after an exchange, an api host whose clock is behind auth's sees a token
    issued "in the future": within the leeway it is valid (it was refused as malformed);
    its expiry gets no such margin."""
    _, answer = await _exchange(api_stack, api_stack.token)
    claims = jwt.decode(str(answer["access_token"]), options={"verify_signature": False})
    key = access_tokens.load_private_key(ACCESS_TOKEN_KEY)
    now = int(time.time())
    ahead = access_tokens.issue(key, {**claims, "iat": now + 5, "exp": now + 3605})
    assert (await _list_webhooks(api_stack, ahead))[0] == 200
    just_over = access_tokens.issue(key, {**claims, "iat": now - 3600, "exp": now - 1})
    status, body = await _list_webhooks(api_stack, just_over)
    assert (status, body["error"]["details"]) == (401, {"reason": "expired"})  # type: ignore[index]


async def test_a_planned_key_replacement_keeps_the_old_keys_tokens_verifying(
    settings: Settings,
) -> None:
    """The old key in HOOKWIRE_ACCESS_TOKEN_PREVIOUS_KEYS (its public half): published
    after the new one, its tokens verify until they expire; new ones are signed with the
    new key. Without it, replacing the key ends every access token at once."""
    old_key = access_tokens.load_private_key(access_tokens.generate_private_key_pem())
    old_public = old_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    replaced = settings.model_copy(
        update={"access_token_previous_keys": SecretStr(old_public.decode())}
    )
    async with running_stack(replaced, with_dispatcher=False) as stack:
        async with stack.session.get(f"{stack.auth_url}/v1/keys") as response:
            published = [key["kid"] for key in (await response.json())["keys"]]
        current = access_tokens.load_private_key(ACCESS_TOKEN_KEY).public_key()
        assert published == [
            access_tokens.key_id(current),
            access_tokens.key_id(old_key.public_key()),
        ]
        _, answer = await _exchange(stack, stack.token)
        claims = jwt.decode(str(answer["access_token"]), options={"verify_signature": False})
        assert jwt.get_unverified_header(str(answer["access_token"]))["kid"] == published[0]
        from_before = access_tokens.issue(old_key, claims)
        assert (await _list_webhooks(stack, from_before))[0] == 200
    async with running_stack(settings, with_dispatcher=False) as stack:
        status, body = await _list_webhooks(stack, from_before)
        assert (status, body["error"]["details"]) == (401, {"reason": "unknown_key"})  # type: ignore[index]


async def test_exchange_refuses_bad_keys(api_stack: Stack) -> None:
    """Malformed, unknown, revoked and deactivated keys get no access token, and the
    answer says which."""
    _, revoked = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "revoked", "permissions": ["webhook:read"]}
    )
    assert (await api_stack.auth_call("DELETE", f"/v1/tokens/{revoked['id']}"))[0] == 204
    _, paused = await api_stack.auth_call(
        "POST", "/v1/tokens", json={"name": "paused", "permissions": ["webhook:read"]}
    )
    status, _ = await api_stack.auth_call(
        "PATCH", f"/v1/tokens/{paused['id']}", json={"active": False}
    )
    assert status == 200
    cases = [
        ("hwk_bad", "malformed"),
        (corrupt(api_stack.token), "malformed"),
        ("nothing", "malformed"),
        ("hwk_" + "a" * 300, "malformed"),
        (generate_token(), "unknown"),
        (revoked["token"], "revoked"),
        (paused["token"], "inactive"),
    ]
    for key, reason in cases:
        status, body = await _exchange(api_stack, key)
        assert status == 401, (key, body)
        error: Any = body["error"]
        assert (error["code"], error["details"]) == ("invalid_token", {"reason": reason}), key
        assert "access_token" not in body


@pytest.fixture
async def no_key_stack(settings: Settings) -> AsyncIterator[Stack]:
    async with running_stack(
        settings.model_copy(update={"access_token_private_key": None}), with_dispatcher=False
    ) as running:
        yield running


async def test_exchange_without_a_signing_key_says_so(no_key_stack: Stack) -> None:
    """Without HOOKWIRE_ACCESS_TOKEN_PRIVATE_KEY the feature answers 503 and names it."""
    status, body = await _exchange(no_key_stack, no_key_stack.token)
    assert status == 503
    assert "HOOKWIRE_ACCESS_TOKEN_PRIVATE_KEY" in body["error"]["message"]  # type: ignore[index]


async def test_an_access_token_where_none_are_issued_is_refused_not_unavailable(
    no_key_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no signing key, auth issues no access tokens, so one presented is signed by a
    key it does not know: 401 (not 503, "try again"), and auth is asked once, not on every
    request."""
    stranger = Ed25519PrivateKey.generate()
    token = access_tokens.issue(
        stranger, {"sub": "usr_x", "jti": "tok_x", "exp": int(time.time()) + 600}
    )
    asked = 0
    real_get = aiohttp.ClientSession.get

    def counting_get(self: aiohttp.ClientSession, url: Any, **kwargs: Any) -> Any:
        nonlocal asked
        if str(url).endswith("/v1/keys"):
            asked += 1
        return real_get(self, url, **kwargs)

    monkeypatch.setattr(aiohttp.ClientSession, "get", counting_get)
    for _ in range(3):
        async with no_key_stack.session.get(
            f"{no_key_stack.api_url}/v1/teams/{no_key_stack.team_id}/webhooks",
            headers={"authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 401
            error = (await response.json())["error"]
        assert (error["code"], error["details"]) == ("invalid_token", {"reason": "unknown_key"})
    assert asked == 1


async def test_an_access_token_keeps_its_keys_allowed_networks(api_stack: Stack) -> None:
    """A key limited to one address trades for a token the api refuses from another."""
    status, created = await api_stack.auth_call(
        "POST",
        "/v1/tokens",
        json={
            "name": "fenced",
            "permissions": ["webhook:read"],
            "allowed_cidrs": ["127.0.0.1/32"],
        },
    )
    assert status == 201
    status, answer = await _exchange(api_stack, created["token"])
    assert status == 200
    access = str(answer["access_token"])
    assert (await _list_webhooks(api_stack, access))[0] == 200
    # The key itself, from its address: answered by auth and cached by the api.
    assert (await _list_webhooks(api_stack, created["token"]))[0] == 200
    # Another loopback address: the same machine, outside the key's range.
    elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=elsewhere) as session:
        for token in (access, created["token"]):
            async with session.get(
                f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/webhooks",
                headers=api_stack.headers(token),
            ) as response:
                body = await response.json()
                assert response.status == 401, body
                assert body["error"]["details"]["reason"] == "ip_not_allowed"


@pytest.fixture
async def quick_sync_stack(settings: Settings) -> AsyncIterator[Stack]:
    async with running_stack(
        settings.model_copy(update={"ended_keys_sync_seconds": 0.2}), with_dispatcher=False
    ) as running:
        yield running


@pytest.mark.parametrize("ending", ["revoke", "deactivate", "expire"])
async def test_a_lost_change_record_still_ends_access_tokens(
    quick_sync_stack: Stack, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """The api never hears of the revocation: its periodic list from auth ends the token."""
    stack = quick_sync_stack
    gate = stack.api.app[CONTEXT].gate  # type: ignore[index]
    monkeypatch.setattr(gate, "note_token_state", lambda token_id, state: None)
    key = await stack.new_token(["webhook:read"])
    access = str((await _exchange(stack, key))[1]["access_token"])
    token_id = str(jwt.decode(access, options={"verify_signature": False})["tid"])
    assert (await _list_webhooks(stack, access))[0] == 200
    method, suffix, body = {
        "revoke": ("DELETE", "", None),
        "deactivate": ("PATCH", "", {"active": False}),
        "expire": ("POST", "/expire", None),
    }[ending]
    status, _ = await stack.auth_call(method, f"/v1/tokens/{token_id}{suffix}", json=body)
    assert status in (200, 204)
    await _until_let_in(stack, access, False, "the access token outlived its key")
    status, answer = await _list_webhooks(stack, access)
    assert status == 401
    assert answer["error"]["details"] == {"reason": "revoked"}  # type: ignore[index]
    if ending == "deactivate":
        assert (await stack.auth_call("PATCH", f"/v1/tokens/{token_id}", json={"active": True}))[
            0
        ] == 200
        await _until_let_in(stack, access, True, "reactivated key's access token stayed refused")


async def test_a_key_reactivated_with_its_change_record_lost_gets_its_access_tokens_back(
    quick_sync_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The api heard the deactivation, not the reactivation: the periodic list from auth,
    which no longer names the key, lets its access tokens in again (they were refused for
    a day)."""
    stack = quick_sync_stack
    # A short settle: only a key noted ended that long before the list is let go.
    monkeypatch.setattr(authn, "ENDED_SETTLE_SECONDS", 0.5)
    gate = stack.api.app[CONTEXT].gate  # type: ignore[index]
    key = await stack.new_token(["webhook:read"])
    access = str((await _exchange(stack, key))[1]["access_token"])
    token_id = str(jwt.decode(access, options={"verify_signature": False})["tid"])
    assert (await stack.auth_call("PATCH", f"/v1/tokens/{token_id}", json={"active": False}))[
        0
    ] == 200
    await _until_let_in(stack, access, False, "the deactivation never reached the api")
    hears = gate.note_token_state
    monkeypatch.setattr(
        gate,
        "note_token_state",
        lambda token_id, state: None if state == "active" else hears(token_id, state),
    )
    assert (await stack.auth_call("PATCH", f"/v1/tokens/{token_id}", json={"active": True}))[
        0
    ] == 200
    await _until_let_in(stack, access, True, "reactivated key's access token stayed refused")


async def test_the_ended_keys_list_needs_the_service_credential(api_stack: Stack) -> None:
    """Only services may read which keys ended."""
    for headers in ({}, {"authorization": "Bearer wrong"}, api_stack.headers()):
        async with api_stack.session.get(
            f"{api_stack.auth_url}/v1/ended-keys", headers=headers
        ) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_service_credential"


async def test_the_ended_keys_list_forgets_keys_switched_off_long_ago(api_stack: Stack) -> None:
    """A key switched off is listed for as long as an access token may live: the longest
    lifetime allowed, not the one in force, which may have been lowered since the key's
    tokens were issued. After that none is left, so the list does not grow with every key
    ever deactivated. Revoked and expired keys already left it that way."""
    keys = [await api_stack.new_token(["webhook:read"]) for _ in range(3)]
    hashes = [hash_token(key, "test-pepper") for key in keys]
    async with api_stack.api.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(tables.tokens.c.id, tables.tokens.c.secret_hash).where(
                    tables.tokens.c.secret_hash.in_(hashes)
                )
            )
        ).all()
    by_hash = {row.secret_hash: row.id for row in rows}
    recent, past_setting, past_longest = (by_hash[each] for each in hashes)
    for token_id in (recent, past_setting, past_longest):
        status, _ = await api_stack.auth_call(
            "PATCH", f"/v1/tokens/{token_id}", json={"active": False}
        )
        assert status == 200
    # Tokens of a key switched off one setting's lifetime ago may have been issued under
    # a longer one (the setting lowered since).
    lifetime = api_stack.settings.access_token_ttl_seconds
    assert lifetime < ACCESS_TOKEN_TTL_MAX
    for token_id, seconds in ((past_setting, lifetime), (past_longest, ACCESS_TOKEN_TTL_MAX)):
        async with api_stack.api.engine.begin() as conn:
            await conn.execute(
                update(tables.tokens)
                .where(tables.tokens.c.id == token_id)
                .values(deactivated_at=utcnow() - timedelta(seconds=seconds + 600))
            )
    async with api_stack.session.get(
        f"{api_stack.auth_url}/v1/ended-keys",
        headers={"authorization": "Bearer test-service-credential"},
    ) as response:
        assert response.status == 200
        ended = (await response.json())["token_ids"]
    assert recent in ended
    assert past_setting in ended
    assert past_longest not in ended


async def test_a_revocation_during_an_introspection_is_not_undone_by_its_answer(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The api asks auth about a key; auth read it before a revocation committed and
    answers "active". That answer must not be cached past the revocation's change record."""
    key = await api_stack.new_token(["webhook:read"])
    key_hash = hash_token(key, "test-pepper")
    pause = pause_first_call(
        monkeypatch, store, "find_token", only=lambda conn, secret_hash: secret_hash == key_hash
    )
    first = asyncio.create_task(_list_webhooks(api_stack, key))
    await asyncio.wait_for(pause.read.wait(), 5)
    token_id = (await api_stack.introspect(key))["token_id"]
    assert (await api_stack.auth_call("DELETE", f"/v1/tokens/{token_id}"))[0] == 204
    gate = api_stack.api.app[CONTEXT].gate  # type: ignore[index]
    deadline = time.monotonic() + 15
    while token_id not in gate._revoked:
        assert time.monotonic() < deadline, "the change record never reached the api"
        await asyncio.sleep(0.02)
    pause.release.set()
    # Auth answers "active" (it read the key first), but the api knows better by then.
    assert (await first)[0] == 401
    status, body = await _list_webhooks(api_stack, key)
    assert status == 401, body


async def test_a_retired_signing_key_stops_verifying_and_unknown_ids_are_not_a_flood(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The JWK set is read again after a while: a key the operator retired stops working.
    Made-up key ids read it at most once per interval, not once per request."""
    old_key = access_tokens.load_private_key(access_tokens.generate_private_key_pem())
    new_key = access_tokens.load_private_key(access_tokens.generate_private_key_pem())
    published = [old_key]
    fetches = 0

    async def keys(_: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        return web.json_response(access_tokens.jwk_set(published[0].public_key()))

    app = web.Application()
    app.router.add_get("/v1/keys", keys)
    runner = await start_site(app, "127.0.0.1", 0)
    monkeypatch.setattr(authn, "_KEYS_MAX_AGE_SECONDS", 0.3)
    claims = {"sub": "usr_1", "tid": "tok_1", "perms": ["webhook:read"], "teams": {"t": "owner"}}

    def signed_by(key: Any, **extra: Any) -> str:
        now = int(time.time())
        return access_tokens.issue(key, {**claims, "iat": now, "exp": now + 600, **extra})

    try:
        async with aiohttp.ClientSession() as session:
            gate = authn.TokenGate(
                session, f"http://127.0.0.1:{bound_port(runner)}", "x", 1.0, Metrics("t")
            )
            principal = await gate._require_access_token(
                signed_by(old_key), "t", "webhook:read", None
            )
            assert principal.token_id == "tok_1"
            published[0] = new_key
            await asyncio.sleep(0.4)
            with pytest.raises(InvalidToken) as refused:
                await gate._require_access_token(signed_by(old_key), "t", "webhook:read", None)
            assert refused.value.details == {"reason": "unknown_key"}
            assert await gate._require_access_token(signed_by(new_key), "t", "webhook:read", None)
            # An interval longer than the flood takes on a loaded machine.
            monkeypatch.setattr(authn, "_KEYS_MAX_AGE_SECONDS", 60)
            before = fetches
            stranger = access_tokens.load_private_key(access_tokens.generate_private_key_pem())
            for _ in range(20):
                with pytest.raises(InvalidToken):
                    await gate._require_access_token(signed_by(stranger), "t", "webhook:read", None)
            assert fetches - before <= 1
    finally:
        await runner.cleanup()
