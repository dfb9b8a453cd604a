"""Standard Webhooks signing, checked against the specification's construction."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from services.dispatcher.errors import InvalidSecret, Unsigned
from services.dispatcher.routing import SigningKey
from services.dispatcher.sender import signed_headers
from services.dispatcher.signing import secret_key, sign, signature_header
from services.shared import Delivery
from tests.samples import sample_event, sample_route


def _reference(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.{body.decode()}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def test_signature_matches_the_specification() -> None:
    """v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}"> with the decoded secret."""
    raw = bytes(range(32))
    secret = "whsec_" + base64.b64encode(raw).decode()
    body = b'{"type":"object.created","data":{"a":1}}'
    assert sign(secret_key(secret), "msg_1", 1_700_000_000, body) == _reference(
        raw, "msg_1", 1_700_000_000, body
    )


def test_any_change_breaks_the_signature() -> None:
    """Body, id and timestamp are all covered by the signature."""
    key = b"k" * 32
    base = sign(key, "msg_1", 100, b"{}")
    assert sign(key, "msg_2", 100, b"{}") != base
    assert sign(key, "msg_1", 101, b"{}") != base
    assert sign(key, "msg_1", 100, b"{ }") != base
    assert sign(b"j" * 32, "msg_1", 100, b"{}") != base


def test_rotation_sends_one_signature_per_secret() -> None:
    """During rotation both signatures are present, space-separated, each valid."""
    old, new = b"o" * 32, b"n" * 32
    header = signature_header([old, new], "msg_1", 5, b"{}")
    assert header.split(" ") == [
        _reference(old, "msg_1", 5, b"{}"),
        _reference(new, "msg_1", 5, b"{}"),
    ]


def test_a_rotated_out_secret_stops_signing_when_its_grace_ends() -> None:
    """Between the end of the grace and the next re-read of the webhook, the old secret
    no longer signs: the request's own time decides, not when the webhook was read."""
    old, new = b"o" * 32, b"n" * 32
    grace_ends = datetime(2026, 1, 1, 12, tzinfo=UTC)
    route = sample_route(signing_keys=(SigningKey(old, grace_ends), SigningKey(new)))
    delivery = Delivery(id="msg_1", webhook_id="wh_1", attempt=1, event=sample_event())
    during = int(grace_ends.timestamp()) - 1
    after = int(grace_ends.timestamp())
    assert signed_headers(route, delivery, b"{}", during)["webhook-signature"] == " ".join(
        [_reference(old, "msg_1", during, b"{}"), _reference(new, "msg_1", during, b"{}")]
    )
    assert signed_headers(route, delivery, b"{}", after)["webhook-signature"] == _reference(
        new, "msg_1", after, b"{}"
    )


@pytest.mark.parametrize("secret", ["sk_abc", "whsec_not*base64", "whsec_"[:-1]])
def test_malformed_secrets_are_refused(secret: str) -> None:
    """A secret without the whsec_ prefix or with bad base64 is not used to sign."""
    with pytest.raises(InvalidSecret):
        secret_key(secret)


def test_no_secret_gives_no_signature_header_rather_than_an_empty_one() -> None:
    """An empty webhook-signature would send a delivery unsigned; none is made."""
    with pytest.raises(Unsigned):
        signature_header([], "msg_1", 5, b"{}")


def test_an_empty_secret_signs_nothing() -> None:
    """A signature with an empty key is one anyone could compute: it is left out, the
    webhook's other secrets still sign, and with none left nothing is sent."""
    empty, key = secret_key("whsec_"), secret_key("whsec_" + "a2V5" * 8)
    assert signature_header([empty, key], "msg_1", 5, b"{}") == signature_header(
        [key], "msg_1", 5, b"{}"
    )
    with pytest.raises(Unsigned):
        signature_header([empty], "msg_1", 5, b"{}")
