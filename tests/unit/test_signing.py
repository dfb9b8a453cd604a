"""Standard Webhooks signing, checked against the specification's construction."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

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


def _documented_verify() -> Callable[[str, dict[str, str], bytes], bool]:
    """The receiver's check docs/delivery.md offers, as written there."""
    text = (Path(__file__).parents[2] / "docs" / "delivery.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # noqa: S102 -- the documentation's own example
    return cast(Callable[[str, dict[str, str], bytes], bool], namespace["verify"])


def test_the_documented_check_accepts_hookwires_signatures_and_refuses_anything_else() -> None:
    """Copied by receivers, it must answer a forged request with False, never raise."""
    verify = _documented_verify()
    secrets = ["whsec_" + base64.b64encode(bytes([n]) * 32).decode() for n in (1, 2)]
    body = b'{"type":"object.created"}'
    now = int(time.time())
    signatures = " ".join(sign(secret_key(s), "msg_1", now, body) for s in secrets)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now)}
    signed = {**headers, "webhook-signature": signatures}
    assert verify(secrets[0], signed, body)
    assert verify(secrets[1], signed, body)
    other = "whsec_" + base64.b64encode(b"\x03" * 32).decode()
    refused = [
        (other, signed, body),
        (secrets[0], signed, body + b" "),
        (secrets[0], {**signed, "webhook-id": "msg_2"}, body),
        (secrets[0], {**signed, "webhook-timestamp": str(now - 3600)}, body),
        # Forged requests: a signature that is not ASCII, a timestamp that is not a number
        # (or digits from another script), headers left out.
        (secrets[0], {**headers, "webhook-signature": "v1,é"}, body),
        (secrets[0], {**signed, "webhook-timestamp": "soon"}, body),
        # Too long for int() to read at all.
        (secrets[0], {**signed, "webhook-timestamp": "9" * 5000}, body),
        (secrets[0], {**signed, "webhook-timestamp": "\uff11\uff17\uff10\uff10"}, body),
        (secrets[0], {"webhook-signature": signatures}, body),
        (secrets[0], headers, body),
    ]
    for secret, given, sent in refused:
        assert verify(secret, given, sent) is False
