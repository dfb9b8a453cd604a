"""How a caller presents a token; every service accepts the same forms."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import structlog
from aiohttp import web

from ._errors import BadRequest, Unauthorized

# The opt-in query-string form of a key; routes that validate their query ignore it.
QUERY_KEY_PARAM = "auth-key"

# The longest key and team id the auth service's introspection reads; a service asking it
# refuses longer ones itself (a key that long is no key, a team id that long no team).
MAX_TOKEN_CHARS = 256
MAX_TEAM_ID_CHARS = 128


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def in_networks(client_ip: str | None, networks: Iterable[Network]) -> bool:
    """Whether the address (text, as a peer or a forwarded header gives it) falls in any
    of the networks; not an address is in none."""
    try:
        address = ipaddress.ip_address(client_ip or "")
    except ValueError:
        return False
    # A dual-stack proxy or listener writes an IPv4 client as ::ffff:a.b.c.d: it is that
    # IPv4 address, in the IPv4 ranges (and still in any IPv6 range naming it so).
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return any(
        address in network or (mapped is not None and mapped in network) for network in networks
    )


def ip_in_ranges(client_ip: str | None, cidrs: tuple[str, ...]) -> bool:
    """Whether a key limited to these ranges may be used from this address (an unknown
    address may not)."""
    return in_networks(client_ip, (ipaddress.ip_network(cidr, strict=False) for cidr in cidrs))


class MissingToken(Unauthorized):
    code = "missing_token"


class InvalidToken(Unauthorized):
    code = "invalid_token"


class QueryKeyRefused(BadRequest):
    code = "query_key_refused"


class AmbiguousCredentials(BadRequest):
    """More than one credential on a request: which one it runs as would depend on the
    order a proxy left the headers in (RFC 6750 names it an invalid request)."""

    code = "ambiguous_credentials"


def presented_token(request: web.Request, *, allow_query_keys: bool) -> str:
    """The token from ``Authorization: Bearer …`` / ``Key=…``, or the opt-in query key."""
    return _printable(_presented(request, allow_query_keys=allow_query_keys))


def _printable(token: str) -> str:
    # Every token is printable ASCII; the HTTP parser hands other bytes on as surrogates,
    # which fail wherever the token is hashed or encoded.
    if not (token.isascii() and token.isprintable()):
        raise InvalidToken("token is not valid: malformed", details={"reason": "malformed"})
    return token


def _presented(request: web.Request, *, allow_query_keys: bool) -> str:
    headers = len(request.headers.getall("authorization", ()))
    if headers > 1:
        raise AmbiguousCredentials(f"send one Authorization header: this request has {headers}")
    if QUERY_KEY_PARAM in request.query:
        if not allow_query_keys:
            raise QueryKeyRefused(
                "tokens in the query string are refused because URLs get logged; "
                "send it as `Authorization: Bearer <token>`"
            )
        if headers or len(request.query.getall(QUERY_KEY_PARAM)) > 1:
            raise AmbiguousCredentials(
                f"send one key: in the Authorization header or once as ?{QUERY_KEY_PARAM}="
            )
        structlog.get_logger().warning("query_string_key_used", path=request.path)
        given = request.query[QUERY_KEY_PARAM].strip()
        if not given:
            raise MissingToken("send a token as `Authorization: Bearer <token>`")
        return given
    header = request.headers.get("authorization", "").strip()
    if not header:
        raise MissingToken("send a token as `Authorization: Bearer <token>`")
    scheme, given = header[:7].lower(), header[7:]
    if scheme[:4] == "key=":
        scheme, given = "key=", header[4:]
    elif header.lower() == "bearer":
        # The trailing space went with the strip: a scheme with no token after it.
        scheme, given = "bearer ", ""
    if scheme in ("bearer ", "key="):
        if not given.strip():
            raise MissingToken("send a token as `Authorization: Bearer <token>`")
        return given.strip()
    # Another scheme (`Basic …`): no key presented in a form we take, a malformed
    # credential like any other, with the reason every refusal of one gives.
    raise InvalidToken(
        "unsupported authorization scheme: send the key as `Authorization: Bearer <key>`"
        " (or `Key=<key>`)",
        details={"reason": "malformed"},
    )
