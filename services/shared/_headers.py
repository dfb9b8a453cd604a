"""Webhook custom headers that look like credentials, and how they are shown.

Their values go out with every delivery but are never shown back: not in webhook views,
the delivery log, the attempts topic or the audit log.
"""

from __future__ import annotations

import functools
import re

# Broad on purpose: a harmless header hidden (X-Bypass-Cache) costs typing it again when
# the url moves; a credential shown costs the credential.
_SECRET_HEADER = re.compile(
    r"auth|cookie|token|secret|key|pass|pwd|credential|signature|jwt|session|bearer|private",
    re.IGNORECASE,
)
REDACTED = "[redacted]"


@functools.lru_cache(maxsize=4096)
def is_secret_header(name: str) -> bool:
    return _SECRET_HEADER.search(name) is not None


def redacted(headers: dict[str, str]) -> dict[str, str]:
    return {name: REDACTED if is_secret_header(name) else value for name, value in headers.items()}
