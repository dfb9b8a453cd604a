"""The SSRF guard: webhook URLs must not reach private, loopback or link-local addresses."""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import re
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import AsyncResolver
from yarl import URL

REFUSED = "refused:"

# A webhook is saved by a person waiting on the answer; a name server that does not answer
# gets this long before the URL is refused as unresolvable.
LOOKUP_SECONDS = 5.0


# Blocks that are not globally reachable (IANA's special-purpose registries), listed here
# because the running Python's tables differ by patch level: 3.11.7 counts most of
# 192.0.0.0/24, 3fff::/20 and 6to4 as global.
_DENIED_IPV4 = tuple(
    ipaddress.IPv4Network(block)
    for block in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
# IPv6 unicast addresses are assigned from 2000::/3 alone. Outside it lie loopback, the
# IPv4-mapped and -compatible forms, the local-use NAT64 prefix 64:ff9b:1::/48 (whose IPv4
# address sits where its operator's prefix length puts it), unique-local, link-local,
# site-local, multicast and unassigned space.
_IPV6_UNICAST = ipaddress.IPv6Network("2000::/3")
# Inside it: IETF protocol assignments (Teredo among them), documentation, and 6to4, which
# reaches whatever IPv4 address it embeds through whichever relay answers.
_DENIED_IPV6 = tuple(
    ipaddress.IPv6Network(block)
    for block in ("2001::/23", "2001:db8::/32", "2002::/16", "3fff::/20")
)
# RFC 6052's well-known NAT64 prefix: public itself, it leads to the IPv4 address in its
# last 32 bits, which decides.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to (mapped, 6to4, Teredo, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _is_public_ipv4(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not any(ip in block for block in _DENIED_IPV4)


def _is_public_ipv6(ip: ipaddress.IPv6Address) -> bool:
    if ip in _NAT64:
        return True
    return ip.is_global and ip in _IPV6_UNICAST and not any(ip in block for block in _DENIED_IPV6)


def is_public_address(address: str) -> bool:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return _is_public_ipv4(ip)
    # Both must be public: 64:ff9b::a9fe:a9fe is 169.254.169.254 (cloud metadata) through
    # NAT64, and a Teredo address names a public IPv4 server and client.
    embedded = _embedded_ipv4(ip)
    return _is_public_ipv6(ip) and (embedded is None or _is_public_ipv4(embedded))


# A label read as a number by some parser: decimal, octal (a leading 0) or hexadecimal.
_NUMBER_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")


def _is_ambiguous_ipv4(host: str) -> bool:
    """Whether a host reads as an IPv4 address without being a canonical dotted quad.

    Parsers disagree on such a host: C's inet_aton (the system resolver, older aiohttp)
    reads 0177.0.0.1 as 127.0.0.1 and takes 127.1 and 2130706433 too, c-ares reads
    0177.0.0.1 as 177.0.0.1 and looks 0x7f.1 up as a name, and WHATWG URL parsers take any
    host ending in a number for an address. No top-level domain is a number.
    """
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return False
    if _NUMBER_LABEL.fullmatch(host.removesuffix(".").rpartition(".")[2]):
        return True
    try:
        # glibc's also takes anything after a space: "127.0.0.1 x".
        socket.inet_aton(host)
    except (OSError, ValueError):
        return False
    return True


def asynchronous_resolver(nameservers: Sequence[str] | None = None) -> AsyncResolver:
    """A resolver that asks name servers itself (c-ares), holding no thread per lookup.

    The system resolver blocks a thread of the event loop's shared pool for every lookup:
    a few webhooks whose name server never answers would hold all of them, and every other
    endpoint's lookups would queue behind. Without ``nameservers`` the system's are used
    (resolv.conf, and the hosts file first). Each resolver has its own channel, closed
    with it: c-ares keeps answers (a "no such name" too) for their TTL, and a channel
    shared for the life of the process would refuse a webhook whose name was just added.
    """
    # Any argument gives a resolver of its own rather than aiohttp's one per event loop.
    return AsyncResolver(nameservers=list(nameservers) if nameservers else None)


def host_problem(url: str) -> str | None:
    """Why the URL's host cannot be called whatever it resolves to (none, not a valid name,
    an IPv4 address written so that readers disagree on it), or None. Checked with private
    addresses allowed too: the HTTP client refuses such a host at every delivery."""
    host = urlsplit(url).hostname
    if host is None:
        return "URL has no host"
    try:
        # An empty or over-long label fails the IDNA encoding before any lookup.
        host.encode("idna")
        # The name a delivery will look up: an international one in its ASCII form.
        ascii_host = URL(url).raw_host
        (ascii_host or "").encode("ascii")
    except (ValueError, UnicodeError):
        return f"{host} is not a valid host name"
    if not ascii_host:
        return "URL has no host"
    if _is_ambiguous_ipv4(ascii_host):
        return (
            f"{host} is an ambiguous IPv4 address: write it as four decimal numbers without"
            " leading zeros, like 192.0.2.1"
        )
    return None


async def refused_reason(url: str, nameservers: Sequence[str] | None = None) -> str | None:
    """Why the URL may not be called, or None when every address it resolves to is public."""
    problem = host_problem(url)
    if problem is not None:
        return problem
    # Both are there and valid: host_problem found none.
    host = urlsplit(url).hostname or ""
    ascii_host = URL(url).raw_host or ""
    resolver = asynchronous_resolver(nameservers)
    try:
        async with asyncio.timeout(LOOKUP_SECONDS):
            results = await resolver.resolve(ascii_host, 0, socket.AF_UNSPEC)
    except TimeoutError:
        return f"cannot resolve {host}: no answer within {LOOKUP_SECONDS:g} s"
    except OSError as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    finally:
        await resolver.close()
    for result in results:
        if not is_public_address(result["host"]):
            _refusal_logged(host, result["host"])
            return f"{host} resolves to a non-public address"
    return None


def _refusal_logged(host: str, address: str) -> None:
    # The address is for the operator: told to whoever saved the webhook, it would map
    # the internal network one name at a time.
    structlog.get_logger().warning("webhook_address_refused", host=host, address=address)


@functools.lru_cache(maxsize=4096)
def literal_refusal(url: str, *, private_allowed: bool = False) -> str | None:
    """For a URL whose host is an IP literal (which skips DNS) or reads as one, why it is
    refused; None otherwise. The host is read as aiohttp will connect to it (yarl), as the
    api's check reads it; a webhook's URL is checked on every delivery, hence the cache.
    An ambiguous IPv4 address is refused even with private addresses allowed."""
    try:
        host = URL(url).raw_host or ""
    except ValueError:
        return None
    if _is_ambiguous_ipv4(host):
        return f"{REFUSED} {host} is an ambiguous IPv4 address"
    if private_allowed:
        return None
    try:
        public = is_public_address(host)
    except ValueError:
        return None
    return None if public else f"{REFUSED} {host} is a non-public address"


class GuardedResolver(AbstractResolver):
    """Resolves like the default resolver but refuses hosts with a non-public address.

    The connection is made to the addresses returned here, so the check happens at connect
    time: a name that resolved to a public address when the webhook was saved and to a
    private one now (DNS rebinding) is refused.
    """

    def __init__(self, nameservers: Sequence[str] | None = None) -> None:
        self._inner = asynchronous_resolver(nameservers)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not is_public_address(result["host"]):
                _refusal_logged(host, result["host"])
                # errno and strerror, so aiohttp's connection error carries the reason.
                raise OSError(errno.EACCES, f"{REFUSED} {host} resolves to a non-public address")
        return results

    async def close(self) -> None:
        await self._inner.close()
