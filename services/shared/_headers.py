"""Webhook custom headers: which are hookwire's own, which look like credentials, and
how those are shown.

Their values go out with every delivery but are never shown back: not in webhook views,
the delivery log, the attempts topic or the audit log.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

# Broad on purpose: a harmless header hidden (X-Bypass-Cache) costs typing it again when
# the url moves; a credential shown costs the credential.
_SECRET_HEADER = re.compile(
    r"auth|cookie|token|secret|key|pass|pwd|credential|signature|jwt|session|bearer|private",
    re.IGNORECASE,
)
REDACTED = "[redacted]"

_RESERVED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        # "100-continue" would hold the body back until the receiver gives a go-ahead.
        "expect",
        "host",
        "user-agent",
    }
)
# The body's framing and the signature are hookwire's: a custom Content-Encoding would
# label a plain body as compressed, a Webhook-* header would pose as part of the signature.
# Proxy-* headers are for a proxy between hookwire and the receiver, not the receiver.
_RESERVED_PREFIXES = ("content-", "webhook-", "proxy-")


@functools.lru_cache(maxsize=4096)
def is_reserved_header(name: str) -> bool:
    """A header hookwire sets itself (or that is not the receiver's): a webhook may not
    set it. The api refuses it; a delivery leaves out one a row holds anyway (edited by
    hand, or written by an older release)."""
    lowered = name.lower()
    return lowered in _RESERVED_HEADERS or lowered.startswith(_RESERVED_PREFIXES)


@functools.lru_cache(maxsize=4096)
def is_secret_header(name: str) -> bool:
    return _SECRET_HEADER.search(name) is not None


def redacted(headers: Mapping[str, str], *, keep_reserved: bool = False) -> dict[str, str]:
    """``headers`` with credential-like values masked; ``keep_reserved``: but for
    hookwire's own (the signature included), shown to the receiver they were sent to."""
    return {
        name: REDACTED
        if is_secret_header(name) and not (keep_reserved and is_reserved_header(name))
        else value
        for name, value in headers.items()
    }
