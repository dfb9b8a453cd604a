"""The SSRF guard: webhook URLs must not reach private, loopback or link-local addresses."""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
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


# IPv6 prefixes that carry an IPv4 address in their last 32 bits and reach it through a
# translator (RFC 6052's well-known NAT64 prefix and RFC 8215's local-use one).
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to (mapped, 6to4, Teredo, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in prefix for prefix in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(address: str) -> bool:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        # 64:ff9b::a9fe:a9fe is 169.254.169.254 (cloud metadata) through NAT64.
        ip = _embedded_ipv4(ip) or ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        # Deprecated (fec0::/10) but still routed inside some networks; Python counts it
        # as global.
        return False
    # Python counts some reserved IPv6 ranges as global (the IPv4-compatible ::/96, which
    # can reach 127.0.0.1 as ::7f00:1, and the unassigned 4000::/2 and beyond).
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


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


async def refused_reason(url: str, nameservers: Sequence[str] | None = None) -> str | None:
    """Why the URL may not be called, or None when every address it resolves to is public."""
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
def literal_refusal(url: str) -> str | None:
    """For a URL whose host is an IP literal (which skips DNS), why it is refused; None
    otherwise. The host is read as aiohttp will connect to it (yarl), as the api's check
    reads it; a webhook's URL is checked on every delivery, hence the cache."""
    try:
        host = URL(url).raw_host or ""
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
