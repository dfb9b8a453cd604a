"""Token format, checksum and hashing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

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
