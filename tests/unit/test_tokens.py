"""Token format, checksum and hashing; the clock margins of access tokens."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.auth.errors import MalformedToken
from services.auth.tokens import (
    PREFIX,
    TOKEN_LENGTH,
    check_format,
    display_prefix,
    generate_token,
    hash_token,
    lifetime_problem,
)
from services.shared import InvalidToken, access_tokens


def test_generated_tokens_have_the_documented_shape() -> None:
    """hwk_ prefix, fixed length, base62 body, valid checksum, and never repeated."""
    tokens = {generate_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert token.startswith(PREFIX)
        assert len(token) == TOKEN_LENGTH == 53
        assert token[4:].isalnum()
        check_format(token)


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda t: "hwx_" + t[4:], "wrong_prefix"),
        (lambda t: t[:-1], "wrong_length"),
        (lambda t: t + "A", "wrong_length"),
        (lambda t: t[:10] + "-" + t[11:], "bad_characters"),
        (lambda t: t[:10] + ("A" if t[10] != "A" else "B") + t[11:], "bad_checksum"),
        (lambda t: t[:-1] + ("0" if t[-1] != "0" else "1"), "bad_checksum"),
    ],
)
def test_malformed_tokens_are_rejected_with_a_reason(mangle: object, reason: str) -> None:
    """A typo anywhere is caught by the format check, before any lookup."""
    token = generate_token()
    with pytest.raises(MalformedToken) as caught:
        check_format(mangle(token))  # type: ignore[operator]
    assert caught.value.details == {"reason": reason}


def test_hash_depends_on_token_and_pepper() -> None:
    """Only a keyed hash is stored: same input same hash, another pepper another hash."""
    token = generate_token()
    assert hash_token(token, "pepper") == hash_token(token, "pepper")
    assert hash_token(token, "pepper") != hash_token(token, "other")
    assert hash_token(token, "pepper") != hash_token(generate_token(), "pepper")
    assert token not in hash_token(token, "pepper")


def test_display_prefix_is_short_and_not_the_secret() -> None:
    """The display prefix identifies a token in lists without revealing it."""
    token = generate_token()
    assert display_prefix(token) == token[:12]
    assert len(display_prefix(token)) < len(token) // 4


def test_lifetime_rule_bounds_keys_only_when_a_maximum_is_set() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert lifetime_problem(None, now, None) is None
    assert lifetime_problem(None, now, 30) == "required: tokens have a maximum lifetime"
    assert lifetime_problem(now, now, None) == "must be in the future"
    assert lifetime_problem(now + timedelta(days=30), now, 30) is None
    assert lifetime_problem(now + timedelta(days=30, seconds=1), now, 30) == (
        "must be within 30 days"
    )
    assert lifetime_problem(now + timedelta(days=3000), now, None) is None


def _access_token(**claims: int) -> tuple[Ed25519PublicKey, str]:
    key = access_tokens.load_private_key(access_tokens.generate_private_key_pem())
    now = int(time.time())
    token = access_tokens.issue(
        key, {"sub": "usr_1", "tid": "tok_1", "iat": now, "exp": now + 600, **claims}
    )
    return key.public_key(), token


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_an_access_token_from_a_clock_a_little_ahead_verifies(claim: str) -> None:
    """Auth's clock a few seconds ahead of the api's: a token it just issued is valid."""
    public_key, token = _access_token(**{claim: int(time.time()) + 5})
    assert access_tokens.verify(public_key, token).user_id == "usr_1"


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_an_access_token_from_far_in_the_future_is_refused(claim: str) -> None:
    ahead = int(time.time()) + access_tokens.CLOCK_LEEWAY_SECONDS + 60
    public_key, token = _access_token(**{claim: ahead})
    with pytest.raises(InvalidToken) as caught:
        access_tokens.verify(public_key, token)
    assert caught.value.details == {"reason": "malformed"}


@pytest.mark.parametrize("ago", [1, 20, 7200])
def test_an_expired_access_token_gets_no_leeway(ago: int) -> None:
    """The margin for a clock ahead is no margin for expiry: a token is over when its exp
    has passed, however recently."""
    now = int(time.time())
    public_key, token = _access_token(iat=now - 7200, exp=now - ago)
    with pytest.raises(InvalidToken) as caught:
        access_tokens.verify(public_key, token)
    assert caught.value.details == {"reason": "expired"}
