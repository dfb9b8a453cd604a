"""The api's rules for a webhook's custom headers: names hookwire or the connection owns, and
values a receiver may read differently, are refused with the field named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.api.webhooks import WebhookCreate

VALID = {"name": "n", "url": "https://example.com/hook", "topics": ["object.created"]}


def _refusal(headers: dict[str, str]) -> str:
    with pytest.raises(ValidationError) as refused:
        WebhookCreate.model_validate({**VALID, "headers": headers})
    [problem] = refused.value.errors()
    assert problem["loc"] == ("headers",)
    return str(problem["msg"])


@pytest.mark.parametrize(
    "name",
    [
        "Expect",
        "expect",
        "TE",
        "Trailer",
        "Upgrade",
        "Connection",
        "Keep-Alive",
        "Proxy-Authorization",
        "Proxy-Connection",
        "proxy-anything",
        "Host",
    ],
)
def test_headers_that_change_how_the_request_travels_are_refused(name: str) -> None:
    """Expect: 100-continue would hold the body back waiting for a go-ahead; the others are
    hop-by-hop, for a proxy, or hookwire's own."""
    assert _refusal({name: "x"}) == (
        f"Value error, {name!r} is hookwire's to set (or not the receiver's: hop-by-hop,"
        " for a proxy): a webhook cannot set it"
    )


@pytest.mark.parametrize(
    "value", ["caf\u00e9", "\u00a0", "a\u0080b", "\u2028", "\u202e", "\U0001f600", "\ufeff"]
)
def test_values_beyond_visible_ascii_are_refused(value: str) -> None:
    """Latin-1 and other non-ASCII characters, line and paragraph separators, direction
    overrides: encoded differently by clients and read differently by receivers."""
    assert _refusal({"X-Tenant": value}) == (
        "Value error, value of 'X-Tenant' must be at most 1024 visible ASCII characters,"
        " spaces or tabs"
    )


@pytest.mark.parametrize("value", ["acme", "a b\tc", "!~ \"'<>{}", "", "x" * 1024])
def test_visible_ascii_spaces_and_tabs_are_kept(value: str) -> None:
    webhook = WebhookCreate.model_validate(
        {**VALID, "headers": {"X-Tenant": value, "X-Expected-Version": "2"}}
    )
    assert webhook.headers == {"X-Tenant": value, "X-Expected-Version": "2"}
