"""Token format and hashing, pure functions.

A token is ``hwk_`` + 43 base62 characters (32 random bytes) + a 6-character base62
CRC32 of everything before it. The checksum lets scanners and the service reject a typo
without a database lookup; only an HMAC-SHA256 of the whole token is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import zlib
from datetime import datetime, timedelta

from .errors import MalformedToken

PREFIX = "hwk_"
_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
_RANDOM_BYTES = 32
_BODY_CHARS = 43  # ceil(256 / log2(62))
_CHECKSUM_CHARS = 6  # 62**6 > 2**32
TOKEN_LENGTH = len(PREFIX) + _BODY_CHARS + _CHECKSUM_CHARS
DISPLAY_PREFIX_LENGTH = len(PREFIX) + 8


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, remainder = divmod(number, 62)
        digits.append(_ALPHABET[remainder])
    return "".join(reversed(digits)).rjust(width, "0")


def _checksum(head: str) -> str:
    return _base62(zlib.crc32(head.encode()), _CHECKSUM_CHARS)


def generate_token() -> str:
    head = PREFIX + _base62(int.from_bytes(secrets.token_bytes(_RANDOM_BYTES), "big"), _BODY_CHARS)
    return head + _checksum(head)


def check_format(token: str) -> None:
    """Raise ``MalformedToken`` with the reason if the token cannot be one of ours."""
    if not token.startswith(PREFIX):
        raise MalformedToken("token does not start with hwk_", details={"reason": "wrong_prefix"})
    if len(token) != TOKEN_LENGTH:
        raise MalformedToken("token has the wrong length", details={"reason": "wrong_length"})
    if any(ch not in _ALPHABET for ch in token[len(PREFIX) :]):
        raise MalformedToken("token has invalid characters", details={"reason": "bad_characters"})
    head, checksum = token[:-_CHECKSUM_CHARS], token[-_CHECKSUM_CHARS:]
    if not hmac.compare_digest(_checksum(head), checksum):
        raise MalformedToken("token checksum does not match", details={"reason": "bad_checksum"})


def hash_token(token: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), token.encode(), hashlib.sha256).hexdigest()


def display_prefix(token: str) -> str:
    return token[:DISPLAY_PREFIX_LENGTH]


def lifetime_problem(
    expires_at: datetime | None, now: datetime, max_days: int | None
) -> str | None:
    """Why a key ending at ``expires_at`` may not be made, or None when it may.

    One rule for the api and the command line: with ``HOOKWIRE_TOKEN_MAX_LIFETIME_DAYS`` set
    every key ends, and within that many days.
    """
    if expires_at is None:
        return None if max_days is None else "required: tokens have a maximum lifetime"
    if expires_at <= now:
        return "must be in the future"
    if max_days is not None and expires_at > now + timedelta(days=max_days):
        return f"must be within {max_days} days"
    return None
