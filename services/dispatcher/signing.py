"""Standard Webhooks signatures: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

from .errors import InvalidSecret, Unsigned

SECRET_PREFIX = "whsec_"  # noqa: S105 - a format marker, not a secret


def secret_key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecret("signing secrets start with whsec_")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except ValueError as exc:
        raise InvalidSecret("signing secret is not valid base64") from exc
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(keys: Iterable[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """One signature per active secret, space-separated, so rotation never breaks receivers.
    Raises ``Unsigned`` when there is none: an empty header would send it unsigned."""
    # An empty key signs, but anyone can compute that signature: it is no secret. (Read, it
    # leaves the webhook's other secrets in force rather than drop the whole webhook.)
    header = " ".join(sign(key, message_id, timestamp, body) for key in keys if key)
    if not header:
        raise Unsigned("the webhook has no signing secret in force")
    return header
